"""Where the Hydra configs are, and composing them outside a Hydra app.

The configs live in the top-level ``conf/`` of the source tree (the project's layout). A wheel
carries the same folder inside the package, as ``metalearn/conf/`` (pyproject's hatch
``force-include``), so an installed metalearn runs from any directory with no source tree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

_PACKAGE = Path(__file__).resolve().parent


def _find() -> Path:
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):  # installed wheel, then source tree
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"metalearn's configs are missing: neither {_PACKAGE / 'conf'} nor {_PACKAGE.parent / 'conf'} "
                       "holds config.yaml; reinstall metalearn")


CONF_DIR = _find()


@contextlib.contextmanager
def initialized() -> Iterator[None]:
    """Hydra's compose API over metalearn's configs (for ``compose`` calls outside an app)."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def compose(config_name: str = "config", overrides: Sequence[str] = ()):
    """The composed DictConfig of ``config_name`` (config | eval) with ``overrides``, as the CLI would."""
    from hydra import compose as hydra_compose

    with initialized():
        return hydra_compose(config_name, overrides=list(overrides))


def compose_job(config_name: str, overrides: list[str]):
    """The config ``overrides`` compose to (Hydra's compose API), inside an initialized Hydra or not."""
    from hydra import compose

    with hydra_initialized():
        return compose(config_name, overrides=overrides)


@contextlib.contextmanager
def hydra_initialized():
    """Hydra's compose API on metalearn's configs, unless a caller has it initialized already."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialized():
            yield


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Hydra's compose API on metalearn's configs, even inside another Hydra app (a user's own ``@hydra.main``
    script or notebook that initialized Hydra): that Hydra is set aside meanwhile and restored after."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    saved = hydra.hydra if hydra.is_initialized() else None
    hydra.clear()
    try:
        with initialized():
            yield
    finally:
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def group_options(config_name: str, searchpath: list[str], group: str) -> list[str]:
    """The options of config group ``group`` (``algo``, ``hydra/launcher``) across Hydra's whole search path:
    metalearn's conf/, ``--config-dir``, ``hydra.searchpath`` and installed plugins (launchers, sweepers and
    metalearn plug-ins registered in Hydra's ConfigStore); [] for a key that is not a group."""
    if "." in group or not group:
        return []
    from hydra.core.global_hydra import GlobalHydra

    with hydra_initialized():
        return GlobalHydra.instance().config_loader().get_group_options(group, config_name=config_name,
                                                                          overrides=searchpath)


def error_line(message: str, options, compose_job, overrides: list[str]) -> str:
    """Hydra's (multi-line) composition error as one line; ``options(group)``: the options of a config group;
    ``compose_job(overrides)``: a composition on the same search path."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = lines[0] if lines else message
    if first.startswith("In '") and "Could not find '" in first:
        wanted = first.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = wanted.rpartition("/")
        from metalearn.sweeps import EXTRAS

        if f"{group}/{option}" in EXTRAS:  # a launcher or sweeper plugin that is not installed
            extra = EXTRAS[f"{group}/{option}"]
            return f"{group}={option} needs the {extra} extra: pip install \"metalearn[{extra}]\""
        if group.startswith("hydra/") or options(group):
            return f"unknown {group} {option!r}; choose one of: {', '.join(options(group))}"
    if first.startswith("Could not override '") or first.startswith("Could not append"):
        key = first.split("'", 2)[1]
        group, _, option = key.partition(".")
        if option and options(group):
            rest = [o for o in overrides if not o.lstrip("+~").startswith(f"{group}.")]
            node = compose_job(rest).get(group)
            if node is None:  # metalearn eval: data.* keys belong to a data=<option>
                return (f"'{key}' sets an option of {group}=<option>, and no {group} is chosen: add {group}=<option> "
                        "(eval scores the run's own data as it was trained; data_root= says where it is now)")
            if group == "data":  # a key the split vocabulary replaced: the line that names its new key
                from metalearn.renamed import renamed_message

                given = {k.lstrip("+~")[len("data."):]: v for k, _, v in (o.partition("=") for o in overrides)
                         if k.lstrip("+~").startswith("data.")}
                renamed = renamed_message(node.get("name"), given, set(node))
                if renamed:
                    return renamed
            options = ", ".join(k for k in node if k not in ("name", "module")) or "none"
            hint = (f" (a key of {node.module}'s Config can be set once its YAML lists it; or add it with "
                    f"+{group}.{option}=...; README 'Your own method')") if "module" in node else ""
            return f"{group}={node.name} has no option {option!r}; its options are: {options}{hint}"
        return f"unknown option {key!r}; 'metalearn train --cfg job' shows every option (new keys are not accepted)"
    return first


def check_config_dir(folder: str | Path, flag: str) -> Path:
    """The folder of a user's config groups, which must exist (one line if not)."""
    from metalearn.errors import ConfigError

    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"{flag} {folder}: no such folder (give the folder that holds your algo/, data/, "
                          "backbone/ ... config groups)")
    return path


def check_searchpath(parsed: Sequence) -> None:
    """One line if a ``hydra.searchpath`` override (parsed overrides) names a local folder that does not exist
    (``file://DIR`` or a plain path; ``pkg://`` entries are Hydra's to check): Hydra skips it silently, and the
    user's config groups would then be "unknown" options."""
    for o in parsed:
        if o.get_key_element() == "hydra.searchpath" and isinstance(o.value(), list):
            for entry in o.value():
                folder = str(entry).removeprefix("file://")
                if "://" not in folder:
                    check_config_dir(folder, "hydra.searchpath entry")


def with_searchpath(overrides: Sequence[str], config_dir: str | Path | None) -> list[str]:
    """``overrides`` with ``config_dir`` added to ``hydra.searchpath`` (after any folders given there), quoted."""
    overrides = list(overrides)
    if config_dir is None:
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    folder = f"file://{Path(config_dir).expanduser().absolute()}"
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in overrides if not a.startswith("-")])
    except HydraException:
        parsed = []  # the composition reports it
    given = [o for o in parsed if o.get_key_element() == "hydra.searchpath"][-1:]
    paths = [*(given[0].value() if given and isinstance(given[0].value(), list) else []), folder]
    rest = [a for a in overrides if not (given and a == given[0].input_line)]
    quoted = ",".join("'" + str(p).replace("\\", "\\\\").replace("'", "\\'") + "'" for p in paths)
    return [*rest, f"hydra.searchpath=[{quoted}]"]


def check_choice(options, key: str, values: Sequence) -> None:
    """One line if a group option among ``values`` of override ``key`` (``algo``, ``+experiment``) is not one of the
    group's ``options(group)`` (Hydra silently skips a misspelt option of an optional group, as experiment)."""
    from metalearn.errors import ConfigError

    group = key.lstrip("+~")
    choices = options(group) if not group.startswith("hydra") else []
    for v in values if choices else []:
        if isinstance(v, str) and v not in choices:
            raise ConfigError(f"unknown {group} {v!r}; choose one of: {', '.join(choices)}")
