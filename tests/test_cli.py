"""The ``metalearn`` command end to end, in real subprocesses: help, train, eval, resume, sweeps,
the installed wheel and tab completion."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

import metalearn

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "step", "rng", "sampler", "config", "version"}
TRAIN_TAGS = {"train/loss", "train/accuracy", "train/lr", "train/tasks_per_second", "val/loss", "val/accuracy", "test/accuracy"}
ACCURACY_LINE = re.compile(r"accuracy: ([\d.]+)% \+- ([\d.]+)% \(95% CI, (\d+) episodes\)")


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("events.out.tfevents*"))


def scalars(path: Path) -> EventAccumulator:
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def assert_no_tmp_files(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"atomic writes left temp files: {leftovers}"


# ---------------------------------------------------------------- help, version, config


def test_top_level_help_and_version(cli, tmp_path):
    proc = cli.run(["--help"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert "train" in proc.stdout and "eval" in proc.stdout and "usage: metalearn" in proc.stdout

    proc = cli.run(["--version"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert proc.stdout.strip() == f"metalearn {metalearn.__version__}"


def test_console_script_is_installed(cli, tmp_path):
    script = Path(sys.executable).parent / "metalearn"
    if not script.is_file():
        pytest.skip("no metalearn script beside this python (package not pip-installed)")
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=cli.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "commands:" in proc.stdout, cli.describe(proc)


def test_train_help_lists_config_groups(cli, tmp_path):
    proc = cli.run(["train", "--help"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    out = proc.stdout
    assert "Configuration groups" in out
    assert re.search(r"^algo: .*maml.*protonet", out, re.M), out
    assert re.search(r"^data: .*glyphs.*omniglot", out, re.M), out
    assert re.search(r"^backbone: .*conv4", out, re.M), out
    assert re.search(r"^device: auto, cpu, cuda, mps$", out, re.M), out


def test_train_cfg_job_prints_composed_config(cli, tmp_path):
    proc = cli.run(["train", "--cfg", "job", "algo=maml", "ways=5"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert re.search(r"^ways: 5$", proc.stdout, re.M), proc.stdout
    assert "inner_lr: 0.4" in proc.stdout
    assert not list(tmp_path.iterdir()), "--cfg job must not create a run directory"


def test_train_info(cli, tmp_path):
    proc = cli.run(["train", "--info"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert "Hydra" in proc.stdout


# ---------------------------------------------------------------- train, then eval


def test_train_writes_checkpoints_results_config_and_events(trained_run):
    run = trained_run
    for name in ("last", "best"):
        ckpt = torch.load(run / "checkpoints" / f"{name}.pt", map_location="cpu", weights_only=True)
        assert CHECKPOINT_KEYS <= set(ckpt), set(ckpt)
        assert ckpt["version"] == metalearn.__version__
        assert ckpt["config"]["algo"]["name"] == "maml" and ckpt["config"]["steps"] == 20
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 20
    assert_no_tmp_files(run)

    results = json.loads((run / "results.json").read_text())
    accuracy = results["test"]["accuracy"]
    assert 0.0 <= accuracy["mean"] <= 1.0 and accuracy["ci95"] > 0 and accuracy["episodes"] == 20
    assert results["checkpoint_step"] == results["best_val"]["step"]
    assert "ways: 5" in (run / ".hydra" / "config.yaml").read_text()

    events = event_files(run)
    assert len(events) == 1, f"one event file expected, directly in the run dir: {events}"
    assert events[0].parent == run, "add_hparams must not create a time-named sub-run"
    ea = scalars(events[0])
    tags = set(ea.Tags()["scalars"])
    assert TRAIN_TAGS <= tags, TRAIN_TAGS - tags
    assert [e.step for e in ea.Scalars("train/loss")] == [5, 10, 15, 20]
    assert ea.Scalars("test/accuracy")[-1].value == pytest.approx(accuracy["mean"], rel=1e-6)

    # The HParams summaries live in the same file: one row per run in TensorBoard's HParams tab.
    hparams = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams), set(hparams)
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["algo.name"].string_value == "maml"
    assert start.hparams["ways"].number_value == 5


@pytest.fixture(scope="module")
def evaluations(cli, trained_run, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``metalearn eval`` of the trained run, two ways, side by side."""
    cwd = tmp_path_factory.mktemp("eval")
    return cli.run_many({
        "run": (["eval", f"run={trained_run}"], cwd),
        "ckpt": (["eval", f"ckpt={trained_run / 'checkpoints' / 'best.pt'}", "shots=3", "episodes=10"], cwd),
    })


def test_eval_run_reproduces_the_test_result(cli, trained_run, evaluations):
    results = json.loads((trained_run / "results.json").read_text())
    proc = evaluations["run"]
    assert proc.returncode == 0, cli.describe(proc)
    assert "+-" in proc.stdout and "95% CI" in proc.stdout
    match = ACCURACY_LINE.search(proc.stdout)
    assert match, proc.stdout
    acc = results["test"]["accuracy"]
    assert match.groups() == (f"{100 * acc['mean']:.2f}", f"{100 * acc['ci95']:.2f}", "20")
    written = Path(re.search(r"^results: (.+)$", proc.stdout, re.M).group(1))
    assert written.parent == trained_run
    assert json.loads(written.read_text())["test"] == results["test"]


def test_eval_checkpoint_file_with_other_episode_shape(cli, evaluations):
    proc = evaluations["ckpt"]
    assert proc.returncode == 0, cli.describe(proc)
    assert "5-way 3-shot" in proc.stdout
    match = ACCURACY_LINE.search(proc.stdout)
    assert match and match.group(3) == "10", proc.stdout


# ---------------------------------------------------------------- resume


def test_stop_and_resume_gives_the_same_results(cli, trained_run, tmp_path):
    """A run stopped at step 10 and resumed ends exactly like the same run done in one go."""
    run_b = tmp_path / "b"
    results_a = (trained_run / "results.json").read_text()
    procs = cli.run_many({
        "stop": (["train", *cli.FAST, "trainer.stop_at=10", f"hydra.run.dir={run_b}"], tmp_path),
        # Only steps, trainer.*, device and data.root may change on resume.
        "refused": (["train", f"resume={trained_run}", "algo.inner_lr=0.1"], tmp_path),
    })
    proc = procs["refused"]
    assert proc.returncode == 2, cli.describe(proc)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("metalearn: error:"), proc.stderr
    assert "algo.inner_lr=0.1" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert (trained_run / "results.json").read_text() == results_a

    proc = procs["stop"]
    assert proc.returncode == 0, cli.describe(proc)
    assert len(proc.stderr.splitlines()) == 1 and f"metalearn train resume={run_b}" in proc.stderr, proc.stderr
    assert not (run_b / "results.json").exists()
    assert torch.load(run_b / "checkpoints" / "last.pt", weights_only=True)["step"] == 10
    overrides = (run_b / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.stop_at=10" in overrides

    proc = cli.run(["train", f"resume={run_b}"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    a = json.loads(results_a)
    b = json.loads((run_b / "results.json").read_text())
    assert b["test"] == a["test"]
    assert b["best_val"] == a["best_val"]
    assert (run_b / ".hydra" / "overrides.yaml").read_text() == overrides, "resume overwrote the run's overrides"
    assert_no_tmp_files(run_b)

    # Both invocations log into the run's one directory, and the curves join up without repeats.
    assert {p.parent for p in event_files(run_b)} == {run_b}
    resumed = scalars(run_b).Scalars("train/loss")
    assert [e.step for e in resumed] == [5, 10, 15, 20]
    whole = scalars(trained_run).Scalars("train/loss")
    assert [e.value for e in resumed] == pytest.approx([e.value for e in whole], rel=1e-5)


# ---------------------------------------------------------------- multirun


def test_multirun_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    args = cli.TINY
    proc = cli.run(["train", "-m", "algo=maml,protonet", "shots=1,5", *args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    names = ["0_algo=maml,shots=1", "1_algo=maml,shots=5", "2_algo=protonet,shots=1", "3_algo=protonet,shots=5"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == names
    for name in names:
        job = sweep / name
        results = json.loads((job / "results.json").read_text())
        assert results["episode"]["shots"] == int(name[-1])
        assert [p.parent for p in event_files(job)] == [job]
        assert_no_tmp_files(job)
    assert not (tmp_path / "outputs").exists()

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep))
    mux.Reload()
    assert sorted(mux.Runs()) == names
    for name in names:
        assert "test/accuracy" in mux.Runs()[name]["scalars"]
        assert "_hparams_/session_start_info" in mux.PluginRunToTagToContent("hparams")[name]


def test_the_run_records_what_hydra_main_would(trained_run, cli):
    """A single run is composed once (cli._launch) and run on that config: its .hydra/ says what
    hydra.main's own run writes, the RUN mode and the overrides it adds."""
    import yaml

    hydra_node = yaml.safe_load((trained_run / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_node["mode"] == "RUN" and hydra_node["job"]["name"] == "train"
    assert hydra_node["overrides"]["hydra"] == [f"hydra.run.dir={trained_run}", "hydra.mode=RUN"]
    assert hydra_node["runtime"]["output_dir"] == str(trained_run)
    assert (trained_run / "train.log").read_text().count(" - step ") >= 4
    # The mode comes from -m and hydra.mode= alone (cli._run_mode): no config file sets it.
    for path in (cli.REPO / "conf").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        assert "mode" not in (data.get("hydra") or {}), path
        assert path.parts[-3:-1] != ("conf", "hydra") or "mode" not in data, path


def test_hydra_mode_multirun_without_m_is_a_sweep(cli, tmp_path):
    proc = cli.run(["train", "hydra.mode=MULTIRUN", "algo=protonet", *cli.TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                   tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert [p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()] == ["0_"]
    assert json.loads((tmp_path / "sweep" / "0_" / "results.json").read_text())["test"]["accuracy"]["episodes"] == 4


# ---------------------------------------------------------------- the installed wheel


def test_wheel_install_runs_from_its_own_configs(cli, tmp_path):
    """A real wheel, installed by pip into a fresh virtual environment, runs from a directory far
    from the source tree with the configs it carries (the top-level conf/, as metalearn/conf/)."""
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(cli.REPO)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, cli.describe(build)
    wheels = list(dist.glob("metalearn-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
    assert {"metalearn/conf/config.yaml", "metalearn/conf/algo/maml.yaml", "metalearn/conf/data/glyphs.yaml"} <= names
    assert not any(n.startswith("conf/") for n in names), "conf/ belongs inside the package in a wheel"

    # A fresh venv (no pip, no metalearn); the dependencies (torch, hydra, ...) come from this
    # environment's site-packages through a .pth line. Its own .pth files (this checkout's editable
    # install) are not read from there, so only the wheel can provide metalearn.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (fresh_site / "deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheels[0])],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, cli.describe(install)

    env = cli.env()
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import metalearn.confdir as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, cli.describe(where)
    module, conf = map(Path, where.stdout.split())
    assert module.resolve().is_relative_to(fresh_site.resolve()), where.stdout
    assert conf.resolve() == (fresh_site / "metalearn" / "conf").resolve(), where.stdout

    run = work / "run"
    proc = subprocess.run([str(venv / "bin" / "metalearn"), "train", *cli.TINY, f"hydra.run.dir={run}"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, cli.describe(proc)
    assert (run / "results.json").is_file() and (run / "checkpoints" / "best.pt").is_file()


# ---------------------------------------------------------------- tab completion


def complete(cli, line: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metalearn", "-sc", "query=bash"], cwd=cwd,
                          env=cli.env(COMP_LINE=line), capture_output=True, text=True, timeout=120)


def test_completion_of_group_options(cli, tmp_path):
    proc = complete(cli, "metalearn train algo=", tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert {"algo=maml", "algo=protonet"} <= set(proc.stdout.split()), proc.stdout


def test_completion_of_command_names(cli, tmp_path):
    proc = complete(cli, "metalearn ", tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert proc.stdout.split() == ["train", "eval", "data", "report", "reproduce", "new"]


def test_an_editable_install_holds_no_copy_of_the_configs():
    """The wheel carries conf/ inside the package (test above); an editable install reads the source tree's
    conf/ and, since hatch_build.py, copies nothing into site-packages."""
    from importlib import metadata

    try:
        files = metadata.files("metalearn") or []
    except metadata.PackageNotFoundError:
        pytest.skip("metalearn is not installed (run from the source tree)")
    if not any(str(f).endswith(".pth") for f in files):
        pytest.skip("not an editable install")
    assert not [f for f in files if str(f).startswith("metalearn/conf")]
