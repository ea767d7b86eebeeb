"""torchmeta's ``MetaLayerNorm``."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaLayerNorm"]


class MetaLayerNorm(nn.LayerNorm, MetaModule):
    """``nn.LayerNorm`` with ``forward(input, params=None)``; ``params`` holds the affine ``weight`` and ``bias``."""

    def forward(self, input: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self._tensor(params, "weight"), self._tensor(params, "bias"),
                            self.eps)
