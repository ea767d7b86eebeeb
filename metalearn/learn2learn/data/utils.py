"""learn2learn's data helpers: ``partition_task``, ``InfiniteIterator`` and ``OnDeviceDataset``."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils.data import TensorDataset

from metalearn.learn2learn._errors import InvalidArgument

__all__ = ["partition_task", "InfiniteIterator", "OnDeviceDataset"]


def partition_task(data: torch.Tensor, labels: torch.Tensor, shots: int = 1):
    """Split a classification task into support and query sets: ``((support_x, support_y), (query_x, query_y))``.

    Every label must have the same number of samples, ``m``. The support set takes the first ``shots``
    samples of each label (in the order they appear in ``data``), the query set the other ``m - shots``;
    both are grouped by label, labels in increasing order (support ``[ways * shots, ...]``, query
    ``[ways * (m - shots), ...]``), on the device and with the dtype of the inputs.

    ~~~python
    X, y = taskset.sample()                     # ways * 2 * shots samples
    (X_support, y_support), (X_query, y_query) = partition_task(X, y, shots=shots)
    ~~~
    """
    if data.shape[0] != labels.shape[0]:
        raise InvalidArgument(f"partition_task: data has {data.shape[0]} samples but labels has {labels.shape[0]}")
    if labels.dim() != 1:
        raise InvalidArgument(f"partition_task takes one label per sample, a 1-d tensor (got shape {tuple(labels.shape)})")
    if shots < 0:
        raise InvalidArgument(f"partition_task needs shots >= 0 (got {shots})")
    _, inverse, counts = labels.unique(sorted=True, return_inverse=True, return_counts=True)
    ways = counts.numel()
    per_label = int(counts[0]) if ways else 0
    if ways and not bool((counts == per_label).all()):
        raise InvalidArgument(f"partition_task needs the same number of samples of every label (got "
                              f"{sorted(set(counts.tolist()))})")
    if shots > per_label:
        raise InvalidArgument(f"partition_task: shots={shots} is more than the {per_label} samples of each label")
    # Stable: within a label the samples keep their order, so the support set is each label's first `shots`.
    order = torch.argsort(inverse, stable=True)
    shape = data.shape[1:]
    grouped = data[order].reshape(ways, per_label, *shape)
    grouped_labels = labels[order].reshape(ways, per_label)
    support = (grouped[:, :shots].reshape(ways * shots, *shape), grouped_labels[:, :shots].reshape(-1))
    query = (grouped[:, shots:].reshape(ways * (per_label - shots), *shape), grouped_labels[:, shots:].reshape(-1))
    return support, query


class InfiniteIterator:
    """Loops over ``dataloader`` forever: ``next()`` starts a new pass whenever one ends.

    ~~~python
    batches = InfiniteIterator(DataLoader(dataset, shuffle=True, batch_size=32))
    for step in range(10000):          # however long one pass is
        X, y = next(batches)
    ~~~
    """

    def __init__(self, dataloader: Iterable):
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self) -> "InfiniteIterator":
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
        try:
            return next(self.iterator)
        except StopIteration:
            raise InvalidArgument("InfiniteIterator: the dataloader gives nothing (an empty pass)") from None


class OnDeviceDataset(TensorDataset):
    """A whole dataset of ``(x, y)`` samples (``x`` tensors of one shape) as one tensor of data and one of
    labels, on ``device`` (default: host memory, pinned when CUDA is there), for small datasets that fit.
    ``transform`` is applied to ``x`` on each access. The dataset's ``_bookkeeping_path`` is kept, so a
    ``MetaDataset`` over it reuses its cached label maps."""

    def __init__(self, dataset: Any, device: torch.device | str | None = None, transform: Callable | None = None):
        xs, ys = [], []
        for i in range(len(dataset)):
            sample = dataset[i]
            xs.append(sample[0])
            ys.append(sample[1].item() if hasattr(sample[1], "item") else sample[1])
        if not xs:
            raise InvalidArgument("OnDeviceDataset: the dataset is empty")
        data = torch.stack(xs)
        labels = torch.tensor(ys)
        if device is not None:
            data, labels = data.to(device), labels.to(device)
        if data.device.type == "cpu" and torch.cuda.is_available():
            data, labels = data.pin_memory(), labels.pin_memory()  # faster copies to the GPU
        super().__init__(data, labels)
        self.transform = transform
        if hasattr(dataset, "_bookkeeping_path"):
            self._bookkeeping_path = dataset._bookkeeping_path

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, y
