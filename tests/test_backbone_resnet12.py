"""resnet12 (and the conv4_32 / conv4_64 presets): shapes, per-task BatchNorm, DropBlock, MAML, the CLI.

The network is re-computed here with plain tensor ops (conv, per-set batch
normalisation, LeakyReLU as a ``where``, max-pool as a reshape), and a
second-order MAML meta-gradient through it is compared with float64 central
finite differences of that hand-written meta-loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.algorithms import ProblemInfo
from metalearn.algorithms import maml as maml_mod
from metalearn.config import to_run_config
from metalearn.data import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models import backbone_module, resnet12

TINY = [3, 4, 4, 5]


def build(input_shape=(3, 32, 32), **kw) -> resnet12.ResNet12:
    return resnet12.build(resnet12.Config(**kw), input_shape)


def tiny(input_shape=(2, 16, 16), channels=TINY, seed=0, **kw) -> resnet12.ResNet12:
    torch.manual_seed(seed)
    net = build(input_shape, channels=channels, **kw).double()
    # non-trivial BatchNorm affine parameters, so they matter
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return net


def tasks_input(T=3, n=5, shape=(2, 16, 16), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, n, *shape, generator=g, dtype=torch.float64)
    # tasks with very different statistics, so a shared normalisation would show
    return x * torch.tensor([1.0, 3.0, 0.2])[:T].view(T, 1, 1, 1, 1) + torch.tensor([0.0, -1.0, 2.0])[:T].view(T, 1, 1, 1, 1)


@pytest.fixture(params=[True, False], ids=["folded", "task-by-task"])
def fold(request, monkeypatch):
    """Both paths for [T, n, ...] input: one big batch (the accelerator default) and the task loop (CPU)."""
    monkeypatch.setattr(resnet12.ResNet12, "fold_tasks", request.param)
    return request.param


# ---------------------------------------------------------------- the network written out by hand


def plain_norm(x, w, b):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, batch statistics of this set
    return (x - mean) / torch.sqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def leaky(x):
    return torch.where(x > 0, x, 0.1 * x)


def pool(x):
    n, c, h, w = x.shape
    return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def plain_block(p: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    out = x
    for j in range(3):
        out = plain_norm(F.conv2d(out, p[f"{prefix}convs.{j}.weight"], padding=1),
                         p[f"{prefix}norms.{j}.weight"], p[f"{prefix}norms.{j}.bias"])
        if j < 2:
            out = leaky(out)
    short = torch.einsum("oi,nihw->nohw", p[f"{prefix}shortcut.weight"][:, :, 0, 0], x)  # the 1x1 conv
    short = plain_norm(short, p[f"{prefix}shortcut_norm.weight"], p[f"{prefix}shortcut_norm.bias"])
    return pool(leaky(out + short))


def plain_resnet(p: dict, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    for i in range(4):
        x = plain_block(p, f"{prefix}blocks.{i}.", x)
    return x.flatten(1)


# ---------------------------------------------------------------- shapes, parameters, config


def test_registered_and_presets_compose():
    from hydra import compose
    from metalearn import confdir

    assert backbone_module("resnet12") is resnet12
    with confdir.initialized():
        runs = {o: to_run_config(compose("config", overrides=[f"backbone={o}"])) for o in ("resnet12", "conv4_32", "conv4_64")}
        small = to_run_config(compose("config", overrides=["backbone=resnet12", "backbone.channels=[8,8,16,16]"]))
    assert runs["resnet12"].backbone == resnet12.Config()
    assert small.backbone.channels == [8, 8, 16, 16]
    # the conv4 presets: a file name that is not the module's name
    for option, hidden, features in (("conv4_32", 32, 800), ("conv4_64", 64, 1600)):
        cfg = runs[option].backbone
        assert (cfg.name, cfg.hidden, cfg.layers, cfg.norm) == ("conv4", hidden, 4, "batch")
        net = backbone_module(cfg.name).build(cfg, (3, 84, 84))
        assert net.out_features == features and net.out_shape == (hidden, 5, 5)


@pytest.mark.parametrize(
    "input_shape,kw,shape",
    [
        ((3, 84, 84), {}, (640, 5, 5)),  # MetaOptNet's miniImageNet features: 16000
        ((3, 84, 84), {"avg_pool": True}, (640, 1, 1)),
        ((3, 32, 32), {}, (640, 2, 2)),  # CIFAR-FS / FC100
        ((3, 84, 84), {"channels": [4, 8, 8, 8]}, (8, 5, 5)),
        ((3, 32, 32), {"channels": [4, 8, 8, 8]}, (8, 2, 2)),
        ((3, 32, 32), {"channels": [4, 8, 8, 8], "avg_pool": True}, (8, 1, 1)),
        ((1, 28, 28), {"channels": [4, 8, 8, 8]}, (8, 1, 1)),  # 28 -> 14 -> 7 -> 3 -> 1
        ((2, 20, 36), {"channels": [4, 4, 6, 6]}, (6, 1, 2)),  # not square
    ],
)
def test_output_shapes(input_shape, kw, shape):
    torch.manual_seed(0)
    net = build(input_shape, **kw)
    assert net.out_shape == shape and net.out_features == math.prod(shape)
    x = torch.rand(2, 2, *input_shape)
    assert net(x[0]).shape == (2, net.out_features)
    assert net(x).shape == (2, 2, net.out_features)


def test_parameters_no_buffers_and_init():
    torch.manual_seed(0)
    net = build((3, 84, 84))
    assert list(net.buffers()) == []
    params = dict(net.named_parameters())
    assert len(params) == 4 * (4 + 4 * 2)  # per block: 3 convs + shortcut conv, 4 BatchNorms (weight, bias); no conv biases
    assert sum(p.numel() for p in params.values()) == 12_424_320  # MetaOptNet's ResNet-12: 12.4M
    assert sum(p.dim() == 4 and p.shape[-1] == 3 for p in params.values()) == 12  # the 12 layers
    assert params["blocks.0.convs.0.weight"].shape == (64, 3, 3, 3)
    assert params["blocks.3.shortcut.weight"].shape == (640, 320, 1, 1)
    for name, p in params.items():
        if "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    # kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu"): std sqrt(2 / (out_channels * k * k))
    w = params["blocks.3.convs.1.weight"]
    assert abs(float(w.detach().std()) / math.sqrt(2 / (640 * 9)) - 1) < 0.02


@pytest.mark.parametrize(
    "kw,input_shape,match",
    [
        ({"channels": [64, 160, 320]}, (3, 84, 84), "backbone.channels"),
        ({"channels": [4, 0, 8, 8]}, (3, 84, 84), "backbone.channels"),
        ({"drop_rate": 1.0}, (3, 84, 84), "backbone.drop_rate"),
        ({"drop_rate": -0.1}, (3, 84, 84), "backbone.drop_rate"),
        ({"dropout": 1.5}, (3, 84, 84), "backbone.dropout"),
        ({"block_size": 0}, (3, 84, 84), "backbone.block_size"),
        ({}, (1, 12, 12), "16px"),
    ],
)
def test_build_errors(kw, input_shape, match):
    with pytest.raises(ConfigError, match=match) as e:
        build(input_shape, **kw)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- against the plain re-computation


def test_block_matches_plain_ops():
    net = tiny()
    block = net.blocks[1]
    x = torch.randn(6, TINY[0], 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = {f"blocks.1.{k}": v for k, v in block.named_parameters()}
    torch.testing.assert_close(block(x, 1), plain_block(p, "blocks.1.", x), rtol=1e-10, atol=1e-10)
    # the shortcut matters: without it the block computes something else
    p_no_short = {**p, "blocks.1.shortcut_norm.weight": torch.zeros_like(p["blocks.1.shortcut_norm.weight"]),
                  "blocks.1.shortcut_norm.bias": torch.zeros_like(p["blocks.1.shortcut_norm.bias"])}
    assert not torch.allclose(plain_block(p_no_short, "blocks.1.", x), block(x, 1), atol=1e-3)


def test_network_matches_plain_ops(fold):
    net, x = tiny(), tasks_input()
    p = dict(net.named_parameters())
    expected = torch.stack([plain_resnet(p, task) for task in x])
    torch.testing.assert_close(net(x), expected, rtol=1e-10, atol=1e-10)
    avg = tiny(avg_pool=True)
    torch.testing.assert_close(avg(x[0]), expected[0], rtol=1e-10, atol=1e-10)  # 16px: the last map is 1x1 anyway
    net84 = tiny((1, 40, 40), avg_pool=True)
    x40 = torch.rand(4, 1, 40, 40, dtype=torch.float64)
    full = plain_resnet(dict(net84.named_parameters()), x40).view(4, TINY[-1], 2, 2)
    torch.testing.assert_close(net84(x40), full.mean(dim=(2, 3)), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- per-task BatchNorm


def test_batched_forward_equals_separate_tasks(fold):
    net, x = tiny(), tasks_input()
    out = net(x)
    torch.testing.assert_close(out, torch.stack([net(task) for task in x]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net(x[1:2]), out[1:2], rtol=1e-10, atol=1e-10)
    y = x.clone()
    y[1] = y[1] * 5 + 3  # another task's inputs leave a task's outputs alone
    torch.testing.assert_close(net(y)[0], out[0], rtol=1e-10, atol=1e-10)
    flat = net(x.flatten(0, 1)).view_as(out)  # while one flat batch shares its statistics
    assert not torch.allclose(flat, out, atol=1e-3)


def test_folded_and_task_by_task_agree_with_gradients(monkeypatch):
    net, x = tiny(), tasks_input()
    w = torch.randn(3, 5, TINY[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for fold_tasks in (True, False):
        monkeypatch.setattr(resnet12.ResNet12, "fold_tasks", fold_tasks)
        xi = x.clone().requires_grad_()
        out = net(xi)
        grads = torch.autograd.grad((out * w).sum(), [*net.parameters(), xi])
        results.append((out, grads))
    (out_a, g_a), (out_b, g_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_batch_statistics_at_eval_too():
    net, x = tiny(), tasks_input()
    train = net(x[0])
    net.eval()
    torch.testing.assert_close(net(x[0]), train)


def test_functional_call_with_substituted_parameters(fold):
    net, x = tiny(), tasks_input()
    g = torch.Generator().manual_seed(3)
    params = {k: (p + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)).detach().requires_grad_()
              for k, p in net.named_parameters()}
    out = functional_call(net, params, (x,))
    assert not torch.allclose(out, net(x), atol=1e-3)  # the dict's weights were used
    other = tiny(seed=5)
    other.load_state_dict({k: v.detach() for k, v in params.items()})
    torch.testing.assert_close(other(x), out.detach(), rtol=1e-10, atol=1e-10)
    # differentiable w.r.t. the dict, and the module's own weights get no gradient
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------- second-order MAML through it

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 2


def random_batch(seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        y = torch.arange(WAYS).repeat_interleave(k)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(TASKS)])

    sy, qy = labels(SHOTS), labels(QUERIES)
    protos = torch.rand(TASKS, WAYS, 2, 16, 16, generator=g, dtype=torch.float64)

    def images(y):
        base = protos[torch.arange(TASKS)[:, None], y]
        return 0.6 * base + 0.4 * torch.rand(base.shape, generator=g, dtype=torch.float64)

    return TaskBatch(images(sy), sy, images(qy), qy, torch.stack([torch.arange(WAYS)] * TASKS))


def tiny_maml(**cfg) -> maml_mod.MAML:
    torch.manual_seed(0)
    backbone = resnet12.build(resnet12.Config(channels=TINY), (2, 16, 16))
    algo = maml_mod.build(maml_mod.Config(**cfg), backbone, ProblemInfo((2, 16, 16), WAYS, 10)).double()
    with torch.no_grad():
        for name, p in algo.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return algo


def hand_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    return plain_resnet(p, x, prefix="net.0.") @ p["net.1.weight"].T + p["net.1.bias"]


def hand_meta_loss(p: dict, batch: TaskBatch, steps: int, lr: float) -> float:
    losses = []
    for t in range(batch.num_tasks):
        q = {k: v.detach() for k, v in p.items()}
        for _ in range(steps):
            leaves = {k: v.clone().requires_grad_() for k, v in q.items()}
            with torch.enable_grad():
                loss = F.cross_entropy(hand_forward(leaves, batch.support_x[t]), batch.support_y[t])
                grads = torch.autograd.grad(loss, list(leaves.values()))
            q = {k: v - lr * gr for (k, v), gr in zip(q.items(), grads)}
        losses.append(F.cross_entropy(hand_forward(q, batch.query_x[t]), batch.query_y[t]))
    return float(torch.stack(losses).mean())


def test_maml_second_order_meta_gradient_matches_finite_differences():
    lr, steps = 0.1, 2
    algo, batch = tiny_maml(inner_lr=lr, inner_steps=steps), random_batch()
    p0 = {k: v.detach().clone() for k, v in algo.named_parameters()}
    algo.zero_grad(set_to_none=True)
    metrics = algo.meta_step(batch)
    grad = torch.cat([p.grad.flatten() for p in algo.parameters()])
    assert math.isclose(float(metrics["loss"].mean()), hand_meta_loss(p0, batch, steps, lr), rel_tol=1e-10)
    assert all(p.grad.abs().sum() > 0 for p in algo.parameters())

    fo = tiny_maml(inner_lr=lr, inner_steps=steps, first_order=True)
    fo.zero_grad(set_to_none=True)
    fo.meta_step(batch)
    fo_grad = torch.cat([p.grad.flatten() for p in fo.parameters()])

    theta = torch.cat([v.flatten() for v in p0.values()])

    def unflatten(vec):
        out, i = {}, 0
        for k, v in p0.items():
            out[k] = vec[i : i + v.numel()].view_as(v)
            i += v.numel()
        return out

    g = torch.Generator().manual_seed(4)
    directions = [d / d.norm() for d in (torch.randn(theta.shape, generator=g, dtype=theta.dtype) for _ in range(3))]
    offsets = {k: sum(v.numel() for v in list(p0.values())[:i]) for i, k in enumerate(p0)}
    # a first-block conv, a last-block shortcut, a BatchNorm weight, the head's bias, and random coordinates
    coords = [offsets["net.0.blocks.0.convs.0.weight"], offsets["net.0.blocks.3.shortcut.weight"] + 3,
              offsets["net.0.blocks.2.norms.1.weight"] + 1, theta.numel() - 1,
              *torch.randperm(theta.numel(), generator=g)[:5].tolist()]
    for i in coords:
        e = torch.zeros_like(theta)
        e[i] = 1.0
        directions.append(e)
    eps, differs = 1e-6, 0
    for d in directions:
        fd = (hand_meta_loss(unflatten(theta + eps * d), batch, steps, lr)
              - hand_meta_loss(unflatten(theta - eps * d), batch, steps, lr)) / (2 * eps)
        analytic = float(grad @ d)
        assert abs(fd - analytic) <= 1e-6 * (1 + abs(fd)), (fd, analytic)
        differs += abs(float(fo_grad @ d) - fd) > 1e-4 * (1 + abs(fd))
    assert differs >= len(directions) // 2  # the check can tell second order from first order


def test_maml_with_drop_block_is_reproducible():
    algo, batch = tiny_maml(inner_lr=0.1), random_batch()
    algo.net[0].drop_block, algo.net[0].dropout = True, 0.2
    grads = []
    for _ in range(2):
        torch.manual_seed(11)
        algo.zero_grad(set_to_none=True)
        algo.meta_step(batch)
        grads.append([p.grad.clone() for p in algo.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    plain = tiny_maml(inner_lr=0.1)
    plain.meta_step(batch)
    assert any(not torch.allclose(a, p.grad) for a, p in zip(grads[0], plain.parameters()))


# ---------------------------------------------------------------- DropBlock


def expected_drop_fraction(h: int, w: int, b: int, gamma: float) -> float:
    """A unit is dropped unless no block corner that covers it is drawn; corners lie where a block fits."""
    def covering(size):
        return torch.tensor([min(i, size - b) - max(0, i - b + 1) + 1 for i in range(size)], dtype=torch.float64)

    k = covering(h)[:, None] * covering(w)[None, :]
    return float((1 - (1 - gamma) ** k).mean())


def is_union_of_blocks(dropped: torch.Tensor, b: int) -> bool:
    """[N, C, H, W] 0/1: every dropped unit lies in a b x b square of dropped units inside the map."""
    full = -F.max_pool2d(-dropped, b, stride=1)  # 1 where the whole b x b square from here is dropped
    regrown = F.max_pool2d(F.pad(full, (b - 1, b - 1, b - 1, b - 1)), b, stride=1)
    return torch.equal(regrown, dropped)


@pytest.mark.parametrize("size,b,rate", [(10, 5, 0.1), (5, 5, 0.1), (21, 5, 0.3), (8, 3, 0.2), (3, 5, 0.1)])
def test_drop_block_fraction_shape_and_scale(size, b, rate):
    torch.manual_seed(0)
    x = torch.ones(2 * 64, 64, size, size, dtype=torch.float64)
    out = resnet12.drop_block(x, rate, b, tasks=2)
    dropped = (out == 0).double()
    bb = min(b, size)  # clipped to the map
    gamma = rate / bb**2 * size**2 / (size - bb + 1) ** 2  # the DropBlock paper's eq. (1)
    expected = expected_drop_fraction(size, size, bb, gamma)
    assert abs(float(dropped.mean()) - expected) < 0.01, (float(dropped.mean()), expected)
    assert expected <= rate + 1e-12 and expected > 0.6 * rate  # overlapping blocks drop a little less than the rate
    assert is_union_of_blocks(dropped, bb)
    # kept units are scaled by (units / kept units) of their task
    for t in range(2):
        task_out, task_kept = out[64 * t : 64 * (t + 1)], 1 - dropped[64 * t : 64 * (t + 1)]
        scale = task_kept.numel() / task_kept.sum()
        torch.testing.assert_close(task_out[task_kept.bool()], torch.full_like(task_out[task_kept.bool()], float(scale)))


def test_block_check_catches_scattered_drops():
    scattered = (torch.rand(4, 4, 10, 10, generator=torch.Generator().manual_seed(0)) < 0.1).double()
    assert not is_union_of_blocks(scattered, 5) and is_union_of_blocks(scattered, 1)


def test_drop_block_in_the_network():
    # channels of 64 in block 4; at 84x84 its map is 5x5 = the block size: whole maps are dropped with p = drop_rate
    kw = dict(channels=[4, 4, 4, 64], drop_block=True, drop_rate=0.1, block_size=5)
    net = tiny((3, 84, 84), **kw)
    ref = tiny((3, 84, 84), channels=[4, 4, 4, 64])
    x = torch.rand(8, 3, 84, 84, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = net(x)
    maps = out.view(8, 64, 25)
    zero_maps = (maps == 0).all(-1).double().mean()
    assert abs(float(zero_maps) - 0.1) < 0.05
    assert int((maps == 0).sum()) == int((maps == 0).all(-1).sum()) * 25  # only whole maps are zero
    torch.manual_seed(5)
    assert torch.equal(net(x), out)  # reproducible under the seed
    torch.manual_seed(6)
    assert not torch.equal(net(x), out)
    net.eval()  # off in eval mode: the network without any drop
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
    ref.train()
    ref_train = ref(x)  # no drop configured: train and eval mode agree
    ref.eval()
    torch.testing.assert_close(ref(x), ref_train, rtol=0, atol=0)


def test_dropout_option():
    net = tiny(dropout=0.5)
    ref = tiny()
    x = tasks_input()[0]
    torch.manual_seed(0)
    a = net(x)
    assert not torch.allclose(a, ref(x), atol=1e-3)
    torch.manual_seed(0)
    assert torch.equal(net(x), a)
    net.eval()
    torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_runs(cli, tmp_path_factory) -> dict:
    """TINY training runs through ``metalearn train``: resnet12 with maml and protonet, and conv4_32."""
    cwd = tmp_path_factory.mktemp("resnet12")
    fast = [a for a in cli.TINY if not a.startswith("backbone.")]
    small = ["backbone=resnet12", "backbone.channels=[8,8,16,16]"]
    jobs = {
        "maml": (["train", "algo=maml", *small, *fast, f"hydra.run.dir={cwd / 'maml'}"], cwd),
        "protonet": (["train", "algo=protonet", *small, *fast, f"hydra.run.dir={cwd / 'protonet'}"], cwd),
        "conv4_32": (["train", "algo=protonet", "backbone=conv4_32", *fast, f"hydra.run.dir={cwd / 'conv4_32'}"], cwd),
    }
    return {name: (proc, cwd / name) for name, proc in cli.run_many(jobs).items()}


@pytest.mark.parametrize("name", ["maml", "protonet", "conv4_32"])
def test_trains_through_the_cli(name, cli, cli_runs):
    proc, run_dir = cli_runs[name]
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1 and results["test"]["accuracy"]["episodes"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    prefix = "net.0." if name == "maml" else "backbone."
    if name == "conv4_32":
        backbone = ckpt["config"]["backbone"]
        assert (backbone["name"], backbone["hidden"], backbone["layers"], backbone["norm"]) == ("conv4", 32, 4, "batch")
        assert ckpt["model"][f"{prefix}convs.0.weight"].shape == (32, 1, 3, 3)
    else:
        assert ckpt["config"]["backbone"]["name"] == "resnet12"
        assert ckpt["config"]["backbone"]["channels"] == [8, 8, 16, 16]
        assert ckpt["model"][f"{prefix}blocks.3.shortcut.weight"].shape == (16, 16, 1, 1)
