"""LEO: Latent Embedding Optimization (Rusu, Rao, Sygnowski, Vinyals, Pascanu, Osindero & Hadsell,
"Meta-Learning with Latent Embedding Optimization", ICLR 2019, arXiv:1807.05960).

LEO learns a low-dimensional generative model of classifier weights and adapts a task by
gradient steps in that latent space instead of in the 640-d weight space. On features
``x`` (the paper: a WRN-28-10 pre-trained on the training classes; here ``data=features``
with ``backbone=identity``, see data/features.py), for an N-way K-shot task:

1. encoder: ``e = W_e dropout(x)`` for each support example (a linear map to the latent size);
2. relation network ``g_r`` (3 linear layers without bias, ReLU between) on every ordered pair
   of support codes ``[e_i, e_j]``, averaged over the partners j, then over the class's K
   examples: the parameters (mean, unnormalised std) of a Gaussian over the class's latent
   code ``z_n``;
3. sampling (meta-training only; evaluation takes the means): ``z = mu + sigma * eps`` with
   ``sigma = max(exp(s) - 1, 1e-10)``, K samples per class (one per support example, as
   the authors' code tiles them), and the KL term ``log q(z) - log p(z)`` at the sample,
   averaged (Monte Carlo), with the prior ``p = N(0, I)``;
4. decoder: a linear map of each ``z`` to the parameters of a Gaussian over the class's
   classifier weights ``w`` (sampled the same way, with ``sigma = max(exp(s) - 1 + c, 1e-10)``,
   ``c = sqrt(2 / (N + d))``, the Glorot scale); logits are ``dropout(x) . w``, averaged
   over the K samples of a class;
5. ``inner_steps`` gradient steps in the latent space on the support loss (the *sum* of
   the support cross-entropies, as the authors' code differentiates it), each step
   decoding (and, in training, re-sampling) the weights: ``z <- z - alpha * dL/dz`` with
   a learned rate ``alpha`` per latent dimension (init ``inner_lr``; learned as its log);
6. ``finetune_steps`` gradient steps on the decoded weights themselves,
   ``w <- w - eta * dL/dw``, with a learned rate ``eta`` per feature (init ``finetune_lr``; its log);
7. the query loss at the fine-tuned weights, plus ``kl_weight * KL``, plus
   ``encoder_penalty_weight * ||stop_grad(z') - z||^2`` (mean; z' the adapted codes), all
   averaged over the tasks, plus ``l2_penalty_weight * sum ||W||^2 / 2`` over the encoder,
   relation and decoder weights and ``orthogonality_penalty_weight`` times the mean
   squared difference between the correlation matrix of the decoder's rows and the
   identity. The outer loop is differentiated through every inner step (second order).

Written as pure functions of a parameter dict (``torch.func.functional_call`` for the
backbone, ``torch.autograd.grad`` for the inner steps), all tasks of a batch at once
(each task's gradient is that of the sum of the task losses with respect to its own codes).
Dropout and sampling draw from torch's global generator, which the engine seeds and
checkpoints, so runs are reproducible and resume exactly.

Kept from the paper and the authors' code: all of the above, the defaults (their
``config.py``: 64 latents, 5 + 5 steps, inner rate 1, fine-tuning rate 0.001, dropout
0.5, KL 1e-3, encoder penalty 1e-9, L2 1e-8, orthogonality 1e-3), float32 aside.
Differences, stated: the authors clip the meta-gradient by value (0.1) and then by norm (0.1); the engine
clips by norm only (``optim.grad_clip``); their NaN guard (replace a NaN step by the L2
step) is the engine's NaN check, which stops the run. The relation network's last layer
and the decoder start at ``init_scale`` (0.1) of Glorot's range (the authors: 1): their
outputs parametrise the Gaussians, with std ``exp(s) - 1``, and on features of a few dozen
dimensions (conv4's) Glorot's range makes those outputs, hence the sampled codes and
weights, so large that the first latent steps overflow (measured on glyph features: the
training loss stayed near 1e5 with 1, near 1 with 0.1 or 0.3); with 640-d features the
decoder's Glorot range is 3x smaller. The std is also clamped at ``exp(10)`` before use,
so a wild step cannot overflow float32 (the authors compute in float64). The two learned
rates are parametrised by their logs (the authors: the rates themselves), so Adam's steps
of about ``optim.lr`` move them by a factor (learned directly, Adam 1e-3 took the
fine-tuning rate from 0.001 to 0.8 within 800 steps). The relation network and
decoder have no bias, as theirs. The paper clips the meta-gradient (norm 0.1 here:
``optim.grad_clip=0.1``); without it, 5-shot training on conv4 features of Omniglot
diverged after a few hundred steps. Any backbone may sit in front (its output is the
"features"): with ``backbone=identity`` on ``data=features`` it is the paper's setup, with
a trainable backbone the whole network is meta-learned end to end. The decoded classifier
has one row per class of the episode, so any ``ways`` and ``shots`` work at test time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy, task_cross_entropy
from metalearn.data.episodes import TaskBatch
from metalearn.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)
#: the unnormalised std is clamped here before exp, so that a wild inner step cannot overflow float32
MAX_LOG_STD = 10.0


@dataclass
class Config:
    name: str = "leo"
    latent_size: int = 64  # dimension of the latent code of a class
    inner_steps: int = 5  # gradient steps in the latent space
    finetune_steps: int = 5  # gradient steps on the decoded classifier weights
    inner_lr: float = 1.0  # initial value of the learned latent-step rates (one per latent dimension)
    finetune_lr: float = 0.001  # initial value of the learned fine-tuning rates (one per feature)
    dropout: float = 0.5  # on the features, in the encoder and the classifier (meta-training only)
    kl_weight: float = 0.001  # beta: KL(q(z | support) || N(0, I))
    encoder_penalty_weight: float = 1e-9  # gamma: ||stop_grad(adapted z) - z||^2
    l2_penalty_weight: float = 1e-8  # lambda_1: L2 of the encoder, relation network and decoder weights
    orthogonality_penalty_weight: float = 0.001  # lambda_2: decoder rows' correlation matrix vs the identity
    init_scale: float = 0.1  # the relation network's last layer and the decoder start at this fraction of Glorot's range


def sample(params: torch.Tensor, offset: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian parameters [..., 2k] (means, unnormalised std) -> (samples [..., k], KL per task [T]).

    Evaluation returns the means and no KL. The KL is the Monte Carlo estimate at the sample,
    ``mean(log q(z) - log N(z; 0, I))`` over every element of a task (the authors' code).
    """
    mean, raw = params.chunk(2, dim=-1)
    if not training:
        return mean, mean.new_zeros(mean.shape[0])
    std = (raw.clamp_max(MAX_LOG_STD).exp() - (1.0 - offset)).clamp_min(1e-10)
    eps = torch.randn_like(mean)
    z = mean + std * eps
    log_q = -0.5 * eps.square() - std.log() - 0.5 * LOG_2PI
    log_p = -0.5 * z.square() - 0.5 * LOG_2PI
    return z, (log_q - log_p).flatten(1).mean(1)


def class_logits(x: torch.Tensor, weights: torch.Tensor, dropout: float) -> torch.Tensor:
    """Features [T, n, d], weights [T, N, K, d] (K samples per class) -> logits [T, n, N], averaged over K."""
    x = F.dropout(x, dropout, training=dropout > 0)
    return torch.einsum("tnd,tcd->tnc", x, weights.mean(2))


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The *sum* of the cross-entropies of each task's examples: [T, n, N], [T, n] -> [T]."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels).sum(1)


def encode(p: dict, support: torch.Tensor, support_y: torch.Tensor, ways: int, dropout: float) -> torch.Tensor:
    """Support features [T, n, d] -> each class's latent Gaussian parameters [T, N, 2L]."""
    codes = F.dropout(support, dropout, training=dropout > 0) @ p["encoder.weight"].T  # [T, n, L]
    n = codes.shape[1]
    pairs = torch.cat([codes.unsqueeze(2).expand(-1, -1, n, -1), codes.unsqueeze(1).expand(-1, n, -1, -1)], -1)
    h = pairs
    for i in range(3):
        h = h @ p[f"relation.{i}.weight"].T
        if i < 2:
            h = F.relu(h)
    h = h.mean(2)  # over the partners: [T, n, 2L]
    onehot = F.one_hot(support_y, ways).to(h.dtype)  # [T, n, N]
    return onehot.transpose(1, 2) @ h / onehot.sum(1).unsqueeze(-1)  # mean over each class's examples


def regularizers(p: dict, cfg: Config) -> torch.Tensor:
    """lambda_1 * L2 (sum of squares / 2) of the encoder, relation and decoder weights + lambda_2 * orthogonality."""
    weights = [p["encoder.weight"], *(p[f"relation.{i}.weight"] for i in range(3)), p["decoder.weight"]]
    l2 = sum(w.square().sum() for w in weights) / 2
    rows = p["decoder.weight"].T  # [L, 2d]: the authors' [in, out] layout; rows are latent dimensions
    norms = rows.norm(dim=1, keepdim=True) + 1e-32
    correlation = rows @ rows.T / (norms @ norms.T)
    eye = torch.eye(correlation.shape[0], dtype=rows.dtype, device=rows.device)
    return cfg.l2_penalty_weight * l2 + cfg.orthogonality_penalty_weight * (correlation - eye).square().mean()


def _step(x: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """One gradient step; without create_graph the result is a fresh leaf (evaluation)."""
    x = x - lr * grad
    return x if create_graph else x.detach().requires_grad_()


def adapt_and_predict(p: dict, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                      cfg: Config, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LEO on a batch of tasks' features: (query logits [T, m, N], KL [T], encoder penalty [T]).

    ``training``: sampling, dropout and a differentiable (second-order) inner loop; otherwise the
    means, no dropout, and inner steps that leave no graph (call it under ``torch.enable_grad``).
    """
    T, n, d = support.shape
    shots = n // ways
    dropout = cfg.dropout if training else 0.0
    class_params = encode(p, support, support_y, ways, dropout)  # [T, N, 2L]
    tiled = class_params.unsqueeze(2).expand(-1, -1, shots, -1)  # one sample per support example of the class
    z0, kl = sample(tiled, 0.0, training)
    weight_offset = math.sqrt(2.0 / (ways + d))  # the Glorot scale of a [d -> N] layer

    def decode(z: torch.Tensor) -> torch.Tensor:
        return sample(z @ p["decoder.weight"].T, weight_offset, training)[0]  # [T, N, K, d]

    def support_loss(w: torch.Tensor) -> torch.Tensor:
        return summed_cross_entropy(class_logits(support, w, dropout), support_y).sum()  # each task's own gradient

    z = z0 if training else z0.detach().requires_grad_()
    for _ in range(cfg.inner_steps):  # in the latent space, decoding (and sampling) the weights at each step
        (grad,) = torch.autograd.grad(support_loss(decode(z)), z, create_graph=training)
        z = _step(z, grad, p["log_inner_lr"].exp(), training)
    penalty = (z.detach() - z0).square().flatten(1).mean(1) if training else kl.new_zeros(T)
    w = decode(z)
    w = w if training else w.detach().requires_grad_()
    for _ in range(cfg.finetune_steps):  # on the decoded weights
        (grad,) = torch.autograd.grad(support_loss(w), w, create_graph=training)
        w = _step(w, grad, p["log_finetune_lr"].exp(), training)
    return class_logits(query, w, dropout), kl, penalty


class LEO(Algorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info: ProblemInfo):
        super().__init__()
        _check(cfg)
        self.cfg, self.backbone = cfg, backbone
        d, L = backbone.out_features, cfg.latent_size
        self.encoder = nn.Linear(d, L, bias=False)
        self.relation = nn.ModuleList([nn.Linear(2 * L, 2 * L, bias=False) for _ in range(3)])
        self.decoder = nn.Linear(L, 2 * d, bias=False)
        with torch.no_grad():
            for layer in [self.encoder, *self.relation, self.decoder]:
                nn.init.xavier_uniform_(layer.weight)  # Glorot, as the authors
            for layer in [self.relation[2], self.decoder]:  # they output the Gaussians' parameters
                layer.weight.mul_(cfg.init_scale)
        # The rates are learned in log space: an outer step changes them by a factor, whatever their scale
        # (learned directly, Adam's ~1e-3 steps took the 0.001 fine-tuning rate to 0.8 in 800 steps).
        self.log_inner_lr = nn.Parameter(torch.full((L,), math.log(cfg.inner_lr)))
        self.log_finetune_lr = nn.Parameter(torch.full((d,), math.log(cfg.finetune_lr)))

    def check_episode(self, ways: int, shots: int, queries: int) -> None:
        """Any shape: the decoder makes one classifier row per class of the episode."""

    def _forward(self, p: dict, batch: TaskBatch, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone = {k.removeprefix("backbone."): v for k, v in p.items() if k.startswith("backbone.")}
        support = functional_call(self.backbone, backbone, (batch.support_x,))
        query = functional_call(self.backbone, backbone, (batch.query_x,))
        return adapt_and_predict(p, support, batch.support_y, query, batch.ways, self.cfg, training)

    def meta_step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        p = dict(self.named_parameters())
        logits, kl, penalty = self._forward(p, batch, training=True)
        query_loss = task_cross_entropy(logits, batch.query_y)
        cfg = self.cfg
        loss = (query_loss + cfg.kl_weight * kl + cfg.encoder_penalty_weight * penalty).mean() + regularizers(p, cfg)
        loss.backward()
        return {"loss": query_loss.detach(), "accuracy": accuracy(logits.detach(), batch.query_y)}

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        p = {k: v.detach() for k, v in self.named_parameters()}
        with torch.enable_grad():
            logits, _, _ = self._forward(p, batch, training=False)
        logits = logits.detach()
        return {"loss": task_cross_entropy(logits, batch.query_y), "accuracy": accuracy(logits, batch.query_y)}


def _check(cfg: Config) -> None:
    if cfg.latent_size < 1:
        raise ConfigError(f"algo.latent_size must be >= 1 (got {cfg.latent_size})")
    if cfg.inner_steps < 0 or cfg.finetune_steps < 0:
        raise ConfigError("algo.inner_steps and algo.finetune_steps must be >= 0")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"algo.dropout must be in [0, 1) (got {cfg.dropout})")
    if not (cfg.inner_lr > 0 and cfg.finetune_lr > 0):
        raise ConfigError(f"algo.inner_lr and algo.finetune_lr must be > 0 (got {cfg.inner_lr}, {cfg.finetune_lr})")
    if not cfg.init_scale > 0:
        raise ConfigError(f"algo.init_scale must be > 0 (got {cfg.init_scale})")
    for key in ("kl_weight", "encoder_penalty_weight", "l2_penalty_weight", "orthogonality_penalty_weight"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"algo.{key} must be >= 0 (got {getattr(cfg, key)})")


def build(cfg: Config, backbone: nn.Module, info: ProblemInfo) -> LEO:
    return LEO(cfg, backbone, info)
