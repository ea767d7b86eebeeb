"""Where an algorithm, backbone or dataset comes from: built-in, installed, or the user's own module.

A group option names its implementation in one of three ways, looked up in this order:

1. ``module: <dotted.module.path>`` in its YAML (``conf/algo/tempproto.yaml``: ``name: tempproto`` and
   ``module: myresearch.tempproto``); ``pkg.mod:attr`` names an object inside a module;
2. a built-in short name (``maml``, ``conv4``, ``omniglot``);
3. an entry point of an installed distribution, in the groups ``metalearn.algorithms``,
   ``metalearn.backbones`` and ``metalearn.datasets`` (``tempproto = "myresearch.tempproto"``).

The implementation keeps the built-ins' contract: a ``Config`` dataclass (its keys are the option's keys,
typed and validated as the built-ins' are) and ``build(cfg, backbone, info)`` (algorithms),
``build(cfg, input_shape)`` (backbones) or ``load(cfg)`` (datasets). The typed config of a plug-in
records the module it came from (``algo.module``), so every process that reads the config or a
checkpoint (``metalearn eval``, ``resume``, sweep workers, torchrun ranks) finds it again by itself.

Hydra's ``_target_`` is not a way to name a plug-in (it names a callable to instantiate; a plug-in is a
module with a schema): it is refused with one line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from importlib import metadata
from typing import Any

from metalearn.errors import ConfigError

# group -> (entry point group, what the module must define besides Config, its signature for messages)
KINDS = {
    "algo": ("metalearn.algorithms", "build", "build(cfg, backbone, info) -> Algorithm"),
    "backbone": ("metalearn.backbones", "build", "build(cfg, input_shape) -> nn.Module"),
    "data": ("metalearn.datasets", "load", "load(cfg) -> {'train'|'val'|'test': ClassStore}"),
}


#: The built-in options of each group: short name -> module (one file each; add a line here to add one).
BUILTINS: dict[str, dict[str, str]] = {
    "algo": {
        "maml": "metalearn.algorithms.maml",
        "protonet": "metalearn.algorithms.protonet",
        "metabaseline": "metalearn.algorithms.metabaseline",
        "rfs": "metalearn.algorithms.rfs",
        "feat": "metalearn.algorithms.feat",
        "reptile": "metalearn.algorithms.reptile",
        "metasgd": "metalearn.algorithms.metasgd",
        "anil": "metalearn.algorithms.anil",
        "matchingnet": "metalearn.algorithms.matchingnet",
        "relationnet": "metalearn.algorithms.relationnet",
        "siamese": "metalearn.algorithms.siamese",
        "baseline": "metalearn.algorithms.baseline",
        "baseline_pp": "metalearn.algorithms.baseline_pp",
        "mamlpp": "metalearn.algorithms.mamlpp",
        "r2d2": "metalearn.algorithms.r2d2",
        "metaoptnet_svm": "metalearn.algorithms.metaoptnet_svm",
        "leo": "metalearn.algorithms.leo",
        "metanet": "metalearn.algorithms.metanet",
        "snail": "metalearn.algorithms.snail",
        "mann": "metalearn.algorithms.mann",
        "maml_rl": "metalearn.algorithms.maml_rl",
        "rl2": "metalearn.algorithms.rl2",
        "promp": "metalearn.algorithms.promp",
    },
    "backbone": {
        "conv4": "metalearn.models.conv4",
        "resnet12": "metalearn.models.resnet12",
        "mlp": "metalearn.models.mlp",
        "identity": "metalearn.models.identity",
        "gru": "metalearn.models.gru",
    },
    "data": {
        "glyphs": "metalearn.data.glyphs",
        "omniglot": "metalearn.data.omniglot",
        "sinusoid": "metalearn.data.sinusoid",
        "navigation2d": "metalearn.data.navigation2d",
        "halfcheetah_vel": "metalearn.data.halfcheetah_vel",  # MuJoCo: the optional extra metalearn[mujoco]
        "halfcheetah_dir": "metalearn.data.halfcheetah_dir",
        "ant_dir": "metalearn.data.ant_dir",
        "miniimagenet": "metalearn.data.miniimagenet",
        "tieredimagenet": "metalearn.data.tieredimagenet",
        "cifarfs": "metalearn.data.cifarfs",
        "fc100": "metalearn.data.fc100",
        "cub": "metalearn.data.cub",
        "mnist": "metalearn.data.mnist",
        "doublemnist": "metalearn.data.doublemnist",
        "imagefolder": "metalearn.data.imagefolder",
        "features": "metalearn.data.features",
        "episodes": "metalearn.data.episode_folders",  # fixed test episodes (episodes.py is the sampler)
    },
}


def builtins(group: str) -> dict[str, str]:
    """The built-in options of ``group``: short name -> module path."""
    return BUILTINS[group]


@functools.cache
def _installed() -> metadata.EntryPoints:
    return metadata.entry_points()  # every distribution's metadata, read once per process (about 10 ms)


@functools.cache
def entry_points(group: str) -> dict[str, str]:
    """Installed plug-ins of ``group``: entry point name -> ``module[:attr]``."""
    found = {}
    for ep in _installed().select(group=KINDS[group][0]):
        found.setdefault(ep.name, ep.value)  # the first installed one wins, as Python's own lookup does
    return found


def names(group: str) -> list[str]:
    """Every option ``group=<name>`` can name without a YAML of its own: built-ins, then installed plug-ins."""
    return [*builtins(group), *(n for n in entry_points(group) if n not in builtins(group))]


def source(group: str, name: str, module: str | None = None) -> str:
    """The ``module[:attr]`` path of option ``name`` (``module`` given by its YAML wins)."""
    if module:
        return module
    if name in builtins(group):
        return builtins(group)[name]
    if name in entry_points(group):
        return entry_points(group)[name]
    raise ConfigError(f"unknown {group} {name!r}; choose one of: {', '.join(names(group))} "
                      f"(or give your own: a YAML with 'name: {name}' and 'module: <your.module>', "
                      f"README 'Your own method')")


def load(group: str, name: str, module: str | None = None) -> Any:
    """The implementation of option ``name``: its module (or the object ``module:attr`` names), checked
    to define ``Config`` and ``build``/``load``."""
    path = source(group, name, module)
    return _import(group, name, path)


@functools.cache
def _import(group: str, name: str, path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name or module_name.startswith(f"{e.name}."):  # the plug-in itself is not there
            raise ConfigError(f"{group}={name} is implemented by module {module_name!r}, which cannot be imported "
                              f"(no module named {e.name!r}); install its package (pip install -e <its folder>) "
                              f"or put the folder that holds it on PYTHONPATH") from None
        raise
    for part in filter(None, attr.split(".")):
        if not hasattr(found, part):
            raise ConfigError(f"{group}={name}: module {module_name!r} has no attribute {part!r} (from {path!r})")
        found = getattr(found, part)
    function, signature = KINDS[group][1], KINDS[group][2]
    schema = getattr(found, "Config", None)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)) or not callable(getattr(found, function, None)):
        raise ConfigError(f"{group}={name}: {path} is not a metalearn {group} module; it must define a Config "
                          f"dataclass (its options) and {signature}")
    return found


def module_of(group: str, cfg: Any) -> Any:
    """The implementation of a typed group config (``run.algo``) or of a built-in or installed name."""
    if isinstance(cfg, str):
        return load(group, cfg)
    return load(group, cfg.name, getattr(cfg, "module", None))


def is_builtin(group: str, name: str, path: str) -> bool:
    return builtins(group).get(name) == path


@functools.cache
def schema(group: str, name: str, path: str) -> type:
    """The dataclass a group node is typed by: the module's ``Config``, plus ``name`` if it lacks one and, for
    a plug-in, ``module``, recorded so that a saved config finds its implementation again."""
    base = _import(group, name, path).Config
    if is_builtin(group, name, path) and any(f.name == "name" for f in dataclasses.fields(base)):
        return base
    extra = []
    if not any(f.name == "name" for f in dataclasses.fields(base)):
        extra.append(("name", str, dataclasses.field(default=name)))
    if not is_builtin(group, name, path):
        extra.append(("module", str, dataclasses.field(default=path)))
    return dataclasses.make_dataclass(base.__name__, extra, bases=(base,))


def check_node(group: str, node: dict) -> None:
    """Refuse the other spelling of a plug-in (Hydra's ``_target_``) with the one that works."""
    if "_target_" in node:
        raise ConfigError(f"{group}._target_ is not how metalearn finds your own {group}: write "
                          f"'module: {_module_part(str(node['_target_']))}' (the module that defines Config and "
                          f"{KINDS[group][1]}) in its YAML instead of _target_")
    if "module" in node and "name" not in node:
        raise ConfigError(f"the {group} option naming module {node['module']} has no name: key; add "
                          f"'name: <the option's name>' to its YAML")


def _module_part(target: str) -> str:
    """The module of a dotted ``_target_`` (``pkg.mod.build`` -> ``pkg.mod``); itself if it is a module."""
    import importlib.util

    try:
        if importlib.util.find_spec(target) is not None:
            return target
    except (ImportError, ValueError):
        pass
    return target.rpartition(".")[0] or target


@functools.cache
def register_configs() -> None:
    """Make every installed plug-in an option of its group (``algo=<entry point name>``) without a YAML of its
    own: a Hydra ConfigStore node holding its name and its Config's defaults (Hydra's public API)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group in KINDS:
        for name, path in entry_points(group).items():
            if name in builtins(group):
                continue
            try:
                defaults = dataclasses.asdict(schema(group, name, path)())
            except Exception:  # noqa: BLE001 - a broken plug-in fails the runs that choose it, not every command
                defaults = {"name": name}
            defaults.pop("module", None)
            store.store(group=group, name=name, node={**defaults, "name": name}, provider="metalearn-plugins")


@dataclasses.dataclass
class ObjectRecord:
    """What a run's config records of an algorithm built in Python and handed to the trainer
    (``metalearn.train(..., algorithm=obj)``): its class, not options it was not built from."""

    name: str
    object: str  # module:qualname of its class


def object_record(algorithm: Any) -> ObjectRecord:
    cls = type(algorithm)
    return ObjectRecord(name=cls.__name__, object=f"{cls.__module__}:{cls.__qualname__}")


def check_object_node(group: str, node: dict) -> None:
    """A stored config of a run whose algorithm was built in Python cannot rebuild it: say how to load it."""
    if group == "algo" and "object" in node:
        raise ConfigError(f"this run's algorithm was built in Python ({node['object']}), not from a config, so it "
                          f"cannot be rebuilt from its checkpoint; build it again and load the weights with "
                          f"metalearn.load(<run dir>, algorithm=<the new object>)")
