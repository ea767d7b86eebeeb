"""MetaOptNet-SVM (Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex
Optimization", CVPR 2019, arXiv:1904.03758).

Each task's classifier is a Crammer-Singer multi-class linear SVM fitted on
the support embeddings inside the graph; the query logits are its scores,
times a learned scale, and the meta-loss is their cross-entropy (optionally
label-smoothed, as in the paper's code). The SVM is solved in the dual, whose
size depends on the number of support examples, not on the feature size:
with n support examples x_i of labels y_i, K = X X^T and alpha an [n, ways]
matrix::

    min_alpha  1/2 tr(alpha^T K alpha) + ridge/2 ||alpha||^2 - sum_i alpha[i, y_i]
    s.t.       alpha[i, m] <= C [m = y_i],   sum_m alpha[i, m] = 0   (each i)

    w_m = sum_i alpha[i, m] x_i,   logits[q, m] = scale * <w_m, x_q>

(``ridge`` is the 1.0 the paper's code adds to the dual's Hessian for its QP
solver; it is the SVM on support features augmented with a private coordinate
sqrt(ridge) each, and keeps the solution unique.)

How it is solved and differentiated -- option (b) of the two usual ones: solve
without a graph, then differentiate the optimality conditions (the paper's
way; it used qpth, OptNet's batched interior-point solver). With
beta = C Y - alpha the constraints are beta >= 0 and sum_m beta[i, m] = C. The
forward pass runs ``iterations`` primal-dual interior-point steps (Mehrotra
predictor-corrector; each is two solves with one Cholesky factorisation of an
N x N matrix, N = n ways, and an n x n Schur complement), batched over tasks,
from a primal and dual feasible start. The backward pass differentiates the
KKT conditions at the final iterate (implicit function theorem, as OptNet):
stationarity, the equality constraints and beta * z held at their final
values (z: the multipliers of beta >= 0), one more such solve. At the optimum
this is the exact derivative of the SVM's solution; after fewer steps it is
the derivative of the point of the solver's central path where it stopped.
The paper's code caps qpth at 15 iterations (its default) during
meta-training and at 3 in its test script; here both default to 15, which
reaches the optimum to rounding on typical episodes (the solver is cheap next
to the backbone), and ``iterations`` counts these interior-point steps.
tests/test_algo_metaoptnet_svm.py checks the optimum by its duality gap and
against a slow projected-gradient solver, and the gradient by finite
differences.

Choices, stated:
- ``scale`` is learned and starts at 1, as in the paper's code (``learn_scale``).
- ``label_smoothing`` is the paper's code's form: the target class gets 1 - eps,
  each other class eps / (ways - 1); it applies to the training loss only
  (evaluation reports plain cross-entropy, as the code's validation does).
- The support-set BatchNorm statistics and the query-set ones are separate
  (models/conv4.py), as for every algorithm here; the paper's ResNet-12 kept
  running statistics.
- Time grows as (n ways)^3 per step: nothing for 5-way episodes of up to ~25
  shots; a 20-way 5-shot episode means a 2,000 x 2,000 factorisation per step.
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


@dataclass
class Config:
    name: str = "metaoptnet_svm"
    C: float = 0.1  # SVM regularisation: upper bound of the dual variables (the paper: 0.1)
    ridge: float = 1.0  # added to the dual's Hessian (the paper's code: 1.0); > 0 keeps the optimum unique
    iterations: int = 15  # interior-point steps of the SVM solver during meta-training (the paper's code: 15)
    test_iterations: int = 15  # ... at validation and test (the paper's test script: 3)
    init_scale: float = 1.0  # logits = scale * SVM scores
    learn_scale: bool = True  # meta-learn the scale (the paper's code does)
    label_smoothing: float = 0.0  # training loss only; the paper's code: 0.1


# ---------------------------------------------------------------- the dual QP
#
# In beta = C Y - alpha (flattened row-major, [n, ways] -> N = n * ways), the dual is the standard-form QP
#     min 1/2 beta^T Q beta + c^T beta   s.t.  A beta = C 1_n,  beta >= 0
# with Q = K (x) I_ways + ridge I, c = y - Q C y, and A summing each support example's ways entries.


def dual_hessian(K: torch.Tensor, ways: int, ridge: float) -> torch.Tensor:
    """Q = K (x) I_ways + ridge I: [T, n, n] -> [T, N, N]."""
    t, n, _ = K.shape
    eye = torch.eye(ways, dtype=K.dtype, device=K.device)
    Q = (K[:, :, None, :, None] * eye[None, None, :, None, :]).reshape(t, n * ways, n * ways)
    return Q + ridge * torch.eye(n * ways, dtype=K.dtype, device=K.device)


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """The largest a in [0, 1] with v + a dv >= 0, per task: [T, N] -> [T]."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, math.inf))
    return ratio.amin(-1).clamp(max=1.0)


def _saddle_solve(H_chol: torch.Tensor, rhs: torch.Tensor, ways: int, rhs_eq: torch.Tensor | None = None):
    """Solve [[H, -A^T], [A, 0]] [x; nu] = [rhs; rhs_eq] by the Schur complement of H = L L^T (SPD)."""
    t, N = rhs.shape
    n = N // ways
    At = torch.eye(n, dtype=rhs.dtype, device=rhs.device).repeat_interleave(ways, 0).expand(t, N, n)
    H_inv_At = torch.cholesky_solve(At, H_chol)  # [t, N, n]
    schur = H_inv_At.view(t, n, ways, n).sum(2)  # A H^-1 A^T, SPD: [t, n, n]
    h = torch.cholesky_solve(rhs[..., None], H_chol)[..., 0]
    eq = h.view(t, n, ways).sum(-1)
    eq = -eq if rhs_eq is None else rhs_eq - eq
    nu = torch.linalg.solve_ex(schur, eq).result  # A (h + H^-1 A^T nu) = rhs_eq
    return h + (H_inv_At @ nu[..., None])[..., 0], nu


@torch.no_grad()
def solve_dual(K: torch.Tensor, Y: torch.Tensor, C: float, ridge: float, iterations: int):
    """``iterations`` primal-dual interior-point steps (Mehrotra predictor-corrector) on the dual QP.

    Returns alpha [T, n, ways] and the diagonal D = z / beta [T, N] of the final iterate (z: the
    multipliers of beta >= 0), which the backward pass uses. The start is primal and dual feasible
    (beta at the simplices' centres, z >= 1), and the steps keep it so; a task stops moving once its
    duality measure mu = mean(beta z) has fallen by the dtype's epsilon, so every task's result is
    independent of the others in the batch.
    """
    t, n, ways = Y.shape
    N = n * ways
    Q = dual_hessian(K, ways, ridge)
    y = Y.reshape(t, N)
    c = y - (Q @ (C * y)[..., None])[..., 0]
    beta = torch.full((t, N), C / ways, dtype=K.dtype, device=K.device)
    grad = (Q @ beta[..., None])[..., 0] + c
    nu = grad.view(t, n, ways).amin(-1) - 1  # dual feasible start: z = grad - A^T nu >= 1
    z = grad - nu.repeat_interleave(ways, 1)
    eps = torch.finfo(K.dtype).eps
    mu_start = (beta * z).mean(-1)
    big = (1 + Q.diagonal(0, 1, 2).amax(-1, keepdim=True)) / eps  # larger than Q by 1/eps: pins the entry
    for _ in range(iterations):
        mu = (beta * z).mean(-1)
        r_dual = (Q @ beta[..., None])[..., 0] + c - nu.repeat_interleave(ways, 1) - z  # ~0 (rounding)
        r_prim = beta.view(t, n, ways).sum(-1) - C
        # the _ex solvers skip the error check, a host sync on accelerators: these matrices are
        # positive definite by construction (Q >= ridge I, D >= 0)
        chol = torch.linalg.cholesky_ex(Q + torch.diag_embed(torch.minimum(z / beta, big))).L

        def newton(r_comp):
            db, dnu = _saddle_solve(chol, -r_dual - r_comp / beta, ways, -r_prim)
            return db, dnu, (-r_comp - z * db) / beta

        db, _, dz = newton(beta * z)  # predictor (affine scaling)
        step = torch.minimum(_max_step(beta, db), _max_step(z, dz))[:, None]
        mu_aff = ((beta + step * db) * (z + step * dz)).mean(-1)
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        db, dnu, dz = newton(beta * z + db * dz - (sigma * mu)[:, None])  # corrector, centring sigma mu
        step = (0.99 * torch.minimum(_max_step(beta, db), _max_step(z, dz)))[:, None]
        moving = (mu > eps * mu_start)[:, None]  # a converged task stays where it is
        beta, nu, z = (torch.where(moving, v + step * dv, v) for v, dv in ((beta, db), (nu, dnu), (z, dz)))
    return (C * Y - beta.view(t, n, ways)), torch.minimum(z / beta, big)


class _CrammerSinger(torch.autograd.Function):
    """alpha*(K) by ``solve_dual``; backward by implicit differentiation of the final iterate's KKT system."""

    @staticmethod
    def forward(ctx, K, Y, C, ridge, iterations):
        alpha, D = solve_dual(K.detach(), Y, C, ridge, iterations)
        ctx.save_for_backward(K.detach(), alpha, D)
        ctx.ridge = ridge
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha):
        # KKT at the final iterate, in alpha: (Q + D) d_alpha + A^T d_nu = -dK alpha, A d_alpha = 0
        # (d_z = D d_alpha keeps beta * z fixed). Adjoint: [u; lam] solves the same symmetric system
        # with right-hand side [grad_alpha; 0], and dL = <u, -dK alpha>, so dL/dK = -u alpha^T.
        K, alpha, D = ctx.saved_tensors
        t, n, ways = alpha.shape
        chol = torch.linalg.cholesky_ex(dual_hessian(K, ways, ctx.ridge) + torch.diag_embed(D)).L
        u, _ = _saddle_solve(chol, grad_alpha.reshape(t, -1), ways)  # sign of the multiplier is irrelevant here
        return -(u.view(t, n, ways) @ alpha.mT), None, None, None, None


def svm_dual(support: torch.Tensor, support_y: torch.Tensor, ways: int, C: float, ridge: float,
             iterations: int) -> torch.Tensor:
    """The Crammer-Singer dual optimum alpha [T, n, ways] on support embeddings [T, n, F]; differentiable."""
    Y = F.one_hot(support_y, ways).to(support.dtype)
    return _CrammerSinger.apply(support @ support.mT, Y, C, ridge, iterations)


def svm_scores(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int, C: float,
               ridge: float, iterations: int) -> torch.Tensor:
    """Scores <w_m, x_q> of the SVM fitted on the support set: [T, n, F], [T, n], [T, m, F] -> [T, m, ways]."""
    return (query @ support.mT) @ svm_dual(support, support_y, ways, C, ridge, iterations)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-example cross-entropy against 1 - eps on the label and eps / (ways - 1) elsewhere (the paper's code)."""
    ways = logits.shape[-1]
    if eps == 0 or ways == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    target = F.one_hot(labels, ways).to(logits.dtype)
    target = target * (1 - eps) + (1 - target) * eps / (ways - 1)
    return -(target * F.log_softmax(logits, -1)).sum(-1)


class MetaOptNetSVM(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if not 0 < cfg.C < math.inf:
            raise ConfigError(f"algo.C must be a positive number (got {cfg.C})")
        if not 0 < cfg.ridge < math.inf:
            raise ConfigError(f"algo.ridge must be a positive number (got {cfg.ridge}); it keeps the SVM's dual solution unique")
        if cfg.iterations < 0 or cfg.test_iterations < 0:
            raise ConfigError("algo.iterations and algo.test_iterations must be >= 0")
        if not 0 <= cfg.label_smoothing < 1:
            raise ConfigError(f"algo.label_smoothing must be in [0, 1) (got {cfg.label_smoothing})")
        self.cfg, self.backbone = cfg, backbone
        self.scale = nn.Parameter(torch.tensor(float(cfg.init_scale)), requires_grad=cfg.learn_scale)

    def logits(self, batch: TaskBatch, iterations: int) -> torch.Tensor:
        scores = svm_scores(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x),
                            batch.ways, self.cfg.C, self.cfg.ridge, iterations)
        return self.scale * scores

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch, self.cfg.iterations if training else self.cfg.test_iterations)
        eps = self.cfg.label_smoothing if training else 0.0  # smoothing is a training device only
        loss = smoothed_cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), eps).view_as(batch.query_y).mean(1)
        return loss, accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MetaOptNetSVM:
    return MetaOptNetSVM(cfg, backbone, info)
