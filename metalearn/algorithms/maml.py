"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400).

The meta-parameters are an initialisation theta. For each task, a few SGD
steps on the support set give adapted weights
``theta'_i = theta - inner_lr * grad L_support(theta)``; the meta-loss is the
query loss at theta'_i, averaged over the tasks, differentiated through the
inner steps (second order) or not (``first_order=true``: FOMAML).

Written as pure functions of a parameter dict with
``torch.func.functional_call`` and ``torch.autograd.grad``: no patched
modules, no hidden state. Tasks are processed one at a time and each task's
graph is freed after its backward, so memory does not grow with the
meta-batch. BatchNorm uses per-set batch statistics (see models/conv4.py),
as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import Algorithm, Objective, ProblemInfo
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1  # SGD steps on the support set during meta-training
    test_inner_steps: int = 3  # ... and at validation / test time
    first_order: bool = False  # FOMAML: ignore second derivatives


CLASSIFICATION = Objective("classification")


def adapt(net: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float | dict,
          create_graph: bool, objective: Objective = CLASSIFICATION) -> dict:
    """``steps`` SGD steps on (x, y) from ``params``; differentiable w.r.t. params if create_graph.

    ``lr`` is one number, or a dict of tensors shaped like the parameters (Meta-SGD's learned
    rates; the result is differentiable w.r.t. them whatever create_graph says).
    """
    for _ in range(steps):
        loss = objective.loss(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
        params = {name: p - (lr[name] if isinstance(lr, dict) else lr) * g for (name, p), g in zip(params.items(), grads)}
    return params


def finetune_and_score(net: nn.Module, batch: TaskBatch, steps: int, lr: float | dict,
                       objective: Objective = CLASSIFICATION) -> dict[str, torch.Tensor]:
    """Fine-tune ``net``'s weights on each task's support set, then score its query set.

    Regression also reports ``mse_step<k>``, the query MSE after k = 0..steps inner steps
    (the MAML paper's regression curves). Evaluation only: nothing flows back to the
    meta-parameters, and they are left unchanged.
    """
    params = {k: p.detach().requires_grad_() for k, p in net.named_parameters()}
    per_task: dict[str, list[torch.Tensor]] = {}
    curve = objective.task == "regression"
    for t in range(batch.num_tasks):
        x, y, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        adapted = params
        for step in range(steps + 1):
            if curve or step == steps:
                with torch.no_grad():
                    out = functional_call(net, adapted, (qx,))
                    loss = objective.loss(out, qy)
                if curve:
                    per_task.setdefault(f"mse_step{step}", []).append(loss)
            if step < steps:
                with torch.enable_grad():
                    adapted = adapt(net, adapted, x, y, 1, lr, create_graph=False, objective=objective)
                adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        for k, v in objective.metrics(out, qy, loss).items():
            per_task.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in per_task.items()}


class MAML(Algorithm):
    tasks = ("classification", "regression")

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("algo.inner_steps and algo.test_inner_steps must be >= 0")
        self.cfg, self.ways = cfg, info.ways
        self.objective = Objective(info.task)
        self.primary_metric, self.higher_is_better = self.objective.primary_metric, self.objective.higher_is_better
        self.net = nn.Sequential(backbone, nn.Linear(backbone.out_features, info.outputs))

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if self.objective.task == "classification" and ways != self.ways:
            raise ConfigError(f"{self.cfg.name}'s classifier has {self.ways} outputs (trained {self.ways}-way); "
                              f"it cannot run {ways}-way episodes")

    def inner_lr(self, detach: bool = False) -> float | dict:
        """The inner-loop learning rate: one number here; Meta-SGD learns one per parameter entry."""
        return self.cfg.inner_lr

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        params, lr = dict(self.net.named_parameters()), self.inner_lr()
        per_task: dict[str, list[torch.Tensor]] = {}
        for t in range(batch.num_tasks):
            adapted = adapt(self.net, params, batch.support_x[t], batch.support_y[t],
                            self.cfg.inner_steps, lr, create_graph=not self.cfg.first_order, objective=self.objective)
            outputs = functional_call(self.net, adapted, (batch.query_x[t],))
            loss = self.objective.loss(outputs, batch.query_y[t])
            # Backward per task: the mean's gradient accumulates in .grad and each graph is freed at once.
            (loss / batch.num_tasks).backward()
            for k, v in self.objective.metrics(outputs, batch.query_y[t], loss).items():
                per_task.setdefault(k, []).append(v)
        return {k: torch.stack(v) for k, v in per_task.items()}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        return finetune_and_score(self.net, batch, self.cfg.test_inner_steps, self.inner_lr(detach=True), self.objective)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MAML:
    return MAML(cfg, backbone, info)
