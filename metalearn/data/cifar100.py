"""CIFAR-100 (Krizhevsky 2009), read for the few-shot splits built on it (``cifarfs``, ``fc100``).

Not a dataset of its own: both splits share this module, one download and one cache.
Files live under ``<root>/cifar100/``: the official archive ``cifar-100-python.tar.gz``
(downloaded, md5 checked, when missing, and kept). The pickles ``cifar-100-python/train``,
``cifar-100-python/test`` and ``cifar-100-python/meta`` are read straight out of it, without
extracting: ``data`` (uint8 [N, 3072], the R, G and B planes of 32x32 images, row-major),
``fine_labels``, ``coarse_labels``, and the ``fine_label_names`` / ``coarse_label_names``.
The few-shot splits use all 600 images of a class, so both pickles are merged. The first
load decodes them once into ``<root>/cifar100/cache/cifar100-<size>px-v<N>.pt`` (images
sorted by fine class; sizes other than 32 resized with antialiased bilinear filtering);
later loads read only that file, rebuilt when the archive changes. With ``data.cache_dir``
set, the download and the cache go to ``<cache_dir>/cifar100/`` (an archive under the
root is read from there). Both splits take ``data.train``/``val``/``test`` (fine class
names or patterns) and ``data.split_seed`` instead of their standard split
(``metalearn.data.common.choose_split``).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from metalearn.data import SPLITS
from metalearn.data.common import (
    DataUnpickler, ImageConfig, cached, check_image_config, check_split_config, choose_split, class_subset, data_dirs,
    fetch, file_signature, first_line, text,
)
from metalearn.data.download import check_md5
from metalearn.data.episodes import ClassStore
from metalearn.data.images import resize
from metalearn.errors import DataError

log = logging.getLogger(__name__)

ARCHIVE = "cifar-100-python.tar.gz"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz"
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar100"  # under the data root, shared by every split of CIFAR-100
NATIVE_SIZE = 32
# CIFAR-100's per-channel mean and std on the [0, 1] scale, as commonly published for it
# (MetaOptNet's CIFAR-FS/FC100 values, [129.38, 124.11, 112.48]/255 and [68.21, 65.43, 70.46]/255,
# agree within 3e-4).
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1
_PICKLES = ("train", "test", "meta")


@dataclass
class Cifar100Config(ImageConfig):
    """Options of every CIFAR-100 split; ``cifarfs`` and ``fc100`` subclass it and set ``name``."""

    image_size: int = NATIVE_SIZE  # CIFAR's own 32x32; other sizes are resized once, in the cache
    base_url: str = OFFICIAL_URL  # the folder holding cifar-100-python.tar.gz; a mirror may be given
    md5: str = OFFICIAL_MD5  # of the archive, checked after download and before decoding; "" skips the check


def archive_path(cfg: Cifar100Config) -> Path:
    """The archive under the data root if there, else under the cache dir (where it is downloaded)."""
    return data_dirs(cfg, FOLDER).find(ARCHIVE)


def sources(cfg: Cifar100Config) -> list[Path]:
    """The raw files the loader reads (downloading them when missing)."""
    return [archive_path(cfg)]


def load_images(cfg: Cifar100Config) -> dict:
    """All of CIFAR-100 (train and test pickles merged) at ``cfg.image_size``, from the cache when it is current.

    ``{"images": uint8 [N, 3, S, S] sorted by fine class, "fine_labels", "coarse_labels": long [N],
    "fine_names": [100 str], "coarse_names": [20 str]}``.
    """
    check_image_config(cfg)
    check_split_config(cfg)
    archive, downloaded = _ensure_archive(cfg)
    meta = {"version": _CACHE_VERSION, "image_size": cfg.image_size, "sources": file_signature(archive)}
    dirs = data_dirs(cfg, FOLDER)
    path = dirs.cache(f"cifar100-{cfg.image_size}px-v{_CACHE_VERSION}.pt")

    def build() -> dict:
        if cfg.md5 and not downloaded:  # a download was just checked; a copy put there by hand is checked once here
            check_md5(archive, cfg.md5, f"{_url(cfg)}, or data.md5='' to skip the check for a copy you trust")
        return _decode(archive, cfg.image_size)

    return cached(path, meta, build, "CIFAR-100", dirs)


def split_stores(cfg: Cifar100Config, data: dict, split_classes: dict[str, list[str]], split_name: str) -> dict[str, ClassStore]:
    """One ClassStore per split of ``data`` (from ``load_images``): the standard ``split_classes``, or the
    split the config's ``data.train``/``val``/``test``/``split_seed`` choose over the 100 fine classes.

    Classes keep CIFAR-100's (alphabetical) label order within a split, each grouped under its superclass
    (``ClassStore.class_groups``); ``split_name`` names the split in error messages (e.g. "CIFAR-FS").
    """
    names = data["fine_names"]
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for classes in split_classes.values() for name in classes if name not in index]
    if unknown:
        raise DataError(
            f"{archive_path(cfg)} has no class {unknown[0]!r} of the {split_name} split, so it is not CIFAR-100; "
            f"delete it and run again to download it afresh"
        )
    split_classes = choose_split(cfg, names, split_classes)
    counts = torch.bincount(data["fine_labels"], minlength=len(names))
    empty = [name for classes in split_classes.values() for name in classes if counts[index[name]] == 0]
    if empty:
        raise DataError(
            f"{archive_path(cfg)} holds no images of {len(empty)} class(es) of the {split_name} split "
            f"(first: {empty[0]}); the archive is incomplete: delete it and run again to download it afresh"
        )
    # Each fine class's superclass: the group of within-group episodes (FC100's hierarchy).
    coarse_of = dict(zip(data["fine_labels"].tolist(), data["coarse_labels"].tolist()))
    stores = {}
    for split, classes in split_classes.items():
        chosen = sorted(index[name] for name in classes)
        stores[split] = class_subset(data["images"], data["fine_labels"], data["fine_names"], chosen, MEAN, STD)
        stores[split].class_groups = [data["coarse_names"][coarse_of[c]] for c in chosen]
    return stores


def _url(cfg: Cifar100Config) -> str:
    return f"{cfg.base_url.rstrip('/')}/{ARCHIVE}"


def _ensure_archive(cfg: Cifar100Config) -> tuple[Path, bool]:
    """The archive's path, downloading it first if missing; and whether it was just downloaded."""
    archive = archive_path(cfg)
    return archive, fetch(archive, _url(cfg), cfg.download, cfg.md5, dirs=data_dirs(cfg, FOLDER))


def _decode(archive: Path, size: int) -> dict:
    try:
        pickles = _read_pickles(archive)
        train, test, meta = (pickles[name] for name in _PICKLES)
        fine_names = [text(name) for name in meta["fine_label_names"]]
        coarse_names = [text(name) for name in meta["coarse_label_names"]]
        flat = np.concatenate([_pixels(train), _pixels(test)])
        fine = torch.tensor(list(train["fine_labels"]) + list(test["fine_labels"]), dtype=torch.long)
        coarse = torch.tensor(list(train["coarse_labels"]) + list(test["coarse_labels"]), dtype=torch.long)
    except (tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile, pickle.UnpicklingError,
            KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(
            f"{archive} is corrupt or not the CIFAR-100 python archive ({type(e).__name__}: {first_line(e)}); "
            "delete it and run again to download it afresh"
        ) from None
    if not (len(fine) == len(coarse) == len(flat)) or len(fine_names) != 100 or len(coarse_names) != 20:
        raise DataError(
            f"{archive} does not hold CIFAR-100's 100 fine and 20 coarse classes with one label per image; "
            "delete it and run again to download it afresh"
        )
    if len(fine) and not (0 <= int(fine.min()) <= int(fine.max()) < 100 and 0 <= int(coarse.min()) <= int(coarse.max()) < 20):
        raise DataError(f"{archive} has labels out of range, so it is corrupt; delete it and run again to download it afresh")
    # Sorted by fine class, a split's classes (taken in label order) come out already grouped,
    # so building its ClassStore copies the images once, not twice.
    order = torch.argsort(fine, stable=True)
    images = torch.from_numpy(flat).view(-1, 3, NATIVE_SIZE, NATIVE_SIZE)[order]
    if size != NATIVE_SIZE:
        images = torch.cat([resize(chunk, size) for chunk in images.split(2048)])
    return {
        "images": images.contiguous(),
        "fine_labels": fine[order],
        "coarse_labels": coarse[order],
        "fine_names": fine_names,
        "coarse_names": coarse_names,
    }


def _read_pickles(archive: Path) -> dict[str, dict]:
    """The ``train``, ``test`` and ``meta`` pickles of the archive, read in one pass over it."""
    found = {}
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf:
            name = member.name.removeprefix("./")
            folder, _, base = name.rpartition("/")
            if folder == "cifar-100-python" and base in _PICKLES and member.isfile():
                with tf.extractfile(member) as f:
                    found[base] = DataUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    missing = [f"cifar-100-python/{name}" for name in _PICKLES if name not in found]
    if missing:
        raise DataError(
            f"{archive} has no {' or '.join(missing)} inside, so it is not the CIFAR-100 python archive; "
            "delete it and run again to download it afresh"
        )
    # Python 2 pickles read with latin1 give str keys; ones written by Python 3 may have bytes keys.
    return {name: {text(k): v for k, v in content.items()} for name, content in found.items()}


def _pixels(batch: dict) -> np.ndarray:
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * NATIVE_SIZE**2:
        raise ValueError(f"'data' is not a uint8 array [N, {3 * NATIVE_SIZE ** 2}]")
    return data


def read_split(filename: str, column: str) -> dict[str, list[str]]:
    """``{"train"|"val"|"test": [names]}`` from a split CSV in ``metalearn/data/splits/`` (columns split, ``column``)."""
    text = (resources.files("metalearn.data") / "splits" / filename).read_text()
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for row in csv.DictReader(line for line in text.splitlines() if not line.startswith("#")):
        split[row["split"]].append(row[column])
    return split
