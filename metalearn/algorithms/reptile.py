"""Reptile (Nichol, Achiam & Schulman 2018, arXiv:1803.02999, "On First-Order Meta-Learning Algorithms").

The meta-parameters are an initialisation theta. For each task of the batch,
``inner_steps`` steps of plain SGD (``inner_lr``) on minibatches of the task
give weights theta'_i; the meta-update moves theta towards their mean,
``theta <- theta + epsilon * (mean_i theta'_i - theta)`` (the paper's batched
version, Algorithm 2). There is no outer loss: ``meta_step`` sets
``.grad = theta - mean_i theta'_i``, so the engine's outer optimizer makes the
update (SGD with lr=epsilon and no momentum is the paper's rule; Adam also
works).

Choices, stated:

* Inner data: a task's support and query sets together, as Reptile trains on
  ``train_shots`` examples per class with no support/query split (the paper's
  Omniglot runs use 10 per class: ``shots + queries = 10``). Each inner step
  takes ``inner_batch_size`` of them; the pool is reshuffled every pass and
  minibatches run on across passes, as in the paper's code (one
  ``torch.randperm`` per pass, from torch's default generator of the data's
  device, which the engine seeds and checkpoints). ``inner_batch_size: null``
  takes the whole pool every step.
* Inner optimizer: plain SGD. The paper's code uses Adam with beta1 = 0
  (lr 1e-3), whose second-moment state also carries over from task to task;
  SGD keeps the adapted weights a simple function of theta and the data.
* Metrics: the query loss and accuracy of theta'_i, scored after the inner
  loop. The query set was part of the inner data, so they measure fit, not
  generalisation; validation does that.
* ``evaluate``: ``test_inner_steps`` full-batch SGD steps on the support set
  alone (the paper's 1-shot evaluation uses a batch of 5 = the whole 5-way
  1-shot support set), then score the query set. BatchNorm uses per-set batch
  statistics throughout (see models/conv4.py): the paper's "transductive"
  setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import Algorithm, Objective, ProblemInfo
from metalearn.algorithms.maml import adapt, finetune_and_score
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "reptile"
    inner_lr: float = 0.1  # SGD learning rate of the inner loop (training and evaluation)
    inner_steps: int = 5  # SGD steps per task during meta-training
    inner_batch_size: Optional[int] = 10  # examples per inner step, from support + query; null: all of them
    test_inner_steps: int = 50  # full-batch SGD steps on the support set at validation / test


def minibatches(n: int, size: int, steps: int, device: torch.device) -> list[torch.Tensor]:
    """``steps`` index batches of ``size`` over range(n): passes in fresh random orders, run together."""
    if steps == 0:
        return []
    order = torch.cat([torch.randperm(n, device=device) for _ in range(math.ceil(steps * size / n))])
    return list(order[: steps * size].view(steps, size))


class Reptile(Algorithm):
    tasks = ("classification", "regression")  # the paper's sinusoid experiment too

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        if cfg.inner_steps < 0 or cfg.test_inner_steps < 0:
            raise ConfigError("algo.inner_steps and algo.test_inner_steps must be >= 0")
        if cfg.inner_batch_size is not None and cfg.inner_batch_size < 1:
            raise ConfigError(f"algo.inner_batch_size must be >= 1 or null (got {cfg.inner_batch_size})")
        self.cfg, self.ways = cfg, info.ways
        self.objective = Objective(info.task)
        self.primary_metric, self.higher_is_better = self.objective.primary_metric, self.objective.higher_is_better
        self.net = nn.Sequential(backbone, nn.Linear(backbone.out_features, info.outputs))

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if self.objective.task == "classification" and ways != self.ways:
            raise ConfigError(f"reptile's classifier has {self.ways} outputs (trained {self.ways}-way); it cannot run {ways}-way episodes")

    def train_task(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        """The inner loop: ``inner_steps`` SGD steps on minibatches of (x, y); returns detached weights."""
        size = self.cfg.inner_batch_size or len(y)
        for idx in minibatches(len(y), size, self.cfg.inner_steps, y.device):
            params = adapt(self.net, params, x[idx], y[idx], 1, self.cfg.inner_lr, create_graph=False,
                           objective=self.objective)
            # No graph is needed across steps: Reptile never differentiates through the inner loop.
            params = {k: p.detach().requires_grad_() for k, p in params.items()}
        return {k: p.detach() for k, p in params.items()}

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        theta = {k: p.detach() for k, p in self.net.named_parameters()}
        mean = {k: torch.zeros_like(p) for k, p in theta.items()}
        per_task: dict[str, list[torch.Tensor]] = {}
        for t in range(batch.num_tasks):
            x = torch.cat([batch.support_x[t], batch.query_x[t]])
            y = torch.cat([batch.support_y[t], batch.query_y[t]])
            with torch.enable_grad():
                adapted = self.train_task({k: p.clone().requires_grad_() for k, p in theta.items()}, x, y)
            with torch.no_grad():
                for k, p in adapted.items():
                    mean[k] += p / batch.num_tasks
                outputs = functional_call(self.net, adapted, (batch.query_x[t],))
                loss = self.objective.loss(outputs, batch.query_y[t])
                for k, v in self.objective.metrics(outputs, batch.query_y[t], loss).items():
                    per_task.setdefault(k, []).append(v)
        # The outer "gradient" is the difference to the mean adapted weights; it accumulates like a real one.
        with torch.no_grad():
            for k, p in self.net.named_parameters():
                delta = theta[k] - mean[k]
                p.grad = delta if p.grad is None else p.grad + delta
        return {k: torch.stack(v) for k, v in per_task.items()}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        return finetune_and_score(self.net, batch, self.cfg.test_inner_steps, self.cfg.inner_lr, self.objective)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> Reptile:
    return Reptile(cfg, backbone, info)
