"""Meta-Baseline (Chen, Liu, Xu, Darrell & Wang, ICCV 2021, arXiv:2003.04390), its meta-training stage.

A query's logit for class c is ``tau * cos(f(query), centroid_c)``: cosine similarity to the mean
support embedding of each class, scaled by a learned temperature ``tau`` (``temperature``, the
paper's 10 at the start). The paper's recipe has two stages: a Classifier-Baseline (a linear
classifier over all training classes, metalearn's ``algo=baseline``) pre-trains the backbone,
then this algorithm meta-trains it on episodes; run the first and start the second from it:

    metalearn train algo=baseline ...  hydra.run.dir=runs/pre
    metalearn train algo=metabaseline init_from=runs/pre ...

From scratch it is a cosine ProtoNet. The paper evaluates by the same nearest-centroid rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.algorithms.protonet import class_means
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "metabaseline"
    temperature: float = 10.0  # the initial tau of the cosine logits (learned)
    learn_temperature: bool = True


def centroid_cosine_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                           temperature: torch.Tensor) -> torch.Tensor:
    """[B, n_s, F], [B, n_s], [B, n_q, F] -> [B, n_q, ways]: ``temperature`` x cosine(query, class mean)."""
    centroids = class_means(support, support_y, ways)
    return temperature * F.normalize(query, dim=-1) @ F.normalize(centroids, dim=-1).transpose(1, 2)


class MetaBaseline(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if not cfg.temperature > 0:
            raise ConfigError(f"algo.temperature must be > 0 (got {cfg.temperature})")
        self.cfg, self.backbone = cfg, backbone
        self.temperature = nn.Parameter(torch.tensor(float(cfg.temperature)), requires_grad=cfg.learn_temperature)

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = centroid_cosine_logits(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x),
                                        batch.ways, self.temperature)
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MetaBaseline:
    return MetaBaseline(cfg, backbone, info)
