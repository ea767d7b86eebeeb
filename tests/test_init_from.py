"""``init_from=<run>``: a run starts from another run's backbone (pre-train, then meta-train), across algorithm
families; everything else starts fresh; mistakes are one line."""

from __future__ import annotations

import pytest
import torch

import metalearn
from conftest import TINY
from metalearn.errors import CheckpointError

SMALL = [*TINY, "backbone.hidden=8"]
#: Steps that leave the weights as they were (SGD at a vanishing rate): what the run starts from is what it saves.
FROZEN = ["optim.name=sgd", "optim.lr=1e-30", "optim.momentum=0"]


def backbone(ckpt: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in ckpt["model"].items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = metalearn.train(["algo=baseline", *SMALL], run_dir=tmp_path_factory.mktemp("init") / "baseline")
    return run.run_dir


@pytest.mark.parametrize("algo, prefix", [("protonet", "backbone."), ("maml", "net.0.")])
def test_a_run_starts_from_another_runs_backbone(pretrained, tmp_path, algo, prefix):
    run = metalearn.train([f"algo={algo}", *SMALL, *FROZEN, f"init_from={pretrained}"], run_dir=tmp_path / algo)
    source = backbone(torch.load(pretrained / "checkpoints" / "best.pt", weights_only=True), "backbone.")
    started = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)
    mine = backbone(started, prefix)
    assert mine.keys() == source.keys()
    for k in source:
        torch.testing.assert_close(mine[k], source[k], rtol=0, atol=1e-20)
    assert started["config"]["init_from"] == str(pretrained)  # recorded, for whoever reads the run later
    fresh = metalearn.train([f"algo={algo}", *SMALL, *FROZEN], run_dir=tmp_path / "fresh")
    first = next(iter(source))
    assert not torch.equal(backbone(torch.load(fresh.run_dir / "checkpoints" / "last.pt", weights_only=True),
                                    prefix)[first], source[first])


def test_init_from_mistakes_are_one_line(pretrained, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        metalearn.train(["algo=protonet", *SMALL, f"init_from={tmp_path / 'nope'}"], run_dir=tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not fit this run's backbone.*backbone settings") as info:
        metalearn.train(["algo=protonet", *TINY, "backbone.hidden=16", f"init_from={pretrained}"], run_dir=tmp_path / "b")
    assert "\n" not in str(info.value)
