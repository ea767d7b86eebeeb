"""What the datasets share: the split vocabulary (``data.train``/``val``/``test``/``split_seed``/
``ratios``) and the one function that turns it into class lists, the common options of the image
datasets, their folders under the data root and the cache directory, and the cache of decoded
images that later loads read instead of the raw files."""

from __future__ import annotations

import errno
import logging
import math
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from metalearn.data.transforms import AugmentConfig, EpisodeTransform, check_augment
from metalearn.data.download import download
from metalearn.data.episodes import ClassStore
from metalearn.errors import ConfigError, DataError, StorageError
from metalearn.fileio import atomic_torch_save

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")  # metalearn.data.SPLITS (not imported: that would be circular)
DEFAULT_RATIOS = (0.6, 0.2, 0.2)  # how classes are dealt when a dataset has no standard split
_SHOWN_NAMES = 20  # available names listed in an error line


# ---------------------------------------------------------------- the split vocabulary


@dataclass
class SplitConfig:
    """How a classification dataset's classes are split: the same keys in every dataset's ``Config``.

    ``train``, ``val``, ``test``: class names or glob patterns (``*``, ``?``, ``[..]``, case-sensitive,
    matched one ``/``-level at a time; an entry takes every class at or below what it matches, so
    ``Greek`` takes all of Omniglot's ``Greek/characterNN``). Give all three, or none. None: the
    dataset's standard split; with ``split_seed`` set, or for a dataset without a standard split, the
    classes are dealt at random by ``split_seed`` (0 if null) in the proportions ``ratios``. See
    ``choose_split``.
    """

    name: str = ""
    train: list[str] = field(default_factory=list)  # names or patterns; empty (all three): the standard split
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    # null: the standard split (none: dealt by seed 0); an integer: classes dealt at random by it, in data.ratios
    split_seed: Optional[int] = None
    # proportions of the classes dealt to train, val, test; null: the standard split's, or 0.6/0.2/0.2
    ratios: Optional[list[float]] = None


def check_split_config(cfg: Any) -> None:
    """The split options' own checks (entries, all three or none, ratios), before any data is read."""
    lists = {split: list(getattr(cfg, split)) for split in SPLIT_NAMES}
    for split, entries in lists.items():
        for entry in entries:
            text = str(entry).strip()
            relative = PurePosixPath(text)
            if not text or relative.is_absolute() or ".." in relative.parts:
                raise ConfigError(f"data.{split} entry {str(entry)!r} is not a class name or pattern; give names or "
                                  "glob patterns of the dataset's classes, like Greek or Greek/character0*")
    given = [split for split, entries in lists.items() if entries]
    if given and len(given) < 3:
        missing = [split for split in SPLIT_NAMES if split not in given]
        raise ConfigError(
            f"data.{' and data.'.join(given)} given but data.{' and data.'.join(missing)} empty; list names or "
            "patterns for all of train, val and test, or none of them for the dataset's standard split"
        )
    ratios = getattr(cfg, "ratios", None)
    if not given and ratios is not None:
        ratios = list(ratios)
        if len(ratios) != 3 or not all(0 < r < math.inf for r in ratios):
            raise ConfigError(f"data.ratios must be three positive numbers, for train, val and test (got {ratios})")


def choose_split(cfg: Any, names: Sequence[str], standard: Mapping[str, Sequence[str]] | None, *,
                 what: str = "class", deal_level: int | None = None, where: str | None = None,
                 normalize: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """The class names of each split, from the dataset's ``names`` and the config's split options.

    - ``data.train``/``val``/``test`` given: each split takes every name at or below an entry it matches
      (``fnmatchcase`` per ``/``-level), in the dataset's order (the order of ``names``); every entry must
      match something and no name may fall in two splits (ConfigErrors naming the entry or the name).
    - none given, ``split_seed`` null and a ``standard`` split: that split, as given.
    - otherwise: dealt at random by ``split_seed`` (0 if null) in the proportions ``ratios`` (null: the
      standard split's sizes, or 0.6/0.2/0.2), imagefolder's rule: a numpy permutation of the names (or,
      with ``deal_level``, of their distinct first ``deal_level`` levels, e.g. Omniglot's alphabets), cut at
      the rounded cumulative ratios; each split in the dataset's order.

    ``what`` names a class in messages (``character``); ``where`` says whose classes they are (default
    ``of <dataset>``); ``normalize`` rewrites an entry first (DoubleMNIST pads ``7`` to ``07``).
    """
    check_split_config(cfg)
    where = where or f"of {cfg.name}"
    lists = {split: [str(e).strip() for e in getattr(cfg, split)] for split in SPLIT_NAMES}
    if normalize is not None:
        lists = {split: [normalize(e) for e in entries] for split, entries in lists.items()}
    seed = getattr(cfg, "split_seed", None)
    if any(lists.values()):
        chosen = _by_name(names, lists, what, where)
        how = "by name (data.train/val/test" + ("; data.split_seed unused)" if seed is not None else ")")
    elif seed is None and standard is not None:
        chosen = {split: list(standard[split]) for split in SPLIT_NAMES}
        how = "the standard split"
    else:
        chosen = _dealt(names, cfg, standard, deal_level, what, where)
        how = f"dealt at random by split_seed={seed if seed is not None else 0}"
    log.info("%s: %s, %s %s", cfg.name, how, "/".join(str(len(chosen[s])) for s in SPLIT_NAMES),
             f"{what}es" if what.endswith("s") else f"{what}s")
    return chosen


def _levels(name: str) -> list[str]:
    return name.split("/")


def _shown(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN_NAMES} more" if len(items) > _SHOWN_NAMES else ""
    return ", ".join(items[:_SHOWN_NAMES]) + more


def _by_name(names: Sequence[str], lists: dict[str, list[str]], what: str, where: str) -> dict[str, list[str]]:
    parts = [_levels(name) for name in names]
    owner: dict[int, tuple[str, str]] = {}
    chosen = {}
    for split, entries in lists.items():
        taken: set[int] = set()
        for entry in entries:
            pattern = PurePosixPath(entry).parts
            matched = {i for i, p in enumerate(parts)
                       if len(p) >= len(pattern) and all(fnmatchcase(a, b) for a, b in zip(p, pattern))}
            if not matched:
                top = list(dict.fromkeys(p[0] for p in parts))
                kind = "names" if all(len(p) == 1 for p in parts) else "top-level names"
                raise ConfigError(f"data.{split} entry {entry!r} matches no {what} {where}; its {kind} are: {_shown(top)}")
            for i in sorted(matched):
                if i in owner and owner[i][0] != split:
                    other, by = owner[i]
                    both = sum(1 for j in matched if j in owner and owner[j][0] != split)
                    more = f" (and {both - 1} more)" if both > 1 else ""
                    raise ConfigError(f"{what} {names[i]} is in both data.{other} (by {by!r}) and data.{split} "
                                      f"(by {entry!r}){more}; give each {what} to one split only")
                owner.setdefault(i, (split, entry))
            taken |= matched
        chosen[split] = [names[i] for i in sorted(taken)]
    return chosen


def _dealt(names: Sequence[str], cfg: Any, standard: Mapping[str, Sequence[str]] | None, deal_level: int | None,
           what: str, where: str) -> dict[str, list[str]]:
    unit_of = [name if deal_level is None else "/".join(_levels(name)[:deal_level]) for name in names]
    units = list(dict.fromkeys(unit_of))
    ratios = getattr(cfg, "ratios", None)
    if ratios is None:
        ratios = [len(standard[s]) for s in SPLIT_NAMES] if standard is not None else list(DEFAULT_RATIOS)
    weights = np.asarray(ratios, dtype=np.float64)
    seed = getattr(cfg, "split_seed", None)
    order = np.random.default_rng(seed if seed is not None else 0).permutation(len(units))
    bounds = np.round(np.cumsum(weights) / weights.sum() * len(units)).astype(int)
    split_of = {}
    for split, part in zip(SPLIT_NAMES, np.split(order, bounds[:2])):
        if len(part) == 0:
            unit = what if deal_level is None else "group"
            plural = f"{unit}es" if unit.endswith("s") else f"{unit}s"
            raise DataError(f"data.ratios={list(ratios)} leaves the {split} split no {unit} of the {len(units)} {where}; "
                            f"add {plural} or change data.ratios")
        split_of.update((units[u], split) for u in part.tolist())
    return {split: [name for name, unit in zip(names, unit_of) if split_of[unit] == split] for split in SPLIT_NAMES}


def uses_standard_split(cfg: Any) -> bool:
    """Whether ``choose_split`` gives the standard split (where the dataset has one): no names, no split_seed."""
    return not any(getattr(cfg, split) for split in SPLIT_NAMES) and getattr(cfg, "split_seed", None) is None


def split_indices(names: Sequence[str], chosen: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """``choose_split``'s names as indices into ``names``."""
    index = {name: i for i, name in enumerate(names)}
    return {split: [index[name] for name in chosen[split]] for split in chosen}


def regroup(stores: Mapping[str, ClassStore], chosen: Mapping[str, Sequence[str]], mean: tuple[float, ...] | None,
            std: tuple[float, ...] | None) -> dict[str, ClassStore]:
    """ClassStores of the ``chosen`` class names, taken from ``stores`` (a dataset whose files hold one
    split each, such as miniImageNet's pickles): each split's images are copied into memory."""
    where = {name: (store, c) for store in stores.values() for c, name in enumerate(store.class_names)}
    out = {}
    for split, names in chosen.items():
        pieces = [store.images[int(store.offsets[c]) : int(store.offsets[c] + store.counts[c])]
                  for store, c in (where[name] for name in names)]
        counts = torch.tensor([len(piece) for piece in pieces], dtype=torch.long)
        labels = torch.arange(len(names)).repeat_interleave(counts)
        out[split] = ClassStore(torch.cat(pieces), labels, list(names), mean=mean, std=std)
    return out


# ---------------------------------------------------------------- where data is read and written


@dataclass(frozen=True)
class DataDirs:
    """A dataset's folder under the data root (read) and under the cache directory (written).

    ``root`` is ``<data.root>/<folder>``: the user's files are looked for there first. ``out`` is
    ``<data.cache_dir>/<folder>``, or ``root`` when ``data.cache_dir`` is null: downloads, extracted
    archives and caches go there, so a read-only or shared data root works with a cache_dir elsewhere
    and is never written to.
    """

    root: Path
    out: Path

    @property
    def separate(self) -> bool:
        return self.out != self.root

    def find(self, *relative: str) -> Path:
        """The file or folder ``relative`` under ``root`` if there, else under ``out`` (where it is made)."""
        here = self.root.joinpath(*relative)
        return here if here.exists() or not self.separate else self.out.joinpath(*relative)

    def cache(self, name: str) -> Path:
        """Where the cache file ``name`` is written: ``out/cache/name``."""
        return self.out / "cache" / name

    def read_first(self, path: Path) -> list[Path]:
        """``path`` (under ``out``) and, when the cache directory is elsewhere, its twin under ``root`` first."""
        if self.separate:
            try:
                return [self.root / path.relative_to(self.out), path]
            except ValueError:
                pass
        return [path]

    @property
    def fix(self) -> str:
        if self.separate:
            return "make data.cache_dir writable (with room), or set it to another folder"
        return ("set data.cache_dir=<a writable folder> (metalearn then keeps downloads, extracted archives "
                "and caches there and only reads data.root)")

    def ensure_writable(self, folder: Path, what: str) -> None:
        """Check, before a download, an extraction or a cache build, that ``folder`` can be made and written
        (a temp folder is made and removed in its nearest existing parent: nothing stays behind); a
        refusal is one StorageError line saying to set data.cache_dir."""
        parent = folder.absolute()
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        try:
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{parent} is a file")
            os.rmdir(tempfile.mkdtemp(prefix=".metalearn-write-check-", dir=parent))
        except OSError as e:
            raise StorageError(f"cannot write {what} into {folder} ({e.strerror or e}); {self.fix}") from None

    def refused(self, error: StorageError, what: str) -> StorageError:
        """A write refused midway (a full disk), with the data fix instead of the run directory's."""
        return StorageError(f"{str(error).split('; ')[0]} ({what}); {self.fix}")


def data_dirs(cfg: Any, folder: str | None = None) -> DataDirs:
    """The DataDirs of ``<folder or cfg.name>`` for a config with ``root`` and ``cache_dir``."""
    name = folder or cfg.name
    root = Path(cfg.root).expanduser() / name
    cache_dir = getattr(cfg, "cache_dir", None)
    return DataDirs(root, Path(cache_dir).expanduser() / name if cache_dir else root)


# ---------------------------------------------------------------- image datasets


@dataclass
class ImageConfig(SplitConfig):
    """Options every image dataset has; a dataset's ``Config`` subclasses this and sets ``name``."""

    name: str = ""
    # Data root shared by all datasets; each keeps its files in <root>/<dataset>/.
    root: str = "~/.cache/metalearn"
    # Where metalearn writes (downloads, extracted archives, decoded caches) in <cache_dir>/<dataset>/;
    # null: the data root. Reads look in the data root first.
    cache_dir: Optional[str] = None
    download: bool = True  # fetch missing official archives (checksum checked), where a download exists
    image_size: int = 84
    normalize: bool = True  # subtract the dataset's per-channel mean, divide by its std
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Each class's images turned by 90/180/270 degrees as three more classes: false | true (every split, as
    # Vinyals et al. on Omniglot) | a list of splits, e.g. [train]. Turned when drawn: no copy is kept.
    rotations: Any = False


def rotation_splits(value: Any) -> tuple[str, ...]:
    """The splits whose classes ``data.rotations`` turns into four: false/null none, true every split, or the
    splits listed; anything else is a one-line ConfigError."""
    if value is None or value is False:
        return ()
    if value is True:
        return SPLIT_NAMES
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v in SPLIT_NAMES for v in value):
        return tuple(split for split in SPLIT_NAMES if split in value)
    raise ConfigError(f"data.rotations must be true, false or a list of splits from {list(SPLIT_NAMES)} "
                      f"(got {value!r}), e.g. data.rotations=[train]")


def add_rotations(cfg: Any, stores: Mapping[str, Any]) -> None:
    """Turn the classes of the splits ``data.rotations`` names into four (``ClassStore.rotate_classes``), unless
    their dataset already did (``store.rotated``); a dataset config without the key has none."""
    for split in rotation_splits(getattr(cfg, "rotations", False)):
        store = stores.get(split)
        if isinstance(store, ClassStore) and not store.rotated:
            store.rotate_classes()


def dataset_dir(cfg: ImageConfig, folder: str | None = None) -> Path:
    """``<root>/<folder or cfg.name>``, with ``~`` expanded."""
    return Path(cfg.root).expanduser() / (folder or cfg.name)


def check_image_config(cfg: ImageConfig) -> None:
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1 (got {cfg.image_size})")
    check_augment(cfg.augment)
    rotation_splits(cfg.rotations)


def episode_transforms(cfg: Any, train_store: Any) -> tuple[Callable | None, Callable | None]:
    """The (training, evaluation) input transforms of a run's data config; None means scale to [0, 1]."""
    normalize = bool(getattr(cfg, "normalize", False)) and getattr(train_store, "mean", None) is not None
    augment = getattr(cfg, "augment", None)
    mean, std = (train_store.mean, train_store.std) if normalize else (None, None)
    train = EpisodeTransform(mean, std, augment) if normalize or (augment is not None and augment.enabled) else None
    evaluation = EpisodeTransform(mean, std) if normalize else None
    return train, evaluation


def read_cache(path: Path, meta: dict, what: str) -> dict | None:
    """The dict saved at ``path`` if it exists and its ``meta`` entries match, else None."""
    try:
        data = torch.load(path, weights_only=True, mmap=True)
        if all(data.get(k) == v for k, v in meta.items()):
            return data
    except FileNotFoundError:
        pass
    except Exception as e:  # an unreadable cache is only a cache: rebuild it
        log.warning("%s cache %s is unreadable (%s); rebuilding it", what, path, e)
    return None


def cached(path: Path, meta: dict, build: Callable[[], dict], what: str, dirs: DataDirs | None = None,
           root_first: bool = True) -> dict:
    """The dict saved at ``path`` if its ``meta`` entries match, else ``build()`` (saved atomically, with ``meta``).

    ``meta`` records what the cache was built from (source files' sizes and times, image size,
    a version): when any changes, the cache is rebuilt instead of silently reused. With ``dirs``
    (``path`` under ``dirs.out``), a current copy under the data root is read first (unless
    ``root_first`` is false), and the cache directory is checked to be writable before the build starts.
    """
    for candidate in dirs.read_first(path) if dirs is not None and root_first else [path]:
        data = read_cache(candidate, meta, what)
        if data is not None:
            return data
    if dirs is not None:
        dirs.ensure_writable(path.parent, f"the {what} cache")
    log.info("building the %s cache %s (once)", what, path)
    data = {**meta, **build()}
    try:
        atomic_torch_save(data, path)
    except StorageError as e:
        if dirs is None:
            raise
        raise dirs.refused(e, f"the {what} cache") from None
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        log.warning("cannot write the %s cache %s (%s); the next load will build it again", what, path, str(e).splitlines()[0])
    return data


def file_signature(*paths: Path) -> list[list]:
    """Name, size and mtime of each file: enough to notice a replaced source file."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def fetch(path: Path, url: str, allowed: bool, md5: str | None, size_note: str = "", dirs: DataDirs | None = None) -> bool:
    """Make sure the file ``path`` exists, downloading it from ``url`` (md5 checked) if ``allowed``.

    With ``dirs``, ``path`` is ``dirs.find(name)``: a missing file is downloaded into the cache directory.
    Returns whether it was just downloaded (a file put there by hand may deserve its own check).
    """
    if path.is_file():
        return False
    if not allowed:
        folders = f"{dirs.root} or {dirs.out}" if dirs is not None and dirs.separate else str(path.parent)
        raise DataError(f"{path.name} not found in {folders} and data.download=false; "
                        f"download {url} into {'one of them' if dirs is not None and dirs.separate else 'that folder'}, "
                        "or set data.download=true")
    if dirs is not None:
        dirs.ensure_writable(path.parent, f"the download of {path.name}")
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
