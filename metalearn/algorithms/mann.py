"""Memory-augmented neural network (MANN) with least-recently-used access (Santoro, Bartunov, Botvinick,
Wierstra & Lillicrap, ICML 2016, arXiv:1605.06065).

A task is read as one sequence of (x_t, y_{t-1}) steps: each example arrives
with the label of the example before it, so the network must bind an image to
its label across one step and store the pair to recognise the class later. An
LSTM controller reads and writes an external memory; nothing is adapted per
task, and the meta-parameters (embedding, controller, heads, output layer) are
trained end to end by the query cross-entropy.

The episode protocol, in this package's episode format: the support examples
(in the sampler's random order), then the query examples. Step t is fed the
embedding of its example and the one-hot label of step t-1 (``label_delay:
true``, the default): zeros at the first step, the last support label at the
first query step, and zeros after it: a query's label is never fed forward. The prediction at each query step is
scored; support steps are not (the paper scores every step; here the loss and
the accuracy are the queries', as for every algorithm of this package).

One step (the paper's section 3.2, with H read heads, N slots of size M):

* controller: ``h_t, c_t = LSTM([x_t, y_{t-1}, r_{t-1}], (h_{t-1}, c_{t-1}))``,
  r_{t-1} the H reads of the previous step;
* each head emits a key ``k_t = tanh(W_k h_t + b_k)`` (size M), used to write
  and to read, and a gate ``sigma_t = sigmoid(W_a h_t + b_a)``;
* LRUA write weights ``w^w_t = sigma_t w^r_{t-1} + (1 - sigma_t) w^lu_{t-1}``, with
  ``w^lu_{t-1}`` one on the H least-used slots of ``w^u_{t-1}`` and zero elsewhere;
  the least-used slot of ``w^u_{t-1}`` is erased (set to zero), then
  ``M_t = M_{t-1} + sum_heads w^w_t k_t^T``;
* content read: ``w^r_t = softmax_i(beta cos(k_t, M_t(i)))``, ``r_t = w^r_t M_t``, with
  beta = ``key_strength``, 1 in the paper (see below);
* usage: ``w^u_t = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t)``;
* output: ``logits_t = W_o [h_t, r_t] + b_o``.

Initial state, per task, made fresh in every call (nothing is kept in the
module between episodes): h, c, reads, read weights and usage zero; memory
1e-6 everywhere (as in the widely used re-implementation, so that cosines are defined); ties in
usage go to the lowest slot index (so the first writes go to slots 0..H-1).
The least-used selection is a discrete choice with no gradient, as in the paper.

Choices, stated:

* The input embedding is the configured backbone (conv4 by default), as in
  later re-implementations; the paper feeds the flattened 20x20 pixels.
* ``query_steps: sequence`` (default) is the paper's protocol: queries follow
  each other in one sequence, unlabelled, so a query's prediction also depends
  on the images of the queries before it (never on their labels), and on their
  number and order. ``query_steps: separate`` gives every query its own step
  right after the support sequence (the state after the support set is copied
  for each query), like SNAIL's protocol: a query sees the support set and
  itself only. Both run all tasks of a batch together, step by step.
* Labels and outputs have one entry per training way, so episodes of other
  ``ways`` are refused.

Learning speed, measured (glyphs, conv4-32, 5-way 1-shot, meta-batch 8, one
thread): with the paper's protocol and addressing the training accuracy stays
at chance for the 600 updates tried (also with a fixed embedding on a toy
problem: 700 updates of 16 tasks): binding an image to a label that arrives
one step later takes long training to discover. Two options shorten that,
each a departure from the paper, off by default:

* ``key_strength`` (beta > 1): the cosines lie in [-1, 1], so over 128 slots
  the paper's read weights are nearly uniform at the start; scaling them (the
  key strength of the Neural Turing Machine this model extends) makes reads
  sharp. With the delayed labels it shortens the plateau (toy problem: learning
  starts after about 350 updates instead of more than 700);
* ``label_delay: false``: each support step is fed its own label (queries
  still nothing), the few-shot reading of the protocol (support labels are
  given with the support set) rather than the paper's online one; together with
  ``key_strength: 10`` MANN learns on glyphs within about 150 updates (the
  learning test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError

#: the initial value of every memory entry (the paper's code), so that cosine similarities are defined
MEMORY_INIT = 1e-6
#: norms are clamped here in the cosine similarity (an erased slot is all zeros)
COSINE_EPS = 1e-8


@dataclass
class Config:
    name: str = "mann"
    controller_size: int = 200  # LSTM controller's hidden units
    memory_slots: int = 128  # N: rows of the external memory
    memory_size: int = 40  # M: size of each row (and of each key)
    read_heads: int = 4  # H: reads per step (also the number of least-used slots written)
    usage_decay: float = 0.95  # gamma: decay of the usage weights
    key_strength: float = 1.0  # beta: read weights softmax(beta * cosine); 1 is the paper's (see the module docstring)
    label_delay: bool = True  # true: step t is fed the label of step t-1 (the paper); false: a support step its own label
    query_steps: str = "sequence"  # sequence: queries follow each other (the paper) | separate: each its own step


class MemoryState(NamedTuple):
    """The recurrent state of one batch of tasks (first dimension)."""

    h: torch.Tensor  # [B, controller]
    c: torch.Tensor  # [B, controller]
    reads: torch.Tensor  # [B, H, M]   r_t
    memory: torch.Tensor  # [B, N, M]   M_t
    read_weights: torch.Tensor  # [B, H, N]   w^r_t
    usage: torch.Tensor  # [B, N]      w^u_t

    def repeat_interleave(self, repeats: int) -> "MemoryState":
        return MemoryState(*(t.repeat_interleave(repeats, dim=0) for t in self))


class MANN(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if min(cfg.controller_size, cfg.memory_slots, cfg.memory_size, cfg.read_heads) < 1:
            raise ConfigError("algo.controller_size, algo.memory_slots, algo.memory_size and algo.read_heads must be >= 1")
        if cfg.read_heads > cfg.memory_slots:
            raise ConfigError(f"algo.read_heads={cfg.read_heads} is more than algo.memory_slots={cfg.memory_slots}: "
                              "each head writes to one of the least-used slots")
        if not 0.0 <= cfg.usage_decay <= 1.0:
            raise ConfigError(f"algo.usage_decay={cfg.usage_decay} must be in [0, 1]")
        if not (0.0 < cfg.key_strength < float("inf")):
            raise ConfigError(f"algo.key_strength={cfg.key_strength} must be a positive number")
        if cfg.query_steps not in ("sequence", "separate"):
            raise ConfigError(f"algo.query_steps={cfg.query_steps!r} is not one of: sequence, separate")
        self.cfg, self.backbone, self.ways = cfg, backbone, info.ways
        heads, size = cfg.read_heads, cfg.memory_size
        self.controller = nn.LSTMCell(backbone.out_features + info.ways + heads * size, cfg.controller_size)
        self.keys = nn.Linear(cfg.controller_size, heads * size)
        self.gates = nn.Linear(cfg.controller_size, heads)
        self.output = nn.Linear(cfg.controller_size + heads * size, info.ways)

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if ways != self.ways:
            raise ConfigError(f"mann's label inputs and outputs have {self.ways} entries (trained {self.ways}-way); "
                              f"it cannot run {ways}-way episodes: train with the ways you test with")

    def initial_state(self, tasks: int, like: torch.Tensor) -> MemoryState:
        c = self.cfg
        zeros = lambda *shape: like.new_zeros(tasks, *shape)  # noqa: E731
        return MemoryState(zeros(c.controller_size), zeros(c.controller_size), zeros(c.read_heads, c.memory_size),
                           like.new_full((tasks, c.memory_slots, c.memory_size), MEMORY_INIT),
                           zeros(c.read_heads, c.memory_slots), zeros(c.memory_slots))

    def step(self, state: MemoryState, x: torch.Tensor, previous_label: torch.Tensor) -> MemoryState:
        """One time step for a batch of tasks: x [B, F], previous_label [B, ways] -> the new state."""
        heads, size = self.cfg.read_heads, self.cfg.memory_size
        h, c = self.controller(torch.cat([x, previous_label, state.reads.flatten(1)], dim=-1), (state.h, state.c))
        keys = torch.tanh(self.keys(h)).view(-1, heads, size)  # [B, H, M]
        gate = torch.sigmoid(self.gates(h)).unsqueeze(-1)  # [B, H, 1]
        # least-used slots of the previous usage (stable sort: ties go to the lowest index)
        order = state.usage.argsort(dim=-1, stable=True)
        least_used = torch.zeros_like(state.usage).scatter_(1, order[:, :heads], 1.0)  # w^lu_{t-1}
        kept = torch.ones_like(state.usage).scatter_(1, order[:, :1], 0.0)  # erase the least-used slot
        write_weights = gate * state.read_weights + (1 - gate) * least_used.unsqueeze(1)  # [B, H, N]
        memory = state.memory * kept.unsqueeze(-1) + write_weights.transpose(1, 2) @ keys  # [B, N, M]
        similarity = F.normalize(keys, dim=-1, eps=COSINE_EPS) @ F.normalize(memory, dim=-1, eps=COSINE_EPS).transpose(1, 2)
        read_weights = (self.cfg.key_strength * similarity).softmax(-1)  # [B, H, N]
        reads = read_weights @ memory  # [B, H, M]
        usage = self.cfg.usage_decay * state.usage + read_weights.sum(1) + write_weights.sum(1)
        return MemoryState(h, c, reads, memory, read_weights, usage)

    def logits(self, state: MemoryState) -> torch.Tensor:
        return self.output(torch.cat([state.h, state.reads.flatten(1)], dim=-1))

    def query_logits(self, batch: TaskBatch) -> torch.Tensor:
        """Logits of every query after the support sequence, [B, Q, ways] (see ``query_steps``)."""
        support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)  # [B, S, F], [B, Q, F]
        tasks, shown, queries = support.shape[0], support.shape[1], query.shape[1]
        labels = F.one_hot(batch.support_y, self.ways).to(support.dtype)  # [B, S, ways]
        nothing = labels.new_zeros(tasks, self.ways)
        if self.cfg.label_delay:  # step t gets the label of step t-1; the first query the last support's
            fed, first_query = torch.cat([nothing[:, None], labels[:, :-1]], dim=1), labels[:, -1]
        else:  # each support step its own label, queries nothing
            fed, first_query = labels, nothing
        state = self.initial_state(tasks, support)
        for t in range(shown):
            state = self.step(state, support[:, t], fed[:, t])
        if self.cfg.query_steps == "separate":
            state = self.step(state.repeat_interleave(queries), query.flatten(0, 1),
                              first_query.repeat_interleave(queries, dim=0))
            return self.logits(state).view(tasks, queries, self.ways)
        out = []
        for j in range(queries):  # a query's own label is never fed
            state = self.step(state, query[:, j], first_query if j == 0 else nothing)
            out.append(self.logits(state))
        return torch.stack(out, dim=1)

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.query_logits(batch)
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MANN:
    return MANN(cfg, backbone, info)
