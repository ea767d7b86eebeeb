"""torchmeta's ``utils``: ``data`` (loaders, datasets, tasks), ``gradient_based``, and the heads of the
metric and closed-form learners: ``prototype`` (prototypical networks), ``matching`` (matching
networks) and ``r2d2`` (ridge regression)."""

from metalearn.torchmeta.utils import data, gradient_based, matching, prototype, r2d2
from metalearn.torchmeta.utils.gradient_based import gradient_update_parameters
from metalearn.torchmeta.utils.matching import (
    matching_log_probas, matching_loss, matching_probas, pairwise_cosine_similarity,
)
from metalearn.torchmeta.utils.prototype import get_num_samples, get_prototypes, prototypical_loss
from metalearn.torchmeta.utils.r2d2 import ridge_regression

__all__ = [
    "data", "gradient_based", "matching", "prototype", "r2d2",
    "gradient_update_parameters", "get_num_samples", "get_prototypes", "prototypical_loss",
    "pairwise_cosine_similarity", "matching_log_probas", "matching_probas", "matching_loss", "ridge_regression",
]
