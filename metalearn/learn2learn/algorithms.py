"""learn2learn's ``algorithms``: MAML, MetaSGD and GBML as module wrappers with ``clone`` and ``adapt``.

The learn2learn pattern, unchanged::

    maml = l2l.algorithms.MAML(model, lr=0.5)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for task in tasks:
        learner = maml.clone()                      # differentiable copy of the model
        learner.adapt(loss(learner(support_x), support_y))   # one SGD step, in place on the copy
        loss(learner(query_x), query_y).backward()  # meta-gradient, through the step, into maml
    opt.step()

``clone`` is ``utils.clone_module`` and ``adapt`` replaces the copy's parameters by
``p - lr * grad`` with ``utils.update_module``; second order unless ``first_order``. On the same
weights and batch, MAML here gives metalearn's own MAML's meta-gradient (tests/test_learn2learn.py).

learn2learn's PyTorch-Lightning wrappers are not provided; calling one raises ``NotImplementedError``
naming the ``metalearn train`` command that trains the same algorithm.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from metalearn.errors import not_provided
from metalearn.learn2learn.utils import clone_module, clone_parameters, update_module

__all__ = ["BaseLearner", "MAML", "MetaSGD", "GBML", "ParameterUpdate", "maml_update", "meta_sgd_update",
           "LightningEpisodicModule", "LightningMAML", "LightningANIL", "LightningPrototypicalNetworks",
           "LightningMetaOptNet"]

#: Added to autograd's error when a parameter cannot be differentiated (as learn2learn prints it).
_GRAD_HINT = "metalearn.learn2learn: try allow_nograd=True and/or allow_unused=True"


class BaseLearner(nn.Module):
    """A module wrapper: ``forward`` calls the wrapped ``module``, and attributes this wrapper does not
    have are looked up on ``module`` (``maml.features`` is ``maml.module.features``)."""

    def __init__(self, module: nn.Module | None = None):
        super().__init__()
        self.module = module

    def __getattr__(self, attr: str):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:
                raise
            return getattr(module, attr)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _gradients(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool, allow_unused: bool,
               allow_nograd: bool, retain_graph: bool | None = None) -> list[torch.Tensor | None]:
    """d loss / d p for each of ``params``; ``None`` for a parameter that does not require grad (with
    ``allow_nograd``) or that the loss does not use (with ``allow_unused``). The loss's graph is kept
    if ``retain_graph`` (default: ``create_graph``)."""
    wanted = [p for p in params if p.requires_grad] if allow_nograd else params
    retain_graph = create_graph if retain_graph is None else retain_graph
    try:
        grads = torch.autograd.grad(loss, wanted, retain_graph=retain_graph, create_graph=create_graph,
                                    allow_unused=allow_unused)
    except RuntimeError as e:
        if "does not require grad" in str(e) or "not have been used" in str(e):
            raise RuntimeError(f"{e} ({_GRAD_HINT})") from e
        raise
    if not allow_nograd:
        return list(grads)
    it = iter(grads)
    return [next(it) if p.requires_grad else None for p in params]


def maml_update(model: nn.Module, lr: float, grads: list | None = None) -> nn.Module:
    """One SGD step in place on a (cloned) ``model``: each parameter ``p`` becomes ``p - lr * g``, inside the
    autograd graph. ``grads`` has one entry per ``model.parameters()`` (``None``: not updated); without it
    ``p.grad`` is used where set. Returns ``model``."""
    params = list(model.parameters())
    if grads is None:
        grads = [p.grad for p in params]
    return update_module(model, updates=[None if g is None else -lr * g for g in grads])


def meta_sgd_update(model: nn.Module, lrs: list, grads: list) -> nn.Module:
    """Meta-SGD's step in place on a (cloned) ``model``: ``p - lr_p * g``, with ``lr_p`` a tensor shaped
    like ``p`` (the learned rates). ``None`` gradients leave their parameter unchanged. Returns ``model``."""
    return update_module(model, updates=[None if g is None else -lr * g for lr, g in zip(lrs, grads)])


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) around any ``nn.Module``.

    Arguments (and the defaults of ``clone``/``adapt``, which may override them per call):

    * ``model``: the module whose initialisation is meta-learned.
    * ``lr``: the inner (fast-adaptation) SGD step size.
    * ``first_order``: FOMAML: the inner gradients are taken without a graph, so the meta-gradient
      ignores second derivatives.
    * ``allow_unused``: parameters the loss does not use get no update instead of an error (default:
      ``allow_nograd``).
    * ``allow_nograd``: parameters with ``requires_grad=False`` are left as they are during adaptation
      instead of making ``adapt`` fail.
    """

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False):
        super().__init__(model)
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One SGD step on ``loss``, in place: every parameter ``p`` of the wrapped module becomes
        ``p - lr * d loss / d p``. Differentiable (the meta-gradient goes through the step's gradient)
        unless first order. Call it on a ``clone()``: on the top-level wrapper it would replace the
        trained ``nn.Parameter``s by tensors an optimiser does not hold."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        grads = _gradients(loss, list(self.module.parameters()), not first_order, allow_unused, allow_nograd)
        self.module = maml_update(self.module, self.lr, grads)

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> "MAML":
        """A ``MAML`` around ``clone_module(self.module)``: same outputs, gradients flow back to this
        wrapper's parameters, and ``adapt`` on it leaves this one unchanged."""
        return MAML(clone_module(self.module), lr=self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)


class MetaSGD(BaseLearner):
    """Meta-SGD (Li et al. 2017): MAML with a learned step size for every parameter entry.

    ``lrs`` (an ``nn.ParameterList``, one tensor shaped like each parameter of ``model``, all ``lr`` at
    first) is meta-trained with the model: ``adapt`` takes ``p - lrs[i] * g``, and the meta-gradient
    reaches the rates whether or not ``first_order`` is set (only second derivatives are dropped).
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs: list | None = None):
        super().__init__(model)
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), lr)) for p in model.parameters()])
        elif not isinstance(lrs, nn.ParameterList) and all(isinstance(r, nn.Parameter) for r in lrs):
            lrs = nn.ParameterList(lrs)  # given as leaves: registered, so an optimiser over .parameters() sees them
        # A clone's rates are plain tensors in the graph (clone_parameters); they stay a plain list.
        self.lrs = lrs
        self.first_order = first_order

    def clone(self, first_order: bool | None = None) -> "MetaSGD":
        """A ``MetaSGD`` around ``clone_module(self.module)`` with differentiable clones of the rates."""
        return MetaSGD(clone_module(self.module), lrs=clone_parameters(self.lrs),
                       first_order=self.first_order if first_order is None else first_order)

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None) -> None:
        """One Meta-SGD step on ``loss``, in place: ``p - lr_p * d loss / d p`` for every parameter."""
        first_order = self.first_order if first_order is None else first_order
        grads = _gradients(loss, list(self.module.parameters()), not first_order, False, False)
        self.module = meta_sgd_update(self.module, list(self.lrs), grads)


class ParameterUpdate(nn.Module):
    """Per-parameter update rules (learn2learn's ``l2l.optim.ParameterUpdate``).

    ``transform(param)`` is called once for each of ``parameters`` and returns an ``nn.Module`` (the
    rule for that parameter, mapping its gradient to its update) or ``None`` (the update is the raw
    gradient). Called with a loss, it returns one update per parameter: ``rule(grad)``, or ``None``
    where the parameter gets no gradient.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], transform: Callable):
        super().__init__()
        rules, indices = [], []
        for param in parameters:
            rule = transform(param)
            if rule is not None and not isinstance(rule, nn.Module):
                raise ValueError(f"the transform must return an nn.Module or None for each parameter, "
                                 f"got {type(rule).__name__}")
            indices.append(None if rule is None else len(rules))
            if rule is not None:
                rules.append(rule)
        # A ModuleList, so clone_module copies the rules' own parameters differentiably.
        self.transforms_modules = nn.ModuleList(rules)
        self.transforms_indices = indices

    def forward(self, loss: torch.Tensor, parameters: Iterable[torch.Tensor], create_graph: bool = False,
                retain_graph: bool = False, allow_unused: bool = False, allow_nograd: bool = False) -> list:
        params = list(parameters)
        if len(params) != len(self.transforms_indices):
            raise ValueError(f"ParameterUpdate was built for {len(self.transforms_indices)} parameters, "
                             f"called with {len(params)}")
        grads = _gradients(loss, params, create_graph, allow_unused, allow_nograd, retain_graph or create_graph)
        return [g if g is None or i is None else self.transforms_modules[i](g)
                for g, i in zip(grads, self.transforms_indices)]


class GBML(BaseLearner):
    """Gradient-based meta-learning with a learned update rule (learn2learn's GBML).

    ``transform`` is a factory: called with each parameter of ``module``, it returns an ``nn.Module``
    mapping that parameter's gradient to its update (or ``None``: the plain gradient). ``adapt`` takes
    ``p - lr * rule_p(grad)``, and the rules' parameters are meta-learned with the model. With a
    learnable per-entry scale (``lambda p: l2l.nn.Scale(p.shape, alpha=a)``, ``lr=1``) this is Meta-SGD;
    with ``adapt_transform=True`` the rules' parameters themselves also take an SGD step (step size
    ``lr``) on each adaptation loss after the first, differentiably (Alpha MAML with a scale).

    ``first_order``, ``allow_unused``, ``allow_nograd``: as for ``MAML``.
    """

    def __init__(self, module: nn.Module, transform: Callable, lr: float = 1.0, adapt_transform: bool = False,
                 first_order: bool = False, allow_unused: bool = False, allow_nograd: bool = False,
                 compute_update: ParameterUpdate | None = None):
        super().__init__(module)
        self.transform = transform
        self.lr = lr
        self.adapt_transform = adapt_transform
        self.first_order = first_order
        self.allow_unused = allow_unused
        self.allow_nograd = allow_nograd
        self.compute_update = compute_update if compute_update is not None \
            else ParameterUpdate(module.parameters(), transform)
        # Whether the module has taken a step since the rules last did: only then does the loss depend
        # on the rules' parameters, so only then can adapt_transform differentiate it with respect to them.
        self._params_updated = False

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None, adapt_transform: bool | None = None) -> "GBML":
        """A ``GBML`` around differentiable clones of the module and of the update rules."""
        return GBML(clone_module(self.module), transform=self.transform, lr=self.lr,
                    adapt_transform=self.adapt_transform if adapt_transform is None else adapt_transform,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
                    compute_update=clone_module(self.compute_update))

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None, allow_nograd: bool | None = None,
              allow_unused: bool | None = None) -> None:
        """One step on ``loss``, in place: ``p - lr * rule_p(d loss / d p)`` for every parameter (and,
        with ``adapt_transform``, first a step of the rules' own parameters)."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if self.adapt_transform and self._params_updated:
            rule_params = list(self.compute_update.parameters())
            # The loss's graph is kept: the module's own step below differentiates it again.
            grads = _gradients(loss, rule_params, not first_order, allow_unused, allow_nograd, retain_graph=True)
            self.compute_update = maml_update(self.compute_update, self.lr, grads)
            self._params_updated = False
        # Graph kept when adapting the rules, even first order: the next step's rule gradient goes through
        # this step's update.
        updates = self.compute_update(loss, self.module.parameters(),
                                      create_graph=not first_order or self.adapt_transform,
                                      allow_unused=allow_unused, allow_nograd=allow_nograd)
        self.module = maml_update(self.module, self.lr, updates)
        self._params_updated = True


# ----------------------------------------------------------------------------- not provided


def _not_provided(name: str, instead: str) -> Callable:
    return not_provided("metalearn.learn2learn", f"learn2learn.algorithms.{name}", f"train with metalearn itself: {instead}")


LightningEpisodicModule = _not_provided("LightningEpisodicModule", "metalearn train algo=<name>")
LightningMAML = _not_provided("LightningMAML", "metalearn train algo=maml")
LightningANIL = _not_provided("LightningANIL", "metalearn train algo=anil")
LightningPrototypicalNetworks = _not_provided("LightningPrototypicalNetworks", "metalearn train algo=protonet")
LightningMetaOptNet = _not_provided("LightningMetaOptNet", "metalearn train algo=metaoptnet_svm")
