"""Hyper-parameter search: ``metalearn train -m hparams_search=<preset>`` runs Hydra's Optuna sweeper
on the value ``train`` returns (best validation accuracy, or MSE for regression), with the study in
the sweep directory so that a second invocation continues it. Real subprocess runs, real SQLite study."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from hydra import compose

from metalearn import confdir
from metalearn.cli import main  # importing the CLI registers the resolvers the presets use


def study(sweep: Path, name: str) -> optuna.study.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}")


def finished_jobs(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]


def test_search_writes_its_study_in_the_sweep_dir_and_a_second_invocation_continues_it(cli, tmp_path):
    sweep = tmp_path / "search"
    fast = cli.TINY
    args = ["train", "-m", "hparams_search=metric_based", "algo=protonet", *fast, "ways=choice(5, 10)",
            f"hydra.sweep.dir={sweep}"]
    proc = cli.run([*args, "hydra.sweeper.n_trials=3"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    first = study(sweep, "metric_based")
    assert first.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.state for t in first.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert {t.params.keys() == {"optim.lr", "ways"} for t in first.trials} == {True}
    assert {t.params["ways"] for t in first.trials} <= {5, 10}  # the command line narrowed the preset's choice
    # What each trial was told is its run's best validation accuracy; every run validated at 5 ways.
    runs = finished_jobs(sweep)
    assert sorted(t.value for t in first.trials) == sorted(r["best_val"]["value"] for r in runs)
    assert {r["episode"]["ways"] for r in runs} == {5}
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {first.best_value}" in best

    proc = cli.run([*args, "hydra.sweeper.n_trials=1"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    second = study(sweep, "metric_based")
    assert len(second.trials) == 4 and {t.state for t in second.trials} == {optuna.trial.TrialState.COMPLETE}
    assert len(finished_jobs(sweep)) == 4  # the new trial ran in its own directory


def test_regression_search_minimises_the_validation_mse(cli, tmp_path):
    sweep = tmp_path / "search"
    proc = cli.run(["train", "-m", "hparams_search=gradient_based", "data=sinusoid", "backbone=mlp", "algo=maml",
                    "meta_batch_size=4", "steps=4", "trainer.val_every=2", "trainer.val_episodes=8",
                    "trainer.test_episodes=8", "trainer.log_every=2", "hydra.sweeper.n_trials=2",
                    # Ranges narrowed on the command line (the preset's reach rates that diverge on sine waves).
                    "algo.inner_lr=tag(log, interval(0.001, 0.01))", "algo.inner_steps=choice(1, 2)",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    search = study(sweep, "gradient_based")
    assert search.direction == optuna.study.StudyDirection.MINIMIZE
    runs = finished_jobs(sweep)
    assert {r["best_val"]["metric"] for r in runs} == {"mse"}
    assert search.best_value == min(r["best_val"]["value"] for r in runs)
    assert {t.params.keys() == {"optim.lr", "algo.inner_lr", "algo.inner_steps"} for t in search.trials} == {True}
    assert all(0.001 <= t.params["algo.inner_lr"] <= 0.01 and t.params["algo.inner_steps"] in (1, 2)
               for t in search.trials)


@pytest.mark.parametrize("data, direction", [("glyphs", "maximize"), ("sinusoid", "minimize")])
def test_presets_compose_with_the_direction_of_the_data(data, direction, tmp_path):
    for preset in ("gradient_based", "metric_based"):
        with confdir.initialized():
            cfg = compose("config", overrides=[f"hparams_search={preset}", f"data={data}",
                                               f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.study_name == preset
        assert sweeper.direction == direction
        assert sweeper.storage == f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
        assert sweeper.sampler.seed is None  # a continued study must not draw its first trials again


@pytest.mark.parametrize("args, message", [
    (["train", "hparams_search=metric_based", "data=glyphs"], "add -m"),
    (["train", "-m", "data=glyphs", "optim.lr=interval(0.0001,0.01)"], "only the Optuna sweeper takes"),
    (["train", "-m", "hparams_search=nope", "data=glyphs"], "choose one of: gradient_based, metric_based"),
])
def test_search_mistakes_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_a_search_whose_trials_all_fail_ends_with_their_reasons(cli, tmp_path):
    sweep = tmp_path / "search"
    # queries=30 cannot be sampled from 20 images a class: every trial fails when it loads the data.
    proc = cli.run(["train", "-m", "hparams_search=metric_based", "algo=protonet", *cli.FAST, "queries=30",
                    "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, cli.describe(proc)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("failed: shots+queries=31 is more than the 20 images") == 2, proc.stderr
    assert "metalearn: error: 2 sweep jobs failed" in proc.stderr
    assert [t.state for t in study(sweep, "metric_based").trials] == [optuna.trial.TrialState.FAIL] * 2
