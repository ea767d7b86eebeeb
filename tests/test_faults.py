"""Crash anywhere, resume exactly: runs SIGKILLed at exact points (``METALEARN_FAULT``, metalearn/faults.py)
and resumed with ``metalearn train resume=DIR`` end bit for bit where an uninterrupted run of the same
config ends (CPU, one thread); the run directory never holds a partial or unreadable checkpoint.

The default suite kills one run three times (mid-step, during validation, while writing a checkpoint);
``test_ten_random_kill_points`` (slow) kills one run at ten random
points of all four kinds.
"""

from __future__ import annotations

import json
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import FAST, cli_env, describe, run_cli, with_overrides
from metalearn import checkpoint

KILLED = -signal.SIGKILL


def run_with_fault(args: list[str], cwd: Path, fault: str | None):
    return run_cli(args, cwd, env=cli_env(**({"METALEARN_FAULT": fault} if fault else {})))


def comparable(run: Path) -> dict:
    """results.json without what names the directory."""
    results = json.loads((run / "results.json").read_text())
    results.pop("run_dir"), results.pop("checkpoint")
    return results


def assert_same_state(a: Path, b: Path) -> None:
    """The final meta-parameters (and optimizer state, step, best) of two runs, bit for bit."""
    ca, cb = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (a, b))
    assert ca["step"] == cb["step"] and ca["best"] == cb["best"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), f"{k}: max diff {(ca['model'][k] - cb['model'][k]).abs().max()}"
    for k, (sa, sb) in enumerate(zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values())):
        assert all(torch.equal(sa[n], sb[n]) for n in sa), f"optimizer state {k}"


def assert_sound_checkpoints(run: Path) -> None:
    """Every checkpoint under its name is complete (a temp file may be left by the kill: never read)."""
    for p in (run / "checkpoints").glob("*.pt"):
        checkpoint.load(p)


def kill_and_resume(run: Path, cwd: Path, args: list[str], faults: list[str]) -> list[str]:
    """Start ``args`` with the first fault, resume with each next one, then resume to the end; checked
    after every kill. Returns what each kill left in checkpoints/."""
    left = []
    for i, fault in enumerate(faults):
        proc = run_with_fault(args if i == 0 else ["train", f"resume={run}"], cwd, fault)
        assert proc.returncode == KILLED, f"{fault} was not reached\n{describe(proc)}"
        assert not (run / "results.json").exists()
        assert_sound_checkpoints(run)
        left.append(" ".join(sorted(p.name for p in (run / "checkpoints").iterdir())))
    proc = run_cli(["train", f"resume={run}"], cwd)
    assert proc.returncode == 0, describe(proc)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # the temp file removed
    return left


def test_killed_three_times_ends_like_an_uninterrupted_run(cli, trained_run, tmp_path):
    """FAST (checkpoints at 10 and 20) killed inside meta-step 13, in the validation of step 20 after 2 of its
    5 rounds and while writing last.pt of step 20 (half of it written); each resume continues from step 10.
    (A run killed before its first checkpoint: tests/test_errors.py, 'resume of a run killed before ...'.)"""
    run = tmp_path / "run"
    left = kill_and_resume(run, tmp_path, ["train", *FAST, f"hydra.run.dir={run}"],
                           ["kill_at=step:13", "kill_at=val:20:2", "kill_at=save:20:last"])
    assert left[:2] == ["best.pt last.pt"] * 2, left
    assert left[2].startswith(".last.pt.tmp-") and left[2].endswith(" best.pt last.pt"), left
    assert comparable(run) == comparable(trained_run)
    assert_same_state(run, trained_run)


#: The campaign's run: 30 steps, validation and checkpoints every 5 (20 validation and test episodes in 5 rounds).
CAMPAIGN = with_overrides(FAST, "steps=30", "trainer.val_every=5", "trainer.ckpt_every=5", "trainer.progress=false")
PHASE_ORDER = {"step": 0, "val": 1, "save": 2, "test": 3}


def random_kill_points(n: int, seed: int) -> list[str]:
    """``n`` distinct fault points after the first complete last.pt (step 5), at least one of each phase, in the
    order a run meets them."""
    points = ([("step", s, None) for s in range(6, 31)] + [("val", s, k) for s in range(10, 31, 5) for k in range(5)]
              + [("save", s, None) for s in range(10, 31, 5)] + [("test", 30, k) for k in range(5)])
    rng = random.Random(seed)
    chosen = [rng.choice([p for p in points if p[0] == phase]) for phase in PHASE_ORDER]
    chosen += rng.sample([p for p in points if p not in chosen], n - len(chosen))
    chosen.sort(key=lambda p: (p[1], PHASE_ORDER[p[0]], p[2] or 0))
    return [f"kill_at={phase}:{step}" + (f":{k}" if k is not None else "") for phase, step, k in chosen]


@pytest.mark.slow
def test_ten_random_kill_points(cli, tmp_path):
    faults = random_kill_points(10, seed=2026)
    whole, run = tmp_path / "whole", tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(run_cli, ["train", *CAMPAIGN, f"hydra.run.dir={whole}"], tmp_path)
        left = kill_and_resume(run, tmp_path, ["train", *CAMPAIGN, f"hydra.run.dir={run}"], faults)
        proc = uninterrupted.result()
    assert proc.returncode == 0, describe(proc)
    print("kill points:", ", ".join(f"{f} -> {what}" for f, what in zip(faults, left)))
    assert comparable(run) == comparable(whole)
    assert_same_state(run, whole)
