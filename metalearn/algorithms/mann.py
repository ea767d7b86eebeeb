"""Memory-augmented neural network (MANN) with least-recently-used access (Santoro, Bartunov, Botvinick,
Wierstra & Lillicrap, ICML 2016, arXiv:1605.06065).

A task is read as one sequence of (x_t, y_{t-1}) steps: each example arrives
with the label of the example before it, so the network must bind an image to
its label across one step and store the pair to recognise the class later. An
LSTM controller reads and writes an external memory; nothing is adapted per
task, and the meta-parameters (embedding, controller, heads, output layer) are
trained end to end by the cross-entropy of the scored steps (``loss_steps``).

The episode protocol, in this package's episode format: the support examples
(in the sampler's random order), then the query examples. Two readings:

* the few-shot one (the defaults: ``label_delay: false``, ``query_steps:
  separate``, ``loss_steps: queries``): each support step is fed its own
  one-hot label, each query gets its own unlabelled step after the support
  sequence, and the loss and accuracy are the queries', as for every
  algorithm of this package;
* the paper's online one (``label_delay: true``, ``query_steps: sequence``,
  ``loss_steps: all``): step t is fed the label of step t-1 (zeros at the
  first step, the last support label at the first query step, zeros after
  it: a query's label is never fed), so the prediction at every step is made
  before its own label arrives, and every step is scored. With Santoro's
  episodes (``ways=5 shots=10 queries=1``: 5 classes, 10 instances each in
  random order) ``evaluate`` also reports ``accuracy_instance<k>``, the
  accuracy at the k-th presentation of a class (the paper's table); it does
  so whenever ``label_delay`` is true.

One step (the paper's section 3.2, with H read heads, N slots of size M):

* controller: ``h_t, c_t = LSTM([x_t, y_{t-1}, r_{t-1}], (h_{t-1}, c_{t-1}))``,
  r_{t-1} the H reads of the previous step;
* each head emits a key ``k_t = tanh(W_k h_t + b_k)`` (size M), used to write
  and to read, and a gate ``sigma_t = sigmoid(W_a h_t + b_a)``;
* LRUA write weights ``w^w_t = sigma_t w^r_{t-1} + (1 - sigma_t) w^lu_{t-1}``, with
  ``w^lu_{t-1}`` one on the H least-used slots of ``w^u_{t-1}`` and zero elsewhere;
  the least-used slot of ``w^u_{t-1}`` is erased (set to zero), then
  ``M_t = M_{t-1} + sum_heads w^w_t k_t^T``;
* content read of the memory as it was before this step's write:
  ``w^r_t = softmax_i(beta cos(k_t, M_{t-1}(i)))``, ``r_t = w^r_t M_{t-1}``, with
  beta = ``key_strength`` (1 in the paper; 10 by default, see below);
  ``read_after_write: true`` reads M_t instead;
* usage: ``w^u_t = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t)``;
* output: ``logits_t = W_o [h_t, r_t] + b_o``.

Why it was at chance (fixed). The key is both what a step writes and what it
reads with. Read after the write (M_t, the literal order of the equations),
the slots the step has just written hold its own key, at cosine about 1, the
highest any slot can reach: the read is drawn to the step's own key, which
carries no label (a query's never arrives; in the online protocol neither has
the current example's). With sharp reads (beta 10) the read is almost only
that; with the paper's beta 1 it is close to uniform over the 128 slots.
Either way the reads carried next to no label information and the output
settled on the uniform prediction (training loss ln 5 = 1.6094 throughout).
Measured on omniglot_small (5-way 1-shot, 5 queries, meta-batch 8, conv4-64,
seed 0), with the few-shot reading and beta 10: reading M_{t-1}, training
accuracy 0.46 after 150 updates (validation 0.48); reading M_t, at chance
after 650 updates (an earlier run), and with the writes made per head into
distinct slots and a separate write vector as well, 0.19 after 150; reading
M_{t-1} with beta 1, or with the delayed labels and queries in sequence,
still chance after 150-200. The regression test's small model: validation
0.53 after 100 updates reading M_{t-1}, 0.27 reading M_t. The re-implementation of the paper's code
(ntm-one-shot) avoids the self-match differently: it writes a separate
vector ``a_t = tanh(W_a h_t + b)`` and reads with ``k_t``. Reading M_{t-1}
keeps the paper's single key and also gives ``w^r_{t-1}`` (the slot the
previous step *retrieved*) the meaning the paper gives it, "the most recently
read memory", which the gate can update, rather than the slot that step had
just written.

Initial state, per task, made fresh in every call (nothing is kept in the
module between episodes): h, c, reads, read weights and usage zero; memory
1e-6 everywhere (as in the widely used re-implementation, so that cosines are defined); ties in
usage go to the lowest slot index (so the first writes go to slots 0..H-1).
The least-used selection is a discrete choice with no gradient, as in the paper.

Choices, stated:

* The input embedding is the configured backbone (conv4 by default), as in
  later re-implementations; the paper feeds the flattened 20x20 pixels.
* ``query_steps: sequence`` is the paper's: queries follow each other in one
  sequence, unlabelled, so a query's prediction also depends on the images of
  the queries before it (never on their labels), and on their number and
  order. ``query_steps: separate`` (default) gives every query its own step
  right after the support sequence (the state after the support set is copied
  for each query), like SNAIL's protocol: a query sees the support set and
  itself only. Both run all tasks of a batch together, step by step.
* Labels and outputs have one entry per training way, so episodes of other
  ``ways`` are refused.
* ``key_strength`` (beta): the cosines lie in [-1, 1], so over 128 slots the
  paper's read weights are nearly uniform at the start; 10 (the key strength
  of the Neural Turing Machine this model extends, fixed here) makes reads
  sharp. With beta 1 nothing was learned within the short budgets tried.
* ``label_delay: false`` (default) is a departure from the paper's online
  protocol: support labels are given with the support set, the few-shot
  reading. With the delayed labels the 1-shot side-by-side protocol (1000
  updates) is out of reach here; the online protocol is kept for the paper's
  accuracy by instance (``loss_steps: all``).
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
    key_strength: float = 10.0  # beta: read weights softmax(beta * cosine); 1 is the paper's (see the module docstring)
    label_delay: bool = False  # true: step t is fed the label of step t-1 (the paper); false: a support step its own label
    query_steps: str = "separate"  # sequence: queries follow each other (the paper) | separate: each its own step
    read_after_write: bool = False  # false: read M_{t-1}, before this step's write (see the docstring); true: M_t
    loss_steps: str = "queries"  # queries: the queries' loss | all: every step's (the paper's; needs label_delay)


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
    per_example_features = False  # a sequence learner: metalearn eval refuses finetune.* for it

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
        if cfg.loss_steps not in ("queries", "all"):
            raise ConfigError(f"algo.loss_steps={cfg.loss_steps!r} is not one of: queries, all")
        if cfg.loss_steps == "all" and not cfg.label_delay:
            raise ConfigError("algo.loss_steps=all scores the support steps, which see their own label with "
                              "algo.label_delay=false: use algo.label_delay=true or algo.loss_steps=queries")
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
        # the read: from the memory before this step's write (M_{t-1}), or after it (M_t, read_after_write)
        read = memory if self.cfg.read_after_write else state.memory
        similarity = F.normalize(keys, dim=-1, eps=COSINE_EPS) @ F.normalize(read, dim=-1, eps=COSINE_EPS).transpose(1, 2)
        read_weights = (self.cfg.key_strength * similarity).softmax(-1)  # [B, H, N]
        reads = read_weights @ read  # [B, H, M]
        usage = self.cfg.usage_decay * state.usage + read_weights.sum(1) + write_weights.sum(1)
        return MemoryState(h, c, reads, memory, read_weights, usage)

    def logits(self, state: MemoryState) -> torch.Tensor:
        return self.output(torch.cat([state.h, state.reads.flatten(1)], dim=-1))

    def run(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of every support step [B, S, ways] (the prediction at a step, made before its own label is fed
        when ``label_delay``) and of every query [B, Q, ways] (see ``query_steps``)."""
        support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)  # [B, S, F], [B, Q, F]
        tasks, shown, queries = support.shape[0], support.shape[1], query.shape[1]
        labels = F.one_hot(batch.support_y, self.ways).to(support.dtype)  # [B, S, ways]
        nothing = labels.new_zeros(tasks, self.ways)
        if self.cfg.label_delay:  # step t gets the label of step t-1; the first query the last support's
            fed, first_query = torch.cat([nothing[:, None], labels[:, :-1]], dim=1), labels[:, -1]
        else:  # each support step its own label, queries nothing
            fed, first_query = labels, nothing
        state, seen = self.initial_state(tasks, support), []
        for t in range(shown):
            state = self.step(state, support[:, t], fed[:, t])
            seen.append(self.logits(state))
        support_logits = torch.stack(seen, dim=1)
        if self.cfg.query_steps == "separate":
            state = self.step(state.repeat_interleave(queries), query.flatten(0, 1),
                              first_query.repeat_interleave(queries, dim=0))
            return support_logits, self.logits(state).view(tasks, queries, self.ways)
        out = []
        for j in range(queries):  # a query's own label is never fed
            state = self.step(state, query[:, j], first_query if j == 0 else nothing)
            out.append(self.logits(state))
        return support_logits, torch.stack(out, dim=1)

    def query_logits(self, batch: TaskBatch) -> torch.Tensor:
        """Logits of every query after the support sequence, [B, Q, ways] (see ``query_steps``)."""
        return self.run(batch)[1]

    def _scored(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        support_logits, query_logits = self.run(batch)
        if self.cfg.loss_steps == "all":  # every step's prediction, the support steps' before their label arrives
            loss = task_cross_entropy(torch.cat([support_logits, query_logits], 1),
                                      torch.cat([batch.support_y, batch.query_y], 1))
        else:
            loss = task_cross_entropy(query_logits, batch.query_y)
        return loss, support_logits, query_logits

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        loss, _, query_logits = self._scored(batch)
        loss.mean().backward()
        return {"loss": loss.detach(), "accuracy": accuracy(query_logits.detach(), batch.query_y)}

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        loss, support_logits, query_logits = self._scored(batch)
        metrics = {"loss": loss, "accuracy": accuracy(query_logits, batch.query_y)}
        if self.cfg.label_delay:  # the support steps are predictions too: accuracy by instance (the paper's table)
            metrics.update(instance_accuracy(support_logits, batch.support_y, self.ways))
        return metrics

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        loss, _, query_logits = self._scored(batch)
        return loss, accuracy(query_logits, batch.query_y)


def instance_accuracy(logits: torch.Tensor, labels: torch.Tensor, ways: int) -> dict[str, torch.Tensor]:
    """``accuracy_instance<k>`` [B]: the accuracy of the support steps that show their class for the k-th time,
    k = 1 .. the most presentations of a class (per episode, the mean over the classes shown k times)."""
    correct = (logits.argmax(-1) == labels).float()  # [B, S]
    shown = F.one_hot(labels, ways).cumsum(1).gather(2, labels.unsqueeze(-1)).squeeze(-1)  # [B, S]: k of each step
    out = {}
    for k in range(1, int(shown.max()) + 1 if shown.numel() else 1):
        at = (shown == k).float()
        out[f"accuracy_instance{k}"] = (correct * at).sum(1) / at.sum(1).clamp_min(1)
    return out


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MANN:
    return MANN(cfg, backbone, info)
