"""MNIST (LeCun et al. 1998) as a few-shot demo: the 10 digits are the classes.

Files live under ``<root>/mnist/``: the four official IDX files
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (downloaded from
``base_url`` when missing, md5 checked as torchvision checks them). They are parsed
here (IDX: a big-endian magic number ``0x0803`` for images / ``0x0801`` for labels,
then one big-endian uint32 per dimension, then uint8 data) and cached as uint8
tensors in ``<root>/mnist/cache/mnist-v<N>.pt``, rebuilt when the files change.

Few-shot splits are by class, so a class uses all its images, from the training and
the test file alike (about 7000 per digit). Classes are named "0" .. "9". The standard
split is digits 0-5 for training, 6-7 for validation and 8-9 for testing: with 2
classes in val and test, episodes are at most 2-way (``ways=2``); ``data.train``/``val``/``test``
(e.g. ``[0,1,2,3]``, ``[4,5,6]``, ``[7,8,9]``) or ``data.split_seed`` give others
(``metalearn.data.common.choose_split``). With ``data.cache_dir`` set, downloads and the
cache go to ``<cache_dir>/mnist/``. MNIST's ink is already 255 on 0.

``doublemnist`` builds on the same files; ``digits`` below is what it reads.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from metalearn.data.common import (
    ImageConfig, cached, check_image_config, check_split_config, choose_split, class_subset, data_dirs, file_signature,
    split_indices,
)
from metalearn.data.download import check_md5, download
from metalearn.data.episodes import ClassStore
from metalearn.data.images import resize
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FOLDER = "mnist"  # under the data root; doublemnist reads the same files
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The md5 sums torchvision checks (datasets.MNIST.resources).
OFFICIAL_MD5 = {
    "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
    "test_images": "9fb629c4189551a2d022fa330f9573f3",
    "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
}
# yann.lecun.com often refuses downloads; this is torchvision's first mirror.
OFFICIAL_URL = "https://ossci-datasets.s3.amazonaws.com/mnist"
# The usual normalisation of MNIST (its 60000 training images, on the [0, 1] scale).
MEAN = (0.1307,)
STD = (0.3081,)
NATIVE_SIZE = 28
# IDX magic numbers: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions.
_IDX_UBYTE = 0x08
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1
CLASSES = [str(d) for d in range(10)]
STANDARD_SPLIT = {"train": ["0", "1", "2", "3", "4", "5"], "val": ["6", "7"], "test": ["8", "9"]}


@dataclass
class Config(ImageConfig):
    name: str = "mnist"
    image_size: int = NATIVE_SIZE  # other sizes are resized (antialiased bilinear) on load
    base_url: str = OFFICIAL_URL  # the folder holding the four .gz files; a mirror may be given
    # md5 of each file, checked after download and before the first decoding; "" skips a file's check.
    md5: dict[str, str] = field(default_factory=lambda: dict(OFFICIAL_MD5))


class MnistSource(Protocol):
    """The options ``digits`` reads; every MNIST-based dataset's Config has them."""

    root: str
    cache_dir: str | None
    download: bool
    base_url: str
    md5: dict[str, str]


def load(cfg: Config) -> dict[str, ClassStore]:
    check_image_config(cfg)
    check_split_config(cfg)
    splits = split_indices(CLASSES, choose_split(cfg, CLASSES, STANDARD_SPLIT, what="digit"))  # before any file is read
    data = digits(cfg)
    images = data["images"]
    if cfg.image_size != images.shape[-1] or cfg.image_size != images.shape[-2]:
        images = torch.cat([resize(chunk, cfg.image_size) for chunk in images.split(4096)])
    return {split: class_subset(images, data["labels"], CLASSES, classes, MEAN, STD) for split, classes in splits.items()}


def sources(cfg: MnistSource) -> list[Path]:
    """The raw files the loader reads (under the root, else the cache dir, where missing ones are downloaded)."""
    dirs = data_dirs(cfg, FOLDER)
    return [dirs.find(name) for name in FILES.values()]


def digits(cfg: MnistSource) -> dict:
    """All 70000 MNIST digits, training and test files together, from the cache when it is current.

    ``{"images": uint8 [N, 1, 28, 28], "labels": long [N]}`` in the files' order, training file first.
    Missing files are downloaded first (if ``cfg.download``).
    """
    _check_md5_keys(cfg.md5)
    paths, downloaded = _ensure_files(cfg)
    meta = {"version": _CACHE_VERSION, "sources": file_signature(*paths.values())}
    dirs = data_dirs(cfg, FOLDER)
    path = dirs.cache(f"mnist-v{_CACHE_VERSION}.pt")

    def build() -> dict:
        for key, file in paths.items():
            # A download was just checked; a copy put there by hand is checked once, here.
            if cfg.md5[key] and key not in downloaded:
                check_md5(file, cfg.md5[key], f"{_url(cfg, key)}, or data.md5.{key}='' to skip the check for a copy you trust")
        parts = [_read_pair(paths[f"{part}_images"], paths[f"{part}_labels"]) for part in ("train", "test")]
        if parts[0][0].shape[1:] != parts[1][0].shape[1:]:
            raise DataError(
                f"the MNIST training and test images under {paths['train_images'].parent} differ in size "
                f"({parts[0][0].shape[1:]} vs {parts[1][0].shape[1:]}); they are from different datasets: "
                "delete them and run again to download them afresh"
            )
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return {"images": torch.from_numpy(images).unsqueeze(1), "labels": torch.from_numpy(labels.astype(np.int64))}

    return cached(path, meta, build, "MNIST", dirs)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of the gzipped IDX file ``path``, which must have ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is not a readable gzip file ({e}); delete it and run again to download it afresh") from None
    header = 4 + 4 * ndim
    expected = _IDX_UBYTE << 8 | ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic != expected:
        raise DataError(
            f"{path} is not an IDX file of {ndim}-d uint8 data (magic number {magic:#010x}, expected {expected:#010x}); "
            "delete it and run again to download it afresh"
        )
    if len(data) < header:
        raise DataError(f"{path} ends inside its IDX header ({len(data)} bytes); delete it and run again to download it afresh")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != size:
        raise DataError(
            f"{path} holds {len(data) - header} bytes of data but its IDX header promises {size} "
            f"(dimensions {'x'.join(map(str, shape))}); it is truncated or corrupt: delete it and run again to download it afresh"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path.name} holds {len(images)} images but {labels_path.name} holds {len(labels)} labels; "
            f"the files in {images_path.parent} do not belong together: delete them and run again to download them afresh"
        )
    if len(labels) and labels.max() > 9:
        raise DataError(
            f"{labels_path} has label {labels.max()}, but MNIST labels are digits 0-9; "
            "delete it and run again to download it afresh"
        )
    return images, labels


def _url(cfg: MnistSource, key: str) -> str:
    return f"{cfg.base_url.rstrip('/')}/{FILES[key]}"


def _check_md5_keys(md5: dict[str, str]) -> None:
    if set(md5) != set(FILES):
        raise ConfigError(
            f"data.md5 must give exactly the keys {', '.join(FILES)} (got {', '.join(md5) or 'none'}); "
            "set a key to '' to skip that file's check"
        )


def _ensure_files(cfg: MnistSource) -> tuple[dict[str, Path], set[str]]:
    """The path of each of the four files, downloading the missing ones; and the keys just downloaded."""
    dirs = data_dirs(cfg, FOLDER)
    paths = {key: dirs.find(name) for key, name in FILES.items()}
    missing = [key for key, path in paths.items() if not path.is_file()]
    if missing and not cfg.download:
        folder = f"{dirs.root} (nor in {dirs.out})" if dirs.separate else str(dirs.root)
        raise DataError(
            f"MNIST file(s) {', '.join(FILES[k] for k in missing)} not found in {folder} and data.download=false; "
            f"download them from {cfg.base_url.rstrip('/')}/ into {dirs.root}, or set data.download=true"
        )
    if missing:
        dirs.ensure_writable(dirs.out, "the MNIST downloads")
    for key in missing:
        log.info("downloading %s", _url(cfg, key))
        download(_url(cfg, key), paths[key], md5=cfg.md5[key] or None)
    return paths, set(missing)

