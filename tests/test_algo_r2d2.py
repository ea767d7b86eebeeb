"""R2-D2: the closed-form ridge head against the primal normal equations, gradients, evaluation,
episode shapes, learning, the CLI and the preset.

The module solves the n x n (Woodbury) system; the checks here use the primal
(F+1) x (F+1) normal equations (X^T X + n lambda I) W = X^T Y, with the network
written out with plain tensor ops (conv, per-set batch normalisation, ReLU,
max-pool), and float64 central finite differences of that independent meta-loss
for the gradients of every meta-parameter: backbone, scale, bias, log lambda.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import r2d2 as r2d2_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
import plainops
from plainops import params_of

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS = 8, 4, 2  # 16 features: n = 6 support examples < F + 1 (the Woodbury branch)


# ---------------------------------------------------------------- helpers


def tiny(ways=WAYS, **cfg) -> r2d2_mod.R2D2:
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=ways, num_train_classes=10)
    cfg = {"init_lambda": 0.7, "init_scale": 2.5, "init_bias": 0.3, **cfg}  # non-trivial values everywhere
    algo = r2d2_mod.build(r2d2_mod.Config(**cfg), backbone, info).double()
    with torch.no_grad():
        for name, p in algo.named_parameters():
            if "norms" in name:
                p.add_(0.3 * torch.randn_like(p))
    return algo


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES) -> TaskBatch:
    return plainops.random_batch(seed, tasks, ways, shots, queries, SIZE)


def body(p: dict, x: torch.Tensor) -> torch.Tensor:
    return plainops.conv4_body(p, x, LAYERS)


def primal_ridge(xs: torch.Tensor, ys: torch.Tensor, ways: int, lam) -> torch.Tensor:
    """W [F+1, ways] from the primal normal equations (X^T X + n lam I) W = X^T Y, X = [xs, 1]."""
    X = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
    Y = F.one_hot(ys, ways).to(xs.dtype)
    return torch.linalg.solve(X.T @ X + len(xs) * lam * torch.eye(X.shape[1], dtype=xs.dtype), X.T @ Y)


def logits_by_hand(p: dict, batch: TaskBatch, t: int, lam=None) -> torch.Tensor:
    lam = p["log_lambda"].exp() if lam is None else lam
    W = primal_ridge(body(p, batch.support_x[t]), batch.support_y[t], batch.ways, lam)
    xq = body(p, batch.query_x[t])
    return p["scale"] * (torch.cat([xq, torch.ones(len(xq), 1, dtype=xq.dtype)], 1) @ W) + p["bias"]


def meta_loss_by_hand(p: dict, batch: TaskBatch) -> torch.Tensor:
    return torch.stack([F.cross_entropy(logits_by_hand(p, batch, t), batch.query_y[t]) for t in range(batch.num_tasks)]).mean()


def flat(d: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in d.values()])


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


# ---------------------------------------------------------------- the head


@pytest.mark.parametrize("n, features", [(6, 16), (12, 4), (5, 4)])  # Woodbury (n <= F+1), primal, equal
def test_ridge_solution_matches_primal_normal_equations(n, features):
    g = torch.Generator().manual_seed(n)
    ways, tasks, lam = 3, 3, 0.37
    xs = torch.randn(tasks, n, features, generator=g, dtype=torch.float64)
    xq = torch.randn(tasks, 7, features, generator=g, dtype=torch.float64)
    ys = torch.stack([torch.arange(n) % ways for _ in range(tasks)])
    out = r2d2_mod.ridge_logits(xs, ys, xq, ways, torch.tensor(lam, dtype=torch.float64))
    for t in range(tasks):
        W = primal_ridge(xs[t], ys[t], ways, lam)
        expected = torch.cat([xq[t], torch.ones(7, 1, dtype=torch.float64)], 1) @ W
        torch.testing.assert_close(out[t], expected, rtol=1e-10, atol=1e-10)
        # and W is the minimiser of ||XW - Y||^2 / n + lam ||W||^2: its gradient vanishes
        X = torch.cat([xs[t], torch.ones(n, 1, dtype=torch.float64)], 1)
        grad = 2 * X.T @ (X @ W - F.one_hot(ys[t], ways).double()) / n + 2 * lam * W
        assert grad.abs().max() < 1e-10


def test_lambda_is_positive_and_learned_in_log_space():
    algo = tiny(init_lambda=3.0)
    assert math.isclose(float(algo.ridge_lambda().detach()), 3.0, rel_tol=1e-6)  # log(3) stored in float32
    with torch.no_grad():
        algo.log_lambda.fill_(-50.0)  # whatever the optimizer does, lambda stays > 0
    assert float(algo.ridge_lambda().detach()) > 0
    fixed = tiny(learn_lambda=False)
    fixed.meta_step(random_batch())
    assert fixed.log_lambda.grad is None and not fixed.log_lambda.requires_grad


def test_config_checks_and_any_episode_shape():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="init_lambda"):
            tiny(init_lambda=bad)
    algo = tiny()
    for ways, shots, queries in [(WAYS, 1, 1), (7, 3, 2), (2, 10, 1), (40, 1, 5)]:
        algo.check_episode(ways, shots, queries)  # the head has no fixed size


# ---------------------------------------------------------------- meta-gradient and evaluation


def test_meta_step_loss_and_gradient_match_finite_differences():
    algo, batch = tiny(), random_batch()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    assert metrics["loss"].shape == metrics["accuracy"].shape == (TASKS,)
    assert math.isclose(float(metrics["loss"].mean()), float(meta_loss_by_hand(p0, batch)), rel_tol=1e-10)
    for name, p in algo.named_parameters():  # every meta-parameter gets a gradient, the head's scalars too
        assert p.grad is not None and (p.grad.abs().sum() > 0 or zero_gradient(name)), name
    grad = torch.cat([p.grad.flatten() for p in algo.parameters()])

    theta = flat(p0)
    g = torch.Generator().manual_seed(4)
    names = list(p0)
    scalars = [sum(p0[k].numel() for k in names[: names.index(s)]) for s in ("scale", "bias", "log_lambda")]
    directions = [torch.randn(theta.shape, generator=g, dtype=theta.dtype) for _ in range(3)]
    directions = [d / d.norm() for d in directions]
    for i in scalars + [0, theta.numel() - 4] + torch.randperm(theta.numel(), generator=g)[:5].tolist():
        directions.append(torch.zeros_like(theta).index_fill_(0, torch.tensor([i]), 1.0))
    eps = 1e-6
    for d in directions:
        fd = (float(meta_loss_by_hand(unflatten(theta + eps * d, p0), batch))
              - float(meta_loss_by_hand(unflatten(theta - eps * d, p0), batch))) / (2 * eps)
        assert abs(fd - float(grad @ d)) <= 1e-6 * (1 + abs(fd)), (fd, float(grad @ d))


def assert_evaluate_is_clean(algo, batch) -> dict:
    """Per-task detached metrics, parameters untouched, no gradient left; a task alone scores the same."""
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    out = algo.evaluate(batch)
    assert out["loss"].shape == out["accuracy"].shape == (batch.num_tasks,)
    assert not out["loss"].requires_grad and not out["accuracy"].requires_grad
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]) and p.grad is None, name
    for t in range(batch.num_tasks):
        alone = algo.evaluate(batch[t : t + 1])
        torch.testing.assert_close(alone["loss"], out["loss"][t : t + 1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(alone["accuracy"], out["accuracy"][t : t + 1])
    return out


@pytest.mark.parametrize("ways, shots", [(WAYS, SHOTS), (5, 3), (2, 1)])  # incl. ways != the training ways
def test_evaluate_scores_each_task_with_its_own_ridge_head(ways, shots):
    algo = tiny()  # built for 3-way training
    batch = random_batch(seed=5, tasks=3, ways=ways, shots=shots, queries=2)
    out = assert_evaluate_is_clean(algo, batch)
    p0 = params_of(algo)
    for t in range(3):
        logits = logits_by_hand(p0, batch, t)
        assert logits.shape == (2 * ways, ways)
        assert math.isclose(float(out["loss"][t]), float(F.cross_entropy(logits, batch.query_y[t])), rel_tol=1e-9)
        assert math.isclose(float(out["accuracy"][t]), float((logits.argmax(1) == batch.query_y[t]).double().mean()), rel_tol=1e-6)


def test_meta_step_runs_on_other_episode_shapes():
    algo = tiny()
    for ways, shots in [(5, 3), (2, 4)]:
        batch = random_batch(seed=ways, ways=ways, shots=shots, queries=2)
        algo.zero_grad(set_to_none=True)
        metrics = algo.meta_step(batch)
        assert math.isclose(float(metrics["loss"].mean()), float(meta_loss_by_hand(params_of(algo), batch)), rel_tol=1e-10)


# ---------------------------------------------------------------- learning, the CLI, the preset

# The ``learning`` fixture of conftest.py: conv4-32 on glyphs, 5-way 1-shot, meta-batch 8, Adam.
# Measured with seeds 0-5 (test accuracy over 200 fixed test episodes, before -> after; one thread,
# on a busy shared 2-core machine, so the times are rough):
#   r2d2, 30 steps, Adam 1e-2: 0.37-0.44 -> 0.749-0.776 (worst gain 0.31; 10-28 s a seed, evaluations included)
# Chance is 0.2; the thresholds leave about 0.1 of margin below the worst seed (accuracy and gain).


def test_learns(learning):
    cfg = learning.config({"name": "r2d2"}, steps=30, lr=1e-2)
    before, after, seconds = learning.run(cfg)
    print(f"r2d2 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.65
    assert after >= before + 0.21


def test_trains_through_the_cli(cli, tmp_path):
    # evaluated on 3-way 2-shot episodes after 5-way 1-shot training: the head has no fixed size
    run_dir = tmp_path / "run"
    args = ["train", "algo=r2d2", *cli.TINY, "eval.ways=3", "eval.shots=2", f"hydra.run.dir={run_dir}"]
    proc = cli.run_many({"r2d2": (args, tmp_path)})["r2d2"]
    assert proc.returncode == 0, cli.describe(proc)
    accuracy = json.loads((run_dir / "results.json").read_text())["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["name"] == "r2d2"
    # lambda, scale and bias are checkpointed meta-parameters, and they were trained
    assert float(ckpt["model"]["log_lambda"]) != pytest.approx(math.log(50.0), abs=1e-7)
    assert float(ckpt["model"]["scale"]) != pytest.approx(10.0, abs=1e-7)


def test_registered_and_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    assert algorithm_module("r2d2") is r2d2_mod
    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=r2d2_omniglot_5w1s"]))
    assert cfg.algo.name == "r2d2" and cfg.data.name == "omniglot"
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size) == (60, 1, 9, 1)  # 600 images an episode
    assert (cfg.eval.ways, cfg.eval.shots, cfg.eval.queries) == (5, 1, 15)
    assert (cfg.algo.init_lambda, cfg.algo.learn_lambda, cfg.algo.init_scale) == (50.0, True, 10.0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler, cfg.optim.decay_every, cfg.optim.decay_gamma) == (
        "adam", 0.005, "step", 2000, 0.5)
