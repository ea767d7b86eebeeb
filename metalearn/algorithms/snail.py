"""SNAIL: A Simple Neural Attentive Meta-Learner (Mishra, Rohaninejad, Chen & Abbeel, ICLR 2018, arXiv:1707.03141).

A task is read as one sequence. Each step is an example's embedding
concatenated with its label: the one-hot of the true label for the N*K support
steps, zeros for the last step, a query. The network, causal throughout,
predicts the query's label from the output of that last step; nothing is
adapted per task, so the meta-parameters (embedding, SNAIL blocks, output
layer) are trained end to end by the query cross-entropy.

Blocks (the paper's section 3 and appendix):

* DenseBlock(dilation d, D filters): a causal convolution of kernel 2 and
  dilation d (step t reads steps t-d and t; zeros before the start) with 2D
  output channels xf, xg; the gated activation tanh(xf) * sigmoid(xg) (D
  channels) is appended to the block's input.
* TCBlock(T, D): ceil(log2 T) DenseBlocks of dilations 1, 2, 4, ...; the
  receptive field, 2^ceil(log2 T) steps, covers the whole sequence of length
  T = N*K + 1 (the training episodes' shape). The paper's pseudocode starts at
  dilation 2 (2, 4, ..., 2^ceil(log2 T)), which leaves steps at odd distances
  out of the convolutions' view; here 1, 2, 4, ....
* AttentionBlock(key k, value v): single-head causal softmax attention, queries
  and keys linear maps of size k, values of size v, logits scaled by 1/sqrt(k);
  the read is appended to the block's input.

The Omniglot network (the defaults): AttentionBlock(64, 32), TCBlock(T, 128),
AttentionBlock(256, 128), TCBlock(T, 128), AttentionBlock(512, 256), then a
linear map of the last step's features to N logits (the paper's 1x1
convolution with N channels). ``attention_keys`` / ``attention_values`` list
the attention blocks; a TC block of ``filters`` filters sits between each
consecutive two. The embedding is the configured backbone (conv4: the paper's
4-block Omniglot network, here with ReLU and per-set BatchNorm as every
algorithm of this package uses it).

Batching. All queries of all tasks are predicted at once, and no query sees
another: each query is the last step of its own sequence (support set, then
that query). The operations are causal, so the support prefix's outputs at
every block are the same in each of a task's Q sequences: the prefix is run
once per task (B sequences of N*K steps) and only the last step once per query
(B x Q single steps that read the prefix's block inputs), instead of B x Q full
sequences of N*K + 1 steps. Same numbers (tested against the B x Q sequences
of ``SnailNet.forward``), about Q times less sequence work.

Support order. The episode sampler shuffles the support set of every episode
with its own generator (seeded by the run's seed, saved in checkpoints), so the
sequence order carries no label and follows the seed and resumes exactly; no
second shuffle is needed here. The embeddings are computed per set, support
and queries (per-set BatchNorm statistics, as for every algorithm here).

The output layer has one logit per training way and the label inputs one entry
per way, so episodes of other ``ways`` are refused; other ``shots`` run (a
longer sequence than the training one is still covered by the attention, not
entirely by the convolutions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "snail"
    attention_keys: list[int] = field(default_factory=lambda: [64, 256, 512])  # key (= query) size of each attention block
    attention_values: list[int] = field(default_factory=lambda: [32, 128, 256])  # value size of each attention block
    filters: int = 128  # D: filters of each dense block in the TC blocks between attention blocks


class DenseBlock(nn.Module):
    """Causal dilated convolution (kernel 2) with a gated activation, appended to the input: C -> C + D channels."""

    def __init__(self, channels: int, filters: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(channels, 2 * filters, kernel_size=2, dilation=dilation)

    @staticmethod
    def _gate(h: torch.Tensor, dim: int) -> torch.Tensor:
        xf, xg = h.chunk(2, dim=dim)
        return torch.tanh(xf) * torch.sigmoid(xg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequences: [n, T, C] -> [n, T, C + D]."""
        h = F.conv1d(F.pad(x.transpose(1, 2), (self.dilation, 0)), self.conv.weight, self.conv.bias,
                     dilation=self.dilation)
        return torch.cat([x, self._gate(h, 1).transpose(1, 2)], dim=-1)

    def last_step(self, prefix: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The step after a prefix: prefix [B, S, C] (shared), last steps [B, Q, C] -> [B, Q, C + D]."""
        s = prefix.shape[1]
        # kernel tap 1 reads the step itself, tap 0 the step `dilation` earlier (zero padding before the start)
        h = F.linear(last, self.conv.weight[:, :, 1], self.conv.bias)
        if s - self.dilation >= 0:
            h = h + F.linear(prefix[:, s - self.dilation], self.conv.weight[:, :, 0]).unsqueeze(1)
        return torch.cat([last, self._gate(h, -1)], dim=-1)


class AttentionBlock(nn.Module):
    """Single-head causal softmax attention, the read appended to the input: C -> C + v channels."""

    def __init__(self, channels: int, key_size: int, value_size: int):
        super().__init__()
        self.query = nn.Linear(channels, key_size)
        self.key = nn.Linear(channels, key_size)
        self.value = nn.Linear(channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequences: [n, T, C] -> [n, T, C + v]; step t attends to steps 0..t."""
        t = x.shape[1]
        logits = self.query(x) @ self.key(x).transpose(1, 2) * self.scale  # [n, T, T]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        read = logits.masked_fill(future, float("-inf")).softmax(-1) @ self.value(x)
        return torch.cat([x, read], dim=-1)

    def last_step(self, prefix: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The step after a prefix: prefix [B, S, C] (shared), last steps [B, Q, C] -> [B, Q, C + v]."""
        s = prefix.shape[1]
        q = self.query(last)  # [B, Q, k]
        to_prefix = q @ self.key(prefix).transpose(1, 2) * self.scale  # [B, Q, S]
        to_self = (q * self.key(last)).sum(-1, keepdim=True) * self.scale  # [B, Q, 1]
        probs = torch.cat([to_prefix, to_self], dim=-1).softmax(-1)
        read = probs[..., :s] @ self.value(prefix) + probs[..., s:] * self.value(last)
        return torch.cat([last, read], dim=-1)


class SnailNet(nn.Module):
    """Attention blocks with TC blocks between them, then a linear map to ``outputs`` logits per step."""

    def __init__(self, in_features: int, outputs: int, length: int, keys: list[int], values: list[int], filters: int):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_features
        for i, (k, v) in enumerate(zip(keys, values)):
            if i > 0:  # a TC block: dilations 1, 2, 4, ... covering `length` steps
                for j in range(max(1, math.ceil(math.log2(length)))):
                    blocks.append(DenseBlock(channels, filters, 2**j))
                    channels += filters
            blocks.append(AttentionBlock(channels, k, v))
            channels += v
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(channels, outputs)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """Whole sequences [n, T, C] -> logits at every step [n, T, outputs] (step t sees steps 0..t)."""
        x = sequences
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def last_step_logits(self, prefix: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits of the step after a shared prefix: [B, S, C], [B, Q, C] -> [B, Q, outputs].

        Equal to ``forward`` on the B x Q sequences ``prefix[b] + last[b, q]`` at their last step.
        """
        for i, block in enumerate(self.blocks):
            last = block.last_step(prefix, last)
            if i + 1 < len(self.blocks):  # the prefix's own outputs feed the next block (causal: queries never change them)
                prefix = block(prefix)
        return self.head(last)


class SNAIL(QueryLossAlgorithm):
    per_example_features = False  # a sequence learner: metalearn eval refuses finetune.* for it

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        keys, values = list(cfg.attention_keys), list(cfg.attention_values)
        if not keys or len(keys) != len(values):
            raise ConfigError(f"algo.attention_keys {keys} and algo.attention_values {values} must be non-empty "
                              "lists of the same length (one entry per attention block)")
        if min(keys + values) < 1 or cfg.filters < 1:
            raise ConfigError("algo.attention_keys, algo.attention_values and algo.filters must be >= 1")
        self.cfg, self.backbone, self.ways = cfg, backbone, info.ways
        self.length = info.ways * info.shots + 1  # the training sequence: N*K support steps and one query
        self.net = SnailNet(backbone.out_features + info.ways, info.ways, self.length, keys, values, cfg.filters)

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if ways != self.ways:
            raise ConfigError(f"snail's label inputs and outputs have {self.ways} entries (trained {self.ways}-way); "
                              f"it cannot run {ways}-way episodes: train with the ways you test with")

    def sequences(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The support prefix [B, N*K, F + N] (embedding, one-hot label) and the query steps [B, Q, F + N] (embedding, zeros)."""
        support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)
        labels = F.one_hot(batch.support_y, self.ways).to(support.dtype)
        prefix = torch.cat([support, labels], dim=-1)
        last = torch.cat([query, query.new_zeros(*query.shape[:2], self.ways)], dim=-1)
        return prefix, last

    def query_logits(self, batch: TaskBatch) -> torch.Tensor:
        """Logits of every query, each the last step of its own sequence: [B, Q, ways]."""
        return self.net.last_step_logits(*self.sequences(batch))

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.query_logits(batch)
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> SNAIL:
    return SNAIL(cfg, backbone, info)
