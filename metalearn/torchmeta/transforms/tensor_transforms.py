"""The image transforms torchmeta scripts take from torchvision (``Compose``, ``Resize``,
``CenterCrop``, ``ToTensor``, ``Normalize``), as torch ops, since torchvision cannot be installed
beside a current torch; and ``TensorTransform``, which marks a function of float tensors.

How a dataset feeds its ``transform`` is in the ``metalearn.torchmeta.transforms`` docstring.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from metalearn.data.images import resize
from metalearn.data.transforms import EpisodeTransform
from metalearn.torchmeta._errors import InvalidArgument, unsupported

__all__ = ["ImageTransform", "Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "TensorTransform"]


class ImageTransform:
    """Base of this module's image transforms: on PIL images or tensors ``[..., C, H, W]``."""

    #: True when it works on a batch ``[N, C, H, W]`` the same as on each image.
    batched = True

    def __call__(self, image):
        raise NotImplementedError


class Compose(ImageTransform):
    """Apply ``transforms`` in turn (torchvision's Compose)."""

    def __init__(self, transforms: Iterable[Callable]):
        self.transforms = list(transforms)
        for t in self.transforms:
            if isinstance(t, EpisodeTransform):
                raise unsupported("an EpisodeTransform inside Compose",
                                  "give it as the dataset's transform on its own (it needs the task's generator)")

    @property
    def batched(self) -> bool:
        return all(isinstance(t, ImageTransform) and t.batched for t in self.transforms)

    def __call__(self, image):
        for t in self.transforms:
            image = t(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ToTensor(ImageTransform):
    """PIL image or uint8 tensor -> float tensor ``[C, H, W]`` in [0, 1]; float tensors pass unchanged."""

    def __call__(self, image):
        if isinstance(image, Image.Image):
            image = _from_pil(image)
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
            if image.dim() == 3 and image.shape[-1] in (1, 3, 4):  # H, W, C as torchvision reads arrays
                image = image.permute(2, 0, 1)
        if image.dtype == torch.uint8:
            return image.float().div_(255.0)
        return image if image.is_floating_point() else image.float()

    def __repr__(self) -> str:
        return "ToTensor()"


class Resize(ImageTransform):
    """Resize to ``size``: an int matches the shorter side (aspect kept), ``(h, w)`` is exact.
    Bilinear with antialiasing (like PIL's BILINEAR when shrinking)."""

    def __init__(self, size: int | Sequence[int], interpolation: Any = None, antialias: bool = True):
        if interpolation not in (None, 2, Image.Resampling.BILINEAR):
            raise unsupported(f"Resize(interpolation={interpolation!r})", "Resize is bilinear; leave interpolation unset")
        self.size = size if isinstance(size, int) else tuple(size)

    def _target(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, tuple):
            return self.size
        if h <= w:
            return self.size, max(1, int(self.size * w / h))
        return max(1, int(self.size * h / w)), self.size

    def __call__(self, image):
        if isinstance(image, Image.Image):
            h, w = self._target(image.height, image.width)
            return image if (h, w) == (image.height, image.width) else image.resize((w, h), Image.Resampling.BILINEAR)
        return resize(image, self._target(*image.shape[-2:]))  # metalearn's own (data/images.py)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop(ImageTransform):
    """The central ``size`` (int: square) of each image."""

    def __init__(self, size: int | Sequence[int]):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image):
        if isinstance(image, Image.Image):
            return _to_pil(self(_from_pil(image)))
        (h, w), (ch, cw) = image.shape[-2:], self.size
        if ch > h or cw > w:
            raise InvalidArgument(f"CenterCrop({self.size}) is larger than the {h}x{w} images; Resize first")
        top, left = (h - ch) // 2, (w - cw) // 2
        return image[..., top : top + ch, left : left + cw]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class Normalize(ImageTransform):
    """``(x - mean) / std`` per channel, on float tensors (put ``ToTensor()`` first)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image):
        if isinstance(image, Image.Image) or not image.is_floating_point():
            raise InvalidArgument("Normalize needs float tensors; put ToTensor() before it in the Compose")
        channels = image.shape[-3]
        if len(self.mean) not in (1, channels) or len(self.std) not in (1, channels):
            raise InvalidArgument(f"Normalize has {len(self.mean)} means and {len(self.std)} stds for images of "
                                  f"{channels} channel(s); give one value or one per channel")
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class TensorTransform:
    """Mark ``fn`` as a transform of float tensors: it gets each image as ``[C, H, W]`` in [0, 1]."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]):
        self.fn = fn

    def __call__(self, image: torch.Tensor):
        return self.fn(image)

    def __repr__(self) -> str:
        return f"TensorTransform({self.fn!r})"


def _from_pil(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W] (greyscale: C = 1)."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    t = torch.from_numpy(np.array(array, copy=True))
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 tensor [C, H, W] -> PIL image (mode L for one channel, RGB for three)."""
    array = image.detach().cpu()
    if array.is_floating_point():
        array = array.mul(255).round().clamp(0, 255).to(torch.uint8)
    array = array.numpy()
    return Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
