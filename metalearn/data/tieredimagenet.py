"""tieredImageNet (Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification",
ICLR 2018): 608 ImageNet classes (779,165 images, 84x84) grouped under 34 high-level
categories, split by category into 351/97/160 classes (20/6/8 categories) for train/val/test.

There is no official download: the dataset is shared as Ren et al.'s ``tiered-imagenet.tar``.
Put its files, for each split ``<split>`` in train, val, test, in ``<root>/tieredimagenet/``,
in either form (``data.form`` picks one; ``auto`` takes the npz where there is one):

- ``png`` (the shared form): ``<split>_images_png.pkl``, a pickled list of PNG-encoded images
  (bytes, or the uint8 arrays ``cv2.imencode`` returns, as Ren et al.'s
  ``compress_tiered_imagenet.py`` wrote them), and ``<split>_labels.pkl``.
- ``npz`` (the common re-pack): ``<split>_images.npz`` holding ``images``, uint8
  [N, 84, 84, 3], and ``<split>_labels.pkl``. These arrays were decoded with OpenCV and hold
  BGR pixels (hence the channel flip in the loaders that read them); ``data.npz_channels=rgb``
  reads an RGB one.

``<split>_labels.pkl`` is a dict with ``label_specific`` (the class of each image) and
``label_specific_str`` (the class names), plus ``label_general``/``label_general_str`` (the
high-level categories: the groups of within-group episodes), as Ren et al. wrote it; or with ``labels`` only (the
MetaOptNet re-pack), whose classes are then named by their number.

The whole dataset is about 16 GB as uint8, so it is never held in memory: the first load of
each split decodes it once, a slice at a time, into a raw uint8 ``.npy`` file [N, 3, S, S]
sorted by class in ``<root>/tieredimagenet/cache/`` (written to a temp file, then renamed),
with a small index of labels and class names beside it. Loads memory-map that file, so an
episode reads only the images it draws. Both are rebuilt when the source files change or
``data.image_size`` (other sizes are resized while decoding) does. With ``data.cache_dir``
set, they are written to ``<cache_dir>/tieredimagenet/cache/`` instead (a current cache
under the root is used first); the files under the root are only read.

The standard split is the files' own (351/97/160 classes); ``data.train``/``val``/``test``
(class names or patterns) or ``data.split_seed`` choose others from all 608 classes
(``metalearn.data.common.choose_split``); such a split is copied into memory, not mapped.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch

from metalearn.data import SPLITS
from metalearn.data.common import (
    DataDirs, ImageConfig, cached, check_image_config, check_split_config, choose_split, data_dirs, dataset_dir,
    file_signature, read_cache, read_pickle, regroup, text,
)
from metalearn.data.episodes import ClassStore
# MEAN, STD: the per-channel statistics that MetaOptNet's tieredImageNet dataloader (Lee et al.,
# CVPR 2019, data/tiered_imagenet.py: mean_pix, std_pix) uses, the same as for miniImageNet.
from metalearn.data.miniimagenet import MEAN, STD
from metalearn.data.images import TORCH_BILINEAR, decode_array, decode_into, resize
from metalearn.errors import ConfigError, DataError
from metalearn.fileio import atomic_path

log = logging.getLogger(__name__)

FORMS = ("auto", "png", "npz")
CHANNEL_ORDERS = ("bgr", "rgb")
# Images decoded and written per step: bounds the memory of a cache build to a few hundred MB.
_CHUNK = 4096
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1


@dataclass
class Config(ImageConfig):
    name: str = "tieredimagenet"
    download: bool = False  # no download of tieredImageNet exists: the files are put in place by hand
    form: str = "auto"  # auto | png (<split>_images_png.pkl) | npz (<split>_images.npz); labels from <split>_labels.pkl
    npz_channels: str = "bgr"  # channel order of the pixels in <split>_images.npz: bgr (the shared files) | rgb


def load(cfg: Config) -> dict[str, ClassStore]:
    _check_config(cfg)
    dirs = data_dirs(cfg)
    folder = dirs.root
    files = {split: _split_files(folder, split, cfg.form) for split in SPLITS}
    missing = [path for _, images, labels in files.values() for path in (images, labels) if not path.is_file()]
    if missing:
        raise DataError(
            f"tieredImageNet file(s) {', '.join(p.name for p in missing)} not found in {folder}; put the files of "
            "Ren et al.'s tiered-imagenet.tar there (<split>_images_png.pkl or <split>_images.npz, and <split>_labels.pkl "
            "for train, val and test), or set data.root to the folder that holds tieredimagenet/; no download exists"
        )
    stores = {}
    for split, (form, images, labels) in files.items():
        channels = cfg.npz_channels if form == "npz" else "rgb"
        index, pixels = _split_cache(dirs, split, form, images, labels, channels, cfg.image_size)
        stores[split] = ClassStore(pixels, index["labels"], index["class_names"], mean=MEAN, std=STD)
        stores[split].class_groups = _categories(labels, stores[split].class_names)
    standard = {split: list(store.class_names) for split, store in stores.items()}
    chosen = choose_split(cfg, sorted({name for names in standard.values() for name in names}), standard)
    if chosen == standard:
        return stores
    log.info("copying the images of the chosen tieredImageNet split into memory")
    category = {name: group for store in stores.values() for name, group in zip(store.class_names, store.groups_of_classes())}
    chosen_stores = regroup(stores, chosen, MEAN, STD)
    for store in chosen_stores.values():
        store.class_groups = [category[name] for name in store.class_names]
    return chosen_stores


def _categories(labels_path: Path, class_names: list[str]) -> list[str] | None:
    """Each class's high-level category (``label_general_str``; within-group episodes draw from one), from the
    labels file (small: read at every load, so the image caches need no rebuild); None when the file has none."""
    data = read_pickle(labels_path, "tieredImageNet labels")
    keys = {text(k): v for k, v in data.items()} if isinstance(data, dict) else {}
    if not {"label_specific", "label_specific_str", "label_general", "label_general_str"} <= set(keys):
        return None
    specific, general = np.asarray(keys["label_specific"]), np.asarray(keys["label_general"])
    specific_names = [text(n) for n in keys["label_specific_str"]]
    general_names = [text(n) for n in keys["label_general_str"]]
    if specific.shape != general.shape or (len(general) and not 0 <= general.min() <= general.max() < len(general_names)):
        raise DataError(f"label_general in {labels_path} does not give every image a category of label_general_str; "
                        "replace the file")
    of_class = dict(zip(specific.tolist(), general.tolist()))
    by_name = {specific_names[c]: general_names[g] for c, g in of_class.items()}
    return [by_name.get(name, name) for name in class_names]


def sources(cfg: Config) -> list[Path]:
    """The raw files ``load`` reads (or would read: they may be missing)."""
    folder = dataset_dir(cfg)
    return [path for split in SPLITS for path in _split_files(folder, split, cfg.form)[1:]]


def _check_config(cfg: Config) -> None:
    check_image_config(cfg)
    check_split_config(cfg)
    if cfg.form not in FORMS:
        raise ConfigError(f"unknown data.form={cfg.form!r}; use one of: {', '.join(FORMS)}")
    if cfg.npz_channels not in CHANNEL_ORDERS:
        raise ConfigError(f"unknown data.npz_channels={cfg.npz_channels!r}; use one of: {', '.join(CHANNEL_ORDERS)}")


def _split_files(folder: Path, split: str, form: str) -> tuple[str, Path, Path]:
    """(form, images file, labels file) of one split; ``auto`` prefers the npz (nothing to decode)."""
    npz, png = folder / f"{split}_images.npz", folder / f"{split}_images_png.pkl"
    if form == "auto":
        form = "npz" if npz.is_file() else "png"
    return form, npz if form == "npz" else png, folder / f"{split}_labels.pkl"


def _split_cache(dirs: DataDirs, split: str, form: str, images: Path, labels: Path, channels: str,
                 size: int) -> tuple[dict, torch.Tensor]:
    """The split's index (labels, class names) and its memory-mapped images, building both if stale
    (a current cache under the data root is used first; a new one is written to the cache dir)."""
    # Form and channel order are in the name: switching either must not overwrite a 16 GB cache.
    stem = dirs.cache(f"{split}-{form}-{channels}-{size}px-v{_CACHE_VERSION}")

    def meta(npy: Path) -> dict:
        return {
            "version": _CACHE_VERSION,
            "form": form,
            "channels": channels,
            "image_size": size,
            "sources": file_signature(images, labels),
            # The index is valid only with the very images file it was built with.
            "images_file": _signature(npy),
        }

    what = f"tieredImageNet {split}"
    for candidate in dirs.read_first(stem)[:-1]:  # a current cache under the data root
        index = read_cache(candidate.with_suffix(".pt"), meta(candidate.with_suffix(".npy")), what)
        if index is not None:
            return index, _open_images(candidate.with_suffix(".npy"), len(index["labels"]), size)
    npy = stem.with_suffix(".npy")
    index = cached(stem.with_suffix(".pt"), meta(npy), lambda: _build(form, images, labels, channels, size, npy, what), what, dirs,
                   root_first=False)
    return index, _open_images(npy, len(index["labels"]), size)


def _signature(path: Path) -> list | None:
    return file_signature(path) if path.is_file() else None


def _open_images(npy: Path, count: int, size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] backed by the file: pages are read when an episode touches them."""
    try:
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the image cache {npy} ({e}); delete it and run again to rebuild it") from None
    if array.dtype != np.uint8 or array.shape != (count, 3, size, size):
        raise DataError(
            f"the image cache {npy} holds {array.dtype} {list(array.shape)}, not the {count} images its index lists; "
            "delete the cache folder and run again to rebuild it"
        )
    # The map is read-only and torch has no read-only tensors, hence its warning; nothing writes
    # into a store's images (episodes index them, which copies), so the warning says nothing here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _build(form: str, images: Path, labels_path: Path, channels: str, size: int, npy: Path, what: str) -> dict:
    """Decode a split into ``npy`` (sorted by class) and return its index."""
    labels, names = _read_labels(labels_path)
    source = PngImages(images) if form == "png" else NpzImages(images, channels)
    if source.count != len(labels):
        raise DataError(
            f"{images.name} holds {source.count} images but {labels_path.name} labels {len(labels)}; "
            "the two files are from different splits or one is damaged: replace them"
        )
    classes, class_of = np.unique(labels, return_inverse=True)
    order = np.argsort(class_of, kind="stable")
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))  # where each image of the source goes in the class-sorted file
    _write_sorted(source, destination, size, npy, what)
    class_names = [names[c] if names is not None else str(c) for c in classes.tolist()]
    return {
        "labels": torch.from_numpy(class_of[order].astype(np.int64)),
        "class_names": class_names,
        "images_file": file_signature(npy),
    }


def _read_labels(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """The class label of each image and, when the file has them, the names of the labels."""
    data = read_pickle(path, "tieredImageNet labels")
    keys = {text(k): v for k, v in data.items()} if isinstance(data, dict) else {}
    key = "label_specific" if "label_specific" in keys else "labels" if "labels" in keys else None
    if key is None:
        found = f"keys {sorted(keys)}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise DataError(
            f"{path} has {found}, neither label_specific (Ren et al.'s files) nor labels; "
            "it is not a tieredImageNet labels file: replace it"
        )
    labels = np.asarray(keys[key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise DataError(
            f"{key} in {path} must be a list of class numbers >= 0 (got {labels.dtype} {list(labels.shape)}); replace the file"
        )
    names = keys.get("label_specific_str") if key == "label_specific" else None
    if names is not None:
        if not isinstance(names, (list, tuple, np.ndarray)):
            raise DataError(
                f"label_specific_str in {path} must be a list of class names (got {type(names).__name__}); replace the file"
            )
        names = [text(name) for name in names]
        if len(labels) and labels.max() >= len(names):
            raise DataError(
                f"label_specific in {path} goes up to {labels.max()} but label_specific_str names {len(names)} classes; "
                "replace the file"
            )
    return labels.astype(np.int64), names


class PngImages:
    """The PNG-encoded images of ``<split>_images_png.pkl``. The whole list is read first (a pickle
    cannot be read in parts): several GB for the train split, decoded a slice at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.items = read_pickle(path, "tieredImageNet images")
        if not isinstance(self.items, list):
            raise DataError(
                f"{path} holds a {type(self.items).__name__}, not the list of PNG images of a tieredImageNet split; replace it"
            )
        self.count = len(self.items)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """uint8 [n, 3, size, size] RGB, in file order."""
        for lo in range(0, self.count, _CHUNK):
            hi = min(lo + _CHUNK, self.count)
            yield decode_into(torch.empty(hi - lo, 3, size, size, dtype=torch.uint8),
                              lambda i, row: self._decode(i, size, row), range(lo, hi))

    def _decode(self, i: int, size: int, out: np.ndarray | None = None) -> np.ndarray:
        """Image i, decoded whole, then resized (TORCH_BILINEAR) if need be."""
        item = self.items[i]
        error = lambda e: f"image {i} of {self.path} is not a readable PNG ({e}); the file is damaged: replace it"  # noqa: E731
        try:
            data = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
        except (ValueError, TypeError) as e:
            raise DataError(error(e)) from None
        return decode_array(data, mode="RGB", size=size, resample=TORCH_BILINEAR, error=error, out=out)


class NpzImages:
    """The ``images`` array of ``<split>_images.npz``, read a slice at a time from inside the zip
    (``np.load`` would decompress all of it into memory)."""

    def __init__(self, path: Path, channels: str):
        self.path, self.channels = path, channels
        with _npy_in_zip(path, "images") as (_, shape):
            self.count = shape[0]

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """uint8 [n, 3, size, size] RGB, in file order."""
        with _npy_in_zip(self.path, "images") as (stream, shape):
            for lo in range(0, self.count, _CHUNK):
                pixels = np.empty((min(_CHUNK, self.count - lo), *shape[1:]), dtype=np.uint8)
                got = _read_into(stream, pixels)
                if got != pixels.nbytes:
                    raise DataError(
                        f"{self.path} ends after {lo + got // pixels[0].nbytes} of its {self.count} images; it is truncated: replace it"
                    )
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
                yield resize(x.flip(1) if self.channels == "bgr" else x, size)


@contextlib.contextmanager
def _npy_in_zip(path: Path, name: str) -> Iterator[tuple[BinaryIO, tuple[int, ...]]]:
    """The stream of array ``name`` of an npz, just past its header, and its shape, checked to be
    uint8 [N, H, W, 3]. Damaged zips (also those found damaged while reading on) are DataErrors."""
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{name}.npy" not in zf.namelist():
                arrays = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "none"
                raise DataError(f"{path} has no {name!r} array (arrays: {arrays}); it is not a tieredImageNet npz: replace it")
            with zf.open(f"{name}.npy") as stream:
                version = np.lib.format.read_magic(stream)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(stream)
                if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
                    order = ", Fortran order" if fortran_order else ""
                    raise DataError(
                        f"{name} in {path} must be a uint8 array [N, H, W, 3] (got {dtype} {list(shape)}{order}); replace the file"
                    )
                yield stream, shape
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as e:  # bad CRC, bad deflate data, bad header
        raise DataError(f"{path} is damaged or not an .npz ({type(e).__name__}: {e}); replace it") from None


def _read_into(stream: BinaryIO, array: np.ndarray) -> int:
    """Fill the C-contiguous ``array`` with the stream's next bytes; the count read (short at its end)."""
    buffer, total = memoryview(array).cast("B"), 0
    while total < len(buffer) and (got := stream.readinto(buffer[total:])):
        total += got
    return total


def _write_sorted(source, destination: np.ndarray, size: int, npy: Path, what: str) -> None:
    """Write the source's images to ``npy`` [N, 3, size, size], image i at row destination[i]."""
    count = len(destination)
    need = count * 3 * size * size
    npy.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(npy.parent).free
    if free < need:
        raise DataError(
            f"the {what} image cache needs {need / 1e9:.1f} GB in {npy.parent} but {free / 1e9:.1f} GB are free; "
            "make room there or set data.cache_dir to a larger disk"
        )
    log.info("decoding %d %s images into %s (%.1f GB, once)", count, what, npy, need / 1e9)
    try:
        with atomic_path(npy) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, 3, size, size))
            lo = 0
            for chunk in source.chunks(size):
                out[destination[lo : lo + len(chunk)]] = chunk.numpy()
                lo += len(chunk)
                if lo % (_CHUNK * 25) < _CHUNK:
                    log.info("%s: %d of %d images decoded", what, lo, count)
            out.flush()
            del out  # unmap before the rename
    except OSError as e:
        raise DataError(f"cannot write the {what} image cache {npy} ({e}); make room there, make the folder writable, or set data.cache_dir to another folder") from None
