"""The Python API (metalearn/api.py): compose, train, evaluate, load, episodes, and a user-built algorithm object."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import metalearn
from conftest import TINY, cli_env, describe, run_cli
from metalearn.algorithms.base import QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.algorithms.protonet import prototype_logits
from metalearn.errors import ConfigError


class ScaledProto(QueryLossAlgorithm):
    """A user's algorithm built in Python: ProtoNet with a learned scale on a small MLP."""

    def __init__(self, input_shape, hidden: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(-len(input_shape)), nn.Linear(math.prod(input_shape), hidden))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def query_loss(self, batch, training):
        logits = prototype_logits(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x),
                                  batch.ways) * self.log_scale.exp()
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def test_compose_is_the_cli_config_with_its_interpolations():
    cfg = metalearn.compose(["data=glyphs", "algo=protonet", "shots=3"])
    assert cfg.algo.name == "protonet" and cfg.eval.shots == 3
    cfg.shots = 5  # eval.shots: ${shots} is still a link, as in the CLI's config
    assert cfg.eval.shots == 5
    with pytest.raises(ConfigError, match="unknown option algo.inner_lr"):
        metalearn.compose(["data=glyphs", "algo=protonet", "+algo.inner_lr=0.1"])
    with pytest.raises(ConfigError):
        metalearn.compose(["algo=nosuch"])


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    import logging

    run_dir = tmp_path_factory.mktemp("api") / "run"
    logger = logging.getLogger("metalearn")
    before = (logger.level, list(logger.handlers))
    run = metalearn.train(["algo=protonet", *TINY], run_dir=run_dir)
    assert (logger.level, list(logger.handlers)) == before  # the caller's logging is left as it was
    return run


def test_train_writes_a_run_the_cli_reads(api_run, tmp_path):
    run = api_run
    assert 0 <= run.accuracy <= 1 and run.ci95 >= 0 and run.metric == "accuracy"
    assert json.loads((run.run_dir / "results.json").read_text())["test"] == run.results["test"]
    assert (run.run_dir / ".hydra" / "config.yaml").is_file()
    assert "val accuracy" in (run.run_dir / "train.log").read_text()
    assert list(run.run_dir.glob("events.out.tfevents*"))
    proc = run_cli(["eval", f"run={run.run_dir}"], cwd=tmp_path, env=cli_env())  # the CLI reproduces results.json
    assert proc.returncode == 0, describe(proc)
    saved = json.loads(next(run.run_dir.glob("eval-*.json")).read_text())
    assert saved["test"]["accuracy"]["mean"] == pytest.approx(run.accuracy, abs=1e-6)
    proc = run_cli(["report", str(run.run_dir.parent)], cwd=tmp_path, env=cli_env())
    assert proc.returncode == 0, describe(proc)


def test_evaluate_and_load(api_run):
    result = metalearn.evaluate(api_run.run_dir, shots=2, episodes=6)
    assert result["episode"]["shots"] == 2 and result["test"]["accuracy"]["episodes"] == 6
    algo = metalearn.load(api_run.run_dir)
    assert isinstance(algo, metalearn.Algorithm) and not algo.training
    batches = metalearn.episodes("glyphs", ways=5, shots=1, queries=3, split="test", batch_size=2,
                                 overrides=["data.split_sizes=[20,10,10]"])
    batch = next(batches)
    assert batch.support_x.shape[:2] == (2, 5) and batch.query_y.shape == (2, 15)
    assert set(batch.support_y.unique().tolist()) == set(range(5))
    assert algo.evaluate(batch)["accuracy"].shape == (2,)


def test_a_user_built_algorithm_object_is_trained_and_recorded_truthfully(tmp_path):
    algo = ScaledProto((1, 28, 28))
    run = metalearn.train(["algo=protonet", *TINY], run_dir=tmp_path / "run", algorithm=algo)
    ckpt = torch.load(run.run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["config"]["algo"] == {"name": "ScaledProto", "object": "test_api:ScaledProto"}
    assert run.config.algo.name == "ScaledProto"  # and the run's own record says so too
    assert "object: test_api:ScaledProto" in (run.run_dir / ".hydra" / "config.yaml").read_text()
    proc = run_cli(["train", f"resume={run.run_dir}", "steps=6"], cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2 and "built in Python" in proc.stderr, describe(proc)
    assert "log_scale" in ckpt["model"]
    proc = run_cli(["eval", f"run={run.run_dir}"], cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
    assert "built in Python (test_api:ScaledProto)" in proc.stderr and "metalearn.load" in proc.stderr
    loaded = metalearn.load(run.run_dir, algorithm=ScaledProto((1, 28, 28)))
    assert torch.equal(loaded.log_scale, ckpt["model"]["log_scale"])
    with pytest.raises(ConfigError, match="not a metalearn Algorithm"):
        metalearn.train(["algo=protonet", *TINY], run_dir=tmp_path / "bad", algorithm=nn.Linear(2, 2))
    no_updates = ScaledProto((1, 28, 28))
    no_updates.updates_per_batch = 0
    with pytest.raises(ConfigError, match=r"^algo=ScaledProto's updates_per_batch must be a whole number >= 1 \(got 0\)"):
        metalearn.train(["algo=protonet", *TINY], run_dir=tmp_path / "none", algorithm=no_updates)


def test_api_mistakes_are_the_clis_one_line_messages(api_run, tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown algo 'nosuch'; choose one of: anil, .*protonet"):
        metalearn.compose(["algo=nosuch"])
    with pytest.raises(ConfigError, match=r"^unknown experiment 'nosuch'; choose one of: "):
        metalearn.compose(["experiment=nosuch"])
    with pytest.raises(ConfigError, match=r"^algo=maml has no option 'inner_lrr'; its options are: inner_lr"):
        metalearn.compose(["algo=maml", "algo.inner_lrr=1"])
    with pytest.raises(ConfigError, match="not one of: best, last"):
        metalearn.evaluate(api_run.run_dir, checkpoint="middle")
    with pytest.raises(ConfigError, match="holds a run already"):
        metalearn.train(["algo=protonet", *TINY], run_dir=api_run.run_dir)


def test_the_api_works_inside_a_users_own_hydra_app(tmp_path):
    from hydra import compose, initialize_config_dir

    (tmp_path / "app.yaml").write_text("lr: 0.5\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = metalearn.compose(["algo=protonet", "data=glyphs"])
        assert cfg.algo.name == "protonet"
        assert compose("app").lr == 0.5  # the user's Hydra is back as it was
