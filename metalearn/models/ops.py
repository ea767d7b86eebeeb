"""Exact CPU shortcuts for conv4's blocks, found by profiling second-order MAML (issue #5).

On CPU, a task's first block dominates the meta-step: its activations (75 queries x 64
channels x 28x28 = 15 MB) are the largest, and the native NCHW kernels that touch them are
slow there. The functions below compute the same values and gradients (first and second
order) as the plain ops, with less memory traffic:

* ``channels_last``: conv4 runs a task at a time in channels-last memory order on CPU
  (``Conv4._features``). There PyTorch's max-pooling kernel is vectorised over channels: the
  forward and backward of the first block's 2x2 pooling took 7.7 ms against 30 ms (``_MaxPool2x2``
  below) and 33 ms (native NCHW) on one thread, and the 64-channel convolutions are faster too. The cost
  is float32 rounding: PyTorch's channels-last BatchNorm on CPU sums its statistics in one float32
  pass, and the meta-gradient ends further from the exact one than NCHW's (README, Speed: 40x for
  ProtoNet, 20x for 5-step MAML on glyphs); in float64 the values and derivatives are the plain
  ops' (tests).
* ``max_pool2x2``: ``F.max_pool2d(x, 2)``; native for channels-last tensors. For NCHW ones (the
  folded tasks of ``models.functional``) the native CPU forward (it also writes int64 indices,
  one scalar loop per output) took as long as a 64-channel convolution; here the maximum is three
  elementwise ``maximum`` of the four strided corners, and the indices, with ``max_pool2d``'s
  rule for ties (first in row-major order), come from three comparisons. The backward is the
  native ``max_pool2d_with_indices_backward``, so the double backward is native as well, and
  ties (glyph backgrounds are constant) resolve exactly as with ``F.max_pool2d``: same values
  and bitwise the same gradients.
* ``conv_batchnorm``: ``batch_norm(conv2d(x, w, b))`` with batch statistics, when ``x``
  needs no gradient (the input images). Per output channel c the batch mean is
  ``w_c . m + b_c`` and the variance ``w_c^T S w_c``, with m and S the mean and covariance
  of the input's patches, constants of the batch. So the block is one convolution with
  weights ``w * s`` and bias ``beta - s * (w . m)``, ``s = gamma / sqrt(var + eps)``; the
  BatchNorm pass over the large output and its backward (and, for MAML, its double
  backward) disappear. For one task the convolution is a matmul of the patches (made for the
  statistics anyway) whose result is already channels-last. Equal up to float rounding
  (float64 tests: 1e-12).

All are used on CPU only (``enabled``); on accelerators the native kernels are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def enabled(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        even = x[..., : H // 2 * 2, : W // 2 * 2]  # floor mode: a last odd row/column is dropped
        a, b, c, d = even[..., 0::2, 0::2], even[..., 0::2, 1::2], even[..., 1::2, 0::2], even[..., 1::2, 1::2]
        out = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        h, w = out.shape[-2:]
        # Flat index into the H x W plane of the window's first maximum, as max_pool2d writes it.
        corner = torch.arange(h, device=x.device).mul_(2 * W).view(h, 1) + torch.arange(w, device=x.device).mul_(2)
        index = torch.where(a == out, 0, torch.where(b == out, 1, torch.where(c == out, W, W + 1))).add_(corner)
        ctx.save_for_backward(x, index)
        ctx.mark_non_differentiable(index)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, index = ctx.saved_tensors
        # A native op with its own derivative: second-order MAML differentiates through it.
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in channels-last memory order (a view of a contiguous x with one channel)."""
    if x.shape[1] == 1:  # contiguous(memory_format=...) keeps NCHW strides for one channel
        n, _, h, w = x.shape
        return x.contiguous().view(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for [N, C, H, W]: the same values and gradients, faster on CPU."""
    if not enabled(x) or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)  # channels-last: the native kernel is vectorised over channels, 14x ours
    return _MaxPool2x2.apply(x)


def _covariance(centred: torch.Tensor, block: int = 64) -> torch.Tensor:
    """[T, N, D] centred rows -> [T, D, D] biased covariance (BatchNorm's). One float32 matmul over
    N = 58,800 patches was 6e-4 off in relative terms (it sums naively); products over blocks of 64
    rows, then a pairwise sum of the blocks, are 5e-7 off, about as close as BatchNorm's own kernel."""
    tasks, n, d = centred.shape
    rows = F.pad(centred, (0, 0, 0, -n % block))  # zero rows add nothing
    blocks = rows.view(tasks, -1, block, d)
    return (blocks.transpose(2, 3) @ blocks).sum(1) / n


def conv_batchnorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                   beta: torch.Tensor, eps: float, tasks: int = 1) -> torch.Tensor:
    """``batch_norm(conv2d(x, weight, bias, padding=1))`` with each task's batch statistics, for an
    ``x`` without gradient, as one convolution (see the module docstring).

    ``x``: [T*n, C_in, H, W] holding ``tasks`` contiguous tasks. ``weight`` [C, C_in, k, k], ``bias``,
    ``gamma`` and ``beta`` [C] are shared by the tasks, or stacked per task: [T, C, C_in, k, k] and [T, C]
    (then the result is ``models.functional``'s layout, [n, T*C, H, W], tasks side by side in channels).
    """
    stacked = weight.dim() == 5
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"conv_batchnorm keeps the image size (padding k // 2): odd kernels only, got {k}")
    # The statistics in the weights' precision even under bf16 autocast: an error in them shifts a whole channel.
    with torch.autocast(x.device.type, enabled=False):
        patches = F.unfold(x.to(weight.dtype), k, padding=k // 2)  # [T*n, C_in*k*k, H*W]
        d = patches.shape[1]
        patches = patches.view(tasks, -1, d, patches.shape[-1]).transpose(2, 3).reshape(tasks, -1, d)  # [T, N, D]
        mean = patches.mean(1)  # [T, D]
        cov = _covariance(patches - mean.unsqueeze(1))  # [T, D, D]
        w = weight.flatten(-3) if stacked else weight.flatten(1).expand(tasks, -1, -1)  # [T, C, D]
        var = ((w @ cov) * w).sum(-1)  # [T, C]
        scale = (gamma if stacked else gamma.expand(tasks, -1)) * torch.rsqrt(var + eps)
        b = bias if stacked else bias.expand(tasks, -1)
        # The mean is w.m + b, so the bias cancels; writing it out keeps ``bias`` in the graph (gradient 0).
        shift = (beta if stacked else beta.expand(tasks, -1)) + scale * (b - ((w @ mean.unsqueeze(-1)).squeeze(-1) + b))
        fused = (w * scale.unsqueeze(-1)).reshape(-1, *weight.shape[-3:])  # [T*C, C_in, k, k]
    if tasks == 1:
        # The convolution as one matmul of the patches made above, with a column of ones for the shift
        # (no separate passes over the output for the bias and its gradient): [N*H*W, C], the
        # channels-last layout the next blocks run in; its weight gradient is one GEMM (oneDNN's
        # channels-last convolution of one input channel summed it 100x less accurately in float32).
        # The backward keeps the patches (C_in * k * k + 1 values per pixel) where conv2d kept the input.
        n, _, h, w_ = x.shape
        ones = patches.new_ones(patches.shape[1], 1)
        out = torch.cat([patches[0], ones], 1) @ torch.cat([fused.flatten(1), shift.view(-1, 1)], 1).t()
        return out.view(n, h, w_, -1).permute(0, 3, 1, 2)
    n = x.shape[0] // tasks
    grouped = x.view(tasks, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])  # [n, T*C_in, H, W]
    out = F.conv2d(grouped, fused, shift.reshape(-1), padding=k // 2, groups=tasks)  # [n, T*C, H, W]
    if stacked:
        return out
    c = weight.shape[0]
    return out.view(n, tasks, c, *out.shape[2:]).transpose(0, 1).reshape(tasks * n, c, *out.shape[2:])
