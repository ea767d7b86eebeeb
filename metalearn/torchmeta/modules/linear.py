"""torchmeta's ``MetaLinear`` and ``MetaBilinear``."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaLinear", "MetaBilinear"]


class MetaLinear(nn.Linear, MetaModule):
    """``nn.Linear`` with ``forward(input, params=None)``; ``params`` holds ``weight`` (and ``bias``)."""

    def forward(self, input: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return F.linear(input, self._tensor(params, "weight"), self._tensor(params, "bias"))


class MetaBilinear(nn.Bilinear, MetaModule):
    """``nn.Bilinear`` with ``forward(input1, input2, params=None)``; ``params`` holds ``weight`` (and ``bias``)."""

    def forward(self, input1: torch.Tensor, input2: torch.Tensor,
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return F.bilinear(input1, input2, self._tensor(params, "weight"), self._tensor(params, "bias"))
