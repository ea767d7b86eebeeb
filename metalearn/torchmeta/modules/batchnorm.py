"""torchmeta's ``MetaBatchNorm1d``, ``MetaBatchNorm2d`` and ``MetaBatchNorm3d``.

``params`` holds the affine ``weight`` and ``bias``; the running statistics stay the module's
buffers and are used and updated exactly as ``nn.BatchNorm*d`` does: batch statistics in training
mode (updating the running ones by ``momentum``, or by a cumulative average when ``momentum`` is
``None``), the running statistics in eval mode, and batch statistics always when
``track_running_stats=False``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaBatchNorm1d", "MetaBatchNorm2d", "MetaBatchNorm3d"]


def _forward(self, input: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    self._check_input_dim(input)
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
    # Buffers are passed only where they are used or updated: not in training without tracking.
    use_buffers = not self.training or self.track_running_stats
    batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    return F.batch_norm(input, self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
                        self._tensor(params, "weight"), self._tensor(params, "bias"), batch_stats, momentum, self.eps)


class MetaBatchNorm1d(nn.BatchNorm1d, MetaModule):
    """``nn.BatchNorm1d`` with ``forward(input, params=None)``."""

    forward = _forward


class MetaBatchNorm2d(nn.BatchNorm2d, MetaModule):
    """``nn.BatchNorm2d`` with ``forward(input, params=None)``."""

    forward = _forward


class MetaBatchNorm3d(nn.BatchNorm3d, MetaModule):
    """``nn.BatchNorm3d`` with ``forward(input, params=None)``."""

    forward = _forward
