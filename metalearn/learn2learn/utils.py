"""learn2learn's ``utils``: differentiable copies and in-place updates of any ``nn.Module``.

These are what learn2learn's MAML is built on. A *clone* is a shallow copy of a module (and of each
of its submodules) whose parameters are ``p.clone()`` of the original's: plain tensors inside the
autograd graph, so whatever is computed with the clone differentiates back to the original. An
*update* swaps a parameter for ``p + u`` in the module's parameter dict, again inside the graph.

Both write ``module._parameters[name]`` directly: ``setattr`` refuses anything but an
``nn.Parameter`` there, while the dict itself accepts any tensor, and ``forward``, ``parameters()``
and ``named_parameters()`` all read that dict. That is how learn2learn has always worked, and torch
2.13 still allows it (tests/test_learn2learn.py checks it). ``torch.func.functional_call`` would be
the alternative; it is what metalearn's own algorithms use, but learn2learn's API is a module that
*is* the adapted model, so it needs real modules holding the adapted tensors.

Buffers follow learn2learn: a buffer that requires grad is cloned differentiably like a parameter;
any other buffer (BatchNorm's running statistics, ``num_batches_tracked``) is *shared* with the
original, so the statistics a clone accumulates in training mode land in the original model, which
is what evaluation in ``eval()`` mode then uses.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn

__all__ = ["clone_module", "update_module", "detach_module", "clone_parameters", "magic_box"]


def magic_box(x):
    """DiCE's magic box (Foerster et al. 2018): ``exp(x - x.detach())``, equal to 1 with the gradient of ``x``.

    Non-tensors are returned unchanged.
    """
    if isinstance(x, torch.Tensor):
        return torch.exp(x - x.detach())
    return x


def clone_parameters(param_list: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``[p.clone() for p in param_list]``: differentiable copies (gradients flow back to each ``p``)."""
    return [p.clone() for p in param_list]


def _refresh_rnn_weights(module: nn.Module) -> None:
    """Point an RNN's cached weight list at the tensors now in its parameter dict.

    ``nn.RNNBase`` runs from ``_flat_weights``, a list filled from its parameters; a shallow copy shares
    that list with the original. Rebuilding it here (rather than calling ``flatten_parameters``, which
    on CUDA copies the weights into one buffer under ``no_grad`` and would cut them out of the graph)
    keeps the cloned or updated tensors differentiable."""
    names = getattr(module, "_flat_weights_names", None)
    if names is None or not isinstance(module, nn.RNNBase):
        return
    weights = [getattr(module, n) if hasattr(module, n) else None for n in names]
    module._flat_weights = weights
    module._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in weights]


def clone_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A copy of ``module`` whose parameters are differentiable clones of the original's.

    The copy has the original's class, attributes and submodules (each copied the same way), and its
    outputs equal the original's. Gradients of anything computed with the copy flow back to the
    original's parameters. A tensor used in several places (a parameter shared between submodules,
    tied weights) is cloned once, so the copy shares it the same way (``memo`` maps ``id`` of an
    original tensor to its clone, for calls that clone several modules consistently). Buffers that
    require grad are cloned the same way; other buffers (BatchNorm's running statistics) are shared
    with the original, as in learn2learn. Non-modules are returned unchanged.
    """
    if memo is None:
        memo = {}
    if not isinstance(module, nn.Module):
        return module
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    # New dicts: writing a cloned tensor into them must not touch the original module.
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)

    for name, param in module._parameters.items():
        if param is not None:
            clone._parameters[name] = _cloned(param, memo)
    for name, buf in module._buffers.items():
        if buf is not None and buf.requires_grad:
            clone._buffers[name] = _cloned(buf, memo)
    for name, sub in module._modules.items():
        clone._modules[name] = clone_module(sub, memo)
    _refresh_rnn_weights(clone)
    return clone


def _cloned(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
    key = id(tensor)
    if key not in memo:
        memo[key] = tensor.clone()
    return memo[key]


def update_module(module: nn.Module, updates: list | None = None, memo: dict | None = None) -> nn.Module:
    """Replace each parameter ``p`` of ``module`` by ``p + u``, in place, keeping the autograd graph.

    ``updates`` is a list with one entry per tensor of ``module.parameters()`` (in that order; ``None``
    leaves a parameter as it is). Without ``updates``, each parameter's (and buffer's) ``update``
    attribute is used where it is set and not ``None`` (learn2learn's protocol: ``p.update = -lr * g``).
    A tensor shared between submodules is updated once and stays shared. Returns ``module``.
    """
    if memo is None:
        memo = {}
    explicit = None
    if updates is not None:
        params = list(module.parameters())
        if len(updates) != len(params):
            raise ValueError(f"update_module: {len(updates)} updates for {len(params)} parameters; "
                             "give one per tensor of module.parameters() (None to leave one unchanged)")
        # By identity rather than through p.update attributes: an attribute on the tensor would keep the
        # update (and its graph) alive for as long as the pre-update tensor lives.
        explicit = {id(p): u for p, u in zip(params, updates)}
    _update(module, explicit, memo)
    return module


def _update(module: nn.Module, explicit: dict | None, memo: dict) -> None:
    for store in (module._parameters, module._buffers):
        for name, t in store.items():
            if t is None:
                continue
            key = id(t)
            if key in memo:  # shared: already updated where it was met first
                store[name] = memo[key]
                continue
            from_attribute = explicit is None or store is not module._parameters
            u = getattr(t, "update", None) if from_attribute else explicit.get(key)
            if u is not None:
                memo[key] = store[name] = t + u
                if from_attribute:
                    t.update = None  # applied once: a later update_module must not apply it again
    for sub in module._modules.values():
        if sub is not None:
            _update(sub, explicit, memo)
    _refresh_rnn_weights(module)


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Cut ``module``'s parameters (and buffers that require grad) out of the autograd graph, in place.

    Meant for a clone: afterwards nothing computed with it reaches the module it was cloned from. The
    tensors are detached in place (``detach_``), so the module keeps the same tensor objects; with
    ``keep_requires_grad`` the ones that required grad still do, as new leaves (gradients then stop
    at them). Returns ``None``, like learn2learn.
    """
    if not isinstance(module, nn.Module):
        return
    for store, only_grad in ((module._parameters, False), (module._buffers, True)):
        for name, t in store.items():
            if t is None or (only_grad and not t.requires_grad):
                continue
            requires_grad = t.requires_grad
            if t._is_view():  # a view cannot be detached in place; its detached copy takes its slot
                t = store[name] = t.detach()
            else:
                t.detach_()
            if keep_requires_grad and requires_grad:
                t.requires_grad_()
    for sub in module._modules.values():
        detach_module(sub, keep_requires_grad=keep_requires_grad)
    _refresh_rnn_weights(module)
