"""torchmeta's ``gradient_update_parameters``, for plain ``nn.Module``s.

torchmeta's version needs a ``MetaModule`` (called as ``model(x, params=...)``); this one returns
the adapted parameters as a dict for ``torch.func.functional_call(model, params, (x,))``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from metalearn.torchmeta._errors import InvalidArgument


def gradient_update_parameters(model: nn.Module, loss: torch.Tensor, params: dict | None = None,
                               step_size: float | dict = 0.5, first_order: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """One gradient step on ``params`` (default: the model's parameters): ``p - step_size * dloss/dp``.

    ``first_order=False`` keeps the graph of the step, so a loss of the result differentiates
    through it (second-order MAML). ``step_size`` may be a dict of per-parameter sizes.
    """
    if params is None:
        params = OrderedDict(model.named_parameters())
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
    out = OrderedDict()
    for name, grad in zip(names, grads):
        size = step_size[name] if isinstance(step_size, dict) else step_size
        if isinstance(step_size, dict) and name not in step_size:
            raise InvalidArgument(f"step_size has no entry for parameter {name!r}")
        out[name] = params[name] if grad is None else params[name] - size * grad
    return out
