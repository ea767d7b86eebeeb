"""Your own algorithm, backbone and dataset: a real package outside the repository, found by a module path in
its YAML (through --config-dir or hydra.searchpath) or by an installed distribution's entry points, through
every command (metalearn/plugins.py)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

import metalearn
from conftest import TINY, cli_env, describe, run_cli
from metalearn.errors import ConfigError

TEMPPROTO = '''
"""ProtoNet with a learned temperature: 20 lines on the Algorithm interface."""
import math
from dataclasses import dataclass

import torch
from torch import nn

from metalearn.algorithms.base import QueryLossAlgorithm, accuracy, task_cross_entropy
from metalearn.algorithms.protonet import prototype_logits


@dataclass
class Config:
    name: str = "tempproto"
    init_temperature: float = 1.0


class TempProto(QueryLossAlgorithm):
    def __init__(self, cfg, backbone, info):
        super().__init__()
        self.backbone = backbone
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))

    def query_loss(self, batch, training):
        logits = prototype_logits(self.backbone(batch.support_x), batch.support_y, self.backbone(batch.query_x),
                                  batch.ways) * self.log_temperature.exp()
        return task_cross_entropy(logits, batch.query_y), accuracy(logits, batch.query_y)


def build(cfg, backbone, info):
    return TempProto(cfg, backbone, info)
'''

TINYNET = '''
"""A two-layer MLP on flattened images: the smallest backbone."""
import math
from dataclasses import dataclass

from torch import nn


@dataclass
class Config:
    hidden: int = 32


def build(cfg, input_shape):
    net = nn.Sequential(nn.Flatten(-len(input_shape)), nn.Linear(math.prod(input_shape), cfg.hidden), nn.ReLU(),
                        nn.Linear(cfg.hidden, cfg.hidden))
    net.out_features, net.out_shape = cfg.hidden, (cfg.hidden,)
    return net
'''

BLOBS = '''
"""blobs: a user's dataset module, 12x12 grey images of class prototypes plus noise."""
from dataclasses import dataclass, field

import torch

from metalearn.data.episodes import ClassStore


@dataclass
class Config:
    name: str = "blobs"
    classes: list = field(default_factory=lambda: [12, 6, 6])  # train, val, test
    per_class: int = 10
    generation_seed: int = 0


def load(cfg):
    g = torch.Generator().manual_seed(cfg.generation_seed)
    stores = {}
    for split, n in zip(("train", "val", "test"), cfg.classes):
        protos = torch.rand(n, 1, 12, 12, generator=g).repeat_interleave(cfg.per_class, 0)
        images = 0.7 * protos + 0.3 * torch.rand(protos.shape, generator=g)
        stores[split] = ClassStore((images * 255).to(torch.uint8), torch.arange(n).repeat_interleave(cfg.per_class),
                                   [f"{split}{i}" for i in range(n)])
    return stores
'''


def write_package(root: Path) -> Path:
    """``root/src/myresearch`` (the package) and ``root/conf/algo/tempproto.yaml`` (its option)."""
    pkg = root / "src" / "myresearch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tempproto.py").write_text(TEMPPROTO)
    (pkg / "tinynet.py").write_text(TINYNET)
    (pkg / "blobs.py").write_text(BLOBS)
    (root / "conf" / "data").mkdir(parents=True)
    (root / "conf" / "experiment").mkdir(parents=True)
    (root / "conf" / "experiment" / "tempproto_blobs.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        # A user's preset: the plug-ins on blobs, with the figure it is compared with.
        defaults:
          - override /algo: tempproto
          - override /backbone: tinynet
          - override /data: blobs
        queries: 5
        meta_batch_size: 2
        steps: 4
        trainer: {log_every: 2, val_every: 2, val_episodes: 4, test_episodes: 4, ckpt_every: 2}
        paper:
          metric: accuracy
          value: 0.5
          source: Me et al. 2026
          protocol: blobs 5-way 1-shot
        """))
    (root / "conf" / "data" / "blobs.yaml").write_text("name: blobs\nmodule: myresearch.blobs\nclasses: [12, 6, 6]\n"
                                                       "per_class: 10\ngeneration_seed: 0\n")
    (root / "conf" / "algo").mkdir(parents=True)
    (root / "conf" / "backbone").mkdir(parents=True)
    (root / "conf" / "algo" / "tempproto.yaml").write_text(
        "# ProtoNet with a learned temperature (myresearch)\nname: tempproto\nmodule: myresearch.tempproto\n"
        "init_temperature: 2.0\n")
    (root / "conf" / "backbone" / "tinynet.yaml").write_text("name: tinynet\nmodule: myresearch.tinynet\nhidden: 24\n")
    return root / "src"


def install_entry_points(site: Path) -> None:
    """A distribution's metadata as pip writes it (dist-info with entry_points.txt) in a folder on PYTHONPATH."""
    info = site / "myresearch-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myresearch\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[metalearn.algorithms]\ntempproto_ep = myresearch.tempproto\n\n"
        "[metalearn.backbones]\ntinynet_ep = myresearch.tinynet\n")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    write_package(root)
    install_entry_points(root / "site")
    return root


def env_with(*paths: Path) -> dict[str, str]:
    return cli_env(PYTHONPATH=os.pathsep.join(str(p) for p in paths))


def test_a_module_path_in_a_user_yaml_trains_evaluates_and_resumes(package, tmp_path):
    env = env_with(package / "src")
    run = tmp_path / "run"
    args = ["train", "--config-dir", str(package / "conf"), "algo=tempproto", "backbone=tinynet", *TINY,
            f"hydra.run.dir={run}"]
    proc = run_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    saved = json.loads((run / "results.json").read_text())
    assert saved["test"]["accuracy"]["episodes"] == 4
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["algo"] == {"name": "tempproto", "init_temperature": 2.0, "module": "myresearch.tempproto"}
    assert ckpt["config"]["backbone"]["module"] == "myresearch.tinynet"
    assert "log_temperature" in ckpt["model"]

    proc = run_cli(["eval", f"run={run}"], cwd=tmp_path, env=env)  # no --config-dir: the checkpoint says where
    assert proc.returncode == 0, describe(proc)
    assert "accuracy" in proc.stdout

    proc = run_cli(["train", f"resume={run}", "steps=6"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6

    # the module gone from the path: one line naming it and how to make it importable
    proc = run_cli(["eval", f"run={run}"], cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
    assert "'myresearch.tempproto'" in proc.stderr and "PYTHONPATH" in proc.stderr


def test_hydra_searchpath_finds_the_user_yaml_and_typed_validation_stays(package, tmp_path):
    env = env_with(package / "src")
    searchpath = f"hydra.searchpath=[file://{package / 'conf'}]"
    proc = run_cli(["train", searchpath, "algo=tempproto", "algo.init_temperature=oops", *TINY], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
    assert "algo.init_temperature" in proc.stderr
    proc = run_cli(["train", searchpath, "algo=tempproto", "+algo.temprature=3", *TINY], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "init_temperature" in proc.stderr and proc.stderr.count("\n") == 1, describe(proc)
    # a misspelt option lists the user's options beside the built-ins, with or without --config-dir
    for flags in ([searchpath], ["--config-dir", str(package / "conf")]):
        proc = run_cli(["train", *flags, "algo=tempprot", *TINY], cwd=tmp_path, env=env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
        assert "tempproto" in proc.stderr and "maml" in proc.stderr
    proc = run_cli(["train", "--config-dir", str(tmp_path / "nothere"), "algo=maml"], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and proc.stderr.count("\n") == 1, describe(proc)
    # a searchpath folder that is not there: one line (Hydra would skip it, and tempproto would be "unknown")
    proc = run_cli(["train", f"hydra.searchpath=[file://{tmp_path / 'nothere'}]", "algo=tempproto"], cwd=tmp_path,
                   env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"metalearn: error: hydra.searchpath entry {tmp_path / 'nothere'}: no such folder (give the folder that holds "
        "your algo/, data/, backbone/ ... config groups)"], describe(proc)
    with pytest.raises(ConfigError, match="hydra.searchpath entry .*nothere: no such folder"):
        metalearn.compose([f"hydra.searchpath=[{tmp_path / 'nothere'}]"])
    # with Hydra's flags, a mistake is one line too; the flags see the user's options
    proc = run_cli(["train", "--cfg", "job", "--config-dir", str(package / "conf"), "algo=tempprot"], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "tempproto" in proc.stderr, describe(proc)
    proc = run_cli(["train", "--cfg", "job", "--config-dir", str(package / "conf"), "algo=tempproto"], cwd=tmp_path,
                   env=env)
    assert proc.returncode == 0 and "init_temperature: 2.0" in proc.stdout, describe(proc)
    # --help lists the user's options too, found either way
    for flags in (["--config-dir", str(package / "conf")], [searchpath]):
        proc = run_cli(["train", *flags, "--help"], cwd=tmp_path, env=env)
        assert proc.returncode == 0 and "tempproto" in proc.stdout, describe(proc)


def test_target_is_refused_with_the_spelling_that_works(package, tmp_path):
    conf = tmp_path / "conf" / "algo"
    conf.mkdir(parents=True)
    (conf / "targeted.yaml").write_text("name: targeted\n_target_: myresearch.tempproto\n")
    proc = run_cli(["train", "--config-dir", str(tmp_path / "conf"), "algo=targeted", *TINY], cwd=tmp_path,
                   env=env_with(package / "src"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
    assert "module: myresearch.tempproto" in proc.stderr


def test_an_installed_entry_point_is_an_option_without_any_yaml(package, tmp_path):
    env = env_with(package / "site", package / "src")  # the metadata, and the package (pip install -e: a .pth)
    run = tmp_path / "run"
    proc = run_cli(["train", "algo=tempproto_ep", "backbone=tinynet_ep", "algo.init_temperature=3.0", *TINY,
                    f"hydra.run.dir={run}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    cfg = json.loads(json.dumps(__import__("torch").load(run / "checkpoints" / "best.pt", weights_only=True)["config"]))
    assert cfg["algo"] == {"name": "tempproto_ep", "init_temperature": 3.0, "module": "myresearch.tempproto"}
    proc = run_cli(["eval", f"run={run}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)


def test_plugin_modules_are_checked_for_the_contract(tmp_path):
    from metalearn import plugins
    from metalearn.config import typed_group
    from metalearn.errors import ConfigError

    (tmp_path / "notanalgo.py").write_text("x = 1\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="must define a Config dataclass"):
            typed_group("algo", {"name": "x", "module": "notanalgo"})
        with pytest.raises(ConfigError, match="cannot be imported"):
            typed_group("algo", {"name": "x", "module": "nosuchpackage.algo"})
        with pytest.raises(ConfigError, match="unknown algo 'nosuch'"):
            typed_group("algo", {"name": "nosuch"})
        built_in = typed_group("algo", {"name": "protonet", "module": "metalearn.algorithms.protonet"})
        assert type(built_in).__module__ == "metalearn.algorithms.protonet"  # a built-in records no module
        assert plugins.names("algo")[:2] == ["maml", "protonet"]
    finally:
        sys.path.remove(str(tmp_path))


BLOB_RUN = ["backbone=tinynet", "data=blobs", "queries=5", "meta_batch_size=2", "steps=4", "trainer.log_every=2", "trainer.val_every=2",
            "trainer.val_episodes=4", "trainer.test_episodes=4", "trainer.ckpt_every=2"]


def test_a_sweep_of_a_plugin_beside_built_ins_in_processes_and_one_report(package, tmp_path):
    env = env_with(package / "src")
    sweep = tmp_path / "sweep"
    proc = run_cli(["train", "-m", "--config-dir", str(package / "conf"), "algo=tempproto,protonet", *BLOB_RUN,
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    assert len(list(sweep.glob("*/results.json"))) == 2
    proc = run_cli(["report", str(sweep)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    table = (sweep / "report.md").read_text()
    assert "tempproto" in table and "protonet" in table


def test_torchrun_runs_a_plugin_on_two_processes(package, tmp_path):
    import subprocess

    from conftest import torchrun_cmd, torchrun_env

    env = torchrun_env(PYTHONPATH=str(package / "src"))
    run = tmp_path / "run"
    proc = subprocess.run(torchrun_cmd(["train", "--config-dir", str(package / "conf"), "algo=tempproto", *BLOB_RUN,
                                        f"hydra.run.dir={run}"]), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "x 2 processes" in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["test"]["accuracy"]["episodes"] == 4


def test_data_info_and_prepare_of_a_user_dataset(package, tmp_path):
    env = env_with(package / "src")
    for action in ("info", "prepare"):
        proc = run_cli(["data", action, "--config-dir", str(package / "conf"), "data=blobs", "data.per_class=7"],
                       cwd=tmp_path, env=env)
        assert proc.returncode == 0, describe(proc)
        assert "train: 12 classes, 84 images of 1x12x12" in proc.stdout and "ready" in proc.stdout


def test_reproduce_of_a_user_preset(package, tmp_path):
    env = env_with(package / "src")
    out = tmp_path / "out"
    proc = run_cli(["reproduce", "experiment=tempproto_blobs", "--config-dir", str(package / "conf"), "--out", str(out)],
                   cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    table = (out / "reproduce.md").read_text()
    assert "tempproto_blobs" in table and "Me et al. 2026" in table
    proc = run_cli(["reproduce", "--from", str(out), "--config-dir", str(package / "conf")], cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "tempproto_blobs" in proc.stdout, describe(proc)
    proc = run_cli(["reproduce", "experiment=tempproto_blobz", "--config-dir", str(package / "conf")], cwd=tmp_path,
                   env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "tempproto_blobs" in proc.stderr, describe(proc)


def test_an_optuna_search_over_a_plugin(package, tmp_path):
    env = env_with(package / "src")
    sweep = tmp_path / "search"
    proc = run_cli(["train", "-m", "--config-dir", str(package / "conf"), "hparams_search=metric_based",
                    "algo=tempproto", *BLOB_RUN, "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
                    "ways=choice(3, 5)", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, describe(proc)
    assert len(list(sweep.glob("*/results.json"))) == 2
    assert (sweep / "optimization_results.yaml").is_file(), describe(proc)
