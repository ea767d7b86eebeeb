"""Slurm through submitit: a real sweep through submitit's local executor (the same launcher code and
job wrapper as on a cluster, jobs in their own processes), with a real preemption signal to one job:
it saves, is requeued by submitit, and continues to the numbers of an uninterrupted job. And the
shipped ``hydra/launcher=slurm`` config turned into an sbatch script by submitit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose
from metalearn import confdir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import metalearn.cli  # noqa: F401  (registers the config resolvers)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
            pytest.fail(f"{what}: not reached (exit {proc.poll()})\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.2)


def task_processes(submitit_dir: Path, job: Path) -> list[int]:
    """The pids of the process running ``job`` under submitit's local executor: the job id is the pid
    of its controller (in the log file names), and the task is the controller's child."""
    logs = [p for p in submitit_dir.glob("*/*_0_log.out") if job.name in p.read_text(errors="replace")]
    controllers = {p.parent.name for p in logs}
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] in controllers:  # the parent pid
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow  # three processes start torch one after the other: about a minute on 2 cores
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process through /proc")
def test_submitit_sweep_with_a_preempted_job_that_is_requeued_and_continues(cli, tmp_path):
    sweep = tmp_path / "sweep"
    # Two jobs that give the same numbers (eval.batch_size does not change results); job 0 is preempted.
    args = cli.with_overrides(cli.FAST, "steps=40")
    proc = subprocess.Popen([sys.executable, "-m", "metalearn", "train", "-m", *args, "eval.batch_size=10,20",
                             "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job0, job1 = sweep / "0_eval.batch_size=10", sweep / "1_eval.batch_size=20"
        wait_for(lambda: (job0 / "checkpoints" / "last.pt").is_file(), 300, "job 0's first checkpoint", proc)
        wait_for(lambda: task_processes(sweep / ".submitit", job0), 60, "job 0's process", proc)
        [pid] = task_processes(sweep / ".submitit", job0)
        os.kill(pid, signal.SIGUSR2)  # what Slurm sends before a time limit or on preemption (--signal=USR2@...)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"

    log0 = (job0 / "train.log").read_text()
    saved = re.search(r"interrupted: saved step (\d+);.*submitit requeues this job", log0)
    assert saved, log0
    step = int(saved.group(1))
    assert 10 <= step < 40 and f"resumed {job0} at step {step}" in log0, log0
    assert "resumed" not in (job1 / "train.log").read_text()

    preempted, uninterrupted = (json.loads((job / "results.json").read_text()) for job in (job0, job1))
    assert preempted["test"] == uninterrupted["test"] and preempted["best_val"] == uninterrupted["best_val"]
    # One TensorBoard run per job (its directory); the requeued process adds its own event file there.
    assert len(list(job0.glob("events.out.tfevents*"))) == 2 and len(list(job1.glob("events.out.tfevents*"))) == 1
    for job in (job0, job1):
        assert torch.load(job / "checkpoints" / "last.pt", weights_only=True)["step"] == 40


def test_slurm_launcher_config_makes_the_sbatch_script(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    with confdir.initialized():
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.timeout_min=720", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher" and launcher.params["max_num_timeout"] > 0
    # submitit refuses to build a Slurm executor where there is no srun; the script is all this looks at.
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    # The launcher's own translation of its config into executor parameters (SlurmLauncher.launch).
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in queue_keys else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=720", "--mem=32GB", "--cpus-per-task=8",
                 "--signal=USR2@120", "--job-name=train"):
        assert f"#SBATCH {line}\n" in script, script
