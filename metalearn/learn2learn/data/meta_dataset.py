"""learn2learn's meta-datasets: a classification dataset indexed by label.

``MetaDataset`` wraps any indexable dataset of ``(x, y, ...)`` samples and keeps learn2learn's three
attributes, which the task transforms read:

* ``labels_to_indices``: label -> list of the indices of its samples;
* ``indices_to_labels``: index -> label;
* ``labels``: the labels, in the order they first appear.

Labels are plain Python values (a tensor label is keyed by ``label.item()``, as learn2learn does).
Building the maps reads every sample's label; where the labels can be had without loading samples
they are read in bulk: a metalearn ``ClassStore`` (or ``StoreDataset``), a ``TensorDataset`` (its second
tensor), another ``MetaDataset``, a ``Subset`` or ``ConcatDataset`` of those, and a dataset with a
``targets`` attribute and no ``target_transform`` (torchvision's convention, e.g. MNIST, ImageFolder).
A dataset with a ``_bookkeeping_path`` attribute has its maps cached in that file, as in learn2learn.
"""

from __future__ import annotations

import bisect
import os
import pickle
from collections import defaultdict
from typing import Any, Iterable

from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from metalearn.data.episodes import ClassStore
from metalearn.learn2learn._errors import InvalidArgument
from metalearn.learn2learn.data.stores import StoreDataset, _scalar


class MetaDataset(Dataset):
    """A classification dataset with learn2learn's label maps (``labels_to_indices``, ``indices_to_labels``,
    ``labels``); ``dataset[i]`` is the wrapped dataset's sample ``i``.

    ``dataset``: any object with ``__len__`` and ``__getitem__`` whose samples have the label second, or a
    metalearn ``ClassStore`` (served by ``StoreDataset``: images as float in [0, 1], labels the class
    indices, the maps built from the class counts without reading an image). ``labels_to_indices`` or
    ``indices_to_labels``: the maps, when known (either one; the other is derived from it).
    """

    def __init__(self, dataset: Any, labels_to_indices: dict | None = None, indices_to_labels: dict | None = None):
        if isinstance(dataset, ClassStore):
            dataset = StoreDataset(dataset)
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"MetaDataset wraps an indexable dataset with a length, not {type(dataset).__name__}")
        self.dataset = dataset
        path = getattr(dataset, "_bookkeeping_path", None)
        if labels_to_indices is None and indices_to_labels is None and path and os.path.exists(path):
            self.load_bookkeeping(path)
            return
        self.create_bookkeeping(labels_to_indices, indices_to_labels)
        if path:
            self.serialize_bookkeeping(path)

    def __getitem__(self, item):
        return self.dataset[item]

    def __len__(self) -> int:
        return len(self.dataset)

    def create_bookkeeping(self, labels_to_indices: dict | None = None, indices_to_labels: dict | None = None) -> None:
        """Build the three label maps: from the one given, else from the labels read in bulk, else from every
        sample's label (``dataset[i][1]``)."""
        if labels_to_indices is not None:
            by_label = defaultdict(list, {label: list(indices) for label, indices in labels_to_indices.items()})
            by_index = {i: label for label, indices in by_label.items() for i in indices}
        elif indices_to_labels is not None:
            by_index = dict(indices_to_labels)
            by_label = _group(by_index.items())
        else:
            by_label = _bulk_labels_to_indices(self.dataset)
            if by_label is not None:
                by_index = {i: label for label, indices in by_label.items() for i in indices}
            else:
                labels = _bulk_labels(self.dataset)
                if labels is None:
                    labels = [_sample_label(self.dataset, i) for i in range(len(self.dataset))]
                by_index = dict(enumerate(labels))
                by_label = _group(by_index.items())
        self._set_maps(by_label, by_index)

    def _set_maps(self, labels_to_indices: dict, indices_to_labels: dict) -> None:
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = indices_to_labels
        self.labels = list(labels_to_indices.keys())
        self._bookkeeping = {"labels_to_indices": labels_to_indices, "indices_to_labels": indices_to_labels,
                             "labels": self.labels}

    def load_bookkeeping(self, path: str) -> None:
        """Read the label maps cached by ``serialize_bookkeeping``."""
        with open(path, "rb") as f:
            book = pickle.load(f)
        self._set_maps(book["labels_to_indices"], book["indices_to_labels"])

    def serialize_bookkeeping(self, path: str) -> None:
        """Cache the label maps in ``path`` (skipped where the folder cannot be written: the maps are only
        a cache, and a read-only data folder must still load)."""
        try:
            with open(path, "wb") as f:
                pickle.dump(self._bookkeeping, f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError:
            pass


class UnionMetaDataset(MetaDataset):
    """The union of several datasets, their labels made disjoint: the labels of ``datasets[0]`` become
    ``0 .. L0-1`` (in the order of its ``labels``), those of ``datasets[1]`` ``L0 .. L0+L1-1``, and so on;
    indices follow the datasets' order. ``union[i]`` is the sample with its label replaced by the union's.
    Datasets that are not MetaDatasets are wrapped first."""

    def __init__(self, datasets: Iterable):
        self.datasets = [d if isinstance(d, MetaDataset) else MetaDataset(d) for d in datasets]
        if not self.datasets:
            raise InvalidArgument("UnionMetaDataset needs at least one dataset")
        by_label: dict = defaultdict(list)
        by_index: dict = {}
        label_base = index_base = 0
        self._starts = []
        for d in self.datasets:
            position = {label: p for p, label in enumerate(d.labels)}
            for i, label in d.indices_to_labels.items():
                new = label_base + position[label]
                by_index[index_base + i] = new
                by_label[new].append(index_base + i)
            self._starts.append(index_base)
            index_base += len(d)
            label_base += len(d.labels)
        self._length = index_base
        self._set_maps(by_label, by_index)

    def __getitem__(self, item):
        if item < 0:
            item += self._length
        if not 0 <= item < self._length:
            raise IndexError(f"index {item} is out of range for a union of {self._length} samples")
        k = bisect.bisect_right(self._starts, item) - 1
        sample = list(self.datasets[k][item - self._starts[k]])
        sample[1] = self.indices_to_labels[item]
        return sample

    def __len__(self) -> int:
        return self._length


class FilteredMetaDataset(MetaDataset):
    """The samples of ``dataset`` whose label is one of ``labels``, re-indexed ``0 ..`` in the order of
    ``labels`` (then of the dataset); labels keep their values (they are not remapped)."""

    def __init__(self, dataset: Any, labels: Iterable):
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        self.dataset = dataset
        labels = list(labels)
        missing = [label for label in labels if label not in dataset.labels_to_indices]
        if missing:
            raise InvalidArgument(f"FilteredMetaDataset: {missing[:5]} {'are not labels' if len(missing) > 1 else 'is not a label'} "
                                  f"of the dataset (it has {len(dataset.labels)} labels, e.g. {dataset.labels[:5]})")
        self.to_true_indices: list[int] = []
        by_label: dict = defaultdict(list)
        by_index: dict = {}
        for label in dict.fromkeys(labels):  # a label listed twice is kept once
            for true_index in dataset.labels_to_indices[label]:
                by_label[label].append(len(self.to_true_indices))
                by_index[len(self.to_true_indices)] = label
                self.to_true_indices.append(true_index)
        self._set_maps(by_label, by_index)

    def __getitem__(self, item):
        return self.dataset[self.to_true_indices[item]]

    def __len__(self) -> int:
        return len(self.to_true_indices)


def _group(pairs: Iterable[tuple[int, Any]]) -> dict:
    by_label: dict = defaultdict(list)
    for i, label in pairs:
        by_label[label].append(i)
    return by_label


def _sample_label(dataset: Any, i: int) -> Any:
    try:
        return _scalar(dataset[i][1])
    except (TypeError, IndexError, ValueError) as e:
        raise InvalidArgument(f"MetaDataset reads each sample's label as sample[1], which failed for sample {i} "
                              f"of {type(dataset).__name__}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              f"give labels_to_indices= or indices_to_labels=") from None


def _bulk_labels_to_indices(dataset: Any) -> dict | None:
    """The label -> indices map where it is known without reading labels one by one (a metalearn store)."""
    if isinstance(dataset, StoreDataset):
        found = dataset.labels_to_indices()
        return None if found is None else defaultdict(list, found)
    return None


def _bulk_labels(dataset: Any) -> list | None:
    """Every sample's label in index order, where that is cheap and certain; None: read them one by one."""
    if isinstance(dataset, StoreDataset):
        return dataset.labels()
    if isinstance(dataset, MetaDataset):
        return [dataset.indices_to_labels[i] for i in range(len(dataset))]
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) >= 2 and dataset.tensors[1].dim() == 1:
            return dataset.tensors[1].tolist()
        return None
    if isinstance(dataset, Subset):
        parent = _bulk_labels(dataset.dataset)
        return None if parent is None else [parent[int(i)] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [_bulk_labels(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [y for p in parts for y in p]
    targets = getattr(dataset, "targets", None)
    # torchvision's datasets return targets[i] (through target_transform, hence only without one).
    if targets is not None and getattr(targets, "ndim", 1) == 1 and getattr(dataset, "target_transform", None) is None:
        values = targets.tolist() if hasattr(targets, "tolist") else [_scalar(t) for t in targets]
        if len(values) == len(dataset):
            return values
    return None
