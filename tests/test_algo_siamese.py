"""Siamese networks: pairs and pair losses against a plain re-computation, the nearest-support
prediction against a brute-force loop, evaluation hygiene, learning on glyphs, the CLI, the preset.

The re-computations use the backbone only to embed images (it is tested on its own elsewhere) and
score pairs with Python loops over ``itertools.combinations`` and plain tensor formulas.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import siamese as siamese_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
import plainops

WAYS, SHOTS, QUERIES, TASKS, SIZE = 3, 2, 2, 2, 8


def tiny(**cfg) -> siamese_mod.Siamese:
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=4, layers=2), (1, SIZE, SIZE))
    return siamese_mod.build(siamese_mod.Config(**cfg), backbone, ProblemInfo((1, SIZE, SIZE), WAYS, 10)).double()


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES) -> TaskBatch:
    return plainops.random_batch(seed, tasks, ways, shots, queries, SIZE)


def score(algo, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The paper's pair score by hand: sum_k w_k |a_k - b_k| + bias; or minus the Euclidean distance."""
    if algo.cfg.loss == "bce":
        return (algo.distance.weight[0] * (a - b).abs()).sum() + algo.distance.bias[0]
    return -torch.sqrt(((a - b) ** 2).sum())


def pair_loss(algo, a, b, same: bool) -> torch.Tensor:
    if algo.cfg.loss == "bce":
        p = 1 / (1 + torch.exp(-score(algo, a, b)))
        return -torch.log(p) if same else -torch.log(1 - p)
    d = torch.sqrt(((a - b) ** 2).sum())
    return d**2 if same else torch.clamp(algo.cfg.margin - d, min=0) ** 2


def balanced(losses: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    same = [l for l, s in losses if s]
    diff = [l for l, s in losses if not s]
    assert same and diff
    return (sum(same) / len(same) + sum(diff) / len(diff)) / 2


def embed(algo, batch, t):
    return algo.backbone(batch.support_x[t]), algo.backbone(batch.query_x[t])


def test_registered_and_config_checks():
    assert algorithm_module("siamese") is siamese_mod
    with pytest.raises(ConfigError, match="algo.loss"):
        tiny(loss="l2")
    with pytest.raises(ConfigError, match="algo.margin"):
        tiny(loss="contrastive", margin=0.0)
    algo = tiny()
    algo.check_episode(20, 1, 1)  # any number of ways: nothing is tied to the training ways
    with pytest.raises(ConfigError, match="ways >= 2"):
        algo.check_episode(1, 5, 5)
    assert tiny(loss="contrastive").distance is None  # no unused parameters


@pytest.mark.parametrize("loss, margin", [("bce", 1.0), ("contrastive", 1.0), ("contrastive", 5.0)])
def test_training_pairs_and_loss_match_a_plain_loop(loss, margin):
    algo, batch = tiny(loss=loss, margin=margin), random_batch()
    expected, counts = [], []
    for t in range(TASKS):
        s, q = embed(algo, batch, t)
        h = torch.cat([s, q])
        y = torch.cat([batch.support_y[t], batch.query_y[t]]).tolist()
        losses = [(pair_loss(algo, h[i], h[j], y[i] == y[j]), y[i] == y[j]) for i, j in itertools.combinations(range(len(y)), 2)]
        counts.append((sum(s for _, s in losses), len(losses)))
        expected.append(balanced(losses))
    m = WAYS * (SHOTS + QUERIES)
    assert counts == [(WAYS * math.comb(SHOTS + QUERIES, 2), math.comb(m, 2))] * TASKS  # every pair, once
    expected = torch.stack(expected)
    grads = torch.autograd.grad(expected.mean(), list(algo.parameters()))

    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    torch.testing.assert_close(metrics["loss"], expected.detach(), rtol=1e-10, atol=1e-12)
    assert not metrics["loss"].requires_grad and metrics["accuracy"].shape == (TASKS,)
    for (name, p), g in zip(algo.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12, msg=name)
        assert p.grad.abs().sum() > 0 or zero_gradient(name), name
    if loss == "contrastive" and margin == 5.0:  # a margin the pairs are inside of: it matters
        assert float(metrics["loss"].mean()) != pytest.approx(float(tiny(loss=loss, margin=1.0).meta_step(batch)["loss"].mean()))


def brute_force(algo, batch: TaskBatch, t: int) -> tuple[float, float]:
    """One task: (balanced query-vs-support pair loss, accuracy of the nearest support example's class)."""
    s, q = embed(algo, batch, t)
    sy, qy = batch.support_y[t].tolist(), batch.query_y[t].tolist()
    losses, correct = [], 0
    for i in range(len(qy)):
        best_class, best = None, -math.inf
        for c in range(batch.ways):
            # a class's score: its most similar support example
            class_score = max(float(score(algo, q[i], s[j])) for j in range(len(sy)) if sy[j] == c)
            if class_score > best:
                best_class, best = c, class_score
        correct += best_class == qy[i]
        losses += [(pair_loss(algo, q[i], s[j], qy[i] == sy[j]), qy[i] == sy[j]) for j in range(len(sy))]
    return float(balanced(losses)), correct / len(qy)


@pytest.mark.parametrize("loss", ["bce", "contrastive"])
@pytest.mark.parametrize("shots", [1, 3])
def test_evaluate_matches_brute_force_nearest_support(loss, shots):
    algo = tiny(loss=loss)
    with torch.no_grad():  # a non-trivial weighted distance (mixed signs), so the max-over-shots rule matters
        if algo.distance is not None:
            algo.distance.weight.copy_(torch.linspace(-1.0, 0.5, algo.distance.weight.numel()).view_as(algo.distance.weight))
    batch = random_batch(tasks=4, shots=shots, queries=3)
    p0 = {k: v.detach().clone() for k, v in algo.named_parameters()}
    rng = torch.get_rng_state()
    with torch.no_grad():
        out = algo.evaluate(batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert out["loss"].shape == out["accuracy"].shape == (4,)
    with torch.no_grad():
        for t in range(4):
            loss_t, acc_t = brute_force(algo, batch, t)
            assert float(out["loss"][t]) == pytest.approx(loss_t, rel=1e-10)
            assert float(out["accuracy"][t]) == pytest.approx(acc_t, abs=1e-6)
    # parameters untouched, no gradient, deterministic, and the same for a task alone or in another batch
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]) and p.grad is None, name
    again = algo.evaluate(batch)
    assert all(torch.equal(again[k], out[k]) for k in out)
    alone = TaskBatch.cat([batch[2:3], batch[0:1]])
    torch.testing.assert_close(algo.evaluate(alone)["loss"], out["loss"][[2, 0]])


def test_class_scores_take_the_best_shot():
    scores = torch.tensor([[[0.1, 0.9, 0.3, -2.0]]])  # one query against four support examples
    support_y = torch.tensor([[0, 1, 1, 0]])
    torch.testing.assert_close(siamese_mod.class_scores(scores, support_y, 2), torch.tensor([[[0.1, 0.9]]]))


def test_contrastive_has_finite_gradient_at_zero_distance():
    sq = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    siamese_mod.contrastive(sq, torch.tensor([True, False]), 1.0).sum().backward()
    assert torch.isfinite(sq.grad).all()


# ---------------------------------------------------------------- learning

# The ``learning`` fixture of conftest.py (5-way 1-shot glyphs, 5 queries, conv4-32, meta-batch 8).
# Measured with seeds 0-5, 40 steps of Adam 3e-3 (test accuracy over 200 fixed test episodes, before ->
# after): 0.14-0.25 -> 0.64-0.68, gain >= 0.42; about 20 s for the whole test on a busy machine.
# (Below chance before training: a random weighted distance may rank far pairs as similar.)
# Chance is 0.2; the thresholds leave about 0.1 of margin below the worst seed.


def test_learns(learning):
    cfg = learning.config({"name": "siamese", "loss": "bce"}, steps=40, lr=3e-3)
    before, after, seconds = learning.run(cfg)
    print(f"siamese 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.53
    assert after >= before + 0.32


# ---------------------------------------------------------------- the CLI and the preset


def test_trains_through_the_cli(cli, tmp_path):
    jobs = {"siamese": (["train", "algo=siamese", *cli.TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)}
    proc = cli.run_many(jobs)["siamese"]
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1 and results["test"]["accuracy"]["episodes"] == 4
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["name"] == "siamese"
    assert "distance.weight" in ckpt["model"]


def test_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=siamese_omniglot_20w1s"]))
    assert cfg.algo.name == "siamese" and cfg.algo.loss == "bce" and cfg.data.name == "omniglot"
    assert (cfg.eval.ways, cfg.eval.shots) == (20, 1)
