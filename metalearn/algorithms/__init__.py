"""Algorithms. Each is one module with a ``Config`` dataclass and
``build(cfg, backbone, info) -> Algorithm``; add a line here to register one."""

from __future__ import annotations

import importlib
from types import ModuleType

from metalearn.algorithms.base import Algorithm, ProblemInfo

ALGORITHMS = {
    "maml": "metalearn.algorithms.maml",
    "protonet": "metalearn.algorithms.protonet",
    "reptile": "metalearn.algorithms.reptile",
    "metasgd": "metalearn.algorithms.metasgd",
    "anil": "metalearn.algorithms.anil",
}


def algorithm_module(name: str) -> ModuleType:
    return importlib.import_module(ALGORITHMS[name])


__all__ = ["ALGORITHMS", "Algorithm", "ProblemInfo", "algorithm_module"]
