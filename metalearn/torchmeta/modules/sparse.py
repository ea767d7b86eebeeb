"""torchmeta's ``MetaEmbedding`` and ``MetaEmbeddingBag``: ``params`` holds the table ``weight``.

With ``max_norm``, ``F.embedding`` renormalises the looked-up rows of the table in place, as
``nn.Embedding`` does; with an adapted table that is the given tensor.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaEmbedding", "MetaEmbeddingBag"]


class MetaEmbedding(nn.Embedding, MetaModule):
    """``nn.Embedding`` with ``forward(input, params=None)``."""

    def forward(self, input: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return F.embedding(input, self._tensor(params, "weight"), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class MetaEmbeddingBag(nn.EmbeddingBag, MetaModule):
    """``nn.EmbeddingBag`` with ``forward(input, offsets=None, per_sample_weights=None, params=None)``."""

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None,
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return F.embedding_bag(input, self._tensor(params, "weight"), offsets, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.mode, self.sparse, per_sample_weights,
                               self.include_last_offset, self.padding_idx)
