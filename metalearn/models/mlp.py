"""mlp: a fully connected network for vector inputs, the MAML paper's regression model
(two hidden layers of 40 ReLU units). Works on [n, d] or [T, n, d] inputs; its output is
the last hidden layer (``out_features``), the algorithm adds the head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # sizes of the hidden layers


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int]):
        super().__init__()
        sizes = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


def build(cfg: Config, input_shape: tuple[int, ...]) -> MLP:
    if not cfg.hidden or min(cfg.hidden) < 1:
        raise ConfigError(f"backbone.hidden must list at least one layer size >= 1 (got {list(cfg.hidden)})")
    if len(input_shape) != 1:
        raise ConfigError(f"backbone=mlp takes vector inputs, but this data gives {'x'.join(map(str, input_shape))} "
                          "images; use backbone=conv4 or resnet12")
    net = MLP(input_shape[0], list(cfg.hidden))
    net.out_features = cfg.hidden[-1]
    net.out_shape = (cfg.hidden[-1],)
    return net
