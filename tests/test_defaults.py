"""Every algorithm runs from its defaults (#26): ``metalearn train algo=X data=glyphs`` for each one in the registry
(each that learns classification), ``algo=X data=sinusoid`` for each that learns regression and
``algo=X data=navigation2d`` for each that learns reinforcement; an algorithm or dataset that needs another backbone
chooses it in its own YAML (metanet: conv4_plain; sinusoid: mlp). Run in-process through the Python API (the CLI's
composition), with tiny budgets: only that each composes, builds, trains, validates and tests."""

from __future__ import annotations

import pytest

import metalearn
from metalearn import engine, plugins

TINY = ["steps=1", "meta_batch_size=1", "trainer.val_every=1", "trainer.val_episodes=1", "trainer.test_episodes=1",
        "eval.batch_size=1"]
REGRESSION = [a for a in plugins.builtins("algo") if "regression" in engine._algorithm_tasks(a)]
REINFORCEMENT = [a for a in plugins.builtins("algo") if "reinforcement" in engine._algorithm_tasks(a)]


@pytest.mark.parametrize("algo", [a for a in plugins.builtins("algo") if "classification" in engine._algorithm_tasks(a)])
def test_every_algorithm_trains_on_glyphs_from_its_defaults(algo, tmp_path):
    run = metalearn.train([f"algo={algo}", "data=glyphs", "data.split_sizes=[20,10,10]", *TINY],
                          run_dir=tmp_path / "run")
    assert run.results["test"]["accuracy"]["episodes"] == 1


@pytest.mark.parametrize("algo", REGRESSION)
def test_every_regression_algorithm_trains_on_sinusoid_from_its_defaults(algo, tmp_path):
    assert set(REGRESSION) >= {"maml", "reptile", "metasgd"}
    run = metalearn.train([f"algo={algo}", "data=sinusoid", *TINY], run_dir=tmp_path / "run")
    assert run.config.backbone.name == "mlp" and run.results["test"]["mse"]["episodes"] == 1


@pytest.mark.parametrize("algo", REINFORCEMENT)
def test_every_reinforcement_algorithm_trains_on_navigation2d_from_its_defaults(algo, tmp_path):
    assert "maml_rl" in REINFORCEMENT
    run = metalearn.train([f"algo={algo}", "data=navigation2d", *TINY], run_dir=tmp_path / "run")
    assert run.config.backbone.name == ("gru" if algo == "rl2" else "mlp")  # rl2's own choice wins over the data's
    assert run.results["test"]["return"]["episodes"] == 1


def test_an_explicit_backbone_choice_still_wins(tmp_path):
    assert metalearn.compose(["algo=metanet", "data=glyphs"]).backbone.norm == "none"
    assert metalearn.compose(["algo=metanet", "backbone=conv4", "backbone.norm=none"]).backbone.hidden == 64
    assert metalearn.compose(["data=sinusoid", "backbone=mlp", "backbone.hidden=[8]"]).backbone.hidden == [8]
    with pytest.raises(metalearn.ConfigError, match="backbone=conv4 takes images"):
        metalearn.train(["algo=maml", "data=sinusoid", "backbone=conv4", *TINY], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a run that failed before training leaves nothing behind
