"""A torchmeta-compatible API over metalearn's data layer.

torchmeta (the library whose conventions metalearn keeps) pins torch<1.10 and no longer installs
beside a current torch. Scripts written for it run here with the import lines changed:

    from torchmeta.datasets.helpers import omniglot          ->  from metalearn.torchmeta.datasets.helpers import omniglot
    from torchmeta.utils.data import BatchMetaDataLoader     ->  from metalearn.torchmeta.utils.data import BatchMetaDataLoader

(or ``import metalearn.torchmeta as torchmeta``). Provided: ``datasets`` (Omniglot, MiniImagenet,
TieredImagenet, CIFARFS, FC100, CUB, DoubleMNIST, and the extra Glyphs), ``datasets.helpers``
(also as ``helpers``), ``transforms`` (Categorical, ClassSplitter, Rotation, HorizontalFlip,
VerticalFlip, and torch versions of torchvision's Compose, Resize, CenterCrop, ToTensor,
Normalize), ``utils.data`` (BatchMetaDataLoader, MetaDataLoader, the combination samplers) and
``utils.gradient_based.gradient_update_parameters``. The rest of torchmeta (``modules``, ``toy``,
other splitters and datasets) raises ``Unsupported``/``ImportError`` naming what to use instead.
"""

from metalearn.torchmeta import datasets, transforms, utils  # noqa: F401
from metalearn.torchmeta._errors import InvalidArgument, Unsupported  # noqa: F401
from metalearn.torchmeta.datasets import helpers  # noqa: F401

__all__ = ["datasets", "helpers", "transforms", "utils", "Unsupported", "InvalidArgument"]
