"""MAML++: meta-gradient against an independent computation, schedules, MAML equivalence, learning, the CLI.

As in test_algorithms_gradient_family.py, the network is written out here with
plain tensor ops (conv, per-set batch normalisation, ReLU, max-pool, linear)
and the MAML++ meta-loss (per-step rates, per-state BatchNorm parameters,
weighted query losses after every inner step) is re-computed by hand; the
meta-gradient of mamlpp.meta_step is compared with float64 central finite
differences of it. The MSL weights are compared with the authors' rule
written per epoch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import maml as maml_mod
from metalearn.algorithms import mamlpp as mamlpp_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
from plainops import params_of

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS = 8, 4, 2
NORMS = [f"net.0.norms.{i}.{p}" for i in range(LAYERS) for p in ("weight", "bias")]


# ---------------------------------------------------------------- helpers


def build(module, seed=0, backbone_norm="batch", **cfg):
    torch.manual_seed(seed)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS, norm=backbone_norm), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=WAYS, num_train_classes=10)
    return module.build(module.Config(**cfg), backbone, info).double()


def tiny(**cfg) -> mamlpp_mod.MAMLpp:
    """A float64 MAML++ whose per-step values all differ, so a mix-up of steps or parameters cannot pass."""
    algo = build(mamlpp_mod, **cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in algo.named_parameters():
            if "norms" in name:  # the backbone's norms (state 0) and every per-state copy
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.startswith("step_lrs."):
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
    return algo


def random_batch(seed=1, tasks=TASKS, dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(WAYS).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(SHOTS), labels(QUERIES)
    protos = torch.rand(tasks, WAYS, 1, SIZE, SIZE, generator=g, dtype=dtype)

    def images(y):
        base = protos[torch.arange(tasks)[:, None], y]
        return (0.6 * base + 0.4 * torch.rand(base.shape, generator=g, dtype=dtype)).clamp(0, 1)

    classes = torch.stack([torch.randperm(10, generator=g)[:WAYS] for _ in range(tasks)])
    return TaskBatch(images(sy), sy, images(qy), qy, classes)


def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """conv4 + linear head written out by hand: [n, C, H, W] -> logits [n, ways]."""
    for i in range(LAYERS):
        x = F.conv2d(x, p[f"net.0.convs.{i}.weight"], p[f"net.0.convs.{i}.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, batch statistics of this set
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * p[f"net.0.norms.{i}.weight"].view(1, -1, 1, 1) + p[f"net.0.norms.{i}.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(torch.clamp(x, min=0), 2)
    return x.flatten(1) @ p["net.1.weight"].T + p["net.1.bias"]


def key(name: str) -> str:
    """The ParameterDict key of a weight of the algorithm's ``net``: its name in the net, dots as dashes."""
    return name.removeprefix("net.").replace(".", "-")


def norms_at(p: dict, state: int, bnwb: bool) -> dict:
    """BatchNorm parameters at inner state ``state``: the backbone's at 0, then the per-state copies."""
    if not bnwb or state == 0:
        return {k: p[k] for k in NORMS}
    return {k: p[f"step_norms.{key(k)}"][state - 1] for k in NORMS}


def rate(p: dict, name: str, step: int, lslr: bool, inner_lr: float):
    return p[f"step_lrs.{key(name)}"][step] if lslr else inner_lr


def by_hand(p: dict, batch: TaskBatch, steps: int, v: list[float], lslr=True, bnwb=True, inner_lr=0.4,
            first_order=False, query_state: int | None = None):
    """The MAML++ meta-loss of each task, from all meta-parameters ``p`` (a dict of tensors).

    Returns per-task (weighted query losses after every inner step, final query logits). With
    first_order the inner gradients are constants (detached).
    """
    # the inner loop differentiates w.r.t. the weights: plain tensors (finite differences) become leaves
    weights = {k: t if t.requires_grad else t.detach().requires_grad_() for k, t in p.items()
               if k.startswith("net.") and not (bnwb and k in NORMS)}
    meta, logits = [], []
    with torch.enable_grad():
        for t in range(batch.num_tasks):
            w, total = dict(weights), 0.0
            for i in range(steps):
                loss = F.cross_entropy(forward({**w, **norms_at(p, i, bnwb)}, batch.support_x[t]), batch.support_y[t])
                grads = torch.autograd.grad(loss, list(w.values()), create_graph=not first_order)
                w = {k: w[k] - rate(p, k, i, lslr, inner_lr) * g for k, g in zip(w, grads)}
                if i < len(v) and v[i] > 0:
                    query = forward({**w, **norms_at(p, i + 1, bnwb)}, batch.query_x[t])
                    total = total + v[i] * F.cross_entropy(query, batch.query_y[t])
            meta.append(total)
            logits.append(forward({**w, **norms_at(p, steps, bnwb)}, batch.query_x[t]))
    return meta, logits


def leaves(p: dict) -> dict:
    return {k: v.clone().requires_grad_() for k, v in p.items()}


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def meta_grad(algo, batch) -> tuple[dict, dict]:
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    return {k: p.grad for k, p in algo.named_parameters()}, metrics


def dense(grads: dict, like: dict) -> torch.Tensor:
    """Flat gradient; a parameter with no gradient (None) counts as zeros."""
    return torch.cat([(grads[k] if grads[k] is not None else torch.zeros_like(v)).flatten() for k, v in like.items()])


def paper_msl_weights(n: int, epoch: int, anneal_epochs: int) -> np.ndarray:
    """The authors' per-epoch rule (get_per_step_loss_importance_vector) and its switch to the final loss."""
    if epoch >= anneal_epochs:
        return np.array([0.0] * (n - 1) + [1.0])
    w = np.ones(n) / n
    decay, floor = 1.0 / n / anneal_epochs, 0.03 / n
    for i in range(n - 1):
        w[i] = np.maximum(w[i] - epoch * decay, floor)
    w[-1] = np.minimum(w[-1] + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return w


# ---------------------------------------------------------------- schedules


def test_registered_and_config_checks():
    assert algorithm_module("mamlpp") is mamlpp_mod
    algo = tiny(inner_steps=3, test_inner_steps=3)
    algo.check_episode(WAYS, 1, 1)
    with pytest.raises(ConfigError, match="way"):
        algo.check_episode(WAYS + 2, 1, 1)
    with pytest.raises(ConfigError, match="algo.inner_steps"):
        build(mamlpp_mod, inner_steps=0)
    with pytest.raises(ConfigError, match="msl_anneal_steps"):
        build(mamlpp_mod, msl_anneal_steps=-1)
    with pytest.raises(ConfigError, match="first_order_steps"):
        build(mamlpp_mod, first_order_steps=-1)
    # learned per-step values exist for the training steps only
    for lslr, bnwb in [(True, False), (False, True), (True, True)]:
        with pytest.raises(ConfigError, match="algo.test_inner_steps=4 exceeds algo.inner_steps=3"):
            build(mamlpp_mod, inner_steps=3, test_inner_steps=4, lslr=lslr, bnwb=bnwb)
    build(mamlpp_mod, inner_steps=3, test_inner_steps=4, lslr=False, bnwb=False)  # nothing per step: any number
    with pytest.raises(ConfigError, match="algo.bnwb"):
        build(mamlpp_mod, backbone_norm="none")
    assert not any("norms" in k for k, _ in build(mamlpp_mod, backbone_norm="none", bnwb=False).named_parameters())


def test_meta_parameters():
    n, lr = 3, 0.25
    algo = build(mamlpp_mod, inner_steps=n, test_inner_steps=n, inner_lr=lr)
    net = {f"net.{k}": v for k, v in algo.net.named_parameters()}
    adapted = [k for k in net if k not in NORMS]
    assert algo.adapted_names == [k.removeprefix("net.") for k in adapted]
    assert list(algo.step_lrs) == [key(k) for k in adapted]  # one rate per tensor (not per norm: they are per state)
    for r in algo.step_lrs.values():
        assert r.shape == (n,) and torch.all(r == lr)
    assert list(algo.step_norms) == [key(k) for k in NORMS]
    for k in NORMS:  # states 1..n, each starting as the backbone's own (state 0)
        assert algo.step_norms[key(k)].shape == (n, *net[k].shape)
        assert torch.equal(algo.step_norms[key(k)], net[k].detach().expand(n, *net[k].shape))
    # the schedule is not state: it comes from the engine's step
    algo.begin_step(7, 10)
    assert list(algo.state_dict()) == [k for k, _ in algo.named_parameters()]
    off = build(mamlpp_mod, lslr=False, bnwb=False)
    assert [k for k, _ in off.named_parameters()] == list(net)
    assert off.adapted_names == [k.removeprefix("net.") for k in net]  # without BNWB the norms adapt, as in MAML


@pytest.mark.parametrize("n, anneal_epochs", [(5, 10), (3, 20), (1, 4)])
def test_msl_weights_follow_the_authors_rule(n, anneal_epochs):
    per_epoch = 500
    for epoch in [0, 1, 2, anneal_epochs // 2, anneal_epochs - 1, anneal_epochs, anneal_epochs + 3]:
        ours = mamlpp_mod.msl_weights(n, epoch * per_epoch, anneal_epochs * per_epoch)
        np.testing.assert_allclose(ours, paper_msl_weights(n, epoch, anneal_epochs), rtol=1e-12, atol=1e-15)
    for step in range(0, anneal_epochs * per_epoch + 10, 37):  # between epochs: the same rule, per meta-step
        w = mamlpp_mod.msl_weights(n, step, anneal_epochs * per_epoch)
        assert len(w) == n and abs(sum(w) - 1) < 1e-12 and min(w) >= 0 and w[-1] == max(w)
        np.testing.assert_allclose(w, paper_msl_weights(n, step / per_epoch, anneal_epochs), rtol=1e-12, atol=1e-15)
    # by hand: 5 steps, 10 epochs; uniform, then halfway, then at the floor 0.03/5, then the last step alone
    np.testing.assert_allclose(mamlpp_mod.msl_weights(5, 0, 5000), [0.2] * 5)
    np.testing.assert_allclose(mamlpp_mod.msl_weights(5, 2500, 5000), [0.1] * 4 + [0.6])
    np.testing.assert_allclose(mamlpp_mod.msl_weights(5, 4999, 5000), [0.006] * 4 + [0.976])
    assert mamlpp_mod.msl_weights(5, 5000, 5000) == [0.0] * 4 + [1.0]


def test_schedules_come_from_begin_step():
    algo = build(mamlpp_mod, inner_steps=4, test_inner_steps=4, msl_anneal_steps=100, first_order_steps=30)
    assert algo.current_step == 0 and not algo.second_order  # before any begin_step: step 0
    for step in [0, 29, 30, 64, 99, 100, 5000]:
        algo.begin_step(step, 6000)
        assert algo.second_order == (step >= 30)
        assert algo.loss_weights() == mamlpp_mod.msl_weights(4, step, 100)
    off = build(mamlpp_mod, inner_steps=4, test_inner_steps=4, msl=False, first_order_steps=0)
    off.begin_step(0, 10)
    assert off.loss_weights() == [0.0, 0.0, 0.0, 1.0] and off.second_order
    # meta_step does not advance the schedule: the same step twice gives the same gradient
    algo, batch = tiny(inner_steps=2, test_inner_steps=2, msl_anneal_steps=10, first_order_steps=5), random_batch()
    algo.begin_step(3, 10)
    g1, _ = meta_grad(algo, batch)
    g2, _ = meta_grad(algo, batch)
    assert algo.current_step == 3
    for k in g1:  # (first order: the backbone's norms, used only by the first support pass, get none)
        assert (g1[k] is None and g2[k] is None) or torch.equal(g1[k], g2[k]), k


# ---------------------------------------------------------------- gradients


def test_meta_gradient_matches_finite_differences():
    """All options on, second order, mid-anneal MSL weights: .grad against central differences of by_hand."""
    n = 3
    algo = tiny(inner_steps=n, test_inner_steps=n, msl_anneal_steps=10, first_order_steps=2)
    batch = random_batch()
    algo.begin_step(4, 100)
    v = mamlpp_mod.msl_weights(n, 4, 10)
    assert algo.second_order and len(set(v)) == 2 and v[0] > 0.1  # a genuine mix of the steps' losses
    p0 = params_of(algo)
    grads, metrics = meta_grad(algo, batch)
    # every meta-parameter gets a gradient: weights, the backbone's norms (state 0), rates, per-state norms
    for k, g in grads.items():
        assert g is not None and (g.abs().sum() > 0 or zero_gradient(k)), k

    meta, logits = by_hand(p0, batch, n, v)
    torch.testing.assert_close(metrics["meta_loss"], torch.stack(meta), rtol=1e-10, atol=0)
    final = torch.stack([F.cross_entropy(lg, y) for lg, y in zip(logits, batch.query_y)])
    torch.testing.assert_close(metrics["loss"], final, rtol=1e-10, atol=0)
    acc = torch.stack([(lg.argmax(1) == y).double().mean() for lg, y in zip(logits, batch.query_y)])
    torch.testing.assert_close(metrics["accuracy"].double(), acc)

    def meta_loss(theta: torch.Tensor) -> float:
        return float(sum(by_hand(unflatten(theta, p0), batch, n, v)[0]).detach()) / TASKS

    theta, grad = torch.cat([t.flatten() for t in p0.values()]), dense(grads, p0)
    offsets, i = {}, 0
    for k, t in p0.items():
        offsets[k] = i
        i += t.numel()
    # one coordinate of each per-step rate and each per-state norm copy, and the state-0 (backbone) norms
    first_lr = f"step_lrs.{key('net.0.convs.0.weight')}"
    coordinates = [offsets[first_lr] + s for s in range(n)]
    coordinates += [offsets[f"step_norms.{key(k)}"] + s * HIDDEN for k in NORMS[:2] for s in range(n)]
    coordinates += [offsets["net.0.norms.0.weight"], offsets["net.0.norms.1.bias"] + 1, offsets["step_lrs.1-bias"] + 2]
    g = torch.Generator().manual_seed(4)
    directions = [torch.randn(theta.shape, generator=g, dtype=theta.dtype) for _ in range(3)]
    directions = [d / d.norm() for d in directions]
    directions += [torch.nn.functional.one_hot(torch.tensor(c), theta.numel()).double() for c in coordinates]
    eps = 1e-6
    for d in directions:
        fd = (meta_loss(theta + eps * d) - meta_loss(theta - eps * d)) / (2 * eps)
        analytic = float(grad @ d)
        assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (fd, analytic)

    # before first_order_steps the same step is first order, which these differences tell apart
    algo.begin_step(1, 100)
    fo = dense(meta_grad(algo, batch)[0], p0)
    assert sum(abs(float(fo @ d) - float(grad @ d)) > 1e-4 * (1 + abs(float(grad @ d))) for d in directions) >= 3


def test_first_order_before_first_order_steps_matches_hand_computation():
    n = 3
    algo = tiny(inner_steps=n, test_inner_steps=n, msl_anneal_steps=10, first_order_steps=5)
    batch = random_batch()
    algo.begin_step(4, 100)
    assert not algo.second_order
    v = mamlpp_mod.msl_weights(n, 4, 10)
    p0 = params_of(algo)
    # by hand: inner gradients are constants, so theta gets the query gradients through the identity,
    # each rate -g . dL/dw, and each norm copy its query-pass gradient
    p = leaves(p0)
    with torch.enable_grad():
        meta, _ = by_hand(p, batch, n, v, first_order=True)
        expected = torch.autograd.grad(sum(meta) / TASKS, list(p.values()), allow_unused=True)
    grads, _ = meta_grad(algo, batch)
    for (name, e) in zip(p, expected):
        got = grads[name]
        if e is None:  # used only in support passes (state 0's norms): no first-order gradient
            assert got is None, name
        else:
            torch.testing.assert_close(got, e, rtol=1e-8, atol=1e-12, msg=name)
    assert grads["net.0.norms.0.weight"] is None and grads["step_lrs.0-convs-0-weight"].abs().sum() > 0


@pytest.mark.parametrize("order", ["second", "first"])
def test_with_everything_off_it_is_maml(order):
    """MSL/LSLR/BNWB off: exactly maml's meta-step (and evaluation), from the same initial weights."""
    steps, lr = 3, 0.3
    first = order == "first"
    ref = build(maml_mod, inner_lr=lr, inner_steps=steps, test_inner_steps=2, first_order=first, batched="loop")  # mamlpp loops over tasks
    ours = build(mamlpp_mod, inner_lr=lr, inner_steps=steps, test_inner_steps=2, msl=False, lslr=False, bnwb=False,
                 first_order_steps=10**9 if first else 0)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    batch = random_batch(tasks=3)
    for step in [0, 50]:
        ours.begin_step(step, 100)
        g_ref, m_ref = meta_grad(ref, batch)
        g_ours, m_ours = meta_grad(ours, batch)
        for k in g_ref:
            assert torch.equal(g_ref[k], g_ours[k]), k
        assert torch.equal(m_ref["loss"], m_ours["loss"]) and torch.equal(m_ref["accuracy"], m_ours["accuracy"])
    # MSL on but fully annealed is the final-step loss again
    annealed = build(mamlpp_mod, inner_lr=lr, inner_steps=steps, test_inner_steps=2, lslr=False, bnwb=False,
                     msl_anneal_steps=20, first_order_steps=10**9 if first else 0)
    annealed.begin_step(20, 100)
    for k, g in meta_grad(annealed, batch)[0].items():
        assert torch.equal(g_ref[k], g), k
    e_ref, e_ours = ref.evaluate(batch), ours.evaluate(batch)
    for k in e_ref:
        torch.testing.assert_close(e_ours[k], e_ref[k], rtol=1e-12, atol=0)


def test_evaluate_uses_the_learned_steps():
    """Fewer test steps than training steps: the first steps' rates, and the norms of the state reached."""
    n, test_steps = 3, 2
    algo, batch = tiny(inner_steps=n, test_inner_steps=test_steps), random_batch(tasks=3)
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = algo.evaluate(batch)
    assert out["loss"].shape == out["accuracy"].shape == (3,) and not out["loss"].requires_grad
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]) and p.grad is None, name
    _, logits = by_hand(p0, batch, test_steps, v=[])
    for t in range(3):
        torch.testing.assert_close(out["loss"][t], F.cross_entropy(logits[t], batch.query_y[t]), rtol=1e-10, atol=0)
        assert abs(float(out["accuracy"][t]) - float((logits[t].argmax(1) == batch.query_y[t]).double().mean())) < 1e-6
    torch.testing.assert_close(algo.evaluate(batch[1:2])["loss"], out["loss"][1:2])  # a task alone: the same
    # ... and not what the last state's norms would give
    wrong = {**p0, **{f"step_norms.{key(k)}": p0[f"step_norms.{key(k)}"].roll(1, 0) for k in NORMS}}
    _, other = by_hand(wrong, batch, test_steps, v=[])
    assert abs(float(F.cross_entropy(other[0], batch.query_y[0]).detach()) - float(out["loss"][0])) > 1e-6


# ---------------------------------------------------------------- learning

# The ``learning`` fixture of conftest.py: conv4-32 on glyphs, 5-way 1-shot, meta-batch 8, 200 fixed
# test episodes. Two inner steps (train and test) with everything on, over 20 meta-steps that cross both
# schedules: first order for 5 meta-steps, MSL annealed over 10; outer Adam 1e-2 with cosine annealing.
# Measured with seeds 0-5 (test accuracy before -> after; one thread):
#   0.37-0.46 -> 0.71-0.74 (worst gain 0.26, seed 1), 15-19 s of training and 30-42 s for the whole
#   run with its two evaluations, on a shared 2-core machine at load 5 (so roughly half that when quiet).
# Chance is 0.2; the thresholds leave about 0.1 of margin below the worst seed (accuracy and gain).
LEARNING_ALGO = {"name": "mamlpp", "inner_lr": 0.4, "inner_steps": 2, "test_inner_steps": 2,
                 "msl_anneal_steps": 10, "first_order_steps": 5}
LEARNING_STEPS, LEARNING_LR, LEARNING_MIN, LEARNING_GAIN = 20, 1e-2, 0.61, 0.16


def test_learns(learning):
    cfg = learning.config(LEARNING_ALGO, steps=LEARNING_STEPS, lr=LEARNING_LR, optim={"scheduler": "cosine"})
    before, after, seconds = learning.run(cfg)
    print(f"mamlpp 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= LEARNING_MIN
    assert after >= before + LEARNING_GAIN


# ---------------------------------------------------------------- the CLI

SCHEDULE = ["algo=mamlpp", "algo.inner_steps=2", "algo.test_inner_steps=2", "algo.first_order_steps=10",
            "algo.msl_anneal_steps=16", "optim.scheduler=cosine"]


@pytest.fixture(scope="module")
def cli_runs(cli, tmp_path_factory) -> dict:
    """A FAST run (20 steps; 5 validation episodes, the numbers do not matter) in one go, and the same run
    stopped at step 6 (first order, mid-MSL) and resumed."""
    cwd = tmp_path_factory.mktemp("mamlpp")
    fast = cli.with_overrides(cli.FAST, "trainer.val_episodes=5")
    whole, stopped = cwd / "whole", cwd / "stopped"
    procs = cli.run_many({
        "whole": (["train", *SCHEDULE, *fast, f"hydra.run.dir={whole}"], cwd),
        "stop": (["train", *SCHEDULE, *fast, "trainer.stop_at=6", f"hydra.run.dir={stopped}"], cwd),
    })
    assert procs["stop"].returncode == 0, cli.describe(procs["stop"])
    procs["resume"] = cli.run(["train", f"resume={stopped}"], cwd)
    return {"procs": procs, "whole": whole, "stopped": stopped}


def test_trains_through_the_cli(cli, cli_runs):
    proc, run_dir = cli_runs["procs"]["whole"], cli_runs["whole"]
    assert proc.returncode == 0, cli.describe(proc)
    accuracy = json.loads((run_dir / "results.json").read_text())["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 20
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["config"]["algo"]["name"] == "mamlpp"
    # the per-step rates and norms are meta-parameters: checkpointed, and trained away from their initial values
    model, inner_lr = ckpt["model"], ckpt["config"]["algo"]["inner_lr"]
    rates = {k: v for k, v in model.items() if k.startswith("step_lrs.")}
    norms = {k: v for k, v in model.items() if k.startswith("step_norms.")}
    assert len(rates) == 4 * 2 + 2 and all(v.shape == (2,) for v in rates.values())  # 4 convs (w, b) + head
    assert len(norms) == 4 * 2 and all(v.shape == (2, 16) for v in norms.values())
    # (conv biases are cancelled by the BatchNorm that follows: their support gradient, and so their rates', is ~0)
    assert all(not torch.all(v == inner_lr) for k, v in rates.items() if not ("convs" in k and k.endswith("bias")))
    assert all(not torch.equal(v[0], v[1]) for v in norms.values())  # each state learns its own
    assert any(not torch.all(v == 1) for k, v in norms.items() if k.endswith("weight"))


def test_resumed_run_follows_the_same_schedule(cli, cli_runs):
    """Stopped at step 6 and resumed: the DA switch (step 10) and MSL weights line up with the whole run."""
    proc = cli_runs["procs"]["resume"]
    assert proc.returncode == 0, cli.describe(proc)
    whole = torch.load(cli_runs["whole"] / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(cli_runs["stopped"] / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert resumed["step"] == whole["step"] == 20
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    a = json.loads((cli_runs["whole"] / "results.json").read_text())
    b = json.loads((cli_runs["stopped"] / "results.json").read_text())
    assert a["test"] == b["test"]


def test_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=mamlpp_omniglot_5w1s"]))
    assert cfg.algo.name == "mamlpp" and cfg.data.name == "omniglot" and (cfg.ways, cfg.shots) == (5, 1)
    assert (cfg.eval.ways, cfg.eval.shots, cfg.eval.queries) == (5, 1, 15)
    a = cfg.algo
    assert (a.inner_lr, a.inner_steps, a.test_inner_steps) == (0.1, 5, 5)
    assert a.msl and a.lslr and a.bnwb
    assert (a.first_order_steps, a.msl_anneal_steps, cfg.steps) == (50 * 500, 10 * 500, 150 * 500)
    assert (cfg.meta_batch_size, cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler) == (16, "adam", 1e-3, "cosine")
