"""The ``metalearn`` command: ``metalearn <command> [Hydra arguments]``.

The dispatcher takes the command word off ``sys.argv`` and hands the rest to
that command's Hydra app: ``--help``, ``--cfg job``, ``--info``, ``-m`` and tab
completion work as Hydra users know them. Hydra's flags go to ``hydra.main``,
which parses ``sys.argv`` itself; plain overrides (with or without ``-m``) are
checked first and run by ``_launch``, which does what ``hydra.main`` does with
one composition of the config instead of three (about a second per command).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metalearn import __version__, confdir, sweeps  # sweeps: the resolvers of conf/hparams_search
from metalearn.confdir import CONF_DIR
from metalearn import hostmem, plugins

log = logging.getLogger("metalearn")

OmegaConf.register_new_resolver("metalearn_run_dir", lambda resume, default: resume if resume else default, replace=True)
OmegaConf.register_new_resolver("metalearn_output_subdir", sweeps.output_subdir, replace=True)

COMMANDS = {
    "train": "meta-train a few-shot learner: TensorBoard logs, checkpoints, test accuracy +- 95% CI",
    "eval": "evaluate a trained run on test episodes: accuracy +- 95% CI",
    "data": "'data info data=<name>': what is on disk; 'data prepare data=<name>': download and cache it",
    "report": "'report <run or sweep dir>': compare runs (seeds aggregated): report.md, report.csv, plots",
    "reproduce": "'reproduce experiment=<preset>,...' or 'reproduce --from DIR': paper figure vs measured, one table",
    "new": "'new algo|backbone|data NAME [--dir DIR]': a working template of your own (module, YAML, test)",
}

USAGE = f"""usage: metalearn <command> [key=value ...] [hydra flags]

commands:
{chr(10).join(f"  {name:<9} {text}" for name, text in COMMANDS.items())}

examples:
  metalearn train data=glyphs algo=protonet steps=500
  metalearn train -m algo=maml,protonet shots=1,5 data=glyphs steps=200
  metalearn train resume=outputs/<date>/<time>
  metalearn eval run=outputs/<date>/<time> shots=5
  metalearn data prepare data=cifarfs data.root=/data
  metalearn report outputs/multirun/<date>/<time>
  metalearn reproduce experiment=maml_sinusoid_k10,protonet_omniglot_5w1s

'metalearn <command> --help' lists that command's config groups and options;
'metalearn train --cfg job' prints the composed config.
"""


def fail(error: Exception, code: int = 2):
    group = sys.modules["metalearn.distributed"].current() if "metalearn.distributed" in sys.modules else None
    if group is None or group.claim(str(error)):  # under torchrun: unless another rank printed it already
        print(f"metalearn: error: {error}", file=sys.stderr)
    if group is not None:
        group.failed(str(error), code)
    sys.exit(code)


# ---------------------------------------------------------------- train


def _resume_config(cfg: DictConfig):
    """The run's own saved config, with the few overrides that may change on resume applied."""
    from metalearn import checkpoint
    from metalearn.config import to_run_config
    from metalearn.errors import ConfigError

    path, ckpt = checkpoint.load_for_resume(cfg.resume)  # readable, and this run's
    saved = OmegaConf.create(ckpt["config"])
    changeable = ("steps", "trainer", "device", "data.root", "data.cache_dir", "eval.batch_size")
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume":
            continue
        if not key.startswith(changeable):
            raise ConfigError(f"'{override}' cannot change when resuming (only steps, trainer.*, device, data.root, data.cache_dir, eval.batch_size); start a new run instead")
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    saved.resume = str(Path(cfg.resume))
    return to_run_config(saved), ckpt


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def train_app(cfg: DictConfig) -> float | None:
    from metalearn import distributed, engine
    from metalearn.config import to_run_config
    from metalearn.errors import MetalearnError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep_job = sweeps.in_multirun()  # a failed job must not end the sweep; an earlier attempt is continued
    try:
        run_cfg, ckpt = _resume_config(cfg) if cfg.resume else (to_run_config(cfg), None)
        distributed.current().share_job(run_cfg, run_dir, cfg.resume)  # under torchrun: the other ranks follow
        results = (sweeps.train_job(run_cfg, run_dir, resume_from=ckpt) if sweep_job
                   else engine.train(run_cfg, run_dir, resume_from=ckpt))
    except MetalearnError as e:
        if sweep_job:
            return sweeps.job_failed(run_dir, e)
        _remove_if_unused(run_dir, resumed=bool(cfg.resume))
        fail(e, e.exit_code)
    except engine.Stopped as s:
        print(f"metalearn: {s}", file=sys.stderr)
        if sweep_job and s.exit_code == 0:  # trainer.stop_at: the sweep goes on to its next job
            return None
        sys.exit(s.exit_code)
    engine.print_results(results)
    print(f"results: {run_dir / 'results.json'}")
    return results["best_val"]["value"]  # what a Hydra sweeper optimises


def _remove_if_unused(run_dir: Path, resumed: bool) -> None:
    """A single run that failed before training started (missing data, a bad backbone option) leaves
    no empty time-named directory behind. Only what Hydra wrote for this run (``.hydra/``,
    ``train.log``) is removed, and only if nothing else is there: a folder given as
    ``hydra.run.dir`` that holds other files, a started run (TensorBoard events, checkpoints)
    and sweep jobs (their log tells what failed) are left as they are."""
    from hydra.types import RunMode

    if resumed or HydraConfig.get().mode != RunMode.RUN or not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} - {".hydra", "train.log"}:
        return
    logging.shutdown()  # close train.log before removing it
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / "train.log").unlink(missing_ok=True)
    cwd = Path.cwd().resolve()
    for folder in [run_dir.resolve(), *run_dir.resolve().parents]:  # outputs/<date>/ too, if this run was all they held
        if folder == cwd or cwd not in folder.parents:
            break
        try:
            folder.rmdir()  # only ever removes an empty folder
        except OSError:
            break


# ---------------------------------------------------------------- eval


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def eval_app(cfg: DictConfig) -> None:
    from metalearn.errors import ConfigError, MetalearnError

    try:
        if (cfg.run is None) == (cfg.ckpt is None):
            raise ConfigError("give exactly one of run=<run directory> or ckpt=<checkpoint file>")
        if cfg.checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint={cfg.checkpoint!r} is not one of: best, last")
        evaluate_checkpoint(cfg)
    except MetalearnError as e:
        fail(e, e.exit_code)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Score a checkpoint on the run's own test episodes or on other data (metalearn/evaluation.py)."""
    from metalearn.evaluation import evaluate_checkpoint as evaluate

    return evaluate(cfg)


# ---------------------------------------------------------------- data


def data_command(args: list[str]) -> int:
    """``metalearn data info|prepare data=<name> [data.key=value ...]`` (no run directory, no Hydra app)."""
    import dataclasses

    from hydra import compose

    from metalearn.config import to_run_config
    from metalearn.data import dataset_module, load_splits
    from metalearn.errors import MetalearnError

    config_dir, args = _config_dir(args)
    if not args or args[0] not in ("info", "prepare") or any(a.startswith("-") for a in args[1:]):
        fail("usage: metalearn data info|prepare data=<name> [data.<key>=<value> ...] [--config-dir DIR] "
             "(no other flags, no sweeps)")
    action, overrides = args[0], args[1:]
    overrides = confdir.with_searchpath(overrides, config_dir)  # the user's own data options, as train finds them
    _precheck("train", overrides)
    from hydra.errors import HydraException

    try:
        with confdir.initialized():
            cfg = to_run_config(compose("config", overrides=overrides)).data
    except HydraException as e:  # e.g. a sweep (a,b), which a data command cannot take
        fail(f"{str(e).splitlines()[0]}; 'metalearn data' takes one value per key, no sweeps")
    module = dataset_module(cfg)
    sources = module.sources(cfg) if hasattr(module, "sources") else []
    print(f"dataset {cfg.name}")
    for path in sources:
        print(f"  {_describe_path(path)}")
    if not sources:
        print("  (no files: generated on the fly)" if not hasattr(cfg, "root") else "  (no files: see the data.* options)")
    if action == "info" and hasattr(cfg, "download"):
        cfg = dataclasses.replace(cfg, download=False)  # info only looks
    try:
        stores = load_splits(cfg)
    except MetalearnError as e:
        print(f"not ready: {e}")
        if action == "info" and getattr(module.Config, "download", False):
            print("('metalearn data prepare' with the same arguments downloads what can be downloaded)")
        return 1
    for split, store in stores.items():
        if store.task != "classification":
            print(f"  {split}: {store.task} tasks drawn on the fly, inputs of shape {tuple(store.input_shape)}")
        else:
            turned = " (and their turns by 90 degrees, drawn as classes of their own)" if getattr(store, "turns", 1) > 1 else ""
            print(f"  {split}: {store.num_classes} classes, {len(store)} images of {'x'.join(map(str, store.input_shape))}{turned}")
    cache = module.cache_dir(cfg) if hasattr(module, "cache_dir") else None
    if cache is None and sources and not hasattr(module, "cache_dir"):  # a cache_dir() of None: nothing is cached
        cache = Path(sources[0]).parent / "cache"  # the convention: cache/ beside the files it is built from
        if getattr(cfg, "cache_dir", None):  # ... in the dataset's folder under data.cache_dir
            cache = Path(cfg.cache_dir).expanduser() / Path(sources[0]).parent.name / "cache"
    if cache is not None:
        files = sorted(p for p in Path(cache).glob("*") if p.is_file() and not p.name.startswith("."))
        print(f"cache {cache}: " + (", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in files) or "empty"))
    print("ready")
    return 0


def _describe_path(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        return f"{path}  ({path.stat().st_size / 1e6:.1f} MB)"
    if path.is_dir():
        return f"{path}/  (folder, {sum(1 for p in path.rglob('*') if p.is_file())} files)"
    return f"{path}  (missing)"


APPS = {"train": train_app, "eval": eval_app}


# ---------------------------------------------------------------- dispatcher


def _sweep_dir_names(args: list[str]) -> list[str]:
    """In a multirun, name each job's directory by the swept keys only (``3_algo=maml,shots=5``).

    Hydra's ``override_dirname`` lists every override; excluding the keys that do not vary keeps
    the names short and makes them readable as TensorBoard run names.
    """
    if not any(a in ("-m", "--multirun", "hydra.mode=MULTIRUN") for a in args):
        return args
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException:
        return args  # Hydra will report it
    fixed = [o.get_key_element() for o in parsed if not o.is_sweep_override()]
    if any(o.get_key_element() == "hydra.job.config.override_dirname.exclude_keys" for o in parsed):
        return args
    keys = sorted(set(fixed) | {"resume", "data.root", "data.cache_dir", "device", "device.type", "trainer.progress"})
    return [*args, f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"]


def _precheck(command: str, args: list[str]) -> DictConfig:
    """Compose the config once before Hydra runs, to turn its multi-line errors into one line.

    ``args``: a plain override list, plus -m (Hydra's other flags go to hydra.main: ``_run_app``).
    Sweeps are checked with the first value of each swept key, and every value of swept groups.
    Composed with Hydra's compose API on metalearn's configs (and ``hydra.searchpath``), with the hydra.mode
    override hydra.main adds, and returned with its ``hydra`` node: a single run runs on it (``_launch``).
    """
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from metalearn.config import to_run_config
    from metalearn.errors import ConfigError, MetalearnError

    overrides = [a for a in args if not a.startswith("-")]
    config_name = "config" if command == "train" else "eval"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        fail(ConfigError(str(e).splitlines()[0].rstrip(".") + "; overrides look like key=value"))
    try:
        confdir.check_searchpath(parsed)
    except ConfigError as e:
        fail(e)
    searchpath = [o.input_line for o in parsed if o.get_key_element() == "hydra.searchpath"]
    options = functools.partial(confdir.group_options, config_name, searchpath)
    if "-m" not in args and "--multirun" not in args and any(o.get_key_element() == "hparams_search" for o in parsed):
        fail(ConfigError("hparams_search=... is an Optuna search, which runs as a sweep: add -m "
                         "(metalearn train -m hparams_search=<preset> ...)"))
    first = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_interval_sweep():  # an Optuna search range: checked at its lower end
            if not any(p.get_key_element() in ("hparams_search", "hydra/sweeper") for p in parsed):
                fail(ConfigError(f"'{o.input_line}' is a search range, which only the Optuna sweeper takes: add "
                                 "hparams_search=<preset> (or hydra/sweeper=optuna), or list values (a,b,c)"))
            values = [o.value().start]
        else:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        try:
            confdir.check_choice(options, key, values)
        except ConfigError as e:
            fail(e)
        first.append(f"{key}={values[0]}" if o.is_sweep_override() else o.input_line)
    multirun, mode = _run_mode(args, parsed)
    try:
        with confdir.hydra_initialized():
            cfg = compose(config_name, overrides=[*first, *mode], return_hydra_config=True)
    except HydraException as e:
        fail(ConfigError(confdir.error_line(str(e), options, functools.partial(confdir.compose_job, config_name), first)))
    except OmegaConfBaseException as e:
        fail(ConfigError(str(e).splitlines()[0]))
    # the checks see the job's config: the hydra node has parts only a running app resolves (hydra.job.num)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        if command == "train" and job.get("resume") is not None:
            from metalearn import checkpoint

            checkpoint.load_for_resume(job.resume)  # before Hydra creates the run directory or writes its log
        elif command == "train":
            to_run_config(job)
        if command == "train":
            _check_writable(_output_dir(cfg, multirun))
    except MetalearnError as e:
        fail(e)
    return cfg


def _run_mode(args: list[str], parsed) -> tuple[bool, list[str]]:
    """Whether Hydra runs this command as a sweep (-m, or a hydra.mode=MULTIRUN override: no config file of
    metalearn's sets hydra.mode, tests/test_cli.py checks it), and the override hydra.main then adds
    (hydra/_internal/utils.py: _run_app): the mode when none is given, MULTIRUN under -m whatever is given."""
    given = [str(o.value()) for o in parsed if o.get_key_element() == "hydra.mode"][-1:]
    if "-m" in args or "--multirun" in args or given == ["MULTIRUN"]:
        return True, [] if given == ["MULTIRUN"] else ["hydra.mode=MULTIRUN"]
    return False, [] if given else ["hydra.mode=RUN"]


def _launch(command: str, args: list[str], config_dir: str | None = None) -> None:
    """Run ``command``'s Hydra app on plain overrides (and -m), through Hydra's public API. A single run is
    composed once (the precheck's composition, by the compose API) and run on that config (``_run_composed``),
    where ``hydra.main`` would compose it twice more; a sweep is checked on its first values, then run by
    ``hydra.main`` (Hydra's multirun, launchers and sweepers)."""
    overrides = confdir.with_searchpath(args, config_dir)
    if _run_mode(args, _parsed(overrides))[0]:
        _precheck(command, overrides)  # a mistake ends here, in one line
        given = ["--config-dir", str(Path(config_dir).absolute())] if config_dir else []
        sys.argv = [sys.argv[0], *given, *args]
        APPS[command]()
        return
    task = APPS[command].__wrapped__  # the function under @hydra.main
    with confdir.initialized():
        cfg = _precheck(command, overrides)  # a mistake ends here, in one line
        _run_composed(cfg, "config" if command == "train" else "eval", task)


def _parsed(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([a for a in overrides if not a.startswith("-")])
    except HydraException:
        return []  # the precheck reports it


class _Callbacks:
    """The run's ``hydra.callbacks``, instantiated and told of the run's events as Hydra's own runner does: a
    callback that raises is a warning, not the end of the run."""

    def __init__(self, cfg: DictConfig):
        from hydra.utils import instantiate

        self.callbacks = [instantiate(c) for c in (OmegaConf.select(cfg, "hydra.callbacks") or {}).values()]

    def _notify(self, event: str, reverse: bool = False, **kwargs) -> None:
        import warnings

        for c in reversed(self.callbacks) if reverse else self.callbacks:
            try:
                getattr(c, event)(**kwargs)
            except Exception as e:  # noqa: BLE001 - as Hydra: a callback's failure is reported, the run goes on
                warnings.warn(f"Callback {type(c).__name__}.{event} raised {type(e).__name__}: {e}")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self._notify("on_job_start", config=config, **kwargs)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        self._notify("on_job_end", reverse=True, config=config, job_return=job_return, **kwargs)


def _run_composed(cfg: DictConfig, config_name: str, task) -> None:
    """What ``hydra.main`` does with a run's composed config (Hydra 1.3's ``Hydra.run``), through Hydra's public
    API: Hydra's logging, the run's callbacks, the job (run directory, .hydra/, the job's logging, the task)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext

    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    callbacks = _Callbacks(cfg)
    callbacks._notify("on_run_start", config=cfg, config_name=config_name)
    ret = run_job(hydra_context=HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks),
                  task_function=task, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                  configure_logging=True)
    callbacks._notify("on_run_end", reverse=True, config=cfg, config_name=config_name, job_return=ret)
    _ = ret.return_value  # raises the task's exception, as Hydra.run does


def _output_dir(cfg: DictConfig, multirun: bool) -> Path | None:
    """Where Hydra will put this command's run (or sweep) directory, or None if it cannot be told yet."""
    try:
        value = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir",
                                 throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - e.g. a ${hydra:...} only a running app resolves: Hydra reports it then
        return None
    return None if value is None else Path(str(value))


def _check_writable(folder: Path | None) -> None:
    """A run directory that cannot be made (a read-only file system or folder, a path through a file) is
    one line before Hydra tries, instead of Hydra's traceback. The check makes and removes a temp folder
    in the nearest existing parent; nothing stays behind."""
    import tempfile

    from metalearn.errors import ConfigError

    if folder is None:
        return
    parent = folder.absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".metalearn-check-", dir=parent))
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file")
    except OSError as e:
        why = e.strerror or str(e)
        raise ConfigError(f"cannot create the run directory {folder} ({why}); run from a writable directory "
                          "or set hydra.run.dir=<writable path> (hydra.sweep.dir for -m)") from None


def _ensemble_lists(args: list[str]) -> list[str]:
    """``metalearn eval run=A,B,C`` (or ``ckpt=``) without -m is one ensemble of the runs, ``run=[A,B,C]``; Hydra
    would take it for a sweep (and, not sweeping, score A alone). With -m it stays a sweep: each run by itself."""
    from hydra.core.override_parser.types import ChoiceSweep

    from metalearn.api import _literal

    if _run_mode(args, _parsed(args))[0]:
        return args
    out = []
    for a in args:
        o = next(iter(_parsed([a])), None)
        if o is not None and o.get_key_element() in ("run", "ckpt") and isinstance(o.value(), ChoiceSweep):
            a = f"{o.get_key_element()}={_literal([str(v) for v in o.value().list])}"
        out.append(a)
    return out


def _complete(args: list[str]) -> int:
    """Hydra tab completion through the dispatcher: route the query to the command being typed."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    app = "train" if len(words) >= 2 and words[1] == "reproduce" else words[1] if len(words) >= 2 else None
    typed_command = app in APPS and (len(words) > 2 or line.endswith(" "))  # reproduce takes train's overrides
    if len(words) >= 2 and words[1] == "report" and (len(words) > 2 or line.endswith(" ")):
        return 0  # no suggestions: the shell completes directory names
    if typed_command:
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")
        sys.argv = [sys.argv[0], *args]
        APPS[app]()
        return 0
    if any(a.startswith("query") for a in args):
        prefix = words[1] if len(words) == 2 and not line.endswith(" ") else ""
        print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
        return 0
    sys.argv = [sys.argv[0], *args]
    train_app()  # install / uninstall scripts are the same for every command
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"metalearn {__version__}")
        return 0
    if args[0] in ("-sc", "--shell-completion"):
        return _complete(args)
    command, rest = args[0], args[1:]
    hostmem.retain_freed_memory()  # a process setting: freed activations stay for the next task (hostmem.py)
    plugins.register_configs()  # installed plug-ins are options of their groups (algo=<entry point name>); once
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # a torchrun worker: see metalearn/distributed.py
        from metalearn import distributed, engine

        return distributed.main(command, rest, _run_app, engine.follow)
    if command == "data":
        from metalearn.errors import MetalearnError

        try:
            return data_command(rest)
        except MetalearnError as e:
            fail(e, e.exit_code)
    if command == "new":  # templates of your own algorithm, backbone or dataset (metalearn/scaffold.py)
        from metalearn.errors import MetalearnError
        from metalearn.scaffold import new_command

        try:
            return new_command(rest)
        except MetalearnError as e:
            fail(e, e.exit_code)
    if command == "report":  # a directory argument, not a Hydra app
        from metalearn.errors import MetalearnError
        from metalearn.report import report_command

        try:
            return report_command(rest)
        except MetalearnError as e:
            fail(e, e.exit_code)
    if command == "reproduce":  # the train app over presets, then a table (metalearn/reproduce.py)
        from metalearn.errors import MetalearnError
        from metalearn.reproduce import reproduce_command

        try:
            config_dir, rest = _config_dir(rest)  # the user's presets: a hydra.searchpath override
            return reproduce_command(confdir.with_searchpath(rest, config_dir), functools.partial(_run_app, "train"))
        except MetalearnError as e:
            fail(e, e.exit_code)
    if command not in APPS:
        fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)} (see metalearn --help)")
    return _run_app(command, rest)


def _config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """Hydra's ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``: a folder of the user's own config groups)
    taken out of ``args``, checked: (the folder or None, the other arguments)."""
    from metalearn.errors import ConfigError

    folder, rest, words = None, [], iter(args)
    for a in words:
        if a in ("--config-dir", "-cd"):
            folder = next(words, None)
            if folder is None:
                fail(ConfigError(f"{a} needs a folder: {a} <folder of your config groups>"))
        elif a.startswith("--config-dir="):
            folder = a.split("=", 1)[1]
        else:
            rest.append(a)
    if folder is not None:
        try:
            confdir.check_config_dir(folder, "--config-dir")
        except ConfigError as e:
            fail(e)
    return folder, rest


def _searchpath_folder(args: list[str]) -> str | None:
    """The first local folder a ``hydra.searchpath`` override names (``file://DIR`` or a plain path), or None."""
    for o in _parsed(args):
        if o.get_key_element() == "hydra.searchpath" and isinstance(o.value(), list):
            for entry in o.value():
                folder = str(entry).removeprefix("file://")
                if "://" not in folder and Path(folder).is_dir():
                    return folder
    return None


#: Hydra's flags that take a value (hydra/_internal/utils.py, get_args_parser), and --info's optional one.
_VALUED_FLAGS = ("--cfg", "-c", "--package", "-p")
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _overrides_beside_flags(args: list[str]) -> list[str] | None:
    """The overrides (and -m) among Hydra's flags, to check before hydra.main runs them; None where nothing is to
    be checked: help and version flags, or a flag that changes the primary config (Hydra reports those)."""
    if any(a in ("--help", "-h", "--hydra-help", "--version", "--config-path", "-cp", "--config-name", "-cn",
                 "--experimental-rerun") for a in args):
        return None
    out, i = [], 0
    while i < len(args):
        a = args[i]
        i += 1
        if a in _VALUED_FLAGS:
            i += 1
        elif a in ("--info", "-i"):
            i += i < len(args) and args[i] in _INFO_VALUES
        elif not a.startswith("-") or a in ("-m", "--multirun"):
            out.append(a)
    return out


def _run_app(command: str, rest: list[str]) -> int:
    config_dir, plain = _config_dir(rest)
    if command == "eval":
        plain = _ensemble_lists(plain)
    args = _sweep_dir_names(plain) if command == "train" else plain
    try:
        with sweeps.sweeper_errors_raised(command, rest):
            if any(a.startswith("-") and a not in ("-m", "--multirun") for a in plain):
                modes = [f for f in ("-m", "--multirun", "--cfg", "-c", "--info", "-i", "--run", "-r") if f in plain]
                if len(modes) > 1:
                    from metalearn.errors import ConfigError

                    fail(ConfigError(f"{' and '.join(modes)} cannot be given together: run the sweep (-m), print the "
                                     "config (--cfg) or ask for information (--info), one at a time"))
                checked = _overrides_beside_flags(plain)
                if checked is not None:  # a mistake is one line with Hydra's flags too
                    _precheck(command, confdir.with_searchpath(checked, config_dir))
                if config_dir is None and any(a in ("--help", "-h") for a in plain):
                    config_dir = _searchpath_folder(plain)  # Hydra's help lists the groups of --config-dir only
                given = ["--config-dir", str(Path(config_dir).absolute())] if config_dir else []
                sys.argv = [sys.argv[0], *given, *args]
                APPS[command]()  # Hydra's flags (--help, --cfg, --info ...): hydra.main parses them
            else:
                _launch(command, args, config_dir)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a checkpoint
        sweeps.report()
        print("metalearn: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        sweeps.report()  # the jobs of a sweep that failed before Hydra stopped it
        raise
    except Exception as error:  # a sweep only (sweeps.sweeper_errors_raised): what stopped the sweeper
        from hydra.errors import HydraException

        from metalearn.errors import ConfigError

        failed = sweeps.report()
        if sweeps.no_trial_finished(error):  # an Optuna search without a finished trial has no best trial
            if failed:
                return 1  # its trials failed: the failures say why
            fail(ConfigError(sweeps.NO_TRIAL_FINISHED))  # none failed: each one stopped at trainer.stop_at
        if isinstance(error, HydraException):  # e.g. a later job's combination of overrides does not compose
            line = str(error).splitlines()[0].rstrip(".")
            key = re.match(r"Could not override '([^']+)'", line)
            # Hydra composes a sweep's first config without the swept choices: a key of the experiments' data
            # (data.horizon of navigation2d) is then missing from the default data; ``++`` adds it there.
            hint = (f"; a key that only some of the swept options have (algo.inner_lr) cannot be swept across the "
                    f"others: sweep it per option; one that every swept option has but the defaults lack: "
                    f"++{key.group(1)}=<value>") if key else ""
            fail(ConfigError(f"a job of this sweep: {line}{hint}"))
        raise
    return sweeps.report()  # a sweep with failed jobs ends non-zero, naming them


if __name__ == "__main__":
    sys.exit(main())
