"""``metalearn new algo|backbone|data NAME [--dir DIR]``: a working, documented template of your own method,
backbone or dataset (module, YAML, test) that trains on ``glyphs`` straight away.

It writes, under DIR (default: the working directory)::

    NAME.py                 the module (Config dataclass + build/load), documented
    conf/<group>/NAME.yaml  its option: name, module and every key of Config
    tests/test_NAME.py      a test that trains it through the CLI on glyphs (pytest tests/)

and prints the command that trains it. Nothing is overwritten: an existing file is one error line.
"""

from __future__ import annotations

import keyword
from pathlib import Path

from metalearn import plugins
from metalearn.errors import ConfigError


ALGO = '''\
"""{name}: a few-shot classifier of your own (a template written by `metalearn new algo {name}`).

As written it is a prototypical network with a learned temperature: replace ``query_loss`` (a method without an
inner loop) or subclass another family (``metalearn.algorithms.maml.MAML`` and override ``inner_update``,
``inner_loss`` or ``outer_loss``). The contract (metalearn/algorithms/base.py): the Algorithm owns the backbone and
every meta-parameter; ``meta_step(batch)`` fills their ``.grad``; ``evaluate(batch)`` returns per-task metrics.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from metalearn.algorithms.base import QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.algorithms.protonet import prototype_logits


@dataclass
class Config:
    """The options of algo={name}: typed and checked, each settable as algo.<key>=<value>."""

    name: str = "{name}"
    init_temperature: float = 1.0  # the softmax temperature the training starts from


class {cls}(QueryLossAlgorithm):
    def __init__(self, cfg: Config, backbone: nn.Module, info):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))

    def query_loss(self, batch, training: bool):
        """Per-task query loss and accuracy, [B] each; ``batch.support_x`` is [B, ways*shots, C, H, W]."""
        logits = prototype_logits(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x),
                                  batch.ways) * self.log_temperature.exp()
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg: Config, backbone: nn.Module, info) -> {cls}:
    return {cls}(cfg, backbone, info)
'''

BACKBONE = '''\
"""{name}: an embedding network of your own (a template written by `metalearn new backbone {name}`).

The contract: ``build(cfg, input_shape)`` returns an ``nn.Module`` taking ``[tasks, n, C, H, W]`` (or
``[n, C, H, W]``) and returning ``[tasks, n, out_features]``, with ``out_features`` (the embedding size) and
``out_shape`` set. As written: two convolution blocks and a linear layer.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    """The options of backbone={name}, each settable as backbone.<key>=<value>."""

    name: str = "{name}"
    channels: int = 32  # channels of each convolution
    out_features: int = 64  # embedding size


class {cls}(nn.Module):
    def __init__(self, cfg: Config, input_shape):
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, cfg.channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(cfg.channels * (h // 4) * (w // 4), cfg.out_features))
        self.out_features, self.out_shape = cfg.out_features, (cfg.out_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]  # [tasks, n] or [n]
        return self.body(x.reshape(-1, *x.shape[-3:])).reshape(*lead, self.out_features)


def build(cfg: Config, input_shape) -> {cls}:
    if len(input_shape) != 3:
        from metalearn.errors import ConfigError

        raise ConfigError(f"backbone={name} takes images, not inputs of shape {{tuple(input_shape)}}")
    return {cls}(cfg, input_shape)
'''

DATA = '''\
"""{name}: a dataset of your own (a template written by `metalearn new data {name}`).

The contract: ``load(cfg)`` returns ``{{"train": ClassStore, "val": ClassStore, "test": ClassStore}}``, each the
uint8 images ``[N, C, H, W]`` of one split's classes with their labels and class names (metalearn/data/episodes.py).
As written it draws small images of class prototypes plus noise; read your own files where it says so, and give
``sources(cfg)`` (the files, for `metalearn data info`).
"""

from dataclasses import dataclass, field

import torch

from metalearn.data.episodes import ClassStore


@dataclass
class Config:
    """The options of data={name}, each settable as data.<key>=<value>."""

    name: str = "{name}"
    classes: list = field(default_factory=lambda: [30, 10, 10])  # classes of train, val, test
    per_class: int = 20  # images per class
    image_size: int = 28
    generation_seed: int = 0


def load(cfg: Config) -> dict:
    g = torch.Generator().manual_seed(cfg.generation_seed)
    stores = {{}}
    for split, n in zip(("train", "val", "test"), cfg.classes):
        # Your own data: read the split's images into a uint8 tensor [N, C, H, W] with their class indices here.
        prototypes = torch.rand(n, 1, cfg.image_size, cfg.image_size, generator=g).repeat_interleave(cfg.per_class, 0)
        images = 0.7 * prototypes + 0.3 * torch.rand(prototypes.shape, generator=g)
        labels = torch.arange(n).repeat_interleave(cfg.per_class)
        stores[split] = ClassStore((images * 255).to(torch.uint8), labels, [f"{{split}}-{{i}}" for i in range(n)])
    return stores


def sources(cfg: Config) -> list:
    return []  # the files this dataset reads (none: drawn on the fly)
'''

TEST = '''\
"""Trains {group}={name} through the metalearn CLI on a few steps (written by `metalearn new {group} {name}`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def test_{name}_trains(tmp_path):
    env = {{**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "metalearn", "train", "--config-dir", str(HERE / "conf"),
                           {choice}, "steps=4", "meta_batch_size=2", "queries=5",
                           "trainer.val_every=2", "trainer.val_episodes=4", "trainer.test_episodes=4",
                           f"hydra.run.dir={{run}}"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "results.json").read_text())["test"]["accuracy"]["episodes"] == 4
'''

YAML = {"algo": "# {name}: your own algorithm ({name}.py)\nname: {name}\nmodule: {name}\ninit_temperature: 1.0\n",
        "backbone": "# {name}: your own backbone ({name}.py)\nname: {name}\nmodule: {name}\nchannels: 32\nout_features: 64\n",
        "data": "# {name}: your own dataset ({name}.py)\nname: {name}\nmodule: {name}\nclasses: [30, 10, 10]\n"
                "per_class: 20\nimage_size: 28\ngeneration_seed: 0\n"}
TEMPLATES = {"algo": ALGO, "backbone": BACKBONE, "data": DATA}
#: what the generated test (and the printed command) trains the new option with
CHOICE = {"algo": ["algo={name}", "data=glyphs"], "backbone": ["backbone={name}", "algo=protonet", "data=glyphs"],
          "data": ["data={name}", "algo=protonet"]}

USAGE = "usage: metalearn new algo|backbone|data NAME [--dir DIR]"


def new_command(args: list[str]) -> int:
    """Write the template files; print what was written and the command that trains it."""
    folder, rest, words = Path("."), [], iter(args)
    for a in words:
        if a == "--dir":
            value = next(words, None)
            if value is None:
                raise ConfigError(f"--dir needs a folder; {USAGE}")
            folder = Path(value)
        elif a.startswith("--dir="):
            folder = Path(a.split("=", 1)[1])
        else:
            rest.append(a)
    if len(rest) != 2 or rest[0] not in TEMPLATES:
        raise ConfigError(USAGE)
    group, name = rest
    if not name.isidentifier() or keyword.iskeyword(name) or not name.islower():
        raise ConfigError(f"{name!r} is not a lower-case Python identifier (it names a module): e.g. my_{group}")
    if name in plugins.builtins(group):
        raise ConfigError(f"{group}={name} is built in already; choose another name")
    import importlib.util

    if importlib.util.find_spec(name) is not None:  # NAME.py on the path would hide it (torch, math, metalearn ...)
        raise ConfigError(f"a module named {name!r} exists already ({importlib.util.find_spec(name).origin}); "
                          f"choose another name, e.g. my_{name}")
    cls = "".join(part.capitalize() for part in name.split("_")) or name
    files = {folder / f"{name}.py": TEMPLATES[group].format(name=name, cls=cls),
             folder / "conf" / group / f"{name}.yaml": YAML[group].format(name=name),
             folder / "tests" / f"test_{name}.py": TEST.format(
                 group=group, name=name, choice=", ".join(f'"{c}"' for c in CHOICE[group]).format(name=name))}
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise ConfigError(f"{', '.join(existing)} exists already; nothing was written (choose another name or --dir)")
    from metalearn.fileio import atomic_write_text

    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        print(f"wrote {path}")
    choice = " ".join(CHOICE[group]).format(name=name)
    where = "" if folder == Path(".") else f"cd {folder} && "
    print(f"train it: {where}PYTHONPATH=. metalearn train --config-dir conf {choice} steps=100\n"
          f"test it:  {where}pytest tests/test_{name}.py")
    return 0
