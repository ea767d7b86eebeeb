"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

Each class's prototype is the mean embedding of its support examples; a
query is classified by a softmax over negative squared Euclidean distances
to the prototypes. The meta-parameters are the embedding network's; all
tasks of a batch are embedded in one forward pass (the backbone normalises
each task on its own, so results do not depend on the batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.data.episodes import TaskBatch


@dataclass
class Config:
    name: str = "protonet"


def class_means(support: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """[B, n_s, F], [B, n_s] -> [B, ways, F]: the mean support embedding of each class (its prototype)."""
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # [B, n_s, ways]
    return onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)


def negative_squared_distances(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[B, n_q, F], [B, ways, F] -> [B, n_q, ways]: minus the squared Euclidean distance of each query to each prototype."""
    return -(query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    """[B, n_s, F], [B, n_s], [B, n_q, F] -> logits [B, n_q, ways] = -squared distances."""
    return negative_squared_distances(query, class_means(support, support_y, ways))


class ProtoNet(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = prototype_logits(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x), batch.ways)
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> ProtoNet:
    return ProtoNet(cfg, backbone, info)
