"""The one training loop, for every algorithm.

sample episodes -> ``algo.meta_step`` -> clip / optimizer / scheduler -> log
-> validate -> checkpoint -> (resume) ... -> test with the best checkpoint.

Metrics stay on the device between log steps, so an accelerator is never
made to wait for the host inside the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
import traceback
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from metalearn import __version__, checkpoint, distributed, faults, plugins
from metalearn.algorithms import ALGORITHMS, Algorithm, ProblemInfo, algorithm_module
from metalearn.config import RunConfig, flat, to_dict
from metalearn.data import ClassStore, TaskBatch, load_splits
from metalearn.data.common import episode_transforms
from metalearn.data.transforms import EpisodeTransform
from metalearn.errors import CheckpointError, ConfigError, MetalearnError, TrainingError
from metalearn.fileio import atomic_write_json
from metalearn.models import backbone_module, ops
from metalearn.models.tasks import TaskwiseBackbone
from metalearn.seeding import seed_everything
from metalearn.tracking import NoTensorBoard, TensorBoard, hparam_metrics

log = logging.getLogger("metalearn")


# ---------------------------------------------------------------- building blocks


def resolve_device(kind: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(kind)
    except RuntimeError:
        raise ConfigError(f"device.type={kind!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this torch sees no CUDA GPU; use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available here; use device=auto or device=cpu")
    return device


PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, Linux's /proc/cpuinfo flags). Without
    them oneDNN emulates it: a conv4 convolution took 239 ms in bf16 against 10 ms in fp32 on an AVX2 machine."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_WARNED: set[str] = set()


def autocast(device: torch.device, precision: str):
    """The context meta-steps and evaluations run in: plain float32, or bfloat16 autocast. ``auto``: bfloat16 on a
    GPU that supports it, float32 elsewhere (a CPU without native bfloat16 is many times slower in it)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"device.precision={precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16_cpu() and "cpu" not in _WARNED:
        _WARNED.add("cpu")
        log.warning("device.precision=bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it is emulated, "
                    "many times slower than fp32; device.precision=fp32 (or auto) is faster here")
    try:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    except RuntimeError as e:  # e.g. a GPU without bfloat16 (before Ampere)
        raise ConfigError(f"device.precision=bf16 is not supported on {device}: {str(e).splitlines()[0]}; "
                          "use device.precision=fp32") from None


def load_data(cfg: RunConfig, device: torch.device) -> dict[str, ClassStore]:
    """The train/val/test task sources of ``cfg.data``, checked against the episode shapes, with
    their input transforms (``data.normalize``, ``data.augment``) set, on ``device`` if asked."""
    stores = load_splits(cfg.data)
    if "train" not in stores:  # data=episodes: fixed test episodes, nothing to train on
        raise ConfigError(f"data={cfg.data.name} has no training split (only {', '.join(stores)}); train on another "
                          f"dataset and score the run on this one: metalearn eval run=<run dir> data={cfg.data.name} ...")
    set_transforms(cfg.data, stores)
    stores["train"].check_episode("train", cfg.ways, cfg.shots, cfg.queries)
    for split in ("val", "test"):
        stores[split].check_episode(split, cfg.eval.ways, cfg.eval.shots, cfg.eval.queries)
    check_within_group(cfg.data.name, stores, cfg.ways, cfg.within_group, ["train"], "within_group")
    check_within_group(cfg.data.name, stores, cfg.eval.ways, cfg.eval.within_group, ["val", "test"], "eval.within_group")
    if cfg.device.data_on_device:
        try:
            for store in stores.values():
                store.to(device)
        except torch.OutOfMemoryError:
            raise ConfigError(f"the {cfg.data.name} images do not fit in the memory of {device}; "
                              "set device.data_on_device=false to keep them in host memory (or on disk)") from None
    return stores


def check_within_group(name: str, stores: dict, ways: int, within_group: bool, splits: list[str], key: str) -> None:
    """One line if ``within_group`` episodes cannot be drawn from ``splits`` (a task source without classes, or
    no group of ``ways`` classes)."""
    if not within_group:
        return
    for split in splits:
        store = stores[split]
        if not hasattr(store, "check_groups"):
            raise ConfigError(f"{key}=true draws an episode's classes from one group, and data={name} has no "
                              f"classes to group; set {key}=false")
        store.check_groups(split, ways)


def set_transforms(data_cfg, stores: dict[str, ClassStore]) -> None:
    """Each split's input transforms from ``data.normalize``/``data.augment`` and the training split's statistics:
    training episodes of the train split augment, every other episode is only normalised."""
    train_transform, eval_transform = episode_transforms(data_cfg, stores["train"]) if "train" in stores else (None, None)
    for split, store in stores.items():
        store.train_transform = train_transform if split == "train" else eval_transform
        store.eval_transform = eval_transform


def problem_info(cfg: RunConfig, train_store: ClassStore) -> ProblemInfo:
    """What an algorithm is built from: the training split's input shape, classes and task, and the training episodes."""
    return ProblemInfo(input_shape=tuple(train_store.input_shape), ways=cfg.ways, num_train_classes=train_store.num_classes,
                       task=train_store.task, output_size=getattr(train_store, "output_size", None), shots=cfg.shots)


def problem_record(cfg: RunConfig, train_store: ClassStore) -> dict:
    """``problem_info`` and the evaluation input normalisation of a run, as plain data for its checkpoints:
    ``metalearn eval`` rebuilds the algorithm and its input pipeline from it, without the training data."""
    info, transform = problem_info(cfg, train_store), getattr(train_store, "eval_transform", None)
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    return {"input_shape": list(info.input_shape), "ways": info.ways, "num_train_classes": info.num_train_classes,
            "task": info.task, "output_size": info.output_size, "shots": info.shots, "data": cfg.data.name,
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std]}


def from_problem_record(record: dict) -> tuple[ProblemInfo, EpisodeTransform | None]:
    """The ProblemInfo and the evaluation input transform saved by ``problem_record``."""
    info = ProblemInfo(input_shape=tuple(record["input_shape"]), ways=record["ways"],
                       num_train_classes=record["num_train_classes"], task=record["task"],
                       output_size=record["output_size"], shots=record["shots"])
    mean, std = record.get("mean"), record.get("std")
    return info, (EpisodeTransform(tuple(mean), tuple(std)) if mean is not None else None)


def build_algorithm(cfg: RunConfig, train: ClassStore | ProblemInfo) -> Algorithm:
    """The algorithm of ``cfg`` for the training split ``train`` (or what a checkpoint recorded of it)."""
    info = train if isinstance(train, ProblemInfo) else problem_info(cfg, train)
    declared = _declared_tasks(cfg.algo)
    if declared:  # checked before building too: a constructor may fail on a task kind it does not know
        _check_task(cfg, info, declared)
    backbone = backbone_module(cfg.backbone).build(cfg.backbone, info.input_shape)
    ops.use_cpu_kernels(backbone, cfg.device.cpu_kernels)  # exact | fast (models/ops.py)
    algo = check_algorithm(cfg, info, algorithm_module(cfg.algo).build(cfg.algo, backbone, info))
    if cfg.device.compile:
        compile_backbone(cfg.algo.name, algo, backbone)
    return algo


#: What torch says when a meta-step differentiates through a compiled graph's backward (which of the two depends
#: on whether that backward was compiled before, e.g. by an earlier first-order step).
_DOUBLE_BACKWARD = ("does not currently support double backward", "requires create_graph=False")


def _compile_refused(algo_name: str) -> ConfigError:
    return ConfigError(f"device.compile=true cannot run algo={algo_name}: its meta-step differentiates through the "
                       "backbone's backward (second order), which torch.compile does not support; use "
                       "algo.first_order=true or device.compile=false")


def compile_backbone(algo_name: str, algo: Algorithm, backbone: nn.Module) -> None:
    """``device.compile``: torch.compile the forward of ``algo``'s backbone: a TaskwiseBackbone's per-task
    ``_features`` (one graph per episode shape on the task-by-task CPU path; folded batches of tasks recompile per
    number of tasks), another backbone's whole forward. An algorithm that says it differentiates through the
    backbone's backward is refused here; one that does so without saying, at its first meta-step
    (``Trainer._meta_step``)."""
    if algo.differentiates_backbone_backward():
        raise _compile_refused(algo_name)
    if isinstance(backbone, TaskwiseBackbone):
        # Bound to the instance (not a closure over it), so a deepcopy of the backbone calls its own weights.
        backbone._features = types.MethodType(torch.compile(type(backbone)._features, dynamic=False), backbone)
    else:
        backbone.compile(dynamic=False)


#: Where an algorithm's state dict keeps its backbone: its own ``backbone``, or the MAML family's ``net[0]``.
_BACKBONE_PREFIXES = ("backbone.", "net.0.")


def _backbone_state(state: dict) -> tuple[str, dict] | None:
    for prefix in _BACKBONE_PREFIXES:
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return prefix, part
    return None


def init_backbone(algo: Algorithm, init_from: str) -> None:
    """``init_from``: copy the backbone weights of a run (its ``best.pt``) or checkpoint file into ``algo``'s backbone;
    everything else keeps its fresh initialisation. One-line errors for a missing run, a checkpoint without a
    backbone and one that does not fit."""
    try:
        path = checkpoint.find(Path(init_from).expanduser(), "best")
    except CheckpointError as e:
        raise CheckpointError(f"init_from={init_from}: {e}") from None
    source = _backbone_state(checkpoint.load(path)["model"])
    if source is None:
        raise ConfigError(f"init_from={init_from}: {path} keeps no backbone weights (backbone.* or net.0.*); give a "
                          "run of an algorithm with a backbone (baseline, protonet, maml, ...)")
    own = algo.state_dict()
    target = _backbone_state(own)
    if target is None:
        raise ConfigError(f"init_from={init_from}: this run's algorithm has no backbone to start from it")
    prefix, theirs = target[0], source[1]
    mine = {k.removeprefix(prefix) for k in own if k.startswith(prefix)}
    wrong = sorted(mine ^ set(theirs)) or [k for k in sorted(mine) if own[prefix + k].shape != theirs[k].shape]
    if wrong:
        raise CheckpointError(f"init_from={init_from}: the backbone in {path} does not fit this run's backbone "
                              f"(first difference: {wrong[0]}); use the backbone settings that run was trained with")
    own.update({prefix + k: v for k, v in theirs.items()})
    algo.load_state_dict(own)
    log.info("backbone initialised from %s", path)


def check_algorithm(cfg: RunConfig, info: ProblemInfo, algo: Algorithm) -> Algorithm:
    """``algo`` (built from ``cfg`` or by the user), checked against the problem and the episode shapes."""
    if not isinstance(algo, Algorithm):
        raise ConfigError(f"the algorithm is a {type(algo).__name__}, not a metalearn Algorithm; subclass "
                          "metalearn.algorithms.Algorithm (meta_step and evaluate)")
    _check_task(cfg, info, algo.tasks)
    algo.check_episode(cfg.ways, cfg.shots, cfg.queries)
    algo.check_episode(cfg.eval.ways, cfg.eval.shots, cfg.eval.queries)
    if not any(p.requires_grad for p in algo.parameters()):  # e.g. protonet with backbone=identity
        raise ConfigError(f"algo={cfg.algo.name} with backbone={cfg.backbone.name} has nothing to meta-train; "
                          "use a backbone with weights (backbone=mlp for vectors)")
    return algo


def _check_task(cfg: RunConfig, info: ProblemInfo, tasks: tuple[str, ...]) -> None:
    """One line if the algorithm, which learns ``tasks``, cannot learn the data's task kind."""
    if info.task not in tasks:
        able = [name for name in ALGORITHMS if info.task in _algorithm_tasks(name)]
        raise ConfigError(f"algo={cfg.algo.name} learns {' and '.join(tasks)} tasks only, and data={cfg.data.name} "
                          f"is {info.task}; use one of: {', '.join(able)}")


def _declared_tasks(option) -> tuple[str, ...]:
    """Every task kind the Algorithm subclasses defined in an algorithm's module learn (none if it defines none)."""
    module = algorithm_module(option)
    return tuple(dict.fromkeys(task for v in vars(module).values() if isinstance(v, type) and issubclass(v, Algorithm)
                               and v.__module__ == module.__name__ for task in v.tasks))


def _algorithm_tasks(name: str) -> tuple[str, ...]:
    """The task kinds of a registered algorithm (its Algorithm subclasses' ``tasks``; a module that subclasses
    another's algorithm without defining one of its own: classification)."""
    return _declared_tasks(name) or ("classification",)


def build_optimizer(cfg: RunConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The outer optimizer and its schedule (stepped once per meta-step): the short names of ``optim.name`` and
    ``optim.scheduler``, or any classes given by Hydra's ``_target_`` (``optim.optimizer``, ``optim.lr_scheduler``).
    ``params``: parameters, or (name, parameter) pairs (``named_parameters()``), which ``optim.lr_multipliers`` needs."""
    o, params = cfg.optim, _param_groups(cfg, list(params))
    if o.optimizer is not None:
        opt = _instantiate(o.optimizer, "optim.optimizer", params, lr=o.lr)
    elif o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        from metalearn.config import optimizer_classes

        opt = optimizer_classes()[o.name](params, lr=o.lr, weight_decay=o.weight_decay)
    if o.lr_scheduler is not None:
        sched = _instantiate(o.lr_scheduler, "optim.lr_scheduler", opt)
    elif o.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    elif o.scheduler == "linear":  # Reptile's annealing: lr * (1 - step / steps), 0 after the last step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / cfg.steps))
    elif o.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.decay_every, gamma=o.decay_gamma)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def _param_groups(cfg: RunConfig, params: list) -> list:
    """The parameters, in one group; with ``optim.lr_multipliers``, the rest and one group per prefix (the longest
    matching prefix of a parameter's name wins) at ``lr * factor``."""
    named = bool(params) and isinstance(params[0], tuple)
    factors = cfg.optim.lr_multipliers
    if not factors:
        return [p for _, p in params] if named else params
    if not named:
        raise TypeError("optim.lr_multipliers needs the parameters by name: build_optimizer(cfg, algo.named_parameters())")
    base = (cfg.optim.optimizer or {}).get("lr", cfg.optim.lr)
    groups: dict[str, list] = {prefix: [] for prefix in sorted(factors, key=len, reverse=True)}
    rest = []
    for name, p in params:
        prefix = next((q for q in groups if name == q or name.startswith(q + ".")), None)
        (groups[prefix] if prefix is not None else rest).append(p)
    empty = [q for q, ps in groups.items() if not ps]
    if empty:
        modules = sorted({name.split(".")[0] for name, _ in params})
        raise ConfigError(f"optim.lr_multipliers.{empty[0]} names no parameter of algo={cfg.algo.name}; its parameters "
                          f"are under: {', '.join(modules)} (e.g. backbone, or backbone.convs.3)")
    return [*([{"params": rest}] if rest else []), *({"params": ps, "lr": base * factors[q]} for q, ps in groups.items())]


def _instantiate(node: dict, where: str, first: Any, **defaults: Any) -> Any:
    """``node``'s ``_target_`` called with ``first`` (the parameters, or the optimizer), the node's other keys, and
    ``defaults`` for keys it does not give (Hydra's ``instantiate``, as a partial); a bad key is one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    given = {k: v for k, v in node.items() if k != "_partial_"}
    try:
        factory = instantiate({**given, "_partial_": True}, _convert_="all")
        return factory(first, **{k: v for k, v in defaults.items() if k not in given})
    except (InstantiationException, TypeError, ValueError) as e:
        raise ConfigError(f"{where} ({node['_target_']}): {str(e).strip().splitlines()[-1]}") from None


def mean_ci95(values: torch.Tensor) -> dict[str, float]:
    """Mean and 95% confidence interval half-width, 1.96 * std / sqrt(n), as the few-shot papers report."""
    v = values.double().cpu()
    std = float(v.std(correction=0)) if v.numel() > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": 1.96 * std / math.sqrt(v.numel()), "std": std, "episodes": v.numel()}


def evaluate(algo: Algorithm, store: ClassStore, ways: int, shots: int, queries: int,
             episodes: int, batch_size: int, seed: int, device: torch.device,
             between_batches: Callable[[], None] | None = None,
             group: distributed.Group = distributed.SINGLE, precision: str = "fp32",
             within_group: bool = False) -> dict[str, dict[str, float]]:
    """Mean and 95% CI of every metric over ``episodes`` fixed episodes (fixed by ``seed``; ``within_group``:
    each episode's classes from one group).

    ``between_batches`` is called before each batch (the trainer raises from it to stop early).
    With several processes (``group``) the batches go round-robin to the ranks, and every rank
    gets the metrics of all episodes in episode order: the numbers of a single process.
    """
    was_training = algo.training
    algo.eval()
    mine: list[tuple[int, dict[str, torch.Tensor]]] = []
    # Episodes are drawn one at a time, so the episode stream (and the result) does not depend on batch_size.
    sampler = store.sampler(ways, shots, queries, 1, seed, **({"within_group": True} if within_group else {}))
    starts = range(0, episodes, batch_size)
    try:
        for first in range(0, len(starts), group.world_size):  # a round: one batch per rank
            if between_batches is not None:
                between_batches()
            for i in range(first, min(first + group.world_size, len(starts))):
                tasks = [sampler.sample() for _ in range(min(batch_size, episodes - starts[i]))]
                if i % group.world_size == group.rank:
                    parts = []
                    for batch in _same_shape_batches(tasks):  # fixed episodes (data=episodes) may differ in shape
                        with autocast(device, precision):
                            parts.append(algo.evaluate(batch.to(device)))
                    mine.append((i, {k: torch.cat([p[k].detach().float() for p in parts]) for k in parts[0]}))
    finally:
        algo.train(was_training)
    if group.world_size > 1:  # every rank gets every batch's metrics (on the CPU, to travel)
        mine = [(i, {k: v.cpu() for k, v in m.items()}) for i, m in mine]
    batches = sorted((b for rank in group.gather(mine) for b in rank), key=lambda b: b[0])
    return {k: mean_ci95(torch.cat([m[k] for _, m in batches])) for k in (batches[0][1] if batches else {})}


def _same_shape_batches(tasks: list[TaskBatch]) -> list[TaskBatch]:
    """Consecutive tasks of the same shapes, each run concatenated into one batch (in order)."""
    runs: list[tuple[list[tuple[int, ...]], list[TaskBatch]]] = []
    for task in tasks:
        shape = [tuple(getattr(task, f.name).shape[1:]) for f in fields(TaskBatch)]
        if runs and shape == runs[-1][0]:
            runs[-1][1].append(task)
        else:
            runs.append((shape, [task]))
    return [TaskBatch.cat(run) for _, run in runs]


def score_checkpoint(algo: Algorithm, path: Path, cfg: RunConfig, test_store: ClassStore, seed: int,
                    device: torch.device, between_batches: Callable[[], None] | None = None,
                    group: distributed.Group = distributed.SINGLE) -> dict:
    """Load the weights saved at ``path`` into ``algo`` and score them on ``cfg.trainer.test_episodes``
    episodes of ``cfg.eval``'s shape drawn with ``seed``: what the trainer's test and ``metalearn eval`` report."""
    ckpt = checkpoint.load(path)
    checkpoint.load_model_state(algo, ckpt["model"], path)
    e = cfg.eval
    metrics = evaluate(algo, test_store, e.ways, e.shots, e.queries, cfg.trainer.test_episodes, e.batch_size, seed,
                       device, between_batches=between_batches, group=group, precision=cfg.device.precision,
                       within_group=e.within_group)
    return {"test": metrics, "checkpoint": str(path), "checkpoint_step": ckpt["step"],
            "episode": {"ways": e.ways, "shots": e.shots, "queries": e.queries, "task": test_store.task,
                        **({"within_group": True} if e.within_group else {})},
            "episode_seed": seed}  # what fixed the test episodes (trainer.eval_seed + 1), not the run's seed


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint); a second one kills."""
    flag: dict[str, Any] = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum
        signal.signal(signum, previous[signum])

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            previous[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the loop


@dataclass
class Best:
    value: float | None = None
    step: int | None = None

    def improves(self, value: float, higher_is_better: bool) -> bool:
        return self.value is None or (value > self.value if higher_is_better else value < self.value)


class Stopped(Exception):
    """The run stopped early on request; its last checkpoint can be resumed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Interrupted(Exception):
    """A stop request arrived during validation or test: leave them at once."""


class _Window:
    """Training metrics since the last log step, summed on the device (no host sync per step)."""

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.first, self.start = 0, step + 1, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().mean()
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.steps for k, v in self.sums.items()}

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def restart_clock_if_empty(self) -> None:
        if self.steps == 0:
            self.start = time.perf_counter()


class Trainer:
    """One run: the loop and its state. ``fit()`` trains, validates, checkpoints and tests."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_from: dict | None = None,
                 algorithm: Algorithm | None = None):
        """``algorithm``: an algorithm the user built in Python, trained instead of building ``cfg.algo``; the
        checkpoints record its class (``algo.object``), not a config it was not built from."""
        if algorithm is not None:
            cfg = dataclasses.replace(cfg, algo=plugins.object_record(algorithm))
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.group = distributed.current()  # one process, or this rank of a torchrun job
        self.group.check(cfg.meta_batch_size)
        self.device = self.group.device(resolve_device(cfg.device.type))
        autocast(self.device, cfg.device.precision)  # an unknown precision fails here, before any work
        seed_everything(cfg.seed)
        self.stores = self.group.main_first(lambda: load_data(cfg, self.device))  # one process builds caches
        # Rank 0 first: a mistake in the config is then reported once, by rank 0.
        build = (lambda: build_algorithm(cfg, self.stores["train"])) if algorithm is None else \
            (lambda: check_algorithm(cfg, problem_info(cfg, self.stores["train"]), algorithm))
        self.algo = self.group.main_first(build)
        self.algo.check_training(cfg)
        updates = self.algo.updates_per_batch
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
            raise ConfigError(f"algo={cfg.algo.name}'s updates_per_batch must be a whole number >= 1 (got {updates!r}); "
                              "it is the number of meta_step calls, each with an optimizer step, on every batch")
        if resume_from is None and cfg.init_from is not None:
            init_backbone(self.algo, cfg.init_from)
        self.algo = self.algo.to(self.device)
        self.group.broadcast_module(self.algo)
        self.algo.before_training()
        self.problem = problem_record(cfg, self.stores["train"])  # in every checkpoint, for metalearn eval
        if self.group.is_main:
            for partial in checkpoint.remove_partial(self.ckpt_dir):  # a write cut short by a kill
                log.info("removed %s, a checkpoint write that did not finish", partial)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.algo.named_parameters())
        self.sampler = self.stores["train"].sampler(cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size, cfg.seed,
                                                    training=True, **({"within_group": True} if cfg.within_group else {}))
        self.step, self.best, self.val_pending = 0, Best(), False
        if resume_from is not None:
            if resume_from["step"] > cfg.steps:  # the loop would not run, and the results would claim cfg.steps
                raise ConfigError(f"this run's checkpoint is at step {resume_from['step']}, past steps={cfg.steps}; "
                                  f"resume with steps>={resume_from['step']}, or score it with metalearn eval")
            checkpoint.load_model_state(self.algo, resume_from["model"], self.ckpt_dir / "last.pt")
            self.optimizer.load_state_dict(resume_from["optimizer"])
            self.scheduler.load_state_dict(resume_from["scheduler"])
            try:
                self.sampler.load_state_dict(resume_from["sampler"])
            except (RuntimeError, ValueError):
                raise ConfigError("this run's episode sampler ran on another kind of device; resume it with the "
                                  "device it was trained on (device=cpu or device=cuda)") from None
            self.group.restore_rng(resume_from, cfg.seed)
            self.step, self.best = resume_from["step"], Best(**resume_from["best"])
            self.val_pending = resume_from.get("val_pending", False)
            log.info("resumed %s at step %d", self.run_dir, self.step)
        else:
            self.group.seed_rank(cfg.seed)
        self.stop: dict[str, Any] = {"signal": None}

    # ------------------------------------------------------------ pieces

    def save(self, name: str, val_pending: bool = False) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.algo.parameters()):
            raise self._diverged(f"the meta-parameters became NaN/inf by step {self.step}")
        rng = self.group.rng_states()  # every rank's, so that each continues its own stream on resume
        if self.group.is_main:
            checkpoint.save(
                self.ckpt_dir / f"{name}.pt", step=self.step, model=self.algo.state_dict(),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                sampler=self.sampler.state_dict(), rng=rng[0], **({"rng_ranks": rng} if len(rng) > 1 else {}),
                best={"value": self.best.value, "step": self.best.step}, val_pending=val_pending,
                metric=self.algo.primary_metric, config=to_dict(self.cfg), problem=self.problem,
            )
        self.group.barrier()  # the others read best.pt for the test

    def _check_stop(self) -> None:
        signum = self.stop["signal"] = self.group.agree_signal(self.stop["signal"])
        if signum is not None:
            raise _Interrupted

    def _between_batches(self, phase: str) -> Callable[[], None]:
        """Before each evaluation round: the stop check (and the testing hook's fault point)."""
        rounds = iter(range(1 << 62))

        def between() -> None:
            faults.point(phase, self.step, next(rounds), self.group.rank)
            self._check_stop()

        return between

    def evaluate(self, split: str, episodes: int, seed: int) -> dict[str, dict[str, float]]:
        e = self.cfg.eval
        return evaluate(self.algo, self.stores[split], e.ways, e.shots, e.queries, episodes, e.batch_size, seed,
                        self.device, between_batches=self._between_batches(split), group=self.group,
                        precision=self.cfg.device.precision, within_group=e.within_group)

    def validate(self, tb: TensorBoard) -> None:
        val = self.evaluate("val", self.cfg.trainer.val_episodes, self.cfg.trainer.eval_seed)
        metric = self.algo.primary_metric
        tb.scalars(self.step, {f"val/{k}": v["mean"] for k, v in val.items()})
        if self.best.improves(val[metric]["mean"], self.algo.higher_is_better):
            self.best = Best(val[metric]["mean"], self.step)
            self.save("best")
        tb.scalars(self.step, {f"val/best_{metric}": self.best.value})
        log.info("step %d val %s %s (best %.4f at step %d)", self.step, metric, _fmt(val[metric]),
                 self.best.value, self.best.step)

    def test(self) -> dict:
        """Evaluate the best-validation weights on ``trainer.test_episodes`` fixed test episodes."""
        results = score_checkpoint(self.algo, self.ckpt_dir / "best.pt", self.cfg, self.stores["test"],
                                  self.cfg.trainer.eval_seed + 1, self.device, between_batches=self._between_batches("test"),
                                  group=self.group)
        return {**results,
                "best_val": {"metric": self.algo.primary_metric, "value": self.best.value, "step": self.best.step},
                "steps": self.cfg.steps, "run_dir": str(self.run_dir), "version": __version__}

    def _diverged(self, what: str) -> TrainingError:
        last = self.ckpt_dir / "last.pt"
        kept = (f"{last} (step {checkpoint.load(last)['step']}) keeps the last good state" if last.is_file()
                else "no checkpoint was saved before that")
        return TrainingError(f"{what}; {kept}; lower optim.lr or the inner learning rate, or set optim.grad_clip")

    def _stopped(self, what: str) -> Stopped:
        sig = self.stop["signal"]
        how = "interrupted" if sig is not None else f"stopped at trainer.stop_at={self.cfg.trainer.stop_at}"
        return Stopped(f"{how}{what}: saved step {self.step}; continue with: "
                       f"{self.group.command} train resume={self.run_dir}", 128 + sig if sig is not None else 0)

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        cfg, t, algo = self.cfg, self.cfg.trainer, self.algo
        params = list(algo.parameters())
        tb = TensorBoard(self.run_dir, purge_step=self.step + 1 if self.step else None) if self.group.is_main \
            else NoTensorBoard()  # rank 0 writes for all
        if self.step == 0:
            tb.hparams({k: v for k, v in flat(to_dict(cfg)).items()
                        if not k.startswith(("trainer.", "device.", "data.root", "data.cache_dir", "resume"))},
                       hparam_metrics(algo.primary_metric))
        task = self.stores["train"].task
        episodes = (f"{cfg.ways}-way {cfg.shots}-shot" if task == "classification" else f"{task}, {cfg.shots}-shot")
        where = f"{self.device} x {self.group.world_size} processes" if self.group.world_size > 1 else self.device
        log.info("%s on %s (%s, %s, %d parameters) on %s -> %s", cfg.algo.name, cfg.data.name,
                 cfg.backbone.name, episodes, sum(p.numel() for p in params), where, self.run_dir)
        window = _Window(self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="meta-train", unit="step", dynamic_ncols=True,
                   disable=None if t.progress and self.group.is_main else True, leave=False)
        try:
            with stop_requests() as self.stop:
                algo.train()
                if self.val_pending:  # the run was stopped during this step's validation
                    self._validate_or_stop(tb)
                while self.step < cfg.steps:
                    window.add(self._meta_step(params))
                    self.step += 1
                    bar.update()
                    step, last = self.step, self.step == cfg.steps
                    # Decided on a value every rank agrees on (a signal may reach the ranks at different steps).
                    signum = self.stop["signal"] = self.group.agree_signal(self.stop["signal"])
                    stopping = signum is not None or step == t.stop_at
                    saving = step % t.ckpt_every == 0 or last or stopping
                    if step % t.log_every == 0 or saving:
                        self._log_train(window, tb, bar)
                    if step % t.val_every == 0 or last:
                        self._validate_or_stop(tb)
                    if saving:
                        self.save("last")
                    if stopping and not last:
                        raise self._stopped("")
                    window.restart_clock_if_empty()  # throughput excludes logging, validation and saving
                bar.close()
                try:
                    results = self.test()
                except _Interrupted:
                    raise self._stopped(" during the final test") from None
            tb.scalars(cfg.steps, {f"test/{k}": v["mean"] for k, v in results["test"].items()})
            tb.scalars(cfg.steps, {f"test/{k}_ci95": v["ci95"] for k, v in results["test"].items()})
            if self.group.is_main:
                atomic_write_json(self.run_dir / "results.json", results)
            return results
        finally:
            bar.close()
            tb.close()

    def _meta_step(self, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = self.group.tasks(self.sampler.sample()).to(self.device)  # this rank's share of the meta-batch
        self.algo.begin_step(self.step, self.cfg.steps)
        first = None
        for update in range(self.algo.updates_per_batch):  # > 1: PPO-style epochs over the batch's samples
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.cfg.device.precision):
                try:
                    metrics = self.algo.meta_step(batch)
                except RuntimeError as e:
                    if self.cfg.device.compile and any(words in str(e) for words in _DOUBLE_BACKWARD):
                        raise _compile_refused(self.cfg.algo.name) from None
                    raise
            first = metrics if first is None else first
            self.group.average_gradients(params)  # several processes: the gradient of the whole meta-batch
            if update == 0:
                faults.point("step", self.step + 1, rank=self.group.rank)  # the testing hook (metalearn/faults.py)
            if self.cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        return first

    def _log_train(self, window: "_Window", tb: TensorBoard, bar: tqdm) -> None:
        """Mean train metrics since the last log (the one host sync), NaN check, scalars."""
        means = self.group.mean(window.means())  # over the whole meta-batch: every rank sees the same NaN
        if not all(math.isfinite(v) for v in means.values()):
            raise self._diverged(f"the training loss became NaN/inf between steps {window.first} and {self.step}")
        rate = window.steps * self.cfg.meta_batch_size / window.seconds()
        tb.scalars(self.step, {f"train/{k}": v for k, v in means.items()}
                   | {"train/lr": self.optimizer.param_groups[0]["lr"], "train/tasks_per_second": rate})
        bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()} | {"tasks/s": f"{rate:.0f}"})
        if bar.disable:
            log.info("step %d/%d %s %.0f tasks/s", self.step, self.cfg.steps,
                     " ".join(f"{k} {v:.4f}" for k, v in means.items()), rate)
        window.reset(self.step)

    def _validate_or_stop(self, tb: TensorBoard) -> None:
        """Validate; if a stop request cuts validation short, checkpoint so that resuming validates first."""
        try:
            self.validate(tb)
            self.val_pending = False
        except _Interrupted:
            self.save("last", val_pending=True)
            raise self._stopped(" during validation") from None


def train(cfg: RunConfig, run_dir: Path, resume_from: dict | None = None, algorithm: Algorithm | None = None) -> dict:
    """Meta-train, validate, checkpoint and test. Returns the results written to results.json."""
    return Trainer(cfg, run_dir, resume_from, algorithm).fit()


def _fmt(m: dict[str, float]) -> str:
    return f"{m['mean']:.4f} +- {m['ci95']:.4f}"


def format_result(name: str, m: dict[str, float], percent: bool) -> str:
    if percent:
        return f"{name}: {100 * m['mean']:.2f}% +- {100 * m['ci95']:.2f}% (95% CI, {m['episodes']} episodes)"
    return f"{name}: {m['mean']:.4f} +- {m['ci95']:.4f} (95% CI, {m['episodes']} episodes)"


def print_results(results: dict) -> None:
    ep = results["episode"]
    shape = (f"regression {ep['shots']}-shot ({ep['queries']} query points)" if ep.get("task") == "regression"
             # what the episodes are is the algorithm's: MAML's per adaptation step and after it, RL^2's per trial
             # and trials per task
             else f"reinforcement, shots={ep['shots']} queries={ep['queries']} (episodes)"
             if ep.get("task") == "reinforcement"
             else f"{ep['ways']}-way {ep['shots']}-shot ({ep['queries']} queries per class)")
    print(f"test {shape}, checkpoint step {results['checkpoint_step']}:")
    for k, m in results["test"].items():
        print("  " + format_result(k, m, percent=k == "accuracy"))


# ---------------------------------------------------------------- torchrun ranks > 0


def follow(group: distributed.ProcessGroup) -> int:
    """A rank > 0: receive rank 0's job, run the engine on it, leave the talking to rank 0."""
    from metalearn.config import to_run_config

    job = group.receive_job()
    if "exit" in job:
        return job["exit"]
    try:
        ckpt = checkpoint.load(job["checkpoint"]) if job["checkpoint"] else None
        train(to_run_config(job["config"]), Path(job["run_dir"]), resume_from=ckpt)
    except MetalearnError as e:  # printed with the rank, unless another process claimed the same message
        group.report(str(e), e.exit_code)
        return e.exit_code
    except (Stopped, distributed.FollowerExit) as e:  # every rank stops together, and rank 0 said why
        return e.exit_code
    except distributed.PeerLost as e:
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: its traceback, with the rank
        group.failed(f"{type(e).__name__}: {e}", 1)
        print(f"metalearn: rank {group.rank} crashed (a bug in metalearn; please report it with this traceback):\n"
              f"{traceback.format_exc()}", file=sys.stderr, end="", flush=True)
        return 1
    return 0
