"""halfcheetah_dir: the MAML paper's forward/backward HalfCheetah (Finn, Abbeel & Levine 2017, section 5.3).

A task is a direction, +1 (run forward) or -1 (backward) with probability 1/2 each; the reward of a step is
``direction * forward velocity - 0.05 * sum(a^2)``, as the paper's rllab ``HalfCheetahEnvRandDirec`` and
pytorch-maml-rl's ``HalfCheetahDirEnv``. Episodes last ``horizon`` = 200 steps (the paper's) and never end early.
Trained with ``algo=maml_rl``, ``promp`` or ``rl2`` (the reinforcement task kind; ``shots`` and ``queries``:
conf/data/halfcheetah_dir.yaml).

The simulator is Gymnasium's ``HalfCheetah-v5``, as in data/halfcheetah_vel.py (the same observation, velocity,
initial-state noise and differences from the paper's code). ``num_tasks``, ``task_seed`` and ``workers``:
data/mujoco.py (with ``num_tasks: N`` a split's N directions are drawn once, so a small set may hold one direction
only).
"""

from __future__ import annotations

from dataclasses import dataclass

from metalearn.data import mujoco
from metalearn.data.environments import EnvTaskSource, task_sources
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "halfcheetah_dir"
    ctrl_cost_weight: float = 0.05  # the reward's - ctrl_cost_weight * sum(a^2) (the paper's 0.5 * 1e-1)
    horizon: int = 200  # steps per episode
    num_tasks: int = 0  # 0: every task a fresh direction (the paper); N: each split a fixed set of N
    task_seed: int = 0  # draws the fixed sets (num_tasks > 0)
    workers: int = 0  # 0: simulate in this process; W: in W worker processes


def load(cfg: Config) -> dict[str, EnvTaskSource]:
    mujoco.require(cfg.name)
    mujoco.check_common(cfg)
    if cfg.ctrl_cost_weight < 0:
        raise ConfigError(f"data.ctrl_cost_weight must be >= 0 (got {cfg.ctrl_cost_weight})")
    spec = mujoco.EnvSpec("HalfCheetah-v5", (("ctrl_cost_weight", cfg.ctrl_cost_weight),), "direction")
    env = mujoco.MujocoTasks(spec, cfg.horizon, cfg.workers)
    return task_sources(env, mujoco.draw_directions, cfg.num_tasks, cfg.task_seed)


def sources(cfg: Config) -> list:
    return []  # simulated: nothing on disk
