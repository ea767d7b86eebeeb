"""gru: a recurrent backbone for vector inputs read as sequences (RL^2's policy, garage's ``GaussianGRUPolicy``).

One ``nn.GRU`` (``layers`` stacked layers of ``hidden`` units, batch first). Two ways to run the same weights:

* ``forward(x [N, T, d], h0=None) -> (out [N, T, hidden], h_T [layers, N, hidden])``: a whole sequence at once
  (cuDNN / the fused CPU kernel), what an algorithm differentiates when it scores stored sequences;
* ``step(x [N, d], h) -> (out [N, hidden], h')``: one step, what a rollout calls while it acts: the same module
  on a sequence of length one, so both agree to float precision (tests/test_rl2.py).

``initial_state(N)`` is the zero state a sequence starts from. Its output is the top layer's hidden state
(``out_features = hidden``); the algorithm adds the head. A GRU reads sequences only: a 2-d input (a batch of
examples, what the classification and regression algorithms give their backbone) is refused, so it is never
silently read as one sequence of examples.

The input size is the data's (``input_shape``) unless the algorithm feeds more per step (RL^2: the
observation, the previous action, reward and done flag), which it sets once with ``resize_input`` before
training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "gru"
    hidden: int = 64  # units of each layer (garage's RL^2 examples: 64)
    layers: int = 1  # stacked GRU layers


class GRU(nn.Module):
    #: what algorithms that need a recurrent backbone (RL^2) check for
    recurrent = True

    def __init__(self, in_features: int, hidden: int, layers: int = 1):
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.gru = nn.GRU(in_features, hidden, num_layers=layers, batch_first=True)
        self.out_features = hidden
        self.out_shape = (hidden,)

    @property
    def in_features(self) -> int:
        return self.gru.input_size

    def resize_input(self, in_features: int) -> None:
        """Read ``in_features`` inputs per step instead (freshly initialised weights); call before training."""
        if in_features != self.gru.input_size:
            p = self.gru.weight_hh_l0
            self.gru = nn.GRU(in_features, self.hidden, num_layers=self.layers, batch_first=True).to(p.device, p.dtype)

    def initial_state(self, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """The zero state of ``n`` sequences: [layers, n, hidden] (dtype and device of the weights)."""
        p = self.gru.weight_hh_l0
        return torch.zeros(self.layers, n, self.hidden, dtype=p.dtype, device=p.device)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3:
            raise ConfigError(f"backbone=gru reads sequences [batch, time, features] (algo=rl2), not a {x.dim()}-d "
                              "batch of examples; use backbone=mlp for vectors")
        return self.gru(x, h0)

    def step(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of ``N`` sequences: x [N, d], h [layers, N, hidden] -> (out [N, hidden], h')."""
        out, h = self.gru(x[:, None], h)
        return out[:, 0], h


def build(cfg: Config, input_shape: tuple[int, ...]) -> GRU:
    if cfg.hidden < 1 or cfg.layers < 1:
        raise ConfigError(f"backbone.hidden and backbone.layers must be >= 1 (got {cfg.hidden}, {cfg.layers})")
    if len(input_shape) != 1:
        raise ConfigError(f"backbone=gru takes vector inputs, but this data gives {'x'.join(map(str, input_shape))} "
                          "images; use backbone=conv4 or resnet12")
    return GRU(input_shape[0], cfg.hidden, cfg.layers)
