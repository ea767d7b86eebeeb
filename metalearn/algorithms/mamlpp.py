"""MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, arXiv:1810.09502, "How to train your MAML").

MAML (see maml.py) with the paper's changes, each a switch of its own:

* **MSL** (``msl``), multi-step loss: the meta-loss of a task is
  ``sum_i v_i(s) * L_query(theta_i)`` over the weights ``theta_i`` after each
  inner step ``i = 1..N``. The weights follow the authors' code
  (``get_per_step_loss_importance_vector``) with its epochs turned into
  meta-steps: with ``N = inner_steps``, ``A = msl_anneal_steps`` and ``s`` the
  engine's meta-step, for ``s < A``::

      v_i = max(1/N - s / (N*A), 0.03/N)                  i < N
      v_N = min(1/N + s * (N-1) / (N*A), 1 - 0.03*(N-1)/N)

  (uniform at ``s = 0``, the earlier steps decaying linearly to the floor
  0.03/N, the last growing by what they lose, so the weights sum to 1), and
  from ``s = A`` on the last step alone, ``v = (0, ..., 0, 1)``, as the code
  switches to the final loss once ``epoch >= multi_step_loss_num_epochs``.
  The code decays once per epoch; here the ramp is per meta-step and agrees
  with it at every epoch boundary when ``A`` = anneal epochs x iterations per
  epoch. ``msl=false`` is MAML's final-step loss throughout.
* **DA**, derivative-order annealing: first order (the inner gradients are
  constants) while ``s < first_order_steps``, second order from then on
  (``first_order_steps: 0``: second order throughout).
* **LSLR** (``lslr``): a learned inner learning rate per parameter tensor and
  per inner step (``step_lrs.<name>``, shape [inner_steps], ``<name>`` the
  parameter's name within ``net`` with dots as dashes, e.g.
  ``step_lrs.0-convs-0-weight``), all starting at ``inner_lr``; free
  in sign, as the paper's "learning rates and directions". Off: ``inner_lr``
  for every tensor and step.
* **BNWB** (``bnwb``): BatchNorm weights and biases per inner state. With the
  network at state ``j`` (after ``j`` inner updates) every forward pass, the
  support pass of step ``j + 1`` as well as the query pass at state ``j``,
  uses copy ``j`` of the backbone's norm parameters: copy 0 is the backbone's
  own, copies 1..N are ``step_norms.<name>`` (shape [inner_steps, C]), each
  starting as a copy of the backbone's. They are substituted into the
  parameter dict given to ``torch.func.functional_call``; the backbone is not
  changed. Per-state values are meta-parameters, so the inner loop does not
  adapt the norm parameters (the authors' code likewise keeps them out of the
  inner loop); with ``bnwb=false`` they are adapted like every other weight,
  as in maml.py.
* **CA**, cosine annealing of the outer learning rate, is the engine's
  ``optim.scheduler=cosine`` (used by the preset).

Choices that differ from the paper, stated:

* BNRS (per-step running statistics) does not apply: this project's
  BatchNorm always normalises with the statistics of the set being processed,
  per task (transductive, as MAML's code), and keeps no running statistics.
* BNWB keeps N + 1 copies indexed by inner state, above. The authors' code
  keeps N, using copy ``i`` for the support pass of step ``i`` and for the
  query pass after that step, so the last support pass and the final query
  pass share one.
* Evaluation adapts for ``test_inner_steps`` steps with the learned values of
  those steps and scores the query set at that state. The learned per-step
  values exist for ``inner_steps`` steps only, so with ``lslr`` or ``bnwb``
  on, ``test_inner_steps > inner_steps`` is a ConfigError (the paper
  evaluates with as many steps as it trains with).
* The schedules read the step that the engine passes to ``begin_step``, not a
  counter of calls, so a resumed run follows the same schedule. Before any
  ``begin_step`` the step is 0.

Metrics: ``loss`` and ``accuracy`` are those of the query set after the last
inner step (comparable with validation); ``meta_loss`` is the weighted MSL sum
that is differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import ProblemInfo, accuracy
from metalearn.algorithms.maml import MAML
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError
from metalearn.models.tasks import TaskBatchNorm

#: Normalisation layers whose affine parameters BNWB keeps per inner state.
NORM_LAYERS = (TaskBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Config:
    name: str = "mamlpp"
    inner_lr: float = 0.1  # the inner learning rate (with lslr: every learned rate's initial value)
    inner_steps: int = 5  # inner steps during meta-training
    test_inner_steps: int = 5  # ... at validation / test (<= inner_steps with lslr or bnwb)
    msl: bool = True  # multi-step loss
    msl_anneal_steps: int = 5000  # meta-steps over which MSL's weights move to the last step
    first_order_steps: int = 25000  # derivative-order annealing: first order before this meta-step
    lslr: bool = True  # learned per-layer (per tensor) per-step inner learning rates
    bnwb: bool = True  # per-step BatchNorm weights and biases


def msl_weights(inner_steps: int, step: int, anneal_steps: int) -> list[float]:
    """MSL's weight of the query loss after each inner step at meta-step ``step`` (see the module docstring)."""
    n = inner_steps
    if step >= anneal_steps:
        return [0.0] * (n - 1) + [1.0]
    decay, floor = 1.0 / (n * anneal_steps), 0.03 / n
    early = max(1.0 / n - step * decay, floor)
    last = min(1.0 / n + step * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return [early] * (n - 1) + [last]


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (which cannot contain dots)."""
    return name.replace(".", "-")


class MAMLpp(MAML):
    """MAML's network and checks; its own inner loop with per-step rates, norms and losses."""

    tasks = ("classification",)  # its own loops score with cross-entropy

    def differentiates_backbone_backward(self) -> bool:
        # Second order from the start; later (derivative-order annealing) the engine catches its first such step.
        return self.cfg.first_order_steps == 0

    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__(cfg, backbone, info)
        if cfg.inner_steps < 1:
            raise ConfigError("algo.inner_steps must be >= 1 for mamlpp")
        if cfg.msl_anneal_steps < 0 or cfg.first_order_steps < 0:
            raise ConfigError("algo.msl_anneal_steps and algo.first_order_steps must be >= 0")
        if (cfg.lslr or cfg.bnwb) and cfg.test_inner_steps > cfg.inner_steps:
            raise ConfigError(f"algo.test_inner_steps={cfg.test_inner_steps} exceeds algo.inner_steps={cfg.inner_steps}: "
                              "the learned per-step rates and norms (lslr, bnwb) exist only for the training steps; "
                              "lower algo.test_inner_steps or set algo.lslr=false algo.bnwb=false")
        norms = [f"{m}.{p}" for m, module in self.net.named_modules() if isinstance(module, NORM_LAYERS)
                 for p, _ in module.named_parameters(recurse=False)]
        if cfg.bnwb and not norms:
            raise ConfigError("algo.bnwb needs normalisation layers in the backbone (backbone.norm=batch); "
                              "or set algo.bnwb=false")
        self.norm_names = norms if cfg.bnwb else []
        #: the parameters the inner loop adapts (with bnwb, all but the norms), in named_parameters order
        self.adapted_names = [k for k, _ in self.net.named_parameters() if k not in self.norm_names]
        if cfg.lslr:
            # (a list of pairs keeps the parameters' order; ParameterDict sorts the keys of a dict)
            self.step_lrs = nn.ParameterDict([
                (_key(k), nn.Parameter(torch.full((cfg.inner_steps,), float(cfg.inner_lr)))) for k in self.adapted_names])
        if cfg.bnwb:
            p = dict(self.net.named_parameters())
            self.step_norms = nn.ParameterDict([
                (_key(k), nn.Parameter(p[k].detach().expand(cfg.inner_steps, *p[k].shape).clone()))
                for k in self.norm_names])
        self.current_step = 0  # the engine's meta-step, from begin_step (not saved: the engine's step restores it)

    # ------------------------------------------------------------ schedules

    def begin_step(self, step: int, total_steps: int) -> None:
        self.current_step = step

    @property
    def second_order(self) -> bool:
        return self.current_step >= self.cfg.first_order_steps

    def loss_weights(self) -> list[float]:
        n = self.cfg.inner_steps
        if not self.cfg.msl:
            return [0.0] * (n - 1) + [1.0]
        return msl_weights(n, self.current_step, self.cfg.msl_anneal_steps)

    # ------------------------------------------------------------ the inner loop

    def inner_lr(self, detach: bool = False, step: int = 0) -> float | dict[str, torch.Tensor]:
        """The rates of inner step ``step`` (0-based): one number, or with LSLR a learned one per tensor."""
        if not self.cfg.lslr:
            return self.cfg.inner_lr
        return {k: (self.step_lrs[_key(k)].detach() if detach else self.step_lrs[_key(k)])[step] for k in self.adapted_names}

    def _at_state(self, weights: dict, state: int, detach: bool) -> dict:
        """The full parameter dict at inner state ``state``: adapted weights plus that state's norms (BNWB)."""
        if not self.norm_names:
            return weights
        if state == 0:
            norms = {k: p for k, p in self.net.named_parameters() if k in self.norm_names}
        else:
            norms = {k: self.step_norms[_key(k)][state - 1] for k in self.norm_names}
        return {**weights, **{k: v.detach() if detach else v for k, v in norms.items()}}

    def _inner_step(self, weights: dict, step: int, x: torch.Tensor, y: torch.Tensor, create_graph: bool,
                    detach: bool) -> dict:
        """One SGD step on (x, y) from state ``step`` to ``step + 1``."""
        loss = F.cross_entropy(functional_call(self.net, self._at_state(weights, step, detach), (x,)), y)
        grads = torch.autograd.grad(loss, tuple(weights.values()), create_graph=create_graph)
        lr = self.inner_lr(detach, step)
        return {k: p - (lr[k] if isinstance(lr, dict) else lr) * g for (k, p), g in zip(weights.items(), grads)}

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        params = dict(self.net.named_parameters())
        theta = {k: params[k] for k in self.adapted_names}
        weights, create_graph = self.loss_weights(), self.second_order
        losses, accs, meta_losses = [], [], []
        for t in range(batch.num_tasks):
            adapted, meta_loss = theta, 0.0
            for i, v in enumerate(weights):
                adapted = self._inner_step(adapted, i, batch.support_x[t], batch.support_y[t], create_graph, detach=False)
                if v > 0:  # the last weight is never 0; annealed-away steps cost no query pass
                    logits = functional_call(self.net, self._at_state(adapted, i + 1, detach=False), (batch.query_x[t],))
                    loss = F.cross_entropy(logits, batch.query_y[t])
                    meta_loss = meta_loss + v * loss
            # Backward per task: the mean's gradient accumulates in .grad and each graph is freed at once.
            (meta_loss / batch.num_tasks).backward()
            losses.append(loss.detach())
            accs.append(accuracy(logits.detach(), batch.query_y[t]))
            meta_losses.append(meta_loss.detach())
        return {"loss": torch.stack(losses), "accuracy": torch.stack(accs), "meta_loss": torch.stack(meta_losses)}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        steps = self.cfg.test_inner_steps
        theta = {k: p.detach().requires_grad_() for k, p in self.net.named_parameters() if k in self.adapted_names}
        losses, accs = [], []
        for t in range(batch.num_tasks):
            adapted = theta
            with torch.enable_grad():
                for i in range(steps):
                    adapted = self._inner_step(adapted, i, batch.support_x[t], batch.support_y[t], False, detach=True)
            with torch.no_grad():
                logits = functional_call(self.net, self._at_state(adapted, steps, detach=True), (batch.query_x[t],))
                losses.append(F.cross_entropy(logits, batch.query_y[t]))
                accs.append(accuracy(logits, batch.query_y[t]))
        return {"loss": torch.stack(losses), "accuracy": torch.stack(accs)}


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> MAMLpp:
    return MAMLpp(cfg, backbone, info)
