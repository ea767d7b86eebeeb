"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot
Classification", ICLR 2019, arXiv:1904.04232).

Not a meta-learner: pre-train an ordinary classifier over all the training
classes, then, for each few-shot task, freeze the feature extractor and fit a
new classifier on the task's support set.

Pre-training (``meta_step``). Every image of the batch, support and query
alike, is classified into the ``info.num_train_classes`` classes of the
training split; its global label is ``batch.classes[b, y]``. Cross-entropy,
mean over the images. The head is

* ``head: linear`` (Baseline): a linear layer with bias;
* ``head: cosine`` (Baseline++): ``scale * g_c * cos(x, w_c)``, the cosine
  similarity of the features to each class's weight vector. As in the
  authors' code, each class weight also has a learned norm ``g_c`` (their
  ``WeightNorm``, ``learn_norms: true``; the paper's text describes the plain
  cosine, ``learn_norms: false``), and ``scale`` follows their rule when left
  null: 2 for a head of at most 200 classes (every fine-tuning head, and
  miniImageNet/CUB pre-training), 10 above (Omniglot's 4112 classes).

The ``accuracy`` that ``meta_step`` reports is that of this global
classification (not a few-shot accuracy); ``loss`` is its cross-entropy.

Evaluation (``evaluate``). The backbone is frozen; the support and query sets
are embedded, a new head of ``ways`` outputs (the same kind as the pre-training
head) is fitted to the support embeddings, and the query set is scored with
it. The paper's fitting: 100 epochs over the support set in random minibatches
of 4, SGD with lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, from a
fresh randomly initialised head. Here the head's initialisation
(``nn.Linear``'s uniform range) and the minibatch orders come from a local
``torch.Generator`` seeded with ``finetune_seed`` at every ``evaluate`` call:
evaluation is deterministic, uses no global random state, gives the same
result for a task whatever batch it comes in, and every task of a batch gets
the same initial head and the same minibatch orders (its support set is in
random order already). All tasks of a batch are fitted at once (their heads
stacked); the SGD rule is ``torch.optim.SGD``'s, written out.

Choices that differ from the paper, stated:

* Pre-training data comes from the episode sampler: each step's images come
  from ``meta_batch_size`` tasks of ``ways`` classes with ``shots + queries``
  images each (class-balanced sampling), not from plain shuffled minibatches
  of the training set (the paper: 16 images per minibatch, Adam 1e-3).
* BatchNorm uses per-set batch statistics (see models/conv4.py), no running
  averages: during pre-training each task's images are normalised together
  (a task is one minibatch); at evaluation the support and query sets are each
  normalised with their own statistics, as for every algorithm here. The
  paper's network uses running averages at test time.
* The paper validates nothing for Baseline/Baseline++ by default (training
  runs a fixed number of epochs); here the engine validates as for every
  algorithm, which costs a head fit per validation episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError

HEADS = ("linear", "cosine")


@dataclass
class Config:
    name: str = "baseline"
    head: str = "linear"  # linear (Baseline) | cosine (Baseline++)
    scale: Optional[float] = None  # cosine head: logit scale; null: 2 for heads of <= 200 classes, 10 above
    learn_norms: bool = True  # cosine head: a learned norm per class weight (the authors' code); false: plain cosine
    finetune_epochs: int = 100  # passes over the support set when fitting the new head
    finetune_batch_size: Optional[int] = 4  # support examples per SGD step; null: all of them
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    finetune_dampening: float = 0.9
    finetune_weight_decay: float = 0.001
    finetune_seed: int = 0  # seeds the new head's initialisation and the minibatch orders (a local generator)


def head_logits(kind: str, p: dict, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Features x [..., n, F] -> logits [..., n, C] for head parameters p.

    p: ``weight`` [..., C, F] and ``bias`` [..., C] (linear), or ``weight`` and optionally ``norm`` [..., C]
    (cosine); the leading dimensions, if any, are tasks, each with its own head.
    """
    if kind == "linear":
        return x @ p["weight"].transpose(-1, -2) + p["bias"].unsqueeze(-2)
    cos = F.normalize(x, dim=-1) @ F.normalize(p["weight"], dim=-1).transpose(-1, -2)
    return scale * cos * p["norm"].unsqueeze(-2) if "norm" in p else scale * cos


def init_head(kind: str, classes: int, features: int, learn_norms: bool, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A head drawn like ``nn.Linear``'s default: uniform in +-1/sqrt(features); a cosine head's norms
    start at its weights' norms (as ``WeightNorm`` starts)."""
    bound = 1 / math.sqrt(features)

    def uniform(*shape):
        return (torch.rand(*shape, generator=generator, dtype=dtype) * 2 - 1) * bound

    weight = uniform(classes, features)
    if kind == "linear":
        return {"weight": weight, "bias": uniform(classes)}
    return {"weight": weight, "norm": weight.norm(dim=1)} if learn_norms else {"weight": weight}


def finetune(kind: str, head: dict, support: torch.Tensor, labels: torch.Tensor, scale: float, cfg: Config,
             generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fit ``head`` (one, shared as the start of every task) to each task's support embeddings.

    support [T, n, F], labels [T, n] -> the fitted heads, stacked [T, ...]. Minibatch SGD with momentum,
    dampening and weight decay, the rule of ``torch.optim.SGD``; the tasks' losses are summed, so each
    task's head follows the gradient of its own mean loss.
    """
    T, n = labels.shape
    size = cfg.finetune_batch_size or n
    orders = [torch.randperm(n, generator=generator) for _ in range(cfg.finetune_epochs)]
    orders = torch.stack(orders).to(labels.device) if orders else []  # one transfer, not one per step
    params = {k: v.to(support).expand(T, *v.shape).clone() for k, v in head.items()}
    bufs: dict[str, torch.Tensor] = {}
    for order in orders:
        for idx in order.split(size):
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            logits = head_logits(kind, leaves, support[:, idx], scale)
            loss = F.cross_entropy(logits.flatten(0, 1), labels[:, idx].flatten(), reduction="none").view(T, -1).mean(1).sum()
            grads = torch.autograd.grad(loss, tuple(leaves.values()))
            for (k, p), g in zip(params.items(), grads):
                d = g + cfg.finetune_weight_decay * p
                if cfg.finetune_momentum:
                    # torch.optim.SGD: the first step's buffer is the step itself, undamped
                    d = bufs[k] = d if k not in bufs else cfg.finetune_momentum * bufs[k] + (1 - cfg.finetune_dampening) * d
                params[k] = p - cfg.finetune_lr * d
    return {k: v.detach() for k, v in params.items()}


class Baseline(Algorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        _check(cfg)
        self.cfg, self.backbone = cfg, backbone
        self.head = nn.ParameterDict({k: nn.Parameter(v) for k, v in init_head(
            cfg.head, info.num_train_classes, backbone.out_features, cfg.learn_norms).items()})

    def scale(self, classes: int) -> float:
        """The cosine head's logit scale for a head of ``classes`` outputs (the authors' rule unless set)."""
        if self.cfg.scale is not None:
            return self.cfg.scale
        return 2.0 if classes <= 200 else 10.0

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        """Any episode shape: the pre-training head has num_train_classes outputs whatever the training
        episodes, and evaluation fits a new head of ``ways`` outputs; the data checks the class counts."""

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        x = torch.cat([batch.support_x, batch.query_x], 1)  # each task's images are one minibatch
        y = batch.classes.gather(1, torch.cat([batch.support_y, batch.query_y], 1))  # global labels [B, n]
        head = dict(self.head)
        logits = head_logits(self.cfg.head, head, self.backbone(x), self.scale(head["weight"].shape[0]))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1)
        loss.mean().backward()
        return {"loss": loss.detach(), "accuracy": accuracy(logits.detach(), y)}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            support, query = self.backbone(batch.support_x), self.backbone(batch.query_x)
        generator = torch.Generator().manual_seed(self.cfg.finetune_seed)  # local: the global RNG is untouched
        head = init_head(self.cfg.head, batch.ways, support.shape[-1], self.cfg.learn_norms, generator, support.dtype)
        scale = self.scale(batch.ways)
        with torch.enable_grad():
            head = finetune(self.cfg.head, head, support, batch.support_y, scale, self.cfg, generator)
        with torch.no_grad():
            logits = head_logits(self.cfg.head, head, query, scale)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), reduction="none").view_as(batch.query_y).mean(1)
        return {"loss": loss, "accuracy": accuracy(logits, batch.query_y)}


def _check(cfg: Config) -> None:
    if cfg.head not in HEADS:
        raise ConfigError(f"algo.head={cfg.head!r} is not one of: {', '.join(HEADS)}")
    if cfg.scale is not None and not cfg.scale > 0:
        raise ConfigError(f"algo.scale must be > 0 or null (got {cfg.scale})")
    if cfg.finetune_epochs < 0:
        raise ConfigError(f"algo.finetune_epochs must be >= 0 (got {cfg.finetune_epochs})")
    if cfg.finetune_batch_size is not None and cfg.finetune_batch_size < 1:
        raise ConfigError(f"algo.finetune_batch_size must be >= 1 or null (got {cfg.finetune_batch_size})")
    if not cfg.finetune_lr > 0:
        raise ConfigError(f"algo.finetune_lr must be > 0 (got {cfg.finetune_lr})")
    for key in ("finetune_momentum", "finetune_dampening"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"algo.{key} must be in [0, 1] (got {getattr(cfg, key)})")
    if cfg.finetune_weight_decay < 0:
        raise ConfigError(f"algo.finetune_weight_decay must be >= 0 (got {cfg.finetune_weight_decay})")


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> Baseline:
    return Baseline(cfg, backbone, info)
