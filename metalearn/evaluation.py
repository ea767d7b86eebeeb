"""``metalearn eval``: score a checkpoint on test episodes, of the run's own data or of other data.

* ``metalearn eval run=DIR``: the run's own test episodes (it reproduces ``results.json``).
* ``metalearn eval run=DIR data=<option> [data.key=value ...]``: another dataset, e.g. the
  cross-domain protocol of Chen et al. (2019), train on miniImageNet, test on CUB.
* ``metalearn eval run=DIR data=episodes data.path=FOLDER``: fixed episodes from folders
  (``metalearn/data/episode_folders.py``), every one scored once, in order.
* ``adaptation_steps=K``: the gradient steps each task is adapted with (the run's ``algo.test_inner_steps`` by
  default) for the algorithms that take steps (maml, metasgd, anil, mamlpp, reptile, maml_rl, ...): a curve of
  accuracy or return against steps from one checkpoint.
* ``finetune.*``, ``tta.*`` and ``run=[A,B,C]`` (an ensemble): test-time options (``metalearn/adaptation.py``).
  The episodes, data and test protocol are the first run's; every result says its seconds per episode.

The algorithm is rebuilt from what the checkpoint recorded of its training problem (input
shape, ways, shots, number of training classes, task: the ``problem`` entry the trainer
writes beside ``config``), so the training data need not be on disk. The evaluated inputs
are scaled and normalised as the run's own were (the checkpoint's mean and std, if the run
normalised): the model's input pipeline is part of the model, whatever data it is given;
the other data's ``normalize`` and ``augment`` keys are not used. Checkpoints written
before ``problem`` existed are rebuilt from the training split of the run's own data, as
before. Only the split being scored (``split=test`` by default) gets its transforms,
checks and a place on the device; the others are dropped as soon as the dataset is read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from metalearn import adaptation, checkpoint, engine
from metalearn.algorithms import ProblemInfo
from metalearn.config import RunConfig, to_run_config
from metalearn.data import SPLITS, ClassStore, load_splits
from metalearn.data.common import episode_transforms
from metalearn.errors import ConfigError, MetalearnError
from metalearn.fileio import atomic_write_json

EVAL_SPLITS = (*SPLITS, "all")
_EPISODE_KEYS = ("ways", "shots", "queries", "episodes")


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Score the checkpoint ``cfg`` names (the composed ``eval`` config); print and write the results."""
    from metalearn.data.episode_folders import Config as EpisodesConfig

    split = cfg.get("split") or "test"
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split={split!r} is not one of: {', '.join(EVAL_SPLITS)}")
    opts = adaptation.options(cfg)
    paths = _checkpoints(cfg)
    path = paths[0]
    ckpt = checkpoint.load(path)
    if ckpt.get("migrated"):
        print(checkpoint.migration_note(path, ckpt["migrated"]))
    other = cfg.get("data") is not None
    own, run_cfg = _configs(cfg, ckpt, other)
    fixed = isinstance(run_cfg.data, EpisodesConfig)
    if fixed:
        given = [f"{k}={cfg[k]}" for k in (*_EPISODE_KEYS, "within_group") if cfg.get(k) is not None]
        if given:
            raise ConfigError(f"data=episodes scores every episode under data.path once, with the shapes of its folders; "
                              f"drop {' '.join(given)}")
        if split != "test":
            raise ConfigError(f"data=episodes holds fixed test episodes only; drop split={split}")
    device = engine.resolve_device(run_cfg.device.type)
    loaded: dict[str, Any] = {}  # the run's own data, if an older checkpoint needs it to rebuild the model
    info, transform, trained_on = _trained_problem(ckpt, own, path, loaded)
    if fixed:
        run_cfg.data = _episode_image_options(run_cfg.data, info, path)
    stores = loaded if loaded and not other else load_splits(run_cfg.data)
    store = _one_split(stores, split, run_cfg.data.name)
    del stores, loaded  # only the scored split stays
    _check_fits(store, info, run_cfg, trained_on, path)
    store.train_transform = store.eval_transform = transform
    algo = engine.build_algorithm(run_cfg, info).to(device)
    members = [adaptation.Member(algo, transform, _described(path, run_cfg.algo.name, trained_on))]
    members += [_member(cfg, p, info, device, members[0]) for p in paths[1:]]
    e = run_cfg.eval
    shapes = store.shapes() if fixed else [(e.ways, e.shots, e.queries)]
    for m in members:
        adaptation.check_member(m.algo, info, m.record["algo"], opts, len(members) > 1)
        for ways, shots, queries in shapes:
            m.algo.check_episode(ways, shots, queries)
    if fixed:
        run_cfg.trainer.test_episodes = store.num_episodes
        e.within_group = False  # the folders fix every episode's classes
    else:
        store.check_episode(split, e.ways, e.shots, e.queries)
        engine.check_within_group(run_cfg.data.name, {split: store}, e.ways, e.within_group, [split], "within_group")
    if run_cfg.device.data_on_device:
        try:
            store.to(device)
        except torch.OutOfMemoryError:
            raise ConfigError(f"the {run_cfg.data.name} images do not fit in the memory of {device}; "
                              "set device.data_on_device=false to keep them in host memory") from None
    seed = run_cfg.trainer.eval_seed + 1 if cfg.seed is None else cfg.seed
    scored = algo
    if opts.active or len(members) > 1:  # the members transform the stored episodes themselves
        store.train_transform = store.eval_transform = adaptation.as_stored
        scored = adaptation.Scorer(members, opts, seed, tuple(info.input_shape))
    start = time.perf_counter()
    results = engine.score_checkpoint(scored, path, run_cfg, store, seed, device)  # loads the (first) run's weights
    seconds = time.perf_counter() - start
    if fixed:
        results["episode"] = store.summary()
        print(f"{store.num_episodes} fixed episodes from {store.folder}, each scored once")
    results["split"] = split
    if other:
        results["data"] = dataclasses.asdict(run_cfg.data)
    results["inputs"] = {"normalised_as": trained_on, "mean": getattr(transform, "mean", None),
                         "std": getattr(transform, "std", None)}
    if opts.active:
        results["adaptation"] = opts.record()
    if len(members) > 1:
        results["members"] = [m.record for m in members]
    episodes = run_cfg.trainer.test_episodes
    results["seconds"] = seconds
    results["seconds_per_episode"] = seconds / episodes
    engine.print_results(results)
    what = opts.describe() + (f", an ensemble of {len(members)} runs" if len(members) > 1 else "")
    print(f"  time: {seconds / episodes:.4f} s per episode ({what}; {episodes} episodes in {seconds:.2f} s)")
    run_dir = path.parent.parent
    if (run_dir / "checkpoints").is_dir():
        precision = run_cfg.device.precision if run_cfg.device.precision != ckpt["config"]["device"]["precision"] else None
        steps = cfg.get("adaptation_steps")
        extra = (*([f"steps{steps}"] if steps is not None else []), *opts.tag(),
                 *([_ensemble_tag(paths)] if len(paths) > 1 else []))
        out = run_dir / _file_name(path, run_cfg, split, other, fixed, seed, precision, extra)
        atomic_write_json(out, results)
        print(f"results: {out}")
    return results


def _checkpoints(cfg: DictConfig) -> list[Path]:
    """The checkpoint of ``run=`` (or ``ckpt=``), or of each of its runs (an ensemble: a list), all found."""
    given = cfg.run if cfg.run is not None else cfg.ckpt
    values = list(given) if isinstance(given, (ListConfig, list, tuple)) else [given]
    key = "run" if cfg.run is not None else "ckpt"
    if not values:
        raise ConfigError(f"{key}=[] names nothing; give {key}=<one> or {key}=[A,B,...] (an ensemble)")
    if any(isinstance(v, (ListConfig, DictConfig)) or v is None for v in values):
        shown = OmegaConf.to_container(given) if isinstance(given, (ListConfig, DictConfig)) else given
        raise ConfigError(f"{key}= takes a path or a list of paths (an ensemble), got {shown}")
    return [checkpoint.find(str(v), cfg.checkpoint) if key == "run" else checkpoint.find(str(v)) for v in values]


def _described(path: Path, algo: str, trained_on: str) -> dict:
    return {"checkpoint": str(path), "algo": algo, "data": trained_on}


def _member(cfg: DictConfig, path: Path, info: ProblemInfo, device: torch.device,
            first: adaptation.Member) -> adaptation.Member:
    """Another run of an ensemble: its algorithm with its weights, on ``device``, checked to take the first run's inputs."""
    ckpt = checkpoint.load(path)
    if ckpt.get("migrated"):
        print(checkpoint.migration_note(path, ckpt["migrated"]))
    own, _ = _configs(cfg, ckpt, other=False)
    theirs, transform, trained_on = _trained_problem(ckpt, own, path, {})
    if tuple(theirs.input_shape) != tuple(info.input_shape) or theirs.task != info.task:
        raise ConfigError(f"an ensemble's runs must take the same inputs: {path} learned {theirs.task} tasks on "
                          f"{_shape(tuple(theirs.input_shape))} inputs (data={trained_on}), {first.record['checkpoint']} "
                          f"{info.task} tasks on {_shape(tuple(info.input_shape))} (data={first.record['data']}); "
                          "ensemble runs trained on the same data")
    algo = engine.build_algorithm(own, theirs).to(device)
    checkpoint.load_model_state(algo, ckpt["model"], path)
    return adaptation.Member(algo, transform, _described(path, own.algo.name, trained_on))


def _ensemble_tag(paths: list[Path]) -> str:
    """``ensemble<N>-<8 hex of the members' checkpoints>``."""
    key = hashlib.sha1("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:8]
    return f"ensemble{len(paths)}-{key}"


def _configs(cfg: DictConfig, ckpt: dict, other: bool) -> tuple[RunConfig, RunConfig]:
    """(the run's own config with the eval options applied, the config of the data being scored)."""
    saved = OmegaConf.create(ckpt["config"])
    steps = cfg.get("adaptation_steps")
    if steps is not None:
        if "test_inner_steps" not in saved.algo:
            raise ConfigError(f"algo={saved.algo.name} adapts without gradient steps (it has no algo.test_inner_steps); "
                              f"drop adaptation_steps={steps}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(f"adaptation_steps={steps} must be a whole number >= 0 (the gradient steps on each task)")
    for key, value in {"algo.test_inner_steps": steps, "eval.ways": cfg.ways, "eval.shots": cfg.shots, "eval.queries": cfg.queries,
                       "eval.batch_size": cfg.batch_size, "eval.within_group": cfg.get("within_group"),
                       "trainer.test_episodes": cfg.episodes}.items():
        if value is not None:
            OmegaConf.update(saved, key, value)
    device = cfg.device  # the eval config's device group: where to run now; the precision stays the run's
    if device.precision != "fp32":
        raise ConfigError(f"device.precision={device.precision} is not read by metalearn eval; give precision={device.precision} "
                          "(the default is the run's own precision)")
    saved.device.type = device.type
    saved.device.data_on_device = saved.device.data_on_device and device.data_on_device  # false from either wins
    if cfg.get("precision") is not None:
        saved.device.precision = cfg.precision
    own_node = copy.deepcopy(saved)
    if cfg.data_root is not None and not other:  # with data=<option>, data_root is that data's root
        OmegaConf.update(own_node, "data.root", cfg.data_root)
    own = to_run_config(own_node)
    if not other:
        return own, own
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=False))
    if cfg.data_root is not None and "root" in data:
        data.root = cfg.data_root
    saved.data = data
    return own, to_run_config(saved)


def _trained_problem(ckpt: dict, own: RunConfig, path: Path, loaded: dict) -> tuple[ProblemInfo, Any, str]:
    """What the checkpoint was trained on: its ProblemInfo, its evaluation input transform, the data's name."""
    record = ckpt.get("problem")
    if record is not None:
        info, transform = engine.from_problem_record(record)
        return info, transform, record.get("data", own.data.name)
    # Written before checkpoints recorded it: rebuilt from the training split of the run's own data.
    try:
        loaded.update(load_splits(own.data))
    except MetalearnError as e:
        raise type(e)(f"{path} predates checkpoints that record their training problem, so the run's own data "
                      f"(data={own.data.name}) is needed to rebuild the model: {e}") from None
    _, transform = episode_transforms(own.data, loaded["train"])
    return engine.problem_info(own, loaded["train"]), transform, own.data.name


def _episode_image_options(data: Any, info: ProblemInfo, path: Path) -> Any:
    """data=episodes with image_size / channels null: the checkpoint's input shape."""
    shape = tuple(info.input_shape)
    if data.image_size is not None and data.channels is not None:
        return data
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"{path} was trained on inputs of shape {_shape(shape)}, not square images: "
                          "fixed image episodes cannot be scored with it")
    return dataclasses.replace(data, image_size=data.image_size if data.image_size is not None else shape[1],
                               channels=data.channels if data.channels is not None else shape[0])


def _one_split(stores: dict, split: str, name: str) -> Any:
    """The split to score; ``all``: every split's classes in one store."""
    if split != "all":
        if split not in stores:
            raise ConfigError(f"data={name} has no {split} split (it has: {', '.join(stores)}); use split=test")
        return stores[split]
    parts = [stores[s] for s in SPLITS if s in stores]
    if not all(isinstance(p, ClassStore) for p in parts):
        raise ConfigError(f"split=all joins the classes of every split, and data={name} has no classes to join; "
                          "use split=test")
    images, labels = zip(*(p.every_image() for p in parts))  # rotated classes turned: every split's classes as drawn
    offsets = torch.cumsum(torch.tensor([0] + [p.num_classes for p in parts[:-1]]), 0)
    joined = ClassStore(torch.cat(images), torch.cat([y + o for y, o in zip(labels, offsets)]),
                        [n for p in parts for n in p.class_names], mean=parts[0].mean, std=parts[0].std)
    joined.class_groups = [g for p in parts for g in p.groups_of_classes()]
    return joined


def _check_fits(store: Any, info: ProblemInfo, cfg: RunConfig, trained_on: str, path: Path) -> None:
    """One line if the data's task or input shape is not what the checkpoint's model takes."""
    name = cfg.data.name
    if store.task != info.task:
        raise ConfigError(f"{path} learned {info.task} tasks (data={trained_on}) and data={name} gives "
                          f"{store.task} tasks; evaluate it on {info.task} data")
    got, want = tuple(store.input_shape), tuple(info.input_shape)
    if got == want:
        return
    fixes, fixed_by_keys = [], True
    if len(got) == 3 and len(want) == 3:
        if got[1:] != want[1:]:
            if hasattr(cfg.data, "image_size") and want[1] == want[2]:
                fixes.append(f"data.image_size={want[1]}")
            else:
                fixed_by_keys = False
        if got[0] != want[0]:
            if hasattr(cfg.data, "channels"):
                fixes.append(f"data.channels={want[0]}")
            else:
                fixed_by_keys = False
    else:
        fixed_by_keys = False
    fix = (f"set {' '.join(fixes)}" if fixes and fixed_by_keys else
           f"data={name} has no option that makes {_shape(want)} inputs; evaluate on data of that shape")
    raise ConfigError(f"data={name} gives inputs of shape {_shape(got)} but the checkpoint's backbone was trained "
                      f"on {_shape(want)} (data={trained_on}); {fix}")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _file_name(path: Path, cfg: RunConfig, split: str, other: bool, fixed: bool, seed: int,
               precision: str | None, extra: tuple[str, ...] = ()) -> str:
    """``eval-<checkpoint>[-<split>][-<data>-<folder>-<hash>]-<W>w<S>s<Q>q-<N>ep-seed<seed>[-<precision>][-<extra>].json``:
    other data, other splits, within-group episodes, fixed episodes, another precision and test-time options
    (``extra``: fine-tuning, views, ensemble) never overwrite the file of the run's own test."""
    e, parts = cfg.eval, ["eval", path.stem]
    if split != "test":
        parts.append(split)
    if other:
        parts.append(_data_tag(cfg.data))
    if not fixed:
        parts.append(f"{e.ways}w{e.shots}s{e.queries}q" + ("-withingroup" if e.within_group else ""))
    parts += [f"{cfg.trainer.test_episodes}ep", f"seed{seed}", *([precision] if precision else []), *extra]
    return "-".join(parts) + ".json"


def _data_tag(data: Any) -> str:
    """``<name>[-<folder name>]-<8 hex of the options>`` (the data root left out: moved data is the same data)."""
    options = dataclasses.asdict(data)
    options.pop("root", None)
    key = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    folder = Path(options["path"]).name if options.get("path") else ""
    folder = re.sub(r"[^A-Za-z0-9._]+", "_", folder)[:40]
    return "-".join(p for p in (data.name, folder, key) if p)
