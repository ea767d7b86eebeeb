"""learn2learn's ``data``: meta-datasets, the Taskset and its task transforms, over any dataset and over
metalearn's own (a ``ClassStore`` given to ``MetaDataset`` is served by ``StoreDataset``).

    dataset = l2l.data.MetaDataset(my_dataset)                    # labels_to_indices, indices_to_labels, labels
    taskset = l2l.data.Taskset(dataset, task_transforms=[
        l2l.data.transforms.NWays(dataset, n=5),
        l2l.data.transforms.KShots(dataset, k=2),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ], num_tasks=1000)
    X, y = taskset.sample()                                       # X [10, ...], y = [0, 0, 1, 1, .., 4, 4]
    (Xs, ys), (Xq, yq) = l2l.data.partition_task(X, y, shots=1)

Tasks are drawn with Python's ``random`` (``random.seed`` makes them reproducible), as in learn2learn.
Where this differs from learn2learn (each difference is in the docstring of the class concerned):
``ConsecutiveLabels`` after ``RemapLabels`` orders by the new labels, as learn2learn documents (its code
orders by the dataset's labels); ``RemapLabels(shuffle=False)`` numbers the labels in sorted order;
``MetaDataset`` reads labels in bulk where it can instead of loading every sample, and accepts a
metalearn ``ClassStore``; a ``Taskset`` index beyond ``num_tasks`` raises ``IndexError``.
"""

from metalearn.learn2learn.data import transforms, utils  # noqa: F401
from metalearn.learn2learn.data.meta_dataset import FilteredMetaDataset, MetaDataset, UnionMetaDataset
from metalearn.learn2learn.data.stores import StoreDataset
from metalearn.learn2learn.data.task_dataset import DataDescription, TaskDataset, Taskset
from metalearn.learn2learn.data.utils import InfiniteIterator, OnDeviceDataset, partition_task

__all__ = ["MetaDataset", "UnionMetaDataset", "FilteredMetaDataset", "Taskset", "TaskDataset", "DataDescription",
           "StoreDataset", "partition_task", "InfiniteIterator", "OnDeviceDataset", "transforms", "utils"]
