"""``metalearn reproduce``: a real preset run through the CLI on a tiny budget, ``--from`` on that run and on
run folders written here (real composed configs), the Delta/CI arithmetic, the proxy column, and the
one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from metalearn import reproduce
from metalearn.reproduce import CSV_HEADER

#: maml_sinusoid_k10 in seconds: 20 meta-steps, 20 validation and test tasks.
TINY = ["steps=20", "trainer.val_every=10", "trainer.val_episodes=20", "trainer.test_episodes=20",
        "trainer.ckpt_every=10", "trainer.log_every=10"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- a real run, through the CLI


@pytest.fixture(scope="module")
def sinusoid(cli, tmp_path_factory) -> tuple[Path, object]:
    """``metalearn reproduce experiment=maml_sinusoid_k10`` on a 20-step budget: (its --out, the process)."""
    cwd = tmp_path_factory.mktemp("reproduce")
    out = cwd / "out"
    proc = cli.run(["reproduce", "experiment=maml_sinusoid_k10", *TINY, "--out", out], cwd)
    assert proc.returncode == 0, cli.describe(proc)
    return out, proc


def test_a_preset_runs_and_its_table_is_written(sinusoid):
    out, proc = sinusoid
    run = out / "maml_sinusoid_k10"  # one run directory per preset
    results = json.loads((run / "results.json").read_text())
    row, = read_csv(out / "reproduce.csv")
    assert list(row) == CSV_HEADER
    assert (row["preset"], row["dataset"], row["metric"]) == ("maml_sinusoid_k10", "sinusoid", "mse_step10")
    assert float(row["measured_mean"]) == results["test"]["mse_step10"]["mean"]
    assert float(row["measured_ci95"]) == results["test"]["mse_step10"]["ci95"]
    assert (row["test_episodes"], row["seeds"], row["status"]) == ("20", "1", "finished")
    # the MAML paper prints no sinusoid number: no figure, so no difference, and the note says why
    assert row["paper_value"] == row["paper_ci95"] == row["delta_ci_units"] == ""
    assert "Finn" in row["paper_source"] and "prints no number" in row["paper_note"]
    # 20 steps is not the preset's 70,000: a proxy, with every key that differs (neutral ones left out)
    assert row["proxy"] == "yes"
    assert row["differences"] == ("steps=20 (preset: 70000), trainer.val_every=10 (preset: 5000), "
                                  "trainer.val_episodes=20 (preset: 600), trainer.test_episodes=20 (preset: 600)")
    document = (out / "reproduce.md").read_text()
    assert "| preset | dataset (as run) | protocol (paper) | metric | paper | source | measured | Δ/CI | proxy |" in document
    assert "| none (see note) |" in document and "| yes: steps=20 (preset: 70000)" in document
    assert f"{results['test']['mse_step10']['mean']:.4f} ± " in proc.stdout  # the table is printed too
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_the_paper_section_is_no_hyper_parameter(sinusoid):
    """TensorBoard's HParams of a preset run list its hyper-parameters, not its paper's figure."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = sinusoid[0] / "maml_sinusoid_k10"
    assert "paper:" in (run / ".hydra" / "config.yaml").read_text()  # Hydra records it ...
    acc = EventAccumulator(str(run))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert "algo.inner_lr" in hparams and not [k for k in hparams if k.startswith("paper")]  # ... the run does not


def test_from_reads_the_finished_run(cli, sinusoid, tmp_path):
    out, _ = sinusoid
    proc = cli.run(["reproduce", "--from", out, "--out", tmp_path], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert read_csv(tmp_path / "reproduce.csv") == read_csv(out / "reproduce.csv")


# ---------------------------------------------------------------- run folders written here


def make_run(path: Path, overrides: list[str], accuracy: float | None, ci95: float = 0.01, episodes: int = 600) -> Path:
    """A run folder as ``metalearn train`` leaves it: the composed config, its overrides, Hydra's group choices
    (``.hydra/hydra.yaml``) and, unless ``accuracy`` is None, results.json."""
    from hydra import compose
    from omegaconf import OmegaConf

    from metalearn import confdir

    with confdir.initialized():
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    (path / ".hydra").mkdir(parents=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), path / ".hydra" / "hydra.yaml")
    del cfg.hydra
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), path / ".hydra" / "overrides.yaml")
    if accuracy is not None:
        results = {"test": {"accuracy": {"mean": accuracy, "ci95": ci95, "std": 0.1, "episodes": episodes},
                            "loss": {"mean": 1.0, "ci95": 0.1, "std": 0.1, "episodes": episodes}},
                   "best_val": {"metric": "accuracy", "value": accuracy, "step": cfg.steps}, "steps": cfg.steps,
                   "episode": {"ways": 5, "shots": 1, "queries": 15, "task": "classification"}}
        (path / "results.json").write_text(json.dumps(results))
    return path


def another_seed(run: Path, path: Path, seed: int, accuracy: float | None, ci95: float = 0.01) -> Path:
    """``run`` with another seed (a copy of its .hydra/ files, seed changed; composing again is slow)."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(run / ".hydra", path / ".hydra")
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    cfg.seed = seed
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    if accuracy is not None:
        results = json.loads((run / "results.json").read_text())
        results["test"]["accuracy"].update(mean=accuracy, ci95=ci95)
        (path / "results.json").write_text(json.dumps(results))
    return path


def test_rows_seeds_delta_and_proxies(tmp_path):
    maml = ["experiment=maml_omniglot_5w1s"]
    make_run(tmp_path / "a", ["experiment=protonet_omniglot_5w1s"], 0.97, ci95=0.01)
    b0 = make_run(tmp_path / "b0", [*maml, "device=cpu"], 0.95, ci95=0.002)  # device: run-local
    another_seed(b0, tmp_path / "b1", 1, 0.97, ci95=0.004)
    c = make_run(tmp_path / "c", [*maml, "data=omniglot_small", "steps=300"], 0.90, ci95=0.003)
    another_seed(c, tmp_path / "d", 1, None)  # unfinished
    make_run(tmp_path / "e", ["algo=protonet", "data=glyphs"], 0.5)  # no preset: not in the table
    table, written, rows = reproduce.write_table(tmp_path)
    assert [p.name for p in written] == ["reproduce.md", "reproduce.csv"]
    by = {(r["preset"], r["proxy"]): r for r in read_csv(tmp_path / "reproduce.csv")}
    assert len(by) == 3

    proto = by["protonet_omniglot_5w1s", "no"]
    assert float(proto["paper_value"]) == 0.988 and proto["paper_ci95"] == ""  # ProtoNet prints no Omniglot CI
    assert float(proto["delta_ci_units"]) == pytest.approx((0.97 - 0.988) / 0.01)  # by the measured CI alone

    seeds = by["maml_omniglot_5w1s", "no"]  # two seeds, one row: means and CIs averaged
    assert (seeds["seeds"], seeds["runs"]) == ("2", "b0;b1")
    assert float(seeds["measured_mean"]) == pytest.approx(0.96) and float(seeds["measured_ci95"]) == pytest.approx(0.003)
    assert float(seeds["delta_ci_units"]) == pytest.approx((0.96 - 0.987) / math.hypot(0.004, 0.003))  # both CIs

    proxy = by["maml_omniglot_5w1s", "yes"]
    assert proxy["dataset"] == "omniglot_small" and proxy["status"] == "finished, 1 unfinished"
    # a changed group choice is one difference, not one per key of the group (both say data.name=omniglot)
    assert proxy["differences"] == "data=omniglot_small (preset: omniglot), steps=300 (preset: 60000)"
    assert (proxy["seeds"], proxy["runs"]) == ("1", "c;d")
    assert "| maml_omniglot_5w1s | omniglot_small |" in table and "| 90.00 ± 0.30 |" in table
    assert "| 98.70 ± 0.40 |" in table and "| yes: data=omniglot_small (preset: omniglot), steps=300" in table

    # --from with presets named: only their rows
    _, _, rows = reproduce.write_table(tmp_path, tmp_path / "only", only=["protonet_omniglot_5w1s"])
    assert [r.preset for r in rows] == ["protonet_omniglot_5w1s"]


def test_a_run_without_hydra_yaml_belongs_to_the_preset_its_overrides_name(tmp_path):
    """No .hydra/hydra.yaml (a run copied without it): the preset and the group choices come from overrides.yaml,
    the groups it does not name from the preset."""
    for name, overrides in {"same": [], "small": ["data=omniglot_small"]}.items():
        run = make_run(tmp_path / name, ["experiment=maml_omniglot_5w1s", *overrides], 0.9)
        (run / ".hydra" / "hydra.yaml").unlink()
    rows = {r.runs[0].name: r for r in reproduce.build_rows(tmp_path)}
    assert {n: (r.preset, r.dataset, reproduce._proxy(r)) for n, r in rows.items()} == {
        "same": ("maml_omniglot_5w1s", "omniglot", "no"),
        "small": ("maml_omniglot_5w1s", "omniglot_small", "yes: data=omniglot_small (preset: omniglot)")}


def test_report_never_compares_the_paper_section(tmp_path):
    """Runs of two presets differ in paper.*: metalearn report shows their real differences only."""
    from metalearn import report

    make_run(tmp_path / "a", ["experiment=protonet_omniglot_5w1s"], 0.97)
    make_run(tmp_path / "b", ["experiment=protonet_omniglot_5w1s", "steps=300"], 0.9)
    make_run(tmp_path / "c", ["experiment=maml_omniglot_5w1s"], 0.95)
    keys = report.build_report(tmp_path).keys
    assert "steps" in keys and not [k for k in keys if k.startswith("paper")], keys


# ---------------------------------------------------------------- mistakes: one line


def test_bad_input_is_one_line_through_the_cli(cli, tmp_path):
    proc = cli.run(["reproduce", "experiment=maml_omniglot_5w1s,nope"], tmp_path)
    assert proc.returncode == 2, cli.describe(proc)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("metalearn: error: unknown preset 'nope'; "
                                                                   "choose one of: anil_omniglot_20w1s"), proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_usage_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    from metalearn.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    make_run(tmp_path / "plain", ["algo=protonet", "data=glyphs"], 0.5)
    make_run(tmp_path / "unfinished" / "a", ["experiment=protonet_omniglot_5w1s"], None)  # no results.json
    (tmp_path / "afile").write_text("")
    for args, expected in [
        ([], "name the presets to run"),
        (["-m", "experiment=maml_omniglot_5w1s"], "unknown option '-m'"),
        (["experiment=maml_omniglot_5w1s", "--out"], "--out needs a directory"),
        (["experiment=maml_omniglot_5w1s", "steps=10,20"], "'steps=10,20' sweeps steps: reproduce sweeps the presets only"),
        (["experiment=maml_omniglot_5w1s", "paper.value=98.7"], "paper.value=98.7 is a percentage; write accuracy as a "
                                                                "fraction (0.987)"),
        (["experiment=maml_omniglot_5w1s", "+paper.valeu=1"], "unknown option paper.valeu; the options of paper are: "
                                                               "metric, value, ci95, source, protocol, note"),
        (["experiment=maml_omniglot_5w1s", "algo.bogus=1"], "experiment=maml_omniglot_5w1s with algo.bogus=1: "),
        (["--from", "missing"], "no such directory: missing"),
        (["--from", "empty"], "no runs under empty"),
        (["--from", "plain"], "none of the 1 run under plain came from an experiment= preset"),
        (["--from", "plain", "steps=5"], "--from reads finished runs: it takes no overrides"),
        (["--from", "afile"], "afile is a file; give --from a directory"),
        (["--from", "plain", "experiment=nope"], "unknown preset 'nope'"),
        (["--from", "unfinished"], "none of the 1 preset run under unfinished has finished (a: no results.json: "),
        (["--from", "unfinished", "experiment=maml_omniglot_5w1s"], "no run of maml_omniglot_5w1s under unfinished"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(["reproduce", *args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("metalearn: error: ") and expected in err, \
            (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "plain", "unfinished"]  # nothing ran
    assert not [p for p in tmp_path.rglob("reproduce.*")]  # nothing was written
    assert list((tmp_path / "empty").iterdir()) == [tmp_path / "empty" / "sub"]


def test_a_preset_without_paper_data_is_refused():
    from hydra import compose

    from metalearn import confdir
    from metalearn.config import paper_config
    from metalearn.errors import ConfigError

    with confdir.initialized():
        cfg = compose("config", overrides=["algo=protonet"])  # a composed config with no paper: section
    assert paper_config(cfg) is None
    with pytest.raises(ConfigError, match=r"preset 'mine' has no paper: section .*add one \(metric, value"):
        reproduce.require_paper(reproduce.Preset("mine", paper_config(cfg), {}, {}))
