"""resnet12: the ResNet-12 of TADAM and MetaOptNet.

Oreshkin, Rodriguez & Lacoste, "TADAM: Task dependent adaptive metric for improved
few-shot learning", NeurIPS 2018 (arXiv:1805.10123); the variant here is the one of
Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex
Optimization" (MetaOptNet), CVPR 2019 (arXiv:1904.03758), and its reference code.

Four residual blocks of widths ``channels`` (default 64, 160, 320, 640). A block is
3 x [3x3 conv (no bias, padding 1), BatchNorm, LeakyReLU(0.1)], where the last
LeakyReLU comes after adding the shortcut (1x1 conv, no bias, + BatchNorm), then a
2x2 max-pool. The feature map is flattened (640 x 5 x 5 = 16000 features at 84x84,
as MetaOptNet), or averaged over space first with ``avg_pool: true`` (640 features).
Convolutions are initialised as in the reference code, ``kaiming_normal_(mode="fan_out",
nonlinearity="leaky_relu")`` (whose default slope a=0 makes the gain sqrt(2)); BatchNorm
weights 1, biases 0.

Regularisation, in training mode only (``net.train()``):

* ``drop_block: true``: DropBlock (Ghiasi, Lin & Le, NeurIPS 2018, arXiv:1810.12890)
  after blocks 3 and 4, with drop probability ``drop_rate`` and square blocks of
  ``block_size`` (clipped to the feature map, as the paper's own code does: at 84x84
  block 4's map is 5x5). Block centres are drawn in the region where a whole block
  fits, with gamma = drop_rate / block_size^2 * (H W) / ((H - block_size + 1)(W - block_size + 1))
  (the paper's eq. 1), and the kept activations are scaled by count / count_kept.
* ``dropout``: ordinary dropout after every block that has no DropBlock (blocks 1-2
  with DropBlock on, all four without). MetaOptNet's miniImageNet network is
  ``drop_block: true, drop_rate: 0.1, block_size: 5, dropout: 0.1``.

Differences from the MetaOptNet code, all deliberate:

* BatchNorm uses per-task batch statistics at training and at test time, never running
  averages, exactly as conv4 (see models/conv4.py): the module takes ``[n, C, H, W]`` or
  ``[T, n, C, H, W]`` and normalises each task on its own, and it is a plain module of
  parameters with no buffers, so ``torch.func.functional_call`` runs it with adapted
  weights and second-order MAML differentiates through it. MetaOptNet uses ordinary
  BatchNorm (running statistics in eval mode).
* DropBlock's rate is fixed; MetaOptNet ramps the keep probability linearly from 1 to
  1 - drop_rate over its first 40,000 forward passes of each block.
* DropBlock's count / count_kept rescaling is computed per task (the reference code
  uses the whole batch of all tasks), so a task's output does not depend on which
  tasks it is processed with, in distribution.
* Masks and dropout draw from torch's global generator of the input's device, which
  the engine seeds and checkpoints, so runs are reproducible. Under MAML the inner
  (support) and outer (query) passes each draw their own masks; the folded (accelerator)
  and task-by-task (CPU) paths draw different masks from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError
from metalearn.models.tasks import TaskBatchNorm, TaskwiseBackbone

SLOPE = 0.1  # LeakyReLU negative slope of the reference code


@dataclass
class Config:
    name: str = "resnet12"
    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])  # widths of the 4 blocks
    avg_pool: bool = False  # average the last feature map over space (C features) instead of flattening it
    drop_block: bool = False  # DropBlock after blocks 3 and 4 (training mode only)
    drop_rate: float = 0.1  # DropBlock's drop probability (used only with drop_block)
    block_size: int = 5  # DropBlock's block side, clipped to the feature map
    dropout: float = 0.0  # dropout after the blocks without DropBlock (training mode only)


def drop_block(x: torch.Tensor, rate: float, block_size: int, tasks: int) -> torch.Tensor:
    """DropBlock on [N, C, H, W] (N = tasks x n): zero random block_size^2 squares per channel.

    Kept activations are scaled by (#units / #kept) of each task. Random numbers come from
    the global generator of x's device.
    """
    n, c, h, w = x.shape
    b = min(block_size, h, w)
    gamma = rate / b**2 * (h * w) / ((h - b + 1) * (w - b + 1))
    # a block's top-left corner, drawn only where the whole block fits in the map
    corners = (torch.rand(n, c, h - b + 1, w - b + 1, device=x.device) < gamma).to(x.dtype)
    dropped = F.max_pool2d(F.pad(corners, (b - 1, b - 1, b - 1, b - 1)), b, stride=1)  # grow each corner to a block
    keep = (1 - dropped).view(tasks, -1)
    scale = keep.shape[1] / keep.sum(1, keepdim=True).clamp(min=1)
    return x * (keep * scale).view_as(x)


class Block(nn.Module):
    """3 x (3x3 conv, BN, LeakyReLU), the last LeakyReLU after adding the 1x1-conv + BN shortcut; 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if j == 0 else out_channels, out_channels, 3, padding=1, bias=False)
                                   for j in range(3))
        self.norms = nn.ModuleList(TaskBatchNorm(out_channels) for _ in range(3))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_norm = TaskBatchNorm(out_channels)

    def forward(self, x: torch.Tensor, tasks: int) -> torch.Tensor:
        out = x
        for j in range(3):
            out = self.norms[j](self.convs[j](out), tasks)
            if j < 2:
                out = F.leaky_relu(out, SLOPE)
        out = F.leaky_relu(out + self.shortcut_norm(self.shortcut(x), tasks), SLOPE)
        return F.max_pool2d(out, 2)


class ResNet12(TaskwiseBackbone):
    name = "resnet12"

    def __init__(self, in_channels: int, channels: list[int], avg_pool: bool = False, drop_block: bool = False,
                 drop_rate: float = 0.1, block_size: int = 5, dropout: float = 0.0):
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(Block(widths[i], widths[i + 1]) for i in range(len(channels)))
        self.avg_pool, self.drop_block, self.drop_rate = avg_pool, drop_block, drop_rate
        self.block_size, self.dropout = block_size, dropout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def _features(self, x: torch.Tensor, tasks: int) -> torch.Tensor:
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, tasks)
            if not self.training:
                continue
            if self.drop_block and i >= last - 1:
                if self.drop_rate > 0:
                    x = drop_block(x, self.drop_rate, self.block_size, tasks)
            elif self.dropout > 0:
                x = F.dropout(x, self.dropout, training=True)
        if self.avg_pool:
            x = x.mean(dim=(2, 3))
        return x.flatten(1)


def build(cfg: Config, input_shape: tuple[int, int, int]) -> ResNet12:
    channels = list(cfg.channels)
    if len(channels) != 4 or min(channels) < 1:
        raise ConfigError(f"backbone.channels must be 4 positive widths, one per residual block (got {channels})")
    if not 0 <= cfg.drop_rate < 1:
        raise ConfigError(f"backbone.drop_rate must be in [0, 1) (got {cfg.drop_rate})")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"backbone.dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.block_size < 1:
        raise ConfigError(f"backbone.block_size must be >= 1 (got {cfg.block_size})")
    if len(input_shape) != 3:
        raise ConfigError(f"backbone=resnet12 takes images, but this data gives vectors of size {input_shape[0]}; use backbone=mlp")
    c, h, w = input_shape
    if min(h, w) < 16:
        raise ConfigError(f"resnet12's 4 max-pools need images of at least 16px (got {h}x{w}); use a larger data.image_size or backbone=conv4")
    net = ResNet12(c, channels, cfg.avg_pool, cfg.drop_block, cfg.drop_rate, cfg.block_size, cfg.dropout)
    hh, ww = h >> 4, w >> 4  # four floor-halvings
    net.out_shape = (channels[-1], 1, 1) if cfg.avg_pool else (channels[-1], hh, ww)  # the map that is flattened
    net.out_features = channels[-1] * (1 if cfg.avg_pool else hh * ww)
    return net
