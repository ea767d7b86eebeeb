"""Algorithms. Each is one module with a ``Config`` dataclass and
``build(cfg, backbone, info) -> Algorithm``; the built-ins are listed in metalearn/plugins.py (BUILTINS), your own come from there too."""

from __future__ import annotations

from types import ModuleType

from metalearn.algorithms.base import Algorithm, ProblemInfo
from metalearn.plugins import BUILTINS

ALGORITHMS = BUILTINS["algo"]  # name -> module; the table is metalearn/plugins.py's


def algorithm_module(option) -> ModuleType:
    """The module of an algorithm: a built-in or installed name, or a typed ``algo`` config (which may name the
    user's own module: metalearn/plugins.py)."""
    from metalearn.plugins import module_of

    return module_of("algo", option)


__all__ = ["ALGORITHMS", "Algorithm", "ProblemInfo", "algorithm_module"]
