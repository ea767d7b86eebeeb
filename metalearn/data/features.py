"""features: a trained backbone's embeddings of another dataset's images, computed once and cached.

The few-shot learners that work on pre-trained features (LEO, Rusu et al. 2019, on a
WRN-28-10's 640-d embeddings) take their tasks from here: ``data=features
data.run=<run dir>`` runs the backbone saved in that run's checkpoint (typically
``metalearn train algo=baseline``, Chen et al. 2019's pre-training on the training
classes) over every image of every split of the dataset it was trained on, once, and
serves the vectors as ordinary class-indexed task sources: input shape ``(d,)``, the same
splits, classes and episode sampler as the images. Any algorithm runs on them with a
backbone for vectors: ``backbone=identity`` (the features as they are; LEO's setup) or
``backbone=mlp``.

* ``data.run``: a run directory (its ``checkpoints/<data.checkpoint>.pt``, ``best`` by
  default) or a checkpoint file. Any algorithm whose weights hold a ``backbone`` will do
  (baseline, baseline_pp, protonet, ...); MAML-type nets keep none apart from their head.
* ``data.source``: the dataset to embed, a ``data=`` option (``omniglot_small``,
  ``miniimagenet`` ...) with its default options; null (default): the dataset the
  checkpoint was trained on, with that run's options (its split, image size, normalisation).
* ``data.root``: the data root of the source and of the cache (``<root>/features/``); null:
  the data root the run used (else ``$METALEARN_DATA`` or ``~/.cache/metalearn``).
* ``data.cache_dir``: where the cache is written (``<cache_dir>/features/``), and the source's
  own cache dir; null: the source's (the run's), else the data root. A current cache under
  ``<root>/features/`` is read first. The split is the source's (its ``data.train``/... keys).

The images go through the run's own evaluation input transform (scaling and
normalisation, no augmentation). BatchNorm: metalearn's backbones normalise with the
statistics of the set they are given (no running averages), so an image's embedding
depends on the images it is embedded with. Each split is embedded in chunks of about
``data.batch_size`` images in a fixed random order (seed 0), so the statistics are those
of a large, class-mixed sample of the split, close to population statistics (what a
network with running averages uses at test time), and the same on every machine.

The cache file (``<root>/features/<source>-<key>.pt``, written atomically) records the
checkpoint file (name, size, mtime, step), the source's options (root and cache_dir aside) and the
files it reads (its archives, or every file of a folder it reads); when any changes, the
features are computed again. Feature extraction runs on ``data.device`` (auto: a GPU if
there is one); devices may differ in the last float bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from metalearn.data.common import DataDirs, cached, file_signature
from metalearn.data.episodes import ClassStore
from metalearn.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FORMAT = "metalearn-features-1"
CHECKPOINTS = ("best", "last")


@dataclass
class Config:
    name: str = "features"
    run: Optional[str] = None  # the run directory (or checkpoint file) whose backbone embeds the images
    checkpoint: str = "best"  # best | last: which checkpoint of a run directory
    source: Optional[str] = None  # the dataset to embed (a data= option); null: the one the run was trained on
    root: Optional[str] = None  # data root of the source and of the cache; null: the one the run used
    cache_dir: Optional[str] = None  # where the cache (and the source's caches) are written; null: the run's, else the root
    batch_size: int = 256  # images embedded together (their BatchNorm statistics are shared)
    device: str = "auto"  # where the backbone runs during extraction: auto | cpu | cuda | cuda:N | mps


def load(cfg: Config) -> dict[str, ClassStore]:
    path, ckpt, trained = _checkpoint(cfg)
    source = _source_config(cfg, trained)
    cache = _cache_file(cfg, path, source)
    meta = {"format": FORMAT, "checkpoint": file_signature(path), "checkpoint_step": int(ckpt["step"]),
            "source": _options(source), "files": _source_signature(source)}
    data = cached(cache, meta, lambda: _extract(cfg, ckpt, trained, source), f"{source.name} features",
                  _dirs(cfg, source))
    return {split: ClassStore(part["features"], part["labels"], list(part["classes"]))
            for split, part in data["splits"].items()}


def sources(cfg: Config) -> list[Path]:
    """The checkpoint file, and the files of the dataset it embeds."""
    if cfg.run is None:
        return []
    from metalearn.data import dataset_module

    path, _, trained = _checkpoint(cfg)
    source = _source_config(cfg, trained)
    module = dataset_module(source)
    return [path, *(module.sources(source) if hasattr(module, "sources") else [])]


def cache_dir(cfg: Config) -> Path | None:
    if cfg.run is None:
        return None
    _, _, trained = _checkpoint(cfg)
    return _dirs(cfg, _source_config(cfg, trained)).out


# ---------------------------------------------------------------- pieces


def _checkpoint(cfg: Config) -> tuple[Path, dict, Any]:
    """The checkpoint file, its content, and the typed config of the run that wrote it."""
    from metalearn import checkpoint
    from metalearn.config import to_run_config

    if cfg.run is None:
        raise ConfigError("data=features embeds images with a trained backbone: give data.run=<run directory> "
                          "(e.g. of 'metalearn train algo=baseline') or data.run=<checkpoint .pt file>")
    if cfg.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"data.checkpoint={cfg.checkpoint!r} is not one of: {', '.join(CHECKPOINTS)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1 (got {cfg.batch_size})")
    path = checkpoint.find(cfg.run, cfg.checkpoint).resolve()
    ckpt = checkpoint.load(path)
    trained = to_run_config(ckpt["config"])
    if not any(k.startswith("backbone.") for k in ckpt["model"]):
        raise ConfigError(f"{path} (algo={trained.algo.name}) keeps no separate backbone to embed images with; "
                          "give data.run a run of algo=baseline (or baseline_pp, protonet, ...)")
    return path, ckpt, trained


def _source_config(cfg: Config, trained: Any) -> Any:
    """The typed config of the dataset to embed: the run's own, or the ``data.source`` option's defaults."""
    from metalearn.config import _typed
    from metalearn.data import dataset_module

    if cfg.source is None:
        source = trained.data
        if source.name == "features":
            raise ConfigError(f"{cfg.run} was trained on features already; give data.source=<the dataset to embed>")
    else:
        if cfg.source == "episodes":
            raise ConfigError("data.source=episodes holds fixed test episodes, no classes to train on: embed a dataset "
                              "with train/val/test classes (data.source=omniglot, imagefolder, ...), and score fixed "
                              "episodes with metalearn eval run=<run dir> data=episodes data.path=<folder>")
        options = sorted(p.stem for p in _conf_dir().glob("*.yaml") if p.stem not in ("features", "episodes"))
        if cfg.source not in options:
            raise ConfigError(f"data.source={cfg.source!r} is not a dataset to embed; choose one of: {', '.join(options)}")
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(OmegaConf.load(_conf_dir() / f"{cfg.source}.yaml"), resolve=True)
        node.pop("defaults", None)  # the option's choices of other groups (sinusoid: backbone=mlp)
        source = _typed(dataset_module(node["name"]).Config, node, "data.source")
    if getattr(source, "task", None) == "regression" or source.name == "sinusoid":
        raise ConfigError(f"data.source={source.name} is a regression task generator, not images to embed")
    root = cfg.root if cfg.root is not None else getattr(trained.data, "root", None)  # else: the run's own root
    if root is not None and hasattr(source, "root"):
        source = dataclasses.replace(source, root=root)
    if cfg.cache_dir is not None and hasattr(source, "cache_dir"):
        source = dataclasses.replace(source, cache_dir=cfg.cache_dir)
    return source


def _conf_dir() -> Path:
    from metalearn.confdir import CONF_DIR

    return CONF_DIR / "data"


def _root(cfg: Config, source: Any) -> Path:
    root = cfg.root or getattr(source, "root", None) or os.environ.get("METALEARN_DATA") or "~/.cache/metalearn"
    return Path(root).expanduser()


def _dirs(cfg: Config, source: Any) -> DataDirs:
    """``<root>/features`` (read first) and ``<cache_dir>/features`` (written; the root's when null)."""
    root = _root(cfg, source)
    cache_dir = cfg.cache_dir or getattr(source, "cache_dir", None)
    return DataDirs(root / "features", (Path(cache_dir).expanduser() if cache_dir else root) / "features")


def _options(source: Any) -> str:
    """The source's options as canonical JSON, without its root and cache dir (moving the data changes nothing)."""
    options = dataclasses.asdict(source)
    options.pop("root", None)
    options.pop("cache_dir", None)
    return json.dumps(options, sort_keys=True, default=str)


def _cache_file(cfg: Config, path: Path, source: Any) -> Path:
    """One cache file per (checkpoint, source options): a changed checkpoint or dataset rebuilds it in place."""
    key = hashlib.sha1(f"{path}\n{_options(source)}\n{cfg.batch_size}".encode()).hexdigest()[:16]
    return _dirs(cfg, source).out / f"{source.name}-{key}.pt"


def _source_signature(source: Any) -> list:
    """Name, size and mtime of the files the source reads: its archives, or every file of a folder it reads
    when it lists no file (a folder that the loader extracts next to its archive does not count)."""
    from metalearn.data import dataset_module

    module = dataset_module(source)
    paths = [Path(p) for p in (module.sources(source) if hasattr(module, "sources") else [])]
    files = [p for p in paths if p.is_file()]
    if not files:
        files = sorted(f for p in paths if p.is_dir() for f in p.rglob("*") if f.is_file())
    return file_signature(*files)


def _extract(cfg: Config, ckpt: dict, trained: Any, source: Any) -> dict:
    """Embed every image of every split of ``source`` with the checkpoint's backbone."""
    from metalearn.data import load_splits
    from metalearn.data.common import episode_transforms
    from metalearn.engine import resolve_device
    from metalearn.models import backbone_module

    stores = load_splits(source)
    if stores["train"].task != "classification":
        raise ConfigError(f"data.source={source.name} gives {stores['train'].task} tasks, not images to embed")
    _, transform = episode_transforms(source, stores["train"])
    device = resolve_device(cfg.device)
    backbone = backbone_module(trained.backbone).build(trained.backbone, stores["train"].input_shape)
    state = {k.removeprefix("backbone."): v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the backbone of {cfg.run} does not fit {source.name}'s images "
                              f"{tuple(stores['train'].input_shape)} ({str(e).splitlines()[0]}); "
                              "embed the dataset it was trained on, or one with the same image shape") from None
    backbone.to(device).eval()
    splits = {}
    for split, store in stores.items():
        store = store.materialized()  # data.source.rotations: the turned classes are embedded too
        log.info("embedding %d %s images of %s with %s", len(store), split, source.name, trained.backbone.name)
        splits[split] = {"features": embed(backbone, store, transform, cfg.batch_size, device),
                         "labels": torch.arange(store.num_classes).repeat_interleave(store.counts.cpu()),
                         "classes": list(store.class_names)}
    return {"splits": splits}


@torch.no_grad()
def embed(backbone: torch.nn.Module, store: ClassStore, transform, batch_size: int, device: torch.device) -> torch.Tensor:
    """Features [N, F] (float32, on the CPU, in the store's order) of every image of ``store``.

    The images are taken in a fixed random order (seed 0) and embedded in near-equal chunks of at
    most ``batch_size``: each chunk is one set for BatchNorm, a class-mixed sample of the split.
    """
    n = len(store)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    out = None
    generator = torch.Generator().manual_seed(0)  # the evaluation transform draws nothing; the signature wants one
    for idx in order.tensor_split(max(1, math.ceil(n / batch_size))):
        images = store.images[idx.to(store.images.device)]
        x = transform(images, generator) if transform is not None else images.float().div_(255.0)
        features = backbone(x.to(device)).float().cpu()
        if out is None:
            out = torch.empty(n, features.shape[1])
        out[idx] = features
    return out if out is not None else torch.empty(0, 0)
