"""Every paper preset (``experiment=<algo>_<data>_<shape>``) composes into a valid run config and cites its paper.

Meta-RL presets are named ``<method>_<data>`` after their papers' names (``maml_trpo_navigation2d``,
``promp_halfcheetah_dir``): the method starts with the algorithm's name less its ``_rl`` (maml_rl: ``maml_``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose

from metalearn import confdir
from metalearn.config import to_run_config

CONF = confdir.CONF_DIR / "experiment"
PRESETS = sorted(p.stem for p in CONF.glob("*.yaml"))
ENVIRONMENTS = ("navigation2d", "halfcheetah_vel", "halfcheetah_dir", "ant_dir")  # reinforcement task sources


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    with confdir.initialized():
        run = to_run_config(compose("config", overrides=[f"experiment={name}"]))
    if run.data.name in ENVIRONMENTS:  # <method>_<data>[_<variant>]
        assert name.startswith(run.algo.name.removesuffix("_rl") + "_") and f"_{run.data.name}" in name, name
    else:
        algo, data, _ = name.rsplit("_", 2)  # <algo>_<data>_<shape>
        # data=features names the dataset it embeds in data.source (leo_miniimagenet_5w1s)
        assert (run.algo.name, getattr(run.data, "source", None) or run.data.name) == (algo, data)
    header = (Path(__file__).resolve().parents[1] / f"conf/experiment/{name}.yaml").read_text()
    assert re.search(r"\(\w[^()]*\b(19|20)\d\d\b", header.splitlines()[1]), header  # "(Author ... year": its paper


def test_the_miniimagenet_presets_follow_their_papers():
    with confdir.initialized():
        maml = to_run_config(compose("config", overrides=["experiment=maml_miniimagenet_5w1s"]))
        proto = to_run_config(compose("config", overrides=["experiment=protonet_miniimagenet_5w1s"]))
    assert (maml.backbone.hidden, maml.meta_batch_size, maml.algo.inner_lr, maml.algo.inner_steps,
            maml.algo.test_inner_steps, maml.queries) == (32, 4, 0.01, 5, 10, 15)
    assert (proto.ways, proto.eval.ways, proto.queries, proto.backbone.hidden, proto.optim.decay_every) == (30, 5, 15, 64, 2000)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_carries_its_paper_figure_as_data(name):
    """``paper:``: what metalearn reproduce compares with, checked by the schema (config.PaperConfig)."""
    from metalearn.config import paper_config

    with confdir.initialized():
        cfg = compose("config", overrides=[f"experiment={name}"])
    paper = paper_config(cfg)
    assert paper is not None, f"{name} has no paper: section"
    regression, reinforcement = cfg.data.name == "sinusoid", cfg.data.name in ENVIRONMENTS
    assert (re.fullmatch(r"mse(_step\d+)?", paper.metric) if regression else
            re.fullmatch(r"return(_step\d+)?", paper.metric) if reinforcement else paper.metric == "accuracy"), paper.metric
    assert re.search(r"\b(19|20)\d\d\b", paper.source) and paper.protocol, paper  # authors year ...; the protocol
    if paper.value is None:
        assert paper.note, f"{name}: no figure, and no note saying why"
    elif paper.metric == "accuracy":
        assert 0.2 < paper.value <= 1 and (paper.ci95 is None or 0 < paper.ci95 < 0.05), paper  # fractions
    # the figure lives in paper: alone, not also in a comment where it could drift from the data
    comments = "\n".join(line for line in (CONF / f"{name}.yaml").read_text().splitlines() if line.startswith("#"))
    assert not re.search(r"paper: \d+(\.\d+)? ?(%|\+-)", comments), comments  # "paper: 98.7 +- 0.4%"
