"""ant_dir: the MAML paper's forward/backward Ant (Finn, Abbeel & Levine 2017, section 5.3).

A task is a direction along x, +1 or -1 with probability 1/2 each. The reward of a step is the paper's (rllab's
``AntEnvRandDirec``, pytorch-maml-rl's ``AntDirEnv``)::

    direction * forward velocity - 0.005 * sum(a^2) - 0.0005 * sum(clip(contact forces, -1, 1)^2) + 0.05

(``ctrl_cost_weight`` = 0.5 * 1e-2, ``contact_cost_weight`` = 0.5 * 1e-3, ``healthy_reward`` = 0.05 while the
torso's height is in [0.2, 1]). An episode ends when the Ant is unhealthy (torso height outside [0.2, 1], or a
non-finite state), as in the paper's code and Gymnasium's Ant, or after ``horizon`` = 200 steps (the paper's).
ProMP's and learn2learn's Ant direction tasks use Gymnasium's own weights instead: ``data.ctrl_cost_weight=0.5
data.healthy_reward=1.0``. Trained with ``algo=maml_rl``, ``promp`` or ``rl2`` (the reinforcement task kind;
``shots`` and ``queries``: conf/data/ant_dir.yaml).

The simulator is Gymnasium's ``Ant-v5`` with those weights, its defaults otherwise: its observation (105 numbers:
joint positions without x and y, velocities, and the external contact forces of the 13 bodies clipped to [-1, 1],
which the paper's observation held too, ``include_cfrc_ext_in_observation``), its initial-state noise (seeded per
episode), its healthy height range and its termination. The forward velocity is ``info["x_velocity"]``, the torso's
x displacement over the step divided by dt = 0.05 s; Gymnasium's bonus is ``healthy_reward`` on healthy steps only
(0 on the step that ends the episode), its contact cost sums over every body's clipped forces. Differences from
the paper's code: its observation also held the torso's x and y, orientation matrix and centre of mass; its
velocity was rllab's ``get_body_comvel("torso")`` (a centre-of-mass velocity); its initial-state noise (rllab's
``MujocoEnv.reset_mujoco``) was 0.01 * a standard normal on the joint positions and 0.1 * one on the velocities,
where Gymnasium's (``reset_noise_scale=0.1``) is uniform(-0.1, 0.1) on the positions (about six times the spread)
with the same velocity noise; and it ran on mujoco-py.

``num_tasks``, ``task_seed`` and ``workers``: data/mujoco.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from metalearn.data import mujoco
from metalearn.data.environments import EnvTaskSource, task_sources
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "ant_dir"
    ctrl_cost_weight: float = 0.005  # - ctrl_cost_weight * sum(a^2) (the paper's 0.5 * 1e-2)
    contact_cost_weight: float = 0.0005  # - contact_cost_weight * sum(clipped contact forces^2) (0.5 * 1e-3)
    healthy_reward: float = 0.05  # + this on every healthy step (the paper's survive reward)
    horizon: int = 200  # steps per episode (fewer if the Ant falls)
    num_tasks: int = 0  # 0: every task a fresh direction (the paper); N: each split a fixed set of N
    task_seed: int = 0  # draws the fixed sets (num_tasks > 0)
    workers: int = 0  # 0: simulate in this process; W: in W worker processes


def load(cfg: Config) -> dict[str, EnvTaskSource]:
    mujoco.require(cfg.name)
    mujoco.check_common(cfg)
    if min(cfg.ctrl_cost_weight, cfg.contact_cost_weight) < 0:
        raise ConfigError(f"data.ctrl_cost_weight and data.contact_cost_weight must be >= 0 (got "
                          f"{cfg.ctrl_cost_weight}, {cfg.contact_cost_weight})")
    weights = (("ctrl_cost_weight", cfg.ctrl_cost_weight), ("contact_cost_weight", cfg.contact_cost_weight),
               ("healthy_reward", cfg.healthy_reward))
    env = mujoco.MujocoTasks(mujoco.EnvSpec("Ant-v5", weights, "direction"), cfg.horizon, cfg.workers)
    return task_sources(env, mujoco.draw_directions, cfg.num_tasks, cfg.task_seed)


def sources(cfg: Config) -> list:
    return []  # simulated: nothing on disk
