"""``device.compile=true``: torch.compile of the backbone, for algorithms without a double backward.

A compiled run trains to the numbers of the plain run (float rounding apart); a second-order algorithm is
refused before anything compiles (the error-table case in test_errors.py) and, where its config cannot say so,
at its first meta-step."""

from __future__ import annotations

import pytest

import metalearn
from conftest import TINY

#: TINY with protonet and first-order MAML; one test episode batch, so the comparison is of the same episodes.
RUNS = {"protonet": ["algo=protonet"], "fomaml": ["algo=maml", "algo.first_order=true"]}


# First-order MAML compiles its inner step's graphs too (about a minute here): the long tier.
@pytest.mark.parametrize("algo", ["protonet", pytest.param("fomaml", marks=pytest.mark.slow)])
def test_a_compiled_run_gives_the_plain_runs_numbers(algo, tmp_path):
    results = {}
    for compiled in (False, True):
        run = metalearn.train([*RUNS[algo], *TINY, "backbone.hidden=8", f"device.compile={str(compiled).lower()}"],
                              run_dir=tmp_path / str(compiled))
        results[compiled] = run.results
    for key in ("loss", "accuracy"):
        assert results[True]["test"][key]["mean"] == pytest.approx(results[False]["test"][key]["mean"], abs=1e-4)
    assert results[True]["best_val"]["step"] == results[False]["best_val"]["step"]


def test_a_second_order_step_through_a_compiled_backbone_is_one_error(tmp_path):
    """MAML++ turns second order at ``algo.first_order_steps`` (2 here, of TINY's 4): its third meta-step is caught.
    ANIL, second order in its head only, compiles and trains."""
    with pytest.raises(metalearn.ConfigError, match="device.compile=true cannot run algo=mamlpp.*device.compile=false"):
        metalearn.train(["algo=mamlpp", "algo.first_order_steps=2", "algo.inner_steps=1", "algo.test_inner_steps=1",
                         *TINY, "backbone.hidden=8", "device.compile=true"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    run = metalearn.train(["algo=anil", *TINY, "backbone.hidden=8", "device.compile=true"], run_dir=tmp_path / "anil")
    assert 0 <= run.accuracy <= 1
