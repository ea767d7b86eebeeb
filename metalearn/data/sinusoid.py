"""sinusoid: the regression benchmark of the MAML paper (Finn, Abbeel & Levine 2017, section 5.1).

Each task is a sine wave ``y = amplitude * sin(x - phase)`` with the amplitude drawn
uniformly from [0.1, 5.0] and the phase from [0, pi]; inputs are drawn uniformly from
[-5, 5]. A task gives ``shots`` support points (K = 5, 10 or 20 in the paper) and
``queries`` query points; the loss is the mean squared error. ``ways`` means nothing
here and is ignored. Tasks are drawn fresh from the sampler's generator, so the
train, val and test "splits" are the same distribution with different, fixed seeds
(the engine's ``trainer.eval_seed``): as in the paper, there is no held-out set of
functions, only held-out draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError, DataError


@dataclass
class Config:
    name: str = "sinusoid"
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])  # [low, high], uniform
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])  # [low, high], uniform
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])  # inputs, uniform
    noise: float = 0.0  # std of Gaussian noise added to the targets (0: the paper's noiseless tasks)


class SinusoidTasks:
    """An endless source of sine-wave regression tasks (the task-source interface of ``ClassStore``)."""

    task = "regression"
    input_shape = (1,)
    output_size = 1
    num_classes = 0
    mean = std = None

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.train_transform = self.eval_transform = None  # inputs are used as they are

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        if shots < 1 or queries < 1:
            raise DataError(f"sinusoid tasks need shots >= 1 and queries >= 1 (got shots={shots} queries={queries})")

    def sampler(self, ways: int, shots: int, queries: int, batch_size: int, seed: int,
                training: bool = False) -> "SinusoidSampler":
        return SinusoidSampler(self.cfg, shots, queries, batch_size, seed, self.device)

    def to(self, device: torch.device | str) -> "SinusoidTasks":
        self.device = torch.device(device)
        return self

    def __len__(self) -> int:
        return 0


class SinusoidSampler:
    """Batches of sine tasks: x and y are [B, n, 1]; reproducible from the seed, resumable from state_dict."""

    def __init__(self, cfg: Config, shots: int, queries: int, batch_size: int, seed: int, device: torch.device):
        self.cfg, self.shots, self.queries, self.batch_size = cfg, shots, queries, batch_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.device = device

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _uniform(self, bounds: list[float], *shape: int) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(*shape, generator=self.generator, device=self.device)

    def sample(self) -> TaskBatch:
        B, K, Q = self.batch_size, self.shots, self.queries
        amplitude = self._uniform(self.cfg.amplitude, B, 1, 1)
        phase = self._uniform(self.cfg.phase, B, 1, 1)
        x = self._uniform(self.cfg.x_range, B, K + Q, 1)
        y = amplitude * torch.sin(x - phase)
        if self.cfg.noise > 0:
            y = y + self.cfg.noise * torch.randn(y.shape, generator=self.generator, device=self.device)
        no_classes = torch.empty(B, 0, dtype=torch.long, device=self.device)
        return TaskBatch(x[:, :K], y[:, :K], x[:, K:], y[:, K:], no_classes)


def load(cfg: Config) -> dict[str, SinusoidTasks]:
    for key in ("amplitude", "phase", "x_range"):
        bounds = getattr(cfg, key)
        if len(bounds) != 2 or not bounds[0] <= bounds[1]:
            raise ConfigError(f"data.{key} must be [low, high] with low <= high (got {list(bounds)})")
    if cfg.noise < 0:
        raise ConfigError(f"data.noise must be >= 0 (got {cfg.noise})")
    return {split: SinusoidTasks(cfg) for split in ("train", "val", "test")}


def sources(cfg: Config) -> list:
    return []  # generated on the fly: nothing on disk
