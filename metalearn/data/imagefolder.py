"""imagefolder: bring your own data, one folder of images per class.

Reads the tree at ``path`` (absolute, or relative to the directory metalearn was started
in). Every leaf folder (one without subfolders) that holds images is a class, named by
its path relative to ``path``: ``Greek/character01`` in an Omniglot-like tree, ``cat``
in a flat one. Images are the files ending in .png, .jpg, .jpeg, .bmp, .gif or .webp
(any case; a GIF's first frame). Names starting with "." or "__" (hidden files,
``__MACOSX``) are skipped; image files in folders that also have subfolders are ignored.

The split (``metalearn.data.common.choose_split``, as for every dataset) is either three
lists, ``train``, ``val`` and ``test``, whose entries are folders relative to ``path`` or
glob patterns (``*``, ``?``, ``[..]``, matched one folder level at a time), each taking
every class at or below the folders it names (``Greek``: all of Greek's characters;
``Greek/character0*``; ``*/character01``), or, when those lists are empty (there is no
standard split), ``ratios`` of the classes, dealt at random by ``split_seed`` (null: 0).

Each image is decoded once with Pillow, converted to greyscale (``channels: 1``) or RGB
(``channels: 3``), resized to ``image_size`` x ``image_size`` (BILINEAR, which averages
on downsampling; the aspect ratio is not kept) and, with ``invert``, flipped to 255 - x
(for dark ink on white, such as Omniglot, so that ink is 255 as in metalearn's other
character datasets). The result is cached as uint8 tensors in
``<root>/imagefolder/cache/`` (``<cache_dir>/imagefolder/cache/`` with ``data.cache_dir``
set; nothing is ever written inside ``path``), one file per folder, image size, channels and invert
setting, rebuilt when any image file's name, size or mtime changes. The cache also keeps
each class's channel mean and std, from which the training split's are pooled.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalearn.data.common import (
    ImageConfig, cached, check_image_config, check_split_config, choose_split, data_dirs, split_indices,
)
from metalearn.data.episodes import ClassStore
from metalearn.data.images import PIL_BILINEAR, decode_array, decode_into
from metalearn.data.transforms import channel_stats
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1
_SHOWN = 10  # small classes named in an error message; the log line names them all


@dataclass
class Config(ImageConfig):
    name: str = "imagefolder"
    download: bool = False  # your own files: nothing is ever downloaded
    path: str = ""  # the folder whose leaf subfolders are the classes; made absolute when the config is built
    channels: int = 3  # 1: greyscale, 3: RGB
    invert: bool = False  # 255 - x after decoding: for dark ink on a white background (e.g. Omniglot)
    # The split (SplitConfig): train/val/test are folders or glob patterns relative to path, each taking every
    # class at or below them; all empty: the classes dealt at random by split_seed (null: 0) in ratios.

    def __post_init__(self):
        # Resolved once, as the config is built: relative to where metalearn was started (not
        # Hydra's run directory), and recorded absolute in the run's config, so resume and
        # `metalearn eval` from another directory find the same folder.
        if self.path:
            self.path = _absolute(self.path)


def load(cfg: Config) -> dict[str, ClassStore]:
    folder = _check_config(cfg)
    data = _decoded(cfg, folder)
    names = list(data["class_names"])
    chosen = split_indices(names, choose_split(cfg, names, None, where=f"under {folder}"))
    counts = torch.bincount(data["labels"], minlength=len(names))
    offsets = torch.cumsum(counts, 0) - counts
    mean, std = pooled_stats(data["class_mean"], data["class_std"], counts, chosen["train"])
    stores = {}
    for split, classes in chosen.items():
        # The cache is sorted by class, so a split is its classes' slices, copied once.
        images = torch.cat([data["images"][offsets[c] : offsets[c] + counts[c]] for c in classes])
        labels = torch.arange(len(classes)).repeat_interleave(counts[classes])
        stores[split] = FolderClassStore(images, labels, [names[c] for c in classes], mean=mean, std=std, folder=folder)
    unused = len(names) - sum(len(c) for c in chosen.values())
    if unused:
        log.info("%d of the %d classes under %s are in no split", unused, len(names), folder)
    return stores


def sources(cfg: Config) -> list[Path]:
    """The folder the loader reads."""
    return [Path(_absolute(cfg.path))] if cfg.path else []


def cache_dir(cfg: Config) -> Path:
    """Where the decoded images are cached: under the cache dir (or the data root), never inside the user's tree."""
    return data_dirs(cfg).out / "cache"


class FolderClassStore(ClassStore):
    """A ClassStore that, when some classes are too small for the episodes, names them all.

    The error names the first few (it stays one line); a log line lists every one, with
    its image count, so a tree with many small folders can be fixed in one go.
    """

    def __init__(self, *args, folder: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.folder = folder

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        need = shots + queries
        if shots >= 1 and queries >= 1 and ways <= self.num_classes:
            small = [(n, int(c)) for n, c in zip(self.class_names, self.counts.tolist()) if c < need]
            if small:
                listed = ", ".join(f"{n} ({c})" for n, c in small)
                log.error("classes of the %s split under %s with fewer than shots+queries=%d images: %s",
                          split, self.folder, need, listed)
                shown = ", ".join(f"{n} ({c})" for n, c in small[:_SHOWN])
                more = f" and {len(small) - _SHOWN} more (all in the log)" if len(small) > _SHOWN else ""
                raise DataError(
                    f"{len(small)} of the {self.num_classes} classes of the {split} split have fewer than "
                    f"shots+queries={need} images: {shown}{more}; add images to those folders under {self.folder}, "
                    f"leave them out of data.{split}, or lower shots/queries"
                )
        super().check_episode(split, ways, shots, queries)


def class_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ([C] float64, [0, 1] scale) of one class's uint8 images [n, C, H, W]."""
    mean, std = channel_stats(images)
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)


def pooled_stats(means: torch.Tensor, stds: torch.Tensor, counts: torch.Tensor,
                 classes: list[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std over all images of ``classes``, from each class's [K, C] stats and image counts.

    Caching per-class statistics lets any split's be had without reading its images again.
    """
    weights = counts[classes].to(torch.float64)[:, None]
    total = weights.sum()
    mean = (weights * means[classes]).sum(0) / total
    second = (weights * (stds[classes].square() + means[classes].square())).sum(0) / total
    std = (second - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def find_classes(folder: Path) -> dict[str, list[Path]]:
    """Every leaf folder under ``folder`` that holds images: class name -> its image files, sorted by name."""
    classes: dict[str, list[Path]] = {}
    empty: list[str] = []
    skipped: list[Path] = []
    seen: set[str] = set()

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen:  # a symlink back up the tree
            return
        seen.add(real)
        try:
            entries = sorted(p for p in directory.iterdir() if not p.name.startswith((".", "__")))
        except OSError as e:
            raise DataError(f"cannot list {directory} ({e}); make it readable or leave it out of data.path") from None
        subdirs = [p for p in entries if p.is_dir()]
        images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if subdirs:
            skipped.extend(images)
            for sub in subdirs:
                walk(sub)
        elif images:
            classes[directory.relative_to(folder).as_posix()] = images
        elif directory != folder:
            empty.append(directory.relative_to(folder).as_posix())

    walk(folder)
    if skipped:
        log.warning("ignoring %d image(s) in folders that have subfolders (e.g. %s): only leaf folders are classes",
                    len(skipped), skipped[0])
    if empty:
        log.warning("ignoring %d leaf folder(s) without images under %s (e.g. %s)", len(empty), folder, empty[0])
    if not classes:
        raise DataError(
            f"no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}; "
            "data.path must be a folder whose (possibly nested) subfolders hold each class's images"
        )
    if "." in classes:
        raise DataError(
            f"{folder} holds images but no class folders; put each class's images in a folder of its own below it"
        )
    return dict(sorted(classes.items()))


def decode(path: Path, size: int, channels: int, invert: bool) -> torch.Tensor:
    """One image file as uint8 [channels, size, size]: greyscale or RGB, BILINEAR-resized, optionally 255 - x."""
    return torch.from_numpy(_decode_array(path, size, channels, invert))


def _decode_array(path: Path, size: int, channels: int, invert: bool, out: np.ndarray | None = None) -> np.ndarray:
    def error(e: Exception) -> str:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"cannot read image {path} ({reason}); replace or delete that file"

    return decode_array(path, mode="L" if channels == 1 else "RGB", size=size, resample=PIL_BILINEAR, invert=invert,
                        error=error, out=out)


def _absolute(path: str) -> str:
    """``path`` with ~ expanded, relative to Hydra's original working directory when Hydra runs."""
    from hydra.utils import to_absolute_path

    return os.path.normpath(to_absolute_path(os.path.expanduser(path)))


def _check_config(cfg: Config) -> Path:
    check_image_config(cfg)
    if not cfg.path:
        raise ConfigError("data.path is not set; give the folder whose (nested) subfolders are the classes, e.g. data.path=~/data/my_classes")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 (greyscale) or 3 (RGB) (got {cfg.channels})")
    check_split_config(cfg)
    folder = Path(_absolute(cfg.path))
    if not folder.is_dir():
        raise DataError(
            f"data.path {folder} is not a folder; give the folder whose subfolders are the classes "
            "(a relative path is taken from the directory metalearn was started in)"
        )
    return folder


def _decoded(cfg: Config, folder: Path) -> dict:
    """The decoded images of every class under ``folder``, from the cache when it is current."""
    classes = find_classes(folder)
    files = [[f"{name}/{p.name}", *_size_and_mtime(p)] for name, paths in classes.items() for p in paths]
    meta = {"version": _CACHE_VERSION, "folder": str(folder), "image_size": cfg.image_size,
            "channels": cfg.channels, "invert": cfg.invert, "files": files}
    key = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    settings = f"{cfg.image_size}px-{cfg.channels}ch{'-inverted' if cfg.invert else ''}"
    dirs = data_dirs(cfg)
    path = dirs.cache(f"{folder.name or 'root'}-{key}-{settings}-v{_CACHE_VERSION}.pt")
    return cached(path, meta, lambda: _decode_classes(classes, cfg.image_size, cfg.channels, cfg.invert),
                  f"imagefolder ({folder})", dirs)


def _size_and_mtime(path: Path) -> list[int]:
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e}); make it readable or remove it") from None
    return [stat.st_size, stat.st_mtime_ns]


def _decode_classes(classes: dict[str, list[Path]], size: int, channels: int, invert: bool) -> dict:
    paths = [p for files in classes.values() for p in files]
    images = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)
    decode_into(images, lambda p, row: _decode_array(p, size, channels, invert, row), paths)
    counts = torch.tensor([len(files) for files in classes.values()])
    stats = [class_stats(chunk) for chunk in images.split(counts.tolist())]
    return {
        "images": images,
        "labels": torch.repeat_interleave(torch.arange(len(classes)), counts),
        "class_names": list(classes),
        "class_mean": torch.stack([mean for mean, _ in stats]),
        "class_std": torch.stack([std for _, std in stats]),
    }

