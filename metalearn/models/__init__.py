"""Backbones. Each is one module with a ``Config`` dataclass and
``build(cfg, input_shape) -> nn.Module`` whose ``out_features`` is the size of
the (flat) embedding it returns and ``out_shape`` the (C, H, W) feature map
that embedding flattens; the built-ins are listed in metalearn/plugins.py (BUILTINS), your own come from there too. ``models.tasks`` holds
what they share: per-task BatchNorm and the task-batch forward (``TaskwiseBackbone``)."""

from __future__ import annotations

from types import ModuleType

from metalearn.plugins import BUILTINS

BACKBONES = BUILTINS["backbone"]  # name -> module; the table is metalearn/plugins.py's


def backbone_module(option) -> ModuleType:
    """The module of a backbone: a built-in or installed name, or a typed ``backbone`` config (which may name the
    user's own module: metalearn/plugins.py)."""
    from metalearn.plugins import module_of

    return module_of("backbone", option)
