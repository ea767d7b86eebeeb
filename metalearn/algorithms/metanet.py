"""MetaNet: Meta Networks (Munkhdalai & Yu, ICML 2017, arXiv:1703.00837).

Two networks learn together, each with *slow* weights (meta-learned across tasks) and
*fast* weights (generated for the task at hand by other networks, never by SGD):

* the base learner ``b`` (the classifier): the backbone's layers, then ``fc1`` (ReLU) and
  ``fc2`` (one output per way);
* the meta learner's representation function ``u`` (a second network of the same
  architecture with its own weights, ending in ``key_fc1``): the embedding that decides
  which support examples a query attends to.

For one task (the paper's Algorithm 1, as the authors' ``MetaNetFull`` Omniglot code):

1. *Task-level fast weights of u.* The support set is cut into ``representation_batches``
   minibatches; for each, the gradient of u's representation loss (cross-entropy of u's
   own classifier ``key_fc2``) with respect to u's weights is the meta-information. A
   coordinate-wise LSTM ``d`` (one per group: body, head) reads the preprocessed gradient
   of every weight coordinate, minibatch after minibatch; a linear layer turns its last
   state into that coordinate's fast weight ``Q*``.
2. *Example-level fast weights of b.* For each support example, the gradient of b's loss on
   that example alone with respect to b's weights, preprocessed, goes through a
   coordinate-wise MLP ``m`` (2-20-20-1, one per group): the fast weights ``W*_i``, kept
   in a memory with the key ``r_i = u(x_i; Q, Q*)``.
3. *Queries.* A query's key ``r = u(x; Q, Q*)`` attends to the memory (softmax of cosine
   similarities to the support keys); its fast weights are the attention-weighted sum of
   the ``W*_i``, and b classifies it with slow and fast weights together.
4. The meta-loss is the query cross-entropy; its gradient trains every slow weight of b
   and u and the generators ``d`` and ``m``.

*Layer augmentation* (the paper's section 3.3): each layer with fast weights runs its
input through the slow and the fast weights separately, applies the ReLU to each, and
sums them, ``relu(W x + bias) + relu(W* x)``; ``fc2`` (logits) and ``key_fc1`` (keys) sum
without ReLU. Fast weights exist for every weight matrix (convolution kernels and linear
weights; biases are slow only), as in the authors' code.

*Meta-information preprocessing* (Andrychowicz et al. 2016, as the authors):
``g -> (max(log(|g| + eps) / k, -1), clamp(g e^k, -1, 1))`` with ``k = preprocess_k`` (7).

Choices, stated:
* The meta-information gradients are data, not differentiated through (second order),
  as in the paper's Algorithm 1 and the authors' code. ``u``'s classifier ``key_fc2``
  only ever feeds those gradients, so nothing trains it: it stays at its random
  initialisation (``requires_grad=False``), as in the authors' code.
* The backbone must be ``conv4`` without BatchNorm (``backbone.norm=none``; the authors'
  network has none: every example and query runs through its own fast weights, alone,
  where per-set batch statistics would mean nothing), ``mlp``, or ``identity`` (on
  ``data=features``). u is a copy of the backbone's architecture, initialised afresh.
* The generators' output layers start small (weights scaled by ``init_scale``), so the
  fast branch starts near zero and the net starts as its slow part; with unit-scale fast
  weights a 4-layer network without normalisation overflows at once.
* The query loss is the mean over the queries (the authors' code sums it).
* Each query is classified with its own fast weights: convolutions run as one grouped
  convolution over the queries, linear layers as a batched matrix product.
* Cost: the generators run once per weight coordinate (per support example for ``m``, per
  minibatch for ``d``), about 111,000 coordinates per network for conv4-64, which makes the
  full model slow on a CPU (seconds per task). ``fast_body: false`` gives fast weights to the
  linear head layers only (``fc1``, ``fc2``, ``key_fc1``), the backbones keeping slow weights
  only: about 10x faster, and still the paper's mechanism on those layers.

Written as pure functions of parameter dicts; the per-example gradients are
``torch.func.vmap(torch.func.grad(...))``. Tasks run one at a time, each backward freeing
its graph (memory does not grow with the meta-batch).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4
from metalearn.models.identity import Identity
from metalearn.models.mlp import MLP


@dataclass
class Config:
    name: str = "metanet"
    hidden: int = 64  # units of fc1 / key_fc1 (the authors: 64)
    meta_hidden: int = 20  # units of the fast-weight generators (LSTM d and MLP m; the paper: 20)
    representation_batches: int = 5  # minibatches of the support set for u's meta-information (the authors: 5)
    preprocess_k: float = 7.0  # gradient preprocessing constant k
    init_scale: float = 0.01  # the generators' output layers start at this fraction of the default init
    fast_body: bool = True  # fast weights for the backbone's layers too (the paper's Omniglot model); false: head only


# ---------------------------------------------------------------- the layer-augmented network


def layer_plan(backbone: nn.Module) -> list[tuple[str, str, bool]]:
    """The backbone's layers as (kind, parameter prefix, pools after) for the functional forward."""
    if isinstance(backbone, Conv4):
        return [("conv", f"convs.{i}.", i < backbone.pool_layers) for i in range(len(backbone.convs))]
    if isinstance(backbone, MLP):
        return [("linear", f"layers.{i}.", False) for i in range(len(backbone.layers))]
    return []


def _apply(kind: str, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_example: bool) -> torch.Tensor:
    """One layer with one weight (shared [*shape]) or a weight per example ([n, *shape])."""
    if not per_example:
        return F.conv2d(h, weight, bias, padding=1) if kind == "conv" else F.linear(h, weight, bias)
    n = h.shape[0]
    if kind == "conv":  # example i's input channels meet example i's filters only: a grouped convolution
        out = F.conv2d(h.reshape(1, -1, *h.shape[2:]), weight.reshape(-1, *weight.shape[2:]), padding=1, groups=n)
        return out.view(n, -1, *out.shape[2:])
    return torch.einsum("ni,noi->no", h, weight)


def body(plan: list, slow: dict, fast: dict | None, x: torch.Tensor, per_example: bool = False) -> torch.Tensor:
    """The backbone's layers, layer-augmented when ``fast`` is given: [n, ...] -> [n, F].

    ``slow``/``fast`` hold ``<prefix>weight`` (and slow ``<prefix>bias``); fast weights are shared by
    the examples, or one per example (``per_example``: [n, *shape]).
    """
    h = x
    for kind, prefix, pools in plan:
        out = F.relu(_apply(kind, h, slow[prefix + "weight"], slow[prefix + "bias"], False))
        if fast is not None:
            out = out + F.relu(_apply(kind, h, fast[prefix + "weight"], None, per_example))
        h = F.max_pool2d(out, 2) if pools else out
    return h.flatten(1)


def augmented_linear(h: torch.Tensor, slow: torch.Tensor, fast: torch.Tensor | None, relu: bool,
                     per_example: bool = False) -> torch.Tensor:
    """A linear layer without bias, plus its fast twin: relu(slow) + relu(fast), or slow + fast."""
    out = F.linear(h, slow)
    if fast is None:
        return F.relu(out) if relu else out
    fast_out = _apply("linear", h, fast, None, per_example)
    return F.relu(out) + F.relu(fast_out) if relu else out + fast_out


# ---------------------------------------------------------------- fast-weight generation


def preprocess(g: torch.Tensor, k: float) -> torch.Tensor:
    """Gradients [...] -> [..., 2]: (log magnitude / k, clamped at -1; sign-like g e^k, clamped to [-1, 1])."""
    eps = torch.finfo(g.dtype).eps
    return torch.stack([(g.abs() + eps).log().div(k).clamp_min(-1.0), (g * math.exp(k)).clamp(-1.0, 1.0)], -1)


def mlp_generator(p: dict, prefix: str, info: torch.Tensor) -> torch.Tensor:
    """m: coordinate-wise MLP 2 -> h -> h -> 1 on preprocessed gradients [..., 2] -> fast weights [...]."""
    h = F.relu(F.linear(info, p[prefix + "0.weight"], p[prefix + "0.bias"]))
    h = F.relu(F.linear(h, p[prefix + "1.weight"], p[prefix + "1.bias"]))
    return F.linear(h, p[prefix + "2.weight"], p[prefix + "2.bias"]).squeeze(-1)


def lstm_generator(cell: nn.LSTMCell, p: dict, prefix: str, infos: list[torch.Tensor]) -> torch.Tensor:
    """d: a coordinate-wise LSTM over the minibatches' preprocessed gradients [P, 2] each, then a linear
    read-out of its last output -> fast weights [P]. ``cell`` only gives the fused kernel its shape:
    its weights are ``p[prefix + "lstm.*"]``."""
    weights = {k: p[f"{prefix}lstm.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    state = None
    for x in infos:
        state = functional_call(cell, weights, (x, state))
    return F.linear(state[0], p[prefix + "out.weight"], p[prefix + "out.bias"]).squeeze(-1)


def _flat(tensors: dict, names: list[str], lead: int = 0) -> torch.Tensor:
    """Concatenate the named tensors flattened after their first ``lead`` dimensions."""
    return torch.cat([tensors[n].flatten(lead) for n in names], dim=lead)


def _unflat(flat: torch.Tensor, names: list[str], shapes: dict, lead: tuple = ()) -> dict:
    out, start = {}, 0
    for n in names:
        size = math.prod(shapes[n])
        out[n] = flat[..., start:start + size].reshape(*lead, *shapes[n])
        start += size
    return out


# ---------------------------------------------------------------- the algorithm


class MetaNet(Algorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        _check(cfg, backbone)
        self.cfg, self.ways = cfg, info.ways
        features, H = backbone.out_features, cfg.hidden
        # base learner b
        self.backbone = backbone
        self.fc1 = nn.Linear(features, H, bias=False)
        self.fc2 = nn.Linear(H, info.ways, bias=False)
        # meta learner's representation function u: the same architecture, its own weights
        self.key_backbone = copy.deepcopy(backbone)
        for module in self.key_backbone.modules():
            if hasattr(module, "reset_parameters") and module is not self.key_backbone:
                module.reset_parameters()
        self.key_fc1 = nn.Linear(features, H, bias=False)
        self.key_fc2 = nn.Linear(H, info.ways, bias=False)
        self.key_fc2.weight.requires_grad_(False)  # feeds only the (not differentiated) meta-information
        self.plan = layer_plan(backbone)
        # fast-weight generators: per network, one for the backbone's weights, one for the head's
        M = cfg.meta_hidden
        self.generators = nn.ModuleDict()
        for group in ("base_body", "base_head"):  # m: MLP 2 -> M -> M -> 1
            self.generators[group] = nn.Sequential(nn.Linear(2, M), nn.Linear(M, M), nn.Linear(M, 1))
        for group in ("key_body", "key_head"):  # d: LSTM(2, M), linear read-out
            self.generators[group] = nn.ModuleDict({"lstm": nn.LSTMCell(2, M), "out": nn.Linear(M, 1)})
        with torch.no_grad():
            for group, gen in self.generators.items():
                last = gen[2] if isinstance(gen, nn.Sequential) else gen["out"]
                last.weight.mul_(cfg.init_scale)
                last.bias.zero_()
        if not self.plan or not cfg.fast_body:  # no fast body weights (identity backbone, or head only)
            del self.generators["base_body"], self.generators["key_body"]

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if ways != self.ways:
            raise ConfigError(f"metanet's classifier has {self.ways} outputs (trained {self.ways}-way); "
                              f"it cannot run {ways}-way episodes")

    # -------------------------------------------------------- names

    def _weights(self, prefix: str) -> list[str]:
        """The fast-parameterised weight names of the body (prefix ``backbone.`` or ``key_backbone.``)."""
        return [f"{prefix}{p}weight" for _, p, _ in self.plan] if self.cfg.fast_body else []

    def task_logits(self, p: dict, support_x: torch.Tensor, support_y: torch.Tensor,
                    query_x: torch.Tensor) -> torch.Tensor:
        """MetaNet on one task: query logits [m, ways], from the parameter dict ``p`` (``named_parameters``)."""
        cfg, plan, k = self.cfg, self.plan, self.cfg.preprocess_k
        base_body, key_body = self._weights("backbone."), self._weights("key_backbone.")
        strip = {n: n.split(".", 1)[1] for n in p if n.startswith(("backbone.", "key_backbone."))}

        def sub(prefix: str, tensors: dict) -> dict:
            return {strip[n]: v for n, v in tensors.items() if n.startswith(prefix)}

        # 1. task-level fast weights of u, from its representation-loss gradients on support minibatches
        # (gradients with respect to the fast-parameterised weights only; the rest are constants)
        key_names = key_body + ["key_fc1.weight"]
        frozen = {n: p[n].detach() for n in p if n.startswith(("key_backbone.", "key_fc"))}

        def representation_loss(wrt: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            weights = {**frozen, **wrt}
            h = body(plan, sub("key_backbone.", weights), None, x)
            return F.cross_entropy(F.linear(F.relu(F.linear(h, weights["key_fc1.weight"])), weights["key_fc2.weight"]), y)

        chunks = min(cfg.representation_batches, len(support_y))
        infos: dict[str, list[torch.Tensor]] = {"key_body": [], "key_head": []}
        for x, y in zip(support_x.tensor_split(chunks), support_y.tensor_split(chunks)):
            g = grad(representation_loss)({n: frozen[n] for n in key_names}, x, y)
            if key_body:
                infos["key_body"].append(preprocess(_flat(g, key_body), k))
            infos["key_head"].append(preprocess(g["key_fc1.weight"].flatten(), k))
        shapes = {n: p[n].shape for n in p}
        key_fast = _unflat(self._lstm(p, "key_head", infos["key_head"]), ["key_fc1.weight"], shapes)
        if key_body:
            key_fast.update(_unflat(self._lstm(p, "key_body", infos["key_body"]), key_body, shapes))

        def keys(x: torch.Tensor) -> torch.Tensor:
            h = body(plan, sub("key_backbone.", p), sub("key_backbone.", key_fast) if key_body else None, x)
            return augmented_linear(h, p["key_fc1.weight"], key_fast["key_fc1.weight"], relu=False)

        # 2. example-level fast weights of b, from each support example's own loss gradient
        base_names = base_body + ["fc1.weight", "fc2.weight"]
        frozen_b = {n: p[n].detach() for n in p if n.startswith("backbone.") or n in ("fc1.weight", "fc2.weight")}
        if base_body:
            inputs = support_x  # per example through the body: its weights get fast weights too
        else:  # head only: the body's features are constants of the example gradients
            with torch.no_grad():
                inputs = body(plan, sub("backbone.", frozen_b), None, support_x)

        def example_loss(wrt: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            weights = {**frozen_b, **wrt}
            h = body(plan, sub("backbone.", weights), None, x.unsqueeze(0)) if base_body else x.unsqueeze(0)
            logits = F.linear(F.relu(F.linear(h, weights["fc1.weight"])), weights["fc2.weight"])
            return F.cross_entropy(logits, y.unsqueeze(0))

        g = vmap(grad(example_loss), in_dims=(None, 0, 0))({n: frozen_b[n] for n in base_names}, inputs, support_y)
        memory = [self._mlp(p, "base_head", preprocess(_flat(g, ["fc1.weight", "fc2.weight"], 1), k))]
        if base_body:
            memory.insert(0, self._mlp(p, "base_body", preprocess(_flat(g, base_body, 1), k)))
        memory = torch.cat(memory, dim=1)  # [n, P]: one row of fast weights per support example

        # 3. each query's fast weights: attention over the support keys
        attention = torch.softmax(F.cosine_similarity(keys(query_x).unsqueeze(1), keys(support_x).unsqueeze(0),
                                                      dim=-1, eps=1e-6), dim=1)  # [m, n]
        fast = _unflat(attention @ memory, base_names, shapes, lead=(len(query_x),))
        h = body(plan, sub("backbone.", p), sub("backbone.", fast) if base_body else None, query_x, per_example=True)
        h = augmented_linear(h, p["fc1.weight"], fast["fc1.weight"], relu=True, per_example=True)
        return augmented_linear(h, p["fc2.weight"], fast["fc2.weight"], relu=False, per_example=True)

    def _lstm(self, p: dict, group: str, infos: list[torch.Tensor]) -> torch.Tensor:
        return lstm_generator(self.generators[group]["lstm"], p, f"generators.{group}.", infos)

    def _mlp(self, p: dict, group: str, info: torch.Tensor) -> torch.Tensor:
        return mlp_generator(p, f"generators.{group}.", info)

    # -------------------------------------------------------- the interface

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        p = dict(self.named_parameters())
        losses, accs = [], []
        for t in range(batch.num_tasks):
            logits = self.task_logits(p, batch.support_x[t], batch.support_y[t], batch.query_x[t])
            loss = F.cross_entropy(logits, batch.query_y[t])
            (loss / batch.num_tasks).backward()  # per task: its graph is freed at once
            losses.append(loss.detach())
            accs.append(accuracy(logits.detach(), batch.query_y[t]))
        return {"loss": torch.stack(losses), "accuracy": torch.stack(accs)}

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        p = dict(self.named_parameters())
        losses, accs = [], []
        for t in range(batch.num_tasks):  # torch.func.grad computes the meta-information under no_grad too
            logits = self.task_logits(p, batch.support_x[t], batch.support_y[t], batch.query_x[t])
            losses.append(F.cross_entropy(logits, batch.query_y[t]))
            accs.append(accuracy(logits, batch.query_y[t]))
        return {"loss": torch.stack(losses), "accuracy": torch.stack(accs)}


def _check(cfg: Config, backbone: nn.Module) -> None:
    if cfg.hidden < 1 or cfg.meta_hidden < 1:
        raise ConfigError("algo.hidden and algo.meta_hidden must be >= 1")
    if cfg.representation_batches < 1:
        raise ConfigError(f"algo.representation_batches must be >= 1 (got {cfg.representation_batches})")
    if not cfg.preprocess_k > 0:
        raise ConfigError(f"algo.preprocess_k must be > 0 (got {cfg.preprocess_k})")
    if not cfg.init_scale > 0:
        raise ConfigError(f"algo.init_scale must be > 0 (got {cfg.init_scale})")
    if isinstance(backbone, Conv4) and backbone.norms is not None:
        raise ConfigError("metanet runs every example through its own fast weights, so per-set BatchNorm does not "
                          "apply: use backbone.norm=none (the authors' network has no normalisation)")
    if not isinstance(backbone, (Conv4, MLP, Identity)):
        raise ConfigError(f"metanet's layer augmentation is written for conv4, mlp and identity backbones, "
                          f"not {type(backbone).__name__}; use backbone=conv4 backbone.norm=none")


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MetaNet:
    return MetaNet(cfg, backbone, info)
