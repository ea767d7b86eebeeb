"""conv4: output sizes, and per-task BatchNorm for [T, n, C, H, W] input."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metalearn.errors import ConfigError
from metalearn.models import backbone_module
from metalearn.models import conv4


@pytest.fixture(autouse=True, params=[True, False], ids=["folded", "task-by-task"])
def fold_tasks(request, monkeypatch):
    """Every test runs on both paths for [T, n, ...] input: one big batch (the GPU default) and the task loop."""
    monkeypatch.setattr(conv4.Conv4, "fold_tasks", request.param)


def build(input_shape=(1, 28, 28), **kw) -> conv4.Conv4:
    return conv4.build(conv4.Config(**kw), input_shape)


def test_registered():
    assert backbone_module("conv4") is conv4


@pytest.mark.parametrize(
    "input_shape,kw,features",
    [
        ((1, 28, 28), {}, 64),
        ((3, 84, 84), {"hidden": 64}, 1600),
        ((1, 28, 28), {"hidden": 32}, 32),
        ((1, 8, 8), {"hidden": 4, "layers": 2}, 16),
        ((2, 20, 36), {"hidden": 5, "layers": 3}, 5 * 2 * 4),  # not square, odd sizes on the way
        ((1, 30, 30), {"hidden": 8, "layers": 4, "norm": "none"}, 8),
    ],
)
def test_output_shapes(input_shape, kw, features):
    torch.manual_seed(0)
    net = build(input_shape, **kw)
    assert net.out_features == features
    x = torch.rand(3, *input_shape)
    assert net(x).shape == (3, features)
    assert net(torch.rand(2, 3, *input_shape)).shape == (2, 3, features)


def test_no_buffers_and_parameters():
    net = build(hidden=8)
    assert list(net.buffers()) == []
    names = dict(net.named_parameters())
    assert len(names) == 4 * 4  # conv weight, conv bias, norm weight, norm bias per layer
    assert names["norms.0.weight"].shape == (8,)
    plain = build(hidden=8, norm="none")
    assert plain.norms is None and len(dict(plain.named_parameters())) == 4 * 2


def test_build_errors():
    with pytest.raises(ConfigError, match="norm"):
        build(norm="layer")
    with pytest.raises(ConfigError, match="16px"):
        build((1, 12, 12), layers=4)
    with pytest.raises(ConfigError):
        build(hidden=0)


def _tiny(norm="batch", seed=0) -> conv4.Conv4:
    torch.manual_seed(seed)
    net = build((2, 16, 16), hidden=6, layers=3, norm=norm).double()
    # non-trivial affine parameters, so the BatchNorm weights matter
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def _tasks(T=3, n=5, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, n, 2, 16, 16, generator=g, dtype=torch.float64)
    # tasks with very different statistics, so a shared normalisation would show
    return x * torch.tensor([1.0, 3.0, 0.2]).view(T, 1, 1, 1, 1)[:T] + torch.tensor([0.0, -1.0, 2.0]).view(T, 1, 1, 1, 1)[:T]


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_batched_forward_equals_separate_tasks(norm):
    net, x = _tiny(norm), _tasks()
    out = net(x)
    sep = torch.stack([net(x[t]) for t in range(x.shape[0])])
    assert out.shape == sep.shape == (3, 5, 6 * 2 * 2)
    torch.testing.assert_close(out, sep, rtol=1e-10, atol=1e-10)


def test_batched_normalises_per_task():
    net, x = _tiny(), _tasks()
    out = net(x)
    # changing another task's inputs leaves a task's outputs alone
    y = x.clone()
    y[1] = y[1] * 5 + 3
    torch.testing.assert_close(net(y)[0], out[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net(y)[2], out[2], rtol=1e-10, atol=1e-10)
    # while all examples of one flat batch share statistics
    flat = net(x.reshape(-1, *x.shape[2:])).view_as(out)
    assert not torch.allclose(flat, out, atol=1e-3)


def test_batchnorm_uses_batch_statistics_at_eval_too():
    net, x = _tiny(), _tasks()
    train = net(x[0])
    net.eval()
    torch.testing.assert_close(net(x[0]), train)
    # first layer's normalised activations: zero mean, unit variance per channel (before the affine)
    bn = net.norms[0]
    h = net.convs[0](x[0])
    y = (bn(h, 1) - bn.bias.view(1, -1, 1, 1)) / bn.weight.view(1, -1, 1, 1)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(6, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), correction=0), torch.ones(6, dtype=torch.float64), atol=1e-3, rtol=0)


def _grads(params, x, w, fn):
    """Gradients of <fn(x), w> w.r.t. the parameters and the input."""
    x = x.clone().requires_grad_()
    loss = (fn(params, x) * w).sum()
    gs = torch.autograd.grad(loss, [*params.values(), x])
    return gs[:-1], gs[-1]


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_batched_gradients_equal_separate_tasks(norm):
    net, x = _tiny(norm), _tasks()
    params = dict(net.named_parameters())
    w = torch.randn(3, 5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    call = lambda p, inp: functional_call(net, p, (inp,))  # noqa: E731
    g_batched, gx_batched = _grads(params, x, w, call)
    g_sep = [torch.zeros_like(p) for p in params.values()]
    gx_sep = []
    for t in range(3):
        g, gx = _grads(params, x[t], w[t], call)
        g_sep = [a + b for a, b in zip(g_sep, g)]
        gx_sep.append(gx)
    for name, a, b in zip(params, g_batched, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(gx_batched, torch.stack(gx_sep), rtol=1e-9, atol=1e-10)
    # the same through the module's own .grad
    net.zero_grad(set_to_none=True)
    (net(x) * w).sum().backward()
    for (name, p), b in zip(net.named_parameters(), g_sep):
        torch.testing.assert_close(p.grad, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_functional_call_with_modified_parameters(norm):
    net, x = _tiny(norm), _tasks()
    g = torch.Generator().manual_seed(3)
    params = {k: (p + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)).detach().requires_grad_()
              for k, p in net.named_parameters()}
    out = functional_call(net, params, (x,))
    sep = torch.stack([functional_call(net, params, (x[t],)) for t in range(3)])
    torch.testing.assert_close(out, sep, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, net(x), atol=1e-3)  # the dict's weights were used
    # the module's own weights are untouched and equal to a copy loaded with the dict
    other = _tiny(norm, seed=5)
    other.load_state_dict({k: v.detach() for k, v in params.items()})
    torch.testing.assert_close(other(x), out.detach(), rtol=1e-10, atol=1e-10)
    # gradients w.r.t. the dict: batched == sum over tasks
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gb = torch.autograd.grad((out * w).sum(), list(params.values()))
    gs = torch.autograd.grad((sep * w).sum(), list(params.values()))
    for name, a, b in zip(params, gb, gs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert all(p.grad is None for p in net.parameters())


def test_batched_result_does_not_depend_on_task_count():
    net, x = _tiny(), _tasks()
    full = net(x)
    torch.testing.assert_close(net(x[:2]), full[:2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net(x[1:2]), full[1:2], rtol=1e-10, atol=1e-10)


def test_float32_batched_matches_separate():
    torch.manual_seed(0)
    net = build((1, 28, 28), hidden=16)
    x = torch.rand(4, 10, 1, 28, 28)
    torch.testing.assert_close(net(x), torch.stack([net(x[t]) for t in range(4)]), rtol=1e-4, atol=1e-5)
