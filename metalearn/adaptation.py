"""Test-time options of ``metalearn eval``: fine-tuning on the support set, test-time augmentation, ensembles.

Each is off by default, deterministic for the eval seed (local generators only: the global RNG is never
drawn from) and independent of ``batch_size``: every episode is adapted and scored on its own.

* ``finetune.steps=N`` (0: off): a new head, ``finetune.head=linear`` with ProtoNet's prototypes as weights
  (``w_c = 2 mu_c``, ``b_c = -|mu_c|^2``: the prototype classifier exactly, as in Triantafillou et al. 2020's
  Proto-MAML) or ``cosine`` (``scale * cos(x, mu_c)``), is fitted to the episode's support set by N full-batch
  Adam steps of ``finetune.lr`` on its cross-entropy, with ``finetune.part``: ``head`` (backbone frozen),
  ``last`` (the backbone's last block too) or ``all`` (the whole backbone). The queries are then classified by
  the head. Every episode starts from the trained weights (copies are fitted; the run is never changed). The
  backbone is the algorithm's ``backbone`` or ``net.0`` (the MAML family), as ``init_from`` finds it; its last
  block is the highest index of its module lists (conv4: ``convs.3`` and ``norms.3``; resnet12: ``blocks.3``;
  mlp: the last layer). Refused, in one line, for regression and for sequence learners (SNAIL, MANN:
  ``Algorithm.per_example_features``), whose prediction is no head on per-example features.
* ``tta.views=V`` (1: off): each episode is also scored in V-1 augmented versions (its support and query
  images alike) and the class probabilities of its queries are averaged over the V views
  (``tta.mode=probs``). ``tta.augment``: ``crop_flip`` (a random crop of the image zero-padded by a tenth of
  its size, and a horizontal flip: natural images), ``affine`` (small random rotations, shears, scalings and
  shifts, Koch et al.'s distortions at a smaller range: characters), ``auto`` (crop_flip for 3 channels,
  affine otherwise). The ops are metalearn/data/transforms.py's; each episode's views come from a generator
  seeded by the eval seed and the episode's index, so every run of an ensemble sees the same views.
* ``run=[A,B,C]`` (or ``run=A,B,C`` without ``-m``): an ensemble. The members' class probabilities on the
  same episodes (each member's inputs normalised as its own run's were) are averaged.

The class probabilities of an algorithm are the scores its ``evaluate`` hands to ``accuracy`` for the
queries (``base.recorded_scores``), through a softmax, or normalised where the algorithm says they are
non-negative scores (``Algorithm.query_scores``): what decides its reported accuracy decides here too. With
any of these options the metrics are ``accuracy`` and ``loss`` (the negative log of the averaged probability
of the true class); an algorithm's own extra metrics are not reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import Algorithm, ProblemInfo, accuracy, recorded_scores, task_cross_entropy
from metalearn.algorithms.baseline import head_logits
from metalearn.algorithms.protonet import class_means
from metalearn.data.episodes import TaskBatch
from metalearn.data.transforms import AffineConfig, AugmentConfig, EpisodeTransform
from metalearn.errors import ConfigError

PARTS = ("head", "last", "all")
HEADS = ("linear", "cosine")
AUGMENTS = ("auto", "crop_flip", "affine")
MODES = ("probs",)
#: The log of a probability is clamped at this before the loss (a probability of 0 after averaging).
_LOG_FLOOR = 1e-12
_HEAD = "<head>."  # the head's entries among the fitted backbone weights


@dataclass(frozen=True)
class Finetune:
    steps: int = 0
    lr: float = 1e-3
    part: str = "head"
    head: str = "linear"
    scale: float = 10.0


@dataclass(frozen=True)
class TTA:
    views: int = 1
    mode: str = "probs"
    augment: str = "auto"


@dataclass(frozen=True)
class Options:
    finetune: Finetune = Finetune()
    tta: TTA = TTA()

    @property
    def active(self) -> bool:
        return self.finetune.steps > 0 or self.tta.views > 1

    def record(self) -> dict:
        """What the results file says of the options that are on."""
        out: dict[str, Any] = {}
        if self.finetune.steps > 0:
            out["finetune"] = dataclasses.asdict(self.finetune)
        if self.tta.views > 1:
            out["tta"] = dataclasses.asdict(self.tta)
        return out

    def tag(self) -> list[str]:
        """Parts of the results file name, so options never overwrite plain results (nor each other)."""
        parts = []
        f = self.finetune
        if f.steps > 0:
            scale = f"x{f.scale:g}" if f.head == "cosine" else ""
            parts.append(f"ft-{f.part}-{f.head}{scale}-{f.steps}st-lr{f.lr:g}")
        if self.tta.views > 1:
            parts.append(f"tta{self.tta.views}-{self.tta.augment}")
        return parts

    def describe(self) -> str:
        f, t = self.finetune, self.tta
        said = []
        if f.steps > 0:
            said.append(f"fine-tuned ({f.part}, {f.head} head, {f.steps} steps, lr {f.lr:g})")
        if t.views > 1:
            said.append(f"{t.views} views ({t.augment})")
        return ", ".join(said) or "plain"


def options(cfg: Any) -> Options:
    """The ``finetune`` and ``tta`` keys of the eval config, checked: a mistake is one line."""
    f = cfg.get("finetune") or {}
    t = cfg.get("tta") or {}
    for key, value, example in (("finetune", f, "finetune.steps=50"), ("tta", t, "tta.views=4")):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value} sets no option; {key} is a group of keys: {example}")
    unknown = [f"finetune.{k}" for k in f if k not in Finetune.__dataclass_fields__] + \
              [f"tta.{k}" for k in t if k not in TTA.__dataclass_fields__]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not an eval option; finetune takes {', '.join(Finetune.__dataclass_fields__)}"
                          f" and tta takes {', '.join(TTA.__dataclass_fields__)}")
    fine = Finetune(**{k: v for k, v in f.items()})
    tta = TTA(**{k: v for k, v in t.items()})
    if not isinstance(fine.steps, int) or isinstance(fine.steps, bool) or fine.steps < 0:
        raise ConfigError(f"finetune.steps must be an integer >= 0 (0: off; got {fine.steps})")
    if not isinstance(fine.lr, (int, float)) or not fine.lr > 0:
        raise ConfigError(f"finetune.lr must be > 0 (got {fine.lr})")
    if fine.part not in PARTS:
        raise ConfigError(f"finetune.part={fine.part!r} is not one of: {', '.join(PARTS)}")
    if fine.head not in HEADS:
        raise ConfigError(f"finetune.head={fine.head!r} is not one of: {', '.join(HEADS)}")
    if not isinstance(fine.scale, (int, float)) or not fine.scale > 0:
        raise ConfigError(f"finetune.scale must be > 0 (got {fine.scale})")
    if not isinstance(tta.views, int) or isinstance(tta.views, bool) or tta.views < 1:
        raise ConfigError(f"tta.views must be an integer >= 1 (1: off; got {tta.views})")
    if tta.mode not in MODES:
        raise ConfigError(f"tta.mode={tta.mode!r} is not one of: {', '.join(MODES)} (the class probabilities are "
                          "averaged over the views, which works for every algorithm)")
    if tta.augment not in AUGMENTS:
        raise ConfigError(f"tta.augment={tta.augment!r} is not one of: {', '.join(AUGMENTS)}")
    return Options(dataclasses.replace(fine, lr=float(fine.lr), scale=float(fine.scale)), tta)


# ---------------------------------------------------------------- what an algorithm offers


def backbone_of(algo: nn.Module) -> nn.Module | None:
    """The algorithm's feature extractor: ``backbone``, or ``net.0`` (the MAML family), as ``init_from`` finds it."""
    from metalearn.engine import _BACKBONE_PREFIXES

    for prefix in _BACKBONE_PREFIXES:
        try:
            return algo.get_submodule(prefix.rstrip("."))
        except AttributeError:
            continue
    return None


def trained_names(backbone: nn.Module, part: str) -> list[str]:
    """The backbone parameters that ``finetune.part`` fits: none (head), the last block's (last), all of them."""
    names = [k for k, p in backbone.named_parameters() if p.requires_grad]
    if part == "head":
        return []
    if part == "all":
        return names
    index = {k: next((int(w) for w in k.split(".") if w.isdigit()), None) for k in names}
    last = max((i for i in index.values() if i is not None), default=None)
    return names if last is None else [k for k in names if index[k] == last]


def check_member(algo: Algorithm, info: ProblemInfo, name: str, opts: Options, ensemble: bool) -> None:
    """One line if ``algo`` (``algo=name``) cannot take the options (or be an ensemble's member)."""
    what = "finetune.*" if opts.finetune.steps > 0 else "tta.views" if opts.tta.views > 1 else "an ensemble"
    if (opts.active or ensemble) and info.task != "classification":
        raise ConfigError(f"{what} works on class probabilities, and algo={name} learned {info.task} tasks; "
                          "evaluate it without them")
    if opts.finetune.steps > 0:
        backbone = backbone_of(algo)
        if backbone is None:
            raise ConfigError(f"finetune.steps: algo={name} has no backbone (backbone or net.0) to fit a head on; "
                              "evaluate it without finetune")
        if not getattr(algo, "per_example_features", True):
            raise ConfigError(f"finetune.steps: algo={name} reads an episode as a sequence, so no head on its "
                              "backbone's features stands for it; evaluate it without finetune")
        if opts.finetune.part != "head" and not trained_names(backbone, opts.finetune.part):
            raise ConfigError(f"finetune.part={opts.finetune.part}: the backbone of algo={name} has no weights to "
                              "fine-tune; use finetune.part=head")
    if opts.tta.views > 1 and len(info.input_shape) != 3:
        raise ConfigError(f"tta.views augments images, and this run's inputs are vectors of size "
                          f"{info.input_shape[0]}; use tta.views=1")


# ---------------------------------------------------------------- predictions


def algorithm_probabilities(algo: Algorithm, batch: TaskBatch) -> torch.Tensor:
    """Class probabilities of every query [B, n_q, ways]: the scores ``algo.evaluate`` decides its queries by."""
    with recorded_scores() as calls:
        algo.evaluate(batch)
    qy = batch.query_y
    total, base, where = qy.numel(), qy.storage_offset(), qy.untyped_storage().data_ptr()
    scores, covered = None, torch.zeros(total, dtype=torch.bool)
    for s, labels in calls:  # the calls whose labels are (a slice of) the queries' own labels
        if labels.untyped_storage().data_ptr() != where or not labels.is_contiguous():
            continue
        start, count = labels.storage_offset() - base, labels.numel()
        if start < 0 or start + count > total or s.shape[:-1] != labels.shape:
            continue
        if scores is None:
            scores = s.new_zeros(total, s.shape[-1], dtype=torch.float32)
        scores[start:start + count] = s.reshape(count, -1).float()
        covered[start:start + count] = True
    if scores is None or not bool(covered.all()):
        raise ConfigError(f"{type(algo).__name__} does not score its queries through metalearn.algorithms.base.accuracy, "
                          "so its class probabilities cannot be read for tta.views or an ensemble; evaluate it without them")
    scores = scores.view(*qy.shape, -1)
    if getattr(algo, "query_scores", "logits") == "logits":
        return scores.softmax(-1)
    scores = scores.clamp_min(0)
    sums = scores.sum(-1, keepdim=True)
    return torch.where(sums > 0, scores / sums.clamp_min(_LOG_FLOOR), torch.full_like(scores, 1 / scores.shape[-1]))


def prototype_head(kind: str, support: torch.Tensor, labels: torch.Tensor, ways: int) -> dict[str, torch.Tensor]:
    """A head [..., ways, F] from the support prototypes: linear, the prototype classifier (-|x - mu|^2 + |x|^2);
    cosine, the prototypes as class weights."""
    prototypes = class_means(support, labels, ways)
    if kind == "linear":
        return {"weight": 2 * prototypes, "bias": -prototypes.pow(2).sum(-1)}
    return {"weight": prototypes}


def _fit(params: dict[str, torch.Tensor], loss_of, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """``steps`` Adam steps (``torch.optim.Adam``'s rule and defaults, written out: constructing a torch optimizer
    imports torch._dynamo, 1.7 s at the first episode) on ``loss_of(params)``; the fitted copies, detached."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    params = {k: v.detach() for k, v in params.items()}
    first = {k: torch.zeros_like(v) for k, v in params.items()}
    second = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(1, steps + 1):
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(leaves), list(leaves.values()))
        with torch.no_grad():
            for (k, p), g in zip(leaves.items(), grads):
                first[k] = beta1 * first[k] + (1 - beta1) * g
                second[k] = beta2 * second[k] + (1 - beta2) * g * g
                denominator = (second[k] / (1 - beta2**step)).sqrt() + eps
                params[k] = p - lr / (1 - beta1**step) * first[k] / denominator
    return params


def finetuned_probabilities(backbone: nn.Module, batch: TaskBatch, f: Finetune) -> torch.Tensor:
    """Class probabilities of every query [B, n_q, ways] from a head fitted to each episode's support set."""
    ways, sy = batch.ways, batch.support_y
    names = trained_names(backbone, f.part)
    if not names:  # the backbone frozen: every episode's head is fitted at once (the losses summed)
        with torch.no_grad():
            support, query = backbone(batch.support_x).float(), backbone(batch.query_x).float()
        start = prototype_head(f.head, support, sy, ways)
        head = _fit(start, lambda p: task_cross_entropy(head_logits(f.head, p, support, f.scale), sy).sum(),
                    f.steps, f.lr)
        with torch.no_grad():
            return head_logits(f.head, head, query, f.scale).softmax(-1)
    weights = {k: p.detach() for k, p in backbone.named_parameters()}

    def parts(p: dict) -> tuple[dict, dict]:  # (the backbone's weights with the fitted ones, the head)
        return {**weights, **{k: p[k] for k in names}}, {k.removeprefix(_HEAD): v for k, v in p.items() if k.startswith(_HEAD)}

    out = []
    for t in range(batch.num_tasks):  # each episode from the trained weights
        sx, y = batch.support_x[t], sy[t:t + 1]
        with torch.no_grad():
            start = prototype_head(f.head, backbone(sx).float()[None], y, ways)

        def loss_of(p: dict, sx=sx, y=y) -> torch.Tensor:
            body, head = parts(p)
            return task_cross_entropy(head_logits(f.head, head, functional_call(backbone, body, (sx,)).float()[None],
                                                  f.scale), y).sum()

        body, head = parts(_fit({**{k: weights[k] for k in names}, **{_HEAD + k: v for k, v in start.items()}},
                                loss_of, f.steps, f.lr))
        with torch.no_grad():
            features = functional_call(backbone, body, (batch.query_x[t],)).float()[None]
            out.append(head_logits(f.head, head, features, f.scale).softmax(-1)[0])
    return torch.stack(out)


# ---------------------------------------------------------------- views and members


def augment_config(kind: str, input_shape: tuple[int, ...]) -> AugmentConfig:
    """The augmentation of ``tta.augment`` for images of ``input_shape`` (C, H, W)."""
    c, h, _ = input_shape
    if kind == "auto":
        kind = "crop_flip" if c == 3 else "affine"
    if kind == "crop_flip":
        return AugmentConfig(enabled=True, crop_padding=max(1, round(h / 10)), flip=True, color_jitter=0.0)
    return AugmentConfig(enabled=True, crop_padding=0, flip=False, color_jitter=0.0,
                         affine=AffineConfig(rotation=10.0, shear=0.1, scale=0.1, translate=h / 28, probability=0.5))


def view_seed(seed: int, episode: int) -> int:
    """The seed of an episode's augmented views: the eval seed and the episode's index."""
    return (seed * 1_000_003 + episode) % 2**63


@dataclass
class Member:
    """One run of an ensemble (or the run): its algorithm, its input normalisation, what the results say of it."""

    algo: Algorithm
    transform: Any  # the run's evaluation input transform (EpisodeTransform) or None: scale to [0, 1]
    record: dict  # checkpoint, algo, data


class Scorer(Algorithm):
    """The options as an Algorithm the engine's evaluation runs: episodes come in as sampled (uint8 images, the
    store's transform set to ``as_stored``), and each member gets its own inputs, views and predictions. The engine
    loads the run's checkpoint into it: that goes to the first member."""

    def __init__(self, members: list[Member], opts: Options, seed: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.members = nn.ModuleList(m.algo for m in members)
        self.transforms = [_transforms(m.transform, opts, input_shape) for m in members]
        self.opts, self.seed, self.episodes = opts, seed, 0

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        return self.members[0].load_state_dict(state, strict=strict, assign=assign)

    def evaluate(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        first, self.episodes = self.episodes, self.episodes + batch.num_tasks
        probs = torch.stack([self._probabilities(algo, plain, augmented, batch, first)
                             for algo, (plain, augmented) in zip(self.members, self.transforms)]).mean(0)
        qy = batch.query_y
        loss = -probs.gather(-1, qy.unsqueeze(-1)).squeeze(-1).clamp_min(_LOG_FLOOR).log().mean(1)
        return {"loss": loss, "accuracy": accuracy(probs, qy)}

    def _probabilities(self, algo: Algorithm, plain, augmented, batch: TaskBatch, first: int) -> torch.Tensor:
        views = self.opts.tta.views
        inputs = _views(batch, plain, augmented, views, self.seed, first)
        if self.opts.finetune.steps > 0:
            probs = finetuned_probabilities(backbone_of(algo), inputs, self.opts.finetune)
        else:
            probs = algorithm_probabilities(algo, inputs)
        return probs.view(batch.num_tasks, views, *probs.shape[1:]).mean(1)


def as_stored(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The store's transform under ``Scorer``: episodes as stored (the members transform them)."""
    return images


def _transforms(transform: Any, opts: Options, input_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A member's (plain, augmenting) input transforms: its own scaling and normalisation, then with the views'."""
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    plain = EpisodeTransform(mean, std)
    if opts.tta.views == 1:
        return plain, None
    return plain, EpisodeTransform(mean, std, augment_config(opts.tta.augment, input_shape))


def _views(batch: TaskBatch, plain, augmented, views: int, seed: int, first: int) -> TaskBatch:
    """Each task then its ``views - 1`` augmented versions, as one batch of tasks (task-major), transformed."""
    def scaled(x: torch.Tensor, transform, generator) -> torch.Tensor:
        return x if x.is_floating_point() else transform(x, generator)  # feature vectors are the input as they are

    if views == 1:
        return dataclasses.replace(batch, support_x=scaled(batch.support_x, plain, None),
                                   query_x=scaled(batch.query_x, plain, None))
    support, query = [], []
    for t in range(batch.num_tasks):
        g = torch.Generator(device=batch.support_x.device).manual_seed(view_seed(seed, first + t))
        for v in range(views):
            transform = plain if v == 0 else augmented
            support.append(transform(batch.support_x[t], g))
            query.append(transform(batch.query_x[t], g))
    return TaskBatch(torch.stack(support), batch.support_y.repeat_interleave(views, 0), torch.stack(query),
                     batch.query_y.repeat_interleave(views, 0), batch.classes.repeat_interleave(views, 0))
