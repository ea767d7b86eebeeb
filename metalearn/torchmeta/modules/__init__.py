"""torchmeta's ``modules``: ``nn`` layers whose ``forward`` also takes ``params``.

``model(x, params=None)`` runs with the model's own parameters; ``model(x, params=adapted)`` runs
with the tensors of ``adapted`` (named as in ``model.meta_named_parameters()``, e.g. the output of
``metalearn.torchmeta.utils.gradient_based.gradient_update_parameters``), differentiably, so the
outer loss of MAML differentiates through the inner steps. A MetaModule given a ``params`` dict that
lacks one of its parameters uses its own for that one.
"""

from metalearn.torchmeta.modules.activation import MetaMultiheadAttention
from metalearn.torchmeta.modules.batchnorm import MetaBatchNorm1d, MetaBatchNorm2d, MetaBatchNorm3d
from metalearn.torchmeta.modules.container import MetaSequential
from metalearn.torchmeta.modules.conv import MetaConv1d, MetaConv2d, MetaConv3d
from metalearn.torchmeta.modules.linear import MetaBilinear, MetaLinear
from metalearn.torchmeta.modules.module import MetaModule
from metalearn.torchmeta.modules.normalization import MetaLayerNorm
from metalearn.torchmeta.modules.parallel import DataParallel
from metalearn.torchmeta.modules.sparse import MetaEmbedding, MetaEmbeddingBag

__all__ = [
    "MetaModule", "MetaSequential", "MetaLinear", "MetaBilinear", "MetaConv1d", "MetaConv2d", "MetaConv3d",
    "MetaBatchNorm1d", "MetaBatchNorm2d", "MetaBatchNorm3d", "MetaLayerNorm", "MetaEmbedding", "MetaEmbeddingBag",
    "MetaMultiheadAttention", "DataParallel",
]
