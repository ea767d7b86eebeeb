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
* How the tasks run (``batched``), as MAML's (maml.py): ``loop`` one task at a
  time; ``fold`` ``task_chunk`` tasks at once through the batched forward
  (conv4 and mlp), every task's minibatches drawn in the loop's order, so both
  give the same weights up to float rounding (tests/test_reptile_batched.py);
  ``auto`` folds vector inputs (the mlp: sinusoid) on CPU and everything on
  accelerators. README, Speed: the measured ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import Algorithm, Objective, ProblemInfo
from metalearn.algorithms.maml import (BATCHED, adapt, adapt_tasks, finetune_and_score, finetune_and_score_tasks,
                                       stack_tasks, task_losses)
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.functional import task_batched_forward


@dataclass
class Config:
    name: str = "reptile"
    inner_lr: float = 0.1  # SGD learning rate of the inner loop (training and evaluation)
    inner_steps: int = 5  # SGD steps per task during meta-training
    inner_batch_size: Optional[int] = 10  # examples per inner step, from support + query; null: all of them
    test_inner_steps: int = 50  # full-batch SGD steps on the support set at validation / test
    batched: str = "auto"  # how tasks run: loop (one at a time) | fold (task_chunk at once) | auto (as MAML's)
    task_chunk: int = 0  # fold: tasks per forward/backward; 0: 16 on CPU, the whole meta-batch on accelerators


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
        if cfg.batched not in BATCHED:
            raise ConfigError(f"algo.batched={cfg.batched!r} is not one of: {', '.join(BATCHED)}")
        if cfg.task_chunk < 0:
            raise ConfigError("algo.task_chunk must be >= 0 (0: automatic)")
        self._batched_forward = task_batched_forward(self.net) if cfg.batched != "loop" else None
        if cfg.batched == "fold" and self._batched_forward is None:
            raise ConfigError(f"algo.batched=fold runs conv4 and mlp backbones only, not {type(backbone).__name__}; "
                              "use algo.batched=loop (or auto)")

    def folds(self, batch: TaskBatch) -> bool:
        """Whether this batch runs folded: ``fold``; ``auto`` on accelerators and for vector inputs on CPU."""
        if self._batched_forward is None:
            return False
        return self.cfg.batched == "fold" or batch.support_x.device.type != "cpu" or batch.support_x.dim() == 3

    def task_chunk(self, batch: TaskBatch) -> int:
        chunk = self.cfg.task_chunk
        if chunk <= 0:
            chunk = 16 if batch.support_x.device.type == "cpu" and batch.support_x.dim() != 3 else batch.num_tasks
        return min(chunk, batch.num_tasks)

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

    def _meta_step_folded(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """``meta_step`` with ``task_chunk`` tasks at a time through the batched forward: each task's minibatches
        are drawn before any is used, task after task, as the loop draws them, so the weights are the loop's."""
        forward = self._batched_forward
        theta = {k: p.detach() for k, p in self.net.named_parameters()}
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        size, steps = self.cfg.inner_batch_size or y.shape[1], self.cfg.inner_steps
        # [tasks, steps, size]: task after task, as the loop draws them
        order = torch.stack([torch.stack(minibatches(y.shape[1], size, steps, y.device)) for _ in range(batch.num_tasks)]) \
            if steps else None
        total = {k: torch.zeros_like(p) for k, p in theta.items()}
        per_chunk: dict[str, list[torch.Tensor]] = {}
        chunk = self.task_chunk(batch)
        for start in range(0, batch.num_tasks, chunk):
            tasks = torch.arange(start, min(start + chunk, batch.num_tasks), device=y.device)
            adapted = {k: v.clone().requires_grad_() for k, v in stack_tasks(theta, len(tasks)).items()}
            for step in range(steps):
                idx = order[start:start + len(tasks), step]  # [tasks, size]
                with torch.enable_grad():
                    adapted = adapt_tasks(forward, adapted, x[tasks[:, None], idx], y[tasks[:, None], idx], 1,
                                          self.cfg.inner_lr, create_graph=False, objective=self.objective)
                adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
            with torch.no_grad():
                for k, v in adapted.items():
                    total[k] += v.sum(0)
                outputs = forward(adapted, batch.query_x[start:start + len(tasks)])
                losses = task_losses(self.objective, outputs, batch.query_y[start:start + len(tasks)])
                for k, v in self.objective.metrics(outputs, batch.query_y[start:start + len(tasks)], losses).items():
                    per_chunk.setdefault(k, []).append(v)
        with torch.no_grad():
            for k, p in self.net.named_parameters():
                delta = theta[k] - total[k] / batch.num_tasks
                p.grad = delta if p.grad is None else p.grad + delta
        return {k: torch.cat(v) for k, v in per_chunk.items()}

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        if self.folds(batch):
            return self._meta_step_folded(batch)
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
        if self.folds(batch):
            return finetune_and_score_tasks(self._batched_forward, self.net, batch, self.cfg.test_inner_steps,
                                            self.cfg.inner_lr, self.objective, self.task_chunk(batch))
        return finetune_and_score(self.net, batch, self.cfg.test_inner_steps, self.cfg.inner_lr, self.objective)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> Reptile:
    return Reptile(cfg, backbone, info)
