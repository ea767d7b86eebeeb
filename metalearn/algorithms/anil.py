"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, arXiv:1909.09157,
"Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML").

MAML in which the inner loop adapts only the head, the final linear layer:
``w'_i = w - inner_lr * grad_w L_support(w, phi)`` with the body ``phi`` fixed
for the task. The outer loop learns both from the query loss at (w'_i, phi),
second order through the head's adaptation (``first_order=true`` drops it),
so the body gets gradient through the query features *and* through the
support features that the adapted head depends on.

Because the body does not change within a task, each set is embedded once
and the inner steps run on the embeddings with ``maml.adapt`` over the head
alone: the inner loop costs a linear layer, not a network. All tasks are
embedded in one forward pass (the backbone normalises each task on its own,
so results do not depend on the batch size), and one backward follows; the
memory this holds is the body's activations for the batch, as for ProtoNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import ProblemInfo, accuracy
from metalearn.algorithms.maml import MAML, adapt
from metalearn.data.episodes import TaskBatch


@dataclass
class Config:
    name: str = "anil"
    inner_lr: float = 0.4
    inner_steps: int = 1  # SGD steps of the head on the support set during meta-training
    test_inner_steps: int = 3  # ... and at validation / test
    first_order: bool = False  # ignore second derivatives through the head's adaptation


class ANIL(MAML):
    """MAML's network (same parameter names, so checkpoints and references line up); only the head adapts."""

    tasks = ("classification",)  # its own loops score with cross-entropy

    def differentiates_backbone_backward(self) -> bool:
        return False  # only the head adapts: the backbone runs once per task and is differentiated once

    def _query_logits(self, support: torch.Tensor, query: torch.Tensor, support_y: torch.Tensor, head: dict,
                      steps: int, create_graph: bool) -> torch.Tensor:
        """Embeddings [T, n, F] -> query logits [T, n_q, ways] after adapting ``head`` on each task's support."""
        linear, logits = self.net[1], []
        for t in range(support.shape[0]):
            adapted = adapt(linear, head, support[t], support_y[t], steps, self.cfg.inner_lr, create_graph)
            logits.append(functional_call(linear, adapted, (query[t],)))
        return torch.stack(logits)

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        body, head = self.net[0], dict(self.net[1].named_parameters())
        logits = self._query_logits(body(batch.support_x), body(batch.query_x), batch.support_y, head,
                                    self.cfg.inner_steps, create_graph=not self.cfg.first_order)
        loss = _task_losses(logits, batch.query_y)
        loss.mean().backward()
        return {"loss": loss.detach(), "accuracy": accuracy(logits.detach(), batch.query_y)}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        body, head = self.net[0], {k: p.detach().requires_grad_() for k, p in self.net[1].named_parameters()}
        with torch.no_grad():
            support, query = body(batch.support_x), body(batch.query_x)
        with torch.enable_grad():
            logits = self._query_logits(support, query, batch.support_y, head, self.cfg.test_inner_steps, create_graph=False)
        logits = logits.detach()
        return {"loss": _task_losses(logits, batch.query_y), "accuracy": accuracy(logits, batch.query_y)}


def _task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per task: [T, n, C], [T, n] -> [T]."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels).mean(1)


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> ANIL:
    return ANIL(cfg, backbone, info)
