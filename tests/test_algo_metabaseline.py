"""Meta-Baseline: cosine nearest-centroid logits with a learned temperature; learns on glyphs; the paper's two
stages (classifier pre-training, then meta-training from it through ``init_from``) run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import metabaseline
from metalearn.errors import ConfigError


def test_logits_are_the_temperature_times_the_cosine_to_each_class_mean():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 6, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                         dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    logits = metabaseline.centroid_cosine_logits(support, labels, query, 3, torch.tensor(7.0, dtype=torch.float64))
    for b in range(2):
        for c in range(3):
            centroid = support[b][labels[b] == c].mean(0)
            for q in range(3):
                want = 7.0 * F.cosine_similarity(query[b, q], centroid, dim=0)
                torch.testing.assert_close(logits[b, q, c], want, rtol=1e-12, atol=1e-12)


def test_bad_temperature_is_one_line():
    with pytest.raises(ConfigError, match="algo.temperature must be > 0"):
        metabaseline.build(metabaseline.Config(temperature=0.0), torch.nn.Identity(), None)


# The ``learning`` fixture (glyphs, 5-way 1-shot, conv4-16, Adam 3e-3), 30 steps as ProtoNet's test. Measured (seed 0,
# a shared 2-core machine): 0.504 -> 0.801 in 3.2 s of training; the thresholds are ProtoNet's.
def test_learns(learning):
    before, after, seconds = learning.run(learning.config("metabaseline", steps=30))
    print(f"metabaseline 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.65
    assert after >= before + 0.15


def test_pretrain_then_meta_train_through_the_cli(cli, tmp_path):
    pre = cli.run(["train", "algo=baseline", *cli.TINY, f"hydra.run.dir={tmp_path / 'pre'}"], tmp_path)
    assert pre.returncode == 0, cli.describe(pre)
    meta = cli.run(["train", "algo=metabaseline", *cli.TINY, f"init_from={tmp_path / 'pre'}",
                    f"hydra.run.dir={tmp_path / 'meta'}"], tmp_path)
    assert meta.returncode == 0, cli.describe(meta)
    assert "backbone initialised from" in (tmp_path / "meta" / "train.log").read_text()
    results = json.loads((tmp_path / "meta" / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1
