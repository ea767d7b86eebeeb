"""Datasets. Each is one module with a ``Config`` dataclass and
``load(cfg) -> {"train"|"val"|"test": ClassStore}``; add a line here to register one."""

from __future__ import annotations

import importlib
from types import ModuleType

from metalearn.data.episodes import ClassStore, EpisodeSampler, TaskBatch

DATASETS = {
    "glyphs": "metalearn.data.glyphs",
    "omniglot": "metalearn.data.omniglot",
    "sinusoid": "metalearn.data.sinusoid",
    "miniimagenet": "metalearn.data.miniimagenet",
    "tieredimagenet": "metalearn.data.tieredimagenet",
    "cifarfs": "metalearn.data.cifarfs",
    "fc100": "metalearn.data.fc100",
    "cub": "metalearn.data.cub",
    "mnist": "metalearn.data.mnist",
    "doublemnist": "metalearn.data.doublemnist",
    "imagefolder": "metalearn.data.imagefolder",
    "features": "metalearn.data.features",
    "episodes": "metalearn.data.episode_folders",  # fixed test episodes (episodes.py is the sampler)
}

SPLITS = ("train", "val", "test")


def dataset_module(name: str) -> ModuleType:
    return importlib.import_module(DATASETS[name])


__all__ = ["ClassStore", "EpisodeSampler", "TaskBatch", "DATASETS", "SPLITS", "dataset_module"]
