"""Environment steps per second of HalfCheetah: metalearn's MuJoCo sampling (data.workers=0, 1, 2, ...) against a
plain Gymnasium loop, in one process.

    python scripts/bench_sampling.py [--envs 100] [--steps 100] [--workers 0,1,2] [--repeats 3] [--no-async-vector]

Sides, each stepping ``--envs`` HalfCheetah-v5 environments for ``--steps`` steps from a seeded reset:

* ``gymnasium loop``: ``gymnasium.make("HalfCheetah-v5")`` (with its default wrappers) once per environment, then
  ``env.step(env.action_space.sample())`` for each environment in turn, as a plain script would;
* ``metalearn workers=W``: the environment of ``data=halfcheetah_vel data.workers=W`` (data/mujoco.py), a batch
  of ``--envs`` tasks x 1 episode, reset and stepped as ``policy_gradient.rollout`` does (torch actions
  [tasks, episodes, 6], clipped; observations, task rewards and ends back as tensors);
* ``gymnasium AsyncVectorEnv W``: Gymnasium's own vector environment over W processes, each stepping a "chunk"
  environment of ``--envs / W`` HalfCheetahs (defined here), the alternative to metalearn's pool; only where W
  divides ``--envs`` (its sub-environments must have equal spaces).

Every side makes its environments (and processes) once, in a warm-up round; then the sides take turns, round by
round (A/B/C/A/B/C: load on a shared machine hits them alike), and the table shows each side's median steps/s over
``--repeats`` rounds (resets not timed) and its ratio to the plain loop. MuJoCo's compiler warning about
Gymnasium's half_cheetah.xml (``settotalmass``) is silenced on every side.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def plain_loop(n: int):
    """The reference: n environments from gymnasium.make, stepped one after the other with random actions."""
    import gymnasium

    envs = [gymnasium.make("HalfCheetah-v5") for _ in range(n)]
    for i, env in enumerate(envs):
        env.action_space.seed(i)

    def run(steps: int, seed: int) -> float:
        for i, env in enumerate(envs):
            env.reset(seed=seed + i)
        start = time.perf_counter()
        for _ in range(steps):
            for env in envs:
                env.step(env.action_space.sample())
        return time.perf_counter() - start

    return run, lambda: [env.close() for env in envs]


def metalearn_side(n: int, workers: int, steps: int):
    """metalearn's environment for data=halfcheetah_vel data.workers=W, stepped as rollout steps it."""
    import torch

    from metalearn.data import halfcheetah_vel

    env = halfcheetah_vel.load(halfcheetah_vel.Config(workers=workers, horizon=steps))["train"].env
    goals = torch.ones(n, 1)
    g = torch.Generator().manual_seed(0)

    def run(steps: int, seed: int) -> float:
        state, obs = env.reset(goals, torch.arange(seed, seed + n).view(n, 1))
        start = time.perf_counter()
        for _ in range(steps):
            state, obs, reward, done = env.step(goals, state, torch.randn(n, 1, env.action_size, generator=g))
        return time.perf_counter() - start

    return run, env.close


def chunk_env(n: int):
    """A Gymnasium environment that steps n HalfCheetahs (observations [n, 17]; rewards in info)."""
    import gymnasium
    import numpy as np

    class CheetahChunk(gymnasium.Env):
        def __init__(self):
            self.envs = [gymnasium.make("HalfCheetah-v5").unwrapped for _ in range(n)]
            obs_size = self.envs[0].observation_space.shape[0]
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (n, obs_size), np.float64)
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (n, self.envs[0].action_space.shape[0]), np.float32)

        def reset(self, *, seed=None, options=None):
            return np.stack([env.reset(seed=seed * n + i)[0] for i, env in enumerate(self.envs)]), {}

        def step(self, action):
            out = [env.step(a) for env, a in zip(self.envs, action)]
            return np.stack([o[0] for o in out]), 0.0, False, False, {"rewards": np.array([o[1] for o in out])}

    return CheetahChunk()


def async_vector_side(n: int, workers: int):
    """Gymnasium's AsyncVectorEnv over ``workers`` chunk environments of n / workers HalfCheetahs each."""
    import gymnasium

    vec = gymnasium.vector.AsyncVectorEnv([lambda: quiet(chunk_env, n // workers) for _ in range(workers)])
    vec.action_space.seed(0)

    def run(steps: int, seed: int) -> float:
        vec.reset(seed=seed)
        start = time.perf_counter()
        for _ in range(steps):
            vec.step(vec.action_space.sample())
        return time.perf_counter() - start

    return run, vec.close


def quiet(make, *args):
    """``make(*args)`` without MuJoCo's compiler warnings (one line per HalfCheetah made)."""
    import mujoco

    mujoco.set_mju_user_warning(lambda text: None)
    return make(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", type=int, default=100, help="environments (episodes) stepped at once")
    p.add_argument("--steps", type=int, default=100, help="steps per round")
    p.add_argument("--workers", default="0,1,2", help="data.workers values, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per side (median)")
    p.add_argument("--no-async-vector", action="store_true", help="leave out Gymnasium's AsyncVectorEnv")
    a = p.parse_args()
    import gymnasium
    import mujoco
    import torch

    torch.set_num_threads(1)  # the trainer's setting in the tests; sampling is numpy and MuJoCo
    n, workers = a.envs, [int(w) for w in a.workers.split(",")]
    sides = {"gymnasium loop": quiet(plain_loop, n)}
    for w in workers:
        sides[f"metalearn workers={w}"] = metalearn_side(n, w, a.steps)
    if not a.no_async_vector:
        for w in (w for w in workers if w > 0 and n % w == 0):
            sides[f"gymnasium AsyncVectorEnv {w}"] = async_vector_side(n, w)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for name, (run, _) in sides.items():  # warm-up: every environment made and reset once, every process started
        run(2, 10**6)
    for r in range(a.repeats):
        for name, (run, _) in sides.items():
            times[name].append(run(a.steps, 1000 * r))
    for _, close in sides.values():
        close()
    print(f"HalfCheetah-v5, {n} environments x {a.steps} steps, median of {a.repeats} rounds; gymnasium "
          f"{gymnasium.__version__}, mujoco {mujoco.__version__}, torch {torch.__version__}, Python "
          f"{platform.python_version()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    plain = n * a.steps / statistics.median(times["gymnasium loop"])
    print(f"{'side':30} {'steps/s':>9} {'x plain':>8}")
    for name, t in times.items():
        rate = n * a.steps / statistics.median(t)
        print(f"{name:30} {rate:9.0f} {rate / plain:8.2f}")


if __name__ == "__main__":
    main()
