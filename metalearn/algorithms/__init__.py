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
    "matchingnet": "metalearn.algorithms.matchingnet",
    "relationnet": "metalearn.algorithms.relationnet",
    "siamese": "metalearn.algorithms.siamese",
    "baseline": "metalearn.algorithms.baseline",
    "baseline_pp": "metalearn.algorithms.baseline_pp",
    "mamlpp": "metalearn.algorithms.mamlpp",
    "r2d2": "metalearn.algorithms.r2d2",
    "metaoptnet_svm": "metalearn.algorithms.metaoptnet_svm",
    "leo": "metalearn.algorithms.leo",
    "metanet": "metalearn.algorithms.metanet",
    "snail": "metalearn.algorithms.snail",
    "mann": "metalearn.algorithms.mann",
}


def algorithm_module(name: str) -> ModuleType:
    return importlib.import_module(ALGORITHMS[name])


__all__ = ["ALGORITHMS", "Algorithm", "ProblemInfo", "algorithm_module"]
