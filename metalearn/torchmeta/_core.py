"""torchmeta's dataset classes: classes, tasks and meta-datasets.

Two kinds of data sit behind the same classes:

- metalearn's native datasets (``metalearn.torchmeta.datasets``): a ``StoreClassDataset`` over a
  ``ClassStore`` (uint8 images in memory), whose tasks are ``StoreTask``s that read a whole task,
  or a whole batch of tasks, in one indexing op;
- your own: subclass ``ClassDataset`` (``num_classes``, and ``__getitem__(i)`` giving a torch
  ``Dataset`` of the samples of class ``i``, each ``(input, target)``) and wrap it in a
  ``CombinationMetaDataset``; or subclass ``MetaDataset`` (``__len__``, ``__getitem__``) as the
  ``toy`` datasets do. Their tasks are ``ConcatTask``/``SubsetTask``s read sample by sample.

Everything random about a task (which samples each class gives to which split, the labels
``Categorical`` draws, augmentation in metalearn's EpisodeTransform) comes from the task's
``generator``, seeded by the task's index (a tuple of classes), the dataset's seed and the
splitter's seed: the same task always holds the same samples, in any process, with any number
of DataLoader workers (torchmeta's "one task, one dataset" rule). Which tasks a loader draws
comes from its sampler.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from collections import OrderedDict
from itertools import combinations
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from torch.utils.data import default_collate

from metalearn.data.episodes import ClassStore
from metalearn.data.transforms import EpisodeTransform
from metalearn.torchmeta._errors import InvalidArgument, unsupported
from metalearn.torchmeta.transforms.augmentations import ClassAugmentation
from metalearn.torchmeta.transforms.categorical import Categorical
from metalearn.torchmeta.transforms.tensor_transforms import Compose, Image, ImageTransform, TensorTransform, ToTensor, _to_pil

SPLITS = ("train", "val", "test")


def meta_split_of(meta_train: bool, meta_val: bool, meta_test: bool, meta_split: str | None) -> str:
    """torchmeta's rule: exactly one of the flags, or ``meta_split`` in train/val/test."""
    flags = int(bool(meta_train)) + int(bool(meta_val)) + int(bool(meta_test))
    if flags > 1:
        raise InvalidArgument("more than one of meta_train, meta_val and meta_test is True; set exactly one")
    if flags == 1:
        split = "train" if meta_train else "val" if meta_val else "test"
        if meta_split is not None and meta_split != split:
            raise InvalidArgument(f"meta_split={meta_split!r} contradicts meta_{split}=True; give one of them")
        return split
    if meta_split is None:
        raise InvalidArgument("the meta-split is undefined; give meta_train=True (or meta_val/meta_test) or meta_split='train'")
    if meta_split not in SPLITS:
        raise InvalidArgument(f"unknown meta_split={meta_split!r}; use one of {', '.join(SPLITS)}")
    return meta_split


class _SplitFlags:
    """torchmeta's ``meta_train``/``meta_val``/``meta_test`` flags, read from ``meta_split``."""

    meta_split: str

    @property
    def meta_train(self) -> bool:
        return self.meta_split == "train"

    @property
    def meta_val(self) -> bool:
        return self.meta_split == "val"

    @property
    def meta_test(self) -> bool:
        return self.meta_split == "test"


def _task_seed(classes: tuple, *seeds: Any) -> int:
    """A 63-bit seed from a task's index and the seeds: the same everywhere, every run."""
    text = ",".join(map(str, (*classes, "|", *seeds))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _transform_kind(transform: Any) -> str:
    """How a dataset's ``transform`` is fed: see the ``transforms`` package docstring."""
    if transform is None:
        return "none"
    if isinstance(transform, EpisodeTransform):
        return "episode"
    if isinstance(transform, ImageTransform):
        return "batched" if transform.batched else _transform_kind_of_first(transform)
    if isinstance(transform, TensorTransform):
        return "float"
    if not callable(transform):
        raise InvalidArgument(f"transform={transform!r} is not callable; give a callable on an image, or None")
    return "pil"


def _transform_kind_of_first(compose: Any) -> str:
    first = compose.transforms[0] if getattr(compose, "transforms", None) else None
    if isinstance(first, ImageTransform):
        return "uint8"
    if isinstance(first, TensorTransform):
        return "float"
    return "pil"


def _as_output(x: Any) -> Any:
    """A per-image transform's result, as a tensor where it is an image or an array."""
    if isinstance(x, Image.Image):
        return ToTensor()(x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def _flatten_augmentations(augmentations: list | None, native: bool) -> list:
    """The single class augmentations of ``class_augmentations`` (a group such as ``Rotation([90, 180])``
    counts as one per angle), repeats dropped with a warning as torchmeta does. Native datasets apply
    them to uint8 tensors, so they need this package's ``ClassAugmentation``s; your own
    ``ClassDataset`` applies them itself (``get_transform``), so any callable will do there."""
    if augmentations is None:
        return []
    if not isinstance(augmentations, list):
        raise InvalidArgument(f"class_augmentations must be a list, e.g. [Rotation([90, 180, 270])] (got {type(augmentations).__name__})")
    flat: list = []
    for group in augmentations:
        if isinstance(group, ClassAugmentation):
            singles = list(group)
        elif native or not callable(group):
            raise unsupported(f"class augmentation {group!r}",
                              "use Rotation, HorizontalFlip or VerticalFlip from metalearn.torchmeta.transforms")
        else:
            singles = [group]
        for aug in singles:
            if aug in flat:
                warnings.warn(f"class augmentation {aug!r} is listed twice; the repeat is ignored", UserWarning, stacklevel=4)
                continue
            flat.append(aug)
    return flat


# ----------------------------------------------------------------------------- classes

class ClassDataset(_SplitFlags):
    """torchmeta's base class of a dataset of classes: ``dataset[i]`` holds the samples of class ``i``.

    Subclass it for your own data: call ``super().__init__(meta_train=..., ...)`` (exactly one of
    the flags, or ``meta_split``), define the ``num_classes`` property (classes before
    augmentation) and ``__getitem__(index)``, returning a torch ``Dataset`` whose items are
    ``(input, target)``. Class ``index`` is class ``index % num_classes`` under augmentation
    ``get_class_augmentation(index)`` (None for the first ``num_classes``): apply it in
    ``__getitem__``, e.g. with ``get_transform(index, self.transform)``.
    """

    def __init__(self, meta_train: bool = False, meta_val: bool = False, meta_test: bool = False,
                 meta_split: str | None = None, class_augmentations: list | None = None):
        self.meta_split = meta_split_of(meta_train, meta_val, meta_test, meta_split)
        self.class_augmentations = _flatten_augmentations(class_augmentations, native=False)

    @property
    def num_classes(self) -> int:
        """The classes before augmentation; a subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define the num_classes property")

    def __len__(self) -> int:
        return self.num_classes * (len(self.class_augmentations) + 1)

    def __getitem__(self, index: int) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__(index), the dataset of class index")

    def get_class_augmentation(self, index: int) -> Any:
        """The class augmentation behind class ``index``; None for an original class."""
        aug = index // self.num_classes
        return None if aug == 0 else self.class_augmentations[aug - 1]

    def get_transform(self, index: int, transform: Callable | None = None) -> Callable | None:
        """``transform`` preceded by class ``index``'s augmentation (torchmeta's)."""
        augmentation = self.get_class_augmentation(index)
        if augmentation is None:
            return transform
        return augmentation if transform is None else Compose([augmentation, transform])

    def class_name(self, index: int) -> str:
        aug = index // self.num_classes
        base = str(index % self.num_classes)
        return base if aug == 0 else f"{base}/{self.class_augmentations[aug - 1]!r}"

    @property
    def class_names(self) -> list[str]:
        return [self.class_name(i) for i in range(len(self))]

    def check_index(self, index: Any) -> int:
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            index = int(index)
        if isinstance(index, np.integer):
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise InvalidArgument(f"a class index must be an int (got {index!r})")
        if not 0 <= index < len(self):
            raise InvalidArgument(f"class index {index} is out of range: the {self.meta_split} split has {len(self)} classes")
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.meta_split}: {self.num_classes} classes x {len(self.class_augmentations) + 1})"


class StoreClassDataset(ClassDataset):
    """The classes of one split of a native dataset: the store's classes, then each class
    augmentation of them (torchmeta's numbering). ``dataset[i]`` is a task of every sample of class ``i``."""

    def __init__(self, store: ClassStore, meta_split: str, transform: Any = None,
                 class_augmentations: list | None = None):
        if not isinstance(store, ClassStore):
            raise unsupported(f"a StoreClassDataset over a {type(store).__name__}",
                              "subclass metalearn.torchmeta.utils.data.ClassDataset for your own data")
        if store.images.dim() != 4:
            raise unsupported("feature-vector stores", "metalearn.torchmeta datasets are image datasets")
        super().__init__(meta_split=meta_split)
        self.store = store.materialized()  # lazily turned classes (data.rotations) stored: rows are read by offset
        self.transform = transform
        self.transform_kind = _transform_kind(transform)
        self.class_augmentations = _flatten_augmentations(class_augmentations, native=True)

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    def class_name(self, index: int) -> str:
        name = self.store.class_names[index % self.num_classes]
        aug = index // self.num_classes
        return name if aug == 0 else f"{name}/{self.class_augmentations[aug - 1]!r}"

    def count(self, index: int) -> int:
        return int(self.store.counts[index % self.num_classes])

    def images(self, index: int, samples: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[n, C, H, W]`` of samples ``samples`` (positions within the class) of class ``index``."""
        return self.gather([index], [samples])

    def gather(self, classes: list[int], samples: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images of ``samples[k]`` of class ``classes[k]``, for all k, concatenated in one read."""
        n = self.num_classes
        counts = [len(s) for s in samples]
        base = torch.tensor([c % n for c in classes])
        rows = torch.cat(samples) + torch.repeat_interleave(self.store.offsets[base], torch.tensor(counts))
        x = self.store.images[rows]
        augs = [c // n for c in classes]
        if any(augs):
            per_sample = torch.repeat_interleave(torch.tensor(augs), torch.tensor(counts))
            for a in sorted(set(augs) - {0}):
                mask = per_sample == a
                x[mask] = self.class_augmentations[a - 1].apply(x[mask])
        return x

    def transform_image(self, image: torch.Tensor, generator: torch.Generator) -> Any:
        """One uint8 image ``[C, H, W]`` through the dataset's ``transform``, fed as its kind needs."""
        kind, transform = self.transform_kind, self.transform
        if kind == "none":
            return image.float().div_(255.0)
        if kind == "episode":
            return transform(image, generator)
        if kind in ("batched", "uint8"):
            return _as_output(transform(image))
        if kind == "float":
            return _as_output(transform(image.float().div_(255.0)))
        return _as_output(transform(_to_pil(image)))

    def __getitem__(self, index: int) -> "StoreTask":
        index = self.check_index(index)
        samples = torch.arange(self.count(index))
        return StoreTask(self, [index], [samples], [index], torch.Generator().manual_seed(_task_seed((index,), 0)))


# ----------------------------------------------------------------------------- tasks

class Task(Dataset):
    """torchmeta's base class of a task: a dataset of ``(input, target)`` samples of
    ``num_classes`` classes (None: a regression task).

    ``generator`` is the task's random generator (set by the meta-dataset; None for a task made
    by hand): splitters seed their draws from it, so a task splits the same way every time.
    ``tensors()`` gives the whole task at once, ``[inputs [n, ...], targets [n]]``.
    """

    generator: torch.Generator | None = None

    def __init__(self, num_classes: int | None, transform: Callable | None = None,
                 target_transform: Callable | None = None):
        self.num_classes = num_classes
        self.transform = transform
        self.target_transform = target_transform

    def tensors(self) -> list:
        """``[inputs, targets]`` of the whole task (torchmeta's collated task)."""
        return default_collate([self[j] for j in range(len(self))])

    def class_groups(self) -> list[list[int]]:
        """The positions of each class's samples, classes in order of appearance (all of them as one
        group for a regression task): what a splitter splits. Reads every target (torchmeta's way);
        the tasks of this module know their classes without reading."""
        if self.num_classes is None:
            return [list(range(len(self)))]
        groups: dict[Any, list[int]] = {}
        for j in range(len(self)):
            sample = self[j]
            if not isinstance(sample, (tuple, list)) or len(sample) < 2:
                raise InvalidArgument("a splitter reads the targets: each sample of a task must be a tuple "
                                      "(input, ..., target)")
            target = sample[-1]
            key = target.item() if isinstance(target, torch.Tensor) and target.numel() == 1 else target
            groups.setdefault(key, []).append(j)
        return list(groups.values())

    def subset(self, indices: Iterable[int]) -> "Task":
        """The task of the samples at ``indices``, in that order."""
        return SubsetTask(self, list(indices))

    def __getitems__(self, indices: list[int]) -> list:
        # DataLoader's batched fetch; torch's Subset/ConcatDataset versions would skip this class's targets
        return [self[j] for j in indices]


class StoreTask(Task):
    """A task over a ``StoreClassDataset``: ``samples[k]`` (positions within the class) of class
    ``classes[k]``, with target ``targets[k]``, for each entry k; samples grouped by entry.

    ``task[j]`` is ``(image, target)`` like torchmeta's; ``tensors()`` reads the whole task in one
    go and transforms it at once where the transform allows (what ``BatchMetaDataLoader`` uses).
    """

    def __init__(self, source: StoreClassDataset, classes: list[int], samples: list[torch.Tensor],
                 targets: list[Any], generator: torch.Generator, num_classes: int | None = None):
        super().__init__(len(classes) if num_classes is None else num_classes)
        self.source, self.classes, self.samples, self.targets = source, classes, samples, targets
        self.generator = generator
        self.counts = [len(s) for s in samples]
        self._ends = np.cumsum(self.counts)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, index: int) -> tuple[int, int]:
        """(entry, position within the entry) of sample ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"task index {index} out of range for a task of {len(self)} samples")
        index %= len(self)
        k = int(np.searchsorted(self._ends, index, side="right"))
        return k, index - (int(self._ends[k - 1]) if k else 0)

    def __getitem__(self, index: int):
        k, j = self._locate(index)
        image = self.source.images(self.classes[k], self.samples[k][j : j + 1])[0]
        return self.source.transform_image(image, self.generator), self.targets[k]

    def tensors(self) -> list:
        stacked = stack_tasks([self])
        if stacked is not None:
            return [stacked[0][0], stacked[1][0]]
        return super().tensors()

    def class_groups(self) -> list[list[int]]:
        # Entries with equal targets are one class (a one-vs-all task's "rest" is many entries).
        groups: dict[Any, list[int]] = {}
        start = 0
        for k, (target, count) in enumerate(zip(self.targets, self.counts)):
            key = target if isinstance(target, (int, np.integer, str)) else ("entry", k)
            groups.setdefault(key, []).extend(range(start, start + count))
            start += count
        return list(groups.values())

    def subset(self, indices: Iterable[int]) -> "StoreTask":
        """The samples at ``indices`` as a StoreTask (runs of one entry become entries), so a split
        task still reads in one go."""
        runs: list[tuple[int, list[int]]] = []  # (entry, positions within it)
        for index in indices:
            k, j = self._locate(int(index))
            if runs and runs[-1][0] == k:
                runs[-1][1].append(j)
            else:
                runs.append((k, [j]))
        return StoreTask(self.source, [self.classes[k] for k, _ in runs], [self.samples[k][run] for k, run in runs],
                         [self.targets[k] for k, _ in runs], self.generator, num_classes=self.num_classes)

    def split(self, splits: "OrderedDict[str, int]", shuffle: bool,
              generator: torch.Generator) -> "OrderedDict[str, StoreTask]":
        """ClassSplitter's work: ``{split: StoreTask}`` with ``splits[split]`` samples of every class, the order
        drawn from ``generator`` (the splitter's for this task: the same task splits the same way every time)."""
        need = sum(splits.values())
        for c, count in zip(self.classes, self.counts):
            if count < need:
                raise InvalidArgument(
                    f"class {self.source.class_name(c)} has {count} samples, fewer than the {need} "
                    f"ClassSplitter takes per class ({', '.join(f'{k}={v}' for k, v in splits.items())}); lower them"
                )
        # One draw for the whole task: a random order of each class's samples (padding slots sort last).
        most = max(self.counts)
        if shuffle:
            noise = torch.rand(len(self.counts), most, generator=generator)
            if min(self.counts) < most:
                noise.masked_fill_(torch.arange(most) >= torch.tensor(self.counts)[:, None], 2.0)
            order = noise.argsort(dim=1)[:, :need]
        else:
            order = torch.arange(need).expand(len(self.counts), need)
        if all(len(s) == most for s in self.samples):
            padded = torch.stack(self.samples)
        else:
            padded = torch.zeros(len(self.samples), most, dtype=torch.long)
            for k, s in enumerate(self.samples):
                padded[k, : len(s)] = s
        chosen = padded.gather(1, order).split(list(splits.values()), dim=1)
        return OrderedDict((name, StoreTask(self.source, self.classes, list(part.unbind(0)), self.targets,
                                            self._child_generator(name), num_classes=self.num_classes))
                           for name, part in zip(splits, chosen))

    def _child_generator(self, split: str) -> torch.Generator:
        """A split's own generator (for its transforms' draws), from this task's seed and the split's name: a
        split's augmentations do not depend on which split is read first."""
        generator = torch.Generator(device=self.generator.device)
        return generator.manual_seed(_task_seed((self.generator.initial_seed(),), "split", split))

    def __repr__(self) -> str:
        return f"StoreTask({self.num_classes} classes, {len(self)} samples)"


class ConcatTask(Task, ConcatDataset):
    """torchmeta's ``ConcatTask``: the samples of ``datasets`` one after the other, each dataset one
    class of a ``num_classes``-way task; ``target_transform`` maps each sample's target."""

    def __init__(self, datasets: list, num_classes: int | None, target_transform: Callable | None = None):
        Task.__init__(self, num_classes, target_transform=target_transform)
        ConcatDataset.__init__(self, datasets)
        # A fixed label per dataset (set by the meta-datasets for Categorical): wins over target_transform.
        self.labels: list[Any] | None = None

    def _target(self, k: int, target: Any) -> Any:
        if self.labels is not None:
            return self.labels[k]
        return target if self.target_transform is None else self.target_transform(target)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"task index {index} out of range for a task of {len(self)} samples")
        index %= len(self)
        k = int(np.searchsorted(self.cumulative_sizes, index, side="right"))
        sample = self.datasets[k][index - (self.cumulative_sizes[k - 1] if k else 0)]
        return (*sample[:-1], self._target(k, sample[-1]))

    def class_groups(self) -> list[list[int]]:
        starts = [0, *self.cumulative_sizes[:-1]]
        return [list(range(a, b)) for a, b in zip(starts, self.cumulative_sizes)]

    def as_store_task(self) -> StoreTask | None:
        """The task as one StoreTask when all its datasets are StoreTasks of one source, else None."""
        if not self.datasets or not all(isinstance(d, StoreTask) for d in self.datasets):
            return None
        source = self.datasets[0].source
        if any(d.source is not source for d in self.datasets):
            return None
        classes, samples, targets = [], [], []
        for k, d in enumerate(self.datasets):
            classes += d.classes
            samples += d.samples
            targets += [self._target(k, t) for t in d.targets]
        return StoreTask(source, classes, samples, targets, self.generator, num_classes=self.num_classes)

    def tensors(self) -> list:
        store = self.as_store_task()
        return store.tensors() if store is not None else super().tensors()

    def subset(self, indices: Iterable[int]) -> Task:
        store = self.as_store_task()
        return store.subset(indices) if store is not None else SubsetTask(self, list(indices))

    def __repr__(self) -> str:
        return f"ConcatTask({self.num_classes} classes, {len(self)} samples)"


class SubsetTask(Task, Subset):
    """torchmeta's ``SubsetTask``: the samples of ``dataset`` at ``indices``; ``target_transform``
    maps each sample's target."""

    def __init__(self, dataset: Dataset, indices: list[int], num_classes: int | None = None,
                 target_transform: Callable | None = None):
        Task.__init__(self, getattr(dataset, "num_classes", None) if num_classes is None else num_classes,
                      target_transform=target_transform)
        Subset.__init__(self, dataset, indices)
        self.generator = getattr(dataset, "generator", None)

    def __getitem__(self, index: int):
        sample = self.dataset[self.indices[index]]
        if self.target_transform is None:
            return sample
        return (*sample[:-1], self.target_transform(sample[-1]))

    def class_groups(self) -> list[list[int]]:
        if not isinstance(self.dataset, Task) or self.target_transform is not None:
            return super().class_groups()
        group_of = {}
        for g, members in enumerate(self.dataset.class_groups()):
            for j in members:
                group_of[j] = g
        groups: dict[int, list[int]] = {}
        for position, index in enumerate(self.indices):
            groups.setdefault(group_of[int(index)], []).append(position)
        return list(groups.values())

    def __repr__(self) -> str:
        return f"SubsetTask({self.num_classes} classes, {len(self)} samples)"


def as_store_task(task: Any) -> StoreTask | None:
    """``task`` as a StoreTask where it is one (or a ConcatTask of them), else None."""
    if isinstance(task, StoreTask):
        return task
    if isinstance(task, ConcatTask):
        return task.as_store_task()
    return None


def stack_tasks(tasks: list[StoreTask]) -> list | None:
    """``[inputs [B, n, C, H, W], targets [B, n]]`` of tasks of the same source and size, read in one
    go; None where that does not apply (per-image transforms, other targets, unequal tasks)."""
    source, n = tasks[0].source, len(tasks[0])
    if source.transform_kind not in ("none", "episode", "batched"):
        return None
    for task in tasks:
        if task.source is not source or len(task) != n:
            return None
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in task.targets):
            return None
    x = source.gather([c for t in tasks for c in t.classes], [s for t in tasks for s in t.samples])
    x = x.view(len(tasks), n, *x.shape[1:])
    if source.transform_kind == "none":
        x = x.float().div_(255.0)
    elif source.transform_kind == "episode":  # each task with its own generator: a task's draws do not depend on its batch
        x = torch.stack([source.transform(x[b], task.generator) for b, task in enumerate(tasks)])
    else:
        x = _as_output(source.transform(x))
    targets = [int(t) for task in tasks for t in task.targets]
    counts = [c for task in tasks for c in task.counts]
    y = torch.repeat_interleave(torch.tensor(targets, dtype=torch.long), torch.tensor(counts))
    return [x, y.view(len(tasks), n)]


# ----------------------------------------------------------------------------- meta-datasets

class MetaDataset(_SplitFlags):
    """torchmeta's base class of a meta-dataset: ``dataset[index]`` is a task.

    Subclass it for tasks of your own (define ``__len__`` and ``__getitem__``, and apply
    ``self.dataset_transform`` to the task you make). ``dataset_transform`` is a splitter
    (``ClassSplitter``, ``WeightedClassSplitter`` or your own ``Splitter``) or None.
    ``seed(seed)`` fixes ``sample_task``'s draws and, in this package's datasets, every task.
    """

    def __init__(self, meta_train: bool = False, meta_val: bool = False, meta_test: bool = False,
                 meta_split: str | None = None, target_transform: Callable | None = None,
                 dataset_transform: Any = None):
        self.meta_split = meta_split_of(meta_train, meta_val, meta_test, meta_split)
        if target_transform is not None and not callable(target_transform):
            raise InvalidArgument(f"target_transform={target_transform!r} is not callable")
        self.target_transform = target_transform
        self.dataset_transform = dataset_transform
        self.seed(None)

    @property
    def dataset_transform(self) -> Any:
        return self._dataset_transform

    @dataset_transform.setter
    def dataset_transform(self, value: Any) -> None:
        # A Splitter, told by its interface: transforms.splitters imports this module, not the other way round.
        if value is not None and not callable(getattr(value, "get_indices", None)):
            raise unsupported(f"dataset_transform={value!r}",
                              "use ClassSplitter(shuffle=..., num_train_per_class=..., num_test_per_class=...), "
                              "WeightedClassSplitter, a Splitter subclass, or None")
        self._dataset_transform = value

    def seed(self, seed: int | None = None) -> None:
        """Seed the dataset: ``sample_task``'s draws (and, in the datasets of this package, every task) depend on it."""
        self._seed = None if seed is None else int(seed)
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def sample_task(self):
        """A task drawn at random (from the dataset's seed, if it has one)."""
        return self[int(torch.randint(len(self), (), generator=self._generator))]

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__")

    def __getitem__(self, index):
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__")


class CombinationMetaDataset(MetaDataset):
    """torchmeta's ``CombinationMetaDataset``: tasks of ``num_classes_per_task`` classes of a ``ClassDataset``.

    ``dataset[(i, j, ...)]`` is the task of those classes: a task of every sample of each, or,
    with a splitter as ``dataset_transform``, ``OrderedDict(train=task, test=task)``.
    ``len(dataset)`` is the number of class combinations; iterating goes through them in order.
    Targets: with ``Categorical(N)``, a random permutation's labels 0..N-1 per task (from the
    task's generator); with another ``target_transform``, its value on each sample's target;
    without, the class index in ``dataset.dataset`` (native datasets) or the target your class
    datasets give.
    """

    def __init__(self, dataset: ClassDataset, num_classes_per_task: int, target_transform: Callable | None = None,
                 dataset_transform: Any = None):
        if not isinstance(dataset, ClassDataset):
            raise unsupported(f"{type(self).__name__} over a {type(dataset).__name__}",
                              "subclass metalearn.torchmeta.utils.data.ClassDataset (num_classes, __getitem__)")
        if not isinstance(num_classes_per_task, int) or isinstance(num_classes_per_task, bool) or num_classes_per_task < 1:
            raise InvalidArgument(f"num_classes_per_task must be a positive int, the ways of each task (got {num_classes_per_task!r})")
        if num_classes_per_task > len(dataset):
            raise InvalidArgument(
                f"num_classes_per_task={num_classes_per_task} is more than the {len(dataset)} classes of the "
                f"{dataset.meta_split} split; lower it"
            )
        self.dataset = dataset
        self.num_classes_per_task = num_classes_per_task
        super().__init__(meta_split=dataset.meta_split, target_transform=target_transform,
                         dataset_transform=dataset_transform)

    def __len__(self) -> int:
        n = math.comb(len(self.dataset), self.num_classes_per_task)
        if n > sys.maxsize:
            warnings.warn(f"the number of tasks C({len(self.dataset)}, {self.num_classes_per_task}) exceeds "
                          "sys.maxsize; len() reports sys.maxsize", UserWarning, stacklevel=2)
            return sys.maxsize
        return n

    def __iter__(self):
        for index in combinations(range(len(self.dataset)), self.num_classes_per_task):
            yield self[index]

    def sample_task(self):
        """A task of ``num_classes_per_task`` distinct classes drawn at random."""
        perm = torch.randperm(len(self.dataset), generator=self._generator)
        return self[tuple(perm[: self.num_classes_per_task].tolist())]

    def task_generator(self, index: tuple) -> torch.Generator:
        """The generator of task ``index``: a function of the classes, the dataset's and the splitter's seeds."""
        splitter = self.dataset_transform
        seeds = (self._seed or 0, splitter.random_state_seed if splitter is not None else 0)
        return torch.Generator().manual_seed(_task_seed(index, *seeds))

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            example = ", ".join(map(str, range(self.num_classes_per_task)))
            raise InvalidArgument(
                f"a task is indexed by a tuple of {self.num_classes_per_task} class indices, not an int: "
                f"e.g. dataset[({example})] (got {index})"
            )
        classes = tuple(self.dataset.check_index(i) for i in index)
        if len(classes) != self.num_classes_per_task:
            raise InvalidArgument(f"task index {classes} has {len(classes)} classes; give {self.num_classes_per_task}")
        if len(set(classes)) != len(classes):
            raise InvalidArgument(f"task index {classes} repeats a class; give distinct class indices")
        generator = self.task_generator(classes)
        labels = None
        if isinstance(self.target_transform, Categorical):
            labels = self.target_transform.labels(len(classes), generator)
        if isinstance(self.dataset, StoreClassDataset):
            targets: list[Any] = list(classes) if labels is None else labels
            if labels is None and self.target_transform is not None:
                targets = [self.target_transform(c) for c in classes]
            samples = [torch.arange(self.dataset.count(c)) for c in classes]
            task: Task = StoreTask(self.dataset, list(classes), samples, targets, generator)
        else:
            task = ConcatTask([self.dataset[c] for c in classes], len(classes),
                              target_transform=None if labels is not None else self.target_transform)
            task.labels = labels
            task.generator = generator
        return task if self.dataset_transform is None else self.dataset_transform(task)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.meta_split}, {len(self.dataset)} classes, "
                f"{self.num_classes_per_task} per task, dataset_transform={self.dataset_transform!r})")


class OneVsAllMetaDataset(MetaDataset):
    """torchmeta's ``OneVsAllMetaDataset``: binary tasks, one per class of a ``ClassDataset``.

    ``dataset[i]`` (an int) is ``ConcatTask([class i, every other class])``: the samples of
    class ``i`` have target 0, all the others target 1 (``Categorical(2)``: a random one of the
    two labels per task; another ``target_transform`` maps these two). A splitter treats the two
    parts as its two classes (``ClassSplitter(num_train_per_class=5)``: 5 of class ``i``, 5 of the
    rest). ``len(dataset)`` is the number of classes. ``dataset`` may also be a
    ``CombinationMetaDataset`` (such as ``datasets.Omniglot(...)``): its classes are used.
    """

    def __init__(self, dataset: ClassDataset, target_transform: Callable | None = None, dataset_transform: Any = None):
        if isinstance(dataset, CombinationMetaDataset):  # e.g. a native dataset: its classes
            dataset = dataset.dataset
        if not isinstance(dataset, ClassDataset):
            raise unsupported(f"OneVsAllMetaDataset over a {type(dataset).__name__}",
                              "subclass metalearn.torchmeta.utils.data.ClassDataset (num_classes, __getitem__)")
        if len(dataset) < 2:
            raise InvalidArgument(f"a one-vs-all task needs at least 2 classes; the {dataset.meta_split} split has {len(dataset)}")
        self.dataset = dataset
        self.num_classes_per_task = 2
        super().__init__(meta_split=dataset.meta_split, target_transform=target_transform,
                         dataset_transform=dataset_transform)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, tuple) or (isinstance(index, torch.Tensor) and index.dim() > 0):
            raise InvalidArgument(f"a one-vs-all task is indexed by one class index, an int (got {index!r})")
        index = self.dataset.check_index(index)
        splitter = self.dataset_transform
        generator = torch.Generator().manual_seed(_task_seed(("one-vs-all", index), self._seed or 0,
                                                             splitter.random_state_seed if splitter is not None else 0))
        labels: list[Any] = [0, 1]
        if isinstance(self.target_transform, Categorical):
            labels = self.target_transform.labels(2, generator)
        elif self.target_transform is not None:
            labels = [self.target_transform(0), self.target_transform(1)]
        rest = [c for c in range(len(self.dataset)) if c != index]
        if isinstance(self.dataset, StoreClassDataset):
            def part(classes, label):
                return StoreTask(self.dataset, classes, [torch.arange(self.dataset.count(c)) for c in classes],
                                 [label] * len(classes), generator, num_classes=1)
            one, others = part([index], labels[0]), part(rest, labels[1])
        else:
            one = ConcatTask([self.dataset[index]], 1)
            others = ConcatTask([self.dataset[c] for c in rest], 1)
            one.labels, others.labels = [labels[0]], [labels[1]] * len(rest)
        task = ConcatTask([one, others], 2)
        task.generator = generator
        return task if splitter is None else splitter(task)

    def sample_task(self):
        return self[int(torch.randint(len(self), (), generator=self._generator))]

    def __repr__(self) -> str:
        return f"OneVsAllMetaDataset({self.meta_split}, {len(self.dataset)} classes)"
