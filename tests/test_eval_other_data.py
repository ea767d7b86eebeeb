"""``metalearn eval`` on other data than the run's: cross-domain datasets and fixed episodes from folders
(``data=episodes``), Lake et al.'s one-shot runs converted by scripts/prepare_lake_oneshot.py.

One short protonet run on glyphs is shared; the other data are glyph images of unseen classes written
here as PNG files, so a glyphs learner should score far above chance on them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metalearn import confdir
from metalearn.data import episode_folders, glyphs
from metalearn.errors import ConfigError, DataError
from metalearn.evaluation import evaluate_checkpoint

from conftest import FAST, FAST_SPLIT, REPO

PROTONET = [*FAST, "algo=protonet", "device=cpu"]
ACCURACY = re.compile(r"accuracy: ([\d.]+)% \+- ([\d.]+)% \(95% CI, (\d+) episodes\)")


def glyph_classes(seed: int, classes: int, samples: int) -> list[torch.Tensor]:
    """Per class, its uint8 glyph images [samples, 28, 28]: classes no run has seen (another data seed)."""
    store = glyphs.load(glyphs.Config(split_sizes=[1, 1, classes],
                                      samples_per_class=samples, generation_seed=seed))["test"]
    return [store.images[o : o + n, 0] for o, n in zip(store.offsets.tolist(), store.counts.tolist())]


def save_png(pixels: torch.Tensor, path: Path, size: int | None = None, invert: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray((255 - pixels if invert else pixels).numpy())
    (image.resize((size, size), Image.Resampling.BILINEAR) if size else image).save(path)


def write_episode(root: Path, support: list[list[torch.Tensor]], query: list[list[torch.Tensor]]) -> None:
    """root/c<label>/{support,query}/<i>.png, label order = class order."""
    for label, (s, q) in enumerate(zip(support, query)):
        for i, x in enumerate(s):
            save_png(x, root / f"c{label}" / "support" / f"{i}.png")
        for i, x in enumerate(q):
            save_png(x, root / f"c{label}" / "query" / f"{i}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli) -> Path:
    """A FAST protonet on glyphs (about 70% on its 5-way 1-shot test episodes; chance is 20%)."""
    cwd = tmp_path_factory.mktemp("protonet")
    proc = cli.run(["train", *PROTONET, f"hydra.run.dir={cwd / 'run'}"], cwd)
    assert proc.returncode == 0, cli.describe(proc)
    return cwd / "run"


@pytest.fixture(scope="module")
def evaluations(run, cli, tmp_path_factory) -> dict:
    """Several evaluations of ``run`` side by side, on data written here."""
    cwd = tmp_path_factory.mktemp("other_data")
    tree = cwd / "glyph_pngs"  # imagefolder: 10 unseen glyph classes, 8 images each
    for c, images in enumerate(glyph_classes(seed=7, classes=10, samples=8)):
        for i, x in enumerate(images):
            save_png(x, tree / f"class{c}" / f"{i}.png")
    # The run's first 8 test episodes exactly, written as episode folders.
    test = glyphs.load(glyphs.Config(split_sizes=FAST_SPLIT))["test"]
    sampler = test.sampler(5, 1, 15, 1, seed=1)  # eval's default seed: trainer.eval_seed + 1
    for e in range(8):
        task = sampler.sample()
        as_uint8 = lambda x: (x[0, :, 0] * 255).round().to(torch.uint8)  # noqa: E731
        sx, qx = as_uint8(task.support_x), as_uint8(task.query_x)
        write_episode(cwd / "sampled" / f"episode{e:02d}",
                      [list(sx[task.support_y[0] == k]) for k in range(5)],
                      [list(qx[task.query_y[0] == k]) for k in range(5)])
    root = f"data.root={cwd / 'cache'}"
    procs = cli.run_many({
        "imagefolder": (["eval", f"run={run}", "data=imagefolder", "data.path=glyph_pngs", root, "data.image_size=28",
                         "data.channels=1", "split=all", "queries=5", "episodes=40"], cwd),
        "episodes": (["eval", f"run={run}", "data=episodes", f"data.path={cwd / 'sampled'}", "batch_size=3",
                      "device=cpu"], cwd),
        "no_group": (["eval", f"run={run}", "data.image_size=28"], cwd),
    })
    return {"cwd": cwd, **procs}


def written(proc: subprocess.CompletedProcess) -> Path:
    return Path(re.search(r"^results: (.+)$", proc.stdout, re.M).group(1))


def test_cross_domain_imagefolder_scores_far_above_chance(cli, run, evaluations):
    proc = evaluations["imagefolder"]
    assert proc.returncode == 0, cli.describe(proc)
    accuracy, ci, episodes = ACCURACY.search(proc.stdout).groups()
    assert episodes == "40" and float(accuracy) > 45 and 0 < float(ci) < 15, proc.stdout  # chance: 20%
    out = written(proc)
    assert out.parent == run and re.fullmatch(r"eval-best-all-imagefolder-glyph_pngs-[0-9a-f]{8}-5w1s5q-40ep-seed1\.json",
                                              out.name), out.name
    results = json.loads(out.read_text())
    assert results["data"]["name"] == "imagefolder" and results["split"] == "all"
    assert results["inputs"]["normalised_as"] == "glyphs" and results["inputs"]["mean"] is None


def test_shape_mismatch_is_one_line_naming_both_shapes_and_the_keys(run, evaluations, monkeypatch):
    monkeypatch.chdir(evaluations["cwd"])
    with pytest.raises(ConfigError) as error:
        evaluate_checkpoint(eval_config(run, "data=imagefolder", "data.path=glyph_pngs",
                                        f"data.root={evaluations['cwd'] / 'cache'}", "split=all"))
    assert str(error.value) == ("data=imagefolder gives inputs of shape 3x84x84 but the checkpoint's backbone was trained "
                                "on 1x28x28 (data=glyphs); set data.image_size=28 data.channels=1")


def test_fixed_episodes_are_scored_exactly_each_once(cli, run, evaluations, capsys):
    """The run's own first 8 test episodes, as folders, give the numbers of those episodes drawn by the sampler."""
    fixed = evaluations["episodes"]
    assert fixed.returncode == 0, cli.describe(fixed)
    assert "8 fixed episodes from" in fixed.stdout and "5-way 1-shot (15 queries per class)" in fixed.stdout
    a, b = json.loads(written(fixed).read_text()), evaluate_checkpoint(eval_config(run, "episodes=8"))
    for metric in ("accuracy", "loss"):
        assert a["test"][metric]["episodes"] == 8
        assert a["test"][metric]["mean"] == pytest.approx(b["test"][metric]["mean"], abs=1e-5)
        assert a["test"][metric]["std"] == pytest.approx(b["test"][metric]["std"], abs=1e-5)
    assert a["test"]["accuracy"]["mean"] > 0.45, a["test"]
    assert a["episode"] == {"ways": 5, "shots": 1, "queries": 15, "task": "classification",
                            "fixed": str(evaluations["cwd"] / "sampled"), "episodes": 8}
    assert written(fixed).name.startswith("eval-best-episodes-sampled-") and (run / "eval-best-5w1s15q-8ep-seed1.json").is_file()


def test_data_keys_without_a_data_option_are_one_line(evaluations):
    proc = evaluations["no_group"]
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "'data.image_size' sets an option of data=<option>" in proc.stderr and "add data=<option>" in proc.stderr


# ---------------------------------------------------------------- in process: episode folders


def eval_config(run: Path, *overrides: str):
    return confdir.compose("eval", [f"run={run}", "device=cpu", *overrides])


@pytest.fixture
def episodes(tmp_path) -> Path:
    """Two 3-way episodes: one 1-shot with 1-3 queries per class, one 2-shot with 2 queries per class."""
    classes = glyph_classes(seed=11, classes=6, samples=5)
    write_episode(tmp_path / "eps" / "b", [list(classes[k][:2]) for k in range(3, 6)],
                  [list(classes[k][2:4]) for k in range(3, 6)])
    write_episode(tmp_path / "eps" / "a", [[classes[k][0]] for k in range(3)],
                  [list(classes[k][1 : 2 + k]) for k in range(3)])
    return tmp_path / "eps"


def test_episode_folders_load_in_order_with_labels_per_episode(episodes):
    [store] = episode_folders.load(episode_folders.Config(path=str(episodes), image_size=28, channels=1)).values()
    assert [e.name for e in store.episodes] == ["a", "b"] and store.input_shape == (1, 28, 28)
    a, b = store.episodes
    assert (a.ways, a.shots, a.queries, b.shots, b.queries) == (3, 1, [1, 2, 3], 2, [2, 2, 2])
    assert store.summary() | {"fixed": ""} == {"ways": 3, "shots": "1-2", "queries": "1-3", "task": "classification",
                                               "fixed": "", "episodes": 2}
    classes = glyph_classes(seed=11, classes=6, samples=5)
    assert torch.equal(a.query_x[a.query_y == 2, 0], classes[2][1:4])  # PNG round trip at 28 px: the same pixels
    sampler = store.sampler(0, 0, 0, 1, seed=0)
    first, second = sampler.sample(), sampler.sample()
    assert first.support_x.shape == (1, 3, 1, 28, 28) and first.query_x.shape == (1, 6, 1, 28, 28)
    assert second.support_x.shape == (1, 6, 1, 28, 28) and sorted(second.support_y[0].tolist()) == [0, 0, 1, 1, 2, 2]
    assert second.classes.tolist() == [[3, 4, 5]]
    with pytest.raises(IndexError):
        sampler.sample()


def test_uneven_episodes_score_with_any_batch_size(run, episodes, capsys):
    by_one = evaluate_checkpoint(eval_config(run, "data=episodes", f"data.path={episodes}", "batch_size=1"))
    together = evaluate_checkpoint(eval_config(run, "data=episodes", f"data.path={episodes}", "batch_size=8"))
    assert by_one["test"]["accuracy"]["episodes"] == 2
    for metric in ("accuracy", "loss"):
        assert by_one["test"][metric] == pytest.approx(together["test"][metric])
    assert "3-way 1-2-shot (1-3 queries per class)" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    (lambda p: shutil.rmtree(p), r"data.path .*eps is not a folder"),
    (lambda p: [shutil.rmtree(d) for d in p.iterdir()], r"no episode folders under .*eps"),
    (lambda p: [shutil.rmtree(d) for d in (p / "a").iterdir()], r"episode .*eps/a is empty; an episode needs two or more"),
    (lambda p: [shutil.rmtree(p / "a" / c) for c in ("c1", "c2")], r"episode .*eps/a has one class folder \(c0\)"),
    (lambda p: shutil.rmtree(p / "a" / "c1" / "query"), r"class folder .*eps/a/c1 has no query images"),
    (lambda p: [f.unlink() for f in (p / "b" / "c0" / "support").iterdir()], r"class folder .*eps/b/c0 has no support images"),
    (lambda p: (p / "a" / "c2" / "query" / "0.png").write_bytes(b"not a png"), r"cannot read image .*a/c2/query/0.png"),
    (lambda p: (p / "b" / "c1" / "support" / "0.png").unlink(),
     r"the classes of episode .*eps/b have different numbers of support images \(c0 2, c1 1, c2 2\)"),
])
def test_bad_episode_folders_are_one_line(episodes, damage, message):
    damage(episodes)
    with pytest.raises(DataError, match=message) as error:
        episode_folders.load(episode_folders.Config(path=str(episodes), image_size=28, channels=1))
    assert "\n" not in str(error.value)


def test_episode_shape_options_are_refused_with_fixed_episodes(run, episodes):
    with pytest.raises(ConfigError, match=r"^data=episodes scores every episode under data.path once.*; drop ways=3 episodes=5$"):
        evaluate_checkpoint(eval_config(run, "data=episodes", f"data.path={episodes}", "ways=3", "episodes=5"))


def test_fixed_heads_refuse_other_ways(trained_run, episodes):
    """The shared FAST run is maml, whose classifier has 5 outputs: it cannot score 3-way episodes, and says so."""
    with pytest.raises(ConfigError, match=r"maml's classifier has 5 outputs \(trained 5-way\); it cannot run 3-way episodes"):
        evaluate_checkpoint(eval_config(trained_run, "data=episodes", f"data.path={episodes}"))


# ---------------------------------------------------------------- checkpoints and the run's own data


def test_checkpoint_problem_means_the_training_data_is_not_needed(tmp_path, episodes, capsys):
    """A run trained on an imagefolder tree scores fixed episodes after the tree is gone (the checkpoint
    records the input shape, ways and classes); the run's own test split then needs the tree, and says so."""
    from metalearn import engine
    from metalearn.config import to_run_config

    tree = tmp_path / "tree"
    for c, images in enumerate(glyph_classes(seed=3, classes=20, samples=6)):
        for i, x in enumerate(images):
            save_png(x, tree / f"g{c:02d}" / f"{i}.png")
    cfg = to_run_config(confdir.compose("config", [
        "algo=protonet", "data=imagefolder", f"data.path={tree}", f"data.root={tmp_path / 'cache'}", "data.image_size=28",
        "data.channels=1", "backbone.hidden=16", "device=cpu", "ways=3", "queries=2", "meta_batch_size=2", "steps=2",
        "trainer.log_every=1", "trainer.val_every=2", "trainer.val_episodes=2", "trainer.test_episodes=2",
        "trainer.ckpt_every=2"]))
    engine.train(cfg, tmp_path / "run")
    problem = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["problem"]
    assert problem["input_shape"] == [1, 28, 28] and problem["num_train_classes"] == 12 and len(problem["mean"]) == 1
    shutil.rmtree(tree)
    results = evaluate_checkpoint(eval_config(tmp_path / "run", "data=episodes", f"data.path={episodes}"))
    assert results["test"]["accuracy"]["episodes"] == 2
    assert results["inputs"]["normalised_as"] == "imagefolder" and results["inputs"]["mean"] == pytest.approx(problem["mean"])
    with pytest.raises(DataError, match=r"data.path .*tree is not a folder"):
        evaluate_checkpoint(eval_config(tmp_path / "run"))


def test_older_checkpoints_without_problem_use_the_run_data(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints", old / "checkpoints")
    ckpt = torch.load(old / "checkpoints" / "best.pt", weights_only=True)
    del ckpt["problem"]
    torch.save(ckpt, old / "checkpoints" / "best.pt")
    results = evaluate_checkpoint(eval_config(old))
    expected = json.loads((run / "results.json").read_text())["test"]
    assert results["test"]["accuracy"]["mean"] == pytest.approx(expected["accuracy"]["mean"], abs=1e-6)


def test_split_option(run, capsys):
    val = evaluate_checkpoint(eval_config(run, "split=val", "episodes=4"))
    assert val["split"] == "val" and val["test"]["accuracy"]["episodes"] == 4
    assert (run / "eval-best-val-5w1s15q-4ep-seed1.json").is_file()
    with pytest.raises(ConfigError, match=r"^split='nope' is not one of: train, val, test, all$"):
        evaluate_checkpoint(eval_config(run, "split=nope"))


# ---------------------------------------------------------------- Lake et al.'s one-shot runs


def lake_runs(root: Path, runs: int, ways: int) -> None:
    """Lake's all_runs layout: runNN/training/classNN.png, runNN/test/itemNN.png (105 px, black ink on white),
    runNN/class_labels.txt; the test items in shuffled class order, as in the original."""
    classes = glyph_classes(seed=5, classes=runs * ways, samples=2)
    for r in range(1, runs + 1):
        folder = root / "all_runs" / f"run{r:02d}"
        order = torch.randperm(ways, generator=torch.Generator().manual_seed(r)).tolist()
        lines = []
        for k in range(ways):
            images = classes[(r - 1) * ways + k]
            save_png(images[0], folder / "training" / f"class{k + 1:02d}.png", size=105, invert=True)
            item = order.index(k) + 1
            save_png(images[1], folder / "test" / f"item{item:02d}.png", size=105, invert=True)
            lines.append((item, f"run{r:02d}/test/item{item:02d}.png run{r:02d}/training/class{k + 1:02d}.png"))
        (folder / "class_labels.txt").write_text("\n".join(line for _, line in sorted(lines)) + "\n")


def prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_lake_oneshot.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_lake_converter_and_scoring(run, tmp_path, capsys):
    lake_runs(tmp_path, runs=4, ways=10)
    with zipfile.ZipFile(tmp_path / "all_runs.zip", "w") as archive:
        for p in sorted((tmp_path / "all_runs").rglob("*")):
            archive.write(p, p.relative_to(tmp_path))
    proc = prepare(tmp_path / "all_runs.zip", tmp_path / "lake")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("4 episodes (10-way 1-shot, 40 test images) -> ")
    assert sorted(p.name for p in (tmp_path / "lake").iterdir()) == ["run01", "run02", "run03", "run04"]
    label = (tmp_path / "all_runs" / "run02" / "class_labels.txt").read_text().splitlines()[0].split()
    test_item, train_class = Path(label[0]).name, Path(label[1]).stem
    assert (tmp_path / "lake" / "run02" / train_class / "query" / test_item).is_file()
    assert [p.name for p in (tmp_path / "lake" / "run02" / train_class / "support").iterdir()] == [f"{train_class}.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lake.tmp")]

    results = evaluate_checkpoint(eval_config(run, "data=episodes", f"data.path={tmp_path / 'lake'}", "data.invert=true"))
    assert results["episode"] | {"fixed": ""} == {"ways": 10, "shots": 1, "queries": 1, "task": "classification",
                                                  "fixed": "", "episodes": 4}
    assert results["test"]["accuracy"]["mean"] > 0.3, results["test"]  # 10-way: chance is 10%

    # The folder from the extracted archive works too; mistakes are one line.
    assert prepare(tmp_path / "all_runs", tmp_path / "lake2").returncode == 0
    again = prepare(tmp_path / "all_runs", tmp_path / "lake")
    assert again.returncode == 2 and again.stderr.strip().endswith("lake exists already; remove it or give another output folder")
    (tmp_path / "all_runs" / "run03" / "test" / "item04.png").unlink()
    broken = prepare(tmp_path / "all_runs", tmp_path / "lake3")
    assert broken.returncode == 2 and len(broken.stderr.strip().splitlines()) == 1
    assert re.search(r"class_labels.txt line \d+: run03/test/item04.png is not a file of .*run03", broken.stderr)
    assert not (tmp_path / "lake3").exists()


def test_data_info_of_fixed_episodes_prints_no_cache_line(episodes, cli):
    proc = cli.run(["data", "info", "data=episodes", f"data.path={episodes}", "data.image_size=28", "data.channels=1"],
                   episodes.parent)
    assert proc.returncode == 0, cli.describe(proc)
    assert "ready" in proc.stdout and "cache" not in proc.stdout  # nothing is cached for fixed episodes
