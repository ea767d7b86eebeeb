"""learn2learn's ``Taskset`` (also ``TaskDataset``): tasks drawn from a dataset by a list of task transforms.

A task is first drawn as a *description*: a list of ``DataDescription(index)`` objects, each naming one
sample of the dataset and the per-sample ``transforms`` that make it part of the task (``LoadData``
appends the loading of the sample, ``RemapLabels`` its relabelling). ``sample_task_description`` runs the
task transforms on ``None`` (the first one starts from the whole dataset, or from what it draws itself);
``get_task`` applies each sample's ``transforms`` to its index and collates the results (by default
``torch.utils.data.default_collate``: ``[data [N, ...], labels [N]]``).

Randomness: every draw comes from Python's ``random`` module, as in learn2learn, so ``random.seed(s)``
before drawing makes the tasks reproducible (in a ``DataLoader`` with workers, torch seeds ``random`` in
each worker from its base seed: set that with the loader's ``generator``/``worker_init_fn``). With
``num_tasks > 0`` the description of each index is drawn once, the first time it is asked for, and kept:
the same index always gives the same task (the per-task randomness of ``RemapLabels`` and the class
rotations is part of the description, so it is kept too).
"""

from __future__ import annotations

import operator
import random
from typing import Any, Callable

from torch.utils.data import Dataset, default_collate

from metalearn.learn2learn._errors import InvalidArgument, unsupported
from metalearn.learn2learn.data.meta_dataset import MetaDataset


class DataDescription:
    """One sample of a task: ``index`` in the dataset and ``transforms``, the callables that turn the index
    into the task's sample (applied in order by ``Taskset.get_task``)."""

    __slots__ = ("index", "transforms")

    def __init__(self, index: int):
        self.index = index
        self.transforms: list[Callable] = []

    def __repr__(self) -> str:
        return f"DataDescription({self.index}, transforms={len(self.transforms)})"


class Taskset(Dataset):
    """Tasks from ``dataset`` (wrapped in a ``MetaDataset`` if it is not one), shaped by ``task_transforms``
    (a list applied in order, or one callable given ``None``).

    ``num_tasks``: -1 draws a new task at every access (``len`` is then 1 and iteration never ends); a
    positive number gives that many tasks, each index's description drawn once and cached, so
    ``taskset[i]`` is always the same task. ``task_collate``: turns the list of a task's samples into the
    task (default ``default_collate``). ``sample()`` is the task of a random index; iterating gives the
    tasks in index order (or forever, with -1).
    """

    def __init__(self, dataset: Any, task_transforms: list | Callable | None = None, num_tasks: int = -1,
                 task_collate: Callable | None = None):
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < -1 or num_tasks == 0:
            raise InvalidArgument(f"num_tasks must be -1 (a new task every time) or a positive number of tasks "
                                  f"(got {num_tasks!r})")
        self.dataset = dataset
        self.task_transforms = task_transforms if task_transforms is not None else []
        self.num_tasks = num_tasks
        self.task_collate = task_collate if task_collate is not None else default_collate
        self.sampled_descriptions: dict[int, list[DataDescription]] = {}
        self._task_id = 0

    def sample_task_description(self) -> list[DataDescription]:
        """A new task description: the task transforms applied in order, starting from ``None``."""
        transforms = self.task_transforms
        if callable(transforms):
            return transforms(None)
        description, start = None, 0
        # NWays then KShots over the same dataset are drawn together: the same random draws and the same
        # description as running them one after the other, without first describing every sample of the
        # N classes (thousands of objects for MNIST-sized classes).
        if len(transforms) >= 2:
            fused = getattr(transforms[0], "_fused_with", None)
            description = fused(transforms[1]) if fused is not None else None
            start = 2 if description is not None else 0
        for transform in transforms[start:]:
            description = transform(description)
        return description

    def get_task(self, task_description: list[DataDescription]) -> Any:
        """The task of a description: each sample's transforms applied to its index, then collated."""
        samples = []
        for data_description in task_description:
            data = data_description.index
            for transform in data_description.transforms:
                data = transform(data)
            samples.append(data)
        return self.task_collate(samples)

    def sample(self) -> Any:
        """The task of a random index (a new task with ``num_tasks=-1``)."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self) -> int:
        # With -1 the length is 1 (as in learn2learn): every access draws a new task anyway.
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i: int) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        i = operator.index(i)
        if i < 0:
            i += self.num_tasks
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task index {i} is out of range for a Taskset of {self.num_tasks} tasks")
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(self.sampled_descriptions[i])

    def __iter__(self) -> "Taskset":
        self._task_id = 0
        return self

    def __next__(self) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if self._task_id >= self.num_tasks:
            raise StopIteration
        task = self[self._task_id]
        self._task_id += 1
        return task

    def __add__(self, other: Any):
        raise unsupported("adding Tasksets", "build one Taskset over UnionMetaDataset([a.dataset, b.dataset])")


#: learn2learn's older name of Taskset.
TaskDataset = Taskset

