"""The miniImageNet loader and scripts/build_miniimagenet.py, on tiny files in the real formats:
the pickle cache files, Ravi's split CSVs with their images/ folder, and an ImageNet train tree."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import miniimagenet
from metalearn.data.transforms import resize
from metalearn.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
# 3 + 2 + 2 classes, 6 images each: enough for 2-way 1-shot 2-query episodes in every split.
CLASSES = {
    "train": ["n01532829", "n01558993", "n01704323"],
    "val": ["n01855672", "n02091244"],
    "test": ["n01930112", "n01981276"],
}
PER_CLASS = 6


def fake_split(split: str, size: int = 84, per_class: int = PER_CLASS) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Random RGB images [N, size, size, 3] and a class_dict whose rows are interleaved, not grouped."""
    rng = np.random.default_rng(list(CLASSES).index(split))
    wnids = CLASSES[split]
    images = rng.integers(0, 256, (len(wnids) * per_class, size, size, 3), dtype=np.uint8)
    rows = rng.permutation(len(images))
    # Listed in reverse name order, as a dict may be: the loader sorts classes by wnid.
    class_dict = {wnid: rows[c::len(wnids)].tolist() for c, wnid in reversed(list(enumerate(wnids)))}
    return images, class_dict


def write_pickles(folder: Path, size: int = 84, val_name: str = "val", protocol: int = 4) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in CLASSES:
        images, class_dict = fake_split(split, size)
        name = val_name if split == "val" else split
        with open(folder / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=protocol)
        splits[split] = (images, class_dict)
    return splits


def write_csv_tree(folder: Path) -> dict[str, dict[str, list[np.ndarray]]]:
    """Ravi's layout: <split>.csv (filename,label) and images/<wnid><8 digits>.jpg; returns the decoded pixels."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pixels: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, wnids in CLASSES.items():
        lines = ["filename,label"]
        pixels[split] = {}
        for c, wnid in enumerate(wnids):
            pixels[split][wnid] = []
            for n in range(1, 4):
                name = f"{wnid}{n:08d}.jpg"
                # A colour per image, red left and blue right: checks channels and orientation through JPEG.
                array = np.zeros((84, 84, 3), dtype=np.uint8)
                array[:, :42] = (200, 30 * n, 20 * c)
                array[:, 42:] = (10, 60, 250)
                Image.fromarray(array).save(folder / "images" / name, quality=95)
                with Image.open(folder / "images" / name) as image:
                    pixels[split][wnid].append(np.asarray(image.convert("RGB")))
                lines.append(f"{name},{wnid}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return pixels


def config(root: Path, **overrides) -> miniimagenet.Config:
    return miniimagenet.Config(root=str(root), **overrides)


def chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.fixture
def pickle_root(tmp_path) -> tuple[Path, dict]:
    return tmp_path, write_pickles(tmp_path / "miniimagenet")


def test_pickles_give_the_classes_images_and_stats(pickle_root):
    root, splits = pickle_root
    stores = miniimagenet.load(config(root))
    for split, (images, class_dict) in splits.items():
        store = stores[split]
        assert store.class_names == sorted(CLASSES[split])
        assert store.counts.tolist() == [PER_CLASS] * len(CLASSES[split])
        assert store.images.dtype == torch.uint8 and store.input_shape == (3, 84, 84)
        assert store.mean == pytest.approx((0.4721, 0.4533, 0.4100), abs=1e-4)
        assert store.std == pytest.approx((0.2772, 0.2677, 0.2845), abs=1e-4)
        # Each class holds exactly its images, in class_dict order, channels first (R, G, B).
        for c, wnid in enumerate(store.class_names):
            start = int(store.offsets[c])
            got = store.images[start : start + PER_CLASS]
            assert torch.equal(got, chw(images[class_dict[wnid]]))


def test_learn2learn_validation_name_and_protocol_2_pickles(tmp_path):
    splits = write_pickles(tmp_path / "miniimagenet", val_name="validation", protocol=2)
    stores = miniimagenet.load(config(tmp_path))
    images, class_dict = splits["val"]
    first = sorted(class_dict)[0]
    assert torch.equal(stores["val"].images[:PER_CLASS], chw(images[class_dict[first]]))
    assert miniimagenet.sources(config(tmp_path))[1].name == "mini-imagenet-cache-validation.pkl"


def test_any_pickle_image_size_is_resized_to_image_size(tmp_path):
    splits = write_pickles(tmp_path / "miniimagenet", size=40)
    store = miniimagenet.load(config(tmp_path, image_size=28))["train"]
    images, class_dict = splits["train"]
    assert store.input_shape == (3, 28, 28)
    first = sorted(class_dict)[0]
    assert torch.equal(store.images[:PER_CLASS], resize(chw(images[class_dict[first]]), 28))


def test_cache_is_reused_then_rebuilt_when_a_pickle_changes(pickle_root, monkeypatch):
    root, _ = pickle_root
    miniimagenet.load(config(root))
    cache = root / "miniimagenet" / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["test-pickle-84px-v1.pt", "train-pickle-84px-v1.pt", "val-pickle-84px-v1.pt"]

    def no_decoding(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(miniimagenet, "_from_pickle", no_decoding)
    again = miniimagenet.load(config(root))
    assert again["train"].counts.tolist() == [PER_CLASS] * 3
    monkeypatch.undo()

    # Replace the train pickle with other pixels: the next load must not serve the old ones.
    images, class_dict = fake_split("train")
    images = 255 - images
    path = root / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": images, "class_dict": class_dict}, protocol=4))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    store = miniimagenet.load(config(root))["train"]
    first = sorted(class_dict)[0]
    assert torch.equal(store.images[:PER_CLASS], chw(images[class_dict[first]]))


def test_a_different_image_size_builds_its_own_cache(pickle_root):
    root, _ = pickle_root
    assert miniimagenet.load(config(root))["train"].input_shape == (3, 84, 84)
    assert miniimagenet.load(config(root, image_size=32))["train"].input_shape == (3, 32, 32)
    assert (root / "miniimagenet" / "cache" / "train-pickle-32px-v1.pt").is_file()


def test_images_form_reads_the_csvs_and_the_jpegs(tmp_path):
    pixels = write_csv_tree(tmp_path / "miniimagenet")
    stores = miniimagenet.load(config(tmp_path))  # auto: no pickles, so the CSV form
    for split, wnids in CLASSES.items():
        store = stores[split]
        assert store.class_names == sorted(wnids) and store.counts.tolist() == [3] * len(wnids)
        for c, wnid in enumerate(store.class_names):
            start = int(store.offsets[c])
            expected = torch.from_numpy(np.stack(pixels[split][wnid])).permute(0, 3, 1, 2)
            assert torch.equal(store.images[start : start + 3], expected)
    # Through JPEG the left half stays red-dominant and the right half blue: channels are R, G, B.
    red_left = stores["train"].images[0, :, 40, 10].int()
    blue_right = stores["train"].images[0, :, 40, 70].int()
    assert (red_left - torch.tensor([200, 30, 0])).abs().max() <= 8
    assert (blue_right - torch.tensor([10, 60, 250])).abs().max() <= 8


def test_form_choice_with_both_forms_present(tmp_path):
    splits = write_pickles(tmp_path / "miniimagenet")
    write_csv_tree(tmp_path / "miniimagenet")
    assert miniimagenet.load(config(tmp_path))["train"].counts.tolist() == [PER_CLASS] * 3  # auto: pickles first
    assert miniimagenet.load(config(tmp_path, form="images"))["train"].counts.tolist() == [3] * 3
    # The same cache file serves whichever form was read last, so switching back rebuilds it.
    images, class_dict = splits["train"]
    first = sorted(class_dict)[0]
    assert torch.equal(miniimagenet.load(config(tmp_path, form="pickle"))["train"].images[:PER_CLASS],
                       chw(images[class_dict[first]]))
    names = [p.name for p in miniimagenet.sources(config(tmp_path, form="images"))]
    assert names == ["train.csv", "val.csv", "test.csv", "images"]


def test_missing_files_name_both_forms_and_the_folder(tmp_path):
    with pytest.raises(DataError) as e:
        miniimagenet.load(config(tmp_path))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "miniimagenet") in message
    for name in ("mini-imagenet-cache-train.pkl", "train.csv", "images/", "scripts/build_miniimagenet.py"):
        assert name in message


def test_one_missing_pickle_is_named(pickle_root):
    root, _ = pickle_root
    (root / "miniimagenet" / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError, match=r"pickle\(s\) mini-imagenet-cache-test.pkl not found; put them in .*miniimagenet"):
        miniimagenet.load(config(root, form="pickle"))


@pytest.mark.parametrize("content, message", [
    (lambda good: good[: len(good) // 2], "is damaged or not a miniImageNet pickle"),
    (lambda good: b"not a pickle at all", "is damaged or not a miniImageNet pickle"),
    (lambda good: pickle.dumps({"images": np.zeros((2, 84, 84, 3), np.uint8)}),
     r"holds a dict with keys \['images'\], not a miniImageNet pickle"),
    (lambda good: pickle.dumps([1, 2, 3]), "holds a list, not a miniImageNet pickle"),
    (lambda good: pickle.dumps({"image_data": np.zeros((6, 84, 84), np.uint8), "class_dict": {"n0": [0]}}),
     r"image_data in .* must be a uint8 array \[N, H, W, 3\] \(got uint8 array \[6, 84, 84\]\)"),
    (lambda good: pickle.dumps({"image_data": np.zeros((6, 84, 84, 3), np.uint8), "class_dict": {"n0": [0, 9]}}),
     "points past the 6 images of image_data"),
    (lambda good: pickle.dumps({"image_data": np.zeros((6, 84, 84, 3), np.uint8), "class_dict": {"n0": [0, 1], "n1": [1]}}),
     "gives an image to two classes"),
])
def test_corrupt_pickles_are_one_line_errors(pickle_root, content, message):
    root, _ = pickle_root
    path = root / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        miniimagenet.load(config(root))
    assert "\n" not in str(e.value)


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused(pickle_root, monkeypatch):
    root, _ = pickle_root
    monkeypatch.chdir(root)
    path = root / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": _RunsACommand(), "class_dict": {}}))
    with pytest.raises(DataError, match=r"asks to run posix.system while loading.*refused"):
        miniimagenet.load(config(root))
    assert not (root / "pwned").exists()


def test_bad_csv_and_missing_image_are_one_line_errors(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_csv_tree(folder)
    (folder / "images" / "n0155899300000002.jpg").unlink()
    with pytest.raises(DataError, match=r"n0155899300000002.jpg, listed in train.csv, is missing from .*images"):
        miniimagenet.load(config(tmp_path))
    write_csv_tree(folder)
    (folder / "val.csv").write_text("name;class\nx.jpg;n1\n")
    with pytest.raises(DataError, match="does not start with the header filename,label"):
        miniimagenet.load(config(tmp_path, form="images"))


def test_unknown_form_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown data.form='zip'; use one of: auto, pickle, images"):
        miniimagenet.load(config(tmp_path, form="zip"))


# ------------------------------------------------------------------ scripts/build_miniimagenet.py

def fake_imagenet(train: Path) -> dict[tuple[str, int], tuple[int, int, int]]:
    """ImageNet's train layout, <wnid>/<wnid>_<number>.JPEG, with numbers whose text order is not their
    numeric order; each image one flat colour. Returns {(wnid, number): colour}."""
    colours = {}
    for c, wnid in enumerate(w for names in CLASSES.values() for w in names):
        (train / wnid).mkdir(parents=True)
        for k, number in enumerate([10, 2, 33, 7]):
            colour = (30 * c + 10, 60 * k + 20, 250 - 30 * c)
            Image.new("RGB", (120, 100), colour).save(train / wnid / f"{wnid}_{number}.JPEG", quality=95)
            colours[wnid, number] = colour
    return colours


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("METALEARN_DATA", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "build_miniimagenet.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_script_builds_pickles_that_the_loader_reads(tmp_path):
    colours = fake_imagenet(tmp_path / "imagenet" / "train")
    splits = tmp_path / "splits"
    splits.mkdir()
    # Image n of a class is the n-th of its folder in numeric order 2, 7, 10, 33 (text order: 10, 2, 33, 7).
    picks = {1: 2, 2: 7, 4: 33}
    for split, wnids in CLASSES.items():
        rows = [f"{wnid}{n:08d}.jpg,{wnid}" for wnid in wnids for n in picks]
        (splits / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "data" / "miniimagenet"
    proc = run_script(str(tmp_path / "imagenet"), "--splits", str(splits), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "train: 9 images of 3 classes" in proc.stdout

    with open(out / "mini-imagenet-cache-train.pkl", "rb") as f:
        raw = pickle.load(f)
    assert raw["image_data"].dtype == np.uint8 and raw["image_data"].shape == (9, 84, 84, 3)
    assert raw["class_dict"] == {wnid: [3 * c, 3 * c + 1, 3 * c + 2] for c, wnid in enumerate(CLASSES["train"])}

    stores = miniimagenet.load(config(tmp_path / "data"))
    for split, wnids in CLASSES.items():
        store = stores[split]
        assert store.class_names == wnids and store.counts.tolist() == [3] * len(wnids)
        for c, wnid in enumerate(wnids):
            for k, n in enumerate(picks):
                centre = store.images[3 * c + k, :, 42, 42].int()
                assert (centre - torch.tensor(colours[wnid, picks[n]])).abs().max() <= 3, (wnid, n)


def test_script_names_missing_split_files_and_short_class_folders(tmp_path):
    fake_imagenet(tmp_path / "imagenet" / "train")
    proc = run_script(str(tmp_path / "imagenet"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: split file(s) train.csv, val.csv, test.csv not found in")
    (tmp_path / "out").mkdir()
    for split, wnids in CLASSES.items():
        (tmp_path / "out" / f"{split}.csv").write_text(f"filename,label\n{wnids[0]}00000009.jpg,{wnids[0]}\n")
    proc = run_script(str(tmp_path / "imagenet" / "train"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "names image 9 of n01532829, but its ImageNet folder has 4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.pkl"))


def test_train_cli_end_to_end_on_pickles(tmp_path, cli):
    write_pickles(tmp_path / "data" / "miniimagenet", size=32)
    run_dir = tmp_path / "run"
    proc = cli.run([
        "train", "data=miniimagenet", f"data.root={tmp_path / 'data'}", "data.image_size=28", "backbone.hidden=8",
        "ways=2", "shots=1", "queries=2", "meta_batch_size=2", "steps=2", "trainer.val_every=2",
        "trainer.val_episodes=4", "trainer.test_episodes=4", "trainer.log_every=1", "trainer.ckpt_every=2",
        "eval.batch_size=2", "algo=protonet", "device=cpu", f"hydra.run.dir={run_dir}",
    ], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert (run_dir / "results.json").is_file()
