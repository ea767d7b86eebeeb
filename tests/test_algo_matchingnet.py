"""Matching Networks: probabilities and gradients against an independent computation, FCE, learning, the CLI.

The reference below uses nothing of metalearn but the module under test's
parameters: conv4 is written out with plain tensor ops (conv, per-set batch
normalisation, ReLU, max-pool), the attention over the support set and the
LSTMs of the full-context embeddings (gates i, f, g, o, as torch's LSTM) too.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import matchingnet as mn
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient
import plainops
from plainops import params_of

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS = 8, 4, 2  # 16 features


def tiny(**cfg) -> mn.MatchingNet:
    torch.manual_seed(0)
    backbone = conv4.build(conv4.Config(hidden=HIDDEN, layers=LAYERS), (1, SIZE, SIZE))
    algo = mn.build(mn.Config(**cfg), backbone, ProblemInfo((1, SIZE, SIZE), WAYS, 10)).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters, so their gradients are exercised
        for name, p in algo.named_parameters():
            if "norms" in name:
                p.add_(0.3 * torch.randn_like(p))
    return algo


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES) -> TaskBatch:
    return plainops.random_batch(seed, tasks, ways, shots, queries, SIZE)


def body(p: dict, x: torch.Tensor) -> torch.Tensor:
    return plainops.conv4_body(p, x, LAYERS)


def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def fce_support(p: dict, g0: torch.Tensor) -> torch.Tensor:
    """g(x_i, S) = forward LSTM + backward LSTM + g'(x_i), one example at a time."""
    n, dim = g0.shape

    def run(order, suffix):
        w = [p[f"fce.support_lstm.{k}_l0{suffix}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h, c, out = torch.zeros(dim, dtype=g0.dtype), torch.zeros(dim, dtype=g0.dtype), {}
        for i in order:
            h, c = lstm_step(g0[i], h, c, *w)
            out[i] = h
        return torch.stack([out[i] for i in range(n)])

    return g0 + run(range(n), "") + run(reversed(range(n)), "_reverse")


def fce_query(p: dict, f0: torch.Tensor, g: torch.Tensor, steps: int) -> torch.Tensor:
    """The attention LSTM of appendix A.1, one query at a time."""
    w = [p[f"fce.query_lstm.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    out = []
    for x in f0:
        h, c = x, torch.zeros_like(x)  # h_0 = f'(x) (h^_0 = 0), c_0 = 0
        for _ in range(steps):
            a = torch.exp(g @ h) / torch.exp(g @ h).sum()
            r = (a[:, None] * g).sum(0)
            h_hat, c = lstm_step(torch.cat([x, r]), h, c, *w)
            h = h_hat + x
        out.append(h)
    return torch.stack(out)


def reference(p: dict, batch: TaskBatch, t: int, fce=False, steps=5, cosine="support"):
    """Task t: (class probabilities [n_q, ways], NLL loss)."""
    s, q = body(p, batch.support_x[t]), body(p, batch.query_x[t])
    if fce:
        s = fce_support(p, s)
        q = fce_query(p, q, s, steps)
    sim = torch.stack([torch.stack([(qi * sj).sum() / sj.norm() for sj in s]) for qi in q])
    if cosine == "both":
        sim = sim / q.norm(dim=1, keepdim=True)
    a = torch.exp(sim) / torch.exp(sim).sum(1, keepdim=True)
    probs = torch.stack([a[:, batch.support_y[t] == c].sum(1) for c in range(batch.ways)], dim=1)
    loss = -torch.log(probs[torch.arange(len(q)), batch.query_y[t]]).mean()
    return probs, loss


CASES = [dict(), dict(cosine="both"), dict(fce=True, fce_steps=3), dict(fce=True, fce_steps=1, cosine="both")]


def test_registered_and_config_checks():
    assert algorithm_module("matchingnet") is mn
    tiny().check_episode(WAYS + 4, 5, 1)  # any episode shape: nothing is sized by the ways
    with pytest.raises(ConfigError, match="algo.cosine"):
        tiny(cosine="euclidean")
    with pytest.raises(ConfigError, match="algo.fce_steps"):
        tiny(fce=True, fce_steps=0)
    assert not any(n.startswith("fce.") for n, _ in tiny().named_parameters())
    assert tiny(fce=True).fce.query_lstm.hidden_size == HIDDEN * 2 * 2  # the embedding size


@pytest.mark.parametrize("case", CASES, ids=["cosine-support", "cosine-both", "fce", "fce-1-step-both"])
def test_probabilities_loss_and_gradient_match_reference(case):
    algo, batch = tiny(**case), random_batch()
    p0 = params_of(algo)
    probs = algo.probabilities(batch)
    assert probs.shape == (TASKS, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(TASKS, WAYS * QUERIES, dtype=torch.float64))

    leaves = {k: v.clone().requires_grad_() for k, v in p0.items()}
    losses = []
    for t in range(TASKS):
        ref_probs, ref_loss = reference(leaves, batch, t, case.get("fce", False), case.get("fce_steps", 5),
                                        case.get("cosine", "support"))
        torch.testing.assert_close(probs[t], ref_probs.detach(), rtol=1e-10, atol=1e-12)
        losses.append(ref_loss)
    expected = dict(zip(leaves, torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values()))))

    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    torch.testing.assert_close(metrics["loss"], torch.stack(losses).detach(), rtol=1e-10, atol=0)
    accs = [float((probs[t].argmax(1) == batch.query_y[t]).double().mean()) for t in range(TASKS)]
    assert metrics["accuracy"].tolist() == pytest.approx(accs)
    assert not metrics["loss"].requires_grad
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-12, msg=name)
        assert p.grad.abs().sum() > 0 or zero_gradient(name), name  # everything is trained, the LSTMs included with fce


def test_gradient_matches_finite_differences():
    algo, batch = tiny(fce=True, fce_steps=2), random_batch()
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    algo.meta_step(batch)
    grad = torch.cat([p.grad.flatten() for p in algo.parameters()])
    theta = torch.cat([v.flatten() for v in p0.values()])

    def loss_at(vec):
        with torch.no_grad():
            i = 0
            for p in algo.parameters():
                p.copy_(vec[i : i + p.numel()].view_as(p))
                i += p.numel()
            return float(algo.evaluate(batch)["loss"].mean())

    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        d = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        d /= d.norm()
        fd = (loss_at(theta + 1e-6 * d) - loss_at(theta - 1e-6 * d)) / 2e-6
        assert abs(fd - float(grad @ d)) <= 1e-6 * (1 + abs(fd)), (fd, float(grad @ d))


class Flatten(torch.nn.Module):
    """A backbone that returns the pixels: [T, n, C, H, W] -> [T, n, C*H*W]."""

    out_features = 2

    def forward(self, x):
        return x.flatten(-3)


def test_log_is_clamped():
    """A label the attention gives no weight at all: the loss is -log(1e-8), finite, with finite gradients."""
    algo = mn.build(mn.Config(), Flatten(), ProblemInfo((1, 1, 2), 2, 4))
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 1, 2) * 2000
    batch = TaskBatch(support, torch.tensor([[0, 1]]), support[:, :1], torch.tensor([[1]]), torch.tensor([[0, 1]]))
    assert float(algo.probabilities(batch)[0, 0, 1]) == 0.0  # exp(-2000) underflows
    out = algo.evaluate(batch)
    assert math.isclose(float(out["loss"][0]), -math.log(mn.LOG_CLAMP), rel_tol=1e-12)
    assert float(out["accuracy"][0]) == 0.0


@pytest.mark.parametrize("case", CASES[::2], ids=["plain", "fce"])
def test_evaluate_is_clean_and_independent_of_batching(case):
    algo, batch = tiny(**case), random_batch(tasks=3)
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    out = algo.evaluate(batch)
    assert out["loss"].shape == out["accuracy"].shape == (3,)
    assert not out["loss"].requires_grad and not out["accuracy"].requires_grad
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]) and p.grad is None, name
    for t in range(3):  # each task alone, and in another company, gives the same numbers
        torch.testing.assert_close(algo.evaluate(batch[t : t + 1])["loss"], out["loss"][t : t + 1], rtol=1e-12, atol=0)
    reordered = algo.evaluate(TaskBatch.cat([batch[2:3], batch[0:2]]))
    torch.testing.assert_close(reordered["loss"], out["loss"][[2, 0, 1]], rtol=1e-12, atol=0)
    # evaluate scores exactly what meta_step trains on
    torch.testing.assert_close(algo.meta_step(batch)["loss"], out["loss"], rtol=1e-12, atol=0)


def test_any_number_of_ways_and_shots():
    algo = tiny(fce=True)
    out = algo.evaluate(random_batch(ways=5, shots=3, queries=2))
    assert out["loss"].shape == (TASKS,) and torch.isfinite(out["loss"]).all()


# ---------------------------------------------------------------- learning

# conv4-32 on glyphs, 5-way 1-shot, meta-batch 8, outer Adam 3e-3 (the ``learning`` fixture of conftest.py).
# Measured with seeds 0-5 (test accuracy over 200 fixed test episodes, before -> after; one thread, a busy
# machine, seconds of training only):
#   matchingnet, 20 steps:            0.52-0.56 -> 0.78-0.79 (gain >= 0.229; about 5-8 s)
#   matchingnet fce (K=5), 20 steps:  0.48-0.53 -> 0.75-0.78 (gain >= 0.242; about 3-6 s)
# (The cosine of the random embeddings already beats chance, 0.2, before training.)
# Thresholds: about 0.1 below the worst seed, for the accuracy and for the gain.
LEARNING = {
    "plain": dict(algo={"name": "matchingnet"}, min=0.68, gain=0.13),
    "fce": dict(algo={"name": "matchingnet", "fce": True, "fce_steps": 5}, min=0.65, gain=0.14),
}


@pytest.mark.parametrize("name", list(LEARNING))
def test_learns(name, learning):
    setting = LEARNING[name]
    before, after, seconds = learning.run(learning.config(setting["algo"], steps=20, lr=3e-3))
    print(f"matchingnet {name} 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= setting["min"]
    assert after >= before + setting["gain"]


# ---------------------------------------------------------------- the CLI and the preset


@pytest.fixture(scope="module")
def cli_runs(cli, tmp_path_factory) -> dict:
    """TINY training runs through ``metalearn train``, without and with FCE, side by side."""
    cwd = tmp_path_factory.mktemp("matchingnet")
    jobs = {name: (["train", "algo=matchingnet", *extra, *cli.TINY, f"hydra.run.dir={cwd / name}"], cwd)
            for name, extra in {"plain": [], "fce": ["algo.fce=true", "algo.fce_steps=2"]}.items()}
    return {name: (proc, cwd / name) for name, proc in cli.run_many(jobs).items()}


@pytest.mark.parametrize("name", ["plain", "fce"])
def test_trains_through_the_cli(name, cli, cli_runs):
    proc, run_dir = cli_runs[name]
    assert proc.returncode == 0, cli.describe(proc)
    accuracy = json.loads((run_dir / "results.json").read_text())["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["name"] == "matchingnet"
    lstm = [k for k in ckpt["model"] if k.startswith("fce.")]
    assert bool(lstm) == (name == "fce")  # the LSTMs are meta-parameters: checkpointed


def test_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=matchingnet_omniglot_5w1s"]))
    assert cfg.algo.name == "matchingnet" and cfg.data.name == "omniglot" and (cfg.ways, cfg.shots) == (5, 1)
    assert (cfg.eval.ways, cfg.eval.shots, cfg.eval.queries) == (5, 1, 15)
    assert cfg.algo.fce is False and cfg.data.rotations and cfg.backbone.hidden == 64
    backbone = conv4.build(cfg.backbone, (1, 28, 28))
    assert backbone.out_features == 64  # the paper's 1x1x64 embedding
    mn.build(cfg.algo, backbone, ProblemInfo((1, 28, 28), 5, 4112))
