"""MAML for reinforcement learning (Finn, Abbeel & Levine, ICML 2017, sections 3.2 and 5.3).

The meta-parameters theta are a Gaussian policy's: a network for the mean (``backbone=mlp`` and a linear
head, the paper's two hidden layers of 100 ReLU units with ``backbone.hidden=[100,100]``) and a learned,
state-independent log standard deviation (``log_std``, initial ``init_std``). For each task of a meta-batch:

1. ``shots`` episodes with theta (the support rollouts, the paper's ``fast_batch_size`` = 20);
2. ``inner_steps`` vanilla policy-gradient steps, theta' = theta - inner_lr * grad L_in, where L_in is minus
   the mean over the episodes' steps of log pi(a_t | s_t) A_t, with advantages A_t from the discounted
   returns and the paper's linear feature baseline (policy_gradient.py), normalised per task as rllab does
   (``normalize_advantages``); each further step runs fresh episodes with the current weights;
3. ``queries`` episodes with theta' (the query rollouts), whose mean reward per step is the task's
   meta-objective f.

The meta-gradient; the engine's optimizer (Adam by default, ``optim.*``) makes the outer step. The objective
is J(theta) = E_tau[E_tau'[f(tau')]], the expected post-update return, where the update theta' = U(theta, tau)
is the one the algorithm makes from the *sampled* support episodes tau (the ProMP paper's "formulation I",
Rothfuss et al. 2019; E-MAML, Stadie et al. 2018). Its gradient has two parts:

    grad J = E[ grad_theta' f . dU/dtheta ]  +  E[ f(tau') grad_theta log p(tau | theta) ]
             (through the inner update:          (the pre-update sampling: which support episodes
              second order, the Hessian of         theta's policy runs changes the update, and so the
              the inner loss)                      return after it)

Both are written as one surrogate whose value is f and whose gradient is the estimate, as DiCE does for any
stochastic computation graph (Foerster et al. 2018): the query rollouts' likelihood-ratio term
(log pi' - stop_grad(log pi')) * A' with theta' differentiable in theta (``create_graph``), plus, with
``pre_update_credit=true``, (sum of the support log-probabilities - stop_grad(the same)) * stop_grad(f - b),
where b, the mean f of the batch's *other* tasks, does not depend on this task's samples. That estimator is
exact: with ``discount=1``, ``gae_lambda=1`` and an unbiased outer baseline (``baseline=loo`` or ``none``)
its expectation is grad J, which tests/test_rl_navigation.py checks by Gauss-Hermite quadrature over the
action noise against finite differences of J (and that each estimator below misses it, by 37-62% there).

The default, ``pre_update_credit=false``, is the MAML paper's own estimator: autodiff through the inner
surrogate, the first term alone. It drops the dependence of the support episodes on theta (PITFALLS: "a
plain surrogate drops it silently"; here it is a documented choice), so it is biased; but the second term
is a score-function estimate over shots * horizon log-probabilities times a noisy return, which raised the
spread of the meta-gradient about 8x on 2D navigation at initialisation (10 tasks x 10 episodes), and in
120 meta-steps (20 tasks x 20 episodes, 64-64 policy, Adam 3e-3) the paper's estimator reached a
post-update return of -17 (pre-update -38) where the exact one reached -34 (-45). ProMP's low-variance
curvature estimator is the next slice's. ``first_order=true`` also drops the Hessian (theta' is then a
constant shift of theta).

Evaluation (validation, test, ``metalearn eval``) adapts each held-out task with ``test_inner_steps`` steps
and reports ``return_step<k>``, the mean undiscounted return of the episodes run after k = 0..K steps
(``shots`` episodes per step, ``queries`` after the last), and ``return`` (after K, the primary metric:
higher is better).

Randomness: the action noise of every episode comes from the episode's seed, which the task sampler draws
(data/environments.py); this module has no random state of its own, so a resumed run is bit for bit an
uninterrupted one.

Not here yet: the paper's outer TRPO step and a PPO-style outer loss (use ``optim.*`` for the outer
optimizer), ProMP, RL^2, MuJoCo tasks and sampling in worker processes.
"""

from __future__ import annotations

import os

import math
from dataclasses import dataclass

import torch
from torch import nn

from metalearn.algorithms.base import Algorithm, ProblemInfo
from metalearn.algorithms.policy_gradient import (BASELINES, GaussianPolicy, Rollouts, advantages, log_prob,
                                                  rollout)
from metalearn.data.environments import EnvTasks, episode_noise, reset_seeds
from metalearn.errors import ConfigError
from metalearn.models.functional import task_batched_forward


@dataclass
class Config:
    name: str = "maml_rl"
    inner_lr: float = 0.1  # the paper's step size for 2D navigation
    inner_steps: int = 1  # policy-gradient steps during meta-training
    test_inner_steps: int = 1  # ... at validation and test (return_step0 .. return_step<k> are reported)
    first_order: bool = False  # true: ignore the inner update's Hessian
    pre_update_credit: bool = False  # true: add the pre-update sampling term (the exact, higher-variance estimator)
    discount: float = 0.99
    gae_lambda: float = 1.0  # 1: advantages are returns-to-go minus the baseline
    baseline: str = "linear"  # linear (the paper's, fitted on all of a task's episodes) | loo (each episode's on the others) | none
    normalize_advantages: bool = True  # inner step: advantages to mean 0, std 1 per task (rllab's center_adv)
    init_std: float = 1.0  # initial standard deviation of the actions


@dataclass
class Objective:
    """One meta-batch's per-task pieces of the meta-objective (see the module docstring), [B] each."""

    surrogate: torch.Tensor  # value f, gradient: the query rollouts' term through the inner update
    credit: torch.Tensor  # value 0, gradient: the summed support log-probabilities' (times f - b in meta_step)
    post: torch.Tensor  # f: mean reward per step of the query episodes (detached)
    return_pre: torch.Tensor  # mean undiscounted return of the first support episodes
    return_post: torch.Tensor  # ... of the query episodes


class MAMLRL(Algorithm):
    tasks = ("reinforcement",)
    primary_metric = "return"
    higher_is_better = True
    per_example_features = False

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("algo.inner_steps and algo.test_inner_steps must be >= 0")
        if cfg.baseline not in BASELINES:
            raise ConfigError(f"algo.baseline={cfg.baseline!r} is not one of: {', '.join(BASELINES)}")
        if cfg.pre_update_credit and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # its credit term's baseline is the mean over the whole meta-batch, which one process does not see
            raise ConfigError("algo.pre_update_credit=true needs the whole meta-batch in one process; run it without "
                              "torchrun, or set algo.pre_update_credit=false")
        if not (0 <= cfg.discount <= 1 and 0 <= cfg.gae_lambda <= 1 and cfg.init_std > 0):
            raise ConfigError("algo.discount and algo.gae_lambda must be in [0, 1], algo.init_std > 0 (got "
                              f"{cfg.discount}, {cfg.gae_lambda}, {cfg.init_std})")
        self.cfg = cfg
        self.net = nn.Sequential(backbone, nn.Linear(backbone.out_features, info.outputs))
        self.log_std = nn.Parameter(torch.full((info.outputs,), math.log(cfg.init_std)))
        forward = task_batched_forward(self.net)
        if forward is None:
            raise ConfigError(f"algo=maml_rl's policy network is backbone=mlp (observations are vectors), not "
                              f"{type(backbone).__name__}; use backbone=mlp")
        self.policy = GaussianPolicy(forward)

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if self.cfg.baseline == "loo" and min(shots, queries) < 2:
            raise ConfigError(f"algo.baseline=loo fits each episode's baseline on the task's other episodes: it needs "
                              f"shots >= 2 and queries >= 2 (got {shots}, {queries}); or use algo.baseline=linear")

    def differentiates_backbone_backward(self) -> bool:
        return not self.cfg.first_order

    # ------------------------------------------------------------ pure functions of per-task weights

    def stacked(self, tasks: int, detach: bool = False) -> dict:
        """The policy's weights, one copy per task: ``{name: [tasks, ...]}`` (a view: gradients sum into theta)."""
        own = {**dict(self.net.named_parameters()), "log_std": self.log_std}
        return {k: (v.detach() if detach else v).expand(tasks, *v.shape) for k, v in own.items()}

    def inner_update(self, params: dict, rollouts: Rollouts, create_graph: bool,
                     keep_log_probs: bool = False) -> tuple[dict, torch.Tensor]:
        """One policy-gradient step of every task on its episodes: (new weights, log-probabilities [B, E, H];
        ``keep_log_probs``: still differentiable after the step, without ``create_graph``)."""
        c = self.cfg
        logp = log_prob(self.policy, params, rollouts)
        adv = advantages(rollouts, c.discount, c.gae_lambda, c.baseline, c.normalize_advantages)
        loss = -(logp * adv).sum((1, 2)) / rollouts.mask.sum((1, 2))  # [B]: each task's own mean over its steps
        # The gradient of the sum w.r.t. the stacked weights is each task's own gradient.
        grads = torch.autograd.grad(loss.sum(), tuple(params.values()), create_graph=create_graph,
                                    retain_graph=create_graph or keep_log_probs)
        return {k: p - c.inner_lr * g for (k, p), g in zip(params.items(), grads)}, logp

    def objective(self, params: dict, env, task_params: torch.Tensor, support_noise: torch.Tensor,
                  query_noise: torch.Tensor, support_seeds: torch.Tensor, query_seeds: torch.Tensor,
                  create_graph: bool) -> Objective:
        """The meta-objective's pieces for tasks with weights ``params`` (stacked) from given action noise:
        support_noise [inner_steps, B, K, H, A], query_noise [B, Q, H, A], and episode seeds [B, K], [B, Q]."""
        c = self.cfg
        credit = torch.zeros(task_params.shape[0], dtype=query_noise.dtype, device=query_noise.device)
        return_pre = None
        for j in range(support_noise.shape[0]):
            episodes = rollout(self.policy, params, env, task_params, support_noise[j], reset_seeds(support_seeds, j))
            if return_pre is None:
                return_pre = episodes.returns()
            params, logp = self.inner_update(params, episodes, create_graph, keep_log_probs=c.pre_update_credit)
            if c.pre_update_credit:
                total = (logp * episodes.mask).sum((1, 2))
                credit = credit + (total - total.detach())
        episodes = rollout(self.policy, params, env, task_params, query_noise, query_seeds)
        logp = log_prob(self.policy, params, episodes)
        adv = advantages(episodes, c.discount, c.gae_lambda, c.baseline, normalize=False)
        steps = query_noise.shape[1] * query_noise.shape[2]  # Q * H: f is the mean reward per step
        post = episodes.rewards.sum((1, 2)) / steps
        surrogate = post + ((logp - logp.detach()) * adv).sum((1, 2)) / steps
        return_post = episodes.returns()
        return Objective(surrogate, credit, post, return_pre if return_pre is not None else return_post, return_post)

    # ------------------------------------------------------------ the engine's interface

    def _noise(self, batch: EnvTasks, seeds: torch.Tensor, blocks: int) -> torch.Tensor:
        env = batch.env
        return episode_noise(seeds, blocks, env.horizon, env.action_size, self.log_std.dtype, self.log_std.device)

    def meta_step(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        B, c = batch.num_tasks, self.cfg
        out = self.objective(self.stacked(B), batch.env, batch.params, self._noise(batch, batch.support_y, c.inner_steps),
                             self._noise(batch, batch.query_y, 1)[0], batch.support_y, batch.query_y,
                             create_graph=not c.first_order)
        f = out.post
        others = (f.sum() - f) / (B - 1) if B > 1 else torch.zeros_like(f)  # independent of each task's samples
        (-(out.surrogate + out.credit * (f - others)).mean()).backward()
        return {"loss": -f, "return_pre": out.return_pre, "return_post": out.return_post}

    def evaluate(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        K, B = self.cfg.test_inner_steps, batch.num_tasks
        params = {k: v.requires_grad_() for k, v in self.stacked(B, detach=True).items()}
        support = self._noise(batch, batch.support_y, K) if K else None
        metrics: dict[str, torch.Tensor] = {}
        for k in range(K):
            episodes = rollout(self.policy, params, batch.env, batch.params, support[k], reset_seeds(batch.support_y, k))
            metrics[f"return_step{k}"] = episodes.returns()
            with torch.enable_grad():
                params, _ = self.inner_update(params, episodes, create_graph=False)
            params = {name: v.detach().requires_grad_() for name, v in params.items()}
        episodes = rollout(self.policy, params, batch.env, batch.params, self._noise(batch, batch.query_y, 1)[0],
                           batch.query_y)
        metrics[f"return_step{K}"] = metrics["return"] = episodes.returns()
        return metrics


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MAMLRL:
    return MAMLRL(cfg, backbone, info)
