"""torchmeta's target-transform base class, and the torchmeta transforms that are not provided.

``TargetTransform`` is a base for your own target transforms (any callable on a target works
as a ``target_transform`` too). The others raise ``Unsupported`` naming what to use instead.
"""

from __future__ import annotations

from typing import Any, Callable

from metalearn.errors import not_provided

__all__ = ["TargetTransform", "FixedCategory", "DefaultTargetTransform", "SegmentationPairTransform",
           "NumpyToTorch", "CategoricalWrapper"]


class TargetTransform:
    """Base class of a target transform: subclass it and define ``__call__(target)``."""

    def __call__(self, target: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(target)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _not_provided(name: str, instead: str) -> Callable:
    return not_provided("metalearn.torchmeta", f"torchmeta.transforms.{name}", instead)


# Targets here are already class indices (or your class datasets' own targets), never torchmeta's
# (name, augmentation) pairs, so the transforms that turned those pairs into labels have no work.
FixedCategory = _not_provided("FixedCategory", "targets without a target_transform are already the class index")
DefaultTargetTransform = _not_provided("DefaultTargetTransform", "leave target_transform=None or use Categorical")
SegmentationPairTransform = _not_provided("SegmentationPairTransform", "segmentation datasets (Pascal5i) are not provided")
NumpyToTorch = _not_provided("NumpyToTorch", "tabular datasets are not provided")
CategoricalWrapper = _not_provided("CategoricalWrapper", "give the dataset target_transform=Categorical(ways)")
