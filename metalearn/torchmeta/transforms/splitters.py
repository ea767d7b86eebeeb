"""torchmeta's splitters: ``Splitter``, ``ClassSplitter``, ``WeightedClassSplitter``.

A splitter turns a task into ``OrderedDict(split_name=sub-task)`` (e.g. ``train``/``test``) by
choosing, for each class of the task, which samples go to which split. Its draws come from a
generator seeded by the task's own generator and ``random_state_seed``: the same task always
splits the same way, in any process (a task made by hand, without a generator, always splits the
same way for a given ``random_state_seed``). Within a split, samples are grouped by class in task
order, as torchmeta does. A regression task (``num_classes=None``) is one class.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from metalearn.torchmeta import _core
from metalearn.torchmeta._errors import InvalidArgument, unsupported

__all__ = ["Splitter", "ClassSplitter", "ClassSplitter_", "WeightedClassSplitter", "WeightedClassSplitter_"]


class Splitter:
    """Base class of the splitters: ``splitter(task)`` is ``OrderedDict(split: task.subset(indices[split]))``.

    ``splits`` maps each split's name to its parameter (a count, a weight). A subclass defines
    ``get_indices_task(task)`` (and, to treat each dataset of a ``ConcatTask`` as one class without
    reading targets, ``get_indices_concattask(task)``), returning ``{split: [positions in task]}``;
    ``self.generator_for(task)`` gives the task's seeded generator for its draws.
    """

    def __init__(self, splits: "OrderedDict[str, Any]", random_state_seed: int = 0):
        self.splits = OrderedDict(splits)
        self.seed(random_state_seed)

    def seed(self, seed: int | None = None) -> None:
        """torchmeta's seeding hook: the seed joins each task's own."""
        self.random_state_seed = 0 if seed is None else int(seed)
        self.np_random = np.random.RandomState(self.random_state_seed)  # torchmeta's attribute, for subclasses using it

    def generator_for(self, task: Any) -> torch.Generator:
        """A generator for ``task``'s draws: from the task's generator's seed and ``random_state_seed``."""
        generator = getattr(task, "generator", None)
        key = generator.initial_seed() if generator is not None else "none"
        return torch.Generator().manual_seed(_core._task_seed((key,), "splitter", self.random_state_seed))

    def get_indices(self, task: Any) -> "OrderedDict[str, list[int]]":
        if isinstance(task, _core.ConcatTask):
            return self.get_indices_concattask(task)
        if isinstance(task, _core.Task):
            return self.get_indices_task(task)
        raise unsupported(f"{type(self).__name__} on a {type(task).__name__}",
                          "apply it to a task of a metalearn.torchmeta meta-dataset (a Task, ConcatTask or SubsetTask)")

    def get_indices_task(self, task: Any) -> "OrderedDict[str, list[int]]":
        raise NotImplementedError(f"{type(self).__name__} must define get_indices_task(task)")

    def get_indices_concattask(self, task: Any) -> "OrderedDict[str, list[int]]":
        return self.get_indices_task(task)

    def __call__(self, task: Any) -> "OrderedDict[str, Any]":
        indices = self.get_indices(task)
        return OrderedDict((split, task.subset(indices[split])) for split in self.splits)

    def __len__(self) -> int:
        return len(self.splits)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.splits.items())})"


def _named_splits(given: dict | None, train: Any, test: Any, support: Any, query: Any) -> "OrderedDict[str, Any]":
    """torchmeta's argument rule: the dict if given, else train (or its alias support) and test (or query)."""
    if given is not None:
        return OrderedDict(given)
    splits: "OrderedDict[str, Any]" = OrderedDict()
    if train is not None:
        splits["train"] = train
    elif support is not None:
        splits["support"] = support
    if test is not None:
        splits["test"] = test
    elif query is not None:
        splits["query"] = query
    return splits


def _deal(groups: list[list[int]], counts_of, shuffle: bool, generator: torch.Generator,
          splits: list[str]) -> "OrderedDict[str, list[int]]":
    """For each class (``groups``: positions in the task), consecutive slices of a random order
    (``shuffle``) or of the stored order, of the sizes ``counts_of(class size)`` gives."""
    indices: "OrderedDict[str, list[int]]" = OrderedDict((split, []) for split in splits)
    for positions in groups:
        n = len(positions)
        order = torch.randperm(n, generator=generator).tolist() if shuffle else range(n)
        order = list(order)
        start = 0
        for split, count in zip(splits, counts_of(n)):
            indices[split].extend(positions[i] for i in order[start : start + count])
            start += count
    return indices


class ClassSplitter_(Splitter):
    """Splits each class of a task into ``train``/``test`` (or ``support``/``query``) samples, a fixed
    number per class and split (torchmeta's ``ClassSplitter``).

    ``shuffle=True`` draws each class's samples at random (from the task's generator: the same task,
    i.e. the same tuple of classes, always gets the same split); ``shuffle=False`` takes them in
    the stored order. A class with fewer samples than the splits take raises ``InvalidArgument``.
    """

    def __init__(self, shuffle: bool = True, num_samples_per_class: dict[str, int] | None = None,
                 num_train_per_class: int | None = None, num_test_per_class: int | None = None,
                 num_support_per_class: int | None = None, num_query_per_class: int | None = None,
                 random_state_seed: int = 0):
        splits = _named_splits(num_samples_per_class, num_train_per_class, num_test_per_class,
                               num_support_per_class, num_query_per_class)
        if not splits:
            raise InvalidArgument("ClassSplitter needs the samples per class of each split, e.g. "
                                  "num_train_per_class=1, num_test_per_class=15")
        for name, n in splits.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise InvalidArgument(f"ClassSplitter: the {name} split needs a positive int of samples per class (got {n!r})")
        self.shuffle = bool(shuffle)
        super().__init__(splits, random_state_seed)

    @property
    def num_samples_per_class(self) -> int:
        return sum(self.splits.values())

    def get_indices_task(self, task: Any) -> "OrderedDict[str, list[int]]":
        groups = task.class_groups()
        need = self.num_samples_per_class
        for g, positions in enumerate(groups):
            if len(positions) < need:
                what = "the task" if task.num_classes is None else f"class {g} of the task"
                raise InvalidArgument(
                    f"{what} has {len(positions)} samples, fewer than the {need} ClassSplitter takes per class "
                    f"({', '.join(f'{k}={v}' for k, v in self.splits.items())}); lower them"
                )
        return _deal(groups, lambda n: list(self.splits.values()), self.shuffle, self.generator_for(task), list(self.splits))

    def __call__(self, task: Any) -> "OrderedDict[str, Any]":
        if isinstance(task, _core.StoreTask):  # a native task splits with one draw, keeping its reads in one go
            return task.split(self.splits, self.shuffle, self.generator_for(task))
        return super().__call__(task)

    def __repr__(self) -> str:
        return f"ClassSplitter({', '.join(f'{k}={v}' for k, v in self.splits.items())}, shuffle={self.shuffle})"


class WeightedClassSplitter_(Splitter):
    """Splits each class of a task in proportions (torchmeta's ``WeightedClassSplitter``).

    A class of ``n`` samples gives ``max(min_num_samples, int(weight * n))`` samples to each
    split, at most ``max_num_samples`` (ints for every split, or dicts per split), taken in turn
    from one random order (``shuffle``) or the stored order; a split asking for more than is
    left gets what is left. ``force_equal_per_class=True`` uses the smallest class's ``n`` for
    every class. The weights must sum to at most 1; every class needs at least the sum of the
    ``min_num_samples``.
    """

    def __init__(self, shuffle: bool = True, min_num_samples: int | dict | None = 1,
                 max_num_samples: int | dict | None = None, weights: dict[str, float] | None = None,
                 train_weights: float | None = None, test_weights: float | None = None,
                 support_weights: float | None = None, query_weights: float | None = None,
                 force_equal_per_class: bool = False, random_state_seed: int = 0):
        splits = _named_splits(weights, train_weights, test_weights, support_weights, query_weights)
        if not splits:
            raise InvalidArgument("WeightedClassSplitter needs the proportion of each class in each split, e.g. "
                                  "train_weights=0.5, test_weights=0.5")
        if any(not 0 <= w <= 1 for w in splits.values()) or sum(splits.values()) > 1 + 1e-9:
            raise InvalidArgument(f"WeightedClassSplitter weights must be in [0, 1] and sum to at most 1 (got {dict(splits)})")
        self.min_num_samples = self._per_split("min_num_samples", 0 if min_num_samples is None else min_num_samples, splits)
        self.max_num_samples = None if max_num_samples is None else self._per_split("max_num_samples", max_num_samples, splits)
        self.shuffle = bool(shuffle)
        self.force_equal_per_class = bool(force_equal_per_class)
        super().__init__(splits, random_state_seed)

    @staticmethod
    def _per_split(name: str, value: int | dict, splits: dict) -> "OrderedDict[str, int]":
        if isinstance(value, int) and not isinstance(value, bool):
            return OrderedDict((split, value) for split in splits)
        if isinstance(value, dict) and set(value) == set(splits):
            return OrderedDict((split, int(value[split])) for split in splits)
        raise InvalidArgument(f"WeightedClassSplitter({name}=...) must be an int or a dict with the keys "
                              f"{', '.join(splits)} (got {value!r})")

    def _counts(self, n: int) -> list[int]:
        counts = []
        for split, weight in self.splits.items():
            count = max(self.min_num_samples[split], int(weight * n))
            if self.max_num_samples is not None:
                count = min(self.max_num_samples[split], count)
            counts.append(count)
        return counts

    def get_indices_task(self, task: Any) -> "OrderedDict[str, list[int]]":
        groups = task.class_groups()
        smallest = min(len(g) for g in groups)
        need = sum(self.min_num_samples.values())
        if smallest < need:
            raise InvalidArgument(f"the smallest class of the task has {smallest} samples, fewer than the {need} "
                                  "WeightedClassSplitter's min_num_samples need; lower them")
        if self.force_equal_per_class:
            # every class as large as the smallest: the first `smallest` of its (shuffled) order
            return _deal(groups, lambda n: self._counts(smallest), self.shuffle, self.generator_for(task), list(self.splits))
        return _deal(groups, self._counts, self.shuffle, self.generator_for(task), list(self.splits))

    def __repr__(self) -> str:
        return f"WeightedClassSplitter({', '.join(f'{k}={v}' for k, v in self.splits.items())}, shuffle={self.shuffle})"


def _apply(splitter: Splitter, task: Any) -> Any:
    """torchmeta's wrapper rule: with a meta-dataset, make the splitter its ``dataset_transform`` and
    return the dataset; with a task, split it; with nothing, return the splitter."""
    if task is None:
        return splitter
    if hasattr(task, "dataset_transform"):  # a meta-dataset
        if task.dataset_transform is not None:
            raise unsupported("chaining dataset transforms", "give the dataset one splitter")
        task.dataset_transform = splitter
        return task
    return splitter(task)


def ClassSplitter(task=None, *args, **kwargs):
    """torchmeta's ``ClassSplitter``: with a dataset first, set it as the dataset's ``dataset_transform``
    and return the dataset; with a task, split it; alone, return the splitter (``ClassSplitter_``)."""
    return _apply(ClassSplitter_(*args, **kwargs), task)


def WeightedClassSplitter(task=None, *args, **kwargs):
    """torchmeta's ``WeightedClassSplitter``, applied like ``ClassSplitter``."""
    return _apply(WeightedClassSplitter_(*args, **kwargs), task)
