"""The one interface every algorithm implements, and the engine relies on.

An algorithm is an ``nn.Module`` that owns the backbone and every
meta-parameter (``self.parameters()`` is what the outer optimizer updates and
what checkpoints hold). The engine loop, the same for every algorithm, is::

    algo.begin_step(step, total_steps)  # schedules (e.g. MAML++'s annealing); usually a no-op
    for update in range(algo.updates_per_batch):  # 1, or PPO-style epochs over the same batch object
        optimizer.zero_grad()
        metrics = algo.meta_step(batch)   # fills .grad of algo.parameters(); the first call's metrics are logged
        optimizer.step()
    scheduler.step()

and for validation and test ``algo.evaluate(batch)``. Both return per-task
metrics (``{"loss": [B], "accuracy": [B], ...}``, detached, on the device) so
the engine aggregates them without host syncs.

Why ``meta_step`` fills gradients instead of returning a loss: the outer
update of many meta-learners is not the gradient of one scalar. MAML
backpropagates task by task to bound memory; Reptile sets ``.grad`` to
``theta - mean(adapted theta)`` with no outer loss at all; a
pre-train-then-fine-tune baseline trains a global classifier on
``batch.classes``; a black-box sequence learner (SNAIL, MANN) reads the
episode as one sequence. All of them fit this signature with no special case
in the engine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.data.episodes import TaskBatch

T = TypeVar("T")


@dataclass(frozen=True)
class ProblemInfo:
    """What an algorithm may know about the problem when it is built."""

    input_shape: tuple[int, ...]  # (C, H, W) of images, (d,) of vectors
    ways: int  # ways of the training episodes
    num_train_classes: int  # classes of the training split (for global-label pre-training; 0 for regression)
    task: str = "classification"  # classification | regression
    output_size: int | None = None  # regression: the size of a target; classification: ways
    shots: int = 1  # shots of the training episodes (sequence learners size themselves by ways * shots + 1)

    @property
    def outputs(self) -> int:
        """Size of the model's output: one logit per way, or the regression target's size."""
        return self.ways if self.task == "classification" else int(self.output_size or 1)


class Objective:
    """The loss and the metrics of a task kind, so one algorithm serves both kinds.

    classification: cross-entropy; metrics ``loss`` and ``accuracy`` (higher is better).
    regression: mean squared error; metric ``mse`` (lower is better), named for what it is.
    """

    def __init__(self, task: str):
        if task not in ("classification", "regression"):
            raise ValueError(f"unknown task kind {task!r}")
        self.task = task
        self.primary_metric = "accuracy" if task == "classification" else "mse"
        self.higher_is_better = task == "classification"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the examples of one task: [n, C] outputs, [n] labels or [n, d] targets."""
        if self.task == "classification":
            return F.cross_entropy(outputs, targets)
        return F.mse_loss(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metrics of one task given its loss (detached)."""
        if self.task == "classification":
            return {"loss": loss.detach(), "accuracy": accuracy(outputs.detach(), targets)}
        return {"mse": loss.detach()}


class Algorithm(nn.Module):
    """Base class. Subclasses implement ``meta_step`` and ``evaluate``."""

    #: the metric that selects the best checkpoint, and whether higher is better
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    #: the task kinds (``ProblemInfo.task``) this algorithm can learn; the engine refuses others
    tasks: tuple[str, ...] = ("classification",)
    #: what the query scores that ``evaluate`` hands to ``accuracy`` are: "logits" (a softmax gives the class
    #: probabilities) or "scores" (non-negative, normalised to sum to 1: probabilities, relation scores); read by
    #: ``metalearn eval``'s test-time augmentation and ensembles (metalearn/adaptation.py), which average them
    query_scores: str = "logits"
    #: whether a query's prediction is made from the backbone's embedding of it (metric learners, fitted heads,
    #: the MAML family): ``metalearn eval finetune.*`` fits a new head on those features. False for sequence
    #: learners (SNAIL, MANN), whose backbone feeds a reader of the whole episode
    per_example_features: bool = True
    #: how many times the trainer calls ``meta_step`` on each batch, each call followed by an optimizer step (the
    #: schedule steps once per batch): PPO-style epochs over one batch's samples (maml_rl's outer=ppo, ProMP,
    #: RL^2). The trainer hands every call the same batch object. An algorithm with more than one:
    #:
    #: * keeps what it computed from the batch (its rollouts) between the calls, keyed on the batch object
    #:   (``batch is``), and drops it after ``updates_per_batch`` calls, so that a further call, even on the same
    #:   object (an API user's loop), samples afresh: ``EpochCache`` does both;
    #: * returns its metrics from the first call: the trainer logs those and ignores the later calls'. It reads
    #:   them only after the batch's last call, so a metric that only a later call can measure may be written
    #:   into the first call's tensors in place (ProMP's ``inner_kl``, the KL reached by the batch's updates).
    updates_per_batch: int = 1

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called before each ``meta_step`` with the number of meta-steps done so far (0-based).

        Algorithms whose training changes over time (loss weights, derivative order) read the
        schedule from here, so it resumes exactly from a checkpoint: the step is the engine's.
        """

    def before_training(self) -> None:
        """Called once by the trainer (also on a resume) when the algorithm is built, on its device, before the
        first step and before anything is logged: read what training needs besides the config and weights (RFS's
        teacher), so that a mistake in it ends the run before it starts."""

    def check_training(self, cfg: Any) -> None:
        """Raise ConfigError if this algorithm cannot be trained with the run config ``cfg`` (a ``RunConfig``) beyond
        its own group: e.g. an algorithm that computes its own outer step (TRPO) and needs ``optim.name=sgd``
        with ``optim.lr=1``, or one that needs the whole meta-batch in one process. Called once by the trainer."""

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """One meta-training step on a batch of tasks: fill ``.grad`` of the meta-parameters."""
        raise NotImplementedError

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Adapt to each task's support set and score its query set; no gradient to meta-parameters."""
        raise NotImplementedError

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        """Raise ConfigError if this algorithm cannot handle such episodes (e.g. a fixed-size head)."""

    def differentiates_backbone_backward(self) -> bool:
        """Whether ``meta_step`` differentiates through the backbone's backward (second-order adaptation of the
        backbone's weights), which ``device.compile`` cannot run. A step that does so anyway is caught at
        its first meta-step; saying so here refuses it before anything compiles."""
        return False


class QueryLossAlgorithm(Algorithm):
    """An algorithm with no inner loop: its meta-loss is the mean over tasks of a query loss that is
    differentiable end to end (metric learners, closed-form heads), and it evaluates with the same loss.

    Subclasses implement ``query_loss(batch, training) -> (loss [B], accuracy [B])``; ``training`` lets
    a training-only term (label smoothing) or solver budget differ from evaluation.
    """

    def query_loss(self, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        loss, acc = self.query_loss(batch, training=True)
        loss.mean().backward()
        return {"loss": loss.detach(), "accuracy": acc.detach()}

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        loss, acc = self.query_loss(batch, training=False)
        return {"loss": loss, "accuracy": acc}


class EpochCache:
    """What an algorithm with ``updates_per_batch`` > 1 computed from a batch on its first call (its rollouts),
    for the batch's later calls: keyed on the batch object (``batch is``) and dropped after ``updates`` calls, so
    that a further call, even on the same batch object, computes afresh (the rules of ``updates_per_batch``).
    Not part of the model's state: checkpoints fall between batches."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._batch: Any = None
        self._value: Any = None
        self._calls = 0

    def get(self, batch: Any, updates: int, make: Callable[[], T]) -> tuple[T, int]:
        """(value, update): ``make()``'s value for ``batch`` (made on the first of its calls) and which of its
        ``updates`` calls this is, 0-based. After the last one the value is dropped."""
        if batch is not self._batch:
            self.clear()  # never a stale value, even if make() fails
            self._value = make()
            self._batch = batch
        value, update = self._value, self._calls
        self._calls += 1
        if self._calls >= updates:  # the batch's last update: the next call makes a new value
            self.clear()
        return value, update


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: [B, n, C], [B, n] -> [B]."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels).mean(1)


_RECORDERS: list[list[tuple[torch.Tensor, torch.Tensor]]] = []


@contextlib.contextmanager
def recorded_scores() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """While open, every ``accuracy(scores, labels)`` call is recorded as (scores detached, labels): the scores an
    algorithm's ``evaluate`` decides its queries by, for test-time augmentation and ensembles (adaptation.py)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.pop()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean accuracy over the last-but-one dimension: [..., n, C], [..., n] -> [...]."""
    if _RECORDERS:
        _RECORDERS[-1].append((logits.detach(), labels))
    return (logits.argmax(dim=-1) == labels).float().mean(dim=-1)
