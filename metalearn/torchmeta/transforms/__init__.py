"""torchmeta's ``transforms``: ``Categorical``, the splitters (``ClassSplitter``,
``WeightedClassSplitter``, ``Splitter``), the class augmentations ``Rotation``, ``HorizontalFlip``
and ``VerticalFlip``, and, since torchvision cannot be installed beside a current torch, the few
image transforms torchmeta scripts take from it (``Compose``, ``Resize``, ``CenterCrop``,
``ToTensor``, ``Normalize``), as torch ops.

Modules, as in torchmeta: ``categorical``, ``splitters``, ``augmentations``, ``target_transforms``;
the torchvision stand-ins are in ``tensor_transforms``.

Image transforms given to a native dataset (its ``transform``) receive one image at a time:

- this package's transforms (and a ``Compose`` that starts with one) get the image as a uint8
  tensor ``[C, H, W]`` (ink/brightness 0..255) and accept PIL images too; a ``Compose`` of
  nothing but them runs on a whole task at once, which is much faster;
- ``TensorTransform(fn)``: ``fn`` gets a float tensor ``[C, H, W]`` in [0, 1];
- metalearn's own ``metalearn.data.transforms.EpisodeTransform`` runs on the whole task's uint8
  images with the task's random generator (normalisation, augmentation);
- any other callable gets a PIL image, as with torchmeta (and torchvision's transforms);
  a PIL image or numpy array it returns is turned into a float tensor (ToTensor).
"""

from metalearn.torchmeta.transforms.categorical import Categorical
from metalearn.torchmeta.transforms.augmentations import ClassAugmentation, HorizontalFlip, Rotation, VerticalFlip, rotate
from metalearn.torchmeta.transforms.tensor_transforms import (
    CenterCrop, Compose, ImageTransform, Normalize, Resize, TensorTransform, ToTensor,
)
from metalearn.torchmeta.transforms.target_transforms import (
    CategoricalWrapper, DefaultTargetTransform, FixedCategory, NumpyToTorch, SegmentationPairTransform, TargetTransform,
)
from metalearn.torchmeta.transforms.splitters import (
    ClassSplitter, ClassSplitter_, Splitter, WeightedClassSplitter, WeightedClassSplitter_,
)

__all__ = [
    "Categorical", "ClassSplitter", "WeightedClassSplitter", "Splitter", "Rotation", "HorizontalFlip", "VerticalFlip",
    "Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "TensorTransform", "TargetTransform",
    # metalearn's: the splitter classes behind the two factories, the bases of the transforms, rotation on tensors
    "ClassSplitter_", "WeightedClassSplitter_", "ClassAugmentation", "ImageTransform", "rotate",
    # torchmeta names that raise a clear error when used:
    "FixedCategory", "DefaultTargetTransform", "SegmentationPairTransform", "NumpyToTorch", "CategoricalWrapper",
]

#: torchvision transforms scripts import from here after swapping ``torchvision.transforms`` out; each gets one
#: line naming metalearn's way to the same effect (augmentation runs on whole tasks there).
_TORCHVISION = ("RandomResizedCrop", "RandomCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "ColorJitter",
                "RandomRotation", "RandomAffine", "Grayscale", "RandomGrayscale", "Pad", "Lambda", "ToPILImage",
                "GaussianBlur", "RandomApply", "RandomChoice", "RandomErasing", "AutoAugment", "RandAugment",
                "TrivialAugmentWide", "FiveCrop", "TenCrop", "LinearTransformation", "ConvertImageDtype")


def __getattr__(name: str):
    if name in _TORCHVISION:
        from metalearn.torchmeta._errors import unsupported

        raise unsupported(f"torchvision's transforms.{name}",
                          "for augmentation give the dataset transform=metalearn.data.transforms.EpisodeTransform("
                          "augment=AugmentConfig(enabled=True, crop_padding=8, flip=True, color_jitter=0.4)) (whole "
                          "tasks, seeded; AugmentConfig from the same module), or any callable on a PIL image")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
