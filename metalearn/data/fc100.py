"""FC100 (Oreshkin et al., "TADAM: Task dependent adaptive metric for improved few-shot
learning", NeurIPS 2018): CIFAR-100 split by superclass, so that test classes are further
from the training classes than in a random split.

CIFAR-100's 20 superclasses go 12 to train, 4 to val and 4 to test, each split taking every
fine class of its superclasses: 60 / 20 / 20 classes of 600 32x32 colour images (CIFAR-100's
train and test sets merged). The superclass lists are shipped in ``splits/fc100_oreshkin.csv``;
classes are named by their fine class. The images come from the official
``cifar-100-python.tar.gz`` in ``<root>/cifar100/`` (shared with ``cifarfs``; downloaded, md5
checked, when missing), decoded once into ``<root>/cifar100/cache/``: see ``cifar100``.
Normalisation uses CIFAR-100's per-channel mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metalearn.data import cifar100
from metalearn.data.episodes import ClassStore
from metalearn.errors import DataError


@dataclass
class Config(cifar100.Cifar100Config):
    name: str = "fc100"


def load(cfg: Config) -> dict[str, ClassStore]:
    data = cifar100.load_images(cfg)
    superclasses = oreshkin_split()
    known = set(data["coarse_names"])
    unknown = [name for names in superclasses.values() for name in names if name not in known]
    if unknown:
        raise DataError(
            f"{cifar100.archive_path(cfg)} has no superclass {unknown[0]!r} of the FC100 split, so it is not "
            "CIFAR-100; delete it and run again to download it afresh"
        )
    fine_of = _fine_classes_by_superclass(data)
    # Every CIFAR-100 superclass has 5 fine classes; fewer means classes are missing from the archive.
    short = [name for names in superclasses.values() for name in names if len(fine_of.get(name, [])) != 5]
    if short:
        raise DataError(
            f"{cifar100.archive_path(cfg)} holds images of {len(fine_of.get(short[0], []))} fine classes of superclass "
            f"{short[0]!r}, not 5; the archive is incomplete: delete it and run again to download it afresh"
        )
    classes = {split: [fine for name in names for fine in fine_of[name]] for split, names in superclasses.items()}
    return cifar100.split_stores(cfg, data, classes, "FC100")


def sources(cfg: Config) -> list[Path]:
    return cifar100.sources(cfg)


def oreshkin_split() -> dict[str, list[str]]:
    """``{"train"|"val"|"test": [CIFAR-100 superclass names]}`` of the FC100 split."""
    return cifar100.read_split("fc100_oreshkin.csv", "superclass")


def _fine_classes_by_superclass(data: dict) -> dict[str, list[str]]:
    """``{superclass name: [its fine class names]}``, read off the images' labels (the archive
    records each image's superclass, not the hierarchy itself)."""
    pairs = set(zip(data["fine_labels"].tolist(), data["coarse_labels"].tolist()))
    coarse_of: dict[int, int] = {}
    for fine, coarse in sorted(pairs):
        if coarse_of.setdefault(fine, coarse) != coarse:
            raise DataError(
                f"class {data['fine_names'][fine]!r} has images in two superclasses in the CIFAR-100 archive, "
                "so it is corrupt; delete it and run again to download it afresh"
            )
    by_superclass: dict[str, list[str]] = {}
    for fine, coarse in sorted(coarse_of.items()):
        by_superclass.setdefault(data["coarse_names"][coarse], []).append(data["fine_names"][fine])
    return by_superclass
