"""Every paper preset (``experiment=<algo>_<data>_<shape>``) composes into a valid run config and cites its paper."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from metalearn.config import to_run_config

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "metalearn/conf/experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    with initialize_config_module(config_module="metalearn.conf", version_base="1.3"):
        run = to_run_config(compose("config", overrides=[f"experiment={name}"]))
    algo, data, _ = name.rsplit("_", 2)  # <algo>_<data>_<shape>
    # data=features names the dataset it embeds in data.source (leo_miniimagenet_5w1s)
    assert (run.algo.name, getattr(run.data, "source", None) or run.data.name) == (algo, data)
    header = (Path(__file__).resolve().parents[1] / f"metalearn/conf/experiment/{name}.yaml").read_text()
    assert re.search(r"\(\w[^()]*\b(19|20)\d\d\b", header.splitlines()[1]), header  # "(Author ... year": its paper


def test_the_miniimagenet_presets_follow_their_papers():
    with initialize_config_module(config_module="metalearn.conf", version_base="1.3"):
        maml = to_run_config(compose("config", overrides=["experiment=maml_miniimagenet_5w1s"]))
        proto = to_run_config(compose("config", overrides=["experiment=protonet_miniimagenet_5w1s"]))
    assert (maml.backbone.hidden, maml.meta_batch_size, maml.algo.inner_lr, maml.algo.inner_steps,
            maml.algo.test_inner_steps, maml.queries) == (32, 4, 0.01, 5, 10, 15)
    assert (proto.ways, proto.eval.ways, proto.queries, proto.backbone.hidden, proto.optim.decay_every) == (30, 5, 15, 64, 2000)
