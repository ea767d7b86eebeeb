"""Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv:1707.09835, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

MAML with a learned inner learning rate per parameter *entry*: the inner step
is ``theta'_i = theta - alpha * grad L_support(theta)`` with ``alpha`` a tensor
shaped like ``theta`` (element-wise product), so it learns the size and, being
unconstrained in sign, the direction of each coordinate's update. Both
``theta`` and ``alpha`` are meta-parameters, learned together from the query
loss at theta'_i; ``alpha`` starts at ``inner_lr`` everywhere. The paper
adapts in one step (``inner_steps: 1``); more steps reuse the same ``alpha``.

Same machinery as MAML (``maml.adapt`` with a dict of rates): pure functions
of a parameter dict, one task at a time, each task's graph freed after its
backward. With ``first_order=true`` the second derivatives through the inner
gradient are dropped; ``alpha`` still gets its exact gradient
``-grad L_support(theta) * grad L_query(theta'_i)`` (for one step), since
theta'_i is linear in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy
from metalearn.algorithms.maml import adapt
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "metasgd"
    inner_lr: float = 0.4  # initial value of every learned rate
    inner_steps: int = 1  # inner steps during meta-training (the paper: one)
    test_inner_steps: int = 1  # ... and at validation / test (the paper: one)
    first_order: bool = False  # ignore second derivatives through the inner gradient


class MetaSGD(Algorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("algo.inner_steps and algo.test_inner_steps must be >= 0")
        self.cfg, self.ways = cfg, info.ways
        self.net = nn.Sequential(backbone, nn.Linear(backbone.out_features, info.ways))
        # A list in the order of net.named_parameters(): ParameterDict keys cannot contain the dots of
        # parameter names. inner_lrs.<i> is the rate of the i-th parameter of net.
        self.inner_lrs = nn.ParameterList(nn.Parameter(torch.full_like(p, cfg.inner_lr)) for p in self.net.parameters())

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if ways != self.ways:
            raise ConfigError(f"metasgd's classifier has {self.ways} outputs (trained {self.ways}-way); it cannot run {ways}-way episodes")

    def rates(self) -> dict[str, torch.Tensor]:
        """The learned rates keyed by parameter name, as ``adapt`` takes them."""
        return {name: lr for (name, _), lr in zip(self.net.named_parameters(), self.inner_lrs)}

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        params, rates = dict(self.net.named_parameters()), self.rates()
        losses, accs = [], []
        for t in range(batch.num_tasks):
            adapted = adapt(self.net, params, batch.support_x[t], batch.support_y[t],
                            self.cfg.inner_steps, rates, create_graph=not self.cfg.first_order)
            logits = functional_call(self.net, adapted, (batch.query_x[t],))
            loss = F.cross_entropy(logits, batch.query_y[t])
            # Backward per task, as MAML: .grad of theta and alpha accumulates the mean, graphs are freed at once.
            (loss / batch.num_tasks).backward()
            losses.append(loss.detach())
            accs.append(accuracy(logits.detach(), batch.query_y[t]))
        return {"loss": torch.stack(losses), "accuracy": torch.stack(accs)}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        params = {k: p.detach().requires_grad_() for k, p in self.net.named_parameters()}
        rates = {k: lr.detach() for k, lr in self.rates().items()}
        losses, accs = [], []
        for t in range(batch.num_tasks):
            with torch.enable_grad():
                adapted = adapt(self.net, params, batch.support_x[t], batch.support_y[t],
                                self.cfg.test_inner_steps, rates, create_graph=False)
            with torch.no_grad():
                logits = functional_call(self.net, adapted, (batch.query_x[t],))
                losses.append(F.cross_entropy(logits, batch.query_y[t]))
                accs.append(accuracy(logits, batch.query_y[t]))
        return {"loss": torch.stack(losses), "accuracy": torch.stack(accs)}


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MetaSGD:
    return MetaSGD(cfg, backbone, info)
