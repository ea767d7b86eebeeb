"""Policy-gradient pieces of the meta-RL algorithms (maml_rl, promp, rl2), as pure functions.

* ``GaussianPolicy``: a Gaussian policy whose mean is a network with *per-task* weights (the MAML family's
  batched forward, ``models.functional``: every task's adapted copy in one pass) and whose log standard
  deviation is a state-independent parameter vector (``log_std``), as rllab's ``GaussianMLPPolicy``.
* ``rollout``: every task's episodes stepped at once through a batched environment
  (data/environments.py), the actions ``mean + std * noise`` from noise given by the caller (the episodes'
  seeds), under no_grad: the samples do not depend on the weights, their log-probabilities do
  (``log_prob``), which is what a likelihood-ratio estimator differentiates.
* ``linear_baseline``: the linear feature baseline of Duan et al. 2016 (rllab's ``LinearFeatureBaseline``,
  used by the MAML paper): per task, a ridge regression (coefficient 1e-5) of the discounted returns on the
  features ``[obs, obs^2, t, t^2, t^3, 1]`` (observations clipped to [-10, 10], t = step / 100). Fitted on all
  the task's episodes, as the paper does (its value at a step then depends on that episode's own actions, a
  small bias), or ``leave_one_out``: each episode's on the task's other episodes, which keeps a
  policy-gradient estimate unbiased.
* ``advantages``: discounted returns-to-go minus the baseline, or GAE(lambda) (lambda = 1: the same).
* ``gaussian_log_prob``, ``gaussian_kl``: the diagonal Gaussian's log-density and KL divergence, the one formula
  of each that the algorithms use; ``clipped_surrogate``: PPO's objective; ``check_pg_config``: the checks of
  the config keys the algorithms share.

Shapes: B tasks, E episodes, H steps (the environment's horizon), O observation size, A action size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metalearn.errors import ConfigError
from metalearn.models.functional import BatchedForward

BASELINES = ("linear", "loo", "none")
LOG_2PI = 1.8378770664093453  # log(2 pi)


@dataclass
class Rollouts:
    """The episodes of a batch of tasks. Steps after an episode ended have reward 0 and mask 0."""

    obs: torch.Tensor  # [B, E, H, O] observation before each step
    actions: torch.Tensor  # [B, E, H, A] the sampled actions (before the environment clips them)
    rewards: torch.Tensor  # [B, E, H]
    mask: torch.Tensor  # [B, E, H] 1.0 while the episode runs

    def returns(self) -> torch.Tensor:
        """The undiscounted return of each task's episodes, averaged over its episodes: [B]."""
        return self.rewards.sum(-1).mean(-1)


class GaussianPolicy:
    """pi(a | s) = N(net(s), diag(exp(log_std))^2) with per-task weights ``{name: [B, ...]}`` (``log_std``: [B, A])."""

    def __init__(self, forward: BatchedForward):
        self.forward = forward

    def __call__(self, params: dict, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [B, n, O] -> (mean [B, n, A], log_std [B, 1, A])."""
        net = {k: v for k, v in params.items() if k != "log_std"}
        return self.forward(net, obs), params["log_std"][:, None, :]


def rollout(policy: GaussianPolicy, params: dict, env: Any, task_params: torch.Tensor,
            noise: torch.Tensor, seeds: torch.Tensor) -> Rollouts:
    """Run ``noise.shape[1]`` episodes of every task with the task's weights; noise [B, E, H, A] standard normal,
    seeds [B, E] the environment's (``environments.reset_seeds``)."""
    B, E, H, _ = noise.shape
    obs_list, action_list, reward_list, mask_list = [], [], [], []
    with torch.no_grad():
        state, obs = env.reset(task_params, seeds)
        alive = torch.ones(B, E, dtype=torch.bool, device=noise.device)
        for t in range(H):
            mean, log_std = policy(params, obs)
            action = mean + log_std.exp() * noise[:, :, t]
            state, next_obs, reward, done = env.step(task_params, state, action)
            obs_list.append(obs)
            action_list.append(action)
            reward_list.append(torch.where(alive, reward, torch.zeros_like(reward)))
            mask_list.append(alive)
            alive = alive & ~done
            obs = next_obs
    return Rollouts(torch.stack(obs_list, 2), torch.stack(action_list, 2), torch.stack(reward_list, 2),
                    torch.stack(mask_list, 2).to(noise.dtype))


def check_pg_config(cfg: Any) -> None:
    """Raise the one-line ConfigError for a bad value of the keys the policy-gradient algorithms share
    (``discount``, ``gae_lambda``, ``baseline``, ``init_std``, ``ppo_epochs``, ``clip``)."""
    if cfg.baseline not in BASELINES:
        raise ConfigError(f"algo.baseline={cfg.baseline!r} is not one of: {', '.join(BASELINES)}")
    if not (0 <= cfg.discount <= 1 and 0 <= cfg.gae_lambda <= 1 and cfg.init_std > 0):
        raise ConfigError("algo.discount and algo.gae_lambda must be in [0, 1], algo.init_std > 0 (got "
                          f"{cfg.discount}, {cfg.gae_lambda}, {cfg.init_std})")
    if cfg.ppo_epochs < 1 or not 0 < cfg.clip < 1:
        raise ConfigError(f"algo.ppo_epochs must be >= 1 and algo.clip in (0, 1) (got {cfg.ppo_epochs}, {cfg.clip})")


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, diag(exp(log_std))^2), the last dimension the action's (``log_std`` broadcasts):
    [..., A] -> [...]."""
    z = (actions - mean) * torch.exp(-log_std)
    return -0.5 * (z * z).sum(-1) - log_std.sum(-1) - 0.5 * LOG_2PI * z.shape[-1]


def gaussian_kl(mean0: torch.Tensor, log_std0: torch.Tensor, mean1: torch.Tensor,
                log_std1: torch.Tensor) -> torch.Tensor:
    """KL(N(mean0, diag(exp(log_std0))^2) || N(mean1, diag(exp(log_std1))^2)), summed over the last dimension:
    [..., A] -> [...]."""
    return (log_std1 - log_std0 + (torch.exp(2 * log_std0) + (mean0 - mean1) ** 2) / (2 * torch.exp(2 * log_std1))
            - 0.5).sum(-1)


def log_prob(policy: GaussianPolicy, params: dict, rollouts: Rollouts) -> torch.Tensor:
    """log pi(a_t | s_t) of every step under ``params`` (differentiable w.r.t. them): [B, E, H]."""
    B, E, H, O = rollouts.obs.shape
    mean, log_std = policy(params, rollouts.obs.reshape(B, E * H, O))
    return gaussian_log_prob(rollouts.actions.reshape(B, E * H, -1), mean, log_std).view(B, E, H)


def discounted_cumsum(x: torch.Tensor, factor: float) -> torch.Tensor:
    """y_t = sum_{t' >= t} factor^(t' - t) x_t' along the last dimension (one matrix product)."""
    H = x.shape[-1]
    steps = torch.arange(H, device=x.device)
    later = steps[:, None] - steps[None, :]  # [t', t] = t' - t
    weights = torch.where(later >= 0, torch.tensor(factor, dtype=x.dtype, device=x.device) ** later.clamp(min=0),
                          torch.zeros((), dtype=x.dtype, device=x.device))
    return x @ weights


def baseline_features(obs: torch.Tensor) -> torch.Tensor:
    """rllab's features: [B, E, H, O] -> [B, E, H, 2 O + 4]."""
    o = obs.clamp(-10, 10)
    t = (torch.arange(obs.shape[2], device=obs.device, dtype=obs.dtype) / 100.0)[None, None, :, None]
    t = t.expand(*obs.shape[:3], 1)
    return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], -1)


def linear_baseline(rollouts: Rollouts, targets: torch.Tensor, leave_one_out: bool = False,
                    reg: float = 1e-5) -> torch.Tensor:
    """The fitted baseline at every step (0 after an episode ended): [B, E, H]. Solved in float64."""
    f = baseline_features(rollouts.obs).double() * rollouts.mask.double()[..., None]
    y = targets.double()
    gram = torch.einsum("behi,behj->beij", f, f)  # per episode: [B, E, F, F]
    cross = torch.einsum("behi,beh->bei", f, y)
    eye = reg * torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
    if leave_one_out:
        coef = torch.linalg.solve(gram.sum(1, keepdim=True) - gram + eye, cross.sum(1, keepdim=True) - cross)
        values = torch.einsum("behi,bei->beh", f, coef)
    else:
        coef = torch.linalg.solve(gram.sum(1) + eye, cross.sum(1))
        values = torch.einsum("behi,bi->beh", f, coef)
    return values.to(targets.dtype)


def advantages(rollouts: Rollouts, discount: float, gae_lambda: float, baseline: str,
               normalize: bool) -> torch.Tensor:
    """The advantage of every step (0 after an episode ended): [B, E, H], a function of the samples only.

    ``normalize``: per task, to mean 0 and standard deviation 1 over its steps (rllab's ``center_adv``)."""
    mask = rollouts.mask
    to_go = discounted_cumsum(rollouts.rewards, discount)
    if baseline == "none":
        values = torch.zeros_like(to_go)
    else:
        values = linear_baseline(rollouts, to_go, leave_one_out=baseline == "loo")
    if gae_lambda == 1.0:
        adv = to_go - values
    else:
        next_values = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], -1)
        adv = discounted_cumsum(rollouts.rewards + discount * next_values - values, discount * gae_lambda)
    adv = adv * mask
    if normalize:
        n = mask.sum((1, 2), keepdim=True)
        mean = adv.sum((1, 2), keepdim=True) / n
        std = (((adv - mean) * mask) ** 2).sum((1, 2), keepdim=True).div(n).sqrt()
        adv = (adv - mean) / (std + 1e-8) * mask
    return adv


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      clip: float) -> torch.Tensor:
    """PPO's clipped objective of each task (Schulman et al. 2017), to be maximised: the mean over its steps of
    min(r A, clip(r, 1 - clip, 1 + clip) A) with r = exp(logp - logp_old). [B, E, H] each -> [B]."""
    ratio = torch.exp(logp - logp_old)
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv) * mask
    return objective.sum((1, 2)) / mask.sum((1, 2))


def mean_kl(policy: GaussianPolicy, params_old: dict, params_new: dict, rollouts: Rollouts) -> torch.Tensor:
    """KL(pi_old(.|s) || pi_new(.|s)) of each task, averaged over the steps of its episodes (differentiable in
    both): [B]. TRPO's trust region (ProMP's KL penalty is the same divergence, ``gaussian_kl``, per inner step)."""
    B, E, H, O = rollouts.obs.shape
    obs = rollouts.obs.reshape(B, E * H, O)
    kl = gaussian_kl(*policy(params_old, obs), *policy(params_new, obs)).view(B, E, H)
    return (kl * rollouts.mask).sum((1, 2)) / rollouts.mask.sum((1, 2))


def adaptation_returns(before: list[torch.Tensor], after: torch.Tensor) -> dict[str, torch.Tensor]:
    """The training metrics of adapted tasks, [B] each: ``return_pre`` (the mean return of the first inner step's
    support episodes; ``after``'s without inner steps), ``return_post`` (of the episodes after adaptation) and,
    with more than one inner step, ``return_step<k>`` after k = 0..K steps (``before[k]``, then ``after``)."""
    metrics = {"return_pre": before[0] if before else after, "return_post": after}
    if len(before) > 1:
        metrics |= {f"return_step{k}": r for k, r in enumerate([*before, after])}
    return metrics
