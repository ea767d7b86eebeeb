"""Meta-datasets over metalearn's ``ClassStore``: classes (with class augmentations), tasks, splits.

A task is a tuple of class indices. Everything random about it (which samples each class gives
to which split, the labels ``Categorical`` draws, augmentation in metalearn's EpisodeTransform)
comes from a generator seeded by the tuple, the dataset's seed and the splitter's seed: the
same task always holds the same images, in any process, with any number of DataLoader workers
(torchmeta's "one task, one dataset" rule). Which tasks a loader draws comes from its sampler.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from collections import OrderedDict
from itertools import combinations
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data import default_collate

from metalearn.data.episodes import ClassStore
from metalearn.data.transforms import EpisodeTransform
from metalearn.torchmeta import transforms as T
from metalearn.torchmeta._errors import InvalidArgument, unsupported


def _transform_kind(transform: Any) -> str:
    """How a dataset's ``transform`` is fed: see the ``transforms`` module docstring."""
    if transform is None:
        return "none"
    if isinstance(transform, EpisodeTransform):
        return "episode"
    if isinstance(transform, T.ImageTransform):
        return "batched" if transform.batched else _transform_kind_of_first(transform)
    if isinstance(transform, T.TensorTransform):
        return "float"
    if not callable(transform):
        raise InvalidArgument(f"transform={transform!r} is not callable; give a callable on an image, or None")
    return "pil"


def _transform_kind_of_first(compose: Any) -> str:
    first = compose.transforms[0] if getattr(compose, "transforms", None) else None
    if isinstance(first, T.ImageTransform):
        return "uint8"
    if isinstance(first, T.TensorTransform):
        return "float"
    return "pil"


def _as_output(x: Any) -> Any:
    """A per-image transform's result, as a tensor where it is an image or an array."""
    if isinstance(x, T.Image.Image):
        return T.ToTensor()(x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


class ClassDataset:
    """The classes of one split: the store's classes, then each class augmentation of them.

    Class ``i`` is the store's class ``i % num_classes`` under augmentation
    ``i // num_classes - 1`` (none for the first ``num_classes``), torchmeta's numbering.
    ``dataset[i]`` is a task holding every sample of class ``i``.
    """

    def __init__(self, store: ClassStore, meta_split: str, transform: Any = None,
                 class_augmentations: list | None = None):
        if not isinstance(store, ClassStore):
            raise unsupported(f"a ClassDataset over a {type(store).__name__}",
                              "build it from a metalearn ClassStore, or put your images in class folders and use "
                              "metalearn's imagefolder dataset")
        if store.images.dim() != 4:
            raise unsupported("feature-vector stores", "metalearn.torchmeta datasets are image datasets")
        self.store = store
        self.meta_split = meta_split
        self.transform = transform
        self.transform_kind = _transform_kind(transform)
        self.class_augmentations = _flatten_augmentations(class_augmentations)

    @property
    def num_classes(self) -> int:
        """The classes before augmentation (torchmeta's ``num_classes``)."""
        return self.store.num_classes

    def __len__(self) -> int:
        return self.num_classes * (len(self.class_augmentations) + 1)

    def class_name(self, index: int) -> str:
        name = self.store.class_names[index % self.num_classes]
        aug = index // self.num_classes
        return name if aug == 0 else f"{name}/{self.class_augmentations[aug - 1]!r}"

    @property
    def class_names(self) -> list[str]:
        return [self.class_name(i) for i in range(len(self))]

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

    def __getitem__(self, index: int) -> "Task":
        index = self.check_index(index)
        samples = torch.arange(self.count(index))
        return Task(self, [index], [samples], [index], torch.Generator().manual_seed(_task_seed((index,), 0)))

    def __repr__(self) -> str:
        return f"ClassDataset({self.meta_split}: {self.num_classes} classes x {len(self.class_augmentations) + 1})"


def _flatten_augmentations(augmentations: list | None) -> list:
    if augmentations is None:
        return []
    if not isinstance(augmentations, list):
        raise InvalidArgument(f"class_augmentations must be a list, e.g. [Rotation([90, 180, 270])] (got {type(augmentations).__name__})")
    flat: list = []
    for group in augmentations:
        if not isinstance(group, T.ClassAugmentation):
            raise unsupported(f"class augmentation {group!r}",
                              "use Rotation, HorizontalFlip or VerticalFlip from metalearn.torchmeta.transforms")
        for aug in group:
            if aug in flat:
                warnings.warn(f"class augmentation {aug!r} is listed twice; the repeat is ignored", UserWarning, stacklevel=3)
                continue
            flat.append(aug)
    return flat


def _task_seed(classes: tuple, *seeds: int) -> int:
    """A 63-bit seed from a task's classes and the seeds: the same everywhere, every run."""
    text = ",".join(map(str, (*classes, "|", *seeds))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class Task(Dataset):
    """A few-shot task: samples of some classes of a ``ClassDataset``, grouped by class.

    ``task[j]`` is ``(image, target)`` like torchmeta's; ``tensors()`` gives the whole task
    at once, ``(inputs [n, C, H, W], targets [n])``, computed on the whole task where the
    transform allows (what ``BatchMetaDataLoader`` uses).
    """

    def __init__(self, source: ClassDataset, classes: list[int], samples: list[torch.Tensor],
                 targets: list[Any], generator: torch.Generator):
        self.source, self.classes, self.samples, self.targets = source, classes, samples, targets
        self.generator = generator
        self.counts = [len(s) for s in samples]
        self._ends = np.cumsum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"task index {index} out of range for a task of {len(self)} samples")
        index %= len(self)
        k = int(np.searchsorted(self._ends, index, side="right"))
        first = int(self._ends[k - 1]) if k else 0
        image = self.source.images(self.classes[k], self.samples[k][index - first : index - first + 1])[0]
        return self._transform_one(image), self.targets[k]

    def _transform_one(self, image: torch.Tensor):
        kind, transform = self.source.transform_kind, self.source.transform
        if kind == "none":
            return image.float().div_(255.0)
        if kind == "episode":
            return transform(image, self.generator)
        if kind in ("batched", "uint8"):
            return _as_output(transform(image))
        if kind == "float":
            return _as_output(transform(image.float().div_(255.0)))
        return _as_output(transform(T._to_pil(image)))

    def tensors(self) -> list:
        """``[inputs, targets]`` of the whole task (torchmeta's collated task)."""
        stacked = stack_tasks([self])
        if stacked is not None:
            return [stacked[0][0], stacked[1][0]]
        return default_collate([self[j] for j in range(len(self))])

    def split(self, splits: "OrderedDict[str, int]", shuffle: bool) -> "OrderedDict[str, Task]":
        """ClassSplitter's work: ``{split: Task}`` with ``splits[split]`` samples of every class."""
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
            noise = torch.rand(len(self.counts), most, generator=self.generator)
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
        return OrderedDict((name, Task(self.source, self.classes, list(part.unbind(0)), self.targets, self.generator))
                           for name, part in zip(splits, chosen))

    def __repr__(self) -> str:
        return f"Task({self.num_classes} classes, {len(self)} samples)"


def stack_tasks(tasks: list[Task]) -> list | None:
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


class MetaDataset:
    """torchmeta's ``CombinationMetaDataset`` over one split of a native dataset.

    ``dataset[(i, j, ...)]`` is the task of those classes (``num_classes_per_task`` of them):
    a ``Task``, or ``OrderedDict(train=Task, test=Task)`` with a ``ClassSplitter``.
    ``len(dataset)`` is the number of class combinations; iterating goes through them in order.
    Targets are the class index in ``dataset.dataset`` unless ``target_transform`` says
    otherwise (``Categorical(N)``: 0..N-1 per task).
    """

    def __init__(self, dataset: ClassDataset, num_classes_per_task: int, target_transform: Callable | None = None,
                 dataset_transform: Any = None):
        if not isinstance(num_classes_per_task, int) or isinstance(num_classes_per_task, bool) or num_classes_per_task < 1:
            raise InvalidArgument(f"num_classes_per_task must be a positive int, the ways of each task (got {num_classes_per_task!r})")
        if num_classes_per_task > len(dataset):
            raise InvalidArgument(
                f"num_classes_per_task={num_classes_per_task} is more than the {len(dataset)} classes of the "
                f"{dataset.meta_split} split; lower it"
            )
        if target_transform is not None and not callable(target_transform):
            raise InvalidArgument(f"target_transform={target_transform!r} is not callable")
        self.dataset = dataset
        self.num_classes_per_task = num_classes_per_task
        self.target_transform = target_transform
        self.dataset_transform = dataset_transform
        self.seed(None)

    # torchmeta's split flags
    @property
    def meta_split(self) -> str:
        return self.dataset.meta_split

    @property
    def meta_train(self) -> bool:
        return self.meta_split == "train"

    @property
    def meta_val(self) -> bool:
        return self.meta_split == "val"

    @property
    def meta_test(self) -> bool:
        return self.meta_split == "test"

    @property
    def dataset_transform(self) -> Any:
        return self._dataset_transform

    @dataset_transform.setter
    def dataset_transform(self, value: Any) -> None:
        if value is not None and not isinstance(value, T.ClassSplitter_):
            raise unsupported(f"dataset_transform={value!r}",
                              "use ClassSplitter(shuffle=..., num_train_per_class=..., num_test_per_class=...) or None")
        self._dataset_transform = value

    def seed(self, seed: int | None = None) -> None:
        """Seed the dataset: ``sample_task`` draws and every task's split and labels depend on it."""
        self._seed = None if seed is None else int(seed)
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))

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
        splitter = self.dataset_transform
        seeds = (self._seed or 0, splitter.random_state_seed if splitter is not None else 0)
        generator = torch.Generator().manual_seed(_task_seed(classes, *seeds))
        targets: list[Any] = list(classes)
        if isinstance(self.target_transform, T.Categorical):
            targets = self.target_transform.labels(len(classes), generator)
        elif self.target_transform is not None:
            targets = [self.target_transform(c) for c in classes]
        samples = [torch.arange(self.dataset.count(c)) for c in classes]
        task = Task(self.dataset, list(classes), samples, targets, generator)
        return task if splitter is None else splitter(task)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.meta_split}, {len(self.dataset)} classes, "
                f"{self.num_classes_per_task} per task, dataset_transform={self.dataset_transform!r})")
