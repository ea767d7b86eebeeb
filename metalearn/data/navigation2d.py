"""navigation2d: the 2D point navigation tasks of the MAML paper (Finn, Abbeel & Levine 2017, section 5.3).

A point agent starts at the origin and must reach a goal drawn uniformly from [-0.5, 0.5]^2 (one goal per
task). Its observation is its position; its action a velocity, clipped to [-0.1, 0.1] per coordinate
(``max_action``); the reward of a step is minus the Euclidean distance to the goal after the move; an
episode lasts ``horizon`` = 100 steps, or ends when the agent is within ``goal_tolerance`` = 0.01 of the goal
in both coordinates. As in the paper's rllab code (``PointEnvRandGoal``) and its ports (learn2learn,
pytorch-maml-rl's ``Navigation2DEnv``), whose reward is the distance (the paper's text says squared distance)
and whose termination is that box test.

Written as batched torch: every task's episodes step at once ([tasks, episodes, 2] positions), with no
simulator and no Python loop over episodes. The algorithms of the reinforcement task kind train on it:
``algo=maml_rl`` and ``promp``, where ``shots`` is the number of episodes per adaptation step (the paper's 20)
and ``queries`` the episodes run after adaptation, and ``rl2``, where ``shots`` is the number of episodes per
trial and ``queries`` the trials per task; ``ways`` means nothing here and is ignored.

Task sets: by default (``num_tasks: 0``) every task is a fresh goal drawn from the sampler's generator,
as in the paper: train, val and test are the same distribution with different, fixed seeds (the run's
``seed``; ``trainer.eval_seed`` and ``eval_seed + 1``), like sinusoid's. ``num_tasks: N`` instead gives
each split a fixed set of N goals drawn from ``task_seed`` (one draw per split), from which batches pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalearn.data.environments import EnvTaskSource, task_sources
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "navigation2d"
    goal_low: float = -0.5  # goals uniform in [goal_low, goal_high]^2
    goal_high: float = 0.5
    max_action: float = 0.1  # actions clipped to [-max_action, max_action] per coordinate
    horizon: int = 100  # steps per episode
    goal_tolerance: float = 0.01  # the episode ends when |position - goal| < this in both coordinates (0: never)
    num_tasks: int = 0  # 0: every task a fresh goal (the paper); N: each split a fixed set of N goals
    task_seed: int = 0  # draws the fixed sets (num_tasks > 0)


class Navigation2D:
    """The dynamics and reward, batched: positions [B, E, 2], goals (the task parameters) [B, 2]."""

    obs_size = 2
    action_size = 2

    def __init__(self, horizon: int = 100, max_action: float = 0.1, goal_tolerance: float = 0.01):
        self.horizon, self.max_action, self.goal_tolerance = horizon, max_action, goal_tolerance

    def reset(self, params: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position = params.new_zeros(params.shape[0], seeds.shape[1], 2)  # every episode starts at the origin
        return position, position

    def step(self, params: torch.Tensor, position: torch.Tensor,
             action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        position = position + action.clamp(-self.max_action, self.max_action)
        offset = position - params[:, None, :]
        reward = -offset.norm(dim=-1)
        done = (offset.abs() < self.goal_tolerance).all(-1)
        return position, position, reward, done


def load(cfg: Config) -> dict[str, EnvTaskSource]:
    if not cfg.goal_low <= cfg.goal_high:
        raise ConfigError(f"data.goal_low must be <= data.goal_high (got {cfg.goal_low}, {cfg.goal_high})")
    if cfg.max_action <= 0 or cfg.horizon < 1 or cfg.goal_tolerance < 0 or cfg.num_tasks < 0:
        raise ConfigError("data.max_action must be > 0, data.horizon >= 1, data.goal_tolerance >= 0 and "
                          f"data.num_tasks >= 0 (got {cfg.max_action}, {cfg.horizon}, {cfg.goal_tolerance}, "
                          f"{cfg.num_tasks})")
    env = Navigation2D(cfg.horizon, cfg.max_action, cfg.goal_tolerance)

    def draw(n: int, generator: torch.Generator, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        u = torch.rand(n, 2, generator=generator, device=device)
        return cfg.goal_low + (cfg.goal_high - cfg.goal_low) * u

    return task_sources(env, draw, cfg.num_tasks, cfg.task_seed)


def sources(cfg: Config) -> list:
    return []  # generated on the fly: nothing on disk
