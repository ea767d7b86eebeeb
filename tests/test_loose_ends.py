"""Loose ends from earlier notes (#26): each one a line or working, tested."""

from __future__ import annotations

import os

from conftest import describe, run_cli
from metalearn import report


def test_report_and_reproduce_find_symlinked_runs_once(tmp_path):
    real = tmp_path / "elsewhere"
    for name in ("a", "b"):
        (real / name).mkdir(parents=True)
        (real / name / "results.json").write_text("{}")
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    os.symlink(real / "a", gathered / "run-a")
    os.symlink(real, gathered / "all")  # b through a folder link, a twice
    os.symlink(gathered, gathered / "all" / "loop")  # a loop back up: walked once
    found = report.find_runs(gathered)
    assert sorted(os.path.realpath(p) for p in found) == [str(real / "a"), str(real / "b")]


def test_features_of_fixed_episodes_is_one_line(baseline_run, tmp_path):
    proc = run_cli(["train", "data=features", f"data.run={baseline_run}", "data.source=episodes", "steps=1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
    assert "data.source=episodes holds fixed test episodes" in proc.stderr and "Traceback" not in proc.stderr
