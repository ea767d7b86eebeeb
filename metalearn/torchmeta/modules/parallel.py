"""torchmeta's ``DataParallel``: ``nn.DataParallel`` that also hands ``params`` to the replicas."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from metalearn.torchmeta.modules.module import MetaModule

__all__ = ["DataParallel"]


class DataParallel(nn.DataParallel, MetaModule):
    """``nn.DataParallel`` over a MetaModule, called as ``model(*inputs, params=None, **kwargs)``.

    The inputs are split across ``device_ids`` as by ``nn.DataParallel``; ``params`` is not split:
    each device's replica gets all of it, copied to that device differentiably (the gradients
    of the copies sum back into the given tensors). Without accelerators (``device_ids`` empty) or
    with one device, the module is simply called with ``params``. ``params`` may be named as this
    wrapper names its parameters (``module.<name>``, e.g. from ``gradient_update_parameters(model,
    loss)``) or as the wrapped module does (``<name>``). Over a plain ``nn.Module`` this is
    ``nn.DataParallel``.
    """

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        params = kwargs.get("params")
        if isinstance(self.module, MetaModule) and params:
            # meta_named_parameters() of this wrapper prefixes every name with "module."; the
            # wrapped module expects its own names.
            if all(name.startswith("module.") for name in params):
                kwargs["params"] = self.get_subdict(params, "module")
        return super().forward(*inputs, **kwargs)

    def scatter(self, inputs: tuple, kwargs: dict | None, device_ids: Sequence[int | torch.device]) -> Any:
        """Split ``inputs`` and ``kwargs`` across ``device_ids``, except ``params``, given whole to each."""
        params: Mapping[str, torch.Tensor] | None = (kwargs or {}).get("params")
        if not isinstance(self.module, MetaModule) or params is None:
            return super().scatter(inputs, kwargs, device_ids)
        kwargs = {name: value for name, value in kwargs.items() if name != "params"}
        inputs, per_device = super().scatter(inputs, kwargs, device_ids)
        if not inputs and not per_device:
            # No inputs at all: nn.DataParallel runs the module once on the first device.
            inputs, per_device = ((),), ({},)
        per_device = tuple(
            {**device_kwargs, "params": OrderedDict((name, tensor.to(torch.device(self.src_device_obj.type, index)))
                                                    for name, tensor in params.items())}
            for device_kwargs, index in zip(per_device, device_ids))
        return inputs, per_device
