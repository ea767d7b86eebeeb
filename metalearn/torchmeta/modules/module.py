"""torchmeta's ``MetaModule``: an ``nn.Module`` whose ``forward`` also takes ``params``.

``params`` is ``None`` (the module's own parameters) or a dict ``name -> tensor`` named as in
``meta_named_parameters()``; its tensors are used as they are (never copied into the module), so
anything computed from them, such as the output of ``gradient_update_parameters``, stays in the
autograd graph and a loss differentiates through it (second-order MAML).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Iterator, Mapping

import torch
from torch import nn

__all__ = ["MetaModule"]


class MetaModule(nn.Module):
    """Base class of the modules whose ``forward(..., params=None)`` takes their parameters as an argument.

    Fully an ``nn.Module`` otherwise. A subclass's ``forward`` reads its own tensors from ``params``
    (``None``: its own parameters) and hands each MetaModule child ``self.get_subdict(params, name)``.
    """

    def meta_named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for the parameters held directly by MetaModules: this one and, with
        ``recurse``, every MetaModule below it. Parameters of plain ``nn.Module``s (an ``nn.Linear``
        inside a ``MetaSequential``) are not meta: they are left out, as in torchmeta."""
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        seen: set[int] = set()
        for module_name, module in modules:
            if not isinstance(module, MetaModule):
                continue
            for name, param in module.named_parameters(recurse=False):
                # A parameter shared by two modules is listed once, as nn.Module.named_parameters does.
                if id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{module_name}.{name}" if module_name else name), param

    def meta_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of ``meta_named_parameters(recurse=recurse)``."""
        for _, param in self.meta_named_parameters(recurse=recurse):
            yield param

    def get_subdict(self, params: Mapping[str, torch.Tensor] | None,
                    key: str | None = None) -> "OrderedDict[str, torch.Tensor] | None":
        """The entries of ``params`` named ``key.<rest>``, as ``<rest> -> tensor`` (in ``params``' order).

        ``params=None`` gives ``None``; ``key=None`` gives all of ``params``. When no entry is under
        ``key`` this warns and gives ``None``, so that submodule runs with its own parameters
        (torchmeta's behaviour, e.g. when only the classifier's parameters are adapted).
        """
        if params is None:
            return None
        if key is None:
            return OrderedDict(params)
        prefix = key + "."
        sub = OrderedDict((name[len(prefix):], value) for name, value in params.items() if name.startswith(prefix))
        if not sub:
            warnings.warn(f"{type(self).__name__}: params has no entry for the submodule {key!r}, which runs with its "
                          f"own parameters; params holds [{', '.join(params)}]", stacklevel=2)
            return None
        return sub

    def _tensor(self, params: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
        """``params[name]``, or the module's own ``name`` (possibly ``None``) when ``params`` lacks it."""
        if params is not None and name in params:
            return params[name]
        return getattr(self, name)
