"""learn2learn's ``nn``: the prototypical classifier and small utility modules.

``PrototypicalClassifier`` (Snell et al. 2017), ``Lambda``, ``Flatten`` and ``Scale``. learn2learn's
``SVClassifier`` is not provided (it needs qpth); calling it raises ``NotImplementedError`` naming
metalearn's MetaOptNet-SVM.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from metalearn.learn2learn._errors import unsupported

__all__ = ["PrototypicalClassifier", "Lambda", "Flatten", "Scale", "SVClassifier"]

#: Added to the norm when normalising embeddings, so a zero vector stays finite.
EPS = 1e-8


class Lambda(nn.Module):
    """A module whose ``forward(*args, **kwargs)`` is ``lmb(*args, **kwargs)``."""

    def __init__(self, lmb: Callable):
        super().__init__()
        self.lmb = lmb

    def forward(self, *args, **kwargs):
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """``[N, ...] -> [N, prod(...)]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.size(0), -1)


class Scale(nn.Module):
    """``x * alpha`` with a learnable ``alpha`` of shape ``shape`` (an int, a tuple, or ``None``: one scalar,
    shape ``(1,)``), every entry ``alpha`` at first. ``Scale(p.shape, alpha=lr)`` per parameter is
    Meta-SGD's learned step size as a GBML transform."""

    def __init__(self, shape: int | tuple | torch.Size | None = None, alpha: float = 1.0):
        super().__init__()
        if shape is None:
            shape = (1,)
        elif isinstance(shape, int):
            shape = (shape,)
        self.alpha = nn.Parameter(torch.full(tuple(shape), float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha


def _normalize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


class PrototypicalClassifier(nn.Module):
    """The nearest-class-mean classifier of Prototypical Networks, differentiable.

    ``fit_(support, labels)`` sets one prototype per class, the mean of that class's support embeddings
    (any number of shots per class); prototype ``i`` is the ``i``-th smallest label, so logits line up with
    labels ``0..ways-1``. ``forward(query)`` returns logits ``[n_query, ways]``: the negative *squared*
    euclidean distance to each prototype (``distance='euclidean'``), or the cosine similarity
    (``distance='cosine'``, which also sets ``normalize``: embeddings and prototypes are scaled to unit
    length). ``distance`` may also be a callable ``(prototypes, queries) -> distances [n_query, ways]``.
    Embeddings of more than one dimension are flattened. Gradients flow to both support and query.
    """

    def __init__(self, support: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 distance: str | Callable = "euclidean", normalize: bool = False):
        super().__init__()
        self.normalize = normalize
        if distance == "euclidean":
            self.distance = self.euclidean_distance
        elif distance == "cosine":
            self.distance = self.cosine_distance
            self.normalize = True
        elif callable(distance):
            self.distance = distance
        else:
            raise ValueError(f"distance={distance!r}: use 'euclidean', 'cosine' or a callable")
        self.prototypes = None
        if support is not None and labels is not None:
            self.fit_(support, labels)

    @staticmethod
    def euclidean_distance(prototypes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Squared euclidean distances ``[n_query, n_prototypes]``."""
        # The difference, not |q|^2 - 2 q.p + |p|^2: exact, and never negative from cancellation.
        return (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)

    @staticmethod
    def cosine_distance(prototypes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Minus the dot product ``[n_query, n_prototypes]`` (minus the cosine for unit vectors)."""
        return -queries @ prototypes.t()

    def fit_(self, support: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Set (and return) the prototypes ``[ways, d]`` from support embeddings ``[n, ...]`` and labels ``[n]``."""
        support = support.reshape(support.size(0), -1)
        classes, index = torch.unique(labels, sorted=True, return_inverse=True)
        # Per-class means as one scatter: sum of the rows of each class over its count.
        sums = torch.zeros(len(classes), support.size(1), dtype=support.dtype, device=support.device)
        sums = sums.index_add(0, index, support)
        counts = torch.bincount(index, minlength=len(classes)).to(support.dtype).unsqueeze(1)
        prototypes = sums / counts
        if self.normalize:
            prototypes = _normalize(prototypes)
        self.prototypes = prototypes
        return prototypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("PrototypicalClassifier has no prototypes yet; call fit_(support, labels) first")
        x = x.reshape(x.size(0), -1)
        if self.normalize:
            x = _normalize(x)
        return -self.distance(self.prototypes, x)


def SVClassifier(*args, **kwargs):
    """Not provided: raises ``Unsupported`` (metalearn's MetaOptNet-SVM is ``metalearn train algo=metaoptnet_svm``)."""
    raise unsupported("learn2learn.nn.SVClassifier", "train with metalearn itself: metalearn train algo=metaoptnet_svm")


#: learn2learn's ``nn`` names for meta-modules and structured layers: one line each, naming what to use.
_NOT_PROVIDED = {
    "MetaModule": "wrap any nn.Module in l2l.algorithms.MAML/MetaSGD/GBML, or use metalearn.torchmeta.modules",
    "ParameterTransform": "give GBML a transform that builds an nn.Module per parameter",
    "KroneckerLinear": "use nn.Linear", "KroneckerRNN": "use nn.RNN", "KroneckerLSTM": "use nn.LSTM",
    "MetaModuleDict": "use nn.ModuleDict", "freeze": "set requires_grad=False on the parameters",
    "unfreeze": "set requires_grad=True on the parameters",
}


def __getattr__(name: str):
    if name in _NOT_PROVIDED:
        raise unsupported(f"learn2learn.nn.{name}", _NOT_PROVIDED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
