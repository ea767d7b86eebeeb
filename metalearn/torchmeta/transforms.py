"""torchmeta's ``transforms``: ``Categorical``, ``ClassSplitter``, the class augmentations
``Rotation``, ``HorizontalFlip`` and ``VerticalFlip``, and, since torchvision cannot be installed
beside a current torch, the few image transforms torchmeta scripts take from it (``Compose``,
``Resize``, ``CenterCrop``, ``ToTensor``, ``Normalize``), as torch ops.

Image transforms given to a dataset (its ``transform``) receive one image at a time:

- this module's transforms (and a ``Compose`` that starts with one) get the image as a uint8
  tensor ``[C, H, W]`` (ink/brightness 0..255) and accept PIL images too; a ``Compose`` of
  nothing but them runs on a whole task at once, which is much faster;
- ``TensorTransform(fn)``: ``fn`` gets a float tensor ``[C, H, W]`` in [0, 1];
- metalearn's own ``metalearn.data.transforms.EpisodeTransform`` runs on the whole task's uint8
  images with the task's random generator (normalisation, augmentation);
- any other callable gets a PIL image, as with torchmeta (and torchvision's transforms);
  a PIL image or numpy array it returns is turned into a float tensor (ToTensor).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metalearn.data.images import resize
from metalearn.data.transforms import EpisodeTransform
from metalearn.torchmeta._errors import InvalidArgument, unsupported

__all__ = [
    "Categorical", "ClassSplitter", "Rotation", "HorizontalFlip", "VerticalFlip",
    "Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "TensorTransform",
    # torchmeta names that raise a clear error when used:
    "Splitter", "WeightedClassSplitter", "FixedCategory", "DefaultTargetTransform", "TargetTransform",
    "SegmentationPairTransform", "NumpyToTorch", "CategoricalWrapper",
]


# ----------------------------------------------------------------------------- targets

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


# ----------------------------------------------------------------------------- class augmentations

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


# ----------------------------------------------------------------------------- splitting tasks

class ClassSplitter_:
    """Splits each class of a task into ``train``/``test`` (or ``support``/``query``) samples.

    ``shuffle=True`` draws each class's samples at random (from the task's generator: the same
    task, i.e. the same tuple of classes, always gets the same split, as with torchmeta);
    ``shuffle=False`` takes them in the stored order. Within a split, samples are grouped by
    class in task order, as torchmeta does.
    """

    def __init__(self, shuffle: bool = True, num_samples_per_class: dict[str, int] | None = None,
                 num_train_per_class: int | None = None, num_test_per_class: int | None = None,
                 num_support_per_class: int | None = None, num_query_per_class: int | None = None,
                 random_state_seed: int = 0):
        if num_samples_per_class is None:
            num_samples_per_class = OrderedDict()
            if num_train_per_class is not None:
                num_samples_per_class["train"] = num_train_per_class
            elif num_support_per_class is not None:
                num_samples_per_class["support"] = num_support_per_class
            if num_test_per_class is not None:
                num_samples_per_class["test"] = num_test_per_class
            elif num_query_per_class is not None:
                num_samples_per_class["query"] = num_query_per_class
        if not num_samples_per_class:
            raise InvalidArgument("ClassSplitter needs the samples per class of each split, e.g. "
                                  "num_train_per_class=1, num_test_per_class=15")
        for name, n in num_samples_per_class.items():
            if not isinstance(n, int) or n < 1:
                raise InvalidArgument(f"ClassSplitter: the {name} split needs a positive int of samples per class (got {n!r})")
        self.splits = OrderedDict(num_samples_per_class)
        self.shuffle = bool(shuffle)
        self.random_state_seed = int(random_state_seed)

    @property
    def num_samples_per_class(self) -> int:
        return sum(self.splits.values())

    def seed(self, seed: int | None) -> None:
        """torchmeta's seeding hook: the seed joins the task's own (see ``datasets``)."""
        self.random_state_seed = 0 if seed is None else int(seed)

    def __call__(self, task):
        if not hasattr(task, "split"):
            raise unsupported(f"ClassSplitter on a {type(task).__name__}",
                              "apply it to a metalearn.torchmeta dataset or to one of its tasks")
        return task.split(self.splits, self.shuffle)

    def __len__(self) -> int:
        return len(self.splits)

    def __repr__(self) -> str:
        return f"ClassSplitter({', '.join(f'{k}={v}' for k, v in self.splits.items())}, shuffle={self.shuffle})"


def ClassSplitter(task=None, *args, **kwargs):
    """torchmeta's ``ClassSplitter``: with a dataset first, set it as the dataset's ``dataset_transform``
    and return the dataset; with a task, split it; alone, return the splitter."""
    splitter = ClassSplitter_(*args, **kwargs)
    if task is None:
        return splitter
    if hasattr(task, "dataset_transform"):  # a meta-dataset
        if task.dataset_transform is not None:
            raise unsupported("chaining dataset transforms", "give the dataset one ClassSplitter")
        task.dataset_transform = splitter
        return task
    return splitter(task)


# ----------------------------------------------------------------------------- image transforms

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


# ----------------------------------------------------------------------------- torchmeta names not provided

def _not_provided(name: str, instead: str) -> Callable:
    def refuse(*args, **kwargs):
        raise unsupported(f"torchmeta.transforms.{name}", instead)
    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"Not provided: calling it raises ``Unsupported`` ({instead})."
    return refuse


Splitter = _not_provided("Splitter", "split tasks with ClassSplitter(num_train_per_class=..., num_test_per_class=...)")
WeightedClassSplitter = _not_provided(
    "WeightedClassSplitter", "use ClassSplitter with fixed num_train_per_class/num_test_per_class")
FixedCategory = _not_provided("FixedCategory", "targets without a target_transform are already the class index")
DefaultTargetTransform = _not_provided("DefaultTargetTransform", "leave target_transform=None or use Categorical")
TargetTransform = _not_provided("TargetTransform", "any callable on the target (the class index) can be a target_transform")
SegmentationPairTransform = _not_provided("SegmentationPairTransform", "segmentation datasets (Pascal5i) are not provided")
NumpyToTorch = _not_provided("NumpyToTorch", "tabular datasets are not provided")
CategoricalWrapper = _not_provided("CategoricalWrapper", "give the dataset target_transform=Categorical(ways)")
