"""learn2learn's ``vision.transforms``: the rotations used to augment few-shot image tasks.

* ``RandomClassRotation(dataset, degrees)``: a *task* transform (after ``LoadData``): each class of a task is
  turned by one angle drawn from ``degrees``, all its samples alike (learn2learn's Omniglot benchmark puts
  it last in every split's task transforms). The class of ``vision.benchmarks``, re-exported here, where
  learn2learn keeps it; multiples of 90 degrees.
* ``RandomDiscreteRotation(degrees)``: a *sample* transform (e.g. a dataset's ``transform``): each image is
  turned by an angle drawn from ``degrees`` at every call.

Angles are in degrees, counter-clockwise (as torchvision and PIL rotate), drawn with Python's ``random``
(``random.seed`` fixes them, as in learn2learn).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from metalearn.learn2learn._errors import InvalidArgument, unsupported
from metalearn.learn2learn.vision.benchmarks import RandomClassRotation

__all__ = ["RandomClassRotation", "RandomDiscreteRotation"]


class RandomDiscreteRotation:
    """Rotate an image by an angle drawn uniformly from ``degrees`` (a list), anew at every call.

    A tensor image ``[..., H, W]`` is turned exactly on its pixel grid (``torch.rot90``), so its angles must
    be multiples of 90 (learn2learn, through torchvision, also interpolates other angles); a PIL image is
    turned by PIL (``Image.rotate``: nearest neighbour, same size, corners filled with 0, as torchvision's
    ``RandomRotation`` defaults), any angle. learn2learn's other ``RandomRotation`` arguments
    (``interpolation``, ``expand``, ``center``, ``fill``) are not taken.

    ~~~python
    transform = RandomDiscreteRotation([0.0, 90.0, 180.0, 270.0])
    image = transform(image)
    ~~~
    """

    def __init__(self, degrees: list, *args: Any, **kwargs: Any):
        if args or kwargs:
            raise unsupported("RandomDiscreteRotation's RandomRotation arguments (interpolation, expand, center, fill)",
                              "rotate by multiples of 90 degrees, which need none")
        degrees = list(degrees) if isinstance(degrees, (list, tuple)) else None
        if not degrees:
            raise InvalidArgument("RandomDiscreteRotation needs a non-empty list of angles, e.g. [0, 90, 180, 270]")
        self.degrees = degrees

    @staticmethod
    def get_params(degrees: list) -> float:
        """One angle of ``degrees``, drawn with Python's ``random``."""
        return random.choice(degrees)

    def __call__(self, img: Any) -> Any:
        angle = self.get_params(self.degrees)
        if isinstance(img, torch.Tensor):
            # Every angle is checked, not only the one drawn: the first tensor fails, not a random later one.
            if any(float(a) % 90 for a in self.degrees):
                raise unsupported(f"RandomDiscreteRotation({self.degrees}) on tensor images",
                                  "use multiples of 90 degrees, or give PIL images")
            quarter = float(angle) / 90.0
            if img.dim() < 2:
                raise InvalidArgument(f"RandomDiscreteRotation takes images [..., H, W] (got shape {tuple(img.shape)})")
            turns = int(quarter) % 4
            return img if turns == 0 else torch.rot90(img, turns, dims=(-2, -1))
        if hasattr(img, "rotate") and hasattr(img, "size"):  # a PIL image
            return img.rotate(float(angle))
        raise InvalidArgument(f"RandomDiscreteRotation takes a tensor or a PIL image (got {type(img).__name__})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(degrees={self.degrees})"
