"""CUB-200-2011 (Wah et al. 2011): 11,788 photos of 200 North American bird species.

The few-shot split is the standard one of Chen et al. ("A Closer Look at Few-shot
Classification", ICLR 2019, ``filelists/CUB/write_CUB_filelist.py``): with the 200 classes in
order (0-based index i = class id - 1 of ``classes.txt``, the order of the sorted class folders),
train takes i % 2 == 0, val i % 4 == 1 and test i % 4 == 3: 100 / 50 / 50 classes with all
their images. Classes are named as in ``classes.txt`` (``001.Black_footed_Albatross``);
``data.train``/``val``/``test`` (names or patterns such as ``"0[0-4]?.*"``) or
``data.split_seed`` give other splits (``metalearn.data.common.choose_split``).

Files live under ``<root>/cub/``: the official archive ``CUB_200_2011.tgz`` (downloaded, md5
checked, when missing, and kept). ``CUB_200_2011/classes.txt``, ``CUB_200_2011/images.txt``
and the JPEGs ``CUB_200_2011/images/<NNN.Name>/<file>.jpg`` it lists are read straight out of
the archive, without extracting. The first load decodes every JPEG once (Pillow, greyscale
and other modes converted to RGB) and caches uint8 tensors in ``<root>/cub/cache/``; later
loads read only that file, rebuilt when the archive changes. With ``data.cache_dir`` set,
the download and the cache go to ``<cache_dir>/cub/`` (an archive under the root is read from there).

Resizing: the whole image is resized to ``image_size`` x ``image_size`` (aspect ratio not
kept, BILINEAR filtering, which averages over the source pixels when shrinking), the common
practice of the few-shot code bases that pre-resize CUB. ``crop_margin`` > 1 instead resizes
to ``int(image_size * crop_margin)`` square and keeps the central ``image_size`` square:
1.15 gives Chen et al.'s evaluation preprocessing (Scale to 96x96, CenterCrop 84).
Normalisation uses ImageNet's per-channel mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
0.225), as Chen et al. do.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from metalearn.data.common import (
    ImageConfig, cached, check_image_config, check_split_config, choose_split, class_subset, data_dirs, fetch,
    file_signature, first_line, split_indices,
)
from metalearn.data.download import check_md5
from metalearn.data.episodes import ClassStore
from metalearn.data.images import PIL_BILINEAR, decode_array, decode_many
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ARCHIVE = "CUB_200_2011.tgz"
OFFICIAL_URL = "https://data.caltech.edu/records/65de6-vp158/files"  # CaltechDATA, linked from the dataset page
OFFICIAL_MD5 = "97eceeb196236b17998738112f37df78"
TOP = "CUB_200_2011"  # the archive's top folder
NUM_CLASSES = 200
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1


@dataclass
class Config(ImageConfig):
    name: str = "cub"
    image_size: int = 84
    base_url: str = OFFICIAL_URL  # the folder holding CUB_200_2011.tgz; a mirror may be given
    md5: str = OFFICIAL_MD5  # of the archive, checked after download and before decoding; "" skips the check
    crop_margin: float = 1.0  # 1: resize the whole image; >1: resize to image_size*crop_margin, keep the centre


def load(cfg: Config) -> dict[str, ClassStore]:
    check_image_config(cfg)
    check_split_config(cfg)
    if not 1.0 <= cfg.crop_margin <= 4.0:
        raise ConfigError(f"data.crop_margin must be in [1, 4] (got {cfg.crop_margin}); 1 resizes the whole image")
    archive, downloaded = _ensure_archive(cfg)
    margin = f"-crop{cfg.crop_margin:g}" if cfg.crop_margin != 1.0 else ""
    dirs = data_dirs(cfg)
    path = dirs.cache(f"cub-{cfg.image_size}px{margin}-v{_CACHE_VERSION}.pt")
    meta = {
        "version": _CACHE_VERSION,
        "image_size": cfg.image_size,
        "crop_margin": float(cfg.crop_margin),
        "sources": file_signature(archive),
    }

    def build() -> dict:
        if cfg.md5 and not downloaded:  # a download was just checked; a copy put there by hand is checked once here
            check_md5(archive, cfg.md5, f"{_url(cfg)}, or data.md5='' to skip the check for a copy you trust")
        return _decode(archive, cfg.image_size, cfg.crop_margin)

    data = cached(path, meta, build, "CUB", dirs)
    names = list(data["class_names"])
    standard = {split: [names[i] for i in classes] for split, classes in chen_split().items()}
    chosen = split_indices(names, choose_split(cfg, names, standard))
    return {split: class_subset(data["images"], data["labels"], names, classes, IMAGENET_MEAN, IMAGENET_STD) for split, classes in chosen.items()}


def sources(cfg: Config) -> list[Path]:
    """The raw files the loader reads (under the root, else the cache dir, where a missing one is downloaded)."""
    return [data_dirs(cfg).find(ARCHIVE)]


def chen_split() -> dict[str, list[int]]:
    """``{"train"|"val"|"test": [0-based class indices]}`` of Chen et al.'s 100/50/50 split."""
    indices = range(NUM_CLASSES)
    return {
        "train": [i for i in indices if i % 2 == 0],
        "val": [i for i in indices if i % 4 == 1],
        "test": [i for i in indices if i % 4 == 3],
    }


def _url(cfg: Config) -> str:
    return f"{cfg.base_url.rstrip('/')}/{ARCHIVE}"


def _ensure_archive(cfg: Config) -> tuple[Path, bool]:
    """The archive's path, downloading it first if missing; and whether it was just downloaded."""
    dirs = data_dirs(cfg)
    archive = dirs.find(ARCHIVE)
    return archive, fetch(archive, _url(cfg), cfg.download, cfg.md5, " (1.1 GB)", dirs=dirs)


def _decode(archive: Path, size: int, margin: float) -> dict:
    """Every image listed in images.txt, decoded: images [N, 3, size, size] sorted by class, labels, class names."""
    texts, decoded = _read_archive(archive, size, margin)
    class_names = _parse_classes(texts["classes.txt"], archive)
    folder_class = {name: i for i, name in enumerate(class_names)}
    listed = _parse_listing(texts["images.txt"], archive)
    missing = [path for path in listed if path not in decoded]
    if missing:
        raise DataError(
            f"{archive} lacks {len(missing)} of the {len(listed)} images listed in images.txt (first: {missing[0]}); "
            "the archive is incomplete: delete it and run again to download it afresh"
        )
    labels = []
    for path in listed:
        folder = path.split("/")[0]
        if folder not in folder_class:
            raise DataError(f"{archive}: image {path} is in no class of classes.txt, so the archive is corrupt; "
                            "delete it and run again to download it afresh")
        labels.append(folder_class[folder])
    labels = torch.tensor(labels, dtype=torch.long)
    empty = [class_names[c] for c, n in enumerate(torch.bincount(labels, minlength=NUM_CLASSES).tolist()) if n == 0]
    if empty:
        raise DataError(
            f"{archive} holds no images of {len(empty)} class(es) (first: {empty[0]}); "
            "the archive is incomplete: delete it and run again to download it afresh"
        )
    images = torch.from_numpy(np.stack([decoded[path] for path in listed]))
    # Sorted by class, a split's classes (taken in order) come out already grouped, so
    # building its ClassStore copies the images once, not twice.
    order = torch.argsort(labels, stable=True)
    return {"images": images[order].contiguous(), "labels": labels[order], "class_names": class_names}


def _read_archive(archive: Path, size: int, margin: float) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """One pass over the archive: the text files we need, and every JPEG under images/, decoded.

    JPEGs are keyed by their path under images/ (``<NNN.Name>/<file>.jpg``), as images.txt lists them.
    """
    texts: dict[str, str] = {}

    def jpegs() -> Iterator[tuple[str, bytes]]:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                name = member.name.removeprefix("./")
                if not member.isfile() or not name.startswith(f"{TOP}/"):
                    continue
                relative = name[len(TOP) + 1 :]
                if relative in ("classes.txt", "images.txt"):
                    with tf.extractfile(member) as f:
                        texts[relative] = f.read().decode("utf-8")
                elif relative.startswith("images/") and relative.lower().endswith(".jpg"):
                    with tf.extractfile(member) as f:
                        data = f.read()
                    yield relative[len("images/") :], data

    def one(item: tuple[str, bytes]) -> tuple[str, np.ndarray]:
        path, data = item
        return path, _decode_jpeg(data, size, margin, f"{archive}:{TOP}/images/{path}")

    try:
        # Decoded on threads while the archive is read on; only a window of JPEGs is held at a time.
        decoded = dict(decode_many(one, jpegs()))
    except (tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise DataError(
            f"{archive} is corrupt ({type(e).__name__}: {first_line(e)}); delete it and run again to download it afresh"
        ) from None
    missing = [f"{TOP}/{name}" for name in ("classes.txt", "images.txt") if name not in texts]
    if missing:
        raise DataError(
            f"{archive} has no {' or '.join(missing)} inside, so it is not CUB_200_2011.tgz; "
            "delete it and run again to download it afresh"
        )
    return texts, decoded


def _decode_jpeg(data: bytes, size: int, margin: float, where: str) -> np.ndarray:
    """One JPEG as uint8 [3, size, size]: RGB (some CUB photos are greyscale), resized whole with
    BILINEAR (margin 1) or resized larger and centre-cropped."""
    return decode_array(data, mode="RGB", size=size, resample=PIL_BILINEAR, crop_margin=margin, error=lambda e: (
        f"cannot decode {where} ({first_line(e)}); the archive is damaged: delete it and run again"))


def _parse_classes(text: str, archive: Path) -> list[str]:
    """classes.txt (``<id> <NNN.Name>`` lines) as the names of class ids 1..200, in order."""
    rows = [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]
    try:
        by_id = {int(i): name.strip() for i, name in rows}
    except ValueError:
        by_id = {}
    if sorted(by_id) != list(range(1, NUM_CLASSES + 1)) or len(rows) != NUM_CLASSES:
        raise DataError(
            f"{archive}: {TOP}/classes.txt does not list class ids 1..{NUM_CLASSES} once each, so this is not "
            "CUB-200-2011 (the split is defined on its 200 classes); delete it and run again to download it afresh"
        )
    return [by_id[i] for i in range(1, NUM_CLASSES + 1)]


def _parse_listing(text: str, archive: Path) -> list[str]:
    """images.txt (``<image id> <NNN.Name>/<file>.jpg`` lines) as the image paths, in image id order."""
    try:
        rows = sorted((int(i), path.strip()) for i, path in (line.split(maxsplit=1) for line in text.splitlines() if line.strip()))
    except ValueError:
        raise DataError(
            f"{archive}: {TOP}/images.txt is not '<id> <path>' lines, so the archive is corrupt; "
            "delete it and run again to download it afresh"
        ) from None
    return [path for _, path in rows]
