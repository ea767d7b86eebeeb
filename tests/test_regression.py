"""Regression as a first-class task kind: the sinusoid tasks, the mlp backbone, MAML and Reptile with MSE."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

from metalearn import engine
from metalearn.algorithms import maml
from metalearn.algorithms.base import ProblemInfo
from metalearn.config import to_run_config
from metalearn.data import sinusoid
from metalearn.errors import ConfigError
from metalearn.models import mlp

REGRESSION = ProblemInfo(input_shape=(1,), ways=1, num_train_classes=0, task="regression", output_size=1)


def sample(seed: int = 0, shots: int = 10, queries: int = 10, batch: int = 25, **cfg):
    return sinusoid.SinusoidSampler(sinusoid.Config(**cfg), shots, queries, batch, seed, torch.device("cpu")).sample()


def test_tasks_are_sines_with_the_papers_ranges():
    b = sample(batch=200, shots=10, queries=30)
    assert b.support_x.shape == (200, 10, 1) and b.query_y.shape == (200, 30, 1) and b.classes.shape == (200, 0)
    x = torch.cat([b.support_x, b.query_x], 1).squeeze(-1).double()
    y = torch.cat([b.support_y, b.query_y], 1).squeeze(-1).double()
    assert x.min() >= -5 and x.max() <= 5
    # A sin(x - phi) = a sin x + c cos x: a least-squares fit per task recovers amplitude and phase exactly.
    basis = torch.stack([x.sin(), x.cos()], -1)
    coef = torch.linalg.lstsq(basis, y.unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(basis @ coef.unsqueeze(-1), y.unsqueeze(-1), atol=1e-5)
    amplitude = coef.norm(dim=1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    assert amplitude.min() >= 0.1 - 1e-5 and amplitude.max() <= 5 + 1e-5
    assert phase.min() >= -1e-5 and phase.max() <= math.pi + 1e-5
    # Uniform draws: the spread covers the range.
    assert amplitude.max() - amplitude.min() > 4 and phase.max() - phase.min() > 2.5


def test_sampler_is_reproducible_and_resumable():
    a, b, c = sample(seed=3), sample(seed=3), sample(seed=4)
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_y, c.support_y)
    s = sinusoid.SinusoidSampler(sinusoid.Config(), 5, 5, 4, 0, torch.device("cpu"))
    s.sample()
    state = s.state_dict()
    expected = s.sample()
    s.load_state_dict(state)
    assert torch.equal(s.sample().query_y, expected.query_y)


def test_noise_and_bad_ranges():
    clean, noisy = sample(seed=1), sample(seed=1, noise=0.5)
    assert 0.3 < (noisy.support_y - clean.support_y).std() < 0.7
    with pytest.raises(ConfigError, match=r"data.amplitude must be \[low, high\]"):
        sinusoid.load(sinusoid.Config(amplitude=[5.0, 0.1]))


def test_mlp_is_the_papers_network():
    net = mlp.build(mlp.Config(), (1,))
    assert [tuple(layer.weight.shape) for layer in net.layers] == [(40, 1), (40, 40)] and net.out_features == 40
    assert net(torch.randn(3, 7, 1)).shape == (3, 7, 40)
    with pytest.raises(ConfigError, match="backbone=mlp takes vector inputs"):
        mlp.build(mlp.Config(), (1, 28, 28))


def test_maml_regression_meta_gradient_matches_a_plain_second_order_computation():
    """The engine's MAML on MSE against second-order MAML written out by hand on explicit weights."""
    torch.manual_seed(0)
    algo = maml.build(maml.Config(inner_lr=0.05, inner_steps=2), mlp.build(mlp.Config(hidden=[8, 8]), (1,)), REGRESSION)
    algo.double()
    batch = sample(batch=3, shots=5, queries=6)
    batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in vars(batch).values()))
    algo.zero_grad()
    metrics = algo.meta_step(batch)

    weights = [p.detach().clone().requires_grad_() for p in algo.net.parameters()]

    def forward(w, x):
        h = torch.relu(x @ w[0].T + w[1])
        h = torch.relu(h @ w[2].T + w[3])
        return h @ w[4].T + w[5]

    total = 0
    for t in range(3):
        fast = weights
        for _ in range(2):
            loss = ((forward(fast, batch.support_x[t]) - batch.support_y[t]) ** 2).mean()
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - 0.05 * g for w, g in zip(fast, grads)]
        total = total + ((forward(fast, batch.query_x[t]) - batch.query_y[t]) ** 2).mean() / 3
    expected = torch.autograd.grad(total, weights)
    for p, g in zip(algo.net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    assert set(metrics) == {"mse"} and metrics["mse"].shape == (3,)
    torch.testing.assert_close(metrics["mse"].mean(), total.detach())


def test_evaluation_reports_the_mse_after_each_inner_step():
    torch.manual_seed(0)
    algo = maml.build(maml.Config(inner_lr=0.01, test_inner_steps=4), mlp.build(mlp.Config(), (1,)), REGRESSION)
    batch = sample(batch=4)
    out = algo.evaluate(batch)
    assert list(out) == [f"mse_step{k}" for k in range(5)] + ["mse"]
    torch.testing.assert_close(out["mse"], out["mse_step4"])
    net, params = algo.net, dict(algo.net.named_parameters())
    for t in range(4):  # step 0 is the unadapted network; step 2 is two plain SGD steps
        q = functional_call(net, params, (batch.query_x[t],))
        torch.testing.assert_close(out["mse_step0"][t], ((q - batch.query_y[t]) ** 2).mean())
        adapted = maml.adapt(net, params, batch.support_x[t], batch.support_y[t], 2, 0.01, False, algo.objective)
        q = functional_call(net, adapted, (batch.query_x[t],))
        torch.testing.assert_close(out["mse_step2"][t], ((q - batch.query_y[t]) ** 2).mean().detach())
    assert algo.primary_metric == "mse" and not algo.higher_is_better


def regression_config(algo: dict, steps: int, lr: float = 1e-3):
    return to_run_config({
        "algo": algo, "data": {"name": "sinusoid"}, "backbone": {"name": "mlp"},
        "device": {"type": "cpu"}, "ways": 1, "shots": 10, "queries": 10, "meta_batch_size": 25, "steps": steps,
        "eval": {"ways": 1, "shots": 10, "queries": 10, "batch_size": 100}, "optim": {"name": "adam", "lr": lr},
    })


# Steps and outer Adam lr of each: reptile's task loop makes its step about 25x MAML's here, so it gets
# fewer, larger steps. Measured (seeds 0 and 1, MSE after / before): maml 300 steps at 1e-3 0.49 (2 s of
# training); reptile 60 steps at 1e-2 about 0.3 (0.35 and 0.33 after 50; 9 s).
@pytest.mark.parametrize("algo,steps,lr", [
    ({"name": "maml", "inner_lr": 0.01, "test_inner_steps": 10}, 300, 1e-3),
    ({"name": "reptile", "inner_lr": 0.02, "inner_steps": 5, "test_inner_steps": 10}, 60, 1e-2)])
def test_meta_training_lowers_the_post_adaptation_mse(algo, steps, lr):
    """MSE after 10 fine-tuning steps falls well below that of the untrained network (about 4)."""
    cfg = regression_config(algo, steps, lr)
    cpu = torch.device("cpu")
    engine.seed_everything(0)
    stores = engine.load_data(cfg, cpu)
    model = engine.build_algorithm(cfg, stores["train"])
    optimizer, _ = engine.build_optimizer(cfg, model.parameters())

    def test_mse() -> float:
        return engine.evaluate(model, stores["test"], 1, 10, 10, 100, 100, 1, cpu)["mse"]["mean"]

    before = test_mse()
    sampler = stores["train"].sampler(1, 10, 10, 25, 0, training=True)
    for step in range(cfg.steps):
        model.begin_step(step, cfg.steps)
        optimizer.zero_grad()
        model.meta_step(sampler.sample())
        optimizer.step()
    after = test_mse()
    assert after < 0.75 * before, (before, after)


def test_sinusoid_through_the_cli(cli, tmp_path):
    fast = ["steps=6", "trainer.val_every=3", "trainer.val_episodes=20", "trainer.test_episodes=40",
            "trainer.log_every=3", "trainer.ckpt_every=3"]
    runs = cli.run_many({
        "maml": (["train", "experiment=maml_sinusoid_k10", *fast, "hydra.run.dir=maml"], tmp_path),
        "metasgd": (["train", "experiment=maml_sinusoid_k10", "algo=metasgd", "algo.inner_lr=0.01",
                     "algo.test_inner_steps=3", *fast, "hydra.run.dir=metasgd"], tmp_path),
        "reptile": (["train", "data=sinusoid", "backbone=mlp", "algo=reptile", "shots=10", "queries=10", *fast,
                     "hydra.run.dir=reptile"], tmp_path),
        "protonet": (["train", "data=sinusoid", "backbone=mlp", "algo=protonet"], tmp_path),
        "conv4": (["train", "data=sinusoid", "algo=maml", "backbone=conv4"], tmp_path),  # sinusoid's own choice is mlp
    })
    for name in ("maml", "metasgd", "reptile"):
        assert runs[name].returncode == 0, cli.describe(runs[name])
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["best_val"]["metric"] == "mse" and results["episode"]["task"] == "regression"
        assert "accuracy" not in results["test"] and results["test"]["mse"]["episodes"] == 40
    maml_results = json.loads((tmp_path / "maml" / "results.json").read_text())
    assert [f"mse_step{k}" for k in range(11)] == [k for k in maml_results["test"] if k.startswith("mse_step")]
    assert "regression 10-shot (10 query points)" in runs["maml"].stdout
    for name, message in [("protonet", "algo=protonet learns classification tasks only, and data=sinusoid is regression; "
                                       "use one of: maml, reptile, metasgd"),
                          ("conv4", "backbone=conv4 takes images, but this data gives vectors of size 1; use backbone=mlp")]:
        proc = runs[name]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, cli.describe(proc)
        assert proc.stderr.strip().splitlines() == [f"metalearn: error: {message}"]
    proc = cli.run(["eval", "run=maml", "episodes=50"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert "mse_step10:" in proc.stdout and "(95% CI, 50 episodes)" in proc.stdout
