"""The Python API: what ``metalearn train`` and ``metalearn eval`` do, from a notebook or a script.

    import metalearn

    cfg = metalearn.compose(["algo=protonet", "data=glyphs", "steps=500"])   # the CLI's config, interpolations kept
    run = metalearn.train(cfg)                                               # -> Run (results, run_dir)
    print(run.accuracy, run.ci95)
    result = metalearn.evaluate(run.run_dir, shots=5)                         # other episode shapes
    algo = metalearn.load(run.run_dir)                                        # the trained Algorithm
    for batch in metalearn.episodes("glyphs", ways=5, shots=1, queries=15):  # TaskBatch, forever
        ...

Configs are composed by Hydra's compose API from metalearn's ``conf/`` (plus ``config_dir=``, the folder of
your own config groups, as ``--config-dir`` on the command line), so a config here is the one the CLI would
run. Errors are ``metalearn.errors.MetalearnError`` exceptions whose message is the CLI's one line.
A run directory written here has what ``metalearn report``, ``eval`` and ``train resume=`` read
(``.hydra/config.yaml``, ``.hydra/overrides.yaml``, ``train.log``, TensorBoard events, checkpoints,
``results.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from metalearn import confdir, plugins
from metalearn.errors import ConfigError, MetalearnError

log = logging.getLogger("metalearn")


def _searchpath(overrides: Sequence[str], config_dir: str | Path | None) -> list[str]:
    if config_dir is not None:
        confdir.check_config_dir(config_dir, "config_dir=")
    return confdir.with_searchpath(overrides, config_dir)


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Hydra's composition on metalearn's configs (set apart from any Hydra app the caller runs), its mistakes
    the CLI's one-line ConfigErrors (an unknown group option too, which Hydra skips for optional groups)."""
    import functools

    from hydra import compose as hydra_compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plugins.register_configs()
    overrides = list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(str(e).splitlines()[0].rstrip(".") + "; overrides look like key=value") from None
    confdir.check_searchpath(parsed)
    searchpath = [o.input_line for o in parsed if o.get_key_element() == "hydra.searchpath"]
    options = functools.partial(confdir.group_options, config_name, searchpath)
    with confdir.isolated():
        for o in parsed:
            if not o.is_sweep_override():  # a sweep is Hydra's one-line error below
                confdir.check_choice(options, o.get_key_element(), [o.value()])
        try:
            return hydra_compose(config_name, overrides=overrides)
        except HydraException as e:
            raise ConfigError(confdir.error_line(str(e), options, functools.partial(confdir.compose_job, config_name),
                                                 overrides)) from None
        except OmegaConfBaseException as e:
            raise ConfigError(str(e).strip().splitlines()[0]) from None


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The config ``metalearn train *overrides`` runs (``eval.shots: ${shots}`` and the other interpolations kept),
    checked: a mistake raises the CLI's one-line ConfigError. Change it as any DictConfig before ``train``."""
    from metalearn.config import to_run_config

    cfg = _compose("config", _searchpath(overrides, config_dir))
    to_run_config(cfg)
    return cfg


@dataclasses.dataclass
class Run:
    """A finished training run: its directory, typed config and ``results.json``."""

    run_dir: Path
    config: Any  # metalearn.config.RunConfig
    results: dict

    @property
    def metric(self) -> str:
        return self.results["best_val"]["metric"]

    @property
    def accuracy(self) -> float:
        """Mean test accuracy (classification runs)."""
        return self.results["test"]["accuracy"]["mean"]

    @property
    def ci95(self) -> float:
        """95% CI half-width of the test metric."""
        return self.results["test"][self.metric]["ci95"]

    def load(self, checkpoint: str = "best", algorithm: Any = None):
        return load(self.run_dir, checkpoint, algorithm)

    def evaluate(self, **options: Any) -> dict:
        return evaluate(self.run_dir, **options)


@contextlib.contextmanager
def _run_logging(run_dir: Path) -> Iterator[None]:
    """During a run: log lines to the console (a notebook shows stderr) unless the user configured logging, and to
    ``run_dir/train.log`` as the CLI does; after it, the ``metalearn`` logger as it was (handlers and level)."""
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if not log.handlers and not logging.getLogger().handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        handlers.append(console)
    file = logging.FileHandler(run_dir / "train.log")
    file.setFormatter(fmt)
    handlers.append(file)
    level = log.level
    for h in handlers:
        log.addHandler(h)
    if level == logging.NOTSET or level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(level)


def train(config: DictConfig | Sequence[str] | None = None, run_dir: str | Path | None = None,
          algorithm: Any = None, config_dir: str | Path | None = None) -> Run:
    """Meta-train, validate, checkpoint and test, as ``metalearn train`` does; returns the Run.

    ``config``: a composed config (``compose``) or a list of overrides; ``run_dir``: where the run is written
    (default ``outputs/<date>/<time>`` under the working directory); ``algorithm``: an Algorithm object built in
    Python, trained instead of ``config.algo`` (its class is recorded in the checkpoints; ``load(run_dir,
    algorithm=...)`` loads its weights back)."""
    from metalearn import engine
    from metalearn.config import to_run_config

    overrides: list[str] = []
    if config is None or not isinstance(config, DictConfig):
        overrides = list(config or [])
        config = compose(overrides, config_dir)
    run_cfg = to_run_config(config)
    if run_cfg.resume is not None:
        raise ConfigError("resume= is a command-line option: metalearn train resume=<run dir>")
    now = datetime.datetime.now()
    run_dir = Path(run_dir) if run_dir is not None else Path("outputs") / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S-%f}"
    if (run_dir / "checkpoints").is_dir() or (run_dir / "results.json").is_file():
        raise ConfigError(f"{run_dir} holds a run already; give another run_dir, or continue that one with "
                          f"metalearn train resume={run_dir}")
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    job = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    job.pop("hydra", None)
    if algorithm is not None:  # recorded as what was trained: its class, not the config's algo it replaced
        record = plugins.object_record(algorithm)
        run_cfg = dataclasses.replace(run_cfg, algo=record)
        job.algo = dataclasses.asdict(record)
    from metalearn.fileio import atomic_write_text

    atomic_write_text(hydra_dir / "config.yaml", OmegaConf.to_yaml(job, resolve=False))
    atomic_write_text(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    try:
        with _run_logging(run_dir):
            results = engine.train(run_cfg, run_dir, algorithm=algorithm)
    except MetalearnError:
        _remove_if_unused(run_dir)  # after the log file is closed
        raise
    return Run(run_dir=run_dir, config=run_cfg, results=results)


def _remove_if_unused(run_dir: Path) -> None:
    """A run that failed before training started (a bad backbone option, missing data) leaves nothing behind:
    what ``train`` wrote (``.hydra/``, ``train.log``) goes, and only if the folder holds nothing else."""
    import shutil

    if run_dir.is_dir() and not {p.name for p in run_dir.iterdir()} - {".hydra", "train.log"}:
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        (run_dir / "train.log").unlink(missing_ok=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass


def evaluate(run_dir: str | Path | Sequence[str | Path], checkpoint: str = "best", **options: Any) -> dict:
    """Score a run's checkpoint as ``metalearn eval run=<run_dir>`` does: ``options`` are eval's keys (``ways``,
    ``shots``, ``queries``, ``episodes``, ``seed``, ``split``, ``data`` ...), values as Python values, a dict for a
    group of keys (``finetune={"steps": 50, "part": "last"}``, ``tta={"views": 4}``). ``run_dir``: a list of runs
    is an ensemble (``run=[A,B]``). Returns the results (also written beside the (first) run as ``eval-*.json``)."""
    from metalearn.evaluation import evaluate_checkpoint

    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint={checkpoint!r} is not one of: best, last")
    runs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    given = Path(runs[0]).absolute() if len(runs) == 1 else _literal([str(Path(r).absolute()) for r in runs])
    overrides = [f"run={given}", f"checkpoint={checkpoint}"]
    for key, value in options.items():
        overrides += _overrides(key, value)
    return evaluate_checkpoint(_compose("eval", overrides))


def _overrides(key: str, value: Any) -> list[str]:
    """``key=value`` as overrides; a dict as one override per entry (``key.entry=...``)."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in _overrides(f"{key}.{k}", v)]
    return [f"{key}={_literal(value)}"]


def _literal(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def load(run_dir: str | Path, checkpoint: str = "best", algorithm: Any = None):
    """The trained Algorithm of a run (or a checkpoint file), on the CPU, in eval mode. Its inputs are what the
    run's episodes gave it (normalised as ``algo.input_transform`` says, None: unnormalised). ``algorithm``: an
    object of the same kind to load the weights into (needed for runs of an algorithm built in Python)."""
    from metalearn import checkpoint as checkpoints
    from metalearn import engine
    from metalearn.config import to_run_config
    from metalearn.renamed import migrate

    path = checkpoints.find(run_dir, checkpoint)
    ckpt = checkpoints.load(path)
    record = ckpt.get("problem")
    if record is None:
        raise ConfigError(f"{path} predates checkpoints that record their training problem; score it with "
                          f"metalearn eval run=<run dir>")
    info, transform = engine.from_problem_record(record)
    if algorithm is None:
        stored = ckpt["config"]
        migrate(stored)
        algorithm = engine.build_algorithm(to_run_config(stored), info)
    checkpoints.load_model_state(algorithm, ckpt["model"], path)
    algorithm.input_transform = transform
    return algorithm.eval()


def episodes(data: str = "glyphs", ways: int = 5, shots: int = 1, queries: int = 15, split: str = "train",
             batch_size: int = 1, seed: int = 0, overrides: Sequence[str] = (),
             config_dir: str | Path | None = None) -> Iterator[Any]:
    """Episodes of a dataset, as the trainer samples them: an endless iterator of TaskBatch
    (``support_x [B, N*K, ...]``, ``support_y``, ``query_x [B, N*Q, ...]``, ``query_y``; labels 0..N-1 per episode),
    normalised as a run on that data would be. ``overrides``: the dataset's keys (``data.root=...``)."""
    from metalearn.config import to_run_config
    from metalearn.data import load_splits
    from metalearn.engine import set_transforms

    cfg = to_run_config(_compose("config", _searchpath([f"data={data}", *overrides], config_dir)))
    stores = load_splits(cfg.data)
    if split not in stores:
        raise ConfigError(f"data={data} has no {split} split (it has: {', '.join(stores)})")
    set_transforms(cfg.data, stores)
    store = stores[split]
    store.check_episode(split, ways, shots, queries)
    sampler = store.sampler(ways, shots, queries, batch_size, seed, training=split == "train")
    return iter(sampler.sample, None)  # endless: sample() never returns None
