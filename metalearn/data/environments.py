"""Environments as task distributions: the ``reinforcement`` task kind.

A reinforcement-learning task is an environment with parameters drawn from a
distribution (a goal position, a target velocity, a direction). The data layer
draws *which* tasks a batch holds, as it draws the classes of an episode; the
algorithm runs the episodes itself, in its ``meta_step`` (rollouts of its own
policy are part of the meta-gradient), through the one engine loop.

A batch of such tasks is an ``EnvTasks``, a ``TaskBatch`` whose tensors mean:

* ``support_x`` [B, shots, P]: the task's parameters (the same row repeated once per support episode:
  the episodes of the adaptation steps, K "shots" = K rollouts, the MAML paper's ``fast_batch_size``);
* ``support_y`` [B, shots] int64: one seed per support episode, which fixes its action noise (at every
  inner step: step j's rollout of the episode draws the j-th block of its stream);
* ``query_x`` [B, queries, P], ``query_y`` [B, queries]: the same for the episodes run after adaptation;
* ``classes`` [B, 0]: none.

and ``batch.env`` is the environment (its dynamics, reward and horizon), carried along by ``to``,
slicing and concatenation. Every random number of a rollout comes from those seeds, which the
sampler draws from its own generator: a run resumed from a checkpoint (which holds the sampler's
state) makes bit for bit the rollouts of an uninterrupted one, and an evaluation episode is the same
whatever the evaluation batch size.

An environment is batched torch with no simulator in the loop (``navigation2d``), or one stepped in
worker processes (MuJoCo): the algorithm sees ``reset`` and ``step`` only::

    env.obs_size, env.action_size, env.horizon
    env.reset(params [B, P], seeds [B, E] int64) -> (state, obs [B, E, obs_size])
    env.step(params, state, action [B, E, action_size]) -> (state, obs, reward [B, E], done [B, E] bool)

``seeds`` fix whatever is random in an episode's start (a simulator's initial-state noise); an environment
whose start is fixed ignores them. ``reset_seeds(seeds, block)`` gives the ones of adaptation step ``block``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from metalearn.data.episodes import TaskBatch
from metalearn.errors import DataError


class EnvTasks(TaskBatch):
    """A batch of environment tasks (see the module docstring): task parameters and episode seeds, and ``env``."""

    def __init__(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                 query_y: torch.Tensor, classes: torch.Tensor, env: Any = None):
        super().__init__(support_x, support_y, query_x, query_y, classes)
        self.env = env

    def _with(self, *tensors: torch.Tensor) -> "EnvTasks":
        return EnvTasks(*tensors, env=self.env)

    @property
    def params(self) -> torch.Tensor:
        """The parameters of each task, [B, P]."""
        return self.support_x[:, 0]

    @property
    def shots(self) -> int:
        return self.support_y.shape[1]

    @property
    def queries(self) -> int:
        return self.query_y.shape[1]


def episode_noise(seeds: torch.Tensor, blocks: int, horizon: int, size: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Standard normal noise of each episode from its seed: [B, E] seeds -> [blocks, B, E, horizon, size].

    Drawn on the CPU (the same numbers on every device); block j is the episode's noise at inner step j, a
    function of (seed, j) only, whatever ``blocks`` is: one draw per block, because a single draw of all blocks
    is not a prefix-stable stream (the CPU normal sampler redraws the last 16 numbers of a draw whose size is not
    a multiple of 16), and evaluations with different numbers of adaptation steps must share their first steps.
    """
    flat = seeds.reshape(-1).tolist()
    g = torch.Generator()
    noise = torch.empty(len(flat), blocks, horizon, size, dtype=torch.float64)
    for i, seed in enumerate(flat):
        g.manual_seed(seed)
        for j in range(blocks):
            torch.randn(horizon, size, generator=g, dtype=torch.float64, out=noise[i, j])
    noise = noise.view(*seeds.shape, blocks, horizon, size).permute(2, 0, 1, 3, 4)
    return noise.to(dtype=dtype).to(device)


def reset_seeds(seeds: torch.Tensor, block: int) -> torch.Tensor:
    """The environment seeds of the episodes' ``block``-th run (inner step ``block``): [B, E] int64 in [0, 2^63).

    Episode seeds are drawn below 2^62, so adding the block keeps them distinct and non-negative."""
    return seeds + block


class EnvTaskSource:
    """The task source of one split (the interface of ``ClassStore`` and ``SinusoidTasks``) for an environment
    whose tasks are parameter vectors: fresh draws of ``draw(n, generator)``, or a fixed set of them."""

    task = "reinforcement"
    num_classes = 0
    mean = std = None

    def __init__(self, env: Any, draw: Callable[[int, torch.Generator, torch.device], torch.Tensor],
                 task_set: torch.Tensor | None = None):
        self.env, self.draw, self.task_set = env, draw, task_set
        self.device = torch.device("cpu")
        self.train_transform = self.eval_transform = None  # observations are used as they are

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.env.obs_size,)

    @property
    def output_size(self) -> int:
        return self.env.action_size

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        if shots < 1 or queries < 1:
            raise DataError(f"reinforcement tasks need shots >= 1 (episodes per adaptation step) and queries >= 1 "
                            f"(episodes after adaptation); got shots={shots} queries={queries}")

    def sampler(self, ways: int, shots: int, queries: int, batch_size: int, seed: int,
                training: bool = False) -> "EnvTaskSampler":
        return EnvTaskSampler(self, shots, queries, batch_size, seed)

    def to(self, device: torch.device | str) -> "EnvTaskSource":
        self.device = torch.device(device)
        if self.task_set is not None:
            self.task_set = self.task_set.to(self.device)
        return self

    def __len__(self) -> int:
        return 0 if self.task_set is None else len(self.task_set)


SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}  # task_seed * 3 + offset draws each split's fixed set


def task_sources(env: Any, draw: Callable[[int, torch.Generator, torch.device], torch.Tensor], num_tasks: int,
                 task_seed: int) -> dict[str, EnvTaskSource]:
    """{split: EnvTaskSource} of one environment (the splits share it): fresh draws of ``draw`` per batch
    (``num_tasks`` 0), or a fixed set of ``num_tasks`` per split drawn from ``task_seed``."""
    stores = {}
    for split, offset in SPLIT_OFFSETS.items():
        task_set = None
        if num_tasks > 0:
            task_set = draw(num_tasks, torch.Generator().manual_seed(task_seed * 3 + offset), torch.device("cpu"))
        stores[split] = EnvTaskSource(env, draw, task_set)
    return stores


class EnvTaskSampler:
    """Batches of environment tasks (``EnvTasks``), reproducible from the seed, resumable from ``state_dict``."""

    def __init__(self, source: EnvTaskSource, shots: int, queries: int, batch_size: int, seed: int):
        self.source, self.shots, self.queries, self.batch_size = source, shots, queries, batch_size
        self.generator = torch.Generator(device=source.device)
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def sample(self) -> EnvTasks:
        s, g, B, dev = self.source, self.generator, self.batch_size, self.source.device
        if s.task_set is None:
            params = s.draw(B, g, dev)
        else:
            params = s.task_set[torch.randint(len(s.task_set), (B,), generator=g, device=dev)]
        seeds = torch.randint(1 << 62, (B, self.shots + self.queries), generator=g, device=dev)
        K = self.shots
        return EnvTasks(params[:, None].expand(B, K, -1).contiguous(), seeds[:, :K].contiguous(),
                        params[:, None].expand(B, self.queries, -1).contiguous(), seeds[:, K:].contiguous(),
                        torch.empty(B, 0, dtype=torch.long, device=dev), env=s.env)
