"""torchmeta's ``MetaSequential``."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["MetaSequential"]


class MetaSequential(nn.Sequential, MetaModule):
    """``nn.Sequential`` whose ``forward(input, params=None)`` gives each MetaModule child the entries
    of ``params`` under its name (``get_subdict``); plain ``nn.Module`` children are called as usual."""

    def forward(self, input: Any, params: Mapping[str, torch.Tensor] | None = None) -> Any:
        # _modules rather than named_children(): a module placed twice must run twice, as in nn.Sequential.
        for name, module in self._modules.items():
            if isinstance(module, MetaModule):
                input = module(input, params=self.get_subdict(params, name))
            else:
                input = module(input)
        return input
