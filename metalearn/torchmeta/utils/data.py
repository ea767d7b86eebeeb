"""torchmeta's ``utils.data``: the loaders, their samplers, the dataset and task classes, and
``NonEpisodicWrapper``.

``BatchMetaDataLoader(dataset, batch_size=16)`` yields batches of tasks collated as torchmeta's:
with a ``ClassSplitter``, ``batch["train"]`` and ``batch["test"]`` are ``[inputs, targets]`` with
inputs ``[batch_size, ways * shots, C, H, W]`` and targets ``[batch_size, ways * shots]``.
It is a ``torch.utils.data.DataLoader`` (``num_workers``, ``pin_memory``, ...); which tasks it
draws comes from ``torch``'s global generator when iteration starts (``torch.manual_seed`` fixes
them), and a task's content is a function of its index (see ``metalearn.torchmeta._core``), so
the batches do not depend on ``num_workers``. Tasks of the native datasets are read a whole batch
at a time; tasks of your own ``ClassDataset``/``MetaDataset`` sample by sample, as torchmeta does.

``ClassDataset``, ``MetaDataset``, ``CombinationMetaDataset``, ``Task`` are torchmeta's base
classes: subclass them for your own data (their docstrings say what to define).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import combinations
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data import default_collate

from metalearn.errors import not_provided
from metalearn.torchmeta._core import (
    ClassDataset, CombinationMetaDataset, ConcatTask, MetaDataset, OneVsAllMetaDataset, StoreClassDataset, SubsetTask,
    Task, _task_seed, as_store_task, stack_tasks,
)
from metalearn.torchmeta._errors import InvalidArgument, unsupported

__all__ = [
    "BatchMetaDataLoader", "MetaDataLoader", "CombinationRandomSampler", "CombinationSequentialSampler",
    "OneClassRandomSampler", "OneClassSequentialSampler",
    "ClassDataset", "MetaDataset", "CombinationMetaDataset", "OneVsAllMetaDataset", "Task", "ConcatTask", "SubsetTask",
    "NonEpisodicWrapper",
    # torchmeta names that raise a clear error when used:
    "SequenceMetaDataset",
]


def _check(dataset: Any, user: str, kind: type = MetaDataset) -> None:
    if not isinstance(dataset, kind):
        what = "metalearn.torchmeta dataset (metalearn.torchmeta.datasets.*, helpers.*, toy.*, or a MetaDataset subclass)"
        if kind is not MetaDataset:
            what = f"{kind.__name__}"
        raise unsupported(f"{user} over a {type(dataset).__name__}", f"give it a {what}")


class CombinationRandomSampler(Sampler):
    """Tasks of ``num_classes_per_task`` distinct classes in random order, ``len(dataset)`` of them."""

    def __init__(self, data_source: CombinationMetaDataset):
        _check(data_source, "CombinationRandomSampler", CombinationMetaDataset)
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self):
        n, k = len(self.data_source.dataset), self.data_source.num_classes_per_task
        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        for _ in range(len(self)):
            yield tuple(torch.randperm(n, generator=generator)[:k].tolist())


class CombinationSequentialSampler(Sampler):
    """Every combination of classes, in lexicographic order."""

    def __init__(self, data_source: CombinationMetaDataset):
        _check(data_source, "CombinationSequentialSampler", CombinationMetaDataset)
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self):
        return combinations(range(len(self.data_source.dataset)), self.data_source.num_classes_per_task)


class OneClassRandomSampler(Sampler):
    """``len(dataset.dataset)`` classes of a ``OneVsAllMetaDataset`` drawn uniformly, with replacement (torchmeta's)."""

    def __init__(self, data_source: OneVsAllMetaDataset):
        _check(data_source, "OneClassRandomSampler", OneVsAllMetaDataset)
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source.dataset)

    def __iter__(self):
        n = len(self.data_source.dataset)
        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        return iter(torch.randint(n, (n,), generator=generator).tolist())


class OneClassSequentialSampler(Sampler):
    """Every class of a ``OneVsAllMetaDataset``, in order."""

    def __init__(self, data_source: OneVsAllMetaDataset):
        _check(data_source, "OneClassSequentialSampler", OneVsAllMetaDataset)
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source.dataset)

    def __iter__(self):
        return iter(range(len(self.data_source.dataset)))


def task_tensors(task: Any) -> list:
    """``[inputs [n, ...], targets [n, ...]]`` of one task."""
    if hasattr(task, "tensors"):
        return task.tensors()
    return default_collate([task[j] for j in range(len(task))])


def collate_tasks(batch: list) -> Any:
    """A list of tasks (a task or ``{split: task}``) -> torchmeta's batch (``{split: [inputs, targets]}``)."""
    first = batch[0]
    if isinstance(first, dict):
        return OrderedDict((key, collate_tasks([task[key] for task in batch])) for key in first)
    if isinstance(first, Dataset):
        stores = [as_store_task(task) for task in batch]
        if all(s is not None for s in stores):
            stacked = stack_tasks(stores)
            if stacked is not None:
                return stacked
        return default_collate([task_tensors(task) for task in batch])
    raise unsupported(f"collating a {type(first).__name__}", "BatchMetaDataLoader collates tasks (datasets of samples)")


def no_collate(batch: list) -> list:
    return batch


class MetaDataLoader(DataLoader):
    """A DataLoader of tasks: each batch is the list of tasks, uncollated unless ``collate_fn`` is given.

    The default sampler: class combinations for a ``CombinationMetaDataset``, classes for a
    ``OneVsAllMetaDataset``, task indices (shuffled or in order) for any other ``MetaDataset``.
    """

    def __init__(self, dataset, batch_size=1, shuffle=True, sampler=None, batch_sampler=None, num_workers=0,
                 collate_fn=None, pin_memory=False, drop_last=False, timeout=0, worker_init_fn=None, **kwargs):
        _check(dataset, type(self).__name__)
        if sampler is None and batch_sampler is None:
            if isinstance(dataset, CombinationMetaDataset):
                sampler = CombinationRandomSampler(dataset) if shuffle else CombinationSequentialSampler(dataset)
            elif isinstance(dataset, OneVsAllMetaDataset):
                sampler = OneClassRandomSampler(dataset) if shuffle else OneClassSequentialSampler(dataset)
            else:
                sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        super().__init__(dataset, batch_size=batch_size if batch_sampler is None else 1, shuffle=False,
                         sampler=sampler, batch_sampler=batch_sampler, num_workers=num_workers,
                         collate_fn=no_collate if collate_fn is None else collate_fn, pin_memory=pin_memory,
                         drop_last=drop_last, timeout=timeout, worker_init_fn=worker_init_fn, **kwargs)


class BatchMetaDataLoader(MetaDataLoader):
    """Batches of tasks, collated: ``batch["train"] == [inputs [B, N*K, C, H, W], targets [B, N*K]]``."""

    def __init__(self, dataset, batch_size=1, shuffle=True, sampler=None, num_workers=0, pin_memory=False,
                 drop_last=False, timeout=0, worker_init_fn=None, **kwargs):
        if "collate_fn" in kwargs or "batch_sampler" in kwargs:
            option = "collate_fn" if "collate_fn" in kwargs else "batch_sampler"
            raise unsupported(f"BatchMetaDataLoader({option}=...)",
                              f"use MetaDataLoader(..., {option}=...) for your own batching")
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                         collate_fn=collate_tasks, pin_memory=pin_memory, drop_last=drop_last, timeout=timeout,
                         worker_init_fn=worker_init_fn, **kwargs)


class NonEpisodicWrapper(Dataset):
    """torchmeta's ``NonEpisodicWrapper``: every ``(input, label)`` of a ``CombinationMetaDataset``'s
    classes as one flat dataset, for ordinary (non-episodic) pre-training.

    Samples run class by class in the class dataset's order (the original classes, then each class
    augmentation of them, as torchmeta's); the label is the class index in ``dataset.dataset``
    (``0 .. len(dataset.dataset) - 1``, augmented classes included), mapped by ``target_transform``
    if given. torchmeta's label is the pair (class name, augmentation index); ``num_classes`` here is
    the number of distinct labels, ``len(dataset.dataset)``. The meta-dataset's own target transform
    and splitter are not used. Inputs go through the class dataset's ``transform`` (an
    EpisodeTransform draws from a generator seeded by the sample's index).
    """

    def __init__(self, dataset: CombinationMetaDataset, target_transform: Callable | None = None):
        super().__init__()
        if not isinstance(dataset, CombinationMetaDataset):
            raise InvalidArgument(f"NonEpisodicWrapper wraps a CombinationMetaDataset (got {type(dataset).__name__})")
        if target_transform is not None and not callable(target_transform):
            raise InvalidArgument(f"target_transform={target_transform!r} is not callable")
        self.dataset = dataset
        self.target_transform = target_transform
        classes = dataset.dataset
        if isinstance(classes, StoreClassDataset):
            counts = [classes.count(c) for c in range(len(classes))]
        else:  # your own ClassDataset: each class's dataset is made once here, to count its samples
            counts = [len(classes[c]) for c in range(len(classes))]
        self._ends = np.cumsum(counts)
        self._last: tuple[int, Any] | None = None  # the class dataset read last (samples come class by class)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.dataset)

    @property
    def num_samples(self) -> int:
        """Samples of the original classes (torchmeta's), without augmentation."""
        return int(self._ends[self.dataset.dataset.num_classes - 1]) if len(self._ends) else 0

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        c = int(np.searchsorted(self._ends, index, side="right"))
        return c, index - (int(self._ends[c - 1]) if c else 0)

    def _label(self, c: int) -> Any:
        return c if self.target_transform is None else self.target_transform(c)

    def __getitem__(self, index: int):
        c, j = self._locate(int(index))
        classes = self.dataset.dataset
        if isinstance(classes, StoreClassDataset):
            image = classes.images(c, torch.tensor([j]))[0]
            generator = torch.Generator().manual_seed(_task_seed(("sample", c, j), 0))
            return classes.transform_image(image, generator), self._label(c)
        if self._last is None or self._last[0] != c:
            self._last = (c, classes[c])
        sample = self._last[1][j]
        return (*sample[:-1], self._label(c))

    def __getitems__(self, indices: list[int]) -> list:
        """DataLoader's batched fetch: a native dataset's images read in one go where the transform allows."""
        classes = self.dataset.dataset
        if not (isinstance(classes, StoreClassDataset) and classes.transform_kind in ("none", "batched")):
            return [self[i] for i in indices]
        located = [self._locate(int(i)) for i in indices]
        x = classes.gather([c for c, _ in located], [torch.tensor([j]) for _, j in located])
        x = x.float().div_(255.0) if classes.transform_kind == "none" else classes.transform(x)
        return [(x[k], self._label(c)) for k, (c, _) in enumerate(located)]

    def __repr__(self) -> str:
        return f"NonEpisodicWrapper({len(self)} samples of {self.num_classes} classes)"


def _not_provided(name: str, instead: str):
    return not_provided("metalearn.torchmeta", f"torchmeta.utils.data.{name}", instead)


# Not in any torchmeta release (only imported by its unreleased sampler code), so there is no
# documented behaviour to match.
SequenceMetaDataset = _not_provided(
    "SequenceMetaDataset", "use CombinationMetaDataset (N-way tasks) or OneVsAllMetaDataset, or subclass MetaDataset")
