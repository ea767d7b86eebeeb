"""Trust region policy optimisation's step (Schulman et al. 2015), as pure functions of parameter tensors.

The step maximises a surrogate L(theta) subject to a mean KL divergence KL(theta) <= max_kl from the sampling
policy, as rllab's ``ConjugateGradientOptimizer`` does (the optimizer of the MAML paper's code, cbfinn/maml_rl):

1. g = grad L at theta_old;
2. s = F^-1 g by ``conjugate_gradient`` (``cg_iters`` 10), F the Hessian of KL at theta_old (the Fisher
   information, as KL's gradient is 0 there) plus ``damping`` I (rllab's ``reg_coeff``, 1e-5), applied by
   Hessian-vector products (``hessian_vector_product``: KL's gradient built with ``create_graph``, then the
   gradient of its dot product with v);
3. s scaled so that 0.5 s^T F s = max_kl (the quadratic model's trust-region boundary);
4. ``line_search``: the fractions 1, 0.8, 0.8^2, ... (``max_backtracks`` 15 tries) of the step, the first one
   that raises L and keeps KL <= max_kl is taken; if none does, no step.

The Hessian-vector products are exact (autograd, the KL's gradient differentiated again); rllab's default and
the MAML paper's were finite differences of the gradient, to avoid third derivatives through the inner update.

``trust_region_step`` does all four. Nothing here knows the policy: L and KL are any differentiable functions of
``params``, evaluated at other points through the caller's ``evaluate``. Vectors are flat (``flat``,
``unflat``) in the order of ``params``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector back into pieces shaped as ``like``."""
    pieces, start = [], 0
    for t in like:
        pieces.append(vector[start:start + t.numel()].view_as(t))
        start += t.numel()
    return pieces


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, iters: int = 10, residual_tol: float = 1e-10) -> torch.Tensor:
    """x with A x = b for a symmetric positive definite A given as ``matvec`` (v -> A v), from x = 0: ``iters``
    iterations at most, fewer once the squared residual is below ``residual_tol`` (rllab's ``krylov.cg``)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if float(rr) < residual_tol:
            break
        Ap = matvec(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def hessian_vector_product(gradient: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           damping: float = 0.0) -> MatVec:
    """v -> (H + damping I) v, H the Hessian w.r.t. ``params`` of the function whose ``gradient`` (w.r.t. the
    same params, built with ``create_graph=True``) is given; the graph is kept for further products."""
    gradient = flat(gradient)

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(gradient @ v, params, retain_graph=True, allow_unused=True)
        return flat([torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]) + damping * v

    return product


@dataclass
class LineSearch:
    step: torch.Tensor  # the step taken (flat; zeros when none was accepted)
    tries: int  # the candidates evaluated (1 .. max_backtracks)
    accepted: bool
    improvement: float  # L(theta + step) - L(theta); 0 when rejected
    kl: float  # KL at theta + step; 0 when rejected


def line_search(evaluate: Callable[[torch.Tensor], tuple[float, float]], full_step: torch.Tensor, value_before: float,
                max_kl: float, ratio: float = 0.8, max_backtracks: int = 15) -> LineSearch:
    """Backtracking along ``full_step``: the first fraction ratio^k (k = 0 .. max_backtracks - 1) whose
    ``evaluate(step) -> (L, KL)`` at theta + step has L > value_before and KL <= max_kl; else no step."""
    for k in range(max_backtracks):
        step = full_step * ratio ** k
        value, kl = evaluate(step)
        if value > value_before and kl <= max_kl:  # NaNs fail both
            return LineSearch(step, k + 1, True, value - value_before, kl)
    return LineSearch(torch.zeros_like(full_step), max_backtracks, False, 0.0, 0.0)


def natural_step(gradient: torch.Tensor, fisher_product: MatVec, max_kl: float, cg_iters: int = 10) -> torch.Tensor:
    """The step F^-1 g scaled to the trust region's boundary of the quadratic model, 0.5 s^T F s = max_kl."""
    direction = conjugate_gradient(fisher_product, gradient, cg_iters)
    curvature = float(direction @ fisher_product(direction))
    scale = math.sqrt(2.0 * max_kl / (curvature + 1e-8)) if curvature >= 0 else float("nan")
    return direction * (scale if math.isfinite(scale) else 1.0)  # rllab's fallback for a NaN scale


def trust_region_step(params: Sequence[torch.Tensor], surrogate: torch.Tensor, kl: torch.Tensor,
                      evaluate: Callable[[torch.Tensor], tuple[float, float]], max_kl: float = 0.01,
                      cg_iters: int = 10, damping: float = 1e-5, ratio: float = 0.8,
                      max_backtracks: int = 15) -> LineSearch:
    """One TRPO step from ``params`` (theta_old): ``surrogate`` (L, to maximise) and ``kl`` (the constraint,
    KL(pi_old || pi_theta), 0 with zero gradient at theta_old) are scalars computed from ``params`` with their
    graphs; ``evaluate(step)`` gives (L, KL) at theta_old + step. Returns the accepted step (add it to params)."""
    params = list(params)
    g = torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True)
    g = flat([torch.zeros_like(p) if x is None else x for x, p in zip(g, params)]).detach()
    kl_grad = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
    kl_grad = [torch.zeros_like(p) if x is None else x for x, p in zip(kl_grad, params)]
    fisher = hessian_vector_product(kl_grad, params, damping)
    full_step = natural_step(g, lambda v: fisher(v).detach(), max_kl, cg_iters)
    return line_search(evaluate, full_step, float(surrogate.detach()), max_kl, ratio, max_backtracks)
