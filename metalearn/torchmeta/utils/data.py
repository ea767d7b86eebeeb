"""torchmeta's ``utils.data``: ``BatchMetaDataLoader``, ``MetaDataLoader`` and their samplers.

``BatchMetaDataLoader(dataset, batch_size=16)`` yields batches of tasks collated as torchmeta's:
with a ``ClassSplitter``, ``batch["train"]`` and ``batch["test"]`` are ``[inputs, targets]`` with
inputs ``[batch_size, ways * shots, C, H, W]`` and targets ``[batch_size, ways * shots]``.
It is a ``torch.utils.data.DataLoader`` (``num_workers``, ``pin_memory``, ...); which tasks it
draws comes from ``torch``'s global generator when iteration starts (``torch.manual_seed`` fixes
them), and a task's content is a function of its classes (see ``datasets``), so the batches do not
depend on ``num_workers``.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import combinations
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import default_collate

from metalearn.torchmeta._core import ClassDataset, MetaDataset, Task, stack_tasks
from metalearn.torchmeta._errors import unsupported

__all__ = [
    "BatchMetaDataLoader", "MetaDataLoader", "CombinationRandomSampler", "CombinationSequentialSampler",
    "CombinationMetaDataset", "ClassDataset", "MetaDataset", "Task",
    # torchmeta names that raise a clear error when used:
    "OneVsAllMetaDataset", "SequenceMetaDataset", "ConcatTask", "SubsetTask", "NonEpisodicWrapper",
    "OneClassRandomSampler", "OneClassSequentialSampler",
]

#: torchmeta's name for metalearn.torchmeta's meta-dataset (over a ClassDataset of a ClassStore).
CombinationMetaDataset = MetaDataset


def _check(dataset: Any, loader: str) -> None:
    if not isinstance(dataset, MetaDataset):
        raise unsupported(f"{loader} over a {type(dataset).__name__}",
                          "give it a metalearn.torchmeta dataset (metalearn.torchmeta.datasets.* or helpers.*)")


class CombinationRandomSampler(Sampler):
    """Tasks of ``num_classes_per_task`` distinct classes in random order, ``len(dataset)`` of them."""

    def __init__(self, data_source: MetaDataset):
        _check(data_source, "CombinationRandomSampler")
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

    def __init__(self, data_source: MetaDataset):
        _check(data_source, "CombinationSequentialSampler")
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self):
        return combinations(range(len(self.data_source.dataset)), self.data_source.num_classes_per_task)


def collate_tasks(batch: list) -> Any:
    """A list of tasks (``Task`` or ``{split: Task}``) -> torchmeta's batch (``{split: [inputs, targets]}``)."""
    first = batch[0]
    if isinstance(first, Task):
        stacked = stack_tasks(batch)
        return stacked if stacked is not None else default_collate([task.tensors() for task in batch])
    if isinstance(first, dict):
        return OrderedDict((key, collate_tasks([task[key] for task in batch])) for key in first)
    raise unsupported(f"collating a {type(first).__name__}", "BatchMetaDataLoader collates metalearn.torchmeta tasks")


def no_collate(batch: list) -> list:
    return batch


class MetaDataLoader(DataLoader):
    """A DataLoader of tasks: each batch is the list of tasks, uncollated unless ``collate_fn`` is given."""

    def __init__(self, dataset, batch_size=1, shuffle=True, sampler=None, batch_sampler=None, num_workers=0,
                 collate_fn=None, pin_memory=False, drop_last=False, timeout=0, worker_init_fn=None, **kwargs):
        _check(dataset, type(self).__name__)
        if sampler is None and batch_sampler is None:
            sampler = CombinationRandomSampler(dataset) if shuffle else CombinationSequentialSampler(dataset)
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


def _not_provided(name: str, instead: str):
    def refuse(*args, **kwargs):
        raise unsupported(f"torchmeta.utils.data.{name}", instead)
    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"Not provided: calling it raises ``Unsupported`` ({instead})."
    return refuse


OneVsAllMetaDataset = _not_provided("OneVsAllMetaDataset", "only N-way combination tasks are provided")
SequenceMetaDataset = _not_provided("SequenceMetaDataset", "only N-way combination tasks are provided")
ConcatTask = _not_provided("ConcatTask", "index a dataset with a tuple of classes to get a Task")
SubsetTask = _not_provided("SubsetTask", "ClassSplitter makes the train/test subsets of a task")
NonEpisodicWrapper = _not_provided("NonEpisodicWrapper", "train on all classes with metalearn's algo=baseline")
OneClassRandomSampler = _not_provided("OneClassRandomSampler", "use CombinationRandomSampler")
OneClassSequentialSampler = _not_provided("OneClassSequentialSampler", "use CombinationSequentialSampler")
