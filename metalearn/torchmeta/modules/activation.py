"""torchmeta's ``MetaMultiheadAttention``."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.torchmeta.modules.linear import MetaLinear
from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaMultiheadAttention"]


class MetaMultiheadAttention(nn.MultiheadAttention, MetaModule):
    """``nn.MultiheadAttention`` with ``forward(query, key, value, ..., params=None)``.

    ``params`` holds ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
    when ``kdim``/``vdim`` differ from ``embed_dim``), ``in_proj_bias``, ``bias_k``, ``bias_v``,
    ``out_proj.weight`` and ``out_proj.bias``: the names of ``nn.MultiheadAttention``'s parameters,
    so its state dicts load as they are. ``out_proj`` is a ``MetaLinear``, so its parameters are meta.
    The output is always computed by ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``'s
    inference fast path is not used), which gives the same values; ``batch_first`` is honoured for
    inputs and outputs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain = self.out_proj
        # Built on the meta device (no memory, no draw from the RNG) and given nn's initialised tensors,
        # so a seed gives the same weights as nn.MultiheadAttention.
        out_proj = MetaLinear(plain.in_features, plain.out_features, bias=plain.bias is not None, device="meta")
        out_proj.weight = plain.weight
        out_proj.bias = plain.bias
        self.out_proj = out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
                params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention outputs and (with ``need_weights``) weights, as ``nn.MultiheadAttention.forward``."""
        out_params = None if params is None else {
            name[len("out_proj."):]: tensor for name, tensor in params.items() if name.startswith("out_proj.")}
        batched = query.dim() == 3
        if self.batch_first and batched:
            # Transpose while keeping "query is key is value" (self-attention), which picks the packed projection.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        output, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            self._tensor(params, "in_proj_weight"), self._tensor(params, "in_proj_bias"),
            self._tensor(params, "bias_k"), self._tensor(params, "bias_v"), self.add_zero_attn, self.dropout,
            self.out_proj._tensor(out_params, "weight"), self.out_proj._tensor(out_params, "bias"),
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=self._tensor(params, "q_proj_weight") if separate else None,
            k_proj_weight=self._tensor(params, "k_proj_weight") if separate else None,
            v_proj_weight=self._tensor(params, "v_proj_weight") if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            output = output.transpose(1, 0)
        return output, weights
