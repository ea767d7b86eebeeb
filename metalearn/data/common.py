"""What the image datasets share: their common options, their folder under the data
root, and the cache of decoded images that later loads read instead of the raw files."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from metalearn.data.transforms import AugmentConfig, EpisodeTransform, check_augment
from metalearn.data.download import download
from metalearn.data.episodes import ClassStore
from metalearn.errors import ConfigError, DataError
from metalearn.fileio import atomic_torch_save

log = logging.getLogger(__name__)


@dataclass
class ImageConfig:
    """Options every image dataset has; a dataset's ``Config`` subclasses this and sets ``name``."""

    name: str = ""
    # Data root shared by all datasets; each keeps its files in <root>/<dataset>/.
    root: str = "~/.cache/metalearn"
    download: bool = True  # fetch missing official archives (checksum checked), where a download exists
    image_size: int = 84
    normalize: bool = True  # subtract the dataset's per-channel mean, divide by its std
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def dataset_dir(cfg: ImageConfig, folder: str | None = None) -> Path:
    """``<root>/<folder or cfg.name>``, with ``~`` expanded."""
    return Path(cfg.root).expanduser() / (folder or cfg.name)


def check_image_config(cfg: ImageConfig) -> None:
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1 (got {cfg.image_size})")
    check_augment(cfg.augment)


def episode_transforms(cfg: Any, train_store: Any) -> tuple[Callable | None, Callable | None]:
    """The (training, evaluation) input transforms of a run's data config; None means scale to [0, 1]."""
    normalize = bool(getattr(cfg, "normalize", False)) and getattr(train_store, "mean", None) is not None
    augment = getattr(cfg, "augment", None)
    mean, std = (train_store.mean, train_store.std) if normalize else (None, None)
    train = EpisodeTransform(mean, std, augment) if normalize or (augment is not None and augment.enabled) else None
    evaluation = EpisodeTransform(mean, std) if normalize else None
    return train, evaluation


def cached(path: Path, meta: dict, build: Callable[[], dict], what: str) -> dict:
    """The dict saved at ``path`` if its ``meta`` entries match, else ``build()`` (saved atomically, with ``meta``).

    ``meta`` records what the cache was built from (source files' sizes and times, image size,
    a version): when any changes, the cache is rebuilt instead of silently reused.
    """
    try:
        data = torch.load(path, weights_only=True, mmap=True)
        if all(data.get(k) == v for k, v in meta.items()):
            return data
    except FileNotFoundError:
        pass
    except Exception as e:  # an unreadable cache is only a cache: rebuild it
        log.warning("%s cache %s is unreadable (%s); rebuilding it", what, path, e)
    log.info("building the %s cache %s (once)", what, path)
    data = {**meta, **build()}
    try:
        atomic_torch_save(data, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        log.warning("cannot write the %s cache %s (%s); the next load will build it again", what, path, str(e).splitlines()[0])
    return data


def file_signature(*paths: Path) -> list[list]:
    """Name, size and mtime of each file: enough to notice a replaced source file."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def fetch(path: Path, url: str, allowed: bool, md5: str | None, size_note: str = "") -> bool:
    """Make sure the file ``path`` exists, downloading it from ``url`` (md5 checked) if ``allowed``.

    Returns whether it was just downloaded (a file put there by hand may deserve its own check).
    """
    if path.is_file():
        return False
    if not allowed:
        raise DataError(f"{path.name} not found in {path.parent} and data.download=false; "
                        f"download {url} into that folder, or set data.download=true")
    log.info("downloading %s%s", url, size_note)
    download(url, path, md5=md5 or None)
    return True


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked to build something no dataset file needs (it could run code)."""


class DataUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numpy scalars and plain containers only.

    A pickle can name any function to call while loading; dataset pickles come from the web,
    so only what they hold is allowed (numpy 1 and 2, Python 2 and 3 names). Use with
    ``encoding="latin1"`` so Python 2 pickles (the original miniImageNet, tieredImageNet and
    CIFAR files) load too.
    """

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("collections", "OrderedDict"), ("collections", "defaultdict"),
        ("builtins", "list"), ("__builtin__", "list"), ("builtins", "dict"), ("__builtin__", "dict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path, what: str) -> Any:
    """The object pickled in ``path`` (see ``DataUnpickler``); every failure is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            return DataUnpickler(f, encoding="latin1").load()
    except RefusedPickle as e:
        raise DataError(
            f"{path} asks to run {e} while loading, which a {what} file never needs; refused: replace it with a trusted copy"
        ) from None
    except MemoryError:
        raise DataError(f"not enough memory to read {path}; free memory or use a machine with more") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise DataError(f"{path} is damaged or not a {what} pickle ({type(e).__name__}: {e}); replace it with a good copy") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e}); check the file and its permissions") from None


def text(value: Any) -> str:
    """A key or name from a pickle as str (Python 2 pickles may give bytes)."""
    return value.decode("latin1") if isinstance(value, (bytes, bytearray)) else str(value)


def class_subset(images: torch.Tensor, labels: torch.Tensor, names: list[str], classes: list[int],
                 mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> ClassStore:
    """The ClassStore of the classes ``classes`` (indices into ``names``; ``labels`` gives each image's),
    class i of the store being classes[i]."""
    label_of = torch.full((len(names),), -1, dtype=torch.long)
    label_of[classes] = torch.arange(len(classes))
    split_labels = label_of[labels]
    keep = split_labels >= 0
    return ClassStore(images[keep], split_labels[keep], [names[c] for c in classes], mean=mean, std=std)


def first_line(error: Exception) -> str:
    """An exception's message cut to one line (tarfile's can list every method it tried)."""
    lines = str(error).splitlines()
    return lines[0].rstrip(":") if lines else ""
