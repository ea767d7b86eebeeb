"""FEAT (Ye, Hu, Zhan & Sha, CVPR 2020, arXiv:1812.03664): few-shot embedding adaptation with a Transformer.

The backbone embeds support and query examples; each class's prototype is the mean of its support
embeddings (ProtoNet's ``class_means``). A set-to-set function then adapts the prototypes to the task:
one Transformer block of scaled dot-product self-attention over the set of a task's prototypes
(``SetAttention``), so each adapted prototype depends on every other class of the episode. A query's
logits are ``-|query - adapted prototype|^2 / temperature`` (``distance: euclidean``, the paper's), or
``query . normalize(adapted prototype) / temperature`` (``distance: cosine``, the official code's other
option: as there, the prototypes are normalised and the queries are not). Queries are not adapted
(the paper's CVPR version and the official code).

The set function (the official ``MultiHeadAttention``): per head, Q/K/V projections without bias
(``dim`` wide each: with one head, the paper's, they are square), softmax(Q K^T / sqrt(dim)) with
dropout ``attention_dropout`` on the attention weights, an output projection back to ``dim`` with
dropout ``dropout``, a residual connection and LayerNorm: ``LayerNorm(x + Dropout(W_o Attn(x)))``.
Initialisation as the official code: Q/K/V weights ~ N(0, 2 / (dim + dim)), the output weight Xavier
normal. No positional encoding, so the block is permutation-equivariant over the set: relabelling the
classes of an episode permutes the columns of the logits, nothing else. Its width ``dim`` is the
backbone's ``out_features`` (conv4: 64 at 28x28, 1600 at 84x84; resnet12 with avg_pool: 640).

The contrastive regulariser (the paper's contrastive objective; the official ``balance`` and ``temperature2``),
training only: the set function is applied to each class's own set of support and query embeddings
(here one attention pass over the task with attention masked to the same class, which is exactly the
per-class pass), the mean of each class's adapted embeddings is its centre, and every support and
query embedding (not adapted) is classified among the centres with logits
``-|x - centre|^2 / contrastive_temperature`` (cosine as above). The meta-loss per task is
``query cross-entropy + contrastive_weight * that cross-entropy``; ``contrastive_weight: 0`` drops the
term (and its computation). ``loss`` reports the query cross-entropy alone, as evaluation does, and
``contrastive_loss`` the regulariser.

The paper starts FEAT from a backbone pre-trained as a classifier over the training classes: run
``algo=baseline`` first, then ``algo=feat init_from=<that run>`` (see metabaseline.py). The official
code trains the set function at 10x the backbone's learning rate (``lr_mul``): ``optim.lr_multipliers:
{set_function: 10}`` (the preset sets it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.algorithms.protonet import class_means, negative_squared_distances
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError

DISTANCES = ("euclidean", "cosine")


@dataclass
class Config:
    name: str = "feat"
    distance: str = "euclidean"  # euclidean (the paper) | cosine (normalised prototypes, as the official code)
    temperature: float = 1.0  # the logits are divided by it (official --temperature)
    contrastive_weight: float = 0.1  # weight of the contrastive regulariser; 0 disables it (official --balance)
    contrastive_temperature: float = 1.0  # the regulariser's logits are divided by it (official --temperature2)
    heads: int = 1  # attention heads of the set function (the paper: 1)
    dropout: float = 0.5  # dropout on the attention block's output, before the residual (official: 0.5)
    attention_dropout: float = 0.1  # dropout on the attention weights (official: 0.1)


class SetAttention(nn.Module):
    """The set-to-set function: [B, n, dim] -> [B, n, dim], permutation-equivariant over the n elements.

    ``mask`` ([B, n, n] bool, optional): which elements each element may attend to (True: allowed); every
    element must be allowed to attend to at least one (itself, in FEAT's use)."""

    def __init__(self, dim: int, heads: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.heads, self.attention_dropout = heads, attention_dropout
        self.q = nn.Linear(dim, heads * dim, bias=False)
        self.k = nn.Linear(dim, heads * dim, bias=False)
        self.v = nn.Linear(dim, heads * dim, bias=False)
        for projection in (self.q, self.k, self.v):
            nn.init.normal_(projection.weight, mean=0.0, std=math.sqrt(2.0 / (dim + dim)))  # the official init
        self.out = nn.Linear(heads * dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, dim = x.shape

        def per_head(t: torch.Tensor) -> torch.Tensor:  # [B, n, heads*dim] -> [B, heads, n, dim]
            return t.view(b, n, self.heads, dim).transpose(1, 2)

        # Scaled by 1/sqrt(dim), the width of one head, as the official code (and the default of sdpa).
        mixed = F.scaled_dot_product_attention(
            per_head(self.q(x)), per_head(self.k(x)), per_head(self.v(x)),
            attn_mask=None if mask is None else mask.unsqueeze(1),
            dropout_p=self.attention_dropout if self.training else 0.0)
        mixed = mixed.transpose(1, 2).reshape(b, n, self.heads * dim)
        return self.norm(x + self.dropout(self.out(mixed)))


def feat_logits(query: torch.Tensor, prototypes: torch.Tensor, distance: str, temperature: float) -> torch.Tensor:
    """[B, n, F], [B, ways, F] -> [B, n, ways]: -squared distance (euclidean) or the dot product with the
    normalised prototypes (cosine), divided by ``temperature``."""
    if distance == "euclidean":
        return negative_squared_distances(query, prototypes) / temperature
    return query @ F.normalize(prototypes, dim=-1).transpose(1, 2) / temperature


class FEAT(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        _check(cfg)
        dim = getattr(backbone, "out_features", None)
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError("feat needs a backbone that returns a feature vector (an int out_features); "
                              "choose backbone=conv4, resnet12 or mlp")
        self.cfg, self.backbone = cfg, backbone
        self.set_function = SetAttention(dim, cfg.heads, cfg.dropout, cfg.attention_dropout)

    def adapted_prototypes(self, support: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
        """[B, n_s, F] support embeddings -> [B, ways, F]: the class means, adapted together by the set function."""
        return self.set_function(class_means(support, support_y, ways))

    def contrastive_logits(self, embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        """[B, n, F] support and query embeddings with their labels [B, n] -> [B, n, ways]: each embedding scored
        against the centres of the classes' separately adapted sets (the regulariser's logits)."""
        same_class = labels.unsqueeze(2) == labels.unsqueeze(1)  # attention within a class: one set per class
        centres = class_means(self.set_function(embeddings, same_class), labels, ways)
        return feat_logits(embeddings, centres, self.cfg.distance, self.cfg.contrastive_temperature)

    def embed_and_score(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support and query embeddings, and the query logits [B, n_q, ways]."""
        support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)
        prototypes = self.adapted_prototypes(support, batch.support_y, batch.ways)
        return support, query, feat_logits(query, prototypes, self.cfg.distance, self.cfg.temperature)

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.embed_and_score(batch)[2]
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        support, query, logits = self.embed_and_score(batch)
        loss = task_cross_entropy(logits, batch.query_y)
        metrics = {"loss": loss.detach(), "accuracy": accuracy(logits.detach(), batch.query_y)}
        if self.cfg.contrastive_weight > 0:
            embeddings = torch.cat([support, query], dim=1)
            labels = torch.cat([batch.support_y, batch.query_y], dim=1)
            contrastive = task_cross_entropy(self.contrastive_logits(embeddings, labels, batch.ways), labels)
            metrics["contrastive_loss"] = contrastive.detach()
            loss = loss + self.cfg.contrastive_weight * contrastive
        loss.mean().backward()
        return metrics


def _check(cfg: Config) -> None:
    if cfg.distance not in DISTANCES:
        raise ConfigError(f"algo.distance={cfg.distance!r} is not one of: {', '.join(DISTANCES)}")
    if not (cfg.temperature > 0 and cfg.contrastive_temperature > 0):
        raise ConfigError(f"algo.temperature and algo.contrastive_temperature must be > 0 "
                          f"(got {cfg.temperature}, {cfg.contrastive_temperature})")
    if not cfg.contrastive_weight >= 0:
        raise ConfigError(f"algo.contrastive_weight must be >= 0 (got {cfg.contrastive_weight})")
    if cfg.heads < 1:
        raise ConfigError(f"algo.heads must be >= 1 (got {cfg.heads})")
    if not (0 <= cfg.dropout < 1 and 0 <= cfg.attention_dropout < 1):
        raise ConfigError(f"algo.dropout and algo.attention_dropout must be in [0, 1) "
                          f"(got {cfg.dropout}, {cfg.attention_dropout})")


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> FEAT:
    return FEAT(cfg, backbone, info)
