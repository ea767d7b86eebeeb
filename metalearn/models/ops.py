"""CPU shortcuts for conv4's blocks, as exact in float32 as the plain NCHW ops (issues #5, #15).

On CPU, a task's first block dominates the meta-step: its activations (75 queries x 64 channels x 28x28
= 15 MB) are the largest, and the native NCHW kernels that touch them are slow there. The functions
below compute the same values and gradients (first and second order) with less memory traffic, and
round no worse than the plain ops (tests/test_exactness.py):

* ``channels_last``: conv4 runs a task at a time in channels-last memory order on CPU
  (``Conv4._features``). There PyTorch's max-pooling kernel is vectorised over channels (the first
  block's pooling, forward and backward: 7.7 ms against 33 ms in NCHW, one thread), and the 64-channel
  convolutions are faster too (their float32 sums are as close to float64 as NCHW's).
* ``batch_norm``: PyTorch's channels-last CPU BatchNorm sums each channel's statistics in one running
  float32 sum over N*H*W values: it moved the activations 300x as far from float64 as NCHW's kernel
  ([75, 64, 14, 14], tests/test_ops.py: 3.1e-4 against 1.0e-6 at worst; ours 1.4e-6), and the
  near-ties that max-pooling and ReLU decide on with them, so float32 meta-gradients flipped more of
  those decisions (5-shot 5-step MAML: 4.0e-3 of the largest entry off float64, against 1.3e-5). Here
  the statistics are cascaded ``sum`` reductions in two passes (mean, then centred squares), the
  output one multiply-add, and the backward the native ``native_batch_norm_backward`` given those statistics (its
  derivative is native too). ``device.cpu_kernels=fast`` keeps PyTorch's kernel (README, Speed).
* ``max_pool2x2``: ``F.max_pool2d(x, 2)``; native for channels-last tensors. For NCHW ones (the
  folded tasks of ``models.functional``) the native CPU forward (it also writes int64 indices,
  one scalar loop per output) took as long as a 64-channel convolution; here the maximum is three
  elementwise ``maximum`` of the four strided corners, and the indices, with ``max_pool2d``'s
  rule for ties (first in row-major order), come from three comparisons. The backward is the
  native ``max_pool2d_with_indices_backward``, so the double backward is native as well, and
  ties (glyph backgrounds are constant) resolve exactly as with ``F.max_pool2d``: same values
  and bitwise the same gradients. ``pool_relu`` ends a block: the pooling, then the ReLU.
* ``conv_batchnorm``: ``batch_norm(conv2d(x, w, b))`` with batch statistics, when ``x``
  needs no gradient (the input images). Per output channel c the batch mean is
  ``w_c . m + b_c`` and the variance ``w_c^T S w_c``, with m and S the mean and covariance
  of the input's patches, constants of the batch (summed in float64). So the block is one
  convolution with weights ``w * s`` and bias ``beta - s * (w . m)``, ``s = gamma / sqrt(var + eps)``;
  the BatchNorm pass over the large output and its backward (and, for MAML, its double
  backward) disappear. For one task the convolution is a matmul of the patches (made for the
  statistics anyway) whose result is already channels-last. Its outputs are half as far from
  float64 as native conv + BatchNorm's (float64 tests: equal to 1e-12).

``Decisions`` measures: it records a float32 run's max-pool and ReLU decisions and replays them in
float64, so that rounding can be told from the flips of near-ties (scripts/bench_meta_step.py, tests).
All shortcuts are used on CPU only (``enabled``); on accelerators the native kernels are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalearn.errors import ConfigError


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


KERNELS = ("exact", "fast")


class _BatchNorm(torch.autograd.Function):
    """BatchNorm with batch statistics whose sums are as exact as the NCHW kernel's, for channels-last CPU
    tensors. PyTorch's channels-last CPU kernel sums each channel's statistics in one running float32 sum
    over N*H*W values; here they are ``sum`` reductions (PyTorch's CPU sum adds in cascades) in two passes,
    mean, then the centred values and their squares. The output is one multiply-add of the centred values; the backward is the native
    ``native_batch_norm_backward`` given these statistics, and its own derivative is native as well
    (second-order MAML differentiates it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        n, dims = x.numel() // x.shape[1], (0, 2, 3)
        rough = x.sum(dims) / n
        centred = x - rough.view(1, -1, 1, 1)
        # The residual mean of the centred values corrects the first sum's rounding (to about the NCHW
        # kernel's, which adds in float64), and the variance is shifted by it: E[(x-r)^2] - E[x-r]^2.
        residual = centred.sum(dims) / n
        invstd = torch.rsqrt(((centred * centred).sum(dims) / n - residual.square()).clamp_(min=0) + eps)  # mul: 3x square's speed
        ctx.save_for_backward(x, weight, rough + residual, invstd)
        ctx.eps = eps
        # (x - r - residual) * scale + bias: x * scale + shift would lose the digits that the mean cancels
        scale = invstd * weight
        return torch.addcmul((bias - residual * scale).view(1, -1, 1, 1), centred, scale.view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True, ctx.eps,
                                                              list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, kernels: str = "exact"):
    """``F.batch_norm`` with batch statistics. For a channels-last float tensor on CPU, ``kernels="exact"``
    sums the statistics as exactly as NCHW does (``_BatchNorm``); ``"fast"`` (``device.cpu_kernels=fast``)
    keeps PyTorch's one-pass channels-last kernel."""
    if (kernels == "exact" and enabled(x) and x.dim() == 4 and x.dtype == weight.dtype == bias.dtype
            and x.dtype in (torch.float32, torch.float64) and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[1] > 1):
        return _BatchNorm.apply(x, weight, bias, eps)
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def pool_relu(x: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """The end of a conv4 block: ReLU of the 2x2 max-pool (pooling first gives the same values and gradients,
    ReLU is monotone and zero where it cuts, with the ReLU on 4x less data), or the ReLU alone. Its max and
    ReLU decisions can be recorded and replayed (``Decisions``)."""
    if _decisions is not None:
        return _decisions.block_end(x, pool)
    return F.relu(max_pool2x2(x) if pool else x)


def use_cpu_kernels(module: torch.nn.Module, kernels: str) -> None:
    """Set ``device.cpu_kernels`` (exact | fast) on every conv4 in ``module``."""
    if kernels not in KERNELS:
        raise ConfigError(f"device.cpu_kernels={kernels!r} is not one of: {', '.join(KERNELS)}")
    for m in module.modules():
        if hasattr(m, "cpu_kernels"):
            m.cpu_kernels = kernels


_decisions: Decisions | None = None


class Decisions:
    """A measuring instrument for float32 rounding: the max-pool and ReLU decisions of ``pool_relu``.

    Max-pooling and ReLU make a network piecewise smooth. A float32 run that rounds a near-tie (or a value
    near 0) the other way than exact arithmetic takes another piece, and its gradient jumps by a whole
    pixel's contribution: compared with a float64 run, such a flip dwarfs every rounding error and comes
    and goes with the data. ``record`` keeps each call's decisions (pooled index, ReLU mask) and its input;
    ``replay`` makes the same calls, in the same order, take them (a gather and a mask: differentiable to
    any order), so a float64 replay is the exact value of the float32 run's own piece. It reports:

    * ``flips``: decisions the float64 replay would have taken otherwise (by more than 1e-10; exact ties,
      e.g. of constant backgrounds, change nothing);
    * ``perturbation``: the mean absolute difference between the recorded float32 inputs and the float64
      ones over all calls: how far float32 rounding moves the values that decisions are taken on, what
      the rate of flips grows with.

    Usage: ``with Decisions("record") as d: run32()``, then ``with d.replay(): run64()``.
    """

    def __init__(self, mode: str = "record", log: list | None = None):
        self.mode, self.log, self.i = mode, [] if log is None else log, 0
        self.flips, self._diff, self._count = 0, 0.0, 0
        self._outer: Decisions | None = None

    def replay(self) -> Decisions:
        return Decisions("replay", self.log)

    @property
    def perturbation(self) -> float:
        return self._diff / max(self._count, 1)

    def __enter__(self) -> Decisions:
        global _decisions
        self._outer, _decisions = _decisions, self
        return self

    def __exit__(self, *exc) -> None:
        global _decisions
        _decisions = self._outer
        if exc[0] is None and self.mode == "replay" and self.i != len(self.log):
            raise RuntimeError(f"replayed {self.i} of {len(self.log)} recorded calls: not the same computation")

    def block_end(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        if self.mode == "record":
            h = x.detach()
            index = F.max_pool2d(h, 2, return_indices=True)[1] if pool else None  # max_pool2x2's rule for ties
            out = F.relu(max_pool2x2(x) if pool else x)
            self.log.append((h.clone(), index, out.detach() > 0))
            return out
        if self.i >= len(self.log):
            raise RuntimeError("more calls replayed than recorded: not the same computation")
        recorded, index, mask = self.log[self.i]
        self.i += 1
        h = x.detach()
        self._diff += (h - recorded.to(h.dtype)).abs().sum().item()
        self._count += h.numel()
        if pool:
            y = x.flatten(2).gather(2, index.flatten(2)).view(index.shape)
            self.flips += int((F.max_pool2d(h, 2) > y.detach() + 1e-10).sum())
        else:
            y = x
        natural = y.detach() > 0
        self.flips += int(((natural != mask) & (y.detach().abs() > 1e-10)).sum())
        return y * mask


def _moments(patches: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, N, D] patches -> their mean [T, D] and biased covariance [T, D, D] (BatchNorm's), in float64.

    ``w^T S w`` is a channel's variance only as exactly as S is: float32 sums over the N = 58,800
    patches of a query set moved the first block's outputs twice as far from float64 as native
    BatchNorm's; in float64 (``chunk`` rows at a time, so that 3-channel 84x84 images need no
    float64 copy of all their patches) they are half as far."""
    tasks, n, d = patches.shape
    mean = patches.sum(1, dtype=torch.float64) / n
    cov = patches.new_zeros(tasks, d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        rows = patches[:, i:i + chunk].double() - mean.unsqueeze(1)
        cov += rows.transpose(1, 2) @ rows
    return mean, cov / n


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
        with torch.no_grad():  # constants of the batch: x needs no gradient
            mean, cov = _moments(patches)  # float64 [T, D], [T, D, D]
        w = weight.flatten(-3) if stacked else weight.flatten(1).expand(tasks, -1, -1)  # [T, C, D]
        # The scale and shift in float64 too (differentiable casts), rounded once to the weights' dtype.
        w64, as64 = w.double(), (lambda t: t.double() if stacked else t.double().expand(tasks, -1))  # noqa: E731
        var = ((w64 @ cov) * w64).sum(-1)  # [T, C]
        scale = as64(gamma) * torch.rsqrt(var + eps)
        b = as64(bias)
        # The mean is w.m + b, so the bias cancels; writing it out keeps ``bias`` in the graph (gradient 0).
        shift = (as64(beta) + scale * (b - ((w64 @ mean.unsqueeze(-1)).squeeze(-1) + b))).to(w.dtype)
        fused = (w * scale.to(w.dtype).unsqueeze(-1)).reshape(-1, *weight.shape[-3:])  # [T*C, C_in, k, k]
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
