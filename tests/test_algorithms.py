"""MAML and ProtoNet: gradients against independent computations, evaluation, and learning.

The MAML checks do not use anything of metalearn.algorithms.maml but the
module under test: the network is re-implemented here with plain tensor ops
(conv, per-set batch normalisation, ReLU, max-pool, linear), adapted with
plain SGD, and the meta-gradient compared with central finite differences of
that meta-loss (second order) or with the first-order gradient built by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metalearn import engine
from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import maml as maml_mod
from metalearn.algorithms import protonet as proto_mod
from metalearn.data import TaskBatch
from metalearn.data.episodes import ClassStore
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
from plainops import params_of

# ---------------------------------------------------------------- helpers

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS = 8, 4, 2


def tiny_maml(**cfg) -> maml_mod.MAML:
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=WAYS, num_train_classes=10)
    algo = maml_mod.build(maml_mod.Config(**cfg), backbone, info).double()
    # non-trivial BatchNorm affine parameters, so their gradients are exercised
    with torch.no_grad():
        for name, p in algo.named_parameters():
            if "norms" in name:
                p.add_(0.3 * torch.randn_like(p))
    return algo


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES, size=SIZE, dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(ways).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(shots), labels(queries)
    # class-dependent images, so the tasks are learnable and the losses informative
    protos = torch.rand(tasks, ways, 1, size, size, generator=g, dtype=dtype)

    def images(y):
        base = protos[torch.arange(tasks)[:, None], y]
        return (0.6 * base + 0.4 * torch.rand(base.shape, generator=g, dtype=dtype)).clamp(0, 1)

    classes = torch.stack([torch.randperm(10, generator=g)[:ways] for _ in range(tasks)])
    return TaskBatch(images(sy), sy, images(qy), qy, classes)


def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """The MAML network (conv4 + linear head) written out by hand: [n, C, H, W] -> logits [n, ways]."""
    for i in range(LAYERS):
        x = F.conv2d(x, p[f"net.0.convs.{i}.weight"], p[f"net.0.convs.{i}.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, batch statistics of this set
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * p[f"net.0.norms.{i}.weight"].view(1, -1, 1, 1) + p[f"net.0.norms.{i}.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(torch.clamp(x, min=0), 2)
    return x.flatten(1) @ p["net.1.weight"].T + p["net.1.bias"]


def sgd_adapt(p: dict, x, y, steps: int, lr: float) -> dict:
    """Plain SGD from p on (x, y); returns detached tensors (no graph kept)."""
    p = {k: v.detach() for k, v in p.items()}
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(forward(leaves, x), y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        p = {k: v - lr * g for (k, v), g in zip(p.items(), grads)}
    return p


def meta_loss(p: dict, batch: TaskBatch, steps: int, lr: float) -> float:
    losses = []
    for t in range(batch.num_tasks):
        q = sgd_adapt(p, batch.support_x[t], batch.support_y[t], steps, lr)
        losses.append(F.cross_entropy(forward(q, batch.query_x[t]), batch.query_y[t]))
    return float(torch.stack(losses).mean())


def flat_grad(algo) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in algo.parameters()])


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


# ---------------------------------------------------------------- MAML gradients


def test_reference_forward_matches_module():
    algo, batch = tiny_maml(), random_batch()
    p = params_of(algo)
    for t in range(TASKS):
        torch.testing.assert_close(forward(p, batch.support_x[t]), algo.net(batch.support_x[t]), rtol=1e-10, atol=1e-10)


def test_maml_second_order_gradient_matches_finite_differences():
    lr, steps = 0.4, 2
    algo, batch = tiny_maml(inner_lr=lr, inner_steps=steps), random_batch()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    grad = flat_grad(algo)
    assert metrics["loss"].shape == metrics["accuracy"].shape == (TASKS,)
    # the reported per-task losses are the query losses after adaptation
    assert math.isclose(float(metrics["loss"].mean()), meta_loss(p0, batch, steps, lr), rel_tol=1e-10)

    theta = torch.cat([v.flatten() for v in p0.values()])
    g = torch.Generator().manual_seed(4)
    eps = 1e-6
    directions = [torch.randn(theta.shape, generator=g, dtype=theta.dtype) for _ in range(3)]
    directions = [d / d.norm() for d in directions]
    for i in torch.randperm(theta.numel(), generator=g)[:6].tolist():
        e = torch.zeros_like(theta)
        e[i] = 1.0
        directions.append(e)
    # every parameter group gets at least one coordinate checked: last layer bias and first conv weight
    for i in (theta.numel() - 1, 0):
        e = torch.zeros_like(theta)
        e[i] = 1.0
        directions.append(e)
    fo = tiny_maml(inner_lr=lr, inner_steps=steps, first_order=True)
    fo.zero_grad(set_to_none=True)
    fo.meta_step(batch)
    fo_grad = flat_grad(fo)
    differs = 0
    for d in directions:
        plus = meta_loss(unflatten(theta + eps * d, p0), batch, steps, lr)
        minus = meta_loss(unflatten(theta - eps * d, p0), batch, steps, lr)
        fd = (plus - minus) / (2 * eps)
        analytic = float(grad @ d)
        assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (fd, analytic)
        differs += abs(float(fo_grad @ d) - fd) > 1e-4 * (1 + abs(fd))
    # the check can tell second order from first order
    assert differs >= len(directions) // 2


def test_maml_first_order_gradient_matches_hand_computation():
    lr, steps = 0.4, 2
    algo, batch = tiny_maml(inner_lr=lr, inner_steps=steps, first_order=True), random_batch()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    expected = {k: torch.zeros_like(v) for k, v in p0.items()}
    losses = []
    for t in range(TASKS):
        q = sgd_adapt(p0, batch.support_x[t], batch.support_y[t], steps, lr)
        leaves = {k: v.clone().requires_grad_() for k, v in q.items()}
        loss = F.cross_entropy(forward(leaves, batch.query_x[t]), batch.query_y[t])
        for k, gr in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            expected[k] += gr / TASKS
        losses.append(loss.item())
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-12, msg=name)
    torch.testing.assert_close(metrics["loss"], torch.tensor(losses, dtype=torch.float64), rtol=1e-10, atol=0)
    # meta_step accumulates into .grad (the engine zeroes it): a second call doubles it
    algo.meta_step(batch)
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[name], rtol=1e-8, atol=1e-12, msg=name)


def test_maml_zero_inner_steps_is_plain_gradient():
    algo, batch = tiny_maml(inner_steps=0), random_batch()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    leaves = {k: v.clone().requires_grad_() for k, v in p0.items()}
    loss = sum(F.cross_entropy(forward(leaves, batch.query_x[t]), batch.query_y[t]) for t in range(TASKS)) / TASKS
    for (name, p), gr in zip(algo.named_parameters(), torch.autograd.grad(loss, list(leaves.values()))):
        torch.testing.assert_close(p.grad, gr, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("no_grad", [False, True])
def test_maml_evaluate(no_grad):
    lr, steps = 0.4, 3
    algo, batch = tiny_maml(inner_lr=lr, test_inner_steps=steps), random_batch(tasks=3)
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    if no_grad:
        with torch.no_grad():
            out = algo.evaluate(batch)
    else:
        out = algo.evaluate(batch)
    assert set(out) >= {"loss", "accuracy"}
    assert out["loss"].shape == out["accuracy"].shape == (3,)
    assert not out["loss"].requires_grad and not out["accuracy"].requires_grad
    # parameters untouched, no gradient left behind
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]), name
        assert p.grad is None, name
    # per-task results equal adapting with test_inner_steps SGD steps by hand
    for t in range(3):
        q = sgd_adapt(p0, batch.support_x[t], batch.support_y[t], steps, lr)
        logits = forward(q, batch.query_x[t])
        assert math.isclose(float(out["loss"][t]), float(F.cross_entropy(logits, batch.query_y[t])), rel_tol=1e-9)
        assert math.isclose(float(out["accuracy"][t]), float((logits.argmax(1) == batch.query_y[t]).double().mean()), rel_tol=1e-6)
    # and evaluating a task alone gives the same
    alone = algo.evaluate(batch[1:2])
    torch.testing.assert_close(alone["loss"], out["loss"][1:2])


def test_maml_checks_ways():
    algo = tiny_maml()
    algo.check_episode(WAYS, 1, 1)
    with pytest.raises(ConfigError, match="way"):
        algo.check_episode(WAYS + 2, 1, 1)
    with pytest.raises(ConfigError):
        tiny_maml(inner_steps=-1)


# ---------------------------------------------------------------- ProtoNet


def test_prototype_logits_naive():
    g = torch.Generator().manual_seed(0)
    B, ways, shots, nq, feat = 3, 4, 3, 5, 7
    support = torch.randn(B, ways * shots, feat, generator=g, dtype=torch.float64)
    support_y = torch.stack([torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)] for _ in range(B)])
    query = torch.randn(B, nq, feat, generator=g, dtype=torch.float64)
    logits = proto_mod.prototype_logits(support, support_y, query, ways)
    assert logits.shape == (B, nq, ways)
    for b in range(B):
        for c in range(ways):
            members = [support[b, i] for i in range(ways * shots) if int(support_y[b, i]) == c]
            proto = sum(members) / len(members)
            for q in range(nq):
                d2 = sum((float(query[b, q, f]) - float(proto[f])) ** 2 for f in range(feat))
                assert math.isclose(float(logits[b, q, c]), -d2, rel_tol=1e-10, abs_tol=1e-12)


def test_prototype_logits_unequal_shots_and_gradient():
    g = torch.Generator().manual_seed(1)
    support = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    support_y = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    query = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    logits = proto_mod.prototype_logits(support, support_y, query, 2)
    means = torch.stack([support[0, [0, 4]].mean(0), support[0, [1, 2, 3]].mean(0)])
    torch.testing.assert_close(logits[0], -torch.cdist(query[0], means) ** 2)
    torch.autograd.gradcheck(lambda s, q: proto_mod.prototype_logits(s, support_y, q, 2), (support, query))
    logits.sum().backward()
    assert support.grad.abs().sum() > 0 and query.grad.abs().sum() > 0


def test_protonet_meta_step_and_evaluate():
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE))
    algo = proto_mod.build(proto_mod.Config(), backbone, ProblemInfo((1, SIZE, SIZE), WAYS, 10)).double()
    batch = random_batch(tasks=3)
    algo.zero_grad(set_to_none=True)
    m = algo.meta_step(batch)
    assert m["loss"].shape == m["accuracy"].shape == (3,)
    grads = {k: p.grad for k, p in algo.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for k, g in grads.items() if not zero_gradient(k))
    # the loss is the mean over tasks of the query cross-entropy of prototype logits (computed per task)
    expected = []
    for t in range(3):
        s, q = backbone(batch.support_x[t])[None], backbone(batch.query_x[t])[None]
        logits = proto_mod.prototype_logits(s, batch.support_y[t][None], q, WAYS)[0]
        expected.append(F.cross_entropy(logits, batch.query_y[t]))
    torch.testing.assert_close(m["loss"], torch.stack(expected).detach())
    before = params_of(algo)
    algo.zero_grad(set_to_none=True)
    e = algo.evaluate(batch)
    torch.testing.assert_close(e["loss"], m["loss"])
    assert all(p.grad is None for p in algo.parameters())
    assert all(torch.equal(p, before[k]) for k, p in algo.named_parameters())


# ---------------------------------------------------------------- engine pieces


def test_mean_ci95_known_vector():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    out = engine.mean_ci95(v)
    mean = 4.0
    std = math.sqrt(sum((x - mean) ** 2 for x in [1, 2, 3, 4, 10]) / 5)  # population std
    assert math.isclose(out["mean"], mean)
    assert math.isclose(out["std"], std)
    assert math.isclose(out["ci95"], 1.96 * std / math.sqrt(5))
    assert out["episodes"] == 5
    one = engine.mean_ci95(torch.tensor([0.7]))
    assert one["mean"] == pytest.approx(0.7) and one["ci95"] == 0.0 and one["episodes"] == 1


def test_engine_evaluate_fixed_episodes_and_restores_state():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(8 * 6, 1, SIZE, SIZE, generator=g) * 255).to(torch.uint8)
    store = ClassStore(images, torch.arange(8).repeat_interleave(6), [f"c{i}" for i in range(8)])
    algo = tiny_maml().float()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    a = engine.evaluate(algo, store, WAYS, 1, 2, episodes=10, batch_size=4, seed=5, device=torch.device("cpu"))
    assert a["accuracy"]["episodes"] == 10 and a["loss"]["episodes"] == 10
    assert algo.training
    assert all(torch.equal(p, p0[k]) and p.grad is None for k, p in algo.named_parameters())
    # the episodes are fixed by the seed, and the batch size does not change results
    for batch_size in (1, 3, 10, 32):
        b = engine.evaluate(algo, store, WAYS, 1, 2, episodes=10, batch_size=batch_size, seed=5, device=torch.device("cpu"))
        assert b["accuracy"] == pytest.approx(a["accuracy"], rel=1e-6) and b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    c = engine.evaluate(algo, store, WAYS, 1, 2, episodes=10, batch_size=4, seed=6, device=torch.device("cpu"))
    assert c["loss"]["mean"] != a["loss"]["mean"]


def test_algorithms_registered():
    assert algorithm_module("maml") is maml_mod and algorithm_module("protonet") is proto_mod


# ---------------------------------------------------------------- learning

# 5-way 1-shot glyphs with conv4-32 (the ``learning`` fixture of conftest.py).
# Measured on 2 CPU cores with seeds 0-5 (test accuracy over 200 fixed test episodes, before -> after):
#   protonet, 30 steps:          0.52-0.56 -> 0.77-0.79   (about 7 s)
#   maml, 60 steps, outer lr 1e-2: 0.45-0.50 -> 0.70-0.74 (about 15 s)
# Chance is 0.2; the thresholds leave about 0.1 of margin below the worst seed. The test runs maml for 40
# steps (CI time): seeds 0 and 1 on the first 100 of those episodes gave 0.44 -> 0.71 and 0.50 -> 0.66.
PROTONET_STEPS, PROTONET_MIN, PROTONET_GAIN = 30, 0.65, 0.15
MAML_STEPS, MAML_LR, MAML_MIN, MAML_GAIN = 40, 1e-2, 0.6, 0.12


def test_protonet_learns(learning):
    before, after, seconds = learning.run(learning.config("protonet", steps=PROTONET_STEPS))
    print(f"protonet 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= PROTONET_MIN
    assert after >= before + PROTONET_GAIN


def test_maml_learns(learning):
    cfg = learning.config({"name": "maml", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}, steps=MAML_STEPS, lr=MAML_LR)
    before, after, seconds = learning.run(cfg)
    print(f"maml 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= MAML_MIN
    assert after >= before + MAML_GAIN

