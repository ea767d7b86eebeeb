"""What a sweep job (``metalearn train -m``, any Hydra launcher or sweeper) does beyond a single run.

A single run ends the process on a mistake: one line, an exit code. A sweep job must not: under
the basic launcher a ``sys.exit`` would end the whole sweep, under joblib it would break the
worker pool. So a failed job logs its one-line reason to its ``train.log``, writes it to
``failed.json`` in its directory, and returns None (Optuna records a failed trial); the other
jobs go on, and after the sweep the dispatcher lists the failed jobs and exits non-zero.

A sweep job whose directory already holds ``checkpoints/last.pt`` of the same configuration
continues from it, and one that already finished returns its ``results.json``: that is how a
Slurm job requeued after preemption or timeout (submitit) resumes, and how running a stopped
sweep again with the same ``hydra.sweep.dir`` finishes it.

Under submitit, the preemption / timeout signal (USR2) first lets the current meta-step finish and
saves ``last.pt`` there (the engine's graceful stop), then hands over to submitit, which requeues
the job: no work since the last periodic checkpoint is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("metalearn")

#: Hydra plugins this project uses, and the extra (pyproject.toml) that installs each.
EXTRAS = {"hydra/launcher/joblib": "joblib", "hydra/launcher/submitit_local": "slurm",
          "hydra/launcher/submitit_slurm": "slurm", "hydra/sweeper/optuna": "optuna"}

FAILED = "failed.json"  # in a failed sweep job's directory: {"error": one line, "kind": class name, "exit_code"}

#: Keys that may differ between a sweep job's checkpoint and its config (as on ``resume=``; the same as
#: ``metalearn.checkpoint.CHANGEABLE``, kept here so that the CLI starts without importing torch).
CHANGEABLE = ("steps", "trainer.", "device.", "data.root", "data.cache_dir", "eval.batch_size", "resume")

_sweep: dict[str, Any] = {}  # this process's multirun: {"dir": Path, "start": float}, set by SweepReport


# ---------------------------------------------------------------- config resolvers


def optimization_direction(data_name: str) -> str:
    """``maximize`` (validation accuracy) for classification data, ``minimize`` (validation MSE) for regression."""
    from metalearn.algorithms.base import Objective
    from metalearn.data import DATASETS, dataset_module

    if data_name not in DATASETS:
        return "maximize"  # the config check reports the unknown dataset
    module = dataset_module(data_name)
    kinds = {getattr(v, "task", None) for v in vars(module).values()
             if isinstance(v, type) and v.__module__ == module.__name__}
    return "maximize" if Objective("regression" if "regression" in kinds else "classification").higher_is_better \
        else "minimize"


def optuna_storage(sweep_dir: str) -> str:
    """The Optuna study's SQLite file in the sweep directory (made now: the sweeper opens the study
    before the launcher creates the directory)."""
    folder = Path(sweep_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def output_subdir(resume: str | None, mode: Any, output_dir: str) -> str | None:
    """Where Hydra records a run's config (``hydra.output_subdir``): nowhere when the run continues one
    that is recorded already: ``resume=``, or a sweep job whose directory holds an earlier attempt
    (continued, or refused if its configuration differs: either way its record stays)."""
    if resume:
        return None
    if str(mode).endswith("MULTIRUN") and (Path(output_dir) / "checkpoints" / "last.pt").is_file():
        return None
    return ".hydra"


OmegaConf.register_new_resolver("metalearn_direction", optimization_direction, replace=True)
OmegaConf.register_new_resolver("metalearn_optuna_storage", optuna_storage, replace=True)


# ---------------------------------------------------------------- inside a job


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def train_job(run_cfg, run_dir: Path, resume_from: dict | None = None) -> dict:
    """``engine.train`` for a sweep job: continue (or return) what an earlier attempt left in ``run_dir``."""
    from metalearn import engine

    (run_dir / FAILED).unlink(missing_ok=True)  # from an earlier attempt
    if resume_from is None:
        resume_from, results = previous_attempt(run_cfg, run_dir)
        if results is not None:
            log.info("%s finished already (results.json); not run again", run_dir)
            return results
    with requeue_on_preemption():
        return engine.train(run_cfg, run_dir, resume_from=resume_from)


def previous_attempt(run_cfg, run_dir: Path) -> tuple[dict | None, dict | None]:
    """(checkpoint to continue from, finished results) of what an earlier attempt of this job left.

    A directory holding another configuration's run is refused: continuing it would mix two runs.
    """
    from metalearn import checkpoint
    from metalearn.config import flat, to_dict
    from metalearn.errors import ConfigError

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return None, None
    ckpt = checkpoint.load(last)
    saved, now = flat(ckpt["config"]), flat(to_dict(run_cfg))
    differ = sorted(k for k in saved.keys() | now.keys()
                    if not k.startswith(CHANGEABLE) and saved.get(k, "<absent>") != now.get(k, "<absent>"))
    if differ:
        k = differ[0]
        raise ConfigError(f"{run_dir} holds a run with another configuration ({k}={saved.get(k)!r} there, "
                          f"{now.get(k)!r} now); give this sweep a new hydra.sweep.dir")
    results_file = run_dir / "results.json"
    if ckpt["step"] >= run_cfg.steps and results_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            results = json.loads(results_file.read_text())
            if results.get("steps") == run_cfg.steps:
                return None, results
    return ckpt, None


def job_failed(run_dir: Path, error: Exception) -> None:
    """Record a failed sweep job (train.log and failed.json) and let the sweep go on."""
    from metalearn.fileio import atomic_write_json

    log.error("job failed: %s", error)
    atomic_write_json(run_dir / FAILED, {"error": str(error), "kind": type(error).__name__,
                                         "exit_code": getattr(error, "exit_code", 1)})
    return None  # what the sweeper gets: Optuna marks the trial failed


@contextlib.contextmanager
def requeue_on_preemption() -> Iterator[None]:
    """Under submitit: on its preemption / timeout signal, stop after the current step with a checkpoint
    (the engine's SIGTERM handling), then let submitit requeue the job, which resumes from it."""
    usr = _submitit_signal()
    previous = signal.getsignal(usr) if usr is not None else None
    if not callable(previous):  # not a submitit job, or no handler to hand over to
        yield
        return
    from metalearn import engine

    pending: dict[str, Any] = {}
    bypass = signal.getsignal(signal.SIGTERM)  # submitit's: it only logs SIGTERM

    def on_signal(signum, frame):
        pending["signal"] = signum
        if signal.getsignal(signal.SIGTERM) is bypass:  # not training now: nothing to save first
            previous(signum, frame)
        else:  # training: the engine finishes the step, saves last.pt and raises Stopped
            signal.raise_signal(signal.SIGTERM)

    signal.signal(usr, on_signal)
    try:
        yield
    except engine.Stopped as stopped:
        if "signal" not in pending:
            raise
        log.info("metalearn: %s; submitit requeues this job, which continues from there", stopped)
        previous(pending["signal"], None)  # checkpoints the submission and requeues (exits), or raises
        raise
    finally:
        signal.signal(usr, previous)


def _submitit_signal() -> int | None:
    """The signal submitit requeues on (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise), inside its jobs."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


# ---------------------------------------------------------------- the sweep's report


@contextlib.contextmanager
def sweeper_errors_raised(command: str, args: list[str]) -> Iterator[None]:
    """During a ``train -m``, an exception that stops the sweeper reaches the dispatcher instead of being
    printed by Hydra (``HYDRA_FULL_ERROR``), so that one caused by failed jobs ends with their report."""
    if command != "train" or not any(a in ("-m", "--multirun") for a in args):
        yield
        return
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


#: The one line of an Optuna search none of whose trials failed or finished.
NO_TRIAL_FINISHED = ("no trial of this Optuna search finished: each one stopped early (trainer.stop_at, with a checkpoint "
                     "in its job directory), so the search has no best trial; search without trainer.stop_at (or with "
                     "trainer.stop_at >= steps)")


def no_trial_finished(error: Exception) -> bool:
    """Optuna asked for the best trial of a study none of whose trials finished."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(error, ValueError) and tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("optuna")


def _job_order(marker: Path) -> tuple[int, str]:
    number = marker.parent.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else -1, marker.parent.name)


class SweepReport(Callback):
    """Remembers this process's sweep directory, so that the dispatcher can report failed jobs at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _sweep.update(dir=Path(str(config.hydra.sweep.dir)), start=time.time())


def report() -> int:
    """After a ``train -m``: one line per job of this sweep that failed, and the exit code (0: none failed).
    Reports a sweep once: a later ``cli.main`` in the same process (a notebook, tests) starts clean."""
    if not _sweep:
        return 0
    sweep_dir, start = _sweep.pop("dir"), _sweep.pop("start")
    failed = []
    for marker in sorted(sweep_dir.glob(f"*/{FAILED}"), key=_job_order):
        if marker.stat().st_mtime < start - 1:  # from an earlier invocation on the same sweep directory
            continue
        try:
            error = json.loads(marker.read_text())["error"]
        except (ValueError, KeyError, OSError):
            error = "(unreadable failed.json)"
        failed.append(marker.parent)
        print(f"metalearn: job {marker.parent.name} failed: {error}", file=sys.stderr)
    if not failed:
        return 0
    print(f"metalearn: error: {len(failed)} sweep job{'s' if len(failed) > 1 else ''} failed (listed above; the reason "
          f"is also in each one's train.log and failed.json); the sweep and its finished jobs are in {sweep_dir}",
          file=sys.stderr)
    return 1
