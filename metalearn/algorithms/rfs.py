"""RFS (Tian, Wang, Krishnan, Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good
Embedding Is All You Need?", ECCV 2020, arXiv:2003.11539).

Not a meta-learner: learn an embedding by plain classification over all the training classes, then,
for each few-shot task, freeze it and fit a logistic regression on the task's support set.

Training (``meta_step``). As ``baseline.py``: every image of the batch, support and query alike, is
classified into the ``info.num_train_classes`` training classes by a linear layer (``head``) over the
backbone's features; its global label is ``batch.classes[b, y]``. The ``accuracy`` reported is that of
this global classification, ``loss`` the training loss (mean over each task's images).

Self-distillation (born-again generations, the paper's RFS-distill). With ``teacher: <run directory or
checkpoint>`` the run is generation k+1 of the run it names (its ``best.pt``): the teacher, the same
network (backbone and head over the same classes: an ``algo=rfs`` run, or an ``algo=baseline``
``head=linear`` one, with the same backbone settings), frozen and in eval mode, labels the same images,
and the loss is::

    ce_weight * CE(student, labels) + distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(the authors' ``DistillKL``: the KL summed over classes, averaged over images). The student starts
fresh (not from the teacher's weights), as in the paper. The teacher is read when training starts
(``before_training``), not when the algorithm is built, so a run's checkpoints (which record ``algo.teacher`` in their
config and hold no teacher weights) are evaluated with ``metalearn eval`` without it; a resumed run
reads it again. A missing teacher, or one of another network, is one CheckpointError line.

Evaluation (``evaluate``). The backbone is frozen; support and query are embedded and, with
``normalize``, L2-normalised (the paper's ``is_norm``); a multinomial logistic regression is fitted to
each task's support set, to its optimum, and scores the query set. The paper uses scikit-learn's
``LogisticRegression(solver='lbfgs', multi_class='multinomial')`` with its default ``C=1``; here the
same objective::

    minimise over W, b:   sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 C)        (the bias unpenalised)

is solved in float64 by Newton's method with a backtracking line search (``fit_logistic_regression``),
batched over tasks: deterministic, no random state, a task's result independent of its batch.

Choices that differ from the paper, stated:

* Training data comes from the episode sampler: each step's images are ``meta_batch_size`` tasks of
  ``ways`` classes with ``shots + queries`` images each (class-balanced), not shuffled minibatches of
  the training set (the paper: 64 images, SGD 0.05, 100 epochs; see the preset).
* BatchNorm uses per-set batch statistics (models/tasks.py) at training and test time; the paper's
  network uses running averages at test time.
* The authors' test script augments each support image 5 times (``n_aug_support_samples``); here the
  support set is the episode's, unaugmented.
* The engine validates on few-shot episodes and tests the best-validation checkpoint; the paper
  trains a fixed number of epochs and tests the last one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metalearn import checkpoint
from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy, task_cross_entropy
from metalearn.algorithms.baseline import head_logits, init_head
from metalearn.data.episodes import TaskBatch
from metalearn.errors import CheckpointError, ConfigError

log = logging.getLogger("metalearn")


@dataclass
class Config:
    name: str = "rfs"
    C: float = 1.0  # inverse L2 strength of the test-time logistic regression (scikit-learn's C; the paper: its default 1)
    normalize: bool = True  # L2-normalise the features before the logistic regression (the paper's is_norm)
    newton_steps: int = 30  # at most this many Newton steps per logistic regression (it stops at the optimum)
    teacher: Optional[str] = None  # a run directory (its best.pt) or checkpoint of the previous generation; null: generation 0
    ce_weight: float = 0.5  # with a teacher: weight of the cross-entropy to the labels (the paper's alpha)
    distill_weight: float = 0.5  # with a teacher: weight of the KL divergence to the teacher (the paper's beta)
    distill_temperature: float = 4.0  # T of the softened distributions (the authors' kd_T)


# ---------------------------------------------------------------- the test-time logistic regression


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, ways: int, C: float,
                            steps: int = 30) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression of each task, to its optimum: features [T, n, F], labels [T, n] ->
    ``{"weight": [T, ways, F], "bias": [T, ways]}`` (float64) minimising

        sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 C)

    (scikit-learn's ``LogisticRegression(C=C)``, multinomial, the bias unpenalised). The bias is only
    determined up to a constant added to every class (which changes no prediction): the sum-zero one is
    returned.

    How: by the representer theorem the optimal W lies in the span of the support features, so the fit
    runs in the coordinates of an orthonormal basis of that span (QR), of at most n dimensions whatever F.
    Newton's method with a backtracking (Armijo) line search, each task on its own (a task that has
    converged stops moving), at most ``steps`` steps; the Hessian has (ways (min(n, F) + 1))^2 entries
    per task (5-way 5-shot: 130^2).
    """
    x = features.double()
    t, n, _ = x.shape
    basis = torch.linalg.qr(x.mT).Q  # [T, F, r], r = min(n, F): orthonormal columns spanning the features
    z = torch.cat([x @ basis, x.new_ones(t, n, 1)], -1)  # [T, n, d]: coordinates in the span, then 1 for the bias
    d = z.shape[-1]
    targets = F.one_hot(labels, ways).double()
    is_bias = torch.arange(d, device=x.device) == d - 1
    penalty = torch.where(is_bias, 0.0, 1.0 / C).double()  # per coordinate: W's penalised, the bias not
    # The L2 term's Hessian, and (sum_c b_c)^2 / 2's: that term fixes the bias's free constant (the loss does not
    # see it), so the Hessian is positive definite and the optimum unique, with the same predictions.
    bias_entries = is_bias.repeat(ways).double()  # theta flattened: class by class, d coordinates each
    constant = torch.diag(penalty.repeat(ways)) + bias_entries[:, None] * bias_entries[None, :]

    def objective(theta: torch.Tensor) -> torch.Tensor:  # [..., T, ways, d] -> [..., T]
        logits = z @ theta.mT
        ce = (torch.logsumexp(logits, -1) - (logits * targets).sum(-1)).sum(-1)
        return ce + 0.5 * (theta.square() * penalty).sum((-1, -2)) + 0.5 * theta[..., -1].sum(-1).square()

    theta = x.new_zeros(t, ways, d)
    moving = torch.ones(t, dtype=torch.bool, device=x.device)  # tasks not yet at their optimum
    for _ in range(steps):
        p = torch.softmax(z @ theta.mT, -1)  # [T, n, ways]
        grad = (p - targets).mT @ z + theta * penalty
        grad[..., -1] += theta[..., -1].sum(-1, keepdim=True)
        curvature = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [T, n, ways, ways] per example
        hessian = torch.einsum("tnce,tnj,tnk->tcjek", curvature, z, z).reshape(t, ways * d, ways * d) + constant
        direction = torch.linalg.solve(hessian, grad.reshape(t, -1)).view_as(theta)
        # g H^-1 g, the squared Newton decrement, is about twice the distance to the optimum's objective. Once it is
        # at float64's resolution of the objective, one more full step reaches rounding level (Newton converges
        # quadratically there, where a line search can no longer see a decrease), and the task stops.
        slope, now = (grad * direction).sum((-1, -2)), objective(theta)
        last = moving & (slope <= 1e-16 * (1 + now.abs()))
        size = (moving & ~last).double()  # backtracking (Armijo): halve each step until the objective decreases enough
        for _ in range(50):
            accepted = objective(theta - size[:, None, None] * direction) <= now - 1e-4 * size * slope
            if bool(accepted.all()):
                break
            size = torch.where(accepted, size, size / 2)
        theta = theta - torch.where(last, 1.0, size * accepted)[:, None, None] * direction
        moving &= accepted & ~last  # a step that never decreases the objective: rounding, the optimum
        if not bool(moving.any()):
            break
    weight, bias = theta[..., :-1] @ basis.mT, theta[..., -1]  # back from the span's coordinates
    return {"weight": weight, "bias": bias}


def logistic_regression_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                               C: float, steps: int = 30, normalize: bool = True) -> torch.Tensor:
    """[T, n_s, F], [T, n_s], [T, n_q, F] -> [T, n_q, ways] (float64): the query logits of the logistic
    regression fitted to each task's support set (``fit_logistic_regression``), on L2-normalised features
    if ``normalize``."""
    if normalize:
        support, query = F.normalize(support.double(), dim=-1), F.normalize(query.double(), dim=-1)
    head = fit_logistic_regression(support, support_y, ways, C, steps)
    return head_logits("linear", head, query.double(), 1.0)


# ---------------------------------------------------------------- self-distillation


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, n, C], [B, n, C] logits -> [B]: the mean over each task's images of
    T^2 KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.'s scaling, the authors' ``DistillKL``)."""
    log_student = F.log_softmax(student / temperature, -1)
    log_teacher = F.log_softmax(teacher / temperature, -1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return kl.mean(-1) * temperature**2


# ---------------------------------------------------------------- the algorithm


class RFS(Algorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        _check(cfg)
        self.cfg, self.backbone = cfg, backbone
        self.head = nn.ParameterDict({k: nn.Parameter(v) for k, v in init_head(
            "linear", info.num_train_classes, backbone.out_features, learn_norms=False).items()})
        # The previous generation, read when training starts (``before_training``, ``teacher_model``). A plain attribute, not a
        # submodule: its weights are no meta-parameters, not in this run's checkpoints, and no .train() of the
        # student's reaches them. A copy of the network made now, before any torch.compile of the backbone.
        self.__dict__["_teacher"] = None
        self.__dict__["_teacher_network"] = None
        if cfg.teacher is not None:
            with torch.random.fork_rng(devices=[]):  # its drawn head is overwritten: leave the global stream as it was
                self.__dict__["_teacher_network"] = RFS(dataclasses.replace(cfg, teacher=None), copy.deepcopy(backbone), info)

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        """Any episode shape: the head has num_train_classes outputs whatever the training episodes, and
        evaluation fits a new one of ``ways`` outputs; the data checks the class counts."""

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, n, C, H, W] -> logits [B, n, num_train_classes] over the training classes."""
        return head_logits("linear", dict(self.head), self.backbone(x), 1.0)

    def before_training(self) -> None:
        self.teacher_model()  # a missing or different teacher ends the run before its first step

    def teacher_model(self) -> "RFS | None":
        """The frozen teacher (None without one), read from ``cfg.teacher`` on the first call, on the device and in
        the dtype of this model."""
        if self.cfg.teacher is None or self._teacher is not None:
            return self._teacher
        where = f"algo.teacher={self.cfg.teacher}"
        try:  # the run-directory-to-checkpoint rule of init_from
            path = checkpoint.find(Path(self.cfg.teacher).expanduser(), "best")
            state = checkpoint.load(path)["model"]
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        weight = self.head["weight"]
        teacher = self._teacher_network.to(device=weight.device, dtype=weight.dtype)  # before loading: no rounding
        mine = teacher.state_dict()
        wrong = sorted(mine.keys() ^ state.keys()) or [k for k in sorted(mine) if mine[k].shape != state[k].shape]
        if wrong:
            raise CheckpointError(f"{where}: the model in {path} is not this run's network (first difference: {wrong[0]}); "
                                  "the teacher is an earlier generation: a run of algo=rfs (or algo=baseline with "
                                  "head=linear) on the same training classes, with the same backbone settings")
        teacher.load_state_dict(state)
        self.__dict__["_teacher"] = teacher.requires_grad_(False).eval()
        log.info("teacher (distillation) read from %s", path)
        return self._teacher

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        x = torch.cat([batch.support_x, batch.query_x], 1)  # each task's images are one minibatch
        y = batch.classes.gather(1, torch.cat([batch.support_y, batch.query_y], 1))  # global labels [B, n]
        logits = self.class_logits(x)
        ce = task_cross_entropy(logits, y)
        teacher = self.teacher_model()
        metrics = {"accuracy": accuracy(logits.detach(), y)}
        if teacher is None:
            loss = ce
        else:
            with torch.no_grad():
                teacher_logits = teacher.class_logits(x)
            distill = distillation_loss(logits, teacher_logits, self.cfg.distill_temperature)
            loss = self.cfg.ce_weight * ce + self.cfg.distill_weight * distill
            metrics |= {"cross_entropy": ce.detach(), "distillation": distill.detach()}
        loss.mean().backward()
        return {"loss": loss.detach(), **metrics}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)
            logits = logistic_regression_logits(support, batch.support_y, query, batch.ways, self.cfg.C,
                                                self.cfg.newton_steps, self.cfg.normalize)
            return {"loss": task_cross_entropy(logits, batch.query_y), "accuracy": accuracy(logits, batch.query_y)}


def _check(cfg: Config) -> None:
    if not cfg.C > 0:
        raise ConfigError(f"algo.C must be > 0 (got {cfg.C})")
    if cfg.newton_steps < 1:
        raise ConfigError(f"algo.newton_steps must be >= 1 (got {cfg.newton_steps})")
    for key in ("ce_weight", "distill_weight"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"algo.{key} must be >= 0 (got {getattr(cfg, key)})")
    if not cfg.distill_temperature > 0:
        raise ConfigError(f"algo.distill_temperature must be > 0 (got {cfg.distill_temperature})")
    if cfg.teacher is not None and cfg.ce_weight == cfg.distill_weight == 0:
        raise ConfigError("algo.ce_weight and algo.distill_weight are both 0: the student would learn nothing")


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> RFS:
    return RFS(cfg, backbone, info)
