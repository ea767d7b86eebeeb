"""scripts/bench_meta_step.py runs end to end at a tiny shape: every side is timed against the reference,
the meta-gradients agree (with each other and with the reference in float64), the sampler is timed, and
the JSON is written. The speed figures themselves are the script's to report, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_meta_step.py"
TINY = ["--meta-batch-size", "2", "--queries", "3", "--hidden", "16", "--warmup", "1", "--repeats", "1",
        "--threads", "1"]


# The default tier runs the cheapest side (protonet); maml (with the memory subprocesses) and metasgd in the long tier.
@pytest.mark.parametrize("algo,batched", [pytest.param("maml", "auto", marks=pytest.mark.slow),
                                          pytest.param("metasgd", "fold:2", marks=pytest.mark.slow),
                                          ("protonet", "loop,fold")])
def test_bench_times_every_side_and_checks_the_meta_gradients(tmp_path, algo, batched):
    out = tmp_path / "bench.json"
    memory = ["--no-memory"] if algo != "maml" else []  # the memory subprocesses once
    proc = subprocess.run([sys.executable, str(SCRIPT), "--algo", algo, "--batched", batched, *TINY, *memory,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    sides = result["sides"]
    assert set(sides) == {"reference", *(f"engine:{m}" for m in batched.split(","))}
    for name, side in sides.items():
        assert side["seconds_per_step"]["median"] > 0 and side["tasks_per_second"] > 0
        if name == "reference":
            continue
        agreement = side["gradient_vs_reference"]
        assert agreement["max_rel_diff"] < 1e-4, agreement
        assert agreement["engine_vs_float64"] < 1e-4 and agreement["reference_vs_float64"] < 1e-4, agreement
        if algo == "maml":
            assert side["peak_memory_mib"] is not None and side["peak_memory_mib"] >= 0
    assert 0 < result["sampler"]["share_of_engine_step"] < 1
    assert "system" in result["phases"]  # "retain" too where glibc's mallopt applies (metalearn/hostmem.py)
