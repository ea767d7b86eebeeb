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

The meta-gradient; with ``outer=optimizer`` the engine's optimizer (Adam by default, ``optim.*``) makes the
outer step (``outer=trpo`` and ``outer=ppo``: below). The objective
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
curvature estimator (promp.py) is its practical form. ``first_order=true`` also drops the Hessian (theta' is then a
constant shift of theta).

Evaluation (validation, test, ``metalearn eval``) adapts each held-out task with ``test_inner_steps`` steps
and reports ``return_step<k>``, the mean undiscounted return of the episodes run after k = 0..K steps
(``shots`` episodes per step, ``queries`` after the last), and ``return`` (after K, the primary metric:
higher is better).

Randomness: the action noise of every episode comes from the episode's seed, which the task sampler draws
(data/environments.py); this module has no random state of its own, so a resumed run is bit for bit an
uninterrupted one.

The outer step (``outer``):

* ``optimizer`` (the default): meta_step fills ``.grad`` with the meta-gradient above and the engine's optimizer
  (``optim.*``) steps.
* ``trpo``: the MAML paper's meta-optimizer (its code: cbfinn/maml_rl's MAMLTRPO with rllab's
  ConjugateGradientOptimizer). The support episodes are sampled once with theta_old, and the query episodes
  once with theta_old' (the update of theta_old from them); then L(theta) = mean over tasks and query steps of
  exp(log pi_theta'(a|s) - log pi_old'(a|s)) A, where theta' is theta's update from the same, cached support
  episodes (re-adapted for every candidate theta), is maximised subject to the mean over tasks of
  KL(pi_old' || pi_theta') on the query states <= ``max_kl``: a natural-gradient step by conjugate gradient on
  Hessian-vector products of that KL (through the inner update; second order unless ``first_order``), scaled
  to the trust region and backtracked (metalearn/algorithms/trpo.py). meta_step sets ``.grad`` to minus the
  step, so the engine's optimizer must be plain SGD with step 1 (``check_training`` says so in one line).
* ``ppo``: a PPO-style outer objective (the clipped surrogate of the same ratio, ``clip``), ``ppo_epochs``
  optimizer steps (``optim.*``) on each batch's samples: the rollouts are sampled and cached on a batch's first
  call (``base.EpochCache``, dropped after the batch's ``ppo_epochs`` calls), every call re-adapts from the
  cached support episodes with the current theta.

With ``trpo`` and ``ppo`` the query advantages A are normalised per task too when ``normalize_advantages`` (as
the paper's code: rllab's ``center_adv`` applies to every batch of samples), and the objective's gradient is
the paper's estimator (``pre_update_credit=true`` is for ``outer=optimizer``). The keys of another outer are
ignored: ``max_kl``, ``cg_iters``, ``cg_damping``, ``backtrack_ratio``, ``max_backtracks`` are trpo's,
``ppo_epochs`` and ``clip`` ppo's (still checked, so that a preset is valid with either).

Refused in ``check_training`` (the trainer's; ``metalearn eval`` is not concerned) when several processes share
the meta-batch (torchrun): ``pre_update_credit`` (its baseline is the mean over the whole meta-batch) and
``outer=trpo`` (its line search).

``GaussianMetaPolicy`` (the policy, per-task weights, inner steps, evaluation) is shared with ProMP (promp.py);
RL^2 is rl2.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metalearn import distributed
from metalearn.algorithms import trpo
from metalearn.algorithms.base import Algorithm, EpochCache, ProblemInfo
from metalearn.algorithms.policy_gradient import (GaussianPolicy, Rollouts, adaptation_returns, advantages,
                                                  check_pg_config, clipped_surrogate, log_prob, mean_kl, rollout)
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
    pre_update_credit: bool = False  # optimizer: add the pre-update sampling term (exact, higher-variance estimator)
    discount: float = 0.99
    gae_lambda: float = 1.0  # 1: advantages are returns-to-go minus the baseline
    baseline: str = "linear"  # linear (the paper's, fitted on all of a task's episodes) | loo (each episode's on the others) | none
    normalize_advantages: bool = True  # inner step: advantages to mean 0, std 1 per task (rllab's center_adv)
    init_std: float = 1.0  # initial standard deviation of the actions
    outer: str = "optimizer"  # the outer step: optimizer (optim.*) | trpo (the paper's) | ppo (clipped, several epochs)
    max_kl: float = 0.01  # trpo: the trust region, mean KL(pi_old' || pi_theta') on the query states
    cg_iters: int = 10  # trpo: conjugate-gradient iterations for F^-1 g
    cg_damping: float = 1e-5  # trpo: F + damping I (rllab's reg_coeff)
    backtrack_ratio: float = 0.8  # trpo: the line search's fractions of the step, 1, ratio, ratio^2, ...
    max_backtracks: int = 15  # trpo: ... at most this many tries; none accepted: no step
    ppo_epochs: int = 5  # ppo: optimizer steps on each batch's samples
    clip: float = 0.2  # ppo: the likelihood ratio's clip range, [1 - clip, 1 + clip], clip in (0, 1)


OUTER = ("optimizer", "trpo", "ppo")

#: what outer=trpo needs of optim.*: the optimizer applies the step it is handed as a gradient unchanged
TRPO_OPTIM = {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": None,
              "scheduler": "constant", "lr_multipliers": None, "optimizer": None, "lr_scheduler": None}


@dataclass
class Objective:
    """One meta-batch's per-task pieces of the meta-objective (see the module docstring), [B] each."""

    surrogate: torch.Tensor  # value f, gradient: the query rollouts' term through the inner update
    credit: torch.Tensor  # value 0, gradient: the summed support log-probabilities' (times f - b in meta_step)
    post: torch.Tensor  # f: mean reward per step of the query episodes (detached)
    return_post: torch.Tensor  # mean undiscounted return of the query episodes
    support_returns: list  # ... of each inner step's support episodes


@dataclass
class Samples:
    """One batch's rollouts for outer=trpo and outer=ppo, sampled once with theta_old (``MAMLRL.sample``)."""

    supports: list[Rollouts]  # the support episodes of each inner step (step j's with theta_old after j updates)
    adapted: dict  # theta_old', stacked, differentiable w.r.t. theta (through the inner updates); {} once used
    query: Rollouts  # the query episodes, run with theta_old'
    logp_old: torch.Tensor  # [B, Q, H] their log-probabilities under theta_old' (detached)
    adv: torch.Tensor  # [B, Q, H] their advantages
    metrics: dict  # loss, return_pre, return_post (and return_step<k> with more than one inner step)


class GaussianMetaPolicy(Algorithm):
    """What MAML for RL and ProMP share: the Gaussian policy (``backbone=mlp`` and a linear head for the mean, a
    state-independent ``log_std``) with per-task weights, adaptation by inner steps on fresh episodes, and the
    evaluation (``return_step0`` .. ``return_step<K>`` and ``return`` after K = ``test_inner_steps`` steps).
    Subclasses give the inner step (``inner_update``) and the training step (``meta_step``); their ``Config``
    has the keys read here (``inner_steps``, ``test_inner_steps``, ``baseline``, ``init_std``, and the ones
    ``policy_gradient.check_pg_config`` checks)."""

    tasks = ("reinforcement",)
    primary_metric = "return"
    higher_is_better = True
    per_example_features = False

    def __init__(self, cfg: Any, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("algo.inner_steps and algo.test_inner_steps must be >= 0")
        check_pg_config(cfg)
        self.cfg = cfg
        self.net = nn.Sequential(backbone, nn.Linear(backbone.out_features, info.outputs))
        self.log_std = nn.Parameter(torch.full((info.outputs,), math.log(cfg.init_std)))
        forward = task_batched_forward(self.net)
        if forward is None:
            raise ConfigError(f"algo={cfg.name}'s policy network is backbone=mlp (observations are vectors), not "
                              f"{type(backbone).__name__}; use backbone=mlp")
        self.policy = GaussianPolicy(forward)

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if self.cfg.baseline == "loo" and min(shots, queries) < 2:
            raise ConfigError(f"algo.baseline=loo fits each episode's baseline on the task's other episodes: it needs "
                              f"shots >= 2 and queries >= 2 (got {shots}, {queries}); or use algo.baseline=linear")

    def inner_update(self, params: dict, rollouts: Rollouts, create_graph: bool,
                     keep_log_probs: bool = False) -> tuple[dict, torch.Tensor]:
        """One inner step of every task on its episodes: (new weights, log-probabilities [B, E, H]; with
        ``keep_log_probs`` still differentiable after the step, without ``create_graph``)."""
        raise NotImplementedError

    # ------------------------------------------------------------ pure functions of per-task weights

    def weights(self) -> dict:
        """The policy's weights theta, ``{name: parameter}`` (the names ``stacked`` and the policy use)."""
        return {**dict(self.net.named_parameters()), "log_std": self.log_std}

    def stacked(self, tasks: int, detach: bool = False, weights: dict | None = None) -> dict:
        """The policy's weights, one copy per task: ``{name: [tasks, ...]}`` (a view: gradients sum into theta).
        ``weights``: these instead of the parameters (``{name: tensor}``, as ``self.weights()``)."""
        own = self.weights() if weights is None else weights
        return {k: (v.detach() if detach else v).expand(tasks, *v.shape) for k, v in own.items()}

    def adapt(self, params: dict, supports: list[Rollouts], create_graph: bool) -> dict:
        """The inner updates of stacked weights from given support episodes, one update per entry."""
        for episodes in supports:
            params, _ = self.inner_update(params, episodes, create_graph)
        return params

    def _noise(self, batch: EnvTasks, seeds: torch.Tensor, blocks: int) -> torch.Tensor:
        env = batch.env
        return episode_noise(seeds, blocks, env.horizon, env.action_size, self.log_std.dtype, self.log_std.device)

    # ------------------------------------------------------------ evaluation

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


class MAMLRL(GaussianMetaPolicy):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__(cfg, backbone, info)
        if cfg.outer not in OUTER:
            raise ConfigError(f"algo.outer={cfg.outer!r} is not one of: {', '.join(OUTER)}")
        if cfg.outer != "optimizer" and cfg.pre_update_credit:
            raise ConfigError(f"algo.pre_update_credit=true is for algo.outer=optimizer (algo.outer={cfg.outer} uses "
                              f"the paper's estimator); set algo.pre_update_credit=false or algo.outer=optimizer")
        if not (cfg.max_kl > 0 and cfg.cg_iters >= 1 and cfg.cg_damping >= 0 and 0 < cfg.backtrack_ratio < 1
                and cfg.max_backtracks >= 1):
            raise ConfigError(f"algo.max_kl, algo.cg_iters and algo.max_backtracks must be > 0, algo.cg_damping >= 0 "
                              f"and algo.backtrack_ratio in (0, 1) (got {cfg.max_kl}, {cfg.cg_iters}, "
                              f"{cfg.max_backtracks}, {cfg.cg_damping}, {cfg.backtrack_ratio})")
        self.updates_per_batch = cfg.ppo_epochs if cfg.outer == "ppo" else 1
        self._epochs = EpochCache()  # outer=ppo: the current batch's samples (checkpoints fall between batches)

    def differentiates_backbone_backward(self) -> bool:
        return not self.cfg.first_order or self.cfg.outer == "trpo"  # TRPO: the KL's Hessian-vector products

    def check_training(self, cfg: Any) -> None:
        if distributed.world_size() > 1:
            if self.cfg.pre_update_credit:
                # its credit term's baseline is the mean over the whole meta-batch, which one process does not see
                raise ConfigError("algo.pre_update_credit=true needs the whole meta-batch in one process; run it "
                                  "without torchrun, or set algo.pre_update_credit=false")
            if self.cfg.outer == "trpo":
                raise ConfigError("algo.outer=trpo's line search needs the whole meta-batch in one process; run it "
                                  "without torchrun, or use algo.outer=optimizer or algo.outer=ppo")
        if self.cfg.outer != "trpo":
            return

        def text(value: Any) -> str:
            return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

        wrong = [key for key, want in TRPO_OPTIM.items() if getattr(cfg.optim, key) != want]
        if wrong:
            raise ConfigError("algo.outer=trpo makes the outer step itself and hands it to the optimizer as a "
                              "gradient, which plain SGD with step 1 applies unchanged: set "
                              + " ".join(f"optim.{k}={text(TRPO_OPTIM[k])}" for k in wrong) + " (got "
                              + ", ".join(f"optim.{k}={text(getattr(cfg.optim, k))}" for k in wrong) + ")")

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
        support_returns = []
        for j in range(support_noise.shape[0]):
            episodes = rollout(self.policy, params, env, task_params, support_noise[j], reset_seeds(support_seeds, j))
            support_returns.append(episodes.returns())
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
        return Objective(surrogate, credit, post, return_post, support_returns)

    # ------------------------------------------------------------ the engine's interface

    def sample(self, batch: EnvTasks) -> Samples:
        """The batch's rollouts with the current theta (theta_old): the support episodes of each inner step, the
        update theta_old' (differentiable w.r.t. theta unless ``first_order``), the query episodes with it, their
        log-probabilities and advantages (normalised per task with ``normalize_advantages``, as the paper's code)."""
        B, c = batch.num_tasks, self.cfg
        noise = self._noise(batch, batch.support_y, c.inner_steps)
        params, supports = self.stacked(B), []
        for j in range(c.inner_steps):
            supports.append(rollout(self.policy, params, batch.env, batch.params, noise[j],
                                    reset_seeds(batch.support_y, j)))
            params, _ = self.inner_update(params, supports[-1], create_graph=not c.first_order)
        query = rollout(self.policy, params, batch.env, batch.params, self._noise(batch, batch.query_y, 1)[0],
                        batch.query_y)
        logp = log_prob(self.policy, params, query)
        adv = advantages(query, c.discount, c.gae_lambda, c.baseline, c.normalize_advantages)
        f = query.rewards.sum((1, 2)) / (query.rewards.shape[1] * query.rewards.shape[2])  # mean reward per step
        metrics = {"loss": -f, **adaptation_returns([s.returns() for s in supports], query.returns())}
        return Samples(supports, params, query, logp.detach(), adv, metrics)

    @staticmethod
    def ratio_surrogate(logp: torch.Tensor, samples: Samples) -> torch.Tensor:
        """TRPO's L: the mean over tasks of the mean over their query steps of exp(logp - logp_old) A."""
        mask = samples.query.mask
        return ((torch.exp(logp - samples.logp_old) * samples.adv * mask).sum((1, 2)) / mask.sum((1, 2))).mean()

    def meta_step(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        if self.cfg.outer == "trpo":
            return self._trpo_step(batch)
        if self.cfg.outer == "ppo":
            return self._ppo_step(batch)
        B, c = batch.num_tasks, self.cfg
        out = self.objective(self.stacked(B), batch.env, batch.params, self._noise(batch, batch.support_y, c.inner_steps),
                             self._noise(batch, batch.query_y, 1)[0], batch.support_y, batch.query_y,
                             create_graph=not c.first_order)
        f = out.post
        others = (f.sum() - f) / (B - 1) if B > 1 else torch.zeros_like(f)  # independent of each task's samples
        (-(out.surrogate + out.credit * (f - others)).mean()).backward()
        return {"loss": -f, **adaptation_returns(out.support_returns, out.return_post)}

    def _trpo_step(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        """The paper's TRPO outer step; ``.grad`` = minus the step, which SGD with lr 1 adds (check_training)."""
        B, c = batch.num_tasks, self.cfg
        theta = self.weights()
        samples = self.sample(batch)
        old = {k: v.detach() for k, v in samples.adapted.items()}

        def kl(params: dict) -> torch.Tensor:  # [B]
            return mean_kl(self.policy, old, params, samples.query)

        task_kl = torch.zeros(B, dtype=samples.adv.dtype, device=samples.adv.device)  # no step: 0

        def evaluate(step: torch.Tensor) -> tuple[float, float]:  # (L, KL) at theta_old + step
            nonlocal task_kl
            moved = {k: (v.detach() + s).requires_grad_() for (k, v), s in zip(theta.items(),
                                                                              trpo.unflat(step, list(theta.values())))}
            params = self.adapt(self.stacked(B, weights=moved), samples.supports, create_graph=False)
            with torch.no_grad():
                task_kl = kl(params)  # the accepted step's is the last one evaluated
                return float(self.ratio_surrogate(log_prob(self.policy, params, samples.query), samples)), \
                    float(task_kl.mean())

        surrogate = self.ratio_surrogate(log_prob(self.policy, samples.adapted, samples.query), samples)
        result = trpo.trust_region_step(list(theta.values()), surrogate, kl(samples.adapted).mean(), evaluate,
                                        c.max_kl, c.cg_iters, c.cg_damping, c.backtrack_ratio, c.max_backtracks)
        for p, s in zip(theta.values(), trpo.unflat(result.step, list(theta.values()))):
            p.grad = s.neg()  # the engine's SGD (lr 1, no momentum) makes exactly theta_old + step
        if not result.accepted:
            task_kl = torch.zeros_like(task_kl)
        scalar = lambda x: torch.tensor(float(x), dtype=samples.adv.dtype, device=samples.adv.device)  # noqa: E731
        return {**samples.metrics, "kl": task_kl, "line_search_tries": scalar(result.tries),
                "step_accepted": scalar(result.accepted), "surrogate_gain": scalar(result.improvement)}

    def _ppo_step(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        """One epoch of the PPO-style outer objective: the rollouts are the batch's first call's (cached)."""
        c = self.cfg
        samples, update = self._epochs.get(batch, self.updates_per_batch, lambda: self.sample(batch))
        if update == 0:
            logp = log_prob(self.policy, samples.adapted, samples.query)
            samples.adapted = {}  # its graph is the first epoch's only
        else:  # a further epoch: theta' re-adapted from the cached support episodes with the current theta
            params = self.adapt(self.stacked(batch.num_tasks), samples.supports, create_graph=not c.first_order)
            logp = log_prob(self.policy, params, samples.query)
        objective = clipped_surrogate(logp, samples.logp_old, samples.adv, samples.query.mask, c.clip)
        (-objective.mean()).backward()
        return samples.metrics


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MAMLRL:
    return MAMLRL(cfg, backbone, info)
