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
  minibatch for ``d``), about 111,000 coordinates per network for conv4-64; ``d`` and ``m`` are
  written with their own backward, in blocks (``lstm_generator``, ``mlp_generator``). On one CPU
  thread (scripts/bench_metanet.py: 5-way 1-shot, 15 queries, conv4-64, meta-batch 8) the full
  model's meta-step takes 8-10x second-order MAML's (two runs on a shared machine; 12-15x with
  the generators under autograd); about half of it is the generators, most of the rest the
  convolutions: u over the support and query images with slow and fast weights, b over the
  queries with slow and per-query fast weights, each forward and backward, alone 3.2-3.5x MAML's
  meta-step (``metanet_convs`` there), a floor for the model with these kernels. ``fast_body: false``,
  the default, gives fast weights to the linear head layers only (``fc1``, ``fc2``, ``key_fc1``), the
  backbones keeping slow weights only: 2-2.3x MAML's meta-step, still the paper's mechanism on those
  layers, and the better score per hour of CPU on the README's side-by-side Omniglot protocol
  (``fast_body: true``, the ``metanet_omniglot_5w1s`` preset's, is the paper's full model).

Written as pure functions of parameter dicts; the per-example gradients are
``torch.func.vmap(torch.func.grad(...))``, the representation-loss gradients of equal-sized
support minibatches as well. Tasks run one at a time, each backward freeing its graph (memory
does not grow with the meta-batch).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4
from metalearn.models.identity import Identity
from metalearn.models.mlp import MLP
from metalearn.models import ops


@dataclass
class Config:
    name: str = "metanet"
    hidden: int = 64  # units of fc1 / key_fc1 (the authors: 64)
    meta_hidden: int = 20  # units of the fast-weight generators (LSTM d and MLP m; the paper: 20)
    representation_batches: int = 5  # minibatches of the support set for u's meta-information (the authors: 5)
    preprocess_k: float = 7.0  # gradient preprocessing constant k
    init_scale: float = 0.01  # the generators' output layers start at this fraction of the default init
    fast_body: bool = False  # fast weights for the head only; True: for the backbone's layers too (the paper's model)


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


def body(plan: list, slow: dict, fast: dict | None, x: torch.Tensor, per_example: bool = False,
         transformed: bool = True) -> torch.Tensor:
    """The backbone's layers, layer-augmented when ``fast`` is given: [n, ...] -> [n, F].

    ``slow``/``fast`` hold ``<prefix>weight`` (and slow ``<prefix>bias``); fast weights are shared by
    the examples, or one per example (``per_example``: [n, *shape]). ``transformed=False`` (no torch.func
    transform around the call) pools with ``ops.max_pool2x2``: the same values and gradients, faster on CPU.
    """
    h = x
    for kind, prefix, pools in plan:
        out = F.relu(_apply(kind, h, slow[prefix + "weight"], slow[prefix + "bias"], False))
        if fast is not None:
            out = out + F.relu(_apply(kind, h, fast[prefix + "weight"], None, per_example))
        h = (F.max_pool2d(out, 2) if transformed else ops.max_pool2x2(out)) if pools else out
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


def preprocess(g: torch.Tensor, k: float, dim: int = -1) -> torch.Tensor:
    """Gradients [...] -> two features stacked at ``dim`` (default last: [..., 2]): (log magnitude / k, clamped
    at -1; sign-like g e^k, clamped to [-1, 1])."""
    eps = torch.finfo(g.dtype).eps
    return torch.stack([(g.abs() + eps).log().div(k).clamp_min(-1.0), (g * math.exp(k)).clamp(-1.0, 1.0)], dim)


# The generators run once per weight coordinate: ~111,000 coordinates per conv4-64 body, times 5 support
# minibatches (d) or 5 support examples (m). Written with autograd (nn.LSTMCell through functional_call,
# F.linear) they were 62% of the full model's meta-step on one CPU thread (scripts/bench_metanet.py): every op
# a pass over [111,168 x 80] in memory, the input-weight gradients as matmuls with a 111,168-long inner
# dimension and 2 outputs (the largest single cost, 94 ms each), a zero-filled full-size gradient for every
# slice of the fast weights. The functions below compute the same values and gradients (float64 tests:
# 1e-10), coordinates last ([features, P]: each gate a contiguous block; the LSTM's input and recurrent
# weights as one matmul from the second step on), in blocks of ``BLOCK`` coordinates, with the backward
# written out (autograd.Function): the generators' share of the profile fell from 4.2 s to 1.9 s a task.
BLOCK = 8192


def _lstm_forward(x: torch.Tensor, w_ih: torch.Tensor, w: torch.Tensor, b: torch.Tensor, saved: list | None):
    """x [T, I, B] -> last h [M, B]. ``w`` is [w_hh, w_ih] ([4M, M + I]): from the second step on, the gates
    are one matmul with z = [h_{t-1}; x_t]. ``saved`` receives per step (activated gates [4M, B] in the
    order i, f, g, o; c; tanh c; z or None)."""
    M, B = w.shape[1] - x.shape[1], x.shape[2]
    h = c = None
    for t in range(x.shape[0]):
        if h is None:  # h_0 = 0
            z, a = None, torch.addmm(b, w_ih, x[t])  # [4M, B]
        else:
            z = torch.cat([h, x[t]])  # [M + I, B]
            a = torch.addmm(b, w, z)
        a[:2 * M].sigmoid_()
        a[2 * M:3 * M].tanh_()
        a[3 * M:].sigmoid_()
        i, f, g, o = a.view(4, M, B).unbind(0)
        c_new = i * g
        if c is not None:
            c_new.addcmul_(f, c)
        c = c_new
        tc = torch.tanh(c)
        h = tc * o
        if saved is not None:
            saved.append((a, c, tc, z))
    return h


def _lstm_backward(x, w_ih, w, dh, saved, dw_ih, dw, db, dx) -> None:
    """Accumulates one block's gradients into dw_ih (first step), dw ([w_hh, w_ih], later steps), db [4M, 1];
    writes dx (if not None)."""
    M, B = w.shape[1] - x.shape[1], x.shape[2]
    dc = None
    for t in reversed(range(x.shape[0])):
        a, c, tc, z = saved[t]
        i, f, g, o = a.view(4, M, B).unbind(0)
        da = torch.empty_like(a)
        di, df, dg, do = da.view(4, M, B).unbind(0)
        torch.mul(dh, o, out=do)  # dL/dh * o
        dct = torch.mul(tc, tc).neg_().add_(1).mul_(do)  # ... * (1 - tanh^2 c): through h = o tanh c
        dc = dct if dc is None else dc.add_(dct)  # plus the path through c_{t+1} = f c_t + ...
        do.mul_(tc).mul_(1 - o)  # o's pre-activation: dL/dh tanh c o (1 - o)
        torch.mul(dc, g, out=di).mul_(i).mul_(1 - i)
        torch.mul(dc, i, out=dg).mul_(1 - g * g)
        if t > 0:
            torch.mul(dc, saved[t - 1][1], out=df).mul_(f).mul_(1 - f)
            dc.mul_(f)
        else:
            df.zero_()  # c_0 = 0
        db.add_(da.sum(1, keepdim=True))
        if z is None:
            dw_ih.addmm_(da, x[t].t())
        else:
            dw.addmm_(da, z.t())
            dh = w[:, :M].t() @ da
        if dx is not None:
            torch.mm(w_ih.t(), da, out=dx[t])


class _CoordinateLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, w_out, b_out, block):
        b = (b_ih + b_hh).unsqueeze(1)
        w = torch.cat([w_hh, w_ih], 1)
        saves, hs = [], []
        for xb in x.split(block, dim=2):
            saves.append([])
            hs.append(_lstm_forward(xb, w_ih, w, b, saves[-1]))
        h = torch.cat(hs, 1)
        ctx.saves, ctx.block = saves, block
        ctx.save_for_backward(x, w_ih, w, w_out, h)
        return torch.addmm(b_out.unsqueeze(1), w_out, h).squeeze(0)

    @staticmethod
    def backward(ctx, dy):
        x, w_ih, w, w_out, h = ctx.saved_tensors
        M = w.shape[1] - x.shape[1]
        dw_ih, dw, db = torch.zeros_like(w_ih), torch.zeros_like(w), w.new_zeros(w.shape[0], 1)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dh = w_out.t() @ dy.unsqueeze(0)  # [M, P]
        at = 0
        for xb, dhb, saved in zip(x.split(ctx.block, dim=2), dh.split(ctx.block, dim=1), ctx.saves):
            width = xb.shape[2]
            _lstm_backward(xb, w_ih, w, dhb, saved, dw_ih, dw, db, None if dx is None else dx[..., at:at + width])
            at += width
        ctx.saves = None
        db = db.squeeze(1)
        return (dx, dw_ih + dw[:, M:], dw[:, :M].contiguous(), db, db.clone(), (h @ dy).unsqueeze(0),
                dy.sum().view(1), None)


def lstm_generator(p: dict, prefix: str, info: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """d: a coordinate-wise LSTM (``nn.LSTMCell``'s equations, gates i, f, g, o) over the minibatches'
    preprocessed gradients ``info`` [T, 2, P], from zero state, then a linear read-out of its last output ->
    fast weights [P]. Its weights are ``p[prefix + "lstm.*"]`` and ``p[prefix + "out.*"]``."""
    args = [p[f"{prefix}lstm.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    args += [p[prefix + "out.weight"], p[prefix + "out.bias"]]
    block = block or BLOCK
    if torch.is_grad_enabled() and any(t.requires_grad for t in (info, *args)):
        return _CoordinateLSTM.apply(info, *args, block)
    b, w = (args[2] + args[3]).unsqueeze(1), torch.cat([args[1], args[0]], 1)
    h = torch.cat([_lstm_forward(xb, args[0], w, b, None) for xb in info.split(block, dim=2)], 1)
    return torch.addmm(args[5].unsqueeze(1), args[4], h).squeeze(0)


class _CoordinateMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, b0, w1, b1, w2, b2, block):
        saves, ys = [], []
        for xb in x.split(block, dim=1):
            h1 = torch.addmm(b0.unsqueeze(1), w0, xb).relu_()
            h2 = torch.addmm(b1.unsqueeze(1), w1, h1).relu_()
            ys.append(torch.addmm(b2.unsqueeze(1), w2, h2))
            saves.append((h1, h2))
        ctx.saves, ctx.block = saves, block
        ctx.save_for_backward(x, w0, w1, w2)
        return torch.cat(ys, 1).squeeze(0)

    @staticmethod
    def backward(ctx, dy):
        x, w0, w1, w2 = ctx.saved_tensors
        grads = [torch.zeros_like(w) for w in (w0, w1, w2)]
        dbs = [w.new_zeros(w.shape[0], 1) for w in (w0, w1, w2)]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        at = 0
        for xb, dyb, (h1, h2) in zip(x.split(ctx.block, dim=1), dy.unsqueeze(0).split(ctx.block, dim=1), ctx.saves):
            grads[2].addmm_(dyb, h2.t())
            dbs[2].add_(dyb.sum(1, keepdim=True))
            d2 = torch.ops.aten.threshold_backward(w2.t() @ dyb, h2, 0)  # ReLU's backward, as autograd's
            grads[1].addmm_(d2, h1.t())
            dbs[1].add_(d2.sum(1, keepdim=True))
            d1 = torch.ops.aten.threshold_backward(w1.t() @ d2, h1, 0)
            grads[0].addmm_(d1, xb.t())
            dbs[0].add_(d1.sum(1, keepdim=True))
            if dx is not None:
                torch.mm(w0.t(), d1, out=dx[:, at:at + xb.shape[1]])
            at += xb.shape[1]
        ctx.saves = None
        return dx, grads[0], dbs[0].squeeze(1), grads[1], dbs[1].squeeze(1), grads[2], dbs[2].squeeze(1), None


def mlp_generator(p: dict, prefix: str, info: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """m: a coordinate-wise MLP 2 -> h -> h -> 1 (ReLU after the first two layers) on preprocessed gradients
    ``info`` [2, N] -> fast weights [N]. Its weights are ``p[prefix + "{0,1,2}.*"]``."""
    args = [p[f"{prefix}{i}.{k}"] for i in range(3) for k in ("weight", "bias")]
    block = block or BLOCK
    if torch.is_grad_enabled() and any(t.requires_grad for t in (info, *args)):
        return _CoordinateMLP.apply(info, *args, block)
    ys = []
    for xb in info.split(block, dim=1):
        h = torch.addmm(args[1].unsqueeze(1), args[0], xb).relu_()
        h = torch.addmm(args[3].unsqueeze(1), args[2], h).relu_()
        ys.append(torch.addmm(args[5].unsqueeze(1), args[4], h))
    return torch.cat(ys, 1).squeeze(0)


def _flat(tensors: dict, names: list[str], lead: int = 0) -> torch.Tensor:
    """Concatenate the named tensors flattened after their first ``lead`` dimensions."""
    return torch.cat([tensors[n].flatten(lead) for n in names], dim=lead)


def _split(flat: torch.Tensor, names: list[str], shapes: dict) -> dict:
    """[..., P] -> {name: [..., size]} views, in the order of ``names`` (one split: its backward is one cat)."""
    return dict(zip(names, flat.split([math.prod(shapes[n]) for n in names], dim=-1)))


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
        shapes = {n: p[n].shape for n in p}

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
        xs, ys = support_x.tensor_split(chunks), support_y.tensor_split(chunks)
        wrt = {n: frozen[n] for n in key_names}
        if len(support_y) % chunks == 0:  # minibatches of one size: all at once, [chunks, *shape] per weight
            g = vmap(grad(representation_loss), in_dims=(None, 0, 0))(wrt, torch.stack(xs), torch.stack(ys))
        else:
            per = [grad(representation_loss)(wrt, x, y) for x, y in zip(xs, ys)]
            g = {n: torch.stack([q[n] for q in per]) for n in key_names}
        # meta-information, coordinates last: [chunks, 2, P]
        key_fast = _split(self._lstm(p, "key_head", preprocess(g["key_fc1.weight"].flatten(1), k, dim=1)),
                          ["key_fc1.weight"], shapes)
        if key_body:
            info = preprocess(_flat(g, key_body, 1), k, dim=1)
            key_fast.update(_split(self._lstm(p, "key_body", info), key_body, shapes))
        key_fast = {n: v.view(shapes[n]) for n, v in key_fast.items()}

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
        n = len(support_y)

        def example_fast_weights(group: str, names: list[str]) -> dict:
            """m over the coordinates of all n examples at once: [n, size] per weight, a row per example."""
            info = preprocess(_flat(g, names, 1), k, dim=0).flatten(1)  # [2, n * P]
            return _split(self._mlp(p, group, info).view(n, -1), names, shapes)

        memory = example_fast_weights("base_head", ["fc1.weight", "fc2.weight"])
        if base_body:
            memory.update(example_fast_weights("base_body", base_body))

        # 3. each query's fast weights: attention over the support keys
        h = body(plan, sub("key_backbone.", p), sub("key_backbone.", key_fast) if key_body else None,
                 torch.cat([support_x, query_x]), transformed=False)  # support and queries through u at once
        keys = augmented_linear(h, p["key_fc1.weight"], key_fast["key_fc1.weight"], relu=False)
        attention = torch.softmax(F.cosine_similarity(keys[n:].unsqueeze(1), keys[:n].unsqueeze(0),
                                                      dim=-1, eps=1e-6), dim=1)  # [m, n]
        m = len(query_x)
        fast = {name: (attention @ memory[name]).view(m, *shapes[name]) for name in base_names}  # [m, *shape] each
        h = body(plan, sub("backbone.", p), sub("backbone.", fast) if base_body else None, query_x, per_example=True,
                 transformed=False)
        h = augmented_linear(h, p["fc1.weight"], fast["fc1.weight"], relu=True, per_example=True)
        return augmented_linear(h, p["fc2.weight"], fast["fc2.weight"], relu=False, per_example=True)

    def _lstm(self, p: dict, group: str, info: torch.Tensor) -> torch.Tensor:
        return lstm_generator(p, f"generators.{group}.", info)

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
                          "apply: use backbone=conv4_plain (its default: conv4 without normalisation, as the authors' "
                          "network) or backbone.norm=none")
    if not isinstance(backbone, (Conv4, MLP, Identity)):
        raise ConfigError(f"metanet's layer augmentation is written for conv4, mlp and identity backbones, "
                          f"not {type(backbone).__name__}; use backbone=conv4 backbone.norm=none")


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MetaNet:
    return MetaNet(cfg, backbone, info)
