"""Reptile, Meta-SGD and ANIL: updates against independent computations, learning, and the CLI.

As in test_algorithms.py, the checks use nothing of metalearn.algorithms but
the module under test: the network is written out here with plain tensor ops
(conv, per-set batch normalisation, ReLU, max-pool, linear) and adapted with
plain SGD. Meta-SGD's and ANIL's meta-gradients are compared with central
finite differences of that meta-loss; Reptile's update with the difference
to the mean of task weights trained by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from metalearn import engine
from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import anil as anil_mod
from metalearn.algorithms import metasgd as metasgd_mod
from metalearn.algorithms import reptile as reptile_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
from plainops import params_of

# ---------------------------------------------------------------- helpers

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS = 8, 4, 2


def tiny(module, **cfg):
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=WAYS, num_train_classes=10)
    algo = module.build(module.Config(**cfg), backbone, info).double()
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
    protos = torch.rand(tasks, ways, 1, size, size, generator=g, dtype=dtype)  # class-dependent images

    def images(y):
        base = protos[torch.arange(tasks)[:, None], y]
        return (0.6 * base + 0.4 * torch.rand(base.shape, generator=g, dtype=dtype)).clamp(0, 1)

    classes = torch.stack([torch.randperm(10, generator=g)[:ways] for _ in range(tasks)])
    return TaskBatch(images(sy), sy, images(qy), qy, classes)


def body(p: dict, x: torch.Tensor) -> torch.Tensor:
    """conv4 written out by hand: [n, C, H, W] -> features [n, F]."""
    for i in range(LAYERS):
        x = F.conv2d(x, p[f"net.0.convs.{i}.weight"], p[f"net.0.convs.{i}.bias"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, batch statistics of this set
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * p[f"net.0.norms.{i}.weight"].view(1, -1, 1, 1) + p[f"net.0.norms.{i}.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(torch.clamp(x, min=0), 2)
    return x.flatten(1)


def head(p: dict, f: torch.Tensor) -> torch.Tensor:
    return f @ p["net.1.weight"].T + p["net.1.bias"]


def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    return head(p, body(p, x))


def sgd_steps(p: dict, loss_of, steps: int, lr, names=None) -> dict:
    """Plain SGD on ``loss_of(params)`` for the parameters ``names`` (all by default); detached results.

    ``lr`` is a number or a dict of tensors keyed like ``p`` (element-wise rates).
    """
    p = {k: v.detach() for k, v in p.items()}
    names = list(p) if names is None else names
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_() if k in names else v for k, v in p.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(leaves), [leaves[k] for k in names])
        p = {**p, **{k: p[k] - (lr[k] if isinstance(lr, dict) else lr) * g for k, g in zip(names, grads)}}
    return p


def flat(d: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in d.values()])


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def unit(n: int, i: int) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[i] = 1.0
    return e


def check_against_finite_differences(meta_loss, theta: torch.Tensor, grad: torch.Tensor, fo_grad: torch.Tensor,
                                     coordinates: list[int]) -> int:
    """Directional derivatives of ``meta_loss`` (a function of the flat meta-parameters) against ``grad``.

    Random directions and the given coordinates; returns how many the first-order gradient gets wrong.
    """
    g = torch.Generator().manual_seed(4)
    directions = [torch.randn(theta.shape, generator=g, dtype=theta.dtype) for _ in range(3)]
    directions = [d / d.norm() for d in directions]
    directions += [unit(theta.numel(), i) for i in torch.randperm(theta.numel(), generator=g)[:6].tolist()]
    directions += [unit(theta.numel(), i) for i in coordinates]
    eps, differs = 1e-6, 0
    for d in directions:
        fd = (meta_loss(theta + eps * d) - meta_loss(theta - eps * d)) / (2 * eps)
        analytic = float(grad @ d)
        assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (fd, analytic)
        differs += abs(float(fo_grad @ d) - fd) > 1e-4 * (1 + abs(fd))
    return differs


def meta_grad(algo, batch) -> tuple[torch.Tensor, dict]:
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    return torch.cat([p.grad.flatten() for p in algo.parameters()]), metrics


def assert_evaluate_is_clean(algo, batch, p0: dict) -> dict:
    """evaluate(): per-task detached metrics, parameters untouched, no gradient left, even under no_grad."""
    algo.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = algo.evaluate(batch)
    assert out["loss"].shape == out["accuracy"].shape == (batch.num_tasks,)
    assert not out["loss"].requires_grad and not out["accuracy"].requires_grad
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]) and p.grad is None, name
    torch.testing.assert_close(algo.evaluate(batch[1:2])["loss"], out["loss"][1:2])  # a task alone: the same
    return out


def assert_scores(out: dict, t: int, logits: torch.Tensor, y: torch.Tensor) -> None:
    assert math.isclose(float(out["loss"][t]), float(F.cross_entropy(logits, y)), rel_tol=1e-9)
    assert math.isclose(float(out["accuracy"][t]), float((logits.argmax(1) == y).double().mean()), rel_tol=1e-6)


def test_algorithms_registered():
    assert algorithm_module("reptile") is reptile_mod
    assert algorithm_module("metasgd") is metasgd_mod
    assert algorithm_module("anil") is anil_mod


@pytest.mark.parametrize("module", [reptile_mod, metasgd_mod, anil_mod])
def test_config_checks(module):
    algo = tiny(module)
    algo.check_episode(WAYS, 1, 1)
    with pytest.raises(ConfigError, match="way"):
        algo.check_episode(WAYS + 2, 1, 1)
    with pytest.raises(ConfigError):
        tiny(module, inner_steps=-1)
    with pytest.raises(ConfigError):
        tiny(module, test_inner_steps=-1)
    if module is reptile_mod:
        with pytest.raises(ConfigError, match="inner_batch_size"):
            tiny(module, inner_batch_size=0)


# ---------------------------------------------------------------- Meta-SGD


def tiny_metasgd(**cfg) -> metasgd_mod.MetaSGD:
    algo = tiny(metasgd_mod, **cfg)
    # distinct rates per entry, so a mix-up of rates and parameters cannot pass
    with torch.no_grad():
        for lr in algo.inner_lrs:
            lr.mul_(0.5 + torch.rand_like(lr))
    return algo


def split_metasgd(p: dict) -> tuple[dict, dict]:
    """All meta-parameters -> (network weights, rates keyed by the weight they scale)."""
    weights = {k: v for k, v in p.items() if k.startswith("net.")}
    return weights, {k: p[f"inner_lrs.{i}"] for i, k in enumerate(weights)}


def metasgd_meta_loss(p: dict, batch: TaskBatch, steps: int) -> float:
    weights, rates = split_metasgd(p)
    losses = []
    for t in range(batch.num_tasks):
        q = sgd_steps(weights, lambda w: F.cross_entropy(forward(w, batch.support_x[t]), batch.support_y[t]), steps, rates)
        losses.append(F.cross_entropy(forward(q, batch.query_x[t]), batch.query_y[t]))
    return float(torch.stack(losses).mean())


def test_metasgd_rates_are_meta_parameters():
    algo = tiny_metasgd(inner_lr=0.3)
    names = [k for k, _ in algo.named_parameters()]
    weights = [k for k in names if k.startswith("net.")]
    assert names == weights + [f"inner_lrs.{i}" for i in range(len(weights))]
    for (k, w), lr in zip(algo.net.named_parameters(), algo.inner_lrs):
        assert lr.shape == w.shape, k
    assert set(algo.state_dict()) == set(names)  # checkpoints hold them
    fresh = metasgd_mod.build(metasgd_mod.Config(inner_lr=0.3), conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE)),
                              ProblemInfo((1, SIZE, SIZE), WAYS, 10))
    assert all(torch.all(lr == 0.3) for lr in fresh.inner_lrs)


def test_metasgd_second_order_gradient_matches_finite_differences():
    steps = 2
    algo, batch = tiny_metasgd(inner_steps=steps), random_batch()
    p0 = params_of(algo)
    grad, metrics = meta_grad(algo, batch)
    assert metrics["loss"].shape == metrics["accuracy"].shape == (TASKS,)
    assert math.isclose(float(metrics["loss"].mean()), metasgd_meta_loss(p0, batch, steps), rel_tol=1e-10)
    # the learned rates get a gradient, and not a trivial one
    rate_grads = [lr.grad for (k, _), lr in zip(algo.net.named_parameters(), algo.inner_lrs) if not zero_gradient(k)]
    assert all(g is not None and g.abs().sum() > 0 for g in rate_grads)

    fo = tiny_metasgd(inner_steps=steps, first_order=True)
    fo_grad, _ = meta_grad(fo, batch)
    theta = flat(p0)
    n_weights = sum(v.numel() for k, v in p0.items() if k.startswith("net."))
    # first conv weight, last bias, and the rates of both (the rates start at n_weights)
    coords = [0, n_weights - 1, n_weights, theta.numel() - 1, n_weights + 7]
    differs = check_against_finite_differences(lambda v: metasgd_meta_loss(unflatten(v, p0), batch, steps),
                                               theta, grad, fo_grad, coords)
    assert differs >= 4  # the check can tell second order from first order


def test_metasgd_first_order_gradient_matches_hand_computation():
    algo, batch = tiny_metasgd(inner_steps=1, first_order=True), random_batch()
    p0 = params_of(algo)
    weights, rates = split_metasgd(p0)
    expected = {k: torch.zeros_like(v) for k, v in p0.items()}
    lr_name = {k: f"inner_lrs.{i}" for i, k in enumerate(weights)}
    for t in range(TASKS):
        leaves = {k: v.clone().requires_grad_() for k, v in weights.items()}
        g_s = torch.autograd.grad(F.cross_entropy(forward(leaves, batch.support_x[t]), batch.support_y[t]), list(leaves.values()))
        q = {k: (v - rates[k] * g).detach().requires_grad_() for (k, v), g in zip(weights.items(), g_s)}
        g_q = torch.autograd.grad(F.cross_entropy(forward(q, batch.query_x[t]), batch.query_y[t]), list(q.values()))
        for (k, gs), gq in zip(zip(weights, g_s), g_q):
            expected[k] += gq / TASKS  # first order: d theta' / d theta taken as the identity
            expected[lr_name[k]] += -gs * gq / TASKS  # theta' = theta - alpha * g_s is linear in alpha: exact
    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-12, msg=name)


def test_metasgd_evaluate_uses_the_learned_rates():
    steps = 2
    algo, batch = tiny_metasgd(test_inner_steps=steps), random_batch(tasks=3)
    p0 = params_of(algo)
    out = assert_evaluate_is_clean(algo, batch, p0)
    weights, rates = split_metasgd(p0)
    for t in range(3):
        q = sgd_steps(weights, lambda w: F.cross_entropy(forward(w, batch.support_x[t]), batch.support_y[t]), steps, rates)
        assert_scores(out, t, forward(q, batch.query_x[t]), batch.query_y[t])


# ---------------------------------------------------------------- ANIL

HEAD = ["net.1.weight", "net.1.bias"]


def anil_adapt(p: dict, x, y, steps: int, lr: float) -> dict:
    """Head-only SGD: the body's weights are not touched."""
    return sgd_steps(p, lambda w: F.cross_entropy(forward(w, x), y), steps, lr, names=HEAD)


def anil_meta_loss(p: dict, batch: TaskBatch, steps: int, lr: float) -> float:
    losses = []
    for t in range(batch.num_tasks):
        q = anil_adapt(p, batch.support_x[t], batch.support_y[t], steps, lr)
        losses.append(F.cross_entropy(forward(q, batch.query_x[t]), batch.query_y[t]))
    return float(torch.stack(losses).mean())


def test_anil_second_order_gradient_matches_finite_differences():
    lr, steps = 0.4, 2
    algo, batch = tiny(anil_mod, inner_lr=lr, inner_steps=steps), random_batch()
    p0 = params_of(algo)
    grad, metrics = meta_grad(algo, batch)
    assert metrics["loss"].shape == metrics["accuracy"].shape == (TASKS,)
    assert math.isclose(float(metrics["loss"].mean()), anil_meta_loss(p0, batch, steps, lr), rel_tol=1e-10)
    assert all(p.grad.abs().sum() > 0 for k, p in algo.named_parameters() if not zero_gradient(k))  # the body too

    fo = tiny(anil_mod, inner_lr=lr, inner_steps=steps, first_order=True)
    fo_grad, _ = meta_grad(fo, batch)
    theta = flat(p0)
    differs = check_against_finite_differences(lambda v: anil_meta_loss(unflatten(v, p0), batch, steps, lr),
                                               theta, grad, fo_grad, [0, 5, theta.numel() - 1])
    assert differs >= 4  # the check can tell second order from first order


def test_anil_first_order_gradient_matches_hand_computation():
    lr, steps = 0.4, 2
    algo, batch = tiny(anil_mod, inner_lr=lr, inner_steps=steps, first_order=True), random_batch()
    p0 = params_of(algo)
    expected = {k: torch.zeros_like(v) for k, v in p0.items()}
    for t in range(TASKS):
        adapted = anil_adapt(p0, batch.support_x[t], batch.support_y[t], steps, lr)
        # first order: the adapted head is its initial value plus a constant; the body as it is
        leaves = {k: v.clone().requires_grad_() for k, v in p0.items()}
        shifted = {k: leaves[k] + (adapted[k] - p0[k]) if k in HEAD else leaves[k] for k in leaves}
        loss = F.cross_entropy(forward(shifted, batch.query_x[t]), batch.query_y[t])
        for k, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            expected[k] += g / TASKS
    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-12, msg=name)


def test_anil_evaluate_adapts_the_head_only():
    lr, steps = 0.4, 3
    algo, batch = tiny(anil_mod, inner_lr=lr, test_inner_steps=steps), random_batch(tasks=3)
    p0 = params_of(algo)
    out = assert_evaluate_is_clean(algo, batch, p0)
    for t in range(3):
        q = anil_adapt(p0, batch.support_x[t], batch.support_y[t], steps, lr)
        assert_scores(out, t, forward(q, batch.query_x[t]), batch.query_y[t])
    # ... which is not what adapting everything (MAML) gives
    q_all = sgd_steps(p0, lambda w: F.cross_entropy(forward(w, batch.support_x[0]), batch.support_y[0]), steps, lr)
    assert abs(float(F.cross_entropy(forward(q_all, batch.query_x[0]), batch.query_y[0])) - float(out["loss"][0])) > 1e-6


# ---------------------------------------------------------------- Reptile


def reptile_by_hand(p0: dict, batch: TaskBatch, steps: int, lr: float, batch_size: int | None, seed: int):
    """Each task: SGD on minibatches of support + query (passes in torch.randperm orders), from ``p0``.

    Returns the mean adapted weights and each task's query loss at its adapted weights.
    """
    torch.manual_seed(seed)
    mean, losses = {k: torch.zeros_like(v) for k, v in p0.items()}, []
    for t in range(batch.num_tasks):
        x = torch.cat([batch.support_x[t], batch.query_x[t]])
        y = torch.cat([batch.support_y[t], batch.query_y[t]])
        n = len(y)
        size = batch_size or n
        order = []
        while len(order) < steps * size:
            order += torch.randperm(n).tolist()
        q = dict(p0)
        for s in range(steps):
            idx = order[s * size : (s + 1) * size]
            q = sgd_steps(q, lambda w: F.cross_entropy(forward(w, x[idx]), y[idx]), 1, lr)
        for k in mean:
            mean[k] += q[k] / batch.num_tasks
        losses.append(float(F.cross_entropy(forward(q, batch.query_x[t]), batch.query_y[t])))
    return mean, losses


@pytest.mark.parametrize("batch_size, steps", [(4, 6), (None, 3)])
def test_reptile_grad_is_theta_minus_mean_adapted(batch_size, steps, learning):
    # 15 examples per task in batches of 4 for 6 steps: the second pass starts within the 4th batch
    lr = 0.3
    algo = tiny(reptile_mod, inner_lr=lr, inner_steps=steps, inner_batch_size=batch_size)
    batch = random_batch()
    p0 = params_of(algo)
    mean, losses = reptile_by_hand(p0, batch, steps, lr, batch_size, seed=7)
    torch.manual_seed(7)
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, p0[name] - mean[name], rtol=1e-8, atol=1e-12, msg=name)
        assert torch.equal(p, p0[name]), name  # meta_step leaves the weights to the optimizer
        assert p.grad.abs().sum() > 0 or zero_gradient(name), name
    torch.testing.assert_close(metrics["loss"], torch.tensor(losses, dtype=torch.float64), rtol=1e-9, atol=0)
    assert metrics["accuracy"].shape == (TASKS,)
    # .grad accumulates like a gradient (the engine zeroes it): the same step again doubles it
    torch.manual_seed(7)
    algo.meta_step(batch)
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, 2 * (p0[name] - mean[name]), rtol=1e-8, atol=1e-12, msg=name)

    # outer SGD with lr 1 (the paper's epsilon = 1, no momentum) lands on the mean of the adapted weights
    cfg = learning.config("reptile", steps=1, lr=1.0, optim={"name": "sgd", "momentum": 0.0})
    optimizer, _ = engine.build_optimizer(cfg, algo.parameters())
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    algo.meta_step(batch)
    optimizer.step()
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.detach(), mean[name], rtol=1e-8, atol=1e-12, msg=name)


def test_reptile_minibatches_cover_each_pass():
    torch.manual_seed(0)
    batches = reptile_mod.minibatches(10, 4, 5, torch.device("cpu"))
    assert [len(b) for b in batches] == [4] * 5
    order = torch.cat(batches).tolist()
    assert sorted(order[:10]) == list(range(10))  # one pass: every example once
    assert len(set(order[10:])) == 10 and reptile_mod.minibatches(10, 4, 0, torch.device("cpu")) == []


def test_reptile_evaluate_fine_tunes_on_the_support_set():
    lr, steps = 0.3, 4
    algo, batch = tiny(reptile_mod, inner_lr=lr, test_inner_steps=steps), random_batch(tasks=3)
    p0 = params_of(algo)
    out = assert_evaluate_is_clean(algo, batch, p0)
    for t in range(3):
        q = sgd_steps(p0, lambda w: F.cross_entropy(forward(w, batch.support_x[t]), batch.support_y[t]), steps, lr)
        assert_scores(out, t, forward(q, batch.query_x[t]), batch.query_y[t])


# ---------------------------------------------------------------- learning

# The set-up of test_algorithms.py's learning tests (the ``learning`` fixture of conftest.py).
# Measured with seeds 0-5 (test accuracy over 200 fixed test episodes, before -> after; one thread,
# seconds of the whole test on a quiet machine):
#   reptile, 40 steps, outer SGD lr 1 (the paper's rule), inner lr 0.4: 0.45-0.50 -> 0.68-0.70 (about 20 s)
#   metasgd, 40 steps, outer Adam 1e-2:                                0.25-0.29 -> 0.64-0.69 (about 15 s)
#   anil, 60 steps, outer Adam 1e-2:                                   0.34-0.41 -> 0.58-0.66 (about 10 s)
# Chance is 0.2; the thresholds leave about 0.1 of margin below the worst seed (accuracy and gain).
# reptile runs 25 steps here (CI time; its task loop makes a step about 3x MAML's): seeds 0 and 1 on the
# first 100 of those episodes gave 0.44 -> 0.66 and 0.50 -> 0.70.
LEARNING = {
    "reptile": dict(algo={"name": "reptile", "inner_lr": 0.4, "inner_steps": 5, "inner_batch_size": 10, "test_inner_steps": 3},
                    steps=25, lr=1.0, optim={"name": "sgd", "momentum": 0.0}, min=0.57, gain=0.08),
    "metasgd": dict(algo={"name": "metasgd", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 1},
                    steps=40, lr=1e-2, min=0.54, gain=0.26),
    "anil": dict(algo={"name": "anil", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3},
                 steps=60, lr=1e-2, min=0.47, gain=0.12),
}


@pytest.mark.parametrize("name", list(LEARNING))
def test_learns(name, learning):
    setting = LEARNING[name]
    cfg = learning.config(setting["algo"], steps=setting["steps"], lr=setting["lr"], optim=setting.get("optim"))
    before, after, seconds = learning.run(cfg)
    print(f"{name} 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= setting["min"]
    assert after >= before + setting["gain"]


# ---------------------------------------------------------------- the CLI

NEW = ["reptile", "metasgd", "anil"]


@pytest.fixture(scope="module")
def cli_runs(cli, tmp_path_factory) -> dict:
    """One TINY training run per new algorithm through ``metalearn train``, run side by side."""
    cwd = tmp_path_factory.mktemp("gradient_family")
    jobs = {name: (["train", f"algo={name}", *cli.TINY, f"hydra.run.dir={cwd / name}"], cwd) for name in NEW}
    return {name: (proc, cwd / name) for name, proc in cli.run_many(jobs).items()}


@pytest.mark.parametrize("name", NEW)
def test_trains_through_the_cli(name, cli, cli_runs):
    proc, run_dir = cli_runs[name]
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((run_dir / "results.json").read_text())
    accuracy = results["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["name"] == name
    if name == "metasgd":  # the learned rates are meta-parameters: checkpointed and trained
        rates = [v for k, v in ckpt["model"].items() if k.startswith("inner_lrs.")]
        assert rates and any(not torch.all(r == ckpt["config"]["algo"]["inner_lr"]) for r in rates)


@pytest.mark.slow
def test_sweep_over_every_algorithm(cli, tmp_path):
    """``metalearn train -m algo=<every registered algorithm>``: one sweep, the same engine loop for all."""
    from metalearn.algorithms import ALGORITHMS

    sweep = tmp_path / "sweep"
    # metanet needs backbone.norm=none (each example has its own fast weights, so per-set BatchNorm does not
    # apply), mamlpp's default BNWB needs the norms, and a sweep cannot set a key for one of its options:
    # metanet runs through the CLI in its own test (test_algo_metanet.py); maml_rl learns reinforcement tasks only
    # (test_rl_navigation.py).
    from metalearn.engine import _algorithm_tasks

    names = [name for name in ALGORITHMS if name != "metanet" and "classification" in _algorithm_tasks(name)]
    proc = cli.run(["train", "-m", f"algo={','.join(names)}", *cli.TINY, f"hydra.sweep.dir={sweep}"], tmp_path,
                   timeout=900)
    assert proc.returncode == 0, cli.describe(proc)
    jobs = [f"{i}_algo={name}" for i, name in enumerate(names)]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(jobs)
    for job, name in zip(jobs, names):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["test"]["accuracy"]["episodes"] == 4, job
        ckpt = torch.load(sweep / job / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
        assert ckpt["config"]["algo"]["name"] == name


@pytest.mark.parametrize("name", NEW)
def test_preset_is_a_valid_config(name):
    from hydra import compose
    from metalearn import confdir

    ways = 20 if name == "anil" else 5  # ANIL's Omniglot results are 20-way only
    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=[f"experiment={name}_omniglot_{ways}w1s"]))
    assert cfg.algo.name == name and cfg.data.name == "omniglot" and (cfg.ways, cfg.shots) == (ways, 1)
    assert (cfg.eval.ways, cfg.eval.shots, cfg.eval.queries) == (ways, 1, 15)
    if name == "reptile":  # the paper's outer update: SGD without momentum on theta - mean(adapted)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.scheduler) == ("sgd", 1.0, 0.0, "linear")
