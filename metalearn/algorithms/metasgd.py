"""Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv:1707.09835, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

MAML with a learned inner learning rate per parameter *entry*: the inner step
is ``theta'_i = theta - alpha * grad L_support(theta)`` with ``alpha`` a tensor
shaped like ``theta`` (element-wise product), so it learns the size and, being
unconstrained in sign, the direction of each coordinate's update. Both
``theta`` and ``alpha`` are meta-parameters, learned together from the query
loss at theta'_i; ``alpha`` starts at ``inner_lr`` everywhere. The paper
adapts in one step (``inner_steps: 1``); more steps reuse the same ``alpha``.

Same machinery as MAML (``maml.adapt`` with a dict of rates, or
``maml.adapt_tasks`` with the rates broadcast over a chunk of tasks; see
``batched`` in maml.py): pure functions of a parameter dict, each task's (or
chunk's) graph freed after its backward. With ``first_order=true`` the second derivatives through the inner
gradient are dropped; ``alpha`` still gets its exact gradient
``-grad L_support(theta) * grad L_query(theta'_i)`` (for one step), since
theta'_i is linear in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metalearn.algorithms.base import ProblemInfo
from metalearn.algorithms.maml import MAML


@dataclass
class Config:
    name: str = "metasgd"
    inner_lr: float = 0.4  # initial value of every learned rate
    inner_steps: int = 1  # inner steps during meta-training (the paper: one)
    test_inner_steps: int = 1  # ... and at validation / test (the paper: one)
    first_order: bool = False  # ignore second derivatives through the inner gradient
    batched: str = "auto"  # how tasks run, as MAML's: loop | fold | auto (loop on CPU, else fold)
    task_chunk: int = 0  # fold: tasks per forward/backward; 0: 16 on CPU, the whole meta-batch on accelerators
    checkpoint_inner: bool = False  # second order: recompute inner-step activations in the backward (less memory)


class MetaSGD(MAML):
    """MAML's meta-step and evaluation, with ``inner_lr()`` returning the learned rates."""

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__(cfg, backbone, info)
        # A list in the order of net.named_parameters(): ParameterDict keys cannot contain the dots of
        # parameter names. inner_lrs.<i> is the rate of the i-th parameter of net.
        self.inner_lrs = nn.ParameterList(nn.Parameter(torch.full_like(p, cfg.inner_lr)) for p in self.net.parameters())

    def inner_lr(self, detach: bool = False) -> dict[str, torch.Tensor]:
        """The learned rates keyed by parameter name, as ``adapt`` takes them."""
        return {name: lr.detach() if detach else lr for (name, _), lr in zip(self.net.named_parameters(), self.inner_lrs)}


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MetaSGD:
    return MetaSGD(cfg, backbone, info)
