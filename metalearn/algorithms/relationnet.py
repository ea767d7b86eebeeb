"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018, arXiv:1711.06025).

The embedding module f (the backbone) maps every image to a feature map. A
class's map is the *sum* of the maps of its support examples (the paper's
K-shot rule; one map at 1-shot). The relation module g scores every (class,
query) pair from the channel concatenation ``[f(class), f(query)]`` (class
first, as the paper's code): two blocks of [3x3 conv (``channels`` filters),
BatchNorm, ReLU, 2x2 max-pool], then FC(``hidden``) + ReLU and FC(1) + sigmoid,
a relation score in (0, 1). The loss is the mean squared error of the scores
to the one-hot labels (the paper's eq. 3), averaged over a task's
(query, class) pairs and reported as ``loss``; ``accuracy`` is the argmax of
the scores. Both modules are meta-parameters, trained end to end; nothing is
adapted per task.

The backbone's flat features are reshaped to its ``out_shape`` (C, H, W). The
paper's Omniglot embedding pools in its first two blocks only (64x7x7 maps at
28x28 with padded convolutions): with conv4 use ``backbone.pool_layers=2``.

Choices, stated:

* The relation convolutions are padded (padding 1), so maps of any size work;
  a pool is skipped along a side that is down to 1px. At 7x7 this gives
  7 -> 3 -> 1, the paper's Omniglot sizes (its code pads the relation module on
  Omniglot; on miniImageNet it does not). 1x1 maps (conv4's default at 28x28)
  are accepted, so every algorithm runs on the default backbone: the 3x3
  convolutions then see only their centre tap and the relation module is an
  MLP over the concatenated embeddings, not the paper's spatial module (its
  preset sets ``backbone.pool_layers=2``).
* The relation module's BatchNorm uses per-task batch statistics (conv4's
  ``TaskBatchNorm``) at training and at test time, over the task's
  (query, class) pairs, so results do not depend on the meta-batch size; the
  paper's code uses ordinary BatchNorm with running statistics at test time.
* PyTorch's default initialisation; the paper's code draws conv weights from
  N(0, 2/n), linear weights from N(0, 0.01) with biases 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.tasks import TaskBatchNorm


@dataclass
class Config:
    name: str = "relationnet"
    channels: int = 64  # filters of the relation module's two conv blocks
    hidden: int = 8  # units of its first fully connected layer


class RelationModule(nn.Module):
    """[n, 2C, H, W] pairs of maps -> relation scores [n] in (0, 1); BatchNorm per task of pairs."""

    def __init__(self, in_channels: int, size: tuple[int, int], channels: int, hidden: int, blocks: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1)
                                   for i in range(blocks))
        self.norms = nn.ModuleList(TaskBatchNorm(channels) for _ in range(blocks))
        # Pool kernels per block: 2 along a side of 2px or more, 1 (no pooling) along a 1px side.
        h, w = size
        self.pools = []
        for _ in range(blocks):
            kernel = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
            self.pools.append(kernel)
            h, w = h // kernel[0], w // kernel[1]
        self.fc1 = nn.Linear(channels * h * w, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pairs: torch.Tensor, tasks: int) -> torch.Tensor:
        x = pairs
        for conv, norm, kernel in zip(self.convs, self.norms, self.pools):
            x = F.relu(norm(conv(x), tasks))
            if kernel != (1, 1):
                x = F.max_pool2d(x, kernel)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.flatten(1))))).squeeze(-1)


def class_maps(support: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """[B, n_s, C, H, W], [B, n_s] -> [B, ways, C, H, W]: the sum of each class's support maps."""
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # [B, n_s, ways]
    summed = onehot.transpose(1, 2) @ support.flatten(2)
    return summed.view(support.shape[0], ways, *support.shape[2:])


def pair_up(classes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[B, ways, C, H, W], [B, n_q, C, H, W] -> [B, n_q, ways, 2C, H, W]: [class map, query map] per pair."""
    b, ways = classes.shape[:2]
    n_q = query.shape[1]
    left = classes.unsqueeze(1).expand(b, n_q, *classes.shape[1:])
    right = query.unsqueeze(2).expand(b, n_q, ways, *query.shape[2:])
    return torch.cat([left, right], dim=3)


class RelationNet(QueryLossAlgorithm):
    query_scores = "scores"  # relation scores in [0, 1] (metalearn eval tta / ensembles)

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.channels < 1 or cfg.hidden < 1:
            raise ConfigError(f"algo.channels and algo.hidden must be >= 1 (got {cfg.channels}, {cfg.hidden})")
        shape = tuple(getattr(backbone, "out_shape", ()))
        if len(shape) != 3 or math.prod(shape) != backbone.out_features:
            raise ConfigError("relationnet needs a backbone that returns flattened feature maps (an out_shape C, H, W); "
                              "choose backbone=conv4")
        c, h, w = shape
        self.cfg, self.backbone, self.map_shape = cfg, backbone, shape
        self.relation = RelationModule(2 * c, (h, w), cfg.channels, cfg.hidden)

    def relation_scores(self, batch: TaskBatch) -> torch.Tensor:
        """Relation scores of every (query, class) pair, [B, n_q, ways]."""
        b, n_q = batch.query_y.shape
        support = self.backbone(batch.support_x).view(b, -1, *self.map_shape)
        query = self.backbone(batch.query_x).view(b, n_q, *self.map_shape)
        pairs = pair_up(class_maps(support, batch.support_y, batch.ways), query)
        # Tasks are contiguous blocks of rows, as TaskBatchNorm expects.
        return self.relation(pairs.flatten(0, 2), tasks=b).view(b, n_q, batch.ways)

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.relation_scores(batch)
        target = F.one_hot(batch.query_y, batch.ways).to(scores.dtype)
        loss = (scores - target).pow(2).mean(dim=(1, 2))  # MSE per task
        return loss, accuracy(scores, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> RelationNet:
    return RelationNet(cfg, backbone, info)
