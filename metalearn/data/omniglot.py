"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawings each.

Files live under ``<root>/omniglot/``: the official archives
``images_background.zip`` and ``images_evaluation.zip`` (downloaded, md5
checked, when missing) and their extracted folders
``<archive>/<Alphabet>/characterNN/*.png``. The first load decodes every PNG
once (Pillow, converted to greyscale and resized with BILINEAR filtering, which
on downsampling averages over the source pixels like torchvision's Resize on
PIL images) and caches the result as uint8 tensors with ink = 255 in
``<root>/omniglot/cache/``; later loads read only that file.

Classes are characters, named ``<Alphabet>/characterNN``. With ``rotations``
each character also gives three more classes, its drawings turned by 90, 180
and 270 degrees (Vinyals et al. 2016), named ``.../rot0`` .. ``.../rot270``.
Splits: ``vinyals``, the standard 1028/172/423 character split shipped in
``splits/omniglot_vinyals.csv``; or ``alphabets``, whole alphabets listed per
split, for any archives (e.g. the small background subsets).
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalearn.data import SPLITS
from metalearn.data.download import download, extract_zip
from metalearn.data.episodes import ClassStore
from metalearn.errors import ConfigError, DataError
from metalearn.fileio import atomic_torch_save

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
class Config:
    name: str = "omniglot"
    root: str = "~/.cache/metalearn"  # data root shared by all datasets; files go under <root>/omniglot/
    image_size: int = 28
    rotations: bool = True  # 0/90/180/270 rotations of each character as new classes (Vinyals et al.), applied in every split
    download: bool = True  # fetch missing official archives
    base_url: str = "https://github.com/brendenlake/omniglot/raw/master/python"  # a mirror may be given
    archives: list[str] = field(default_factory=lambda: ["images_background", "images_evaluation"])
    split: str = "vinyals"  # "vinyals" (1028/172/423 characters) or "alphabets"
    train_alphabets: list[str] = field(default_factory=list)  # used when split == "alphabets"
    val_alphabets: list[str] = field(default_factory=list)
    test_alphabets: list[str] = field(default_factory=list)


def load(cfg: Config) -> dict[str, ClassStore]:
    archives = list(cfg.archives)
    alphabets = {split: list(getattr(cfg, f"{split}_alphabets")) for split in SPLITS}
    _check_config(cfg, archives, alphabets)
    folder = Path(cfg.root).expanduser() / "omniglot"
    dirs = _ensure_archives(folder, archives, cfg)
    data = _load_images(folder, archives, dirs, cfg.image_size)
    keys = [tuple(key) for key in data["keys"]]
    if cfg.split == "vinyals":
        chars = _vinyals_characters(keys, folder)
    else:
        chars = _alphabet_characters(keys, alphabets)
    return {split: _store(data["images"], data["chars"], keys, chars[split], cfg.rotations) for split in SPLITS}


def sources(cfg: Config) -> list[Path]:
    """The archives this config reads: each zip, and its extracted folder."""
    folder = Path(cfg.root).expanduser() / "omniglot"
    return [p for name in cfg.archives for p in (folder / f"{name}.zip", folder / name)]


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.root).expanduser() / "omniglot" / "cache"


def vinyals_split() -> dict[str, dict[str, dict[str, list[str]]]]:
    """The Vinyals split as ``{split: {"background"|"evaluation": {alphabet: ["characterNN", ...]}}}``."""
    split = {name: {image_set: {} for image_set in _SET_ARCHIVE} for name in SPLITS}
    text = (resources.files("metalearn.data") / "splits" / "omniglot_vinyals.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    for row in rows:
        chars = [f"character{n:02d}" for n in range(int(row["first"]), int(row["last"]) + 1)]
        split[row["split"]][row["set"]][row["alphabet"]] = chars
    return split


def _check_config(cfg: Config, archives: list[str], alphabets: dict[str, list[str]]) -> None:
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
    if cfg.split == "vinyals":
        if sorted(archives) != sorted(OFFICIAL_MD5):
            raise ConfigError(
                f"split=vinyals needs data.archives={list(OFFICIAL_MD5)} (got {archives}); for other archives use data.split=alphabets"
            )
        for split, names in alphabets.items():
            if names:
                raise ConfigError(
                    f"data.{split}_alphabets is set but data.split=vinyals ignores it; add data.split=alphabets or leave the list empty"
                )
    elif cfg.split == "alphabets":
        for split, names in alphabets.items():
            if not names:
                raise ConfigError(
                    f"data.{split}_alphabets is empty; with data.split=alphabets list at least one alphabet for each of train, val and test"
                )
        seen: dict[str, str] = {}
        for split, names in alphabets.items():
            for name in names:
                if name in seen:
                    raise ConfigError(
                        f"alphabet {name!r} is in both data.{seen[name]}_alphabets and data.{split}_alphabets; "
                        "give each alphabet to one split only"
                    )
                seen[name] = split
    else:
        raise ConfigError(f"unknown data.split={cfg.split!r}; use vinyals or alphabets")


def _ensure_archives(folder: Path, archives: list[str], cfg: Config) -> list[Path]:
    """The extracted folders of ``archives``, downloading and extracting what is missing."""
    missing = [name for name in archives if not (folder / name).is_dir() and not (folder / f"{name}.zip").is_file()]
    if missing:
        zips = ", ".join(f"{name}.zip" for name in missing)
        if any(name not in OFFICIAL_MD5 for name in missing):
            raise DataError(
                f"Omniglot archive(s) {zips} not found in {folder}; put them there (only {' and '.join(OFFICIAL_MD5)} "
                "can be downloaded), or set data.root to the folder that holds omniglot/"
            )
        urls = [f"{cfg.base_url.rstrip('/')}/{name}.zip" for name in missing]
        if not cfg.download:
            raise DataError(
                f"Omniglot archive(s) {zips} not found in {folder} and data.download=false; "
                f"download {' and '.join(urls)} into that folder, or set data.download=true"
            )
        for name, url in zip(missing, urls):
            log.info("downloading %s", url)
            download(url, folder / f"{name}.zip", md5=OFFICIAL_MD5[name])
    dirs = []
    for name in archives:
        if not (folder / name).is_dir():
            log.info("extracting %s", folder / f"{name}.zip")
            extract_zip(folder / f"{name}.zip", folder / name, subdir=name)
        dirs.append(folder / name)
    return dirs


def _load_images(folder: Path, archives: list[str], dirs: list[Path], size: int) -> dict:
    """The cached images of all ``archives``, decoding the PNGs first if the cache is missing or stale."""
    meta = {
        "version": _CACHE_VERSION,
        "archives": archives,
        "image_size": size,
        # A re-extracted folder has a new mtime, so a cache of an older copy is not reused.
        "mtimes": [d.stat().st_mtime_ns for d in dirs],
    }
    path = folder / "cache" / f"{'+'.join(archives)}-{size}px-v{_CACHE_VERSION}.pt"
    try:
        data = torch.load(path, weights_only=True)
        if all(data.get(k) == v for k, v in meta.items()):
            return data
    except FileNotFoundError:
        pass
    except Exception as e:  # an unreadable cache is only a cache: rebuild it
        log.warning("Omniglot cache %s is unreadable (%s); rebuilding it", path, e)
    log.info("decoding Omniglot PNGs of %s into %s (once)", ", ".join(archives), path)
    data = {**meta, **_decode_archives(archives, dirs, size)}
    try:
        atomic_torch_save(data, path)
    except OSError as e:
        log.warning("cannot write Omniglot cache %s (%s); the next load will decode the PNGs again", path, e)
    return data


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
    # Threads overlap the many small file reads (slow on network or cold disks); the
    # decoding itself mostly holds the GIL, so more CPU cores barely speed it up.
    pool = ThreadPoolExecutor()
    try:
        arrays = list(pool.map(lambda paths: _decode_pngs(paths, size), files))
    finally:
        # Without cancel_futures, Ctrl-C would still wait for every queued character.
        pool.shutdown(cancel_futures=True)
    counts = torch.tensor([len(a) for a in arrays])
    return {
        "images": torch.from_numpy(np.concatenate(arrays)).unsqueeze(1),
        "chars": torch.repeat_interleave(torch.arange(len(keys)), counts),
        "keys": keys,
    }


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _decode_pngs(paths: list[Path], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                out[i] = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
        except (OSError, ValueError) as e:
            raise DataError(
                f"cannot read {path} ({e}); the extracted folder looks damaged: delete it and run again to re-extract"
            ) from None
    # The PNGs draw black ink on white; the rest of metalearn wants ink = 255 on 0.
    return 255 - out


def _vinyals_characters(keys: list[tuple[str, str, str]], folder: Path) -> dict[str, list[int]]:
    index = {key: i for i, key in enumerate(keys)}
    chars: dict[str, list[int]] = {}
    missing, total = [], 0
    for split, sets in vinyals_split().items():
        wanted = [(_SET_ARCHIVE[s], a, c) for s, alphabets in sets.items() for a, cs in alphabets.items() for c in cs]
        total += len(wanted)
        missing += [key for key in wanted if key not in index]
        chars[split] = [index[key] for key in wanted if key in index]
    if missing:
        raise DataError(
            f"{len(missing)} of the {total} characters of the Vinyals split are missing under {folder} "
            f"(first: {'/'.join(missing[0])}); the archives look incomplete: delete the "
            f"{' and '.join(_SET_ARCHIVE.values())} folders and .zip files there and run again to download them afresh"
        )
    return chars


def _alphabet_characters(keys: list[tuple[str, str, str]], alphabets: dict[str, list[str]]) -> dict[str, list[int]]:
    # An alphabet in several archives (e.g. Greek in both small subsets) comes from the first one.
    source: dict[str, str] = {}
    for archive, alphabet, _ in keys:
        source.setdefault(alphabet, archive)
    chars = {}
    for split, names in alphabets.items():
        unknown = [name for name in names if name not in source]
        if unknown:
            raise DataError(
                f"unknown alphabet(s) {', '.join(unknown)} in data.{split}_alphabets; available: {', '.join(sorted(source))}"
            )
        chosen = set(names)
        chars[split] = [i for i, (archive, alphabet, _) in enumerate(keys) if alphabet in chosen and source[alphabet] == archive]
    return chars


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
    if rotations:
        x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        y = torch.cat([y * 4 + k for k in range(4)])
        names = [f"{name}/rot{90 * k}" for name in names for k in range(4)]
    return ClassStore(x, y, names)
