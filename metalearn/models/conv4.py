"""conv4: the standard few-shot backbone (Vinyals et al. 2016; Finn et al. 2017).

``layers`` x [3x3 conv (``hidden`` filters, padding 1), BatchNorm, ReLU, 2x2 max-pool],
then flatten: 64 features for 28x28 inputs, 1600 for 84x84. ``pool_layers: k`` max-pools
in the first k blocks only (null: all), for algorithms that need feature maps rather
than vectors, e.g. the Relation Network's embedding (k=2: 64x7x7 maps at 28x28).

BatchNorm semantics. Normalisation always uses the statistics of the batch
being processed, *per task*, never running averages, at training and at test
time: the "transductive" setting of the MAML paper and its reference code.
A task's support set is normalised with support statistics during
adaptation, its query set with query statistics. The module takes either one
task, ``[n, C, H, W]``, or a batch of tasks, ``[T, n, C, H, W]``, and in the
second case each task is normalised on its own, so results never depend on
how many tasks are processed together. It is a plain module of parameters
(no buffers), so ``torch.func.functional_call`` with a parameter dict is all
an algorithm needs to run it with adapted weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from metalearn.errors import ConfigError
from metalearn.models import ops
from metalearn.models.tasks import TaskBatchNorm, TaskwiseBackbone

__all__ = ["Config", "Conv4", "TaskBatchNorm", "build"]


@dataclass
class Config:
    name: str = "conv4"
    hidden: int = 64
    layers: int = 4
    norm: str = "batch"  # batch (per-task batch statistics) | none
    pool_layers: Optional[int] = None  # how many leading blocks max-pool; None: all of them


class Conv4(TaskwiseBackbone):
    name = "conv4"
    #: device.cpu_kernels: the one-task CPU path's BatchNorm (models/ops.py). "exact": statistics summed as
    #: exactly as NCHW sums them; "fast": PyTorch's channels-last kernel (one float32 pass, faster, rounder).
    cpu_kernels: str = "exact"

    def __init__(self, in_channels: int, hidden: int = 64, layers: int = 4, norm: str = "batch",
                 pool_layers: int | None = None):
        super().__init__()
        self.pool_layers = layers if pool_layers is None else pool_layers
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1) for i in range(layers))
        self.norms = nn.ModuleList(TaskBatchNorm(hidden) for _ in range(layers)) if norm == "batch" else None

    def _features(self, x: torch.Tensor, tasks: int) -> torch.Tensor:
        if tasks == 1 and ops.enabled(x):
            x = ops.channels_last(x)  # a task at a time on CPU: channels-last kernels (models/ops.py)
        for i, conv in enumerate(self.convs):
            if i == 0 and self.norms is not None and not x.requires_grad and ops.enabled(x):
                # The input images: conv + BatchNorm as one convolution (models/ops.py).
                norm = self.norms[i]
                x = ops.conv_batchnorm(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, tasks)
            else:
                x = conv(x)
                if self.norms is not None:
                    norm = self.norms[i]
                    x = ops.batch_norm(x, norm.weight, norm.bias, norm.eps, self.cpu_kernels) if tasks == 1 \
                        else norm(x, tasks)
            x = ops.pool_relu(x, pool=i < self.pool_layers)  # max-pool, then ReLU (the same, on 4x less data)
        return x.flatten(1)


def build(cfg: Config, input_shape: tuple[int, int, int]) -> Conv4:
    if cfg.norm not in ("batch", "none"):
        raise ConfigError(f"backbone.norm={cfg.norm!r} is not one of: batch, none")
    if cfg.hidden < 1 or cfg.layers < 1:
        raise ConfigError("backbone.hidden and backbone.layers must be >= 1")
    pools = cfg.layers if cfg.pool_layers is None else cfg.pool_layers
    if not 0 <= pools <= cfg.layers:
        raise ConfigError(f"backbone.pool_layers={cfg.pool_layers} must be between 0 and backbone.layers={cfg.layers} "
                          "(or null: every block pools)")
    if len(input_shape) != 3:
        raise ConfigError(f"backbone=conv4 takes images, but this data gives vectors of size {input_shape[0]}; use backbone=mlp")
    c, h, w = input_shape
    if min(h, w) < 2**pools:
        fix = "lower backbone.pool_layers" if cfg.pool_layers is not None else "lower backbone.layers or set backbone.pool_layers"
        raise ConfigError(f"{pools} pooling layers need images of at least {2**pools}px (got {h}x{w}); {fix}")
    net = Conv4(c, cfg.hidden, cfg.layers, cfg.norm, cfg.pool_layers)
    net.out_shape = (cfg.hidden, h >> pools, w >> pools)  # the feature map before flattening
    net.out_features = cfg.hidden * (h >> pools) * (w >> pools)
    return net
