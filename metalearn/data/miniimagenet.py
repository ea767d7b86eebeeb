"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (ICLR 2017):
100 ImageNet classes of 600 colour images each, 84x84, split 64/16/20 into train/val/test.

There is no official download. The files go under ``<root>/miniimagenet/`` in either of the
two forms people hold (``data.form`` picks one; ``auto`` takes the first that is complete):

- ``pickle``: ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-val.pkl`` (or
  ``-validation.pkl``, learn2learn's name) and ``mini-imagenet-cache-test.pkl``, the cache
  format of Ren et al. (2018) that most copies are shared in: a pickled dict
  ``{"image_data": uint8 [N, H, W, 3] RGB, "class_dict": {wnid: [row indices]}}``.
  ``scripts/build_miniimagenet.py`` makes them from ImageNet's train images.
- ``images``: Ravi's split files ``train.csv``, ``val.csv``, ``test.csv`` (header
  ``filename,label``, rows like ``n0153282900000005.jpg,n01532829``) and the images they name
  in ``images/``.

The first load of each split decodes it once into ``<root>/miniimagenet/cache/`` (uint8,
channels first, sorted by class, resized to ``data.image_size`` if that is not the files'
size); later loads memory-map that file and are rebuilt when the source files change.
With ``data.cache_dir`` set, the caches go to ``<cache_dir>/miniimagenet/cache/`` instead
(a current cache under the root is read first); the files are only read.
Classes are named by their WordNet id (``n01532829``). The standard split is the files'
own; ``data.train``/``val``/``test`` (wnids or patterns) or ``data.split_seed`` choose
others from all 100 classes (``metalearn.data.common.choose_split``), copied into memory.

Pickles can run code when loaded, so they are read with an unpickler that builds only
numpy arrays and plain containers (see ``read_pickle``); anything else is refused.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from metalearn.data import SPLITS
from metalearn.data.common import (
    DataDirs, ImageConfig, cached, check_image_config, check_split_config, choose_split, data_dirs, dataset_dir,
    file_signature, read_pickle, regroup, text,
)
from metalearn.data.episodes import ClassStore
from metalearn.data.images import TORCH_BILINEAR, decode_array, decode_into, resize
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Per-channel mean and std of miniImageNet's pixels on the 0..255 scale, as used by the
# dataloaders of Gidaris & Komodakis (CVPR 2018) and MetaOptNet (Lee et al., CVPR 2019,
# data/mini_imagenet.py: mean_pix, std_pix) and the many works built on them; here on [0, 1].
MEAN = tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653))
STD = tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529))
NATIVE_SIZE = 84  # the benchmark's image size; the shared files hold 84x84 images
FORMS = ("auto", "pickle", "images")
# The pickle of each split; the val split also goes by "validation" (learn2learn's download name).
PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1


@dataclass
class Config(ImageConfig):
    name: str = "miniimagenet"
    download: bool = False  # no download of miniImageNet exists: the files are put in place by hand
    form: str = "auto"  # auto | pickle (mini-imagenet-cache-*.pkl) | images (train/val/test.csv + images/)


def load(cfg: Config) -> dict[str, ClassStore]:
    _check_config(cfg)
    dirs = data_dirs(cfg)
    form, files = _choose_form(dirs.root, cfg.form)
    stores = {}
    for split in SPLITS:
        data = _split_cache(dirs, split, form, files, cfg.image_size)
        stores[split] = ClassStore(data["images"], data["labels"], data["class_names"], mean=MEAN, std=STD)
    standard = {split: list(store.class_names) for split, store in stores.items()}
    chosen = choose_split(cfg, sorted({name for names in standard.values() for name in names}), standard)
    return stores if chosen == standard else regroup(stores, chosen, MEAN, STD)


def sources(cfg: Config) -> list[Path]:
    """The raw files and folders ``load`` reads: those of the complete form, else those it looks for."""
    layouts = _layouts(dataset_dir(cfg))
    wanted = [cfg.form] if cfg.form in layouts else ["pickle", "images"]
    form = next((name for name in wanted if not _missing(layouts[name])), wanted[0])
    return list(layouts[form].values())


def _sorted_by_class(class_rows: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """(class names sorted, the rows of all images in class order, their labels 0..C-1)."""
    names = sorted(class_rows)
    rows = [np.asarray(class_rows[name], dtype=np.int64) for name in names]
    order = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    labels = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([len(r) for r in rows], dtype=torch.long))
    return names, order, labels


def _check_config(cfg: Config) -> None:
    check_image_config(cfg)
    check_split_config(cfg)
    if cfg.form not in FORMS:
        raise ConfigError(f"unknown data.form={cfg.form!r}; use one of: {', '.join(FORMS)}")


def _layouts(folder: Path) -> dict[str, dict[str, Path]]:
    """The files of each form, keyed by what they are."""
    pickles = {}
    for split, names in PICKLE_NAMES.items():
        present = [folder / name for name in names if (folder / name).is_file()]
        pickles[split] = present[0] if present else folder / names[0]
    images = {split: folder / f"{split}.csv" for split in SPLITS}
    images["images"] = folder / "images"
    return {"pickle": pickles, "images": images}


def _missing(files: dict[str, Path]) -> list[Path]:
    return [path for key, path in files.items() if not (path.is_dir() if key == "images" else path.is_file())]


def _choose_form(folder: Path, form: str) -> tuple[str, dict[str, Path]]:
    layouts = _layouts(folder)
    wanted = ["pickle", "images"] if form == "auto" else [form]
    for name in wanted:
        if not _missing(layouts[name]):
            return name, layouts[name]
    pickles = ", ".join(p.name for p in _missing(layouts["pickle"]))
    images = ", ".join(p.name + ("/" if p.name == "images" else "") for p in _missing(layouts["images"]))
    where = f"put them in {folder} (or set data.root to the folder that holds miniimagenet/); no download exists"
    if form == "pickle":
        raise DataError(f"miniImageNet pickle(s) {pickles} not found; {where}; scripts/build_miniimagenet.py makes them from ImageNet")
    if form == "images":
        raise DataError(f"miniImageNet {images} not found; {where} (Ravi & Larochelle's split CSVs and the images they name)")
    raise DataError(
        f"miniImageNet files not found in {folder}: put mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl there "
        f"(missing: {pickles}; scripts/build_miniimagenet.py makes them from ImageNet), or Ravi's train.csv, val.csv, "
        f"test.csv and images/ (missing: {images}); or set data.root to the folder that holds miniimagenet/"
    )


def _split_cache(dirs: DataDirs, split: str, form: str, files: dict[str, Path], size: int) -> dict:
    if form == "pickle":
        split_files = [files[split]]
        build: Callable[[], dict] = lambda: _from_pickle(files[split], size)
    else:
        split_files = [files[split], files["images"]]
        build = lambda: _from_images(files[split], files["images"], size)
    meta = {
        "version": _CACHE_VERSION,
        "form": form,
        "image_size": size,
        # Name, size and time of the source files (for images/, of the folder: it changes when
        # images are added, removed or renamed), so a replaced source is not read from an old cache.
        "sources": file_signature(*split_files),
    }
    # The form is in the name: switching data.form must not overwrite (and later rebuild) the other's cache.
    path = dirs.cache(f"{split}-{form}-{size}px-v{_CACHE_VERSION}.pt")
    return cached(path, meta, build, f"miniImageNet {split}", dirs)


def _from_pickle(path: Path, size: int) -> dict:
    images, class_rows = _read_cache_pickle(path)
    names, order, labels = _sorted_by_class(class_rows)
    out = torch.empty(len(order), 3, size, size, dtype=torch.uint8)
    chunk = 2048  # resize a slice at a time: a float copy of all 38400 train images would need 3 GB
    for lo in range(0, len(order), chunk):
        part = torch.from_numpy(np.ascontiguousarray(images[order[lo : lo + chunk]])).permute(0, 3, 1, 2)
        out[lo : lo + chunk] = resize(part, size)
    return {"images": out, "labels": labels, "class_names": names}


def _read_cache_pickle(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``image_data`` and ``class_dict`` of a miniImageNet pickle, checked."""
    data = read_pickle(path, "miniImageNet")
    keys = {text(k): v for k, v in data.items()} if isinstance(data, dict) else {}
    if "image_data" not in keys or "class_dict" not in keys:
        found = f"a dict with keys {sorted(keys)}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise DataError(
            f"{path} holds {found}, not a miniImageNet pickle (a dict with image_data and class_dict); replace it"
        )
    images, class_dict = keys["image_data"], keys["class_dict"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3):
        got = f"{images.dtype} array {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"image_data in {path} must be a uint8 array [N, H, W, 3] (got {got}); replace the file")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"class_dict in {path} must be a non-empty dict {{wnid: [image indices]}}; replace the file")
    class_rows, owner = {}, np.full(len(images), -1)
    for c, (wnid, rows) in enumerate(class_dict.items()):
        try:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"class_dict[{text(wnid)!r}] in {path} is not a list of image indices; replace the file") from None
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise DataError(
                f"class_dict[{text(wnid)!r}] in {path} points past the {len(images)} images of image_data; "
                "the file is damaged: replace it"
            )
        if (owner[rows] >= 0).any() or len(np.unique(rows)) != len(rows):
            raise DataError(f"class_dict in {path} gives an image to two classes (or twice to {text(wnid)!r}); replace the file")
        owner[rows] = c
        class_rows[text(wnid)] = rows
    return images, class_rows


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """The (image file name, wnid) rows of one of Ravi & Larochelle's split CSVs."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path} ({e}); replace it with Ravi & Larochelle's split file") from None
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise DataError(
            f"{path} does not start with the header filename,label, so it is not one of Ravi & Larochelle's split CSVs; replace it"
        )
    body = [row for row in rows[1:] if row]
    bad = [i + 2 for i, row in enumerate(rows[1:]) if row and (len(row) != 2 or not row[0].strip() or not row[1].strip())]
    if bad:
        raise DataError(f"line {bad[0]} of {path} is not 'filename,label'; the file is damaged: replace it")
    if not body:
        raise DataError(f"{path} lists no images; replace it with Ravi & Larochelle's split file")
    return [(name.strip(), label.strip()) for name, label in body]


def _from_images(csv_path: Path, image_dir: Path, size: int) -> dict:
    rows = read_split_csv(csv_path)
    class_rows: dict[str, list[int]] = {}
    for i, (_, wnid) in enumerate(rows):
        class_rows.setdefault(wnid, []).append(i)
    names, order, labels = _sorted_by_class({k: np.asarray(v) for k, v in class_rows.items()})
    paths = [image_dir / rows[i][0] for i in order]
    images = decode_into(torch.empty(len(paths), 3, size, size, dtype=torch.uint8),
                         lambda p, row: _read_image(p, size, csv_path, row), paths)
    return {"images": images, "labels": labels, "class_names": names}


def _read_image(path: Path, size: int, listed_in: Path, out: np.ndarray | None = None) -> np.ndarray:
    """One image file as uint8 [3, size, size] RGB: decoded whole, then resized (TORCH_BILINEAR) if need be."""
    def error(e: Exception) -> str:
        if isinstance(e, FileNotFoundError):
            return f"{path.name}, listed in {listed_in.name}, is missing from {path.parent}; put the complete images/ folder there"
        return f"cannot read {path} ({e}); the image is damaged: replace it"

    return decode_array(path, mode="RGB", size=size, resample=TORCH_BILINEAR, error=error, out=out)
