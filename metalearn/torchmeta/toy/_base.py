"""What the toy regression meta-datasets share: tasks drawn lazily, each from its own seeded generator."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from metalearn.torchmeta._core import MetaDataset, Task, _task_seed
from metalearn.torchmeta._errors import InvalidArgument


class ToyTask(Task):
    """One regression task: ``task[j]`` is ``(input [1], target [1])``: float32 tensors without transforms;
    with a ``transform``/``target_transform``, that callable gets what torchmeta gives it, a float64 numpy
    array of shape ``(1,)`` (the common ``ToTensor1D``, ``torch.from_numpy(a.astype('float32'))``, works).
    The task's parameters (``amplitude``, ``phase``, ...) are attributes, as on torchmeta's task classes."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                 transform: Callable | None = None, target_transform: Callable | None = None, **parameters: Any):
        super().__init__(None, transform=transform, target_transform=target_transform)
        self._inputs, self._targets = inputs, targets
        self.generator = generator
        self.parameters = parameters
        for name, value in parameters.items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index: int):
        x, y = self._inputs[index], self._targets[index]  # float64
        x = x.float() if self.transform is None else self.transform(x.numpy())
        y = y.float() if self.target_transform is None else self.target_transform(y.numpy())
        return x, y

    def tensors(self) -> list:
        if self.transform is None and self.target_transform is None:
            return [self._inputs.float(), self._targets.float()]
        return super().tensors()

    def class_groups(self) -> list[list[int]]:
        return [list(range(len(self)))]

    def subset(self, indices) -> "ToyTask":
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return ToyTask(self._inputs[rows], self._targets[rows], self.generator, self.transform,
                       self.target_transform, **self.parameters)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.parameters.items())
        return f"ToyTask({len(self)} samples, {shown})"


class ToyMetaDataset(MetaDataset):
    """A meta-dataset of ``num_tasks`` random regression tasks of ``num_samples_per_task`` samples.

    Task ``i`` (its function's parameters, its inputs, its noise) is drawn from a generator seeded
    by ``i`` and the dataset's seed, when it is indexed: ``seed(s)`` fixes every task, and the same
    index always gives the same task. Unseeded, the seed is drawn from torch's global generator
    when the dataset is made (``torch.manual_seed`` fixes it; torchmeta draws its tasks' parameters
    from an unseeded numpy generator, and their inputs from numpy's global one at each access).
    A subclass defines ``draw(generator, n) -> (inputs [n, 1], targets [n, 1], parameters)`` in float64.
    """

    default_num_tasks = 1000000

    def __init__(self, num_samples_per_task: int, num_tasks: int | None = None, noise_std: float | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 dataset_transform: Any = None):
        name = type(self).__name__
        if not isinstance(num_samples_per_task, int) or isinstance(num_samples_per_task, bool) or num_samples_per_task < 1:
            raise InvalidArgument(f"{name}: num_samples_per_task must be a positive int (got {num_samples_per_task!r})")
        num_tasks = self.default_num_tasks if num_tasks is None else num_tasks
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise InvalidArgument(f"{name}: num_tasks must be a positive int (got {num_tasks!r})")
        if noise_std is not None and not (isinstance(noise_std, (int, float)) and 0 <= noise_std < math.inf):
            raise InvalidArgument(f"{name}: noise_std must be None or a float >= 0 (got {noise_std!r})")
        for option, value in (("transform", transform), ("target_transform", target_transform)):
            if value is not None and not callable(value):
                raise InvalidArgument(f"{name}: {option}={value!r} is not callable")
        self.num_samples_per_task = num_samples_per_task
        self.num_tasks = num_tasks
        self.noise_std = noise_std
        self.transform = transform
        super().__init__(meta_split="train", target_transform=target_transform, dataset_transform=dataset_transform)

    def seed(self, seed: int | None = None) -> None:
        super().seed(seed)
        self._base_seed = int(seed) if seed is not None else int(torch.randint(2**62, ()).item())

    def __len__(self) -> int:
        return self.num_tasks

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            index = int(index)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise InvalidArgument(f"a {type(self).__name__} task is indexed by an int (got {index!r})")
        if not -self.num_tasks <= index < self.num_tasks:
            raise IndexError(f"task {index} is out of range for {self.num_tasks} tasks")
        index = int(index) % self.num_tasks
        generator = torch.Generator().manual_seed(_task_seed((type(self).__name__, index), self._base_seed))
        inputs, targets, parameters = self.draw(generator, self.num_samples_per_task)
        if self.noise_std:
            targets = targets + self.noise_std * torch.randn(targets.shape, generator=generator, dtype=torch.float64)
        task = ToyTask(inputs, targets, generator, self.transform, self.target_transform, **parameters)
        return task if self.dataset_transform is None else self.dataset_transform(task)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_tasks} tasks of {self.num_samples_per_task} samples, "
                f"dataset_transform={self.dataset_transform!r})")


def uniform(generator: torch.Generator, low: float, high: float, shape: tuple = ()) -> torch.Tensor:
    """Uniform draws in [low, high), float64."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
