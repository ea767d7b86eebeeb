"""``metalearn eval``'s test-time options (metalearn/adaptation.py): fine-tuning on the support set
(``finetune.*``), test-time augmentation (``tta.*``) and ensembles (``run=[A,B]`` / ``run=A,B``), as real
subprocesses on tiny glyphs runs: the FAST protonet trained here, the session's FAST maml (``trained_run``), and a
TINY snail on 20x20 glyphs (a sequence learner on other inputs: what fine-tuning and ensembles refuse)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import FAST, TINY

PROTONET = [*FAST, "algo=protonet", "device=cpu"]
SNAIL = [*TINY, "algo=snail", "data.image_size=20", "device=cpu"]
RESULTS = re.compile(r"^results: (.+)$", re.M)
TIME = re.compile(r"time: ([\d.]+) s per episode")
FINETUNE = ["finetune.steps=5", "finetune.part=all", "finetune.lr=0.01"]


def files(run: Path) -> dict[str, str]:
    """Every file of a run but eval's results, by its content's hash."""
    return {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and not p.name.startswith("eval-")}


@pytest.fixture(scope="module")
def runs(cli, trained_run, tmp_path_factory) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("tta_runs")
    procs = cli.run_many({name: (["train", *args, f"hydra.run.dir={cwd / name}"], cwd)
                          for name, args in {"protonet": PROTONET, "snail": SNAIL}.items()})
    for proc in procs.values():
        assert proc.returncode == 0, cli.describe(proc)
    return {"protonet": cwd / "protonet", "snail": cwd / "snail", "maml": trained_run}


@pytest.fixture(scope="module")
def evals(cli, runs, tmp_path_factory) -> dict:
    """Every evaluation of the tests, side by side: name -> (process, results or None)."""
    cwd = tmp_path_factory.mktemp("tta_evals")
    p, m, s = (str(runs[k]) for k in ("protonet", "maml", "snail"))
    before = {k: files(v) for k, v in runs.items()}
    jobs = {
        "plain": [f"run={p}"],
        "finetune": [f"run={p}", *FINETUNE],
        "finetune_again": [f"run={p}", *FINETUNE, "batch_size=3"],
        "views1": [f"run={p}", "tta.views=1"],
        "views3": [f"run={p}", "tta.views=3"],
        "one_member": [f"run=[{p}]"],
        "pair": [f"run={p},{m}"],
        "maml": [f"run={m}", "episodes=60"],
        "maml_last": [f"run={m}", "episodes=60", "finetune.steps=20", "finetune.part=last", "finetune.lr=0.01"],
        "negative_steps": [f"run={p}", "finetune.steps=-1"],
        "no_views": [f"run={p}", "tta.views=0"],
        "missing": [f"run=[{p},{cwd / 'nowhere'}]"],
        "shapes": [f"run=[{p},{s}]"],
        "sequence": [f"run={s}", "finetune.steps=5"],
        "steps_of_protonet": [f"run={p}", "adaptation_steps=2"],
        "maml_steps0": [f"run={m}", "episodes=60", "adaptation_steps=0"],
    }
    procs = cli.run_many({k: (["eval", *v], cwd) for k, v in jobs.items()})
    out = {}
    for name, proc in procs.items():
        written = RESULTS.search(proc.stdout)
        out[name] = (proc, json.loads(Path(written.group(1)).read_text()) if written else None)
    out["_unchanged"] = all(files(v) == before[k] for k, v in runs.items())
    return out


def ok(cli, evals, name: str) -> dict:
    proc, results = evals[name]
    assert proc.returncode == 0, cli.describe(proc)
    assert TIME.search(proc.stdout), proc.stdout
    assert results["seconds_per_episode"] > 0
    return results


def test_finetuning_changes_no_file_and_is_deterministic(cli, evals):
    plain, tuned = ok(cli, evals, "plain"), ok(cli, evals, "finetune")
    assert evals["_unchanged"]  # checkpoints, config, logs: as they were
    assert tuned["test"] == ok(cli, evals, "finetune_again")["test"]  # the same, whatever the batch of episodes
    assert tuned["adaptation"]["finetune"] == {"steps": 5, "lr": 0.01, "part": "all", "head": "linear", "scale": 10.0}
    assert tuned["test"] != plain["test"]
    assert "ft-all-linear-5st-lr0.01" in RESULTS.search(evals["finetune"][0].stdout).group(1)


def test_one_view_and_one_member_are_the_plain_evaluation(cli, evals):
    plain = ok(cli, evals, "plain")
    for name in ("views1", "one_member"):
        results = ok(cli, evals, name)
        assert results["test"] == plain["test"], name
        assert "adaptation" not in results and "members" not in results
    views = ok(cli, evals, "views3")
    assert views["adaptation"]["tta"]["views"] == 3 and views["test"] != plain["test"]


def test_ensemble_of_two_algorithms(cli, evals, runs):
    results = ok(cli, evals, "pair")  # run=A,B without -m: one ensemble, not a sweep
    assert [m["algo"] for m in results["members"]] == ["protonet", "maml"]
    assert results["members"][1]["checkpoint"] == str(runs["maml"] / "checkpoints" / "best.pt")
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1 and results["test"]["accuracy"]["episodes"] == 20
    assert "an ensemble of 2 runs" in evals["pair"][0].stdout
    assert "ensemble2-" in RESULTS.search(evals["pair"][0].stdout).group(1)


def test_fine_tuning_an_undertrained_maml_gains(cli, evals):
    """MAML after 20 meta-steps (66% on 200 episodes): a prototype head fitted with the backbone's last block on
    each support set does better (72%); the same 60 episodes on both sides."""
    plain, tuned = ok(cli, evals, "maml"), ok(cli, evals, "maml_last")
    assert tuned["test"]["accuracy"]["mean"] > plain["test"]["accuracy"]["mean"]


@pytest.mark.parametrize("name, says", [
    ("negative_steps", "finetune.steps must be an integer >= 0"),
    ("no_views", "tta.views must be an integer >= 1"),
    ("missing", "nowhere does not exist"),
    ("shapes", "an ensemble's runs must take the same inputs"),
    ("sequence", "algo=snail reads an episode as a sequence"),
])
def test_bad_options_end_in_one_line(cli, evals, name, says):
    proc, results = evals[name]
    assert proc.returncode != 0 and results is None, cli.describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: ") and says in lines[0], proc.stderr


def test_adaptation_steps_are_refused_for_an_algorithm_without_them(cli, evals):
    proc, _ = evals["steps_of_protonet"]
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "metalearn: error: algo=protonet adapts without gradient steps (it has no algo.test_inner_steps); "
        "drop adaptation_steps=2"], cli.describe(proc)


def test_adaptation_steps_change_a_gradient_learner_and_get_their_own_file(cli, evals):
    """MAML with no step at test is the meta-learned initialisation itself: about chance on new classes."""
    trained, none = ok(cli, evals, "maml"), ok(cli, evals, "maml_steps0")
    assert none["test"]["accuracy"]["mean"] < trained["test"]["accuracy"]["mean"] - 0.1, (none["test"], trained["test"])
    written = {RESULTS.search(evals[k][0].stdout).group(1) for k in ("maml", "maml_steps0")}
    assert len(written) == 2 and any("-steps0" in w for w in written), written
