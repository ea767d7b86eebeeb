"""R2-D2: ridge regression differentiable discriminator (Bertinetto, Henriques, Torr & Vedaldi,
"Meta-learning with differentiable closed-form solvers", ICLR 2019, arXiv:1805.08136).

Each task's classifier is a ridge regression from the support embeddings,
with a column of ones appended for the bias, to one-hot targets, solved in
closed form inside the graph. With ``n = ways * shots`` support examples and
``F + 1`` columns, the Woodbury identity turns the (F+1) x (F+1) system into an
n x n one::

    W = X^T (X X^T + n lambda I)^-1 Y      (= (X^T X + n lambda I)^-1 X^T Y)

solved with a Cholesky factorisation (the matrix is symmetric positive
definite), batched over tasks as [T, n, n]. When n > F + 1 the primal
(F+1) x (F+1) system is the smaller one and is solved instead (the same W).
The query logits are the regression outputs passed through the learned
"adjust" layer, ``alpha * [x_q, 1] W + beta``, and the meta-loss is their
cross-entropy. The meta-parameters are the backbone's, ``alpha``, ``beta`` and
``log lambda`` (lambda > 0 by construction).

Choices, stated:
- The penalty is ``n lambda``, i.e. the fit minimises the *mean* squared error
  ``||XW - Y||^2 / n + lambda ||W||^2``: the paper's code divides X and Y by
  sqrt(n) before solving, which is the same W. So lambda means the same for
  any number of shots and ways; the bias column is penalised like the rest.
- lambda is learned, as in the paper (``learn_lambda: false`` keeps it at
  ``init_lambda``, as the released code's default does); it starts at 50, the
  code's value. alpha starts at 10 and beta at 0 (the code's Omniglot setting).
- The backbone is any of metalearn's (conv4 by default). The paper's network
  is different (see the preset's header): four blocks of 96-192-384-512
  filters with LeakyReLU, and the features of the last two blocks concatenated.
- BatchNorm uses each set's own statistics (models/conv4.py), like every
  algorithm here; the paper's code kept running statistics.
- Nothing in the head has a fixed size: any ways and shots at test time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import ProblemInfo, QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "r2d2"
    init_lambda: float = 50.0  # ridge penalty lambda at the start (on the mean squared error)
    learn_lambda: bool = True  # meta-learn lambda (as log lambda); false: keep init_lambda
    init_scale: float = 10.0  # adjust layer: logits = scale * ridge output + bias
    init_bias: float = 0.0


def ridge_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                 lam: torch.Tensor | float) -> torch.Tensor:
    """Ridge regression outputs on the query set: [T, n, F], [T, n], [T, m, F] -> [T, m, ways].

    W = argmin ||[X, 1] W - Y||^2 / n + lam ||W||^2 on the support set (Y one-hot), scored on [X_q, 1].
    """
    t, n, f = support.shape
    xs = torch.cat([support, support.new_ones(t, n, 1)], dim=-1)
    xq = torch.cat([query, query.new_ones(t, query.shape[1], 1)], dim=-1)
    y = F.one_hot(support_y, ways).to(support.dtype)
    reg = n * lam
    # Both systems are symmetric positive definite (lam > 0): Cholesky. cholesky_ex skips the error
    # check, which would cost a host sync per step on accelerators.
    if n <= f + 1:  # Woodbury: an n x n system
        gram = xs @ xs.mT + reg * torch.eye(n, dtype=xs.dtype, device=xs.device)
        dual = torch.cholesky_solve(y, torch.linalg.cholesky_ex(gram).L)  # (X X^T + n lam I)^-1 Y
        return (xq @ xs.mT) @ dual
    cov = xs.mT @ xs + reg * torch.eye(f + 1, dtype=xs.dtype, device=xs.device)
    return xq @ torch.cholesky_solve(xs.mT @ y, torch.linalg.cholesky_ex(cov).L)


class R2D2(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if not 0 < cfg.init_lambda < math.inf:
            raise ConfigError(f"algo.init_lambda must be a positive number (got {cfg.init_lambda})")
        self.cfg, self.backbone = cfg, backbone
        self.scale = nn.Parameter(torch.tensor(float(cfg.init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(cfg.init_bias)))
        # log-parametrised so that lambda stays positive whatever the optimizer does
        self.log_lambda = nn.Parameter(torch.tensor(math.log(cfg.init_lambda)), requires_grad=cfg.learn_lambda)

    def ridge_lambda(self) -> torch.Tensor:
        return self.log_lambda.exp()

    def logits(self, batch: TaskBatch) -> torch.Tensor:
        out = ridge_logits(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x),
                           batch.ways, self.ridge_lambda())
        return self.scale * out + self.bias

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch)
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> R2D2:
    return R2D2(cfg, backbone, info)
