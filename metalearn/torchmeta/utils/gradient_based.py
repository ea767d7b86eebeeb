"""torchmeta's ``gradient_update_parameters``, for MetaModules and for plain ``nn.Module``s.

For a ``MetaModule`` (``metalearn.torchmeta.modules``) the adapted parameters are named as in
``model.meta_named_parameters()`` and the model runs with them as ``model(x, params=params)``, as in
torchmeta. A plain ``nn.Module`` is accepted too (torchmeta refuses it): its parameters are named as
in ``named_parameters()`` and it runs with them through ``torch.func.functional_call(model, params, (x,))``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from metalearn.torchmeta._errors import InvalidArgument
from metalearn.torchmeta.modules.module import MetaModule


def gradient_update_parameters(model: nn.Module, loss: torch.Tensor, params: dict | None = None,
                               step_size: float | dict = 0.5, first_order: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """One gradient step on ``params``: ``OrderedDict(name -> p - step_size * dloss/dp)``.

    ``params`` defaults to ``model.meta_named_parameters()`` for a MetaModule and to
    ``model.named_parameters()`` otherwise. ``first_order=False`` keeps the graph of the step, so a
    loss of the result differentiates through it (second-order MAML). ``step_size`` is a number or
    a dict of per-parameter sizes keyed by name (numbers or tensors, e.g. Meta-SGD's learned ones).
    A parameter the loss does not depend on is returned unchanged.
    """
    if params is None:
        params = OrderedDict(model.meta_named_parameters() if isinstance(model, MetaModule) else model.named_parameters())
    names = list(params)
    if isinstance(step_size, dict):
        missing = [name for name in names if name not in step_size]
        if missing:
            raise InvalidArgument(f"step_size has no entry for parameter {missing[0]!r}")
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
    out = OrderedDict()
    for name, grad in zip(names, grads):
        size = step_size[name] if isinstance(step_size, dict) else step_size
        out[name] = params[name] if grad is None else params[name] - size * grad
    return out
