"""CIFAR-FS (Bertinetto et al., "Meta-learning with differentiable closed-form solvers", ICLR 2019).

CIFAR-100's 100 classes split at random into 64 train / 16 val / 20 test classes, with all
600 32x32 colour images of each class (CIFAR-100's train and test sets merged). The class
lists are shipped in ``splits/cifarfs_bertinetto.csv``. The images come from the official
``cifar-100-python.tar.gz`` in ``<root>/cifar100/`` (shared with ``fc100``; downloaded, md5
checked, when missing), decoded once into ``<root>/cifar100/cache/``: see ``cifar100``.
Normalisation uses CIFAR-100's per-channel mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metalearn.data import cifar100
from metalearn.data.episodes import ClassStore


@dataclass
class Config(cifar100.Cifar100Config):
    name: str = "cifarfs"


def load(cfg: Config) -> dict[str, ClassStore]:
    return cifar100.split_stores(cfg, cifar100.load_images(cfg), bertinetto_split(), "CIFAR-FS")


def sources(cfg: Config) -> list[Path]:
    return cifar100.sources(cfg)


def bertinetto_split() -> dict[str, list[str]]:
    """``{"train"|"val"|"test": [CIFAR-100 fine class names]}`` of the CIFAR-FS split."""
    return cifar100.read_split("cifarfs_bertinetto.csv", "class")
