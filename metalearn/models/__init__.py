"""Backbones. Each is one module with a ``Config`` dataclass and
``build(cfg, input_shape) -> nn.Module`` whose ``out_features`` is the size of
the (flat) embedding it returns and ``out_shape`` the (C, H, W) feature map
that embedding flattens; add a line here to register one. ``models.tasks`` holds
what they share: per-task BatchNorm and the task-batch forward (``TaskwiseBackbone``)."""

from __future__ import annotations

import importlib
from types import ModuleType

BACKBONES = {
    "conv4": "metalearn.models.conv4",
    "resnet12": "metalearn.models.resnet12",
    "mlp": "metalearn.models.mlp",
    "identity": "metalearn.models.identity",
}


def backbone_module(name: str) -> ModuleType:
    return importlib.import_module(BACKBONES[name])
