"""ProMP: Proximal Meta-Policy Search (Rothfuss, Lee, Clavera, Asfour & Abbeel, ICLR 2019).

MAML for reinforcement learning (maml_rl.py's ``GaussianMetaPolicy``: the same Gaussian policy, rollouts,
baseline, episode seeds and evaluation) with ProMP's two changes:

1. **The inner step ascends the low-variance curvature (LVC) surrogate** of each task's support episodes,

       J_LVC(theta) = mean over the episodes' steps of  pi_theta(a_t | s_t) / pi_old(a_t | s_t) * A_t,

   with pi_old the policy that sampled them (a constant) and A_t the advantages (discounted returns-to-go minus
   the linear feature baseline, normalised per task as the reference code's ``normalize_adv``; no value
   function). At theta = theta_old its gradient is the vanilla policy gradient (maml_rl's inner step), but its
   Hessian adds sum_t A_t grad log pi grad log pi^T to maml_rl's sum_t A_t hess log pi: differentiating
   the inner step through it (second order) gives the low-variance estimate of the curvature term that credits
   the pre-update sampling (the paper's section 5; maml_rl's exact ``pre_update_credit`` is its
   high-variance form).

2. **The outer objective is PPO's clipped surrogate** of the adapted policy's query episodes, with a KL
   penalty on the pre-update policy of every inner step k:

       J_ProMP = mean_t min(r_t A'_t, clip(r_t, 1 - clip, 1 + clip) A'_t)  -  mean_k eta_k KL_k,
       r_t = pi_theta'(a_t | s_t) / pi_theta'_old(a_t | s_t),   KL_k = KL(pi_old,k || pi_k) on step k's states,

   where theta' is re-adapted from theta, differentiably (``create_graph``), on every update; the ratio is
   against the adapted policy that ran the query episodes, so it is 1 at a batch's first update. ``clip`` is the
   reference's ``clip_eps``.

``ppo_epochs`` updates (the reference's ``num_promp_steps``) share one batch's episodes (the engine's
``updates_per_batch``: it calls ``meta_step`` that many times on the same batch object, an optimizer step after
each). The first call runs and keeps the episodes (support, with theta and the adapted weights reached so far;
query, with theta'), their advantages and the sampling policy's log-probabilities and action distributions
(``base.EpochCache``); every call re-adapts from them with the current theta and backpropagates minus J_ProMP.
Nothing is sampled again until the batch's ``ppo_epochs`` calls are made.

The KL coefficients eta_k start at ``init_inner_kl_penalty``. With ``adaptive_inner_kl_penalty=true``, after
each batch each is halved if step k's KL (mean over tasks) is below ``target_inner_step`` / 1.5 and doubled
if above ``target_inner_step`` * 1.5, as the reference code does. The reference measures that KL after the
batch's last update; here it is measured at the last update, before its optimizer step (after
``ppo_epochs`` - 1 updates: the algorithm does not see the weights after the trainer's last step of a
batch). The coefficients are a buffer (``inner_kl_coeff``) of the model, so every checkpoint holds them and a
resumed run is bit for bit an uninterrupted one. The reference's experiments (its ``run_scripts``) keep
them fixed (5e-4): that is the default. The adaptive rule needs the whole meta-batch in one process
(``check_training`` refuses it under torchrun).

Metrics of a training batch (its first update's, as maml_rl's): ``loss`` (minus the mean reward per step after
adaptation), ``return_pre``, ``return_post`` (and ``return_step<k>`` after each of several inner steps),
``inner_kl`` (the mean over inner steps of KL_k, per task, at the batch's last update, 0 at the first by
construction: the last call writes it into the first call's tensor,
which the trainer reads only after the batch's last call, as ``Algorithm.updates_per_batch`` allows) and
``inner_kl_coeff`` (the mean coefficient the batch was trained with). Evaluation is maml_rl's (the LVC step at
the sampling policy is the VPG step): ``return_step0`` .. ``return_step<k>`` and ``return``.

Not here (the reference's options): minibatches, annealing the clip range, trainable inner step sizes; its policy's
hidden units are tanh, ``backbone=mlp``'s are ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metalearn import distributed
from metalearn.algorithms.base import EpochCache, ProblemInfo
from metalearn.algorithms.maml_rl import GaussianMetaPolicy
from metalearn.algorithms.policy_gradient import (Rollouts, adaptation_returns, advantages, clipped_surrogate,
                                                  gaussian_kl, gaussian_log_prob, log_prob, rollout)
from metalearn.data.environments import EnvTasks, reset_seeds
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "promp"
    inner_lr: float = 0.1  # step size of the inner (LVC) step
    inner_steps: int = 1  # inner steps during meta-training (each on `shots` fresh episodes)
    test_inner_steps: int = 1  # ... at validation and test (return_step0 .. return_step<k> are reported)
    ppo_epochs: int = 5  # outer updates per batch of episodes (the reference's num_promp_steps)
    clip: float = 0.3  # PPO's clipping range of the outer likelihood ratio, in (0, 1) (the reference's clip_eps)
    init_inner_kl_penalty: float = 5e-4  # eta_k at the start
    adaptive_inner_kl_penalty: bool = False  # true: halve/double eta_k after each batch towards target_inner_step
    target_inner_step: float = 0.01  # the KL of an inner step's pre-update policy the adaptive rule aims at
    discount: float = 0.99
    gae_lambda: float = 1.0  # 1: advantages are returns-to-go minus the baseline
    baseline: str = "linear"  # linear (fitted on all of a task's episodes) | loo (each episode's on the others) | none
    normalize_advantages: bool = True  # advantages to mean 0, std 1 per task (inner and outer, as the reference)
    init_std: float = 1.0  # initial standard deviation of the actions


@dataclass
class Step:
    """What one inner step of a batch keeps between its updates: the episodes and what the policy that ran them
    made of them (constants)."""

    episodes: Rollouts
    adv: torch.Tensor  # [B, E, H]
    logp: torch.Tensor | None = None  # [B, E, H] log pi_old(a_t | s_t), set at the first update
    old: tuple[torch.Tensor, torch.Tensor] | None = None  # pi_old's mean [B, E * H, A] and log_std [B, 1, A]


@dataclass
class Cache:
    """One batch's episodes, run at its first update and reused by the others."""

    batch: EnvTasks
    support: list[Step] = field(default_factory=list)
    query: Step | None = None
    inner_kl: torch.Tensor | None = None  # [B] reported by the first update, filled in by the last


@dataclass
class Objective:
    """One update's per-task pieces, [B] each (``ratio``: the query steps' likelihood ratios, [B, Q, H])."""

    surrogate: torch.Tensor
    penalty: torch.Tensor
    kl: torch.Tensor  # [inner_steps, B]
    ratio: torch.Tensor


class ProMP(GaussianMetaPolicy):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__(cfg, backbone, info)  # the policy, and the checks of the keys shared with maml_rl
        if cfg.init_inner_kl_penalty < 0 or cfg.target_inner_step <= 0:
            raise ConfigError(f"algo.init_inner_kl_penalty must be >= 0 and algo.target_inner_step > 0 (got "
                              f"{cfg.init_inner_kl_penalty}, {cfg.target_inner_step})")
        if cfg.adaptive_inner_kl_penalty and cfg.ppo_epochs < 2:
            # the KL is measured before the batch's last optimizer step: with one update it is always 0
            raise ConfigError("algo.adaptive_inner_kl_penalty=true adapts to the KL reached by a batch's updates and "
                              "needs algo.ppo_epochs >= 2; raise it, or set adaptive_inner_kl_penalty=false")
        self.updates_per_batch = cfg.ppo_epochs
        # eta_k: training state, in the model's state_dict (checkpoints) beside the weights
        self.register_buffer("inner_kl_coeff", torch.full((cfg.inner_steps,), float(cfg.init_inner_kl_penalty)))
        self._epochs = EpochCache()  # the current batch's Cache

    def differentiates_backbone_backward(self) -> bool:
        return True  # the inner step is differentiated (second order) at every update

    def check_training(self, cfg: Any) -> None:
        """Any outer optimizer (``optim.*``) will do; the adaptive KL coefficients need the whole meta-batch."""
        if self.cfg.adaptive_inner_kl_penalty and distributed.world_size() > 1:
            # each process would adapt its coefficients to the KL of its own share of the meta-batch
            raise ConfigError("algo.adaptive_inner_kl_penalty=true needs the whole meta-batch in one process; run it "
                              "without torchrun, or set algo.adaptive_inner_kl_penalty=false")

    # ------------------------------------------------------------ pure functions of per-task weights

    def lvc_step(self, params: dict, step: Step, logp: torch.Tensor, create_graph: bool,
                 retain_graph: bool = False) -> dict:
        """theta + inner_lr * grad J_LVC of every task on its episodes (``logp``: their log-probabilities under
        ``params``, differentiable; ``step.logp``: the sampling policy's)."""
        mask = step.episodes.mask
        lvc = (torch.exp(logp - step.logp) * step.adv).sum((1, 2)) / mask.sum((1, 2))  # [B]
        # The gradient of the sum w.r.t. the stacked weights is each task's own gradient.
        grads = torch.autograd.grad(lvc.sum(), tuple(params.values()), create_graph=create_graph,
                                    retain_graph=create_graph or retain_graph)
        return {k: p + self.cfg.inner_lr * g for (k, p), g in zip(params.items(), grads)}

    def inner_update(self, params: dict, rollouts: Rollouts, create_graph: bool,
                     keep_log_probs: bool = False) -> tuple[dict, torch.Tensor]:
        """One LVC step at the policy that ran ``rollouts`` (``params``): ``GaussianMetaPolicy``'s interface, used
        by its evaluation; the same gradient as maml_rl's VPG step."""
        logp = log_prob(self.policy, params, rollouts)
        step = self._new_step(rollouts)
        step.logp = logp.detach()
        return self.lvc_step(params, step, logp, create_graph, retain_graph=keep_log_probs), logp

    def _new_step(self, episodes: Rollouts) -> Step:
        c = self.cfg
        return Step(episodes, advantages(episodes, c.discount, c.gae_lambda, c.baseline, c.normalize_advantages))

    def _log_prob_and_kl(self, params: dict, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(a_t | s_t) [B, E, H] and KL(pi_old || pi) [B] (the mean over the task's steps) on ``step``'s
        episodes, from one forward of the policy (``gaussian_log_prob``, ``gaussian_kl``); the first call keeps
        pi_old's."""
        episodes = step.episodes
        B, E, H, O = episodes.obs.shape
        mean, log_std = self.policy(params, episodes.obs.reshape(B, E * H, O))
        logp = gaussian_log_prob(episodes.actions.reshape(B, E * H, -1), mean, log_std).view(B, E, H)
        if step.old is None:
            # (log_std of theta is a view of the parameter, which the optimizer changes in place: a copy)
            step.logp, step.old = logp.detach(), (mean.detach(), log_std.detach().clone())
        kl = gaussian_kl(*step.old, mean, log_std).view(B, E, H)
        return logp, (kl * episodes.mask).sum((1, 2)) / episodes.mask.sum((1, 2))

    def objective(self, cache: Cache) -> Objective:
        """J_ProMP's pieces for the current theta on the batch's episodes; the first call (an empty cache) runs
        them: support episodes of inner step j with the weights after j steps, query episodes with theta'."""
        batch, c = cache.batch, self.cfg
        B = batch.num_tasks
        params = self.stacked(B)
        kls = []
        noise = self._noise(batch, batch.support_y, c.inner_steps) if len(cache.support) < c.inner_steps else None
        for j in range(c.inner_steps):
            if len(cache.support) == j:
                episodes = rollout(self.policy, params, batch.env, batch.params, noise[j],
                                   reset_seeds(batch.support_y, j))
                cache.support.append(self._new_step(episodes))
            step = cache.support[j]
            logp, kl = self._log_prob_and_kl(params, step)  # at the first update: the ratio exactly 1, KL 0
            kls.append(kl)
            params = self.lvc_step(params, step, logp, create_graph=True)
        if cache.query is None:
            noise = self._noise(batch, batch.query_y, 1)[0]
            cache.query = self._new_step(rollout(self.policy, params, batch.env, batch.params, noise, batch.query_y))
        query = cache.query
        logp = log_prob(self.policy, params, query.episodes)
        if query.logp is None:
            query.logp = logp.detach()
        surrogate = clipped_surrogate(logp, query.logp, query.adv, query.episodes.mask, c.clip)
        kl = torch.stack(kls) if kls else surrogate.new_zeros(0, B)
        penalty = (self.inner_kl_coeff[:, None] * kl).mean(0) if kls else torch.zeros_like(surrogate)
        return Objective(surrogate, penalty, kl, torch.exp(logp - query.logp).detach())

    # ------------------------------------------------------------ the engine's interface

    def meta_step(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        cache, update = self._epochs.get(batch, self.updates_per_batch, lambda: Cache(batch))
        try:
            out = self.objective(cache)  # the first update fills the cache in (runs the episodes)
        except BaseException:
            self._epochs.clear()  # never a half-filled cache
            raise
        (-(out.surrogate - out.penalty).mean()).backward()
        metrics = {}
        if update == 0:
            episodes = cache.query.episodes
            H, Q = episodes.rewards.shape[2], episodes.rewards.shape[1]
            cache.inner_kl = torch.zeros_like(out.surrogate.detach())
            metrics = {"loss": -episodes.rewards.sum((1, 2)) / (Q * H),
                       **adaptation_returns([s.episodes.returns() for s in cache.support], episodes.returns()),
                       "inner_kl": cache.inner_kl,
                       "inner_kl_coeff": (self.inner_kl_coeff.mean() if self.cfg.inner_steps else
                                          self.inner_kl_coeff.new_zeros(())).expand(batch.num_tasks).clone()}
        if update == self.updates_per_batch - 1:  # the batch's last update (the cache is dropped after it)
            kl = out.kl.detach()
            if self.cfg.inner_steps:
                # into the first call's metrics, which the trainer reads after this call (base.updates_per_batch)
                cache.inner_kl.copy_(kl.mean(0))
            if self.cfg.adaptive_inner_kl_penalty:
                self._adapt_kl_coeff(kl.mean(1))
        return metrics

    @torch.no_grad()
    def _adapt_kl_coeff(self, kl: torch.Tensor) -> None:
        """The reference's rule, per inner step (on the device: no host sync)."""
        t, eta = self.cfg.target_inner_step, self.inner_kl_coeff
        eta.copy_(torch.where(kl < t / 1.5, eta / 2, torch.where(kl > t * 1.5, eta * 2, eta)))


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> ProMP:
    return ProMP(cfg, backbone, info)
