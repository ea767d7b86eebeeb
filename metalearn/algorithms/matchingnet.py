"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016, arXiv:1606.04080).

A query is classified by attention over the support set (the paper's eq. 1-2):
``P(y | x, S) = sum_i a(x, x_i) onehot(y_i)`` with ``a`` a softmax over the
cosine similarities ``c(f(x), g(x_i))`` of the query embedding to every support
embedding. The loss is the negative log-likelihood of the query labels under
P, with the probabilities clamped at 1e-8 before the log (P is a mixture of
one-hots, so a label can get exactly zero). Accuracy is the argmax of P.

Embeddings. Without full-context embeddings (``fce: false``, the default and
the paper's Omniglot setting) f = g = the backbone. With ``fce: true`` (the
paper's appendix A), over the backbone's embeddings g'(x_i) and f'(x):

* g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i): a bidirectional LSTM (hidden size =
  the embedding size F) over the support set, in the set's (random) order,
  plus a skip connection;
* f(x, S) = attLSTM(f'(x), g(S), K) with K = ``fce_steps`` reads:
  ``h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x)``,
  ``r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)``, and f = h_K.
  The LSTM's gates read x, h and r through one linear map, so feeding
  ``[f'(x), r_{k-1}]`` as the input of an ``nn.LSTMCell(2F, F)`` with state
  ``(h_{k-1}, c_{k-1})`` is that equation exactly. Start: ``h_0 = f'(x)``
  (h^_0 = 0, consistent with the skip connection), ``c_0 = 0``; the paper does
  not state the initial state, nor K (default 5 here).

The LSTM weights are meta-parameters of the algorithm, trained with the
backbone; nothing is adapted per task, so ``evaluate`` is one forward pass.

Choices, stated:

* Cosine (``cosine: support``, default): the support embeddings are normalised
  and the query's are not, ``c = f(x) . g(x_i) / |g(x_i)|``, as in the widely
  used implementations of the model (the paper says cosine distance; no code
  from the authors was found to compare with). It ranks support examples
  exactly as the cosine does (the query's norm is the same for all of them) but
  the query's norm acts as a learned softmax temperature. The exact cosine
  (``cosine: both``) bounds the logits to [-1, 1], and conv4's embeddings are
  non-negative (ReLU then max-pool), so to [0, 1]: a 5-way 1-shot softmax then
  cannot give the right class more than about 0.40 and learning is slower
  (glyphs, 20 steps: 0.68 against 0.79 test accuracy).
* With FCE the LSTM's hidden size is the embedding size (the skip connections
  need it): 64 for conv4 at 28x28, but 1600 at 84x84 (about 72M LSTM weights).
* Tasks are embedded in one backbone pass per set (per-task BatchNorm, see
  models/conv4.py), so results do not depend on the meta-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError

#: probabilities are clamped here before the log: an attention mixture can give a label exactly 0
LOG_CLAMP = 1e-8


@dataclass
class Config:
    name: str = "matchingnet"
    fce: bool = False  # full-context embeddings (bidirectional LSTM g, attention LSTM f)
    fce_steps: int = 5  # K: reads of the support set by the attention LSTM (fce only)
    cosine: str = "support"  # support: normalise the support embeddings only | both: exact cosine


def matching_probabilities(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                           cosine: str = "support") -> torch.Tensor:
    """[B, n_s, F], [B, n_s], [B, n_q, F] -> class probabilities [B, n_q, ways] (attention over the support set)."""
    if cosine == "both":
        query = F.normalize(query, dim=-1)
    similarity = query @ F.normalize(support, dim=-1).transpose(1, 2)  # [B, n_q, n_s]
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # [B, n_s, ways]
    return similarity.softmax(-1) @ onehot


class FullContextEmbedding(nn.Module):
    """The paper's appendix A: g over the whole support set, f over the query and g(S)."""

    def __init__(self, dim: int):
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_lstm = nn.LSTMCell(2 * dim, dim)

    def embed_support(self, g0: torch.Tensor) -> torch.Tensor:
        """[B, n_s, F] -> g(x_i, S) = forward + backward LSTM outputs + g'(x_i); tasks are the LSTM's batch."""
        out, _ = self.support_lstm(g0)
        forward, backward = out.chunk(2, dim=-1)
        return g0 + forward + backward

    def embed_query(self, f0: torch.Tensor, g: torch.Tensor, steps: int) -> torch.Tensor:
        """[B, n_q, F], g(S) [B, n_s, F] -> f(x, S) [B, n_q, F] after ``steps`` attention reads."""
        b, n_q, dim = f0.shape
        x = f0.reshape(b * n_q, dim)
        h, c = x, torch.zeros_like(x)
        for _ in range(steps):
            attention = (h.view(b, n_q, dim) @ g.transpose(1, 2)).softmax(-1)  # content-based, dot product
            read = (attention @ g).reshape(b * n_q, dim)  # r_{k-1}
            h_hat, c = self.query_lstm(torch.cat([x, read], dim=-1), (h, c))
            h = h_hat + x
        return h.view(b, n_q, dim)


class MatchingNet(QueryLossAlgorithm):
    query_scores = "scores"  # its queries are scored by probabilities (metalearn eval tta / ensembles)

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.cosine not in ("support", "both"):
            raise ConfigError(f"algo.cosine={cfg.cosine!r} is not one of: support, both")
        if cfg.fce_steps < 1:
            raise ConfigError(f"algo.fce_steps must be >= 1 (got {cfg.fce_steps})")
        self.cfg, self.backbone = cfg, backbone
        self.fce = FullContextEmbedding(backbone.out_features) if cfg.fce else None

    def probabilities(self, batch: TaskBatch) -> torch.Tensor:
        """Class probabilities of the query examples, [B, n_q, ways]."""
        support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)
        if self.fce is not None:
            support = self.fce.embed_support(support)
            query = self.fce.embed_query(query, support, self.cfg.fce_steps)
        return matching_probabilities(support, batch.support_y, query, batch.ways, self.cfg.cosine)

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probabilities(batch)
        log_probs = probs.clamp_min(LOG_CLAMP).log()
        loss = -log_probs.gather(-1, batch.query_y.unsqueeze(-1)).squeeze(-1).mean(1)
        return loss, accuracy(probs, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MatchingNet:
    return MatchingNet(cfg, backbone, info)
