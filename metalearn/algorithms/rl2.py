"""RL^2: fast reinforcement learning via slow reinforcement learning (Duan, Schulman, Chen, Bartlett, Sutskever &
Abbeel, 2016).

The policy is a recurrent network (``backbone=gru``) with a linear head for the mean of a Gaussian and a learned,
state-independent log standard deviation (``log_std``, initial ``init_std``), as garage's ``GaussianGRUPolicy``.
At every step it reads the observation, the previous action, the previous reward and a done flag (1 at the first
step of every episode but the trial's first: the step before ended an episode), and its hidden state is reset
only at the start of a *trial*: ``shots`` episodes of the same task, one after the other (each one starts with
``env.reset``). The hidden state carries over from episode to episode, so what the policy learned about the task
in the first episodes is in it: the adaptation is the hidden state, and the weights are the same for every task.

Training (the "slow" reinforcement learning) treats a trial as one long trajectory: discounted returns and GAE
advantages run across the episode boundaries (``discount``, ``gae_lambda``), with the linear feature baseline
(policy_gradient.py) fitted on the GRU's inputs over all the batch's trials, as garage's ``RL2`` does (its
time feature counts the trial's steps). Because the baseline and ``normalize_advantages`` see the whole batch,
``check_training`` refuses several processes (torchrun, each with its share of the batch) unless
``baseline=none`` and ``normalize_advantages=false``. The outer algorithm is PPO's clipped objective (``clip``),
as garage's ``RL2PPO``; the paper used TRPO. ``ppo_epochs`` updates per batch (``updates_per_batch``: the trainer
calls ``meta_step`` that many times on the same batch object, with an optimizer step after each): the first call
runs the trials and caches them with their advantages and log-probabilities (``base.EpochCache``, dropped after
the batch's ``ppo_epochs`` calls); the later calls recompute the log-probabilities of the cached trials under the
updated weights (no new environment steps). Each update uses the whole batch (garage's example: minibatches of 32
trials of 10 tasks, so one). garage's example also adds an entropy bonus to the rewards (``entropy_method='max'``,
0.02, gradient stopped); with a state-independent standard deviation that is the same constant at every step (a
shift of the returns that depends on the time step alone, which the baseline's time features absorb), so it is
left out.

Log-probabilities of stored trials come from one pass of ``nn.GRU`` over the whole sequence; the rollout runs the
same module one step at a time. A trial's steps are stored episode after episode with the steps after an
episode ended (navigation2d ends one at the goal) moved to the end of the trial (mask 0): the sequence pass then
sees exactly the steps the rollout fed the GRU, in their order (the rollout leaves the hidden state unchanged on
an ended episode's steps).

Mapping onto the task batch (data/environments.py): ``shots`` = episodes per trial, ``queries`` = trials per
task; trial q of task b uses the episode seed ``query_y[b, q]``: episode k of the trial draws its action noise
from block k of ``episode_noise(query_y, blocks=shots)`` and resets the environment with
``reset_seeds(query_y, k)``. ``support_y`` is not used: RL^2 has no separate adaptation episodes, the trial's
first episodes are its exploration.

Metrics (training, validation, test, ``metalearn eval``): ``return_step<k>``, the mean undiscounted return of the
k-th episode of the trials (k = 0..shots-1: how it adapts within a trial, comparable with MAML's return after k
adaptation steps), and ``return``, the last episode's (the primary metric, higher is better); training also logs
``loss``, minus the mean reward per step.

Randomness: all noise comes from the episode seeds the task sampler draws; this module has no random state of its
own, so a resumed run is bit for bit an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metalearn import distributed
from metalearn.algorithms.base import Algorithm, EpochCache, ProblemInfo
from metalearn.algorithms.policy_gradient import (Rollouts, advantages, check_pg_config, clipped_surrogate,
                                                  gaussian_log_prob)
from metalearn.data.environments import EnvTasks, episode_noise, reset_seeds
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "rl2"
    ppo_epochs: int = 10  # PPO updates on each batch of trials (garage's RL2PPO example: 10)
    clip: float = 0.2  # PPO's likelihood-ratio clip range, in (0, 1)
    discount: float = 0.99  # across the episodes of a trial
    gae_lambda: float = 0.95
    baseline: str = "linear"  # linear (fitted on all the batch's trials) | loo (each trial's on the others) | none
    normalize_advantages: bool = False  # true: advantages to mean 0, std 1 over the batch (garage's example: false)
    init_std: float = 1.0  # initial standard deviation of the actions


@dataclass
class Trials:
    """The trials of a batch of tasks: B tasks, Q trials each, K episodes a trial, H steps an episode."""

    steps: Rollouts  # [B, Q, K*H]: each trial's steps episode after episode, ended steps moved to the end (mask 0);
    #                  obs holds the GRU's inputs (observation, previous action, previous reward, done flag)
    episode_returns: torch.Tensor  # [B, Q, K] undiscounted return of each episode
    index: torch.Tensor  # [B, Q, K*H] int64: where each stored step was in the trial, k * H + t (episode k, step t)


@dataclass
class Sampled:
    """What a batch's PPO epochs share: its trials, their advantages and metrics, and the sampling policy's
    log-probabilities (set by the first update)."""

    trials: Trials
    adv: torch.Tensor  # [B, Q, K*H]
    metrics: dict
    logp_old: torch.Tensor | None = None  # [B, Q, K*H]


class RL2(Algorithm):
    tasks = ("reinforcement",)
    primary_metric = "return"
    higher_is_better = True
    per_example_features = False

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if not getattr(backbone, "recurrent", False):
            raise ConfigError(f"algo=rl2 needs a recurrent policy: backbone=gru (not {type(backbone).__name__})")
        check_pg_config(cfg)
        self.cfg = cfg
        self.updates_per_batch = cfg.ppo_epochs
        self.obs_size, self.action_size = info.input_shape[0], info.outputs
        backbone.resize_input(self.obs_size + self.action_size + 2)  # + previous action, reward and done flag
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, self.action_size)
        self.log_std = nn.Parameter(torch.full((self.action_size,), math.log(cfg.init_std)))
        self._epochs = EpochCache()  # the current batch's trials (PPO epochs; checkpoints fall between batches)

    def check_training(self, cfg: Any) -> None:
        """Several processes (torchrun) each see a share of the batch, so the gradient would depend on the split
        where a quantity is fitted over the whole batch: the baseline, the advantages' normalisation. Refused."""
        c = self.cfg
        coupled = [(what, fix) for what, fix, on in (
            ("fits its baseline", "algo.baseline=none", c.baseline != "none"),
            ("normalises its advantages", "algo.normalize_advantages=false", c.normalize_advantages)) if on]
        if coupled and distributed.world_size() > 1:
            raise ConfigError(f"algo=rl2 {' and '.join(w for w, _ in coupled)} over the whole batch of trials, which "
                              "one process of a torchrun job does not see; run it without torchrun, or set "
                              + " ".join(f for _, f in coupled))

    # ------------------------------------------------------------ the policy

    def log_prob(self, steps: Rollouts) -> torch.Tensor:
        """log pi(a_t | history) of every stored step, one GRU pass over each whole trial: [B, Q, T]."""
        B, Q, T, D = steps.obs.shape
        out, _ = self.backbone(steps.obs.reshape(B * Q, T, D))
        return gaussian_log_prob(steps.actions, self.head(out).view(B, Q, T, -1), self.log_std)

    def run_trials(self, env: Any, task_params: torch.Tensor, noise: torch.Tensor, seeds: torch.Tensor) -> Trials:
        """Run ``Q`` trials of ``K`` episodes for every task, step by step (no gradient): noise [K, B, Q, H, A]
        standard normal (episode k of trial q draws its actions from noise[k, :, q]), seeds [B, Q] the trials'
        episode seeds (episode k resets the environment with ``reset_seeds(seeds, k)``)."""
        K, B, Q, H, A = noise.shape
        dev, dtype = noise.device, noise.dtype
        inputs, actions, rewards, masks = [], [], [], []
        with torch.no_grad():
            h = self.backbone.initial_state(B * Q)  # reset at the start of the trial only
            prev_action = torch.zeros(B, Q, A, dtype=dtype, device=dev)
            prev_reward = torch.zeros(B, Q, dtype=dtype, device=dev)
            prev_done = torch.zeros(B, Q, dtype=dtype, device=dev)
            std = self.log_std.exp()
            for k in range(K):
                state, obs = env.reset(task_params, reset_seeds(seeds, k))
                alive = torch.ones(B, Q, dtype=torch.bool, device=dev)
                for t in range(H):
                    x = torch.cat([obs.to(dtype), prev_action, prev_reward[..., None], prev_done[..., None]], -1)
                    out, h_next = self.backbone.step(x.reshape(B * Q, -1), h)
                    h = torch.where(alive.reshape(1, B * Q, 1), h_next, h)  # an ended episode leaves it as it is
                    action = self.head(out).view(B, Q, A) + std * noise[k, :, :, t]
                    state, obs, reward, done = env.step(task_params, state, action)
                    ended = alive & (done | (t == H - 1))
                    inputs.append(x)
                    actions.append(action)
                    rewards.append(torch.where(alive, reward.to(dtype), torch.zeros_like(prev_reward)))
                    masks.append(alive)
                    prev_action = torch.where(alive[..., None], action, prev_action)
                    prev_reward = torch.where(alive, reward.to(dtype), prev_reward)
                    prev_done = torch.where(alive, ended.to(dtype), prev_done)
                    alive = alive & ~done
        mask = torch.stack(masks, 2)  # [B, Q, K*H]
        rewards_ = torch.stack(rewards, 2)
        # The steps the GRU saw, in order: stable sort puts every trial's running steps first.
        order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices

        def compact(x: torch.Tensor) -> torch.Tensor:
            return x.gather(2, order.view(*order.shape, *[1] * (x.dim() - 3)).expand_as(x))

        fmask = mask.to(dtype)
        steps = Rollouts(compact(torch.stack(inputs, 2)) * compact(fmask)[..., None],
                         compact(torch.stack(actions, 2)) * compact(fmask)[..., None],
                         compact(rewards_), compact(fmask))
        return Trials(steps, rewards_.view(B, Q, K, H).sum(-1), order)

    # ------------------------------------------------------------ the engine's interface

    def _trials(self, batch: EnvTasks) -> Trials:
        env, K = batch.env, batch.shots
        noise = episode_noise(batch.query_y, K, env.horizon, env.action_size, self.log_std.dtype, self.log_std.device)
        return self.run_trials(env, batch.params, noise, batch.query_y)

    def _advantages(self, steps: Rollouts) -> torch.Tensor:
        """GAE over each whole trial, the baseline fitted on all the batch's trials: [B, Q, T]."""
        B, Q, T, D = steps.obs.shape
        c = self.cfg
        flat = Rollouts(*(x.reshape(1, B * Q, T, *x.shape[3:]) for x in (steps.obs, steps.actions, steps.rewards,
                                                                         steps.mask)))
        return advantages(flat, c.discount, c.gae_lambda, c.baseline, c.normalize_advantages).view(B, Q, T)

    @staticmethod
    def _metrics(trials: Trials) -> dict[str, torch.Tensor]:
        returns = trials.episode_returns.mean(1)  # [B, K]: over each task's trials
        metrics = {f"return_step{k}": returns[:, k] for k in range(returns.shape[1])}
        metrics["return"] = returns[:, -1]
        return metrics

    def _sample(self, batch: EnvTasks) -> Sampled:
        trials = self._trials(batch)
        steps = trials.steps
        metrics = self._metrics(trials)
        metrics["loss"] = -steps.rewards.sum((1, 2)) / (steps.rewards.shape[1] * batch.shots * batch.env.horizon)
        return Sampled(trials, self._advantages(steps), metrics)

    def meta_step(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        """One PPO update. A batch's first call: run its trials and cache them; its next ``ppo_epochs`` - 1 calls
        (the same batch object): the cached trials, under the weights the previous update left. Returns the
        batch's metrics."""
        sampled, update = self._epochs.get(batch, self.updates_per_batch, lambda: self._sample(batch))
        try:
            logp = self.log_prob(sampled.trials.steps)
        except BaseException:
            self._epochs.clear()  # never a cache without its logp_old (a later call would take it for update 1)
            raise
        if update == 0:
            sampled.logp_old = logp.detach()  # the ratio is 1 at the first update
        objective = clipped_surrogate(logp, sampled.logp_old, sampled.adv, sampled.trials.steps.mask,
                                      self.cfg.clip)  # [B]
        (-objective.mean()).backward()
        return sampled.metrics

    @torch.no_grad()
    def evaluate(self, batch: EnvTasks) -> dict[str, torch.Tensor]:
        return self._metrics(self._trials(batch))


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> RL2:
    return RL2(cfg, backbone, info)
