"""One split vocabulary for every dataset (data.train/val/test, data.split_seed, data.ratios), the keys it
replaced (one error line; stored configs migrated), and data.cache_dir (a read-only data root works)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metalearn.config import to_run_config
from metalearn.data import glyphs, mnist, omniglot
from metalearn.data.common import SplitConfig, choose_split
from metalearn.errors import ConfigError, DataError
from metalearn.renamed import migrate, renamed_message
from test_omniglot import SHARED, fake_archive
from conftest import FAST_SPLIT

NAMES = ["A/c1", "A/c2", "A/c3", "B/c1", "B/c2", "C/c1", "C/c2", "D/c1"]


@dataclass
class Split(SplitConfig):
    name: str = "toy"
    train: list[str] = field(default_factory=list)


def split(names=NAMES, standard=None, **options):
    return choose_split(Split(**options), names, standard)


# ---------------------------------------------------------------- choose_split


def test_names_and_patterns_take_everything_at_or_below_in_the_dataset_order():
    chosen = split(train=["B", "A/c[13]"], val=["C/*"], test=["D"])
    assert chosen == {"train": ["A/c1", "A/c3", "B/c1", "B/c2"], "val": ["C/c1", "C/c2"], "test": ["D/c1"]}
    # A pattern matches one level at a time: "c1" is no top-level name, "*/c1" is every alphabet's c1.
    assert split(train=["*/c1"], val=["A/c2"], test=["C/c2"])["train"] == ["A/c1", "B/c1", "C/c1", "D/c1"]


@pytest.mark.parametrize("options, message", [
    ({"train": ["A"], "val": ["B"], "test": ["Klingon"]},
     r"^data.test entry 'Klingon' matches no class of toy; its top-level names are: A, B, C, D$"),
    ({"train": ["A", "B/c1"], "val": ["B"], "test": ["C"]},
     r"^class B/c1 is in both data.train \(by 'B/c1'\) and data.val \(by 'B'\); give each class to one split only$"),
    ({"train": ["A"], "val": ["A/c2"], "test": ["C"]},
     r"^class A/c2 is in both data.train \(by 'A'\) and data.val \(by 'A/c2'\); give each class"),
    ({"train": ["A"], "test": ["C"]}, r"^data.train and data.test given but data.val empty; list names or patterns"),
    ({"train": ["/etc"], "val": ["B"], "test": ["C"]}, r"^data.train entry '/etc' is not a class name or pattern"),
    ({"ratios": [1, 0, 1]}, r"^data.ratios must be three positive numbers, for train, val and test \(got \[1, 0, 1\]\)$"),
])
def test_split_mistakes_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        split(**options)


def test_the_standard_split_unless_names_or_a_split_seed():
    standard = {"train": ["B/c1", "A/c1", "A/c2", "A/c3"], "val": ["B/c2", "C/c1"], "test": ["C/c2", "D/c1"]}
    assert split(standard=standard) == standard  # as given, in its own order
    dealt = split(standard=standard, split_seed=5)
    assert sorted(sum(dealt.values(), [])) == sorted(NAMES) and [len(v) for v in dealt.values()] == [4, 2, 2]
    assert dealt != standard and dealt == split(standard=standard, split_seed=5)
    assert split(standard=standard, split_seed=6) != dealt


def test_a_dataset_without_standard_split_deals_like_imagefolder_always_did():
    names = [f"class{i:02d}" for i in range(20)]
    for seed, ratios in [(None, None), (3, [2, 1, 1])]:
        chosen = split(names, split_seed=seed, ratios=ratios)
        # imagefolder's rule, written out: a permutation by the seed, cut at the rounded cumulative ratios.
        weights = np.asarray(ratios or [0.6, 0.2, 0.2])
        order = np.random.default_rng(seed or 0).permutation(len(names))
        parts = np.split(order, np.round(np.cumsum(weights) / weights.sum() * len(names)).astype(int)[:2])
        assert chosen == {s: [names[i] for i in sorted(p.tolist())] for s, p in zip(("train", "val", "test"), parts)}
    with pytest.raises(DataError, match=r"data.ratios=\[0.96, 0.02, 0.02\] leaves the test split no class of the 20 of toy; add classes or change data.ratios$"):
        split(names, ratios=[0.96, 0.02, 0.02])


def test_omniglot_deals_whole_alphabets(tmp_path):
    fake_archive(tmp_path / "omniglot", "set1", {name: 2 for name in "ABCDEFGHIJ"}, drawings=1)
    cfg = omniglot.Config(root=str(tmp_path), archives=["set1"], download=False, image_size=8, rotations=False)
    stores = omniglot.load(cfg)  # other archives than the official two: no standard split, alphabets dealt by seed 0
    alphabets = {s: {n.split("/")[0] for n in store.class_names} for s, store in stores.items()}
    assert [len(a) for a in alphabets.values()] == [6, 2, 2] and not (alphabets["train"] & alphabets["test"])
    assert all(store.num_classes == 2 * len(alphabets[s]) for s, store in stores.items())
    by_name = omniglot.load(omniglot.Config(**{**vars(cfg), "train": ["[A-F]"], "val": ["G", "H/character01"],
                                             "test": ["I/*", "J/character0[2]"]}))
    assert by_name["val"].class_names == ["G/character01", "G/character02", "H/character01"]
    assert by_name["test"].class_names == ["I/character01", "I/character02", "J/character02"]


# ---------------------------------------------------------------- glyphs

#: sha256 of the images and per-class counts of each split of glyphs' default 300/100/100, as the loader
#: drew them before the split keys were renamed (train_classes=300, val_classes=100, test_classes=100, seed=0).
GLYPHS_DEFAULT = {
    "train": "c238be2ef62a314069c4075561636e5f7f6281dfbd5efa0cbb77fae4f3431537",
    "val": "d5537cf2bc44487f8bf1bf9340ee3417ab1ae7239179ef5c3ceb9099c4895980",
    "test": "916c23b35b7799b0e83fc5ea2775a7f7d978284a7f5396bf1ceb3c5c20c1de6c",
}


def digest(store) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(store.images.numpy()).tobytes())
    h.update(store.counts.numpy().tobytes())
    return h.hexdigest()


def test_glyphs_default_is_byte_identical_and_named():
    stores = glyphs.load(glyphs.Config())
    assert {s: digest(store) for s, store in stores.items()} == GLYPHS_DEFAULT
    assert stores["train"].class_names[:2] == ["glyph00000", "glyph00001"]
    assert stores["val"].class_names[0] == "glyph00300" and stores["test"].class_names[-1] == "glyph00499"


def test_glyphs_other_splits_of_the_same_images():
    cfg = glyphs.Config(split_sizes=[12, 4, 4], samples_per_class=3, image_size=12)
    standard = glyphs.load(cfg)
    images = {n: standard[s].images[3 * i : 3 * i + 3] for s in standard for i, n in enumerate(standard[s].class_names)}
    named = glyphs.load(glyphs.Config(**{**vars(cfg), "train": ["glyph0001?"], "val": ["glyph0000[0-4]"],
                                         "test": ["glyph0000[5-9]"]}))
    assert named["train"].class_names == [f"glyph{i:05d}" for i in range(10, 20)]
    dealt = glyphs.load(glyphs.Config(**{**vars(cfg), "split_seed": 1}))
    assert [s.num_classes for s in dealt.values()] == [12, 4, 4]  # split_sizes' proportions
    assert dealt["test"].class_names != standard["test"].class_names
    for stores in (named, dealt):  # the class's own images, whichever split it is in
        for store in stores.values():
            for i, name in enumerate(store.class_names):
                assert torch.equal(store.images[3 * i : 3 * i + 3], images[name])
    assert not torch.equal(glyphs.load(glyphs.Config(**{**vars(cfg), "generation_seed": 1}))["train"].images,
                           standard["train"].images)


# ---------------------------------------------------------------- renamed keys and stored configs


def test_renamed_keys_name_their_replacement():
    assert renamed_message("omniglot", {"train_alphabets": ["Balinese", "Japanese_(katakana)"]}) == \
        "data.train_alphabets was renamed: use data.train=[Balinese,'Japanese_(katakana)']"
    assert renamed_message("glyphs", {"val_classes": "10", "seed": 3}) == \
        "data.val_classes, data.seed were renamed: use data.split_sizes=[300,10,100] data.generation_seed=3"
    assert renamed_message("imagefolder", {"seed": 1, "split": "x"}) is None  # never keys of imagefolder
    with pytest.raises(ConfigError, match=r"^data.test_classes was renamed: use data.test=\[8,9\]$"):
        to_run_config({"algo": {"name": "protonet"}, "data": {"name": "mnist", "test_classes": [8, 9]},
                       "backbone": {"name": "conv4"}})


OLD = {  # data nodes as metalearn stored them before the rename, and what each migrates to
    "glyphs": ({"name": "glyphs", "train_classes": 40, "val_classes": 20, "test_classes": 20, "seed": 2},
               {"split_sizes": [40, 20, 20], "generation_seed": 2}),
    "omniglot": ({"name": "omniglot", "split": "vinyals", "train_alphabets": [], "val_alphabets": [], "test_alphabets": []},
                 {"train": [], "val": [], "test": []}),
    "omniglot_small": ({"name": "omniglot", "split": "alphabets", "train_alphabets": ["Greek"], "val_alphabets": ["Latin"],
                        "test_alphabets": ["Korean"]}, {"train": ["Greek"], "val": ["Latin"], "test": ["Korean"]}),
    "mnist": ({"name": "mnist", "train_classes": [0, 1, 2, 3, 4, 5], "val_classes": [6, 7], "test_classes": [8, 9]},
              {"train": [], "val": [], "test": []}),  # the standard split in full: the standard split
    "mnist_custom": ({"name": "mnist", "train_classes": [5, 0], "val_classes": [6], "test_classes": [9]},
                     {"train": ["5", "0"], "val": ["6"], "test": ["9"]}),
    "doublemnist": ({"name": "doublemnist", "seed": 1, "train_classes": [7, "42"], "val_classes": ["00"], "test_classes": ["99"]},
                    {"generation_seed": 1, "train": ["07", "42"], "val": ["00"], "test": ["99"]}),
}


@pytest.mark.parametrize("case", list(OLD))
def test_stored_configs_are_migrated(case):
    old, new = OLD[case]
    config = {"data": dict(old), "seed": 0}
    assert migrate(config)
    assert config["data"] == {"name": old["name"], **new} and not migrate(config)  # once
    to_run_config({**config, "algo": {"name": "protonet"}, "backbone": {"name": "conv4"}})


def test_migrated_mnist_split_is_the_old_one(tmp_path):
    from test_data_mnist import MD5, put_files

    put_files(tmp_path)
    config = {"data": {**OLD["mnist"][0], "root": str(tmp_path), "download": False, "md5": MD5}}
    migrate(config)
    stores = mnist.load(to_run_config({**config, "algo": {"name": "protonet"}, "backbone": {"name": "conv4"}}).data)
    assert [stores[s].class_names for s in ("train", "val", "test")] == [[str(d) for d in range(6)], ["6", "7"], ["8", "9"]]


def old_keys(data: dict) -> dict:
    """A current glyphs data node written with the keys of before the rename."""
    data = {k: v for k, v in data.items() if k not in ("train", "val", "test", "split_seed", "ratios")}
    data.update(zip(("train_classes", "val_classes", "test_classes"), data.pop("split_sizes")))
    data["seed"] = data.pop("generation_seed")
    return data


def test_a_run_saved_before_the_rename_evaluates_and_resumes(cli, trained_run, tmp_path):
    for name in ("new", "old"):
        shutil.copytree(trained_run, tmp_path / name)
    old = tmp_path / "old"
    for ckpt_file in (old / "checkpoints").glob("*.pt"):
        ckpt = torch.load(ckpt_file, weights_only=True)
        ckpt["config"]["data"] = old_keys(ckpt["config"]["data"])
        torch.save(ckpt, ckpt_file)
    record = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    record["data"] = old_keys(record["data"])
    (old / ".hydra" / "config.yaml").write_text(yaml.safe_dump(record))
    shutil.copytree(old, tmp_path / "resumed")  # resumed apart: its new checkpoints do not race the evaluation
    runs = cli.run_many({
        "eval new": (["eval", f"run={tmp_path / 'new'}"], tmp_path),
        "eval old": (["eval", f"run={old}"], tmp_path),
        "resume old": (["train", f"resume={tmp_path / 'resumed'}", "steps=22"], tmp_path),
    })
    for proc in runs.values():
        assert proc.returncode == 0, cli.describe(proc)
    log = (tmp_path / "resumed" / "train.log").read_text()  # the resumed run's log: a line per old checkpoint read
    assert f"{tmp_path / 'resumed' / 'checkpoints' / 'last.pt'}: its config predates the data split keys; read with the current ones " \
           "(train/val/test_classes -> split_sizes; seed -> generation_seed)" in log
    assert "its config predates the data split keys; read with the current ones" in runs["eval old"].stdout  # on the console
    results = {name: json.loads(next((tmp_path / name).glob("eval*.json")).read_text()) for name in ("new", "old")}
    assert results["old"]["test"] == results["new"]["test"]  # the same data, the same episodes, the same numbers
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == 22 and resumed["config"]["data"]["split_sizes"] == FAST_SPLIT


# ---------------------------------------------------------------- data.cache_dir and a read-only data root

TINY_RUN = [a for a in __import__("conftest").TINY if not a.startswith("data")]  # a 4-step run, without its glyphs


def tree(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: (kind, size, mtime), by relative path."""
    out = {".": ("dir", 0, root.stat().st_mtime_ns)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.lstat()
            out[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", 0 if path.is_dir() else stat.st_size,
                                                stat.st_mtime_ns)
    return out


def read_only_root(tmp_path: Path) -> Path:
    """A data root holding copies of the two small Omniglot zips, not extracted, made read-only (chmod)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared Omniglot data not found at {SHARED}")
    root = tmp_path / "root"
    (root / "omniglot").mkdir(parents=True)
    for zip_file in sorted(SHARED.glob("images_background_small*.zip")):
        shutil.copy(zip_file, root / "omniglot" / zip_file.name)
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    return root


def writable_again(root: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


def mount_read_only_works(tmp_path: Path) -> str | None:
    """Why a read-only bind mount cannot be made here, or None if it can (as root, in a mount namespace)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && ! touch "$0/x" 2>/dev/null'
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(probe)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not usable here ({e})"
    return None if done.returncode == 0 else f"no read-only bind mount here: {done.stderr.decode().strip()[:200]}"


def run_read_only(cli, root: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``metalearn *args`` with ``root`` truly read-only: as root, under a read-only bind mount in a mount
    namespace of its own (chmod does not stop root); as another user, the chmod already does."""
    command = [sys.executable, "-m", "metalearn", *args]
    if os.geteuid() == 0:
        script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, str(root), *command]
    return subprocess.run(command, cwd=cwd, env=cli.env(), capture_output=True, text=True, timeout=300)


def test_read_only_data_root_with_a_cache_dir_elsewhere(cli, tmp_path):
    root = read_only_root(tmp_path)
    before = tree(root)
    if os.geteuid() == 0 and (why := mount_read_only_works(tmp_path)):
        # chmod does not stop root's writes, so nothing would fail if something wrote there: the tree check
        # below still sees any new or changed file; only making the root truly read-only is skipped.
        print(f"root's writes are not refused by the file system here ({why}); checking the tree only")
        run = lambda args: cli.run(args, tmp_path)  # noqa: E731
    else:
        run = lambda args: run_read_only(cli, root, args, tmp_path)  # noqa: E731
    try:
        args = ["train", "data=omniglot_small", f"data.root={root}", *TINY_RUN]
        proc = run([*args, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"])
        assert proc.returncode == 0, cli.describe(proc)
        assert tree(root) == before  # names, sizes, mtimes: nothing written, nothing new
        written = tmp_path / "cache" / "omniglot"
        assert sorted(p.name for p in written.iterdir()) == ["cache", "images_background_small1", "images_background_small2"]
        assert [p.name for p in (written / "cache").iterdir()] == [
            "images_background_small1+images_background_small2-28px-v1.pt"]
        assert (tmp_path / "run" / "results.json").is_file()
    finally:
        writable_again(root)


def test_read_only_data_root_without_cache_dir_says_to_set_it(cli, tmp_path):
    if os.geteuid() == 0 and (why := mount_read_only_works(tmp_path)):
        pytest.skip(f"running as root, and {why}: chmod alone does not make a folder read-only for root")
    root = read_only_root(tmp_path)
    before = tree(root)
    try:
        proc = run_read_only(cli, root, ["train", "data=omniglot_small", f"data.root={root}", *TINY_RUN,
                                         f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
        assert "Traceback" not in proc.stderr and proc.returncode == 4, cli.describe(proc)
        [line] = proc.stderr.splitlines()  # (Read-only file system) under the mount, (Permission denied) by chmod
        assert line.startswith(f"metalearn: error: cannot write the extracted images_background_small1.zip into "
                               f"{root / 'omniglot'} ("), line
        assert line.endswith("; set data.cache_dir=<a writable folder> (metalearn then keeps downloads, "
                             "extracted archives and caches there and only reads data.root)"), line
        assert tree(root) == before and not (tmp_path / "run").exists()
    finally:
        writable_again(root)


def test_caches_under_the_root_are_read_first(tmp_path):
    """A shared root that someone prepared (its cache built) serves every cache_dir without a rebuild."""
    fake_archive(tmp_path / "omniglot", "set1", {"A": 2, "B": 1, "C": 1}, drawings=1)
    cfg = omniglot.Config(root=str(tmp_path), archives=["set1"], download=False, image_size=8,
                          train=["A"], val=["B"], test=["C"])
    first = omniglot.load(cfg)  # builds <root>/omniglot/set1/ and <root>/omniglot/cache/
    again = omniglot.load(omniglot.Config(**{**vars(cfg), "cache_dir": str(tmp_path / "elsewhere")}))
    assert torch.equal(first["train"].images, again["train"].images)
    assert not (tmp_path / "elsewhere").exists()
    assert omniglot.cache_dir(omniglot.Config(**{**vars(cfg), "cache_dir": str(tmp_path / "x")})) == tmp_path / "x/omniglot/cache"
