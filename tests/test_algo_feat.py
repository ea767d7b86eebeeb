"""FEAT: the adapted-prototype logits and the contrastive regulariser against an independent computation, the
set function's permutation equivariance over classes, learning on glyphs, starting from a pre-trained backbone
through the CLI, the preset.

The reference below uses nothing of metalearn but the backbone's embeddings and the parameter tensors of the
set function: the attention block is written out with plain tensor ops, one set at a time, and the regulariser
runs it on each class's set separately, as the official code does (github.com/Sha-Lab/FEAT).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import feat
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
import plainops

WAYS, SHOTS, QUERIES, TASKS = 4, 2, 3, 2
SIZE = 8
SHAPE = (1, SIZE, SIZE)  # conv4 with 2 blocks of 5 filters: 5x2x2 = 20 features


def tiny(**cfg) -> feat.FEAT:
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=5, layers=2), SHAPE)
    algo = feat.build(feat.Config(**{"temperature": 2.0, "contrastive_temperature": 3.0, **cfg}), backbone,
                      ProblemInfo(SHAPE, WAYS, 10)).double()
    with torch.no_grad():  # a LayerNorm that is not the identity's affine map, so its parameters are exercised
        algo.set_function.norm.weight.add_(0.3 * torch.randn_like(algo.set_function.norm.weight))
        algo.set_function.norm.bias.add_(0.3 * torch.randn_like(algo.set_function.norm.bias))
    return algo


def random_batch(seed=1, tasks=TASKS) -> TaskBatch:
    return plainops.random_batch(seed, tasks, WAYS, SHOTS, QUERIES, SIZE)


def attend(algo: feat.FEAT, x: torch.Tensor) -> torch.Tensor:
    """The set function written out for one set [n, d] (no dropout): per head, softmax(q k^T / sqrt(d)) v;
    heads concatenated, output projection, residual, LayerNorm."""
    s, d = algo.set_function, x.shape[-1]
    q, k, v = x @ s.q.weight.T, x @ s.k.weight.T, x @ s.v.weight.T
    heads = [torch.softmax(q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d), -1) @ v[:, h * d:(h + 1) * d]
             for h in range(s.heads)]
    out = torch.cat(heads, -1) @ s.out.weight.T + s.out.bias
    return F.layer_norm(x + out, (d,), s.norm.weight, s.norm.bias)


def score(x: torch.Tensor, centres: torch.Tensor, distance: str, temperature: float) -> torch.Tensor:
    if distance == "euclidean":
        return -((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1) / temperature
    return x @ (centres / centres.norm(dim=-1, keepdim=True)).T / temperature


def reference(algo: feat.FEAT, batch: TaskBatch, t: int):
    """Task t: query logits [n_q, ways], query cross-entropy, contrastive cross-entropy."""
    cfg, ways = algo.cfg, batch.ways
    s, q = algo.backbone(batch.support_x[t]), algo.backbone(batch.query_x[t])
    sy, qy = batch.support_y[t], batch.query_y[t]
    prototypes = attend(algo, torch.stack([s[sy == c].mean(0) for c in range(ways)]))
    logits = score(q, prototypes, cfg.distance, cfg.temperature)
    centres = torch.stack([attend(algo, torch.cat([s[sy == c], q[qy == c]])).mean(0) for c in range(ways)])
    everything, labels = torch.cat([s, q]), torch.cat([sy, qy])
    contrastive = F.cross_entropy(score(everything, centres, cfg.distance, cfg.contrastive_temperature), labels)
    return logits, F.cross_entropy(logits, qy), contrastive


# ---------------------------------------------------------------- the algorithm


def test_registered_width_from_the_backbone_and_config_checks():
    assert algorithm_module("feat") is feat
    assert tiny().set_function.q.weight.shape == (20, 20)
    assert tiny(heads=3).set_function.q.weight.shape == (60, 20) and tiny(heads=3).set_function.out.in_features == 60
    for input_shape, want in [((1, 28, 28), 64), ((3, 84, 84), 1600)]:
        algo = feat.build(feat.Config(), conv4.build(conv4.Config(), input_shape), ProblemInfo(input_shape, 5, 10))
        assert algo.set_function.norm.normalized_shape == (want,)
    for bad, match in [({"distance": "manhattan"}, "algo.distance='manhattan'"), ({"temperature": 0.0}, "algo.temperature"),
                       ({"contrastive_temperature": -1.0}, "contrastive_temperature"),
                       ({"contrastive_weight": -0.1}, "algo.contrastive_weight"), ({"heads": 0}, "algo.heads"),
                       ({"dropout": 1.0}, "algo.dropout"), ({"attention_dropout": -0.1}, "attention_dropout")]:
        with pytest.raises(ConfigError, match=match) as info:
            tiny(**bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="feature vector"):
        feat.build(feat.Config(), nn.Identity(), ProblemInfo(SHAPE, 5, 10))


@pytest.mark.parametrize("distance, heads", [("euclidean", 1), ("cosine", 1), ("euclidean", 2)])
def test_logits_losses_and_gradients_match_reference(distance, heads):
    algo, batch = tiny(distance=distance, heads=heads, contrastive_weight=0.5, dropout=0.0, attention_dropout=0.0), \
        random_batch()
    refs = [reference(algo, batch, t) for t in range(TASKS)]
    total = torch.stack([ce + 0.5 * reg for _, ce, reg in refs]).mean()
    params = dict(algo.named_parameters())
    expected = dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True)))

    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)  # training mode, dropout 0: deterministic
    torch.testing.assert_close(metrics["loss"], torch.stack([ce for _, ce, _ in refs]).detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(metrics["contrastive_loss"], torch.stack([r for _, _, r in refs]).detach(),
                               rtol=1e-10, atol=0)
    accs = [float((logits.argmax(1) == batch.query_y[t]).double().mean()) for t, (logits, _, _) in enumerate(refs)]
    assert metrics["accuracy"].tolist() == pytest.approx(accs)
    for name, p in algo.named_parameters():
        if expected[name] is None:  # conv4's first bias: BatchNorm cancels it (see conftest.zero_gradient)
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-12, msg=name)
    assert all(params[n].grad.abs().sum() > 0 for n in params if n.startswith("set_function."))

    algo.eval()
    out = algo.evaluate(batch)
    torch.testing.assert_close(out["loss"], metrics["loss"], rtol=1e-10, atol=0)  # evaluation: the query loss alone


def test_contrastive_weight_zero_is_the_query_loss_alone():
    with_term, without = tiny(contrastive_weight=1.0, dropout=0.0, attention_dropout=0.0), \
        tiny(contrastive_weight=0.0, dropout=0.0, attention_dropout=0.0)
    batch = random_batch()
    a, b = with_term.meta_step(batch), without.meta_step(batch)
    assert "contrastive_loss" in a and "contrastive_loss" not in b
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)  # same weights, same query loss
    expected = torch.autograd.grad(torch.stack([reference(without, batch, t)[1] for t in range(TASKS)]).mean(),
                                   without.set_function.q.weight)[0]
    torch.testing.assert_close(without.set_function.q.weight.grad, expected, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(with_term.set_function.q.weight.grad, expected)


def test_set_function_is_permutation_equivariant_over_classes():
    """Relabelling the ways permutes the logits' columns (eval mode: no dropout); and the adaptation is a set
    function, not a per-class map: changing one class's support moves the other classes' logits too."""
    algo, batch = tiny(), random_batch(tasks=3)
    algo.eval()
    logits = algo.embed_and_score(batch)[2]
    for seed in range(3):
        perm = torch.randperm(WAYS, generator=torch.Generator().manual_seed(seed))
        relabelled = TaskBatch(batch.support_x, perm[batch.support_y], batch.query_x, perm[batch.query_y],
                               batch.classes[:, torch.argsort(perm)])
        permuted = algo.embed_and_score(relabelled)[2]
        torch.testing.assert_close(permuted[..., perm], logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(algo.evaluate(relabelled)["loss"], algo.evaluate(batch)["loss"], rtol=1e-12, atol=0)

    # On embeddings, not images: the backbone's per-set BatchNorm alone would carry a change to every embedding.
    support = algo.backbone(batch.support_x)
    changed = support.clone()
    changed[batch.support_y == 0] += 1.0
    adapted = algo.adapted_prototypes(support, batch.support_y, WAYS)
    moved = algo.adapted_prototypes(changed, batch.support_y, WAYS)
    assert (moved[:, 1:] - adapted[:, 1:]).abs().amax() > 1e-3  # class 0's support reached classes 1..3
    torch.testing.assert_close(algo.embed_and_score(batch)[2], logits, rtol=0, atol=0)  # eval mode is deterministic


# ---------------------------------------------------------------- learning

# The ``learning`` fixture (glyphs, 5-way 1-shot, conv4-32, Adam 3e-3), 30 steps as ProtoNet's and Meta-Baseline's
# tests, with the algorithm's defaults (temperature 1, contrastive weight 0.1). Measured (seeds 0-3, a shared 2-core
# machine, test accuracy over 100 fixed test episodes, before -> after, seconds of training):
#   feat, 30 steps: 0.49-0.56 -> 0.75-0.79 (gain >= 0.19; 4.5 s on an idle machine, 8-10 s on a busy one)
# Thresholds: ProtoNet's.
def test_learns(learning):
    before, after, seconds = learning.run(learning.config("feat", steps=30))
    print(f"feat 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.65
    assert after >= before + 0.15


# ---------------------------------------------------------------- the CLI, init_from and the preset


@pytest.mark.slow  # init_from itself is tested for every algorithm family in test_init_from.py
def test_starts_from_a_pretrained_backbone_through_the_cli(cli, tmp_path):
    """A baseline run's backbone under FEAT (init_from); steps at a vanishing rate, so what the run saves is what it
    started from: the baseline's backbone, next to a fresh set function."""
    pre = cli.run(["train", "algo=baseline", *cli.TINY, f"hydra.run.dir={tmp_path / 'pre'}"], tmp_path)
    assert pre.returncode == 0, cli.describe(pre)
    frozen = ["optim.name=sgd", "optim.lr=1e-30", "optim.momentum=0"]
    run = cli.run(["train", "algo=feat", *cli.TINY, *frozen, f"init_from={tmp_path / 'pre'}",
                   f"hydra.run.dir={tmp_path / 'feat'}"], tmp_path)
    assert run.returncode == 0, cli.describe(run)
    assert "backbone initialised from" in (tmp_path / "feat" / "train.log").read_text()
    source = torch.load(tmp_path / "pre" / "checkpoints" / "best.pt", weights_only=True)["model"]
    mine = torch.load(tmp_path / "feat" / "checkpoints" / "last.pt", weights_only=True)
    backbone = {k: v for k, v in source.items() if k.startswith("backbone.")}
    assert backbone and all(torch.allclose(mine["model"][k], v, rtol=0, atol=1e-20) for k, v in backbone.items())
    assert mine["model"]["set_function.q.weight"].shape == (16, 16)  # conv4-16 at 28x28: 16 features
    assert mine["config"]["init_from"] == str(tmp_path / "pre")
    accuracy = json.loads((tmp_path / "feat" / "results.json").read_text())["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 4


def test_preset_is_the_papers_resnet12_setup():
    from hydra import compose

    from metalearn import confdir
    from metalearn.models import resnet12

    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=feat_miniimagenet_5w1s"]))
    assert (cfg.algo.name, cfg.data.name, cfg.backbone.name) == ("feat", "miniimagenet", "resnet12")
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size, cfg.steps) == (5, 1, 15, 1, 20000)
    a = cfg.algo
    assert (a.distance, a.temperature, a.contrastive_weight, a.contrastive_temperature, a.heads, a.dropout) == \
        ("euclidean", 64.0, 0.01, 64.0, 1, 0.5)
    assert (cfg.optim.lr, cfg.optim.optimizer["nesterov"], cfg.optim.optimizer["weight_decay"],
            cfg.optim.decay_every, cfg.optim.decay_gamma) == (2e-4, True, 5e-4, 4000, 0.5)
    assert cfg.trainer.test_episodes == 10000 and cfg.init_from is None  # given on the command line
    algo = feat.build(cfg.algo, resnet12.build(cfg.backbone, (3, 84, 84)), ProblemInfo((3, 84, 84), 5, 64))
    assert algo.set_function.norm.normalized_shape == (640,)  # ResNet-12, averaged: 640 features
