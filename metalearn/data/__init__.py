"""Datasets. Each is one module with a ``Config`` dataclass and
``load(cfg) -> {"train"|"val"|"test": ClassStore}``; the built-ins are listed in metalearn/plugins.py (BUILTINS), your own come from there too."""

from __future__ import annotations

from types import ModuleType

from metalearn.data.episodes import ClassStore, EpisodeSampler, TaskBatch
from metalearn.plugins import BUILTINS

DATASETS = BUILTINS["data"]  # name -> module; the table is metalearn/plugins.py's

SPLITS = ("train", "val", "test")


def dataset_module(option) -> ModuleType:
    """The module of a dataset: a built-in or installed name, or a typed ``data`` config (which may name the
    user's own module: metalearn/plugins.py)."""
    from metalearn.plugins import module_of

    return module_of("data", option)


__all__ = ["ClassStore", "EpisodeSampler", "TaskBatch", "DATASETS", "SPLITS", "dataset_module"]
