"""torchmeta's ``utils.matching``: matching networks' attention over the support set (Vinyals et al. 2016).

A query's probability of class ``k`` is the softmax attention, over cosine similarities, that it
pays to the support samples of class ``k``: ``sum_{i: y_i = k} exp(c(x, x_i)) / sum_i exp(c(x, x_i))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pairwise_cosine_similarity", "matching_log_probas", "matching_probas", "matching_loss"]


def pairwise_cosine_similarity(embeddings1: torch.Tensor, embeddings2: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x1 . x2 / max(|x1| |x2|, eps)`` for every pair: ``[B, N, D]``, ``[B, M, D]`` -> ``[B, N, M]``."""
    sq_norms1 = embeddings1.pow(2).sum(-1, keepdim=True)  # [B, N, 1]
    sq_norms2 = embeddings2.pow(2).sum(-1).unsqueeze(1)  # [B, 1, M]
    # the clamp on the squared product keeps rsqrt finite for zero vectors
    return torch.bmm(embeddings1, embeddings2.transpose(1, 2)) * torch.rsqrt((sq_norms1 * sq_norms2).clamp_min(eps ** 2))


def matching_log_probas(embeddings: torch.Tensor, targets: torch.Tensor, test_embeddings: torch.Tensor,
                        num_classes: int, eps: float = 1e-8) -> torch.Tensor:
    """Log-probabilities of the query points' classes: support ``embeddings [B, N, D]`` with
    ``targets [B, N]``, ``test_embeddings [B, M, D]`` -> ``[B, num_classes, M]`` (the class axis
    second, as ``F.nll_loss`` wants). A class without support samples gets ``-inf``."""
    similarities = pairwise_cosine_similarity(embeddings, test_embeddings, eps=eps)  # [B, N, M]
    # log sum over a class's samples of exp(similarity), minus the log sum over all: shifted by the max for stability
    top = similarities.max(dim=1, keepdim=True).values
    exp = (similarities - top).exp()
    per_class = exp.new_zeros((exp.size(0), num_classes, exp.size(2)))
    per_class = per_class.scatter_add(1, targets.unsqueeze(-1).expand_as(exp), exp)
    return per_class.log() - exp.sum(dim=1, keepdim=True).log()


def matching_probas(embeddings: torch.Tensor, targets: torch.Tensor, test_embeddings: torch.Tensor,
                    num_classes: int, eps: float = 1e-8) -> torch.Tensor:
    """Probabilities ``[B, num_classes, M]`` of the query points' classes (``exp`` of ``matching_log_probas``)."""
    return matching_log_probas(embeddings, targets, test_embeddings, num_classes, eps=eps).exp()


def matching_loss(train_embeddings: torch.Tensor, train_targets: torch.Tensor, test_embeddings: torch.Tensor,
                  test_targets: torch.Tensor, num_classes: int, eps: float = 1e-8, **kwargs) -> torch.Tensor:
    """Negative log-likelihood of the query targets ``[B, M]`` under ``matching_log_probas``;
    ``kwargs`` go to ``F.nll_loss`` (e.g. ``reduction``)."""
    log_probas = matching_log_probas(train_embeddings, train_targets, test_embeddings, num_classes, eps=eps)
    return F.nll_loss(log_probas, test_targets, **kwargs)
