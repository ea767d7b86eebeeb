"""``metalearn report``: a real glyphs seed sweep reported through the CLI, and the grouping and
statistics on run folders written here (real Hydra configs, real TensorBoard event files)."""

from __future__ import annotations

import csv
import json
import math
import statistics
import struct
from pathlib import Path

import pytest

from metalearn import report
from metalearn.tracking import TensorBoard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- a real sweep, through the CLI


@pytest.fixture(scope="module")
def seed_sweep(cli, tmp_path_factory) -> Path:
    """4 real jobs: protonet on tiny glyphs, shots 1 and 5, seeds 0 and 1."""
    cwd = tmp_path_factory.mktemp("sweep")
    sweep = cwd / "multirun"
    fast = cli.with_overrides(cli.FAST, "steps=10", "trainer.val_every=5", "trainer.val_episodes=5",
                              "trainer.ckpt_every=10")
    proc = cli.run(["train", "-m", "algo=protonet", "seed=0,1", "shots=1,5", *fast, f"hydra.sweep.dir={sweep}"], cwd)
    assert proc.returncode == 0, cli.describe(proc)
    return sweep


def test_report_of_a_real_seed_sweep(cli, seed_sweep):
    proc = cli.run(["report", seed_sweep], seed_sweep.parent)
    assert proc.returncode == 0, cli.describe(proc)

    rows = read_csv(seed_sweep / "report.csv")
    assert len(rows) == 2
    assert list(rows[0])[0] == "shots" and "eval.shots" not in rows[0] and "seed" not in rows[0]
    assert [r["shots"] for r in rows] == ["1", "5"]
    for row in rows:
        runs = sorted(seed_sweep.glob(f"*_seed=*,shots={row['shots']}"))
        assert len(runs) == 2
        tests = [json.loads((r / "results.json").read_text())["test"]["accuracy"] for r in runs]
        accuracies = [t["mean"] for t in tests]
        assert row["metric"] == "accuracy" and row["seeds"] == "2" and row["seed_values"] == "0;1"
        assert float(row["test_mean"]) == pytest.approx(statistics.mean(accuracies), abs=1e-12)
        assert float(row["test_ci95_episodes"]) == pytest.approx(statistics.mean(t["ci95"] for t in tests), abs=1e-12)
        assert float(row["test_std_seeds"]) == pytest.approx(statistics.stdev(accuracies), abs=1e-12)
        assert float(row["test_ci95_seeds"]) == pytest.approx(12.7062 * statistics.stdev(accuracies) / math.sqrt(2),
                                                              rel=1e-4)
        assert row["unfinished"] == "0" and row["test_episodes"] == "20"

    width, height = png_size(seed_sweep / "val_accuracy.png")
    assert width > 0 and height > 0 and (seed_sweep / "val_accuracy.png").stat().st_size > 1000
    document = (seed_sweep / "report.md").read_text()
    assert "| shots | seeds | test accuracy (%) | seed std | 95% CI over seeds |" in document
    assert "![val_accuracy.png](val_accuracy.png)" in document and "algo=protonet" in document
    # the table goes to stdout too, each configuration's mean in percent
    for row in rows:
        assert f"| {row['shots']} | 2 (0, 1) | {100 * float(row['test_mean']):.2f} ± " in proc.stdout, proc.stdout
    assert not [p for p in seed_sweep.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- run folders written here


def compose(*overrides: str) -> dict:
    """The real composed config of ``metalearn train <overrides>`` (interpolations kept, as Hydra saves it)."""
    from hydra import compose as hydra_compose

    from metalearn import confdir
    from omegaconf import OmegaConf

    with confdir.initialized():
        return OmegaConf.to_container(hydra_compose("config", overrides=list(overrides)), resolve=False)


def make_run(path: Path, overrides: list[str], test: dict[str, float] | None, val: list[tuple[int, float]] = (),
             metric: str = "accuracy", episodes: int = 100) -> Path:
    """A run folder as ``metalearn train`` leaves it: .hydra/, TensorBoard events, results.json (unless ``test`` is None)."""
    from omegaconf import OmegaConf

    (path / ".hydra").mkdir(parents=True)
    cfg = compose(*overrides)
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), path / ".hydra" / "overrides.yaml")
    tb = TensorBoard(path)
    for step, value in val:
        tb.scalars(step, {f"val/{metric}": value, f"val/best_{metric}": value, f"train/{metric}": value})
    tb.close()
    if test is not None:
        best = val[-1] if val else (cfg["steps"], test["mean"])
        results = {"test": {metric: {**test, "std": 0.1, "episodes": episodes}, "loss": {"mean": 1.0, "ci95": 0.1}},
                   "best_val": {"metric": metric, "value": best[1], "step": best[0]}, "steps": cfg["steps"],
                   "episode": {"ways": cfg["ways"], "shots": cfg["shots"], "queries": cfg["queries"],
                               "task": "regression" if metric == "mse" else "classification"}}
        (path / "results.json").write_text(json.dumps(results))
    return path


MAML = {0: 0.80, 1: 0.84, 2: 0.83}
PROTONET = {0: 0.90, 1: 0.86}


@pytest.fixture
def algo_runs(tmp_path) -> Path:
    """maml x 3 seeds (one on another device), protonet x 2 seeds finished + 1 that died at step 10."""
    base = ["data=glyphs", "steps=30"]
    for i, (seed, acc) in enumerate(MAML.items()):
        device = ["device=cpu"] if seed == 2 else []
        make_run(tmp_path / f"{i}_algo=maml,seed={seed}", ["algo=maml", f"seed={seed}", *base, *device],
                 {"mean": acc, "ci95": 0.01 * (seed + 1)}, val=[(10, acc - 0.1), (20, acc - 0.05), (30, acc)])
    for i, (seed, acc) in enumerate(PROTONET.items(), start=3):
        make_run(tmp_path / f"{i}_algo=protonet,seed={seed}", ["algo=protonet", f"seed={seed}", *base],
                 {"mean": acc, "ci95": 0.02}, val=[(10, acc - 0.2), (30, acc)])
    make_run(tmp_path / "5_algo=protonet,seed=2", ["algo=protonet", "seed=2", *base], None, val=[(10, 0.5)])
    return tmp_path


def test_grouping_swept_keys_and_statistics(algo_runs):
    rep = report.build_report(algo_runs)
    # algo.inner_lr etc. differ only because algo does; device and seed are not configuration keys
    assert rep.keys == ["algo.name"]
    assert [c.values for c in rep.configurations] == [{"algo.name": "maml"}, {"algo.name": "protonet"}]
    maml, protonet = (report.summarize(c) for c in rep.configurations)

    values = list(MAML.values())
    assert maml["seeds"] == 3 and maml["seed_values"] == [0, 1, 2]
    assert maml["mean"] == pytest.approx(statistics.mean(values))
    assert maml["std_seeds"] == pytest.approx(statistics.stdev(values))
    assert maml["ci95_seeds"] == pytest.approx(4.302653 * statistics.stdev(values) / math.sqrt(3), rel=1e-5)
    assert maml["ci95_episodes"] == pytest.approx((0.01 + 0.02 + 0.03) / 3)
    assert (maml["min"], maml["max"]) == (min(values), max(values))

    assert protonet["seeds"] == 2 and protonet["mean"] == pytest.approx(0.88)
    assert [r.name for r in rep.configurations[1].unfinished] == ["5_algo=protonet,seed=2"]
    assert rep.common["data.name"] == "glyphs" and rep.common["steps"] == 30


def test_unfinished_run_is_listed_not_dropped(algo_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    table, written = report.write_report(algo_runs, out)
    assert sorted(p.name for p in written) == ["report.csv", "report.md", "val_accuracy.png"]
    assert "5_algo=protonet,seed=2: no results.json: unfinished or failed (last logged step 10 of 30)" in table
    assert "| protonet | 2 (0, 1), 1 unfinished | 88.00 ± 2.00 |" in table
    document = (out / "report.md").read_text()
    assert "| 5_algo=protonet,seed=2 | protonet | 2 |  |  | no results.json: unfinished or failed" in document
    rows = read_csv(out / "report.csv")
    assert [(r["algo"], r["seeds"], r["unfinished"]) for r in rows] == [("maml", "3", "0"), ("protonet", "2", "1")]
    assert png_size(out / "val_accuracy.png")[0] > 0
    assert not list(algo_runs.glob("report*")), "--out must leave the sweep folder alone"


def test_a_configuration_with_no_finished_run_gets_its_own_row(tmp_path):
    make_run(tmp_path / "0_shots=1", ["algo=protonet", "data=glyphs", "shots=1"], {"mean": 0.7, "ci95": 0.02}, val=[(5, 0.6)])
    make_run(tmp_path / "1_shots=5", ["algo=protonet", "data=glyphs", "shots=5"], None)
    table, _ = report.write_report(tmp_path)
    assert "| 5 | 0, 1 unfinished | no finished run |  |  |" in table
    rows = read_csv(tmp_path / "report.csv")
    assert [(r["shots"], r["seeds"], r["test_mean"]) for r in rows] == [("1", "1", "0.7"), ("5", "0", "")]
    assert "(nothing logged)" in table


def test_a_key_that_copies_another_is_no_column_unless_set_apart(tmp_path):
    base = ["algo=protonet", "data=glyphs"]
    make_run(tmp_path / "0", [*base, "shots=1"], {"mean": 0.7, "ci95": 0.02})
    make_run(tmp_path / "1", [*base, "shots=5"], {"mean": 0.8, "ci95": 0.02})
    assert report.build_report(tmp_path).keys == ["shots"]  # eval.shots: ${shots} follows it
    make_run(tmp_path / "2", [*base, "shots=5", "eval.shots=1"], {"mean": 0.75, "ci95": 0.02})
    rep = report.build_report(tmp_path)
    assert rep.keys == ["shots", "eval.shots"]
    assert [c.values for c in rep.configurations] == [{"shots": 1, "eval.shots": 1}, {"shots": 5, "eval.shots": 5},
                                                      {"shots": 5, "eval.shots": 1}]


def test_precision_is_a_configuration_key_unlike_the_device(tmp_path):
    base = ["algo=protonet", "data=glyphs"]
    make_run(tmp_path / "0", [*base, "device=cpu"], {"mean": 0.7, "ci95": 0.02})
    make_run(tmp_path / "1", [*base, "device=cpu", "device.precision=bf16"], {"mean": 0.69, "ci95": 0.02})
    make_run(tmp_path / "2", [*base, "device=auto", "device.precision=bf16", "seed=1"], {"mean": 0.71, "ci95": 0.02})
    rep = report.build_report(tmp_path)
    assert rep.keys == ["device.precision"]  # fp32 and bf16 are two rows; the device choice is no column
    assert [c.values for c in rep.configurations] == [{"device.precision": "fp32"}, {"device.precision": "bf16"}]


def test_a_failed_sweep_job_says_why(tmp_path):
    make_run(tmp_path / "0_seed=0", ["algo=protonet", "data=glyphs", "seed=0"], {"mean": 0.8, "ci95": 0.02}, val=[(10, 0.8)])
    failed = make_run(tmp_path / "1_seed=1", ["algo=protonet", "data=glyphs", "seed=1"], None)
    (failed / "failed.json").write_text(json.dumps({"error": "the loss became NaN at step 7", "exit_code": 3}))
    table, _ = report.write_report(tmp_path)
    assert "1_seed=1: failed: the loss became NaN at step 7" in table
    assert "| 1_seed=1 | 1 |  |  | failed: the loss became NaN at step 7 |" in (tmp_path / "report.md").read_text()


def test_regression_runs_report_mse(tmp_path):
    for seed, mse in enumerate([0.40, 0.30]):
        make_run(tmp_path / f"{seed}_seed={seed}", ["experiment=maml_sinusoid_k10", f"seed={seed}", "steps=100"],
                 {"mean": mse, "ci95": 0.05}, val=[(50, 2 * mse), (100, mse)], metric="mse", episodes=600)
    table, written = report.write_report(tmp_path)
    assert [p.name for p in written] == ["report.md", "report.csv", "val_mse.png"]
    row, = read_csv(tmp_path / "report.csv")
    assert row["metric"] == "mse" and float(row["test_mean"]) == pytest.approx(0.35)
    assert "test mse |" in table and "0.35 ± 0.05" in table and "(%)" not in table
    document = (tmp_path / "report.md").read_text()
    assert "Test mse (lower is better)" in document and "600 fixed test tasks (10-shot, 10 query points)" in document
    assert png_size(tmp_path / "val_mse.png")[1] > 0


def test_classification_and_regression_side_by_side_name_their_metric(tmp_path):
    make_run(tmp_path / "a", ["algo=protonet", "data=glyphs"], {"mean": 0.9, "ci95": 0.01}, val=[(10, 0.9)])
    make_run(tmp_path / "b", ["experiment=maml_sinusoid_k10"], {"mean": 0.5, "ci95": 0.05}, val=[(10, 0.5)], metric="mse")
    table, written = report.write_report(tmp_path)
    assert {p.name for p in written} >= {"val_accuracy.png", "val_mse.png"}
    assert "| metric |" in table.splitlines()[0] and "| accuracy |" in table and "| mse |" in table


def test_a_single_run_directory(tmp_path):
    run = make_run(tmp_path / "run", ["algo=protonet", "data=glyphs"], {"mean": 0.75, "ci95": 0.03}, val=[(10, 0.7)])
    table, written = report.write_report(run)
    assert written[0] == run / "report.md"
    assert "| protonet | glyphs | 1 | 75.00 ± 3.00 |" in table


def test_a_corrupt_results_file_is_listed_with_its_problem(tmp_path):
    make_run(tmp_path / "0_seed=0", ["algo=protonet", "data=glyphs", "seed=0"], {"mean": 0.8, "ci95": 0.02}, val=[(10, 0.8)])
    bad = make_run(tmp_path / "1_seed=1", ["algo=protonet", "data=glyphs", "seed=1"], {"mean": 0.9, "ci95": 0.02})
    (bad / "results.json").write_text('{"test": {"accur')
    table, _ = report.write_report(tmp_path)
    assert "1_seed=1: unreadable results.json" in table
    row, = read_csv(tmp_path / "report.csv")
    assert row["seeds"] == "1" and row["unfinished"] == "1" and float(row["test_mean"]) == pytest.approx(0.8)


def test_resumed_run_curve_drops_the_purged_tail(tmp_path):
    """A run that crashed after step 30, resumed from its step-20 checkpoint: TensorBoard hides the old 30."""
    run = make_run(tmp_path / "run", ["algo=protonet", "data=glyphs"], None, val=[(10, 0.5), (20, 0.6), (30, 0.1)])
    tb = TensorBoard(run, purge_step=21)  # what the engine opens on resume
    tb.scalars(30, {"val/accuracy": 0.7})
    tb.close()
    assert report.read_scalars(run)["val/accuracy"] == [(10, 0.5), (20, pytest.approx(0.6)), (30, pytest.approx(0.7))]


def test_t_quantiles():
    # Student's t 0.975 quantiles from the tables
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452), (1000, 1.9623)]:
        assert report.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_bad_input_is_one_line(cli, tmp_path, what):
    target = tmp_path / "target"
    if what == "empty":
        (target / "sub").mkdir(parents=True)
    elif what == "file":
        target.write_text("x")
    proc = cli.run(["report", target], tmp_path)
    assert proc.returncode == 2, cli.describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: "), proc.stderr
    assert {"missing": "no such directory", "empty": "no runs under", "file": "is a file"}[what] in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    if what == "empty":
        assert [p.name for p in target.iterdir()] == ["sub"], "nothing may be written"


def test_usage_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    from metalearn.cli import main

    monkeypatch.chdir(tmp_path)
    for args, expected in [([], "give one run or sweep directory"), ([".", "--bogus"], "unknown option '--bogus'"),
                           (["dir=outputs"], "not key=value"), ([".", "--out"], "--out needs a directory")]:
        with pytest.raises(SystemExit) as exit:
            main(["report", *args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("metalearn: error: ") and expected in err, err


def test_tab_completion_leaves_the_directory_to_the_shell(cli, tmp_path):
    """No suggestions after ``metalearn report``: the installed script falls back to file names."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "metalearn", "-sc", "query=bash"], cwd=tmp_path,
                          env=cli.env(COMP_LINE="metalearn report "), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "", cli.describe(proc)
