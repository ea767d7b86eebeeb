"""MetaOptNet-SVM: the solver reaches the SVM optimum, implicit gradients, evaluation, episode shapes,
learning, the CLI and the preset.

The optimum is checked without trusting the solver: the Crammer-Singer primal
objective is written out here (on features augmented with sqrt(ridge) e_i, the
SVM whose dual the module solves) and its duality gap with the module's dual
solution must vanish; the solution is also compared with a slow projected-
gradient solver written here (a different simplex projection, Michelot's).
Gradients (implicit differentiation of the KKT conditions) are compared with
float64 central finite differences of the same loss. Forward values are
compared with the network written out with plain tensor ops and the slow solver.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import metaoptnet_svm as svm_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
import plainops
from plainops import params_of

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS = 8, 4, 2  # 16 features


# ---------------------------------------------------------------- helpers: an independent SVM


def crammer_singer_gap(X: torch.Tensor, y: torch.Tensor, ways: int, alpha: torch.Tensor, C: float, ridge: float) -> float:
    """Primal minus dual objective of the Crammer-Singer SVM at W = X~^T alpha, X~ = [X, sqrt(ridge) I].

    Primal: 1/2 ||W||^2 + C sum_i max_m (1[m != y_i] + <w_m - w_{y_i}, x~_i>);  dual: sum_i alpha[i, y_i] - 1/2 ||W||^2.
    Both bound the optimum from either side, so a zero gap proves alpha optimal (if it is feasible).
    """
    n = len(y)
    Xt = torch.cat([X, math.sqrt(ridge) * torch.eye(n, dtype=X.dtype)], 1)
    W = Xt.T @ alpha
    Y = F.one_hot(y, ways).to(X.dtype)
    s = Xt @ W
    margins = (1 - Y) + s - (s * Y).sum(1, keepdim=True)
    primal = 0.5 * (W**2).sum() + C * margins.max(1).values.sum()
    dual = (alpha * Y).sum() - 0.5 * (W**2).sum()
    return float(primal - dual)


def assert_feasible(alpha: torch.Tensor, y: torch.Tensor, ways: int, C: float, tol: float = 1e-12) -> None:
    Y = F.one_hot(y, ways).to(alpha.dtype)
    assert (alpha <= C * Y + tol).all()  # alpha[i, m] <= C [m = y_i]
    assert alpha.sum(-1).abs().max() <= tol  # sum_m alpha[i, m] = 0


def michelot(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Projection of each row onto {b >= 0, sum b = radius} by Michelot's (1986) elimination."""
    keep = torch.ones_like(v, dtype=torch.bool)
    for _ in range(v.shape[-1]):
        theta = ((v * keep).sum(-1, keepdim=True) - radius) / keep.sum(-1, keepdim=True)
        keep = keep & (v > theta)
    theta = ((v * keep).sum(-1, keepdim=True) - radius) / keep.sum(-1, keepdim=True)
    return (v - theta).clamp_min(0)


def slow_dual(X: torch.Tensor, y: torch.Tensor, ways: int, C: float, ridge: float, steps: int = 6000) -> torch.Tensor:
    """Plain projected gradient on beta = C Y - alpha (rows in C * simplex), step 1 / L."""
    Y = F.one_hot(y, ways).to(X.dtype)
    K = X @ X.T
    L = float(torch.linalg.eigvalsh(K).max()) + ridge
    beta = C * Y
    for _ in range(steps):
        alpha = C * Y - beta
        beta = michelot(beta - (Y - K @ alpha - ridge * alpha) / L, C)
    return C * Y - beta


def random_features(seed: int, n: int, features: int, ways: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.rand(n, features, generator=g, dtype=torch.float64)  # non-negative, like ReLU features
    y = torch.arange(n) % ways
    return X, y[torch.randperm(n, generator=g)]


# ---------------------------------------------------------------- helpers: the algorithm


def tiny(ways=WAYS, **cfg) -> svm_mod.MetaOptNetSVM:
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE))
    info = ProblemInfo(input_shape=(1, SIZE, SIZE), ways=ways, num_train_classes=10)
    cfg = {"init_scale": 1.7, **cfg}
    algo = svm_mod.build(svm_mod.Config(**cfg), backbone, info).double()
    with torch.no_grad():
        for name, p in algo.named_parameters():
            if "norms" in name:
                p.add_(0.3 * torch.randn_like(p))
    return algo


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES) -> TaskBatch:
    return plainops.random_batch(seed, tasks, ways, shots, queries, SIZE)


def body(p: dict, x: torch.Tensor) -> torch.Tensor:
    return plainops.conv4_body(p, x, LAYERS)


def logits_by_hand(p: dict, batch: TaskBatch, t: int, C: float = 0.1, ridge: float = 1.0) -> torch.Tensor:
    xs, xq = body(p, batch.support_x[t]), body(p, batch.query_x[t])
    alpha = slow_dual(xs, batch.support_y[t], batch.ways, C, ridge)
    return p["scale"] * (xq @ (xs.T @ alpha))  # <w_m, x_q>, w_m = sum_i alpha[i, m] x_i


def smoothed_loss_by_hand(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    ways = logits.shape[1]
    target = torch.full_like(logits, eps / (ways - 1))
    target[torch.arange(len(y)), y] = 1 - eps
    return -(target * torch.log_softmax(logits, 1)).sum(1).mean()


# ---------------------------------------------------------------- the solver


@pytest.mark.parametrize("ways, shots, C, ridge, scale", [
    (3, 2, 0.1, 1.0, 1.0),   # the paper's C and ridge
    (5, 3, 0.1, 1.0, 3.0),   # larger features: most dual variables at their bounds
    (4, 1, 1.0, 0.05, 1.0),  # a large C and a small ridge: closer to the plain hard-ish SVM
    (2, 4, 0.5, 1.0, 0.3),
])
def test_solution_is_the_svm_optimum(ways, shots, C, ridge, scale):
    n, tasks = ways * shots, 3
    data = [random_features(seed, n, 12, ways, scale) for seed in range(tasks)]
    X = torch.stack([d[0] for d in data])
    y = torch.stack([d[1] for d in data])
    alpha = svm_mod.svm_dual(X, y, ways, C, ridge, iterations=30)
    for t in range(tasks):
        assert_feasible(alpha[t], y[t], ways, C)
        gap = crammer_singer_gap(X[t], y[t], ways, alpha[t], C, ridge)
        assert -1e-12 <= gap <= 1e-10, gap
    # the default number of test iterations already gets there on these small problems
    default = svm_mod.svm_dual(X, y, ways, C, ridge, iterations=svm_mod.Config.test_iterations)
    assert max(crammer_singer_gap(X[t], y[t], ways, default[t], C, ridge) for t in range(tasks)) <= 1e-8
    if ridge >= 0.3:  # the slow solver converges fast enough to compare with (its rate is 1 - ridge / L)
        for t in range(tasks):
            torch.testing.assert_close(alpha[t], slow_dual(X[t], y[t], ways, C, ridge), rtol=0, atol=1e-9)


def test_every_iterate_is_feasible_and_the_gap_closes():
    ways, shots, C, ridge = 5, 2, 0.1, 1.0
    X, y = random_features(7, ways * shots, 12, ways, 2.0)
    gaps = []
    for iterations in range(0, 13):
        alpha = svm_mod.svm_dual(X[None], y[None], ways, C, ridge, iterations)[0]
        assert_feasible(alpha, y, ways, C)  # primal-dual interior point from a feasible start: always feasible
        gaps.append(crammer_singer_gap(X, y, ways, alpha, C, ridge))
    assert gaps[0] > 1e-2 and gaps[3] < gaps[0] and gaps[-1] < 1e-9, gaps


def test_float32_stays_finite_with_many_iterations():
    X, y = random_features(3, 15, 64, 5, 10.0)  # large features (K ~ 1e3): a badly conditioned dual
    alpha = svm_mod.svm_dual(X[None].float(), y[None], 5, 0.1, 1.0, iterations=60)[0]
    assert torch.isfinite(alpha).all()
    assert crammer_singer_gap(X, y, 5, alpha.double(), 0.1, 1.0) < 1e-2


@pytest.mark.parametrize("ways, shots, C, ridge", [(3, 2, 0.1, 1.0), (4, 3, 0.5, 0.2)])
def test_implicit_gradient_matches_finite_differences(ways, shots, C, ridge):
    """d/d(support, query) of <G, scores> at the optimum; float64 central differences of the same function."""
    g = torch.Generator().manual_seed(ways)
    tasks, n, m = 2, ways * shots, 5
    xs = (2 * torch.rand(tasks, n, 6, generator=g, dtype=torch.float64)).requires_grad_()
    xq = torch.randn(tasks, m, 6, generator=g, dtype=torch.float64).requires_grad_()
    ys = torch.stack([torch.randperm(n, generator=g) % ways for _ in range(tasks)])
    G = torch.randn(tasks, m, ways, generator=g, dtype=torch.float64)

    def f(a, b):
        return (svm_mod.svm_scores(a, ys, b, ways, C, ridge, iterations=40) * G).sum()

    gs, gq = torch.autograd.grad(f(xs, xq), [xs, xq])
    assert gs.abs().sum() > 0 and gq.abs().sum() > 0
    eps = 1e-6
    for k in range(6):
        ds = torch.randn(xs.shape, generator=g, dtype=torch.float64)
        dq = torch.randn(xq.shape, generator=g, dtype=torch.float64) * (k % 2)  # some through the solver alone
        with torch.no_grad():
            fd = (float(f(xs + eps * ds, xq + eps * dq)) - float(f(xs - eps * ds, xq - eps * dq))) / (2 * eps)
        analytic = float((gs * ds).sum() + (gq * dq).sum())
        assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (fd, analytic)


# ---------------------------------------------------------------- the algorithm


def test_config_checks_and_any_episode_shape():
    for key, bad in [("C", 0.0), ("C", -1.0), ("C", float("nan")), ("ridge", 0.0), ("iterations", -1),
                     ("test_iterations", -1), ("label_smoothing", 1.0), ("label_smoothing", -0.1)]:
        with pytest.raises(ConfigError, match=key):
            tiny(**{key: bad})
    algo = tiny()
    for ways, shots, queries in [(WAYS, 1, 1), (7, 3, 2), (2, 10, 1), (20, 1, 5)]:
        algo.check_episode(ways, shots, queries)  # the head has no fixed size


def set_params(algo, values: dict) -> None:
    with torch.no_grad():
        for name, p in algo.named_parameters():
            p.copy_(values[name])


def test_meta_step_matches_an_independent_computation_and_finite_differences():
    eps_smooth = 0.2
    # converged solver (the gradient is then the derivative of the SVM optimum), label smoothing on
    algo, batch = tiny(iterations=40, label_smoothing=eps_smooth), random_batch()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    assert metrics["loss"].shape == metrics["accuracy"].shape == (TASKS,)
    for t in range(TASKS):
        logits = logits_by_hand(p0, batch, t)
        assert math.isclose(float(metrics["loss"][t]), float(smoothed_loss_by_hand(logits, batch.query_y[t], eps_smooth)),
                            rel_tol=1e-7)
        assert math.isclose(float(metrics["accuracy"][t]), float((logits.argmax(1) == batch.query_y[t]).double().mean()),
                            rel_tol=1e-6)
    for name, p in algo.named_parameters():  # the backbone and the scale
        assert p.grad is not None and (p.grad.abs().sum() > 0 or zero_gradient(name)), name
    grads = {k: p.grad.clone() for k, p in algo.named_parameters()}

    def loss_at(values: dict) -> float:
        set_params(algo, values)
        with torch.no_grad():
            logits = algo.logits(batch, algo.cfg.iterations)
            loss = svm_mod.smoothed_cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), eps_smooth)
        set_params(algo, p0)
        return float(loss.mean())

    g = torch.Generator().manual_seed(4)
    eps = 1e-6
    directions = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in p0.items()} for _ in range(3)]
    for name in ["scale", "backbone.convs.0.weight", "backbone.norms.1.bias"]:
        directions.append({k: torch.randn(v.shape, generator=g, dtype=v.dtype) * (k == name) for k, v in p0.items()})
    for d in directions:
        fd = (loss_at({k: p0[k] + eps * d[k] for k in p0}) - loss_at({k: p0[k] - eps * d[k] for k in p0})) / (2 * eps)
        analytic = sum(float((grads[k] * d[k]).sum()) for k in p0)
        assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (fd, analytic)


def test_early_stopped_solver_still_trains_everything():
    algo, batch = tiny(iterations=3), random_batch()  # the paper's test script stops its solver at 3
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    assert torch.isfinite(metrics["loss"]).all()
    assert all(torch.isfinite(p.grad).all() for p in algo.parameters())
    assert all(p.grad.abs().sum() > 0 for k, p in algo.named_parameters() if not zero_gradient(k))
    fixed = tiny(learn_scale=False)
    fixed.meta_step(batch)
    assert fixed.scale.grad is None and not fixed.scale.requires_grad


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
def test_evaluate_scores_each_task_with_its_own_svm(ways, shots):
    algo = tiny(label_smoothing=0.1)  # built for 3-way training; evaluation reports plain cross-entropy
    batch = random_batch(seed=5, tasks=3, ways=ways, shots=shots, queries=2)
    out = assert_evaluate_is_clean(algo, batch)
    p0 = params_of(algo)
    for t in range(3):
        logits = logits_by_hand(p0, batch, t)
        assert logits.shape == (2 * ways, ways)
        assert math.isclose(float(out["loss"][t]), float(F.cross_entropy(logits, batch.query_y[t])), rel_tol=1e-7)
        assert math.isclose(float(out["accuracy"][t]), float((logits.argmax(1) == batch.query_y[t]).double().mean()),
                            rel_tol=1e-6)


# ---------------------------------------------------------------- learning, the CLI, the preset

# The ``learning`` fixture of conftest.py: conv4-32 on glyphs, 5-way 1-shot, meta-batch 8, Adam.
# Measured with seeds 0-5 (test accuracy over 200 fixed test episodes, before -> after; one thread,
# on a busy shared 2-core machine, so the times are rough), default solver (15 steps, training and test):
#   metaoptnet_svm, 30 steps, Adam 1e-2: 0.52-0.56 -> 0.719-0.756 (worst gain 0.19; 7-13 s a seed,
#   evaluations included). An SVM on random conv features is already well above chance, hence the start.
#   (With the solver stopped at 3 steps during training: 0.737-0.757, worst gain 0.20.)
# Chance is 0.2; the thresholds leave about 0.1 of margin below the worst seed (accuracy and gain).


def test_learns(learning):
    cfg = learning.config({"name": "metaoptnet_svm"}, steps=30, lr=1e-2)
    before, after, seconds = learning.run(cfg)
    print(f"metaoptnet_svm 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.62
    assert after >= before + 0.09


def test_trains_through_the_cli(cli, tmp_path):
    # evaluated on 3-way 2-shot episodes after 5-way 1-shot training: the head has no fixed size
    run_dir = tmp_path / "run"
    args = ["train", "algo=metaoptnet_svm", *cli.TINY, "algo.label_smoothing=0.1", "eval.ways=3", "eval.shots=2",
            f"hydra.run.dir={run_dir}"]
    proc = cli.run_many({"svm": (args, tmp_path)})["svm"]
    assert proc.returncode == 0, cli.describe(proc)
    accuracy = json.loads((run_dir / "results.json").read_text())["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["name"] == "metaoptnet_svm"
    assert float(ckpt["model"]["scale"]) != pytest.approx(1.0, abs=1e-7)  # the scale is a trained meta-parameter


def test_registered_and_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    assert algorithm_module("metaoptnet_svm") is svm_mod
    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=metaoptnet_svm_omniglot_5w1s"]))
    assert cfg.algo.name == "metaoptnet_svm" and cfg.data.name == "omniglot"
    assert (cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size, cfg.steps) == (5, 5, 6, 8, 60000)
    assert (cfg.eval.ways, cfg.eval.shots, cfg.eval.queries) == (5, 1, 15)
    a = cfg.algo
    assert (a.C, a.ridge, a.iterations, a.test_iterations, a.label_smoothing, a.learn_scale) == (0.1, 1.0, 15, 15, 0.1, True)
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.scheduler, o.decay_every) == ("sgd", 0.1, 0.9, 5e-4, "step", 20000)
