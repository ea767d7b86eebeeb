"""Relation Networks and conv4's ``pool_layers``: scores and gradients against an independent computation,
small feature maps, learning, the CLI.

The reference below uses nothing of metalearn but the parameters of the module
under test: conv4 (pooling in its first blocks only) and the relation module
are written out with plain tensor ops, one task and one (query, class) pair
list at a time, with batch normalisation over each set (the task's support
set, its query set, its pairs).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import ProblemInfo, algorithm_module
from metalearn.algorithms import relationnet as rn
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import conv4
from conftest import zero_gradient

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2
SIZE, HIDDEN, LAYERS, POOLS = 12, 4, 3, 1  # 4x6x6 maps; the relation module pools 6 -> 3 -> 1


def backbone(input_shape=(1, SIZE, SIZE), **kw) -> conv4.Conv4:
    return conv4.build(conv4.Config(**{"hidden": HIDDEN, "layers": LAYERS, "pool_layers": POOLS, **kw}), input_shape)


def tiny(input_shape=(1, SIZE, SIZE), backbone_kw=None, **cfg) -> rn.RelationNet:
    torch.manual_seed(0)
    net = backbone(input_shape, **(backbone_kw or {}))
    algo = rn.build(rn.Config(**{"channels": 5, "hidden": 3, **cfg}), net, ProblemInfo(input_shape, WAYS, 10)).double()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters, so their gradients are exercised
        for name, p in algo.named_parameters():
            if "norms" in name:
                p.add_(0.3 * torch.randn_like(p))
    return algo


def random_batch(seed=1, tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES, shape=(1, SIZE, SIZE)) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(ways).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(shots), labels(queries)
    protos = torch.rand(tasks, ways, *shape, generator=g, dtype=torch.float64)

    def images(y):
        base = protos[torch.arange(tasks)[:, None], y]
        return (0.6 * base + 0.4 * torch.rand(base.shape, generator=g, dtype=torch.float64)).clamp(0, 1)

    classes = torch.stack([torch.randperm(10, generator=g)[:ways] for _ in range(tasks)])
    return TaskBatch(images(sy), sy, images(qy), qy, classes)


def params_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def set_norm(x, weight, bias):
    """Batch normalisation with the statistics of this set, affine transform."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def maps(p: dict, x: torch.Tensor, layers: int, pools: int, prefix="backbone.") -> torch.Tensor:
    """conv4 written out, max-pooling in the first ``pools`` blocks: [n, C, H, W] -> maps [n, hidden, h, w]."""
    for i in range(layers):
        x = F.conv2d(x, p[f"{prefix}convs.{i}.weight"], p[f"{prefix}convs.{i}.bias"], padding=1)
        x = torch.clamp(set_norm(x, p[f"{prefix}norms.{i}.weight"], p[f"{prefix}norms.{i}.bias"]), min=0)
        if i < pools:
            x = F.max_pool2d(x, 2)
    return x


def relation(p: dict, pairs: torch.Tensor) -> torch.Tensor:
    """The relation module written out: [n, 2C, H, W] -> scores [n]; a pool is skipped along a 1px side."""
    x = pairs
    for i in range(2):
        x = F.conv2d(x, p[f"relation.convs.{i}.weight"], p[f"relation.convs.{i}.bias"], padding=1)
        x = torch.clamp(set_norm(x, p[f"relation.norms.{i}.weight"], p[f"relation.norms.{i}.bias"]), min=0)
        x = F.max_pool2d(x, (min(2, x.shape[2]), min(2, x.shape[3])))
    x = torch.clamp(x.flatten(1) @ p["relation.fc1.weight"].T + p["relation.fc1.bias"], min=0)
    return torch.sigmoid(x @ p["relation.fc2.weight"].T + p["relation.fc2.bias"]).squeeze(1)


def reference(p: dict, batch: TaskBatch, t: int, layers=LAYERS, pools=POOLS):
    """Task t: relation scores [n_q, ways] and the MSE to the one-hot labels."""
    s = maps(p, batch.support_x[t], layers, pools)
    q = maps(p, batch.query_x[t], layers, pools)
    class_maps = [s[batch.support_y[t] == c].sum(0) for c in range(batch.ways)]  # summed, not averaged
    pairs = torch.stack([torch.cat([class_maps[c], qi]) for qi in q for c in range(batch.ways)])
    scores = relation(p, pairs).view(len(q), batch.ways)
    target = (batch.query_y[t][:, None] == torch.arange(batch.ways)).double()
    return scores, ((scores - target) ** 2).mean()


# ---------------------------------------------------------------- conv4's pool_layers


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "task-by-task"])
@pytest.mark.parametrize("pools, side", [(None, 1), (4, 1), (3, 3), (2, 7), (1, 14), (0, 28)])
def test_conv4_pool_layers_shapes_and_values(pools, side, fold, monkeypatch):
    monkeypatch.setattr(conv4.Conv4, "fold_tasks", fold)
    torch.manual_seed(0)
    net = conv4.build(conv4.Config(hidden=6, pool_layers=pools), (1, 28, 28)).double()
    assert net.out_shape == (6, side, side) and net.out_features == 6 * side * side
    x = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    out = net(x)
    assert out.shape == (2, 3, 6 * side * side) and net(x[0]).shape == (3, 6 * side * side)
    p = {f"backbone.{k}": v for k, v in params_of(net).items()}
    for t in range(2):
        torch.testing.assert_close(out[t], maps(p, x[t], 4, 4 if pools is None else pools).flatten(1))


def test_conv4_pool_layers_default_is_the_old_network():
    """null (the default): every block pools, exactly as before the option existed."""
    assert conv4.Config().pool_layers is None
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(0)
    old = conv4.build(conv4.Config(hidden=8), (1, 28, 28))
    torch.manual_seed(0)
    explicit = conv4.build(conv4.Config(hidden=8, pool_layers=4), (1, 28, 28))
    assert torch.equal(old(x), explicit(x)) and old.out_shape == (8, 1, 1)
    assert conv4.build(conv4.Config(), (3, 84, 84)).out_features == 1600
    assert conv4.build(conv4.Config(layers=3), (1, 20, 36)).out_shape == (64, 2, 4)


def test_conv4_pool_layers_errors():
    with pytest.raises(ConfigError, match="backbone.pool_layers=5"):
        conv4.build(conv4.Config(pool_layers=5), (1, 28, 28))
    with pytest.raises(ConfigError, match="backbone.pool_layers=-1"):
        conv4.build(conv4.Config(pool_layers=-1), (1, 28, 28))
    with pytest.raises(ConfigError, match="lower backbone.pool_layers"):
        conv4.build(conv4.Config(pool_layers=3), (1, 6, 6))
    assert conv4.build(conv4.Config(pool_layers=2), (1, 6, 6)).out_shape == (64, 1, 1)  # 6 -> 3 -> 1
    with pytest.raises(ConfigError, match="16px"):  # the old check, unchanged without the option
        conv4.build(conv4.Config(), (1, 12, 12))


def test_conv4_pool_layers_in_the_config_group():
    from hydra import compose
    from metalearn import confdir

    with confdir.initialized():
        assert to_run_config(compose("config")).backbone.pool_layers is None
        cfg = to_run_config(compose("config", overrides=["backbone.pool_layers=2"]))
    assert cfg.backbone.pool_layers == 2


# ---------------------------------------------------------------- Relation Networks


def test_registered_and_config_checks():
    assert algorithm_module("relationnet") is rn
    tiny().check_episode(WAYS + 4, 5, 1)
    with pytest.raises(ConfigError, match="algo.channels"):
        tiny(channels=0)
    with pytest.raises(ConfigError, match="algo.channels and algo.hidden"):
        tiny(hidden=0)


def test_scores_loss_and_gradients_match_reference():
    algo, batch = tiny(), random_batch()  # 2 shots: the class map is the sum of two support maps
    p0 = params_of(algo)
    assert algo.relation.pools == [(2, 2), (2, 2)] and algo.relation.fc1.in_features == 5  # 6 -> 3 -> 1
    scores = algo.relation_scores(batch)
    assert scores.shape == (TASKS, WAYS * QUERIES, WAYS) and ((scores > 0) & (scores < 1)).all()

    leaves = {k: v.clone().requires_grad_() for k, v in p0.items()}
    losses = []
    for t in range(TASKS):
        ref_scores, ref_loss = reference(leaves, batch, t)
        torch.testing.assert_close(scores[t], ref_scores.detach(), rtol=1e-10, atol=1e-12)
        losses.append(ref_loss)
    expected = dict(zip(leaves, torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values()))))

    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    torch.testing.assert_close(metrics["loss"], torch.stack(losses).detach(), rtol=1e-10, atol=0)
    accs = [float((scores[t].argmax(1) == batch.query_y[t]).double().mean()) for t in range(TASKS)]
    assert metrics["accuracy"].tolist() == pytest.approx(accs)
    assert not metrics["loss"].requires_grad
    for name, p in algo.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-8, atol=1e-12, msg=name)
        assert p.grad.abs().sum() > 0 or zero_gradient(name), name  # the relation module and the backbone both learn
    assert any(n.startswith("relation.") for n in expected) and any(n.startswith("backbone.") for n in expected)


def test_class_maps_are_sums():
    support = torch.arange(4 * 2, dtype=torch.float64).view(1, 4, 2, 1, 1)
    summed = rn.class_maps(support, torch.tensor([[1, 0, 1, 0]]), 2)
    torch.testing.assert_close(summed.flatten(), torch.tensor([2.0 + 6, 3 + 7, 0 + 4, 1 + 5], dtype=torch.float64))


def test_gradient_matches_finite_differences():
    algo, batch = tiny(), random_batch()
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


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "task-by-task"])
def test_evaluate_is_clean_and_independent_of_batching(fold, monkeypatch):
    monkeypatch.setattr(conv4.Conv4, "fold_tasks", fold)
    algo, batch = tiny(), random_batch(tasks=3)
    p0 = params_of(algo)
    algo.zero_grad(set_to_none=True)
    out = algo.evaluate(batch)
    assert out["loss"].shape == out["accuracy"].shape == (3,)
    assert not out["loss"].requires_grad and not out["accuracy"].requires_grad
    for name, p in algo.named_parameters():
        assert torch.equal(p, p0[name]) and p.grad is None, name
    for t in range(3):  # each task alone, and in another company: the relation module's BatchNorm is per task
        torch.testing.assert_close(algo.evaluate(batch[t : t + 1])["loss"], out["loss"][t : t + 1], rtol=1e-12, atol=0)
    reordered = algo.evaluate(TaskBatch.cat([batch[2:3], batch[0:2]]))
    torch.testing.assert_close(reordered["loss"], out["loss"][[2, 0, 1]], rtol=1e-12, atol=0)
    torch.testing.assert_close(algo.meta_step(batch)["loss"], out["loss"], rtol=1e-12, atol=0)


def test_small_and_uneven_maps():
    """2x5 maps: the first block pools 2x2 (-> 1x2), the second only along the side that is left."""
    shape = (1, 8, 20)  # two pooling blocks: 2x5 maps
    algo = tiny(shape, backbone_kw={"layers": 2, "pool_layers": 2})
    assert algo.backbone.out_shape == (HIDDEN, 2, 5)
    assert algo.relation.pools == [(2, 2), (1, 2)] and algo.relation.fc1.in_features == 5
    batch = random_batch(shape=shape)
    p = params_of(algo)
    scores = algo.relation_scores(batch)
    for t in range(TASKS):
        torch.testing.assert_close(scores[t], reference(p, batch, t, layers=2, pools=2)[0], rtol=1e-10, atol=1e-12)


def test_one_pixel_maps_and_missing_shape():
    # conv4 fully pooled (the default backbone at 28x28): 1x1 maps, the relation convs see their centre tap only
    algo = tiny((1, 4, 4), backbone_kw={"layers": 2, "pool_layers": 2})
    assert algo.backbone.out_shape == (HIDDEN, 1, 1)
    assert algo.relation.pools == [(1, 1), (1, 1)] and algo.relation.fc1.in_features == algo.relation.convs[0].out_channels
    batch, p = random_batch(shape=(1, 4, 4)), params_of(algo)
    scores = algo.relation_scores(batch)
    for t in range(TASKS):
        torch.testing.assert_close(scores[t], reference(p, batch, t, layers=2, pools=2)[0], rtol=1e-10, atol=1e-12)
    default = rn.build(rn.Config(), conv4.build(conv4.Config(), (1, 28, 28)), ProblemInfo((1, 28, 28), 5, 10))
    assert default.map_shape == (64, 1, 1)

    class Flat(nn.Module):
        out_features = 16

        def forward(self, x):
            return x.flatten(-3)

    with pytest.raises(ConfigError, match="out_shape"):
        rn.build(rn.Config(), Flat(), ProblemInfo((1, 4, 4), 5, 10))


# ---------------------------------------------------------------- learning

# conv4-32 on glyphs with pool_layers=2 (32x7x7 maps), 5-way 1-shot, meta-batch 8, outer Adam 3e-3, a
# relation module of 32 filters (the ``learning`` fixture of conftest.py). Measured with seeds 0-5 (test
# accuracy over 200 fixed test episodes, before -> after; one thread, a busy machine, seconds of training):
#   relationnet, 25 steps: 0.17-0.21 -> 0.71-0.80 (gain >= 0.519; about 5-7 s)
# Thresholds: about 0.1 below the worst seed, for the accuracy and for the gain.
def test_learns(learning):
    cfg = learning.config({"name": "relationnet", "channels": 32, "hidden": 8}, steps=25, lr=3e-3,
                          backbone={"name": "conv4", "hidden": 32, "layers": 4, "norm": "batch", "pool_layers": 2})
    before, after, seconds = learning.run(cfg)
    print(f"relationnet 5-way 1-shot glyphs: {before:.3f} -> {after:.3f} in {seconds:.1f}s")
    assert after >= 0.61
    assert after >= before + 0.42


# ---------------------------------------------------------------- the CLI and the preset


def test_trains_through_the_cli(cli, tmp_path):
    run_dir = tmp_path / "run"
    # FAST's conv4 pools in every block (1x1 maps at 28x28): the paper's embedding pools in two
    args = ["train", "algo=relationnet", *cli.TINY, "backbone.pool_layers=2", f"hydra.run.dir={run_dir}"]
    proc = cli.run_many({"relationnet": (args, tmp_path)})["relationnet"]
    assert proc.returncode == 0, cli.describe(proc)
    accuracy = json.loads((run_dir / "results.json").read_text())["test"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["episodes"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["name"] == "relationnet"
    assert ckpt["config"]["backbone"]["pool_layers"] == 2
    assert any(k.startswith("relation.") for k in ckpt["model"])


def test_preset_is_a_valid_config():
    from hydra import compose
    from metalearn import confdir

    with confdir.initialized():
        cfg = to_run_config(compose("config", overrides=["experiment=relationnet_omniglot_5w1s"]))
    assert cfg.algo.name == "relationnet" and cfg.data.name == "omniglot" and (cfg.ways, cfg.shots) == (5, 1)
    assert (cfg.queries, cfg.meta_batch_size) == (19, 1)  # the paper's episodes, one per update
    assert (cfg.eval.ways, cfg.eval.shots, cfg.eval.queries) == (5, 1, 15)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler, cfg.optim.decay_every, cfg.optim.decay_gamma) == \
        ("adam", 1e-3, "step", 100000, 0.5)
    net = conv4.build(cfg.backbone, (1, 28, 28))
    assert net.out_shape == (64, 7, 7)
    algo = rn.build(cfg.algo, net, ProblemInfo((1, 28, 28), 5, 4112))
    assert algo.relation.pools == [(2, 2), (2, 2)] and algo.relation.fc1.in_features == 64  # 7 -> 3 -> 1
