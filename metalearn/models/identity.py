"""identity: no network, the inputs are the embedding (flattened). For data that already are
features, e.g. ``data=features`` (a pre-trained backbone's embeddings, cached): LEO's paper
setup, or any algorithm that brings its own parameters. Works on [n, ...] or [T, n, ...]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    name: str = "identity"


class Identity(nn.Module):
    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.input_dims = len(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.input_dims) if self.input_dims > 1 else x


def build(cfg: Config, input_shape: tuple[int, ...]) -> Identity:
    net = Identity(tuple(input_shape))
    net.out_features = math.prod(input_shape)
    net.out_shape = tuple(input_shape)
    return net
