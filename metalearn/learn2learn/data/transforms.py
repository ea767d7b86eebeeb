"""learn2learn's task transforms: what a ``Taskset`` draws.

A task transform is a callable that takes a task description (a list of ``DataDescription``, or
``None`` for "every sample of the dataset") and returns a new one. ``NWays``, ``KShots``, ``FilterLabels``
and ``FusedNWaysKShots`` choose the samples; ``LoadData`` and ``RemapLabels`` append per-sample transforms
(load the sample; relabel it); ``ConsecutiveLabels`` orders the samples by label. Each is built on the
dataset it draws from (a ``MetaDataset``: its ``labels``, ``labels_to_indices`` and ``indices_to_labels``)
and draws with Python's ``random``.

The usual pipeline, ``[NWays(d, n), KShots(d, k), LoadData(d), RemapLabels(d), ConsecutiveLabels(d)]``,
gives tasks of ``n * k`` samples with labels ``0 .. n-1``, ``k`` of each, in label order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Iterable

from metalearn.learn2learn._errors import InvalidArgument
from metalearn.learn2learn.data.stores import _scalar
from metalearn.learn2learn.data.task_dataset import DataDescription

__all__ = ["TaskTransform", "LoadData", "NWays", "KShots", "FilterLabels", "FusedNWaysKShots", "RemapLabels",
           "ConsecutiveLabels"]

Description = list  # list[DataDescription]


class TaskTransform:
    """Base of the task transforms: ``dataset`` is the MetaDataset the descriptions index;
    ``new_task()`` describes every sample of it (what ``None`` stands for)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def new_task(self) -> Description:
        return [DataDescription(i) for i in range(len(self.dataset))]


class LoadData(TaskTransform):
    """Appends the loading of each sample (``dataset[index]``) to its transforms."""

    def __init__(self, dataset: Any):
        super().__init__(dataset)
        self._load = _Load(dataset)

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        for dd in task_description:
            dd.transforms.append(self._load)
        return task_description


class FilterLabels(TaskTransform):
    """Keeps the samples whose label is one of ``labels`` (from ``None``: those samples of the dataset,
    in index order)."""

    def __init__(self, dataset: Any, labels: Iterable):
        super().__init__(dataset)
        self.labels = list(labels)
        self._keep = set(self.labels)

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            by_label = self.dataset.labels_to_indices
            indices = sorted(i for label in self._keep for i in by_label.get(label, ()))
            return [DataDescription(i) for i in indices]
        labels = self.dataset.indices_to_labels
        return [dd for dd in task_description if labels[dd.index] in self._keep]


class NWays(TaskTransform):
    """Keeps the samples of ``n`` labels drawn at random (without replacement) from the labels present in the
    description (from ``None``: from all the dataset's labels, keeping every sample of the ``n``)."""

    def __init__(self, dataset: Any, n: int = 2):
        super().__init__(dataset)
        if n < 1:
            raise InvalidArgument(f"NWays needs n >= 1 (got n={n})")
        self.n = n

    def new_task(self) -> Description:
        by_label = self.dataset.labels_to_indices
        return [DataDescription(i) for label in self._draw(self.dataset.labels) for i in by_label[label]]

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            return self.new_task()
        labels = self.dataset.indices_to_labels
        present = list(dict.fromkeys(labels[dd.index] for dd in task_description))  # order of appearance
        chosen = set(self._draw(present))
        return [dd for dd in task_description if labels[dd.index] in chosen]

    def _draw(self, labels: list) -> list:
        if self.n > len(labels):
            raise InvalidArgument(f"NWays(n={self.n}) needs {self.n} labels but there are only {len(labels)}; "
                                  f"lower n (the ways)")
        return random.sample(labels, self.n)

    def _fused_with(self, following: Any) -> Description | None:
        """The description of ``[self, following]`` applied to ``None`` when ``following`` is a KShots on the
        same dataset (else None): the same draws from ``random`` as running them in turn, and the same result."""
        if type(self) is not NWays or type(following) is not KShots or following.dataset is not self.dataset:
            return None
        by_label = self.dataset.labels_to_indices
        return [DataDescription(i) for label in self._draw(self.dataset.labels)
                for i in following._pick(by_label[label], label)]


class KShots(TaskTransform):
    """Keeps ``k`` samples of each label present in the description, drawn at random, without replacement
    (``replacement=True``: with, so a label may have fewer than ``k`` samples). The result is grouped by
    label, labels in the order they first appear."""

    def __init__(self, dataset: Any, k: int = 1, replacement: bool = False):
        super().__init__(dataset)
        if k < 1:
            raise InvalidArgument(f"KShots needs k >= 1 (got k={k})")
        self.k = k
        self.replacement = replacement

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        labels = self.dataset.indices_to_labels
        by_label: dict[Any, list] = defaultdict(list)
        for dd in task_description:
            by_label[labels[dd.index]].append(dd)
        return [dd for label, dds in by_label.items() for dd in self._pick(dds, label)]

    def _pick(self, items: list, label: Any) -> list:
        """``k`` of ``items`` (DataDescriptions or indices) at random; a DataDescription drawn with
        replacement is copied, so each copy gets its own per-sample transforms later."""
        if self.replacement:
            picked = random.choices(items, k=self.k)
            return [_copy(x) for x in picked] if picked and isinstance(picked[0], DataDescription) else picked
        if self.k > len(items):
            raise InvalidArgument(f"KShots(k={self.k}) needs {self.k} samples of label {label!r}, which has "
                                  f"{len(items)}; lower k or pass replacement=True")
        return random.sample(items, self.k)


class FusedNWaysKShots(TaskTransform):
    """``FilterLabels``, ``NWays`` and ``KShots`` in one transform: from ``None``, ``n`` labels drawn from
    ``filter_labels`` (default: all the dataset's labels) and ``k`` samples of each, without first describing
    every sample. Given a description, the three are applied in turn."""

    def __init__(self, dataset: Any, n: int = 2, k: int = 1, replacement: bool = False,
                 filter_labels: Iterable | None = None):
        super().__init__(dataset)
        self.n, self.k, self.replacement = n, k, replacement
        self.filter_labels = list(filter_labels) if filter_labels is not None else list(dataset.labels)
        missing = [label for label in self.filter_labels if label not in dataset.labels_to_indices]
        if missing:
            raise InvalidArgument(f"FusedNWaysKShots: filter_labels {missing[:5]} are not labels of the dataset")
        self.filter = FilterLabels(dataset, self.filter_labels)
        self.nways = NWays(dataset, n)
        self.kshots = KShots(dataset, k, replacement)

    def new_task(self) -> Description:
        by_label = self.dataset.labels_to_indices
        return [DataDescription(i) for label in self.nways._draw(self.filter_labels)
                for i in self.kshots._pick(by_label[label], label)]

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            return self.new_task()
        return self.kshots(self.nways(self.filter(task_description)))


class RemapLabels(TaskTransform):
    """Relabels the task's samples ``0 .. L-1`` (L: the labels present in the description): appends to each
    sample the replacement of its label (``sample[1]``), so it comes after ``LoadData``. ``shuffle=True``
    (default) gives the labels their new values in a random order; ``shuffle=False`` in sorted order of the
    original labels (order of appearance for labels that do not sort)."""

    def __init__(self, dataset: Any, shuffle: bool = True):
        super().__init__(dataset)
        self.shuffle = shuffle

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        labels = self.dataset.indices_to_labels
        present = list(dict.fromkeys(labels[dd.index] for dd in task_description))
        if self.shuffle:
            random.shuffle(present)
        else:
            try:
                present.sort()
            except TypeError:
                pass
        remap = _Remap({label: new for new, label in enumerate(present)})
        for dd in task_description:
            dd.transforms.append(remap)
        return task_description


class ConsecutiveLabels(TaskTransform):
    """Orders the samples by label (a stable sort), the label being the one each sample will carry: after
    ``RemapLabels`` the new label, so the task's labels come out ``0, 0, .., 1, 1, ..``; before it the
    dataset's label, so samples of a label are together but the new labels are in no particular order."""

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        labels = self.dataset.indices_to_labels

        def key(dd: DataDescription) -> Any:
            label = labels[dd.index]
            for transform in reversed(dd.transforms):
                if isinstance(transform, _Remap):
                    return transform.mapping[label]
            return label

        return sorted(task_description, key=key)


class _Load:
    """Per-sample transform: the sample at an index (a class, not a lambda, so descriptions pickle)."""

    __slots__ = ("dataset",)

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, index: int) -> Any:
        return self.dataset[index]


class _Remap:
    """Per-sample transform: the loaded sample with its label (``sample[1]``) replaced by the task's."""

    __slots__ = ("mapping",)

    def __init__(self, mapping: dict):
        self.mapping = mapping

    def __call__(self, sample: Any) -> list:
        if not isinstance(sample, (list, tuple)):
            raise InvalidArgument("RemapLabels relabels loaded samples (data, label): put LoadData before it "
                                  "in the task transforms")
        sample = list(sample)
        label = _scalar(sample[1])
        try:
            sample[1] = self.mapping[label]
        except KeyError:
            raise InvalidArgument(f"RemapLabels: a loaded sample has label {label!r}, not one of the task's "
                                  f"{list(self.mapping)}; the dataset's samples must carry the labels its "
                                  f"MetaDataset maps") from None
        return sample


def _copy(dd: DataDescription) -> DataDescription:
    copy = DataDescription(dd.index)
    copy.transforms = list(dd.transforms)
    return copy
