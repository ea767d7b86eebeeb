"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400).

The meta-parameters are an initialisation theta. For each task, a few SGD
steps on the support set give adapted weights
``theta'_i = theta - inner_lr * grad L_support(theta)``; the meta-loss is the
query loss at theta'_i, averaged over the tasks, differentiated through the
inner steps (second order) or not (``first_order=true``: FOMAML).

Written as pure functions of a parameter dict with
``torch.func.functional_call`` and ``torch.autograd.grad``: no patched
modules, no hidden state. BatchNorm uses per-set batch statistics (see
models/conv4.py), as in the paper.

How the tasks of a meta-batch are run (``batched``), all giving the same
meta-gradient up to float rounding (tests/test_maml_batched.py):

* ``loop``: one task at a time, each task's graph freed after its backward, so
  memory does not grow with the meta-batch. Works with any backbone.
* ``fold``: ``task_chunk`` tasks at once through ``models.functional``: every
  parameter is stacked per task (``theta.expand(T, ...)``), one grouped
  convolution runs all the tasks' convolutions and one BatchNorm their per-task
  normalisations. The inner gradient is that of the *sum* of the task losses
  with respect to the stacked weights, which is each task's own gradient, so
  the adapted weights are each task's. Fewer, larger kernels, for accelerators;
  memory grows with ``task_chunk``. conv4 and mlp backbones only. On an idle
  2-core CPU (conv4, 5-way 1-shot, meta-batch 32, second order) it was
  *slower* than the loop (0.84x for chunks of 4: the folded activations leave
  the caches, and the loop runs conv4 channels-last, models/ops.py), so it is
  not chosen there.
* ``auto``: ``fold`` on accelerators where the backbone supports it, and on CPU for
  vector inputs (the mlp: tiny per-task networks, all overhead in a loop; 8.9x the
  loop on sinusoid); else ``loop``.

``vmap`` over tasks is not offered: on CPU it was 3x slower than the loop, and
``torch.func.grad`` of a vmapped BatchNorm network gives wrong meta-gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metalearn.algorithms.base import Algorithm, Objective, ProblemInfo
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.functional import BatchedForward, task_batched_forward

BATCHED = ("auto", "loop", "fold")
HOOKS = ("inner_update", "inner_loss", "outer_loss", "adapt_task")


@dataclass
class Config:
    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1  # SGD steps on the support set during meta-training
    test_inner_steps: int = 3  # ... and at validation / test time
    first_order: bool = False  # FOMAML: ignore second derivatives
    batched: str = "auto"  # how tasks run: loop (one at a time) | fold (task_chunk at once) | auto (loop on CPU, else fold)
    task_chunk: int = 0  # fold: tasks per forward/backward; 0: 16 on CPU, the whole meta-batch on accelerators
    checkpoint_inner: bool = False  # second order: recompute inner-step activations in the backward (less memory)


CLASSIFICATION = Objective("classification")


def sgd_steps(loss_of: Callable[[dict], torch.Tensor], params: dict, steps: int, lr: float | dict,
              create_graph: bool, recompute: bool = False) -> dict:
    """``steps`` SGD steps on ``loss_of(params)``; differentiable w.r.t. params if create_graph.

    ``lr`` is one number, or a dict of tensors shaped like the parameters (Meta-SGD's learned
    rates; the result is differentiable w.r.t. them whatever create_graph says). ``recompute``
    (second order only) checkpoints each step: its activations are not kept for the outer
    backward but recomputed there, so memory no longer grows with the inner steps (non-reentrant
    ``torch.utils.checkpoint``, which supports the ``autograd.grad`` inside; same gradients).
    """
    names = list(params)

    def step(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = torch.autograd.grad(loss_of(dict(zip(names, values))), values, create_graph=create_graph)
        return tuple(p - (lr[n] if isinstance(lr, dict) else lr) * g for n, p, g in zip(names, values, grads))

    values = tuple(params.values())
    for _ in range(steps):
        values = checkpoint(step, *values, use_reentrant=False) if recompute and create_graph else step(*values)
    return dict(zip(names, values))


def adapt(net: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float | dict,
          create_graph: bool, objective: Objective = CLASSIFICATION, recompute: bool = False) -> dict:
    """``steps`` SGD steps of ``net`` on (x, y) from ``params`` (see ``sgd_steps``)."""
    return sgd_steps(lambda p: objective.loss(functional_call(net, p, (x,)), y), params, steps, lr, create_graph,
                     recompute)


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


def task_losses(objective: Objective, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``objective.loss`` of every task at once: [T, n, C] outputs, [T, n] labels or [T, n, d] targets -> [T]."""
    if objective.task == "classification":
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets).mean(1)
    return F.mse_loss(outputs, targets, reduction="none").flatten(1).mean(1)


def stack_tasks(params: dict, tasks: int) -> dict:
    """Every parameter as ``tasks`` copies, [tasks, *shape]: a view (no copy) whose gradient is per task."""
    return {k: p.expand(tasks, *p.shape) for k, p in params.items()}


def adapt_tasks(forward: BatchedForward, params: dict, x: torch.Tensor, y: torch.Tensor, steps: int,
                lr: float | dict, create_graph: bool, objective: Objective = CLASSIFICATION,
                recompute: bool = False) -> dict:
    """``adapt`` for a batch of tasks at once: ``params`` stacked per task ({name: [T, *shape]}),
    x [T, n, ...]. The gradient of the *sum* of the task losses with respect to task t's weights is
    task t's own gradient (the other tasks do not depend on them), so each row takes its task's step.
    A dict ``lr`` ({name: [*shape]}, Meta-SGD) broadcasts over the tasks."""
    return sgd_steps(lambda p: task_losses(objective, forward(p, x), y).sum(), params, steps, lr, create_graph,
                     recompute)


def finetune_and_score_tasks(forward: BatchedForward, net: nn.Module, batch: TaskBatch, steps: int,
                             lr: float | dict, objective: Objective, chunk: int) -> dict[str, torch.Tensor]:
    """``finetune_and_score`` with ``chunk`` tasks at a time through the batched ``forward``."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    per_chunk: dict[str, list[torch.Tensor]] = {}
    curve = objective.task == "regression"
    for start in range(0, batch.num_tasks, chunk):
        part = batch[start:start + chunk]
        # requires_grad on the stacked copy: autograd.grad then gives each task's gradient, and
        # nothing reaches the meta-parameters.
        adapted = {k: v.requires_grad_() for k, v in stack_tasks(params, part.num_tasks).items()}
        for step in range(steps + 1):
            if curve or step == steps:
                with torch.no_grad():
                    out = forward(adapted, part.query_x)
                    loss = task_losses(objective, out, part.query_y)
                if curve:
                    per_chunk.setdefault(f"mse_step{step}", []).append(loss)
            if step < steps:
                with torch.enable_grad():
                    adapted = adapt_tasks(forward, adapted, part.support_x, part.support_y, 1, lr, False, objective)
                adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        for k, v in objective.metrics(out, part.query_y, loss).items():
            per_chunk.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in per_chunk.items()}


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
        # Subclasses with their own loops (ANIL, MAML++) have no ``batched`` option: they run as written.
        batched, chunk = getattr(cfg, "batched", "loop"), getattr(cfg, "task_chunk", 0)
        if batched not in BATCHED:
            raise ConfigError(f"algo.batched={batched!r} is not one of: {', '.join(BATCHED)}")
        if chunk < 0:
            raise ConfigError("algo.task_chunk must be >= 0 (0: automatic)")
        forward = task_batched_forward(self.net) if batched != "loop" else None
        if batched == "fold" and forward is None:
            raise ConfigError(f"algo.batched=fold runs conv4 and mlp backbones only, not {type(backbone).__name__}; "
                              "use algo.batched=loop (or auto)")
        #: the batched forward of the net (models.functional), or None: the per-task loop
        self._batched_forward = forward
        #: checkpoint the inner steps (second order): memory flat in inner_steps, one more forward per step
        self.recompute = bool(getattr(cfg, "checkpoint_inner", False))
        #: a subclass that overrides a hook (inner_update, inner_loss, outer_loss) runs the plain per-task loop
        #: through its hooks; MAML's own fast paths stay as measured for the default rule.
        self.hooked = any(getattr(type(self), h) is not getattr(MAML, h) for h in HOOKS)
        if self.hooked and (batched == "fold" or self.recompute):
            raise ConfigError(f"{type(self).__name__} overrides MAML's hooks, which run in the per-task loop: "
                              "algo.batched=fold and algo.checkpoint_inner=true are MAML's own rule only; drop them")
        if self.hooked:
            self._batched_forward = None

    # ------------------------------------------------------------ hooks: subclass these instead of copying maml.py
    # (MAML and Meta-SGD run them; ANIL and MAML++ have loops of their own, which do not call them)

    def inner_loss(self, outputs: torch.Tensor, targets: torch.Tensor, params: dict) -> torch.Tensor:
        """The loss of one task's support set that the inner loop descends (``params``: the current weights,
        for a regulariser)."""
        return self.objective.loss(outputs, targets)

    def outer_loss(self, outputs: torch.Tensor, targets: torch.Tensor, params: dict) -> torch.Tensor:
        """The meta-loss of one task's query set at its adapted weights ``params``."""
        return self.objective.loss(outputs, targets)

    def inner_update(self, params: dict, grads: dict, step: int, state: dict) -> dict:
        """One inner step of one task: the new weights from the weights and the inner loss's gradients.
        ``step`` counts from 0; ``state`` is a dict kept across the steps of this task's adaptation (an inner
        optimiser's moments). Differentiable: second-order MAML backpropagates through it."""
        lr = self.inner_lr()
        return {k: p - (lr[k] if isinstance(lr, dict) else lr) * grads[k] for k, p in params.items()}

    def adapt_task(self, x: torch.Tensor, y: torch.Tensor, params: dict, steps: int, create_graph: bool) -> dict:
        """``steps`` inner steps of one task through the hooks."""
        state: dict = {}
        for step in range(steps):
            loss = self.inner_loss(functional_call(self.net, params, (x,)), y, params)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
            params = self.inner_update(params, dict(zip(params, grads)), step, state)
        return params

    def _meta_step_hooked(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        params = dict(self.net.named_parameters())
        per_task: dict[str, list[torch.Tensor]] = {}
        for t in range(batch.num_tasks):
            adapted = self.adapt_task(batch.support_x[t], batch.support_y[t], params, self.cfg.inner_steps,
                                      create_graph=not self.cfg.first_order)
            outputs = functional_call(self.net, adapted, (batch.query_x[t],))
            loss = self.outer_loss(outputs, batch.query_y[t], adapted)
            (loss / batch.num_tasks).backward()
            for k, v in self.objective.metrics(outputs, batch.query_y[t], loss).items():
                per_task.setdefault(k, []).append(v)
        return {k: torch.stack(v) for k, v in per_task.items()}

    def _evaluate_hooked(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        params = {k: p.detach().requires_grad_() for k, p in self.net.named_parameters()}
        per_task: dict[str, list[torch.Tensor]] = {}
        for t in range(batch.num_tasks):
            with torch.enable_grad():
                adapted = self.adapt_task(batch.support_x[t], batch.support_y[t], params, self.cfg.test_inner_steps,
                                          create_graph=False)
            with torch.no_grad():
                adapted = {k: v.detach() for k, v in adapted.items()}
                outputs = functional_call(self.net, adapted, (batch.query_x[t],))
                loss = self.outer_loss(outputs, batch.query_y[t], adapted)
            for k, v in self.objective.metrics(outputs, batch.query_y[t], loss).items():
                per_task.setdefault(k, []).append(v)
        return {k: torch.stack(v) for k, v in per_task.items()}

    def differentiates_backbone_backward(self) -> bool:
        return not self.cfg.first_order  # the inner steps adapt the backbone's weights

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        if self.objective.task == "classification" and ways != self.ways:
            raise ConfigError(f"{self.cfg.name}'s classifier has {self.ways} outputs (trained {self.ways}-way); "
                              f"it cannot run {ways}-way episodes")

    def inner_lr(self, detach: bool = False) -> float | dict:
        """The inner-loop learning rate: one number here; Meta-SGD learns one per parameter entry."""
        return self.cfg.inner_lr

    def task_chunk(self, batch: TaskBatch) -> int:
        """How many tasks ``fold`` runs at once: ``task_chunk``, or automatically 16 on CPU (of 4, 8,
        16, the fastest under load; memory grows with it) and the whole batch on accelerators."""
        chunk = getattr(self.cfg, "task_chunk", 0)
        if chunk <= 0:
            chunk = 16 if batch.support_x.device.type == "cpu" and not _vectors(batch) else batch.num_tasks
        return min(chunk, batch.num_tasks)

    def folds(self, batch: TaskBatch) -> bool:
        """Whether this batch runs folded (see ``batched`` in the module docstring)."""
        if self._batched_forward is None:
            return False
        return self.cfg.batched == "fold" or batch.support_x.device.type != "cpu" or _vectors(batch)

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        if self.hooked:
            return self._meta_step_hooked(batch)
        if self.folds(batch):
            return self._meta_step_folded(batch)
        params, lr = dict(self.net.named_parameters()), self.inner_lr()
        per_task: dict[str, list[torch.Tensor]] = {}
        for t in range(batch.num_tasks):
            adapted = adapt(self.net, params, batch.support_x[t], batch.support_y[t], self.cfg.inner_steps, lr,
                            create_graph=not self.cfg.first_order, objective=self.objective, recompute=self.recompute)
            outputs = functional_call(self.net, adapted, (batch.query_x[t],))
            loss = self.objective.loss(outputs, batch.query_y[t])
            # Backward per task: the mean's gradient accumulates in .grad and each graph is freed at once.
            (loss / batch.num_tasks).backward()
            for k, v in self.objective.metrics(outputs, batch.query_y[t], loss).items():
                per_task.setdefault(k, []).append(v)
        return {k: torch.stack(v) for k, v in per_task.items()}

    def _meta_step_folded(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """``meta_step`` with a chunk of tasks at a time through the batched forward (``batched=fold``)."""
        forward, params, lr = self._batched_forward, dict(self.net.named_parameters()), self.inner_lr()
        chunk = self.task_chunk(batch)
        per_chunk: dict[str, list[torch.Tensor]] = {}
        for start in range(0, batch.num_tasks, chunk):
            part = batch[start:start + chunk]
            adapted = adapt_tasks(forward, stack_tasks(params, part.num_tasks), part.support_x, part.support_y,
                                  self.cfg.inner_steps, lr, create_graph=not self.cfg.first_order, objective=self.objective,
                                  recompute=self.recompute)
            outputs = forward(adapted, part.query_x)
            losses = task_losses(self.objective, outputs, part.query_y)
            # Backward per chunk: the gradients of the stacked copies sum into .grad of theta (expand's
            # backward), and the chunk's graph is freed before the next one is built.
            (losses.sum() / batch.num_tasks).backward()
            for k, v in self.objective.metrics(outputs, part.query_y, losses).items():
                per_chunk.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in per_chunk.items()}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        if self.hooked:
            return self._evaluate_hooked(batch)
        if self.folds(batch):
            return finetune_and_score_tasks(self._batched_forward, self.net, batch, self.cfg.test_inner_steps,
                                            self.inner_lr(detach=True), self.objective, self.task_chunk(batch))
        return finetune_and_score(self.net, batch, self.cfg.test_inner_steps, self.inner_lr(detach=True), self.objective)


def _vectors(batch: TaskBatch) -> bool:
    """Vector inputs ([T, n, d]: the mlp): a tiny network per task, whose per-task loop is all overhead,
    so ``auto`` folds them on CPU too (8.9x the loop's speed on sinusoid, meta-batch 25, one thread)."""
    return batch.support_x.dim() == 3


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MAML:
    return MAML(cfg, backbone, info)
