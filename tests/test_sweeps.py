"""Sweeps (``metalearn train -m``): jobs in parallel processes with the joblib launcher, a failed job
reported without stopping the others, and a sweep that continues what an earlier attempt left
(how a requeued Slurm job resumes; see test_slurm.py for submitit itself). Real subprocess runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch


FAILING = "shots+queries=31 is more than the 20 images per class of the train split"


def job_dirs(sweep: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(sweep.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def events(job: Path) -> list[Path]:
    return sorted(job.glob("events.out.tfevents*"))


def assert_reports(stderr: str, failed: list[str]) -> None:
    """One line per failed job, then one summary line; no traceback."""
    assert "Traceback" not in stderr, stderr
    for name in failed:
        assert f"metalearn: job {name} failed: {FAILING}" in stderr, stderr
    summary = [line for line in stderr.splitlines() if line.startswith("metalearn: error:")]
    assert len(summary) == 1 and f"{len(failed)} sweep job" in summary[0], stderr


def assert_failed_job(job: Path) -> None:
    """A failed job keeps its directory: the reason in train.log and failed.json, and nothing else."""
    assert FAILING in (job / "train.log").read_text()
    failed = json.loads((job / "failed.json").read_text())
    assert FAILING in failed["error"] and failed["kind"] == "DataError" and failed["exit_code"] == 2
    assert not (job / "results.json").exists() and not (job / "checkpoints").exists()


def test_joblib_sweep_runs_jobs_in_processes_and_reports_the_failed_ones(cli, tmp_path):
    sweep = tmp_path / "sweep"
    # queries=30 cannot be sampled (20 images a class): those two jobs fail when they load the data.
    proc = cli.run(["train", "-m", *cli.TINY, "queries=5,30", "seed=0,1", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, cli.describe(proc)
    jobs = job_dirs(sweep)
    assert list(jobs) == ["0_queries=5,seed=0", "1_queries=5,seed=1", "2_queries=30,seed=0", "3_queries=30,seed=1"]
    assert_reports(proc.stderr, ["2_queries=30,seed=0", "3_queries=30,seed=1"])
    for name in ("2_queries=30,seed=0", "3_queries=30,seed=1"):
        assert_failed_job(jobs[name])

    finished = [jobs["0_queries=5,seed=0"], jobs["1_queries=5,seed=1"]]
    results = [json.loads((job / "results.json").read_text()) for job in finished]
    for job, seed, result in zip(finished, (0, 1), results):
        assert result["run_dir"] == str(job)
        assert torch.load(job / "checkpoints" / "last.pt", weights_only=True)["config"]["seed"] == seed
        assert len(events(job)) == 1  # its own TensorBoard run
        assert "JoblibLauncher" in (job / ".hydra" / "hydra.yaml").read_text()
    assert results[0]["test"] != results[1]["test"]  # each job its own seed
    # The event files are named after the process that wrote them: the jobs ran in separate worker processes.
    pids = {events(job)[0].name.split(".")[-2] for job in finished}
    assert len(pids) == 2, pids


def test_sweep_continues_an_earlier_attempt_and_refuses_another_config(cli, tmp_path):
    sweep = tmp_path / "sweep"
    base = ["train", "-m", *cli.TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"]

    # 1. Every job stops at step 2 (resumable; a stop is not a failure), and the sweep goes on to the next job.
    proc = cli.run([*base, "trainer.stop_at=2"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    jobs = job_dirs(sweep)
    assert list(jobs) == ["0_seed=0", "1_seed=1"]
    for job in jobs.values():
        assert torch.load(job / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
        assert not (job / "results.json").exists()

    # 2. The same sweep again on the same directory: each job continues from its last.pt.
    proc = cli.run(base, tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    results = {}
    for name, job in jobs.items():
        assert f"resumed {job} at step 2" in (job / "train.log").read_text()
        results[name] = (job / "results.json").read_text()
        assert json.loads(results[name])["checkpoint_step"] > 0

    # 3. Once more: finished jobs are not run again (what a requeued job that had finished does).
    proc = cli.run(base, tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    for name, job in jobs.items():
        assert "finished already" in (job / "train.log").read_text()
        assert (job / "results.json").read_text() == results[name]

    # 4. Another configuration in the same job directories is refused, job by job, with the reason.
    proc = cli.run([*base, "optim.lr=0.002"], tmp_path)
    assert proc.returncode == 1, cli.describe(proc)
    assert "Traceback" not in proc.stderr
    for name, job in jobs.items():
        line = re.search(rf"metalearn: job {re.escape(name)} failed: (.*)", proc.stderr)
        assert line and "another configuration (optim.lr=0.001 there, 0.002 now)" in line.group(1), proc.stderr
        assert "new hydra.sweep.dir" in line.group(1)
        assert (job / "results.json").read_text() == results[name]  # untouched
        assert "optim.lr" not in (job / ".hydra" / "overrides.yaml").read_text()  # its record too
        assert (job / "failed.json").is_file()


def test_launcher_mistakes_are_one_line(capsys):
    from metalearn.cli import main
    from metalearn.confdir import error_line

    with pytest.raises(SystemExit) as exit_:
        main(["train", "-m", "hydra/launcher=joblb", "data=glyphs"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "unknown hydra/launcher 'joblb'; choose one of: basic, joblib, slurm, submitit_local, submitit_slurm" in err
    # Hydra's message when a preset's plugin is not installed (as in a plain `pip install metalearn`).
    for message, extra in [("In 'hparams_search/metric_based': Could not find 'hydra/sweeper/optuna'", "optuna"),
                           ("In 'hydra/launcher/slurm': Could not find 'hydra/launcher/submitit_slurm'", "slurm"),
                           ("In 'hydra/config': Could not find 'hydra/launcher/joblib'", "joblib")]:
        line = error_line(message, lambda group: [], None, [])
        assert line.endswith(f'needs the {extra} extra: pip install "metalearn[{extra}]"'), line


def test_a_sweep_job_whose_overrides_do_not_compose_is_one_line(cli, tmp_path):
    # The first job (maml) composes and runs; protonet has no algo.inner_lr, which Hydra finds at its turn.
    fast = cli.with_overrides(cli.FAST, "steps=2", "trainer.val_every=1", "trainer.val_episodes=2",
                              "trainer.test_episodes=2", "trainer.ckpt_every=1")
    proc = cli.run(["train", "-m", *fast, "algo=maml,protonet", "algo.inner_lr=0.1",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 2, cli.describe(proc)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "metalearn: error: a job of this sweep: Could not override 'algo.inner_lr'; a key that only some of the swept "
        "options have (algo.inner_lr) cannot be swept across the others: sweep it per option; one that every swept "
        "option has but the defaults lack: ++algo.inner_lr=<value>")


def test_a_sweep_is_reported_once_per_process(tmp_path, capsys):
    """cli.main called twice in one process (a notebook): the second call does not inherit the first
    sweep's failed jobs."""
    from omegaconf import OmegaConf

    from metalearn import sweeps

    job = tmp_path / "0_algo=maml"
    job.mkdir()
    sweeps.SweepReport().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    (job / sweeps.FAILED).write_text(json.dumps({"error": "loss became NaN", "kind": "NaNLoss", "exit_code": 3}))
    assert sweeps.report() == 1
    assert "job 0_algo=maml failed: loss became NaN" in capsys.readouterr().err
    assert sweeps.report() == 0 and capsys.readouterr().err == ""
