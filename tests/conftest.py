"""Shared helpers for the CLI tests: run ``python -m metalearn`` in a subprocess, quickly."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: A tiny glyphs run: about 5 s a subprocess, most of it imports.
FAST = [
    "data=glyphs", "data.train_classes=40", "data.val_classes=20", "data.test_classes=20",
    "backbone.hidden=16", "meta_batch_size=4", "steps=20", "trainer.log_every=5", "trainer.val_every=10",
    "trainer.val_episodes=20", "trainer.test_episodes=20", "trainer.ckpt_every=10",
]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess.

    One intra-op thread: on a busy 2-core machine torch's default OpenMP threads
    spin against each other and a 5 s run can take minutes.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("METALEARN_DATA", None)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: str | os.PathLike, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m metalearn *args`` in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "metalearn", *map(str, args)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_many(jobs: dict[str, tuple[list[str], Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Several independent ``run_cli(args, cwd)`` at once (one per core), keyed like ``jobs``."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_cli, args, cwd) for name, (args, cwd) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def describe(proc: subprocess.CompletedProcess) -> str:
    """For assertion messages."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def with_overrides(args: list[str], *overrides: str) -> list[str]:
    """``args`` with each ``key=value`` of ``overrides`` replacing the same key (or added)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(overrides)


class CLI:
    """The helpers above, as the ``cli`` fixture: ``cli.run(args, cwd)``, ``cli.FAST`` ..."""

    FAST = FAST
    REPO = REPO
    env = staticmethod(cli_env)
    run = staticmethod(run_cli)
    run_many = staticmethod(run_many)
    describe = staticmethod(describe)
    with_overrides = staticmethod(with_overrides)


@pytest.fixture(scope="session")
def cli() -> type[CLI]:
    return CLI


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One finished FAST training run, shared read-only (copy a file before changing it)."""
    cwd = tmp_path_factory.mktemp("trained")
    run_dir = cwd / "run"
    proc = run_cli(["train", *FAST, f"hydra.run.dir={run_dir}"], cwd)
    assert proc.returncode == 0, describe(proc)
    return run_dir
