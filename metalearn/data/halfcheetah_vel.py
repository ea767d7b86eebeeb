"""halfcheetah_vel: the MAML paper's goal-velocity HalfCheetah (Finn, Abbeel & Levine 2017, section 5.3).

A task is a goal velocity drawn uniformly from [0, 2] (``velocity_low``, ``velocity_high``); the reward of a
step is ``-|forward velocity - goal| - 0.05 * sum(a^2)``, as the paper's rllab ``HalfCheetahEnvRand`` and its
ports (pytorch-maml-rl's and garage's ``HalfCheetahVelEnv``: ``-1.0 * abs(v - goal) - 0.5 * 1e-1 * sum(a^2)``).
Episodes last ``horizon`` = 200 steps (the paper's) and never end early. Trained with ``algo=maml_rl``,
``promp`` or ``rl2`` (the reinforcement task kind; ``shots`` and ``queries``: conf/data/halfcheetah_vel.yaml).

The simulator is Gymnasium's ``HalfCheetah-v5`` (its observation: 17 numbers, the joint positions without the
x position and the velocities; its initial-state noise, seeded per episode), made with
``ctrl_cost_weight=0.05``; the forward velocity is its ``info["x_velocity"]`` (the root's x displacement over the
step, divided by dt = 0.05 s). Differences from the paper's code: its observation also held the torso's centre of
mass (20 numbers); its velocity was rllab's ``get_body_comvel("torso")`` (a centre-of-mass velocity); its
initial-state noise (rllab's ``MujocoEnv.reset_mujoco``) was 0.01 * a standard normal on the joint positions and
0.1 * one on the velocities, where Gymnasium's (``reset_noise_scale=0.1``) is uniform(-0.1, 0.1) on the positions
(about six times the spread) with the same velocity noise; and it ran on mujoco-py.

``num_tasks``, ``task_seed`` and ``workers`` are those of every MuJoCo dataset (data/mujoco.py): 0 = a fresh
goal per task, N = a fixed set of N per split; 0 = simulate in this process, W = in W worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalearn.data import mujoco
from metalearn.data.environments import EnvTaskSource, task_sources
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "halfcheetah_vel"
    velocity_low: float = 0.0  # goal velocities uniform in [velocity_low, velocity_high]
    velocity_high: float = 2.0
    ctrl_cost_weight: float = 0.05  # the reward's - ctrl_cost_weight * sum(a^2) (the paper's 0.5 * 1e-1)
    horizon: int = 200  # steps per episode
    num_tasks: int = 0  # 0: every task a fresh goal (the paper); N: each split a fixed set of N goals
    task_seed: int = 0  # draws the fixed sets (num_tasks > 0)
    workers: int = 0  # 0: simulate in this process; W: in W worker processes


def load(cfg: Config) -> dict[str, EnvTaskSource]:
    mujoco.require(cfg.name)
    mujoco.check_common(cfg)
    if not cfg.velocity_low <= cfg.velocity_high or cfg.ctrl_cost_weight < 0:
        raise ConfigError(f"data.velocity_low must be <= data.velocity_high and data.ctrl_cost_weight >= 0 (got "
                          f"{cfg.velocity_low}, {cfg.velocity_high}, {cfg.ctrl_cost_weight})")
    spec = mujoco.EnvSpec("HalfCheetah-v5", (("ctrl_cost_weight", cfg.ctrl_cost_weight),), "velocity")
    env = mujoco.MujocoTasks(spec, cfg.horizon, cfg.workers)

    def draw(n: int, generator: torch.Generator, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        u = torch.rand(n, 1, generator=generator, device=device)
        return cfg.velocity_low + (cfg.velocity_high - cfg.velocity_low) * u

    return task_sources(env, draw, cfg.num_tasks, cfg.task_seed)


def sources(cfg: Config) -> list:
    return []  # simulated: nothing on disk
