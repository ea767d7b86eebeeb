"""torchmeta's ``MetaConv1d``, ``MetaConv2d`` and ``MetaConv3d``: ``params`` holds ``weight`` (and ``bias``)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaConv1d", "MetaConv2d", "MetaConv3d"]


def _forward(self, input: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    # nn.ConvNd._conv_forward takes the weight and bias as arguments and applies every padding_mode
    # (reflect, replicate and circular pad the input first) exactly as nn.ConvNd.forward does.
    return self._conv_forward(input, self._tensor(params, "weight"), self._tensor(params, "bias"))


class MetaConv1d(nn.Conv1d, MetaModule):
    """``nn.Conv1d`` with ``forward(input, params=None)``."""

    forward = _forward


class MetaConv2d(nn.Conv2d, MetaModule):
    """``nn.Conv2d`` with ``forward(input, params=None)``."""

    forward = _forward


class MetaConv3d(nn.Conv3d, MetaModule):
    """``nn.Conv3d`` with ``forward(input, params=None)``."""

    forward = _forward
