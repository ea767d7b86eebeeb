"""torchmeta's class augmentations: ``Rotation``, ``HorizontalFlip``, ``VerticalFlip``.

Each makes new classes out of a dataset's classes (``class_augmentations=[Rotation([90, 180, 270])]``)
and runs on uint8 image tensors ``[..., C, H, W]`` (one image or a whole task at once).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from metalearn.torchmeta._errors import InvalidArgument, unsupported
from metalearn.torchmeta.transforms.tensor_transforms import _from_pil, _to_pil

__all__ = ["ClassAugmentation", "Rotation", "HorizontalFlip", "VerticalFlip", "rotate"]


class ClassAugmentation:
    """A transform that makes new classes out of existing ones (``class_augmentations=[...]``).

    Iterating gives the single augmentations (``Rotation([90, 180])`` is two); ``apply`` runs one
    on uint8 images ``[..., C, H, W]``; calling it on a PIL image or a tensor transforms that image.
    """

    def __iter__(self):
        return iter([self])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, image):
        if isinstance(image, Image.Image):
            return _to_pil(self.apply(_from_pil(image)))
        return self.apply(image)

    def __hash__(self) -> int:
        return hash(repr(self))

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)


class Rotation(ClassAugmentation):
    """Rotate images counter-clockwise by ``angle`` degrees (a list gives one class augmentation per angle).

    Multiples of 90 on square images are exact (``torch.rot90``); other angles resample
    (``resample``: False/None/0 nearest, as torchmeta, or 2 = PIL's BILINEAR) and fill with 0,
    keeping the image size (torchmeta's ``expand=False``, rotating about the centre).
    """

    def __init__(self, angle: float | Sequence[float], resample: Any = False, expand: bool = False, center: Any = None):
        if expand:
            raise unsupported("Rotation(expand=True)", "rotations keep the image size; leave expand=False")
        if center is not None:
            raise unsupported("Rotation(center=...)", "rotations turn about the image centre; leave center=None")
        if resample in (False, None, 0, Image.Resampling.NEAREST):
            self.mode = "nearest"
        elif resample in (2, Image.Resampling.BILINEAR):
            self.mode = "bilinear"
        else:
            raise unsupported(f"Rotation(resample={resample!r})", "use resample=False (nearest) or 2 (bilinear)")
        self.resample = resample
        if isinstance(angle, (list, tuple)):
            self._angles, self.angle = list(angle), None
        else:
            self._angles, self.angle = [angle], angle
            if angle % 360 == 0:
                warnings.warn(f"Rotation({angle}) as a class augmentation only repeats the original classes", UserWarning, stacklevel=2)

    def __iter__(self):
        return iter([Rotation(a, resample=self.resample) for a in self._angles])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.angle is None:
            raise InvalidArgument(f"{self!r} holds several angles; iterate over it (or give class_augmentations=[{self!r}])")
        return rotate(images, self.angle, self.mode)

    def __repr__(self) -> str:
        if self.angle is None:
            return f"Rotation({', '.join(map(str, self._angles))})"
        return f"Rotation({self.angle % 360})"


class HorizontalFlip(ClassAugmentation):
    """Mirror images left-right."""

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(-1)

    def __repr__(self) -> str:
        return "HorizontalFlip()"


class VerticalFlip(ClassAugmentation):
    """Mirror images top-bottom."""

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(-2)

    def __repr__(self) -> str:
        return "VerticalFlip()"


def rotate(images: torch.Tensor, angle: float, mode: str = "nearest") -> torch.Tensor:
    """``images [..., C, H, W]`` turned counter-clockwise by ``angle`` degrees, same size, 0 fill."""
    angle = angle % 360
    h, w = images.shape[-2:]
    if angle % 90 == 0 and (h == w or angle % 180 == 0):
        return torch.rot90(images, int(angle // 90), dims=(-2, -1))
    shape = images.shape
    x = images.reshape(-1, *shape[-3:])
    xf = x.float() if not x.is_floating_point() else x
    a = math.radians(angle)
    # Output pixel -> input pixel, in normalised coordinates (x right, y down); a square image's
    # aspect keeps the rotation rigid (for other shapes the rotation is about normalised axes).
    theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
                         dtype=xf.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(xf.shape), align_corners=False)
    out = F.grid_sample(xf, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if not x.is_floating_point():
        out = out.round_().clamp_(0, 255).to(x.dtype)
    return out.reshape(shape)
