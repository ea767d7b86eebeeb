"""imagefolder on small trees of real image files written here, and end to end through the CLI
on a real Omniglot subset (from the shared data, when it is there)."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose
from metalearn import confdir
from PIL import Image

from metalearn.config import to_run_config
from metalearn.data import imagefolder
from metalearn.data.transforms import channel_stats
from metalearn.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"

# Class folder -> images in it; every image is a solid colour, lossless PNG unless said otherwise.
TREE = {"Alpha/c1": 3, "Alpha/c2": 3, "Alpha/c3": 3, "Beta/c1": 3, "Beta/c2": 3, "Gamma/c1": 3, "Gamma/c2": 3,
        "Gamma/deep/d1": 3}
# A top-level class holding one file of each accepted extension, in mixed case.
FLAT_FILES = ["a.PNG", "b.Jpg", "c.jpeg", "d.bmp", "e.gif", "f.webp"]
NAMES = sorted([*TREE, "flat"])


def colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    return (10 + 20 * class_index + image_index, 250 - 20 * class_index, 7 * class_index + 3 * image_index)


def write_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (10, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), path.suffix.lstrip(".").upper())
    Image.new("RGB", size, rgb).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path) -> Path:
    """TREE and ``flat`` under tmp/tree, plus the things that are not classes or images."""
    root = tmp_path / "tree"
    for c, name in enumerate(sorted(TREE)):
        for i in range(TREE[name]):
            write_image(root / name / f"img{i}.png", colour(c, i))
    for name in FLAT_FILES:
        write_image(root / "flat" / name, (90, 90, 90))
    (root / "flat" / "notes.txt").write_text("not an image")
    write_image(root / "flat" / ".hidden.png", (0, 0, 0))
    write_image(root / "Alpha" / "stray.png", (0, 0, 0))  # beside class folders: not a class, ignored
    write_image(root / ".git" / "x" / "a.png", (0, 0, 0))
    write_image(root / "__MACOSX" / "Alpha" / "c1" / "a.png", (0, 0, 0))
    (root / "empty" / "leaf").mkdir(parents=True)
    return root


def config(tree: Path, **overrides) -> imagefolder.Config:
    split = {"train": ["Alpha", "Gamma"], "val": ["Beta"], "test": ["flat"]}
    return imagefolder.Config(**{"root": str(tree.parent / "data"), "path": str(tree), "image_size": 8, **split, **overrides})


def class_images(store, name: str) -> torch.Tensor:
    c = store.class_names.index(name)
    return store.images[store.offsets[c] : store.offsets[c] + store.counts[c]]


def test_leaf_folders_are_classes_named_by_their_path(tree):
    stores = imagefolder.load(config(tree))
    assert stores["train"].class_names == ["Alpha/c1", "Alpha/c2", "Alpha/c3", "Gamma/c1", "Gamma/c2", "Gamma/deep/d1"]
    assert stores["val"].class_names == ["Beta/c1", "Beta/c2"]
    assert stores["test"].class_names == ["flat"]
    assert stores["test"].counts.tolist() == [len(FLAT_FILES)]  # every extension, any case; no .txt, no hidden file
    assert stores["train"].counts.eq(3).all() and stores["train"].input_shape == (3, 8, 8)
    for store in stores.values():
        assert store.images.dtype == torch.uint8
    # Solid colours stay exact through the resize, channel by channel.
    for c, name in enumerate(sorted(TREE)):
        store = next(s for s in stores.values() if name in s.class_names)
        got = class_images(store, name)
        want = torch.tensor([colour(c, i) for i in range(3)], dtype=torch.uint8)[:, :, None, None].expand(3, 3, 8, 8)
        assert torch.equal(got, want), name


def test_greyscale_and_invert(tree):
    stores = imagefolder.load(config(tree, channels=1, invert=True, image_size=5))
    alpha = class_images(stores["train"], "Alpha/c2")
    assert alpha.shape == (3, 1, 5, 5)
    for i in range(3):
        luma = Image.new("RGB", (1, 1), colour(1, i)).convert("L").getpixel((0, 0))
        assert alpha[i].eq(255 - luma).all()


def test_split_by_glob_patterns(tree):
    stores = imagefolder.load(config(tree, train=["Alpha/c[12]", "G*/c?"], val=["*/c3"], test=["Gamma/deep/", "flat"]))
    assert stores["train"].class_names == ["Alpha/c1", "Alpha/c2", "Gamma/c1", "Gamma/c2"]
    assert stores["val"].class_names == ["Alpha/c3"]
    assert stores["test"].class_names == ["Gamma/deep/d1", "flat"]


def test_split_by_ratios_with_a_seed(tmp_path):
    root = tmp_path / "tree"
    for c in range(20):
        for i in range(2):
            write_image(root / f"class{c:02d}" / f"{i}.png", colour(c % 10, i))
    cfg = imagefolder.Config(root=str(tmp_path / "data"), path=str(root), image_size=4, ratios=[3, 1, 1])
    stores = imagefolder.load(cfg)
    names = {split: store.class_names for split, store in stores.items()}
    assert [len(n) for n in names.values()] == [12, 4, 4]
    assert sorted(sum(names.values(), [])) == [f"class{c:02d}" for c in range(20)]
    assert all(n == sorted(n) for n in names.values())
    assert {s: st.class_names for s, st in imagefolder.load(cfg).items()} == names
    reseeded = imagefolder.load(imagefolder.Config(**{**vars(cfg), "split_seed": 1}))
    assert reseeded["train"].class_names != names["train"]


@pytest.mark.parametrize("overrides, error, message", [
    ({"train": ["Nope"]}, ConfigError, r"data.train entry 'Nope' matches no class under .*; its top-level names are: Alpha, Beta, Gamma, flat"),
    ({"val": ["Alpha/c1"]}, ConfigError, r"class Alpha/c1 is in both data.train \(by 'Alpha'\) and data.val \(by 'Alpha/c1'\); give each"),
    ({"val": []}, ConfigError, r"data.train and data.test given but data.val empty"),
    ({"train": [], "val": [], "test": [], "ratios": [1, 0, 1]}, ConfigError, r"data.ratios must be three positive numbers"),
    ({"train": [], "val": [], "test": [], "ratios": [0.96, 0.02, 0.02]}, DataError, r"leaves the val split no class of the 9"),
    ({"test": ["../elsewhere"]}, ConfigError, r"data.test entry '../elsewhere' is not a class name or pattern"),
    ({"path": ""}, ConfigError, r"data.path is not set"),
    ({"channels": 2}, ConfigError, r"data.channels must be 1 \(greyscale\) or 3 \(RGB\)"),
])
def test_split_and_option_mistakes_are_one_line_errors(tree, overrides, error, message):
    with pytest.raises(error, match=message) as err:
        imagefolder.load(config(tree, **overrides))
    assert "\n" not in str(err.value)


def test_missing_or_classless_folder(tree):
    with pytest.raises(DataError, match=r"data.path .*nowhere is not a folder"):
        imagefolder.load(config(tree, path=str(tree / "nowhere")))
    with pytest.raises(DataError, match=r"holds images but no class folders"):
        imagefolder.load(config(tree, path=str(tree / "flat")))


def test_every_too_small_class_is_reported(tmp_path, caplog):
    root = tmp_path / "tree"
    sizes = {f"group/small{c:02d}": 2 for c in range(12)} | {"group/big1": 5, "group/big2": 5}
    for name, n in sizes.items():
        for i in range(n):
            write_image(root / name / f"{i}.png", (i, i, i))
    cfg = imagefolder.Config(root=str(tmp_path / "data"), path=str(root), image_size=4,
                             train=["group"], val=["group/big1"], test=["group/big2"])
    with pytest.raises(ConfigError):  # big1 and big2 are in train too: overlaps are refused
        imagefolder.load(cfg)
    cfg.train = ["group/small*"]
    store = imagefolder.load(cfg)["train"]
    with caplog.at_level(logging.ERROR, logger="metalearn.data.imagefolder"), pytest.raises(DataError) as err:
        store.check_episode("train", ways=2, shots=1, queries=2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("12 of the 12 classes of the train split have fewer than shots+queries=3 images: group/small00 (2), ")
    assert "group/small09 (2) and 2 more (all in the log)" in message and str(root) in message
    [record] = caplog.records
    assert all(f"group/small{c:02d} (2)" in record.getMessage() for c in range(12))
    store.check_episode("train", ways=2, shots=1, queries=1)  # 2 images are enough for 1 + 1


def test_corrupt_image_names_the_file(tree):
    broken = tree / "Beta" / "c2" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"cannot read image .*Beta/c2/broken.png \(.*\); replace or delete that file") as err:
        imagefolder.load(config(tree))
    assert "\n" not in str(err.value)
    png = (tree / "Beta" / "c1" / "img0.png").read_bytes()
    broken.write_bytes(png[: len(png) // 2])  # truncated
    with pytest.raises(DataError, match=r"cannot read image .*broken.png"):
        imagefolder.load(config(tree))


def test_cache_is_reused_and_rebuilt_when_files_change(tree, caplog):
    cfg = config(tree)
    caplog.set_level(logging.INFO, logger="metalearn.data.common")
    imagefolder.load(cfg)
    [cache] = imagefolder.cache_dir(cfg).glob("*.pt")
    assert cache.parent == tree.parent / "data" / "imagefolder" / "cache"
    assert sum("building the imagefolder" in r.getMessage() for r in caplog.records) == 1
    imagefolder.load(cfg)
    assert sum("building the imagefolder" in r.getMessage() for r in caplog.records) == 1  # reused
    write_image(tree / "Beta" / "c1" / "img0.png", (1, 2, 3), size=(12, 12))  # replaced
    assert class_images(imagefolder.load(cfg)["val"], "Beta/c1")[0, :, 0, 0].tolist() == [1, 2, 3]
    write_image(tree / "Beta" / "c1" / "img9.png", (4, 5, 6))  # added
    assert imagefolder.load(cfg)["val"].counts.tolist() == [4, 3]
    assert sum("building the imagefolder" in r.getMessage() for r in caplog.records) == 3
    assert [p.name for p in cache.parent.glob("*.pt")] == [cache.name]  # rebuilt in place
    imagefolder.load(config(tree, image_size=6))
    assert len(list(cache.parent.glob("*.pt"))) == 2  # another size, another cache


def test_normalisation_stats_come_from_the_training_split(tree):
    stores = imagefolder.load(config(tree))
    mean, std = channel_stats(stores["train"].images)
    assert stores["train"].mean == pytest.approx(mean, abs=1e-9) and stores["train"].std == pytest.approx(std, abs=1e-9)
    assert stores["test"].mean == stores["train"].mean and len(mean) == 3


def test_relative_path_is_taken_from_the_working_directory(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    cfg = imagefolder.Config(path="tree")
    assert cfg.path == str(tree) and imagefolder.sources(cfg) == [tree]


def test_yaml_composes_with_the_config():
    with confdir.initialized():
        cfg = compose("config", overrides=["data=imagefolder", "data.path=x", "data.train=[A]", "data.val=[B]", "data.test=[C]"])
    data = to_run_config(cfg).data
    assert isinstance(data, imagefolder.Config) and Path(data.path).is_absolute()
    assert (data.train, data.val, data.test, data.ratios) == (["A"], ["B"], ["C"], [0.6, 0.2, 0.2])
    assert (data.channels, data.invert, data.image_size) == (3, False, 84)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared Omniglot data not found at {SHARED}")
def test_real_omniglot_subset_end_to_end(tmp_path, cli):
    """images_background_small1 (Balinese, Early_Aramaic, Greek, Korean, Latin), split by alphabet folders."""
    shutil.copy(SHARED / "images_background_small1.zip", tmp_path)
    with zipfile.ZipFile(tmp_path / "images_background_small1.zip") as zf:
        zf.extractall(tmp_path / "extracted")
    run_dir = tmp_path / "run"
    args = [
        "train", "data=imagefolder", "data.path=extracted/images_background_small1", f"data.root={tmp_path / 'data'}",
        "data.train=[Balinese,Korean,Latin]", "data.val=[Early_Aramaic]", "data.test=[Greek]",
        "data.image_size=28", "data.channels=1", "data.invert=true", "algo=protonet", "backbone.hidden=16",
        "ways=5", "shots=1", "queries=5", "meta_batch_size=4", "steps=10", "trainer.log_every=5",
        "trainer.val_every=10", "trainer.val_episodes=20", "trainer.test_episodes=20", "trainer.ckpt_every=10",
        "device=cpu", f"hydra.run.dir={run_dir}",
    ]
    proc = cli.run(args, cwd=tmp_path)  # the relative data.path is taken from this directory
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1
    [cache] = (tmp_path / "data" / "imagefolder" / "cache").glob("*-28px-1ch-inverted-v1.pt")
    images = torch.load(cache, weights_only=True)["images"]
    assert images.shape == (2720, 1, 28, 28) and np.isclose(images.float().mean().item() / 255, 0.0778, atol=0.01)
