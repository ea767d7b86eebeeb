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


def load_splits(cfg) -> dict:
    """The task sources of a typed ``data`` config, as a run uses them: the dataset's ``load(cfg)``, then the
    options every image dataset shares that act on its classes (``data.rotations``)."""
    from metalearn.data.common import add_rotations, rotation_splits

    rotation_splits(getattr(cfg, "rotations", False))  # a bad value fails before any data is read
    stores = dataset_module(cfg).load(cfg)
    add_rotations(cfg, stores)
    return stores


__all__ = ["ClassStore", "EpisodeSampler", "TaskBatch", "DATASETS", "SPLITS", "dataset_module", "load_splits"]
