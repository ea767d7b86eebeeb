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


def test_torchmeta_resize_is_metalearns_own_resize():
    import torch

    from metalearn.data import images
    from metalearn.torchmeta.transforms import Resize

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, 1, 28, 20), generator=g, dtype=torch.uint8)  # leading dims kept
    out = Resize((14, 10))(batch)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 1, 14, 10)
    assert torch.equal(out.reshape(-1, 1, 14, 10), images.resize(batch.reshape(-1, 1, 28, 20), (14, 10)))
    floats = Resize(14)(batch.float() / 255)  # shorter side to 14, aspect kept; floats are not rounded
    assert floats.dtype == torch.float32 and floats.shape == (2, 3, 1, 19, 14)
    assert not torch.equal(floats, floats.round())
