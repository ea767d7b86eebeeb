"""models/ops.py: the CPU shortcuts give the plain ops' values and gradients (first and second order),
and hostmem.py's malloc setting applies where it should."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from metalearn.models import ops


def grads(f, x, weight):
    """First derivative w.r.t. x, and the derivative of a function of it w.r.t. weight (second order)."""
    gx, = torch.autograd.grad((f(x) * weight).sum(), x, create_graph=True)
    gw, = torch.autograd.grad((gx ** 2).sum(), weight)
    return gx, gw


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 7), (2, 2, 3, 5), (1, 1, 2, 2)])
def test_max_pool2x2_is_max_pool2d_bitwise_ties_included(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[:, :, : shape[2] // 2 + 1, : shape[3] // 2 + 1] = 0.25  # constant patches: every window ties
    x[0, 0, -1, -1] = 7.0  # a maximum in a dropped odd row/column must be ignored, as max_pool2d does
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out_shape = F.max_pool2d(x, 2).shape
    w = torch.randn(out_shape, generator=g, requires_grad=True)
    assert torch.equal(ops.max_pool2x2(a), F.max_pool2d(b, 2))
    (ga, gwa), (gb, gwb) = grads(lambda t: ops.max_pool2x2(t) * w, a, w), grads(lambda t: F.max_pool2d(t, 2) * w, b, w)
    assert torch.equal(ga, gb) and torch.equal(gwa, gwb)


def conv_bn(x, w, b, gamma, beta, tasks):
    """The plain ops: a convolution, then BatchNorm with each task's batch statistics."""
    out = []
    for t, xt in enumerate(x.chunk(tasks)):
        pick = (lambda p: p[t]) if w.dim() == 5 else (lambda p: p)
        y = F.conv2d(xt, pick(w), pick(b), padding=w.shape[-1] // 2)
        out.append(F.batch_norm(y, None, None, pick(gamma), pick(beta), training=True, eps=1e-5))
    return torch.cat(out)


@pytest.mark.parametrize("tasks,stacked,channels", [(1, False, 1), (1, False, 3), (1, True, 1), (3, False, 2), (3, True, 1)])
def test_conv_batchnorm_equals_conv_then_batch_norm_to_second_order(tasks, stacked, channels):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks * 4, channels, 6, 7, generator=g, dtype=torch.float64)
    x[:, :, :2] = 0  # constant regions, as glyph backgrounds
    lead = (tasks,) if stacked else ()
    w = torch.randn(*lead, 5, channels, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b, gamma, beta = (torch.randn(*lead, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = ops.conv_batchnorm(x, w, b, gamma, beta, 1e-5, tasks)
    if stacked:  # models.functional's layout [n, T*C, H, W] -> [T*n, C, H, W]
        n = x.shape[0] // tasks
        got = got.view(n, tasks, 5, 6, 7).transpose(0, 1).reshape(tasks * n, 5, 6, 7)
    ref = conv_bn(x, w, b, gamma, beta, tasks)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    params = (w, b, gamma, beta)
    # first and second derivatives (second-order MAML differentiates an inner gradient)
    for out in (got, ref):
        first = torch.autograd.grad((out ** 3).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum((f ** 2).sum() for f in first), params)
        if out is got:
            got_first, got_second = first, second
    # relative to the largest entry: the plain ops' bias gradients are rounding noise around zero
    for mine, plain in ((got_first, first), (got_second, second)):
        scale = max(c.abs().max().item() for c in plain)
        for a, c in zip(mine, plain):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-10 * scale)
    # the bias cancels in BatchNorm: its gradient is exactly zero, and it stays in the graph
    assert torch.equal(got_first[1], torch.zeros_like(b))


def test_conv_batchnorm_float32_is_as_close_as_batch_norm_on_glyph_like_images():
    # 0/1 images, 75 x 28 x 28: a plain float32 matmul for the patch covariance was 4e-3 off here
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(75, 1, 28, 28, generator=g) > 0.87).float()
    w, b = torch.randn(64, 1, 3, 3, generator=g) * 0.3, torch.randn(64, generator=g) * 0.1
    gamma, beta = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    exact = conv_bn(x.double(), w.double(), b.double(), gamma.double(), beta.double(), 1)
    plain = conv_bn(x, w, b, gamma, beta, 1)
    fused = ops.conv_batchnorm(x, w, b, gamma, beta, 1e-5)
    # the patch statistics in float64: no further from float64 than the plain ops, on average and at worst
    assert (fused.double() - exact).abs().mean() <= (plain.double() - exact).abs().mean()
    assert (fused.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max()


def test_batch_norm_channels_last_equals_batch_norm_to_second_order():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 7, 7, generator=g, dtype=torch.float64)
    x[:, :, :3] = 0.5  # constant regions
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got, want = ops.batch_norm(x, w, b, 1e-5), F.batch_norm(x.contiguous(), None, None, w, b, True, eps=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)
    derivatives = []
    for out in (got, want):
        first = torch.autograd.grad((out ** 3).sum(), (x, w, b), create_graph=True)
        derivatives.append(first + torch.autograd.grad(sum((f ** 2).sum() for f in first), (x, w, b)))
    for mine, plain in zip(*derivatives):
        torch.testing.assert_close(mine, plain, rtol=1e-9, atol=1e-9)


def test_batch_norm_channels_last_float32_is_as_close_as_nchw():
    """PyTorch's channels-last CPU BatchNorm (device.cpu_kernels=fast) sums its statistics in one float32
    pass; ops.batch_norm's statistics are as close to float64 as the NCHW kernel's."""
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(75, 64, 14, 14, generator=g)) + 2.0  # a ReLU'd block input, offset: long sums
    w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    exact = F.batch_norm(x.double(), None, None, w.double(), b.double(), True, eps=1e-5)
    cl = x.contiguous(memory_format=torch.channels_last)
    off = {name: (out.double() - exact).abs().max().item() for name, out in [
        ("nchw", F.batch_norm(x, None, None, w, b, True, eps=1e-5)), ("ours", ops.batch_norm(cl, w, b, 1e-5)),
        ("fast", ops.batch_norm(cl, w, b, 1e-5, kernels="fast"))]}
    assert off["ours"] <= 2 * off["nchw"], off
    assert off["fast"] > 4 * off["nchw"], off  # what device.cpu_kernels=fast documents


@pytest.mark.parametrize("channels", [1, 3])
def test_conv4_on_cpu_equals_the_plain_ops_to_second_order(channels):
    """conv4 a task at a time on CPU: channels-last blocks, the first one fused with its BatchNorm and
    computed as a matmul, native max-pooling; the plain NCHW ops' values and derivatives."""
    from metalearn.models import conv4

    torch.manual_seed(0)
    net = conv4.build(conv4.Config(hidden=8, layers=3), (channels, 12, 12)).double()
    with torch.no_grad():
        for norm in net.norms:  # BatchNorm affine parameters away from 1 and 0
            norm.weight.add_(0.3 * torch.randn(8, dtype=torch.float64))
            norm.bias.add_(0.3 * torch.randn(8, dtype=torch.float64))
    x = torch.randn(2, 6, channels, 12, 12, dtype=torch.float64)  # two tasks
    x[:, :, :, :4] = 0  # constant regions: max-pooling ties
    params = list(net.parameters())
    outs = {"ours": net(x), "plain": torch.stack([_plain_conv4(net, task) for task in x])}
    torch.testing.assert_close(outs["ours"], outs["plain"], rtol=1e-12, atol=1e-12)
    derivatives = {}
    for name, out in outs.items():
        first = torch.autograd.grad((out ** 2).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum((f ** 2).sum() for f in first), params)
        derivatives[name] = first + second
    scale = max(d.abs().max().item() for d in derivatives["plain"])
    for mine, plain in zip(derivatives["ours"], derivatives["plain"]):
        torch.testing.assert_close(mine, plain, rtol=0, atol=1e-10 * scale)


def test_conv4_on_cpu_takes_inputs_of_any_memory_layout():
    """Channel slices, transposed, cropped and expanded inputs: the values of their contiguous copies."""
    from metalearn.models import conv4

    torch.manual_seed(0)
    grey = conv4.build(conv4.Config(hidden=8, layers=2), (1, 10, 10)).double()
    big = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    img = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    inputs = [big[:, 1:2, 1:-1, 1:-1], big[:, :1, 1:-1, 1:-1].transpose(2, 3), big[::2, 2:, :10, 2:],
              img.expand(3, 1, 10, 10), torch.randn(3, 2, 1, 10, 10, dtype=torch.float64).transpose(0, 1)]
    for x in inputs:
        torch.testing.assert_close(grey(x), grey(x.contiguous()), rtol=1e-12, atol=1e-12)


def test_conv4_runs_channels_last_on_cpu_a_task_at_a_time(monkeypatch):
    from metalearn.models import conv4

    seen = []
    pool = ops.max_pool2x2
    monkeypatch.setattr(ops, "max_pool2x2", lambda h: seen.append(h.is_contiguous(memory_format=torch.channels_last))
                        or pool(h))
    net = conv4.build(conv4.Config(hidden=8, layers=3), (1, 12, 12))
    net(torch.randn(2, 4, 1, 12, 12))
    assert seen == [True] * 6  # 2 tasks x 3 blocks


def _plain_conv4(net, x):
    for conv, norm in zip(net.convs, net.norms):
        x = F.relu(F.max_pool2d(F.batch_norm(conv(x), None, None, norm.weight, norm.bias, True, eps=norm.eps), 2))
    return x.flatten(1)


def test_retain_freed_memory_applies_once_and_can_be_switched_off():
    code = "from metalearn import hostmem; print(hostmem.retain_freed_memory(), hostmem.retain_freed_memory())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"METALEARN_RETAIN_HOST_MEMORY": "0", "PATH": ""})
    expected = "True True" if sys.platform.startswith("linux") else "False False"
    assert on.stdout.split() == expected.split()
    assert off.stdout.split() == ["False", "False"]
