"""A torchmeta-compatible API over metalearn's data layer.

torchmeta (the library whose conventions metalearn keeps) pins torch<1.10 and no longer installs
beside a current torch. Scripts written for it run here with the import lines changed:

    from torchmeta.datasets.helpers import omniglot          ->  from metalearn.torchmeta.datasets.helpers import omniglot
    from torchmeta.utils.data import BatchMetaDataLoader     ->  from metalearn.torchmeta.utils.data import BatchMetaDataLoader

(or ``import metalearn.torchmeta as torchmeta``). Provided: ``datasets`` (Omniglot, MiniImagenet,
TieredImagenet, CIFARFS, FC100, CUB, DoubleMNIST, and the extras Glyphs, MNIST, ImageFolder),
``datasets.helpers`` (also as ``helpers``; one per dataset), ``transforms`` (Categorical,
ClassSplitter, WeightedClassSplitter, Splitter, TargetTransform, Rotation, HorizontalFlip,
VerticalFlip, torch versions of torchvision's Compose, Resize, CenterCrop, ToTensor, Normalize;
modules ``splitters``, ``categorical``, ``augmentations``, ``tensor_transforms``), ``toy``
(Sinusoid, Harmonic, SinusoidAndLine and ``toy.helpers``), ``utils.data`` (BatchMetaDataLoader,
MetaDataLoader, the combination and one-class samplers, ClassDataset / MetaDataset /
CombinationMetaDataset / OneVsAllMetaDataset / Task / ConcatTask / SubsetTask to subclass for your
own data, NonEpisodicWrapper), ``utils.prototype``, ``utils.matching``, ``utils.r2d2``,
``utils.gradient_based.gradient_update_parameters`` and ``modules`` (MetaModule, MetaSequential,
MetaLinear, MetaBilinear, MetaConv1d/2d/3d, MetaBatchNorm1d/2d/3d, MetaLayerNorm, MetaEmbedding,
MetaEmbeddingBag, MetaMultiheadAttention, DataParallel). The rest (SequenceMetaDataset,
FixedCategory, DefaultTargetTransform, CategoricalWrapper, TripleMNIST, CIFAR100, Pascal5i, TCGA,
Omniprint) raises ``Unsupported`` naming what to use instead.
"""

from metalearn.torchmeta import datasets, modules, toy, transforms, utils  # noqa: F401
from metalearn.torchmeta._errors import InvalidArgument, Unsupported  # noqa: F401
from metalearn.torchmeta.datasets import helpers  # noqa: F401

__all__ = ["datasets", "helpers", "modules", "toy", "transforms", "utils", "Unsupported", "InvalidArgument"]
