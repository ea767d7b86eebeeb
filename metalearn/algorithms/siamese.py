"""Siamese networks (Koch, Zemel & Salakhutdinov, "Siamese Neural Networks for One-shot Image
Recognition", ICML Deep Learning Workshop 2015).

Not a meta-learner: a verification network learns whether two images show the
same class, and a few-shot task is solved by nearest neighbour under the
learned similarity. It still runs through the engine's loop: training pairs
are built from the episodes the sampler draws.

Training (``meta_step``). Within each task, every unordered pair of its images,
support and query together (their labels are known): ``n = ways * (shots +
queries)`` images give ``n (n - 1) / 2`` pairs, "same" when the two labels are
equal. Both images are embedded by the backbone (the twin networks share it)
and the pair scored as in the paper:

* ``loss: bce`` (the paper): a learned weighted L1 distance,
  ``s = w . |h1 - h2| + b`` (one linear layer on the absolute difference; the
  paper's formula has the weights, the bias is added here), ``p = sigmoid(s)``
  the probability of "same"; binary cross-entropy.
* ``loss: contrastive`` (Hadsell, Chopra & LeCun 2006; not in the paper):
  the Euclidean distance ``d = ||h1 - h2||``, loss ``d^2`` for same pairs and
  ``max(0, margin - d)^2`` for different ones. No weighted-distance layer.

Balance: a task has far more different pairs than same ones (5-way, 6 images
per class: 75 same, 360 different). Each task's loss is
``(mean over same pairs + mean over different pairs) / 2``: the positives are
weighted so that the two kinds count equally, as a balanced sample of pairs
would. The paper samples same and different pairs at random instead.

Prediction (``evaluate``). Each query is scored against every support example
(``s`` for bce, the sigmoid being monotone; ``-d`` for contrastive) and takes
the class of the most similar one; with K > 1 shots a class scores the maximum
over its K support examples. ``loss`` is the balanced pair loss over the
``n_query x n_support`` query-vs-support pairs, ``accuracy`` that of the
prediction. ``meta_step`` reports the training pair loss and the accuracy of
the same prediction on the task's queries.

Choices that differ from the paper, stated:

* The embedding is the configured backbone's output (conv4: 64 features for
  28x28 images), not the paper's four larger conv layers on 105x105 images
  followed by a 4096-unit sigmoid layer.
* Pairs come from episodes (class-balanced sampling: ``ways`` classes with
  ``shots + queries`` images each), not from a fixed set of sampled pairs;
  no affine distortions.
* One optimizer for everything (``optim.*``), not per-layer learning rates,
  momenta and L2 penalties chosen by Bayesian optimisation.
* BatchNorm (conv4's per-set batch statistics): support and query sets are
  embedded separately, in training as at evaluation, as ProtoNet does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError

LOSSES = ("bce", "contrastive")


@dataclass
class Config:
    name: str = "siamese"
    loss: str = "bce"  # bce: weighted L1 distance -> sigmoid (the paper) | contrastive: Euclidean distance with a margin
    margin: float = 1.0  # contrastive only: different pairs are pushed at least this far apart


def balanced_mean(loss: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Per-pair losses [B, P] and same-class mask [B, P] -> [B]: the mean of the two kinds' means."""
    same = same.to(loss.dtype)
    return 0.5 * ((loss * same).sum(-1) / same.sum(-1) + (loss * (1 - same)).sum(-1) / (1 - same).sum(-1))


def contrastive(sq_dist: torch.Tensor, same: torch.Tensor, margin: float) -> torch.Tensor:
    """Hadsell et al.'s loss from squared distances: d^2 if same, max(0, margin - d)^2 otherwise."""
    # clamp: the square root's gradient at 0 is infinite (it is multiplied by 0 there, giving nan)
    far = F.relu(margin - sq_dist.clamp_min(1e-12).sqrt()).pow(2)
    return torch.where(same, sq_dist, far)


class Siamese(Algorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.loss not in LOSSES:
            raise ConfigError(f"algo.loss={cfg.loss!r} is not one of: {', '.join(LOSSES)}")
        if not cfg.margin > 0:
            raise ConfigError(f"algo.margin must be > 0 (got {cfg.margin})")
        self.cfg, self.backbone = cfg, backbone
        # the weighted L1 distance: weights on |h1 - h2| and a bias, giving the logit of "same"
        self.distance = nn.Linear(backbone.out_features, 1) if cfg.loss == "bce" else None

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if ways < 2:
            raise ConfigError(f"siamese needs ways >= 2 (got {ways}): with one class there are no different-class pairs")

    def pair_scores(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Similarity of embeddings a [..., F] and b [..., F] -> [...]: the logit of "same", or -distance."""
        if self.distance is not None:
            return self.distance((a - b).abs()).squeeze(-1)
        return -(a - b).pow(2).sum(-1).clamp_min(1e-12).sqrt()

    def pair_losses(self, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """Per-pair losses [...] for embeddings a, b [..., F] and the same-class mask [...]."""
        if self.distance is not None:
            return F.binary_cross_entropy_with_logits(self.pair_scores(a, b), same.to(a.dtype), reduction="none")
        return contrastive((a - b).pow(2).sum(-1), same, self.cfg.margin)

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        h = torch.cat([self.backbone(batch.support_x), self.backbone(batch.query_x)], 1)  # [B, n, F]
        y = torch.cat([batch.support_y, batch.query_y], 1)  # [B, n]
        i, j = torch.triu_indices(y.shape[1], y.shape[1], offset=1, device=y.device)  # all pairs i < j
        loss = balanced_mean(self.pair_losses(h[:, i], h[:, j], y[:, i] == y[:, j]), y[:, i] == y[:, j])
        loss.mean().backward()
        with torch.no_grad():
            acc = self._predict_accuracy(h[:, : batch.support_y.shape[1]], batch.support_y,
                                         h[:, batch.support_y.shape[1]:], batch.query_y, batch.ways)
        return {"loss": loss.detach(), "accuracy": acc}

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        s, q = self.backbone(batch.support_x), self.backbone(batch.query_x)  # [B, n_s, F], [B, n_q, F]
        a, b = q.unsqueeze(2), s.unsqueeze(1)  # every query (rows) against every support example (columns)
        same = batch.query_y.unsqueeze(2) == batch.support_y.unsqueeze(1)  # [B, n_q, n_s]
        loss = balanced_mean(self.pair_losses(a, b, same).flatten(1), same.flatten(1))
        return {"loss": loss, "accuracy": self._predict_accuracy(s, batch.support_y, q, batch.query_y, batch.ways)}

    def _predict_accuracy(self, s, sy, q, qy, ways: int) -> torch.Tensor:
        """Nearest-support prediction: a class scores the best of its support examples."""
        scores = self.pair_scores(q.unsqueeze(2), s.unsqueeze(1))  # [B, n_q, n_s]
        return accuracy(class_scores(scores, sy, ways), qy)


def class_scores(scores: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Query-vs-support similarities [B, n_q, n_s] -> [B, n_q, ways]: the max over each class's examples."""
    member = F.one_hot(support_y, ways).bool().unsqueeze(1)  # [B, 1, n_s, ways]
    return scores.unsqueeze(-1).masked_fill(~member, float("-inf")).amax(2)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> Siamese:
    return Siamese(cfg, backbone, info)
