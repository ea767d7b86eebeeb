"""torchmeta's ``utils.r2d2``: the closed-form ridge-regression head of R2-D2 (Bertinetto et al. 2019)."""

from __future__ import annotations

import math
import warnings
from collections import namedtuple

import torch
import torch.nn.functional as F

from metalearn.torchmeta._errors import InvalidArgument

__all__ = ["ridge_regression"]

#: What ``ridge_regression`` returns: ``weight`` and ``bias`` (None when ``bias=False``).
RidgeSolution = namedtuple("RidgeSolution", "weight bias")


def ridge_regression(embeddings: torch.Tensor, targets: torch.Tensor, reg_lambda: float | torch.Tensor,
                     num_classes: int | None = None, use_woodbury: bool | None = None, scale: bool = True,
                     bias: bool = True) -> RidgeSolution:
    """The linear map of the embeddings that fits the targets by ridge regression, in closed form:

        W* = argmin_W ||X W - Y||^2 + reg_lambda ||W||^2 = (X^T X + reg_lambda I)^-1 X^T Y
           = X^T (X X^T + reg_lambda I)^-1 Y   (Woodbury: an N x N system instead of D x D)

    ``embeddings`` ``X``: ``[N, D]`` (one task, as torchmeta's) or ``[B, N, D]`` (a batch of tasks).
    ``targets``: class labels ``[N]`` / ``[B, N]`` (long; one-hot encoded over ``num_classes``) or
    regression targets ``[N, out]`` / ``[B, N, out]`` (float). ``reg_lambda``: a float or a tensor
    (e.g. a learned one). ``use_woodbury=None`` uses the Woodbury form when ``N <= D + bias``, the
    usual few-shot case. ``scale=True`` divides ``X`` and ``Y`` by ``sqrt(N)`` (the mean instead of
    the sum of squared errors). ``bias=True`` fits an affine map: a column of ones is prepended to
    ``X``, and its weight (regularised like the others, as torchmeta's) is the bias.

    Returns ``RidgeSolution(weight, bias)``: ``weight`` ``[out, D]`` (``[B, out, D]``), laid out as
    ``nn.Linear``'s, so ``F.linear(x, weight, bias)`` applies it to one task; ``bias`` ``[out]``
    (``[B, out]``), or None with ``bias=False``. ``out`` is ``num_classes`` for labels.
    """
    if embeddings.dim() not in (2, 3):
        raise InvalidArgument(f"embeddings must be [num_examples, embedding_size] or [batch, num_examples, "
                              f"embedding_size] (got shape {tuple(embeddings.shape)})")
    num_samples, embedding_size = embeddings.shape[-2:]
    if targets.dtype.is_floating_point:
        if targets.dim() != embeddings.dim():
            raise InvalidArgument(f"regression targets must be [..., num_examples, output_size] (got shape {tuple(targets.shape)})")
        y = targets.to(embeddings.dtype)
    else:
        if num_classes is None:
            warnings.warn("ridge_regression: num_classes not given; using the largest label + 1 (give num_classes, "
                          "the N of N-way tasks, so that a task missing its last class keeps its shape)", stacklevel=2)
            num_classes = int(targets.max()) + 1
        y = F.one_hot(targets, num_classes=num_classes).to(embeddings.dtype)
    if y.shape[:-1] != embeddings.shape[:-1]:
        raise InvalidArgument(f"targets {tuple(targets.shape)} do not match embeddings {tuple(embeddings.shape)}")
    if use_woodbury is None:
        use_woodbury = num_samples <= embedding_size + int(bias)
    x = embeddings
    if bias:
        x = torch.cat([x.new_ones((*x.shape[:-1], 1)), x], dim=-1)
    if scale:
        x, y = x / math.sqrt(num_samples), y / math.sqrt(num_samples)
    xt = x.transpose(-1, -2)
    if use_woodbury:
        eye = torch.eye(num_samples, dtype=x.dtype, device=x.device)
        solution = xt @ torch.linalg.solve(x @ xt + reg_lambda * eye, y)
    else:
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        solution = torch.linalg.solve(xt @ x + reg_lambda * eye, xt @ y)  # [..., D (+1), out]
    if bias:
        return RidgeSolution(weight=solution[..., 1:, :].transpose(-1, -2), bias=solution[..., 0, :])
    return RidgeSolution(weight=solution.transpose(-1, -2), bias=None)
