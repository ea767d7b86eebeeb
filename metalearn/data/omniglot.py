"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawings each.

Files live under ``<root>/omniglot/``: the official archives
``images_background.zip`` and ``images_evaluation.zip`` (downloaded, md5
checked, when missing) and their extracted folders
``<archive>/<Alphabet>/characterNN/*.png``. The first load decodes every PNG
once (Pillow, converted to greyscale and resized with BILINEAR filtering, which
on downsampling averages over the source pixels like torchvision's Resize on
PIL images) and caches the result as uint8 tensors with ink = 255 in
``<root>/omniglot/cache/``; later loads read only that file. With
``data.cache_dir`` set, downloads, extracted folders and the cache go to
``<cache_dir>/omniglot/`` instead, and ``<root>/omniglot/`` is only read
(zips and extracted folders are looked for there first).

Classes are characters, named ``<Alphabet>/characterNN``; their group (within-group
episodes) is the alphabet. With ``rotations`` (true, or a list of splits) each character
also gives three more classes, its drawings turned by 90, 180 and 270 degrees (Vinyals
et al. 2016), named ``.../rot0`` .. ``.../rot270``.
An alphabet in several archives (Greek in both small subsets) is taken from the
first of ``data.archives`` that has it.

Split (``metalearn.data.common.choose_split``): ``data.train``/``val``/``test``
name alphabets or characters, or glob patterns over them (``Greek``,
``Greek/character0*``, ``*/character01``); all empty: with the two official
archives, the standard Vinyals split (1028/172/423 characters, shipped in
``splits/omniglot_vinyals.csv``); with other archives (which have no standard
split) or ``data.split_seed`` set, whole alphabets dealt at random by
``split_seed`` in the proportions ``data.ratios``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from metalearn.data import SPLITS
from metalearn.data.common import (
    DataDirs, SplitConfig, cached, check_split_config, choose_split, data_dirs, rotation_splits, uses_standard_split,
)
from metalearn.data.transforms import AugmentConfig, check_augment
from metalearn.data.download import download, extract_zip
from metalearn.data.episodes import ClassStore
from metalearn.data.images import PIL_BILINEAR, decode_array, decode_into
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# The split files name the archives by the set they hold.
_SET_ARCHIVE = {"background": "images_background", "evaluation": "images_evaluation"}
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1


@dataclass
class Config(SplitConfig):
    name: str = "omniglot"
    root: str = "~/.cache/metalearn"  # data root shared by all datasets; files go under <root>/omniglot/
    cache_dir: Optional[str] = None  # where downloads, extracted archives and the cache go (<cache_dir>/omniglot/); null: the root
    image_size: int = 28
    # 0/90/180/270 rotations of each character as new classes (Vinyals et al.): true (every split) | false |
    # a list of splits, e.g. [train]
    rotations: Any = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training-episode augmentation (affine: Koch et al.)
    download: bool = True  # fetch missing official archives
    base_url: str = "https://github.com/brendenlake/omniglot/raw/master/python"  # a mirror may be given
    archives: list[str] = field(default_factory=lambda: ["images_background", "images_evaluation"])
    # The split: data.train/val/test (alphabets, characters or patterns), data.split_seed, data.ratios (SplitConfig).


def load(cfg: Config) -> dict[str, ClassStore]:
    archives = list(cfg.archives)
    _check_config(cfg, archives)
    dirs = data_dirs(cfg, "omniglot")
    folders = _ensure_archives(dirs, archives, cfg)
    data = _load_images(dirs, archives, folders, cfg.image_size)
    keys = [tuple(key) for key in data["keys"]]
    names, key_of = _character_names(keys)
    official = sorted(archives) == sorted(OFFICIAL_MD5)
    standard = vinyals_names() if official else None
    if standard is not None and uses_standard_split(cfg):
        _check_vinyals(set(names), dirs)
    chosen = choose_split(cfg, names, standard, what="character", deal_level=1)
    rotated = rotation_splits(cfg.rotations)
    return {split: _store(data["images"], data["chars"], keys, [key_of[n] for n in chosen[split]], split in rotated)
            for split in SPLITS}


def sources(cfg: Config) -> list[Path]:
    """The archives this config reads: each zip, and its extracted folder (under the root, else the cache dir)."""
    dirs = data_dirs(cfg, "omniglot")
    return [p for name in cfg.archives for p in (dirs.find(f"{name}.zip"), dirs.find(name))]


def cache_dir(cfg: Config) -> Path:
    return data_dirs(cfg, "omniglot").out / "cache"


def vinyals_split() -> dict[str, dict[str, dict[str, list[str]]]]:
    """The Vinyals split as ``{split: {"background"|"evaluation": {alphabet: ["characterNN", ...]}}}``."""
    split = {name: {image_set: {} for image_set in _SET_ARCHIVE} for name in SPLITS}
    text = (resources.files("metalearn.data") / "splits" / "omniglot_vinyals.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    for row in rows:
        chars = [f"character{n:02d}" for n in range(int(row["first"]), int(row["last"]) + 1)]
        split[row["split"]][row["set"]][row["alphabet"]] = chars
    return split


def vinyals_names() -> dict[str, list[str]]:
    """The Vinyals split as character names (``Alphabet/characterNN``), in the split file's order."""
    return {split: [f"{alphabet}/{char}" for sets in vinyals_split()[split].values()
                    for alphabet, chars in sets.items() for char in chars] for split in SPLITS}


def _character_names(keys: list[tuple[str, str, str]]) -> tuple[list[str], dict[str, int]]:
    """The characters' names in the cache's order, each alphabet from the first archive that has it,
    and the index in ``keys`` of each name."""
    source: dict[str, str] = {}
    for archive, alphabet, _ in keys:
        source.setdefault(alphabet, archive)
    key_of = {f"{alphabet}/{char}": i for i, (archive, alphabet, char) in enumerate(keys) if source[alphabet] == archive}
    return list(key_of), key_of


def _check_vinyals(present: set[str], dirs: DataDirs) -> None:
    """The Vinyals split, when used, must be complete: a missing character means incomplete archives."""
    wanted = [(_SET_ARCHIVE[image_set], f"{alphabet}/{char}") for sets in vinyals_split().values()
              for image_set, alphabets in sets.items() for alphabet, chars in alphabets.items() for char in chars]
    missing = [f"{archive}/{name}" for archive, name in wanted if name not in present]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(wanted)} characters of the Vinyals split are missing under {dirs.root} "
            f"(first: {missing[0]}); the archives look incomplete: delete the "
            f"{' and '.join(_SET_ARCHIVE.values())} folders and .zip files there and run again to download them afresh"
        )


def _check_config(cfg: Config, archives: list[str]) -> None:
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1 (got {cfg.image_size})")
    if not archives:
        raise ConfigError(f"data.archives is empty; list the Omniglot archives to use, e.g. {list(OFFICIAL_MD5)}")
    for name in archives:
        if not name or name != Path(name).name or name.startswith("."):
            raise ConfigError(
                f"data.archives entry {name!r} is not a plain archive name; give names like images_background (no folders, no .zip)"
            )
    if len(set(archives)) != len(archives):
        raise ConfigError(f"data.archives lists an archive twice ({archives}); list each once")
    check_split_config(cfg)
    rotation_splits(cfg.rotations)
    check_augment(cfg.augment)


def _ensure_archives(dirs: DataDirs, archives: list[str], cfg: Config) -> list[Path]:
    """The extracted folders of ``archives`` (under the root, else the cache dir), downloading and
    extracting what is missing into the cache dir."""
    missing = [name for name in archives if not dirs.find(name).is_dir() and not dirs.find(f"{name}.zip").is_file()]
    folder = f"{dirs.root} (nor in {dirs.out})" if dirs.separate else str(dirs.root)
    if missing:
        zips = ", ".join(f"{name}.zip" for name in missing)
        if any(name not in OFFICIAL_MD5 for name in missing):
            raise DataError(
                f"Omniglot archive(s) {zips} not found in {folder}; put them in {dirs.root} (only {' and '.join(OFFICIAL_MD5)} "
                "can be downloaded), or set data.root to the folder that holds omniglot/"
            )
        urls = [f"{cfg.base_url.rstrip('/')}/{name}.zip" for name in missing]
        if not cfg.download:
            raise DataError(
                f"Omniglot archive(s) {zips} not found in {folder} and data.download=false; "
                f"download {' and '.join(urls)} into {dirs.root}, or set data.download=true"
            )
        dirs.ensure_writable(dirs.out, "the Omniglot downloads")
        for name, url in zip(missing, urls):
            log.info("downloading %s", url)
            download(url, dirs.out / f"{name}.zip", md5=OFFICIAL_MD5[name])
    folders = []
    for name in archives:
        extracted = dirs.find(name)
        if not extracted.is_dir():
            archive, extracted = dirs.find(f"{name}.zip"), dirs.out / name
            dirs.ensure_writable(dirs.out, f"the extracted {archive.name}")
            log.info("extracting %s into %s", archive, extracted)
            extract_zip(archive, extracted, subdir=name)
        folders.append(extracted)
    return folders


def _load_images(dirs: DataDirs, archives: list[str], folders: list[Path], size: int) -> dict:
    """The cached images of all ``archives``, decoding the PNGs first if the cache is missing or stale
    (a current cache under the data root is read first; a new one is written to the cache dir)."""
    meta = {
        "version": _CACHE_VERSION,
        "archives": archives,
        "image_size": size,
        # A re-extracted folder has a new mtime, so a cache of an older copy is not reused.
        "mtimes": [d.stat().st_mtime_ns for d in folders],
    }
    path = dirs.cache(f"{'+'.join(archives)}-{size}px-v{_CACHE_VERSION}.pt")
    return cached(path, meta, lambda: _decode_archives(archives, folders, size), "Omniglot", dirs)


def _decode_archives(archives: list[str], dirs: list[Path], size: int) -> dict:
    keys, files = [], []
    for name, root in zip(archives, dirs):
        for alphabet in _subdirs(root):
            for char in _subdirs(alphabet):
                keys.append([name, alphabet.name, char.name])
                files.append(sorted(p for p in char.iterdir() if p.suffix == ".png"))
    if not keys:
        raise DataError(
            f"no <Alphabet>/characterNN folders found in {', '.join(map(str, dirs))}; delete them and run again to re-extract"
        )
    counts = torch.tensor([len(paths) for paths in files])
    return {
        "images": _decode_pngs([p for paths in files for p in paths], size),
        "chars": torch.repeat_interleave(torch.arange(len(keys)), counts),
        "keys": keys,
    }


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _decode_pngs(paths: list[Path], size: int) -> torch.Tensor:
    """The PNGs as uint8 [N, 1, size, size]: greyscale, BILINEAR-resized, decoded on threads, in order."""
    def one(path: Path, row: np.ndarray) -> None:
        # The PNGs draw black ink on white; the rest of metalearn wants ink = 255 on 0, hence invert.
        decode_array(path, mode="L", size=size, resample=PIL_BILINEAR, invert=True, out=row, error=lambda e: (
            f"cannot read {path} ({e}); the extracted folder looks damaged: delete it and run again to re-extract"))

    return decode_into(torch.empty(len(paths), 1, size, size, dtype=torch.uint8), one, paths)


def _store(
    images: torch.Tensor, image_chars: torch.Tensor, keys: list[tuple[str, str, str]], chars: list[int], rotations: bool
) -> ClassStore:
    """The ClassStore of characters ``chars`` (indices into ``keys``), class i being chars[i]."""
    label_of = torch.full((len(keys),), -1, dtype=torch.long)
    label_of[chars] = torch.arange(len(chars))
    labels = label_of[image_chars]
    keep = labels >= 0
    x, y = images[keep], labels[keep]
    names = [f"{keys[c][1]}/{keys[c][2]}" for c in chars]
    if rotations:  # stored turned (small images): the torchmeta/learn2learn layers read these stores directly
        x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        y = torch.cat([y * 4 + k for k in range(4)])
        names = [f"{name}/rot{90 * k}" for name in names for k in range(4)]
    store = ClassStore(x, y, names)
    store.rotated = rotations
    return store
