"""torchmeta's ``utils.prototype``: prototypical networks' class means and loss (Snell et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["get_num_samples", "get_prototypes", "prototypical_loss"]


def get_num_samples(targets: torch.Tensor, num_classes: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The number of samples of each class in each task: ``targets [B, N]`` (labels in
    ``0..num_classes-1``) -> ``[B, num_classes]`` counts, of ``dtype`` (default: ``targets``'), without gradient."""
    with torch.no_grad():
        ones = torch.ones_like(targets, dtype=dtype)
        return ones.new_zeros((targets.size(0), num_classes)).scatter_add_(1, targets, ones)


def get_prototypes(embeddings: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's prototype, the mean of its support embeddings: ``embeddings [B, N, D]``,
    ``targets [B, N]`` -> ``[B, num_classes, D]``. A class without samples gets the zero vector."""
    batch_size, dim = embeddings.size(0), embeddings.size(-1)
    counts = get_num_samples(targets, num_classes, dtype=embeddings.dtype).unsqueeze(-1)
    sums = embeddings.new_zeros((batch_size, num_classes, dim))
    sums = sums.scatter_add(1, targets.unsqueeze(-1).expand_as(embeddings), embeddings)
    return sums / counts.clamp_min(1)  # clamped: an absent class divides 0 by 1


def prototypical_loss(prototypes: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Cross-entropy of the query points' classes, with the negative squared euclidean distance to
    each prototype as the logit: ``prototypes [B, K, D]``, ``embeddings [B, M, D]``, ``targets
    [B, M]``. ``kwargs`` go to ``F.cross_entropy`` (e.g. ``reduction``)."""
    squared_distances = (prototypes.unsqueeze(2) - embeddings.unsqueeze(1)).pow(2).sum(-1)  # [B, K, M]
    return F.cross_entropy(-squared_distances, targets, **kwargs)
