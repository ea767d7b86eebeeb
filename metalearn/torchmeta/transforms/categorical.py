"""torchmeta's ``Categorical`` target transform (labels 0..N-1 for each task's classes)."""

from __future__ import annotations

from typing import Any

import torch

from metalearn.torchmeta._errors import InvalidArgument

__all__ = ["Categorical"]


class Categorical:
    """Target transform giving each task's classes the labels 0..num_classes-1.

    In a dataset's ``target_transform``, every task draws a random permutation: the task's
    i-th class gets label ``perm[i]`` (torchmeta's behaviour; the draw comes from the task's
    generator, so the same task always gets the same labels). ``num_classes=None`` labels the
    classes 0, 1, 2, ... in task order. Called directly on targets, it labels them in the order
    first seen, as torchmeta's does.
    """

    def __init__(self, num_classes: int | None = None):
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise InvalidArgument(f"Categorical(num_classes={num_classes!r}): give a positive int or None")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self._classes: dict[Any, int] = {}
        self._labels: list[int] | None = None

    def labels(self, ways: int, generator: torch.Generator | None = None) -> list[int]:
        """The labels of a task's ``ways`` classes, in task order."""
        if self.num_classes is None:
            return list(range(ways))
        if ways > self.num_classes:
            raise InvalidArgument(
                f"Categorical({self.num_classes}) cannot label tasks of {ways} classes; "
                f"use Categorical({ways}) (the number of classes per task) or Categorical()"
            )
        return torch.randperm(self.num_classes, generator=generator)[:ways].tolist()

    def __call__(self, target: Any) -> int:
        if target not in self._classes:
            if self.num_classes is not None and len(self._classes) >= self.num_classes:
                raise InvalidArgument(
                    f"Categorical({self.num_classes}) got more than {self.num_classes} distinct targets; "
                    "call reset() between tasks or raise num_classes"
                )
            if self._labels is None and self.num_classes is not None:
                self._labels = torch.randperm(self.num_classes).tolist()
            self._classes[target] = len(self._classes) if self._labels is None else self._labels[len(self._classes)]
        return self._classes[target]

    def __repr__(self) -> str:
        return f"Categorical({self.num_classes or ''})"
