"""Typed, validated run configuration.

Hydra composes ``conf/config.yaml`` and its groups into a DictConfig; this
module turns it into dataclasses and rejects anything unknown or mistyped
with a one-line ConfigError. The schema of each group option (``algo``,
``data``, ``backbone``) is the ``Config`` dataclass of the module that
implements it, so an option exists exactly when the code reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from metalearn import plugins
from metalearn.renamed import check_renamed
from metalearn.errors import ConfigError


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    data_on_device: bool = True  # keep the dataset on the accelerator and sample episodes there
    # fp32 | bf16: meta-steps and evaluation under bfloat16 autocast (convolutions and matmuls in bf16;
    # the meta-parameters, the optimizer and the losses stay float32) | auto: bf16 on a GPU that has it, else fp32
    precision: str = "fp32"
    # exact | fast: conv4's BatchNorm when it runs a task at a time channels-last on CPU. exact: statistics
    # summed as exactly as NCHW's (float32 meta-gradients as near float64 as the plain NCHW ops'); fast:
    # PyTorch's channels-last kernel, one float32 pass (README, Speed: 300x the rounding, little faster)
    cpu_kernels: str = "exact"
    # torch.compile the backbone's forward (conv4/resnet12: per task on CPU) for algorithms whose meta-step does
    # not differentiate through the backbone's backward (first order, metric, solver heads). Off: on this
    # project's CPUs it was slower (README, Speed), and its first steps wait for the compiler
    compile: bool = False


@dataclass
class EvalConfig:
    """Episode shape of validation and test; defaults to the training shape."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    batch_size: int = 32  # tasks evaluated together (does not change results)
    within_group: bool = False  # every episode's classes from one group (an Omniglot alphabet): see RunConfig


@dataclass
class TrainerConfig:
    log_every: int = 50  # steps between train/* scalars (and NaN checks)
    val_every: int = 500
    val_episodes: int = 600
    test_episodes: int = 600
    ckpt_every: int = 500
    eval_seed: int = 0  # validation and test episodes are fixed by this, the same for every run
    progress: bool = True  # progress bar (only on a terminal)
    stop_at: Optional[int] = None  # end this invocation after this step, with a checkpoint to resume from


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd | any torch.optim optimizer by its lower-case name (adamw, rmsprop, ...)
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "constant"  # constant | cosine | linear (to 0 at the last step) | step
    decay_every: int = 10000  # step scheduler
    decay_gamma: float = 0.5  # step scheduler
    grad_clip: Optional[float] = None  # max global norm of the meta-gradient
    # learning-rate factors of parts of the algorithm, by parameter-name prefix (module path): {set_function: 10}
    # trains FEAT's set function at 10x optim.lr (its official lr_mul); the rest at optim.lr. Schedules scale all.
    lr_multipliers: Optional[dict[str, float]] = None  # null: every parameter at optim.lr
    # Any optimizer / scheduler class (torch's or your own) by Hydra's _target_ convention, instantiated with
    # the meta-parameters (lr: optim.lr unless given) / the optimizer; they replace name / scheduler.
    optimizer: Optional[dict[str, Any]] = None  # {_target_: torch.optim.AdamW, betas: [0.9, 0.99]}
    lr_scheduler: Optional[dict[str, Any]] = None  # {_target_: torch.optim.lr_scheduler.OneCycleLR, max_lr: 0.01, total_steps: ${steps}}


@dataclass
class PaperConfig:
    """The published figure a preset (``conf/experiment/``) is compared with by ``metalearn reproduce``.

    A description of the preset, not a hyper-parameter: ``to_run_config`` checks it and leaves it out
    of the RunConfig, so it is in no checkpoint config, no TensorBoard HParams entry and no
    configuration identity (``metalearn report`` treats ``paper.*`` as run-local).
    """

    metric: str = "accuracy"  # the test metric of results.json compared: accuracy | mse | mse_step<k>
    value: Optional[float] = None  # the paper's figure in that metric's unit (accuracy: a fraction, 0.987); null: none
    ci95: Optional[float] = None  # its 95% CI half-width, same unit; null: the paper prints none, or a +- that is not one
    source: str = ""  # authors year, venue, table or figure
    protocol: str = ""  # the paper's benchmark protocol, in words
    note: str = ""  # what a reader must know: what a printed +- measures, why value is null


@dataclass
class RunConfig:
    algo: Any = None
    data: Any = None
    backbone: Any = None
    device: DeviceConfig = field(default_factory=DeviceConfig)
    ways: int = 5
    shots: int = 1
    queries: int = 15  # per class
    # every training episode's classes from one group: an Omniglot alphabet, imagefolder's first folder level, a
    # superclass (hierarchical episodes; Lake et al.'s within-alphabet protocol); groups smaller than ways are skipped
    within_group: bool = False
    meta_batch_size: int = 32
    steps: int = 60000
    seed: int = 0
    resume: Optional[str] = None
    # a run directory (its best.pt) or checkpoint file whose backbone weights this run starts from (pre-train, then
    # meta-train: e.g. a baseline run's backbone under protonet); recorded in this run's config and checkpoints
    init_from: Optional[str] = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


GROUPS = ("algo", "data", "backbone")


def _typed(schema: type, node: Any, where: str) -> Any:
    """Merge ``node`` into the dataclass ``schema``; unknown keys and bad types become ConfigErrors
    (a dataset's key replaced by the split vocabulary: the line naming its new key)."""
    check_renamed(schema, node, where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = ".".join(k for k in (where, str(getattr(e, "full_key", "") or getattr(e, "key", "") or "")) if k)
        if isinstance(e, ConfigKeyError):
            node, parent = schema, key.split(".")[1 if where else 0:-1]
            for part in parent:  # the nested dataclass that lacks the key, e.g. TrainerConfig
                node = {f.name: f.type for f in dataclasses.fields(node)}.get(part, node)
                node = globals().get(node, node) if isinstance(node, str) else node
            valid = ", ".join(f.name for f in dataclasses.fields(node) if f.name != "name")
            owner = ".".join(filter(None, [where, *parent])) or "the run"
            raise ConfigError(f"unknown option {key}; the options of {owner} are: {valid}") from None
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for {key}: {msg}") from None


def typed_group(group: str, node: dict) -> Any:
    """The typed config of one group option (``algo``, ``data``, ``backbone``): its implementation's ``Config``
    (built-in, installed or the user's module: metalearn/plugins.py), validated."""
    plugins.check_node(group, node)
    plugins.check_object_node(group, node)
    name = str(node["name"])
    path = plugins.source(group, name, node.get("module"))
    if plugins.is_builtin(group, name, path):
        node = {k: v for k, v in node.items() if k != "module"}
    return _typed(plugins.schema(group, name, path), node, group)


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed config (or a saved one) and return it typed."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the config: {str(e).splitlines()[0]}") from None
    container.pop("hydra", None)
    paper = container.pop("paper", None)
    if paper is not None:  # checked here (a typo fails before any work), then left out: see PaperConfig
        check_paper(_typed(PaperConfig, paper, "paper"))
    groups = {}
    for group in GROUPS:
        node = container.pop(group, None)
        if isinstance(node, dict) and "name" not in node:
            plugins.check_node(group, node)  # a plug-in's YAML without name: the line that says so
        if not isinstance(node, dict) or "name" not in node:
            raise ConfigError(f"no {group} chosen; pick one with {group}=<{'|'.join(plugins.names(group))}>")
        groups[group] = typed_group(group, node)
    run = _typed(RunConfig, container, "")
    for group, value in groups.items():
        setattr(run, group, value)
    check(run)
    return run


def check(run: RunConfig) -> None:
    """Checks across keys that types alone cannot express."""
    positive = {
        "ways": run.ways, "shots": run.shots, "queries": run.queries, "meta_batch_size": run.meta_batch_size,
        "steps": run.steps, "eval.ways": run.eval.ways, "eval.shots": run.eval.shots,
        "eval.queries": run.eval.queries, "eval.batch_size": run.eval.batch_size,
        "trainer.log_every": run.trainer.log_every, "trainer.val_every": run.trainer.val_every,
        "trainer.val_episodes": run.trainer.val_episodes, "trainer.test_episodes": run.trainer.test_episodes,
        "trainer.ckpt_every": run.trainer.ckpt_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1 (got {value})")
    if run.optim.optimizer is None and run.optim.name not in optimizer_names():
        raise ConfigError(f"optim.name={run.optim.name!r} is not one of: {', '.join(optimizer_names())} "
                          "(or give any class as optim.optimizer={_target_:<module.Class>})")
    if run.optim.lr_scheduler is None and run.optim.scheduler not in ("constant", "cosine", "linear", "step"):
        raise ConfigError(f"optim.scheduler={run.optim.scheduler!r} is not one of: constant, cosine, linear, step "
                          "(or give any class as optim.lr_scheduler={_target_:<module.Class>})")
    for key in ("optimizer", "lr_scheduler"):
        target_class(getattr(run.optim, key), f"optim.{key}")
    for prefix, factor in (run.optim.lr_multipliers or {}).items():
        if not 0 < factor < math.inf:
            raise ConfigError(f"optim.lr_multipliers.{prefix} must be a positive factor (got {factor})")
    if not 0 < run.optim.lr < 1e30:  # also rejects nan and inf; above float32's range it cannot even be applied
        raise ConfigError(f"optim.lr must be a positive number below 1e30 (got {run.optim.lr})")
    if run.trainer.stop_at is not None and run.trainer.stop_at < 1:
        raise ConfigError(f"trainer.stop_at must be >= 1 (got {run.trainer.stop_at})")


def optimizer_names() -> list[str]:
    """The short names of optim.name (adam, sgd, adamw ...)."""
    return sorted(optimizer_classes())


def optimizer_classes() -> dict[str, type]:
    """optim.name -> class: every torch.optim optimizer the trainer can drive as it drives Adam, built from
    (params, lr, weight_decay), stepped without a closure, on parameters of any shape (not LBFGS, SparseAdam,
    Muon: give those by optim.optimizer._target_)."""
    import inspect

    import torch

    return {n.lower(): c for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
            and "weight_decay" in inspect.signature(c).parameters and n.lower() not in ("lbfgs", "sparseadam", "muon")}


def target_class(node: dict | None, where: str) -> Any:
    """The class a ``{_target_: module.Class, ...}`` node names (None for None), or a one-line ConfigError."""
    if node is None:
        return None
    target = node.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where} needs _target_: <module.Class> (e.g. {where}._target_=torch.optim.AdamW)")
    import logging

    from hydra.utils import get_object

    quiet = logging.getLogger("hydra.utils")
    level, quiet.disabled = quiet.disabled, True  # get_object logs its error before raising it: one line here
    try:
        found = get_object(target)
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError ...: the target cannot be found
        why = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"{where}._target_={target} cannot be imported ({why[-1] if why else type(e).__name__}); "
                          "give an importable module.Class") from None
    finally:
        quiet.disabled = level
    if not callable(found):
        raise ConfigError(f"{where}._target_={target} is not a class or function")
    return found


def paper_config(cfg: DictConfig | dict) -> PaperConfig | None:
    """The checked ``paper:`` section of a composed config, or None if it has none."""
    node = cfg.get("paper") if isinstance(cfg, (dict, DictConfig)) else None
    if node is None:
        return None
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    paper = _typed(PaperConfig, node, "paper")
    check_paper(paper)
    return paper


def check_paper(paper: PaperConfig) -> None:
    for key in ("value", "ci95"):
        value = getattr(paper, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"paper.{key} must be a number >= 0 or null (got {value})")
    if paper.metric == "accuracy" and paper.value is not None and paper.value > 1:
        raise ConfigError(f"paper.value={paper.value} is a percentage; write accuracy as a fraction "
                          f"({paper.value / 100:g}), as results.json reports it (and paper.ci95 likewise)")
    if paper.ci95 is not None and paper.value is None:
        raise ConfigError("paper.ci95 is set but paper.value is null; give the figure too, or neither")


def to_dict(run: RunConfig) -> dict:
    """Plain nested dict (safe for checkpoints, JSON and ``to_run_config``)."""
    return dataclasses.asdict(run)


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'algo': {'inner_lr': 0.4}} -> {'algo.inner_lr': 0.4}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
