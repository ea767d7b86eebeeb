"""MuJoCo task distributions (data=halfcheetah_vel, halfcheetah_dir, ant_dir; data/mujoco.py): the task rewards
against a hand computation from Gymnasium's own environment, the same episodes whatever the number of worker
processes, the workers' lifecycle and one-line errors, MuJoCo's warnings once, the one-line error without the extra,
and the CLI (train with workers, kill -9, resume bit for bit)."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

import gymnasium  # noqa: E402

import metalearn  # noqa: E402
from metalearn import mujoco_worker  # noqa: E402
from conftest import REPO, cli_env, describe, run_cli  # noqa: E402
from metalearn.data import ant_dir, halfcheetah_dir, halfcheetah_vel  # noqa: E402
from metalearn.errors import DataError  # noqa: E402


def quiet_make(env_id: str, **kwargs):
    """gymnasium.make without MuJoCo's compiler warning about HalfCheetah's XML."""
    import mujoco as mj

    mj.set_mju_user_warning(lambda text: None)
    try:
        return gymnasium.make(env_id, **kwargs)
    finally:
        mj.set_mju_user_warning(None)


def by_hand(name: str, env, param: float, action: np.ndarray, info: dict) -> float:
    """The task's reward from the paper's formula, from the Gymnasium environment just stepped with ``action``
    (clipped) and its info's forward velocity."""
    v, a = info["x_velocity"], action
    if name == "halfcheetah_vel":
        return -abs(v - param) - 0.05 * float(np.sum(a * a))
    if name == "halfcheetah_dir":
        return param * v - 0.05 * float(np.sum(a * a))
    data, (low, high) = env.unwrapped.data, (0.2, 1.0)
    contact = float(np.sum(np.clip(data.cfrc_ext, -1, 1) ** 2))
    healthy = low <= data.qpos[2] <= high
    return param * v - 0.005 * float(np.sum(a * a)) - 0.0005 * contact + 0.05 * healthy


CASES = {"halfcheetah_vel": (halfcheetah_vel, "HalfCheetah-v5", {"ctrl_cost_weight": 0.05}, [0.3, 1.7]),
         "halfcheetah_dir": (halfcheetah_dir, "HalfCheetah-v5", {"ctrl_cost_weight": 0.05}, [1.0, -1.0]),
         "ant_dir": (ant_dir, "Ant-v5", {"ctrl_cost_weight": 0.005, "contact_cost_weight": 0.0005,
                                        "healthy_reward": 0.05}, [-1.0, 1.0])}


@pytest.mark.parametrize("name", CASES)
def test_observations_and_rewards_are_gymnasiums_with_the_tasks_reward(name):
    """Two tasks, one episode each, 6 steps with actions partly outside [-1, 1] (clipped): the observations are
    Gymnasium's environment's, seeded the same, and the rewards the paper's formula computed here by hand."""
    module, env_id, weights, params = CASES[name]
    env = module.load(module.Config(horizon=6))["train"].env
    assert (env.obs_size, env.action_size, env.horizon) == ((17, 6, 6) if "cheetah" in name else (105, 8, 6))
    task_params = torch.tensor(params).view(2, 1)
    seeds = torch.tensor([[11], [12]])
    actions = torch.randn(6, 2, 1, env.action_size, generator=torch.Generator().manual_seed(0)) * 1.5
    state, obs = env.reset(task_params, seeds)
    steps = [env.step(task_params, state, a)[1:] for a in actions]
    for b in range(2):
        reference = quiet_make(env_id, **weights)
        first, _ = reference.reset(seed=int(seeds[b, 0]))
        torch.testing.assert_close(obs[b, 0], torch.as_tensor(first, dtype=torch.float32))
        for t in range(6):
            a = np.clip(actions[t, b, 0].double().numpy(), -1, 1)
            o, _, terminated, _, info = reference.step(a)
            o_, r_, d_ = (x[b, 0] for x in steps[t])
            torch.testing.assert_close(o_, torch.as_tensor(o, dtype=torch.float32))
            assert float(r_) == pytest.approx(by_hand(name, reference, params[b], a, info), rel=1e-5, abs=1e-5)
            assert bool(d_) == terminated
            if terminated:  # the episode's later steps are masked; its environment waits (test below)
                break
        reference.close()
    env.close()


def test_each_dataset_chooses_the_mlp_and_bad_keys_are_one_line(monkeypatch):
    for name in CASES:
        assert metalearn.compose([f"data={name}"]).backbone.name == "mlp"
    with pytest.raises(metalearn.ConfigError, match=r"data.workers >= 0"):
        halfcheetah_vel.load(halfcheetah_vel.Config(workers=-1))
    with pytest.raises(metalearn.ConfigError, match=r"data.velocity_low must be <= data.velocity_high"):
        halfcheetah_vel.load(halfcheetah_vel.Config(velocity_low=3.0))
    # A platform without forkserver (Windows): refused when the data loads, not at the first reset.
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(metalearn.ConfigError) as e:
        ant_dir.load(ant_dir.Config(workers=2))
    assert str(e.value) == ("data.workers=2 needs multiprocessing's forkserver start method, which this platform "
                            "lacks (Windows); set data.workers=0 to simulate in the trainer's process")


def test_task_sets_as_navigation2d():
    fresh = halfcheetah_vel.load(halfcheetah_vel.Config())
    goals = fresh["train"].sampler(1, 2, 2, 500, 0).sample().params
    assert goals.shape == (500, 1) and 0 <= goals.min() and goals.max() <= 2 and goals.std() > 0.5
    fixed = ant_dir.load(ant_dir.Config(num_tasks=6, task_seed=3))
    assert set(fixed) == {"train", "val", "test"} and all(len(s) == 6 for s in fixed.values())
    assert set(fixed["train"].task_set.view(-1).tolist()) <= {-1.0, 1.0}
    assert not torch.equal(fixed["train"].task_set, fixed["val"].task_set)  # one draw per split
    directions = halfcheetah_dir.load(halfcheetah_dir.Config())["train"].sampler(1, 1, 1, 400, 0).sample().params
    assert set(directions.view(-1).tolist()) == {-1.0, 1.0} and abs(float(directions.mean())) < 0.2


def episodes(env, batches) -> list[torch.Tensor]:
    """Every observation, reward and end of ``batches`` [(params [B, 1], seeds [B, E])], stepped with actions
    drawn from a fixed generator."""
    g = torch.Generator().manual_seed(1)
    out = []
    for params, seeds in batches:
        state, obs = env.reset(params, seeds)
        out.append(obs)
        for _ in range(env.horizon):
            state, *step = env.step(params, state, 2 * torch.randn(*seeds.shape, env.action_size, generator=g))
            out += step
    return out


def test_the_same_episodes_with_0_1_and_2_workers():
    """Ant direction tasks (whose episodes end when the Ant falls): 3 tasks x 3 episodes, then 5 x 3 (more
    sub-environments: the pool grows), then 2 x 1; every observation, reward and end bit for bit the same with
    the simulators in this process, in one worker or in two (whose chunks then split tasks differently)."""
    batches = [(torch.tensor([[1.0], [-1.0], [1.0]]), torch.arange(9).view(3, 3) * 7919),
               (torch.tensor([[-1.0], [1.0], [1.0], [-1.0], [-1.0]]), torch.arange(15).view(5, 3) + 10**12),
               (torch.tensor([[1.0], [-1.0]]), torch.tensor([[5], [6]]))]
    results = {}
    for workers in (0, 1, 2):
        env = ant_dir.load(ant_dir.Config(horizon=25, workers=workers))["train"].env
        results[workers] = episodes(env, batches)
        env.close()
    ends = torch.stack([x for x in results[0] if x.dtype == torch.bool and x.shape == (3, 3)])
    assert ends.any() and not ends[-1].all(), "some episodes end and others run on"
    for workers in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[workers], strict=True)), workers


def test_an_ended_episode_waits_for_the_next_reset():
    env = ant_dir.load(ant_dir.Config(horizon=40))["train"].env
    params, seeds = torch.tensor([[1.0]]), torch.tensor([[3, 4, 5, 6]])
    state, obs = env.reset(params, seeds)
    g, ended, last, waited = torch.Generator().manual_seed(2), torch.zeros(1, 4, dtype=torch.bool), obs, 0
    for _ in range(40):
        state, obs, reward, done = env.step(params, state, 3 * torch.randn(1, 4, 8, generator=g))
        assert torch.equal(obs[ended], last[ended]) and (reward[ended] == 0).all() and done[ended].all()
        waited += int(ended.sum())
        ended, last = done.clone(), obs.clone()
    assert waited > 0 and not ended.all(), "some episodes end early, not all"
    env.reset(params, seeds)
    with pytest.raises(RuntimeError, match="not the last reset's"):
        env.step(params, state, torch.zeros(1, 4, 8))  # the episodes of the reset before


def test_workers_end_with_their_environment_and_a_dead_one_is_one_line():
    """Workers ignore Ctrl-C (the trainer finishes its step: the CLI form is test_ctrl_c_... in the slow tier), a
    killed one is one error line and a new pool on the next reset, and they end with their environment."""
    env = halfcheetah_vel.load(halfcheetah_vel.Config(horizon=3, workers=2))["train"].env
    params, seeds = torch.tensor([[1.0], [0.5]]), torch.tensor([[1, 2], [3, 4]])
    state, _ = env.reset(params, seeds)
    procs = list(env._pool.procs)
    for proc in procs:
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGTERM)
    state, *_ = env.step(params, state, torch.zeros(2, 2, 6))
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join(5)
    with pytest.raises(DataError, match=r"^MuJoCo worker process 1 ended unexpectedly \(exit code -9\)"):
        env.step(params, state, torch.zeros(2, 2, 6))
    state, _ = env.reset(params, seeds)  # the interrupted pool is replaced by a new one
    assert env._pool.procs[0].pid != procs[0].pid and not procs[0].is_alive()
    env.step(params, state, torch.zeros(2, 2, 6))
    procs = list(env._pool.procs)
    del env, state
    gc.collect()
    for proc in procs:
        proc.join(5)
        assert not proc.is_alive()


def test_a_failing_worker_is_one_line_with_its_traceback_at_debug_level(caplog):
    """An exception in a worker (here a task parameter missing: [1, 0] parameters): the trainer's error is one
    line, the worker's exception first; the worker's traceback goes to the log at debug level only."""
    env = halfcheetah_dir.load(halfcheetah_dir.Config(horizon=2, workers=1))["train"].env
    state, _ = env.reset(torch.zeros(1, 0), torch.tensor([[7]]))
    with caplog.at_level("DEBUG", logger="metalearn"), pytest.raises(RuntimeError) as e:
        env.step(torch.zeros(1, 0), state, torch.zeros(1, 1, 6))
    env.close()
    assert str(e.value).splitlines() == [
        "MuJoCo worker process 0 failed: IndexError: index 0 is out of bounds for axis 0 with size 0; its traceback "
        "is logged at debug level (hydra.verbose=metalearn), or set data.workers=0 to raise it in the trainer"]
    [record] = [r for r in caplog.records if r.name == "metalearn.data.mujoco"]
    assert record.levelname == "DEBUG" and "Traceback" in record.getMessage() and "task_reward" in record.getMessage()


def test_mujoco_warnings_are_shown_once_per_text(capsys, monkeypatch):
    """MuJoCo warns once per simulator and episode ("... unstable. Time = 0.1500."): 2 simulators x 2 unstable
    episodes print one line; a text differing only in its numbers is the same warning, another text is not."""
    monkeypatch.setattr(mujoco_worker, "_shown", set())
    chunk = mujoco_worker.Chunk(mujoco_worker.EnvSpec("HalfCheetah-v5", (), "velocity"))
    for episode in range(2):
        chunk.reset(np.ones((2, 1)), np.array([1, 2]))
        for env in chunk.envs:
            env.unwrapped.data.qvel[:] = 1e20
        chunk.step(np.zeros((2, 6)))
    chunk.close()
    mujoco_worker._warn("Nan, Inf or huge value in QACC at DOF 3. The simulation is unstable. Time = 0.1500.")
    mujoco_worker._warn("Nan, Inf or huge value in QACC at DOF 5. The simulation is unstable. Time = 2.2500.")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" at DOF")[0] for line in lines] == [
        "MuJoCo warning: Nan, Inf or huge value in QVEL", "MuJoCo warning: Nan, Inf or huge value in QACC"], lines
    assert lines[1].endswith("Time = 0.1500. (shown once per process)")


def test_workers_do_not_run_the_trainers_script_again(tmp_path, monkeypatch):
    """A script without an ``if __name__ == "__main__":`` guard: multiprocessing would make each worker import it
    (run it) again; here they do not."""
    script = tmp_path / "train.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'a').write('ran')\n")
    main = types.ModuleType("__main__")
    main.__file__, main.__spec__ = str(script), None
    monkeypatch.setitem(sys.modules, "__main__", main)
    env = halfcheetah_dir.load(halfcheetah_dir.Config(horizon=2, workers=1))["train"].env
    env.reset(torch.tensor([[1.0]]), torch.tensor([[7]]))
    env.close()
    assert not (tmp_path / "ran").exists() and main.__file__ == str(script) and main.__spec__ is None


def test_without_the_extra_train_ends_with_one_line(tmp_path, monkeypatch):
    """``metalearn.train(data=halfcheetah_vel)`` where Gymnasium cannot be imported: one line naming the extra, no
    run directory (the CLI prints any MetalearnError as its one line, exit 2: tests/test_cli.py)."""
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # its import raises ModuleNotFoundError
    with pytest.raises(DataError) as e:
        metalearn.train(["algo=maml_rl", "data=halfcheetah_vel"], run_dir=tmp_path / "run")
    assert str(e.value).startswith("data=halfcheetah_vel needs MuJoCo: pip install 'metalearn[mujoco]' (import of "
                                   "gymnasium halted") and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


TINY_MUJOCO = ["algo=maml_rl", "data=halfcheetah_vel", "data.horizon=15", "backbone.hidden=[16]", "shots=2",
               "queries=2", "meta_batch_size=2", "steps=2", "trainer.log_every=1", "trainer.val_every=2",
               "trainer.val_episodes=2", "trainer.test_episodes=2", "trainer.ckpt_every=1", "trainer.progress=false"]


def test_train_with_workers_and_kill_resume_without_them_end_bit_for_bit(tmp_path):
    """Through the CLI: a run with two worker processes, and one simulating in the trainer's process killed
    (SIGKILL) inside its second meta-step and resumed, end with the same weights and test results."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(run_cli, ["train", *TINY_MUJOCO, "data.workers=2", f"hydra.run.dir={whole}"],
                                    tmp_path)
        killed = run_cli(["train", *TINY_MUJOCO, "data.workers=0", f"hydra.run.dir={run}"], tmp_path,
                         env=cli_env(METALEARN_FAULT="kill_at=step:2"))
        proc = uninterrupted.result()
    assert proc.returncode == 0, describe(proc)
    assert killed.returncode == -9 and not (run / "results.json").exists(), describe(killed)
    resumed = run_cli(["train", f"resume={run}"], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert "MuJoCo" not in proc.stderr + resumed.stderr and not (tmp_path / "MUJOCO_LOG.TXT").exists()
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (whole, run))
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "meta-parameters differ"
    results = [json.loads((r / "results.json").read_text()) for r in (whole, run)]
    assert list(results[0]["test"]) == ["return_step0", "return_step1", "return"]
    assert results[0]["test"] == results[1]["test"] and results[0]["test"]["return"]["episodes"] == 2


def session_processes(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.slow  # a fresh interpreter (torch's import): about 10 s; the default tier sends the workers SIGINT above
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes through /proc")
def test_ctrl_c_stops_after_the_step_and_leaves_no_process(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the trainer, the forkserver and the workers) while
    training with two workers: the trainer finishes the step, saves it and exits 130; no process is left."""
    args = [a for a in TINY_MUJOCO if not a.startswith(("steps=", "trainer.val_every="))] + [
        "steps=1000", "trainer.val_every=1000", "data.workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "metalearn", "train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=cli_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "step 2/1000" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted: saved step" in rest, rest
    deadline = time.monotonic() + 10
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes(proc.pid) == []


@pytest.mark.slow  # a fresh interpreter, the forkserver and Gymnasium's vector environment: about 15 s
def test_the_sampling_benchmark_prints_its_table():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_sampling.py"), "--envs", "4", "--steps", "3",
                           "--workers", "0,2", "--repeats", "1"], capture_output=True, text=True, timeout=300,
                          env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:30].strip(): line[30:].split() for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"gymnasium loop", "metalearn workers=0", "metalearn workers=2", "gymnasium AsyncVectorEnv 2"}
    assert rows["gymnasium loop"][1] == "1.00" and all(float(r[0]) > 0 for r in rows.values())
    assert "MuJoCo" not in proc.stderr
