"""The tieredImageNet loader on tiny files in the real formats: pickled lists of PNGs (as Ren et
al.'s compress script wrote them), re-packed npz arrays (BGR), and the labels pickles."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import tieredimagenet
from metalearn.data.transforms import resize
from metalearn.errors import ConfigError, DataError

# 3 + 2 + 2 classes, 5 images each; the class numbers are global, as the images' markers.
CLASSES = {
    "train": ["n01530575", "n01531178", "n01532829"],
    "val": ["n02085620", "n02085782"],
    "test": ["n03000134", "n03000247"],
}
PER_CLASS = 5


def fake_split(split: str, size: int = 84) -> tuple[np.ndarray, np.ndarray]:
    """RGB images [N, size, size, 3] in shuffled class order and their labels (0-based within the split).

    Pixel (0, 0) holds the image's global class number in red and its row in green, so any
    image drawn later can be traced back to its class."""
    first = sum(len(CLASSES[s]) for s in list(CLASSES)[: list(CLASSES).index(split)])
    rng = np.random.default_rng(first)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES[split])), PER_CLASS))
    images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = first + labels
    images[:, 0, 0, 1] = np.arange(len(labels))
    return images, labels


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_labels(path: Path, split: str, labels: np.ndarray, key: str = "label_specific") -> None:
    if key == "label_specific":
        # two high-level categories: even and odd classes
        data = {"label_specific": labels.astype(np.int32), "label_general": (labels % 2).astype(np.int32),
                "label_specific_str": CLASSES[split], "label_general_str": ["n00000001", "n00000002"]}
    else:  # the MetaOptNet re-pack: global class numbers only
        data = {key: (labels + 100 * (list(CLASSES).index(split) + 1)).tolist()}
    path.write_bytes(pickle.dumps(data, protocol=2))


def write_png_form(folder: Path, size: int = 84) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in CLASSES:
        images, labels = fake_split(split, size)
        encoded = [png_bytes(image) for image in images]
        if split == "train":  # cv2.imencode gives uint8 arrays [L, 1], which is what the original train file holds
            encoded = [np.frombuffer(b, dtype=np.uint8).reshape(-1, 1) for b in encoded]
        (folder / f"{split}_images_png.pkl").write_bytes(pickle.dumps(encoded, protocol=2))
        write_labels(folder / f"{split}_labels.pkl", split, labels)
        splits[split] = (images, labels)
    return splits


def write_npz_form(folder: Path, compressed: bool = False, key: str = "label_specific") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    save = np.savez_compressed if compressed else np.savez
    for split in CLASSES:
        images, labels = fake_split(split)
        save(folder / f"{split}_images.npz", images=images[..., ::-1])  # BGR, as OpenCV decoded them
        write_labels(folder / f"{split}_labels.pkl", split, labels, key)
        splits[split] = (images, labels)
    return splits


def config(root: Path, **overrides) -> tieredimagenet.Config:
    return tieredimagenet.Config(root=str(root), **overrides)


def class_images(images: np.ndarray, labels: np.ndarray, label: int) -> torch.Tensor:
    """The images of one class, in file order, channels first."""
    return torch.from_numpy(images[labels == label]).permute(0, 3, 1, 2)


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory map holds the tensor's data (None: anonymous memory)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else None
    return None


def cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tieredimagenet" / "cache").iterdir())


@pytest.fixture
def png_root(tmp_path) -> tuple[Path, dict]:
    return tmp_path, write_png_form(tmp_path / "tieredimagenet")


def test_png_form_gives_classes_pixels_and_a_memory_map(png_root):
    root, splits = png_root
    stores = tieredimagenet.load(config(root))
    for split, (images, labels) in splits.items():
        store = stores[split]
        assert store.class_names == CLASSES[split]
        assert store.counts.tolist() == [PER_CLASS] * len(CLASSES[split])
        assert store.images.dtype == torch.uint8 and store.input_shape == (3, 84, 84)
        assert store.mean == pytest.approx((0.4721, 0.4533, 0.4100), abs=1e-4)
        for c in range(store.num_classes):
            start = int(store.offsets[c])
            assert torch.equal(store.images[start : start + PER_CLASS], class_images(images, labels, c))
        # The images stay in the cache file, mapped, not read into memory.
        if Path("/proc/self/maps").is_file():
            npy = root / "tieredimagenet" / "cache" / f"{split}-png-rgb-84px-v1.npy"
            assert mapped_file(store.images) == os.path.realpath(npy)
    assert cache_files(root) == [f"{s}-png-rgb-84px-v1.{ext}" for s in ("test", "train", "val") for ext in ("npy", "pt")]


def test_npz_form_is_read_as_bgr_unless_told_rgb(tmp_path):
    splits = write_npz_form(tmp_path / "tieredimagenet", compressed=True)
    stores = tieredimagenet.load(config(tmp_path))  # auto: the npz
    images, labels = splits["val"]
    assert torch.equal(stores["val"].images[:PER_CLASS], class_images(images, labels, 0))
    as_stored = tieredimagenet.load(config(tmp_path, npz_channels="rgb"))["val"]
    assert torch.equal(as_stored.images[:PER_CLASS], class_images(images[..., ::-1].copy(), labels, 0))


def test_npz_with_metaoptnet_labels_names_classes_by_number(tmp_path):
    splits = write_npz_form(tmp_path / "tieredimagenet", key="labels")
    store = tieredimagenet.load(config(tmp_path, form="npz"))["test"]
    assert store.class_names == ["300", "301"]
    images, labels = splits["test"]
    assert torch.equal(store.images[PER_CLASS:], class_images(images, labels, 1))


def _py2_str(data: bytes) -> bytes:
    """A Python 2 str in a protocol-2 pickle (SHORT_BINSTRING or BINSTRING)."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + len(data).to_bytes(4, "little")) + data


def py2_labels_pickle(labels: np.ndarray, names: list[str]) -> bytes:
    """The labels dict as Python 2 pickled it (Ren et al.'s files): str keys and names, and the
    int32 array through numpy.core.multiarray._reconstruct with its bytes as a str."""
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
        + b"(K\x01J" + len(labels).to_bytes(4, "little") + b"\x85cnumpy\ndtype\n" + _py2_str(b"i4") + b"K\x00K\x01\x87R"
        + b"(K\x03" + _py2_str(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + _py2_str(labels.astype("<i4").tobytes()) + b"tb"
    )
    strings = b"".join(_py2_str(name.encode()) for name in names)
    return (b"\x80\x02}(" + _py2_str(b"label_specific") + array
            + _py2_str(b"label_specific_str") + b"](" + strings + b"eu.")


def test_python2_labels_pickles_are_read(png_root):
    root, splits = png_root
    images, labels = splits["val"]
    (root / "tieredimagenet" / "val_labels.pkl").write_bytes(py2_labels_pickle(labels, CLASSES["val"]))
    store = tieredimagenet.load(config(root))["val"]
    assert store.class_names == CLASSES["val"]
    assert torch.equal(store.images[PER_CLASS:], class_images(images, labels, 1))


def test_episodes_draw_distinct_images_of_the_right_classes(png_root):
    root, _ = png_root
    store = tieredimagenet.load(config(root))["train"]  # 2 of its 3 classes a task; global class numbers from 0
    batch = store.sampler(ways=2, shots=2, queries=2, batch_size=8, seed=3).sample()
    assert len({tuple(sorted(task.tolist())) for task in batch.classes}) > 1
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        markers = (x[:, :, 0, 0, 0] * 255).round().long()  # red of pixel (0, 0): the image's class
        assert torch.equal(markers, batch.classes.gather(1, y))
    rows = (torch.cat([batch.support_x, batch.query_x], 1)[:, :, 1, 0, 0] * 255).round().long()
    assert all(len(set(task.tolist())) == rows.shape[1] for task in rows)  # no image twice in a task


def test_categories_are_the_groups_of_within_group_episodes(png_root):
    root, _ = png_root
    store = tieredimagenet.load(config(root))["train"]
    assert store.groups_of_classes() == ["n00000001", "n00000002", "n00000001"]
    batch = store.sampler(ways=2, shots=1, queries=1, batch_size=16, seed=0, within_group=True).sample()
    assert all(sorted(task.tolist()) == [0, 2] for task in batch.classes)  # the one category with 2 classes


def test_image_size_resizes_while_decoding(png_root):
    root, splits = png_root
    store = tieredimagenet.load(config(root, image_size=28))["test"]
    images, labels = splits["test"]
    assert store.input_shape == (3, 28, 28)
    assert torch.equal(store.images[:PER_CLASS], resize(class_images(images, labels, 0), 28))


def test_cache_is_reused_and_rebuilt_when_stale(png_root, monkeypatch):
    root, splits = png_root
    tieredimagenet.load(config(root))
    folder = root / "tieredimagenet"

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(tieredimagenet, "PngImages", no_decoding)
        assert tieredimagenet.load(config(root))["train"].num_classes == 3

    # New labels (class 0 and 1 swapped): the index and the images are rebuilt together.
    images, labels = splits["val"]
    write_labels(folder / "val_labels.pkl", "val", 1 - labels)
    os.utime(folder / "val_labels.pkl", ns=(0, (folder / "val_labels.pkl").stat().st_mtime_ns + 10**9))
    store = tieredimagenet.load(config(root))["val"]
    assert torch.equal(store.images[:PER_CLASS], class_images(images, labels, 1))

    # A deleted images cache is rebuilt even though its index is still there.
    (folder / "cache" / "test-png-rgb-84px-v1.npy").unlink()
    images, labels = splits["test"]
    assert torch.equal(tieredimagenet.load(config(root))["test"].images[:PER_CLASS], class_images(images, labels, 0))
    assert not [name for name in cache_files(root) if ".tmp-" in name]


def test_missing_files_are_named_with_the_folder(tmp_path):
    with pytest.raises(DataError) as e:
        tieredimagenet.load(config(tmp_path))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "tieredimagenet") in message
    assert message.startswith(
        "tieredImageNet file(s) train_images_png.pkl, train_labels.pkl, val_images_png.pkl, val_labels.pkl, "
        "test_images_png.pkl, test_labels.pkl not found in"
    )
    assert "tiered-imagenet.tar" in message


def test_sources_are_the_files_of_each_split(png_root):
    root, _ = png_root
    names = [p.name for p in tieredimagenet.sources(config(root))]
    assert names == [f"{s}_{kind}" for s in ("train", "val", "test") for kind in ("images_png.pkl", "labels.pkl")]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_a_png(path: Path) -> None:
    items = pickle.loads(path.read_bytes())
    items[3] = b"\x89PNG but not really"
    path.write_bytes(pickle.dumps(items))


@pytest.mark.parametrize("damage, message", [
    (lambda folder: _truncate(folder / "val_images_png.pkl"), "val_images_png.pkl is damaged or not a tieredImageNet images pickle"),
    (lambda folder: _not_a_png(folder / "val_images_png.pkl"), "image 3 of .*val_images_png.pkl is not a readable PNG"),
    (lambda folder: (folder / "val_images_png.pkl").write_bytes(pickle.dumps({"images": []})),
     "holds a dict, not the list of PNG images"),
    (lambda folder: (folder / "val_labels.pkl").write_bytes(pickle.dumps({"label": [0]})),
     r"has keys \['label'\], neither label_specific .* nor labels"),
    (lambda folder: (folder / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": np.zeros(3, np.int64)})),
     "val_images_png.pkl holds 10 images but val_labels.pkl labels 3"),
    (lambda folder: (folder / "val_labels.pkl").write_bytes(
        pickle.dumps({"label_specific": np.full(10, 5), "label_specific_str": ["a"]})),
     "goes up to 5 but label_specific_str names 1 classes"),
])
def test_damaged_png_form_files_are_one_line_errors(png_root, damage, message):
    root, _ = png_root
    damage(root / "tieredimagenet")
    with pytest.raises(DataError, match=message) as e:
        tieredimagenet.load(config(root))
    assert "\n" not in str(e.value)
    assert not [name for name in cache_files(root) if name.startswith("val") or ".tmp-" in name]


def _npz_without_images(path: Path) -> None:
    np.savez(path, pixels=np.zeros((1, 84, 84, 3), np.uint8))


def _npz_of_floats(path: Path) -> None:
    np.savez(path, images=np.zeros((10, 84, 84, 3), np.float32))


def _npz_with_a_bad_crc(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("images.npy")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 200
    data[start] ^= 0xFF  # flip one byte of the pixels: the member's CRC no longer matches
    path.write_bytes(bytes(data))


def _npz_short_of_images(path: Path) -> None:
    """A well-formed zip whose array header promises the split's 10 images but holds 4."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10, 84, 84, 3)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", header.getvalue() + bytes(4 * 84 * 84 * 3))


@pytest.mark.parametrize("damage, message", [
    (_truncate, "test_images.npz is damaged or not an .npz"),
    (_npz_short_of_images, "test_images.npz ends after 4 of its 10 images; it is truncated"),
    (_npz_without_images, r"has no 'images' array \(arrays: pixels\)"),
    (_npz_of_floats, r"must be a uint8 array \[N, H, W, 3\] \(got float32 \[10, 84, 84, 3\]\)"),
    (_npz_with_a_bad_crc, "test_images.npz is damaged"),
])
def test_damaged_npz_files_are_one_line_errors(tmp_path, damage, message):
    write_npz_form(tmp_path / "tieredimagenet")
    damage(tmp_path / "tieredimagenet" / "test_images.npz")
    with pytest.raises(DataError, match=message) as e:
        tieredimagenet.load(config(tmp_path))
    assert "\n" not in str(e.value)
    assert not [name for name in cache_files(tmp_path) if name.startswith("test") or ".tmp-" in name]


@pytest.mark.parametrize("overrides, message", [
    ({"form": "tar"}, "unknown data.form='tar'; use one of: auto, png, npz"),
    ({"npz_channels": "bgra"}, "unknown data.npz_channels='bgra'; use one of: bgr, rgb"),
    ({"image_size": 0}, "data.image_size must be >= 1"),
])
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tieredimagenet.load(config(tmp_path, **overrides))


def test_train_cli_end_to_end_on_png_files(tmp_path, cli):
    write_png_form(tmp_path / "data" / "tieredimagenet", size=32)
    run_dir = tmp_path / "run"
    proc = cli.run([
        "train", "data=tieredimagenet", f"data.root={tmp_path / 'data'}", "data.image_size=28", "backbone.hidden=8",
        "ways=2", "shots=1", "queries=2", "meta_batch_size=2", "steps=2", "trainer.val_every=2",
        "trainer.val_episodes=4", "trainer.test_episodes=4", "trainer.log_every=1", "trainer.ckpt_every=2",
        "eval.batch_size=2", "algo=protonet", "device=cpu", f"hydra.run.dir={run_dir}",
    ], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert (run_dir / "results.json").is_file()
    assert (tmp_path / "data" / "tieredimagenet" / "cache" / "train-png-rgb-28px-v1.npy").is_file()
