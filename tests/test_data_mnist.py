"""mnist and doublemnist on tiny MNIST files in the real IDX format, downloaded from a local
HTTP server (gzip, big-endian headers): parsing, checksums, splits, DoubleMNIST's composition."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose

from metalearn import confdir
from metalearn.config import to_run_config
from metalearn.data import doublemnist, mnist
from metalearn.data.transforms import channel_stats
from metalearn.errors import ConfigError, DataError

# Digit d's images in the tiny files: 3 in the training file, 1 in the test file.
TRAIN_PER_DIGIT, TEST_PER_DIGIT = 3, 1


def idx_gz(array: np.ndarray) -> bytes:
    """``array`` (uint8) as a gzipped IDX file: magic 0x0000080N, N big-endian uint32 dims, the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def tiny_mnist() -> dict[str, bytes]:
    """The four MNIST files (by config key), with random 28x28 images in shuffled label order."""
    rng = np.random.default_rng(0)
    files = {}
    for part, per_digit in (("train", TRAIN_PER_DIGIT), ("test", TEST_PER_DIGIT)):
        labels = rng.permutation(np.repeat(np.arange(10), per_digit)).astype(np.uint8)
        files[f"{part}_images"] = idx_gz(rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8))
        files[f"{part}_labels"] = idx_gz(labels)
    return files


FILES = tiny_mnist()
MD5 = {key: hashlib.md5(body).hexdigest() for key, body in FILES.items()}


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of FILES, decoded independently of the loader."""
    images, labels = [], []
    for part in ("train", "test"):
        data = gzip.decompress(FILES[f"{part}_images"])
        images.append(np.frombuffer(data[16:], dtype=np.uint8).reshape(-1, 28, 28))
        labels.append(np.frombuffer(gzip.decompress(FILES[f"{part}_labels"])[8:], dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture
def served(http_server):
    """(httpd, base_url) serving the tiny files under /mnist/."""
    httpd, url = http_server
    for key, body in FILES.items():
        httpd.files[f"/mnist/{mnist.FILES[key]}"] = body
    return httpd, f"{url}/mnist"


def put_files(root: Path, files: dict[str, bytes] = FILES) -> Path:
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for key, body in files.items():
        (folder / mnist.FILES[key]).write_bytes(body)
    return folder


def composed_config(name: str):
    with confdir.initialized():
        return to_run_config(compose("config", overrides=[f"data={name}"])).data


# ---------------------------------------------------------------- mnist


def test_downloads_and_splits_digits_with_their_pixels(tmp_path, served):
    _, base_url = served
    stores = mnist.load(mnist.Config(root=str(tmp_path), base_url=base_url, md5=MD5))
    assert sorted(p.name for p in (tmp_path / "mnist").glob("*.gz")) == sorted(mnist.FILES.values())
    images, labels = raw_digits()
    for split, digits in {"train": range(6), "val": (6, 7), "test": (8, 9)}.items():
        store = stores[split]
        assert store.class_names == [str(d) for d in digits]
        assert store.counts.tolist() == [TRAIN_PER_DIGIT + TEST_PER_DIGIT] * len(digits)
        assert store.images.dtype == torch.uint8 and store.input_shape == (1, 28, 28)
        assert (store.mean, store.std) == ((0.1307,), (0.3081,))
        for c, digit in enumerate(digits):
            got = store.images[store.offsets[c] : store.offsets[c] + store.counts[c], 0].numpy()
            want = images[labels == digit]
            assert sorted(map(bytes, got)) == sorted(map(bytes, want))  # the same images, in any order


def test_class_lists_resize_and_sources(tmp_path):
    put_files(tmp_path)
    cfg = mnist.Config(root=str(tmp_path), download=False, md5=MD5, image_size=14,
                       train=[9, 0, 1], val=[2, 3], test=[4])
    stores = mnist.load(cfg)
    assert stores["train"].class_names == ["0", "1", "9"]  # a split is a set: in the dataset's order
    assert stores["test"].class_names == ["4"] and stores["test"].input_shape == (1, 14, 14)
    assert mnist.sources(cfg) == [tmp_path / "mnist" / name for name in mnist.FILES.values()]


@pytest.mark.parametrize("lists, message", [
    ({"train": ["0"], "test": ["1"]}, "data.train and data.test given but data.val empty"),
    ({"train": ["0"], "val": ["1"], "test": ["10"]}, "data.test entry '10' matches no digit of mnist; its names are: 0, 1, 2"),
    ({"train": ["[0-5]"], "val": ["6"], "test": ["5"]},
     r"digit 5 is in both data.train \(by '\[0-5\]'\) and data.test \(by '5'\); give each digit to one split only"),
])
def test_bad_class_lists_are_config_errors(tmp_path, lists, message):
    with pytest.raises(ConfigError, match=message):  # before any file is read: the folder is empty
        mnist.load(mnist.Config(root=str(tmp_path), download=False, **lists))


def test_md5_mismatch_keeps_nothing(tmp_path, served):
    _, base_url = served
    wrong = {**MD5, "train_labels": "0" * 32}
    with pytest.raises(DataError) as err:
        mnist.load(mnist.Config(root=str(tmp_path), base_url=base_url, md5=wrong))
    message = str(err.value)
    assert "\n" not in message and "train-labels-idx1-ubyte.gz" in message and "expected " + "0" * 32 in message
    assert not (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "mnist").iterdir() if p.name.startswith(".")]  # no temp file left


def test_hand_placed_file_is_md5_checked(tmp_path):
    put_files(tmp_path, {**FILES, "test_labels": FILES["train_labels"]})
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz has md5 \w+, expected") as err:
        mnist.load(mnist.Config(root=str(tmp_path), download=False, md5=MD5))
    assert "\n" not in str(err.value)


def test_missing_files_without_download_name_files_folder_and_url(tmp_path):
    put_files(tmp_path, {k: v for k, v in FILES.items() if k != "test_images"})
    with pytest.raises(DataError) as err:
        mnist.load(mnist.Config(root=str(tmp_path), download=False, md5=MD5))
    message = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "train-images" not in message
    assert str(tmp_path / "mnist") in message and mnist.OFFICIAL_URL in message and "\n" not in message


@pytest.mark.parametrize("body, message", [
    (idx_gz(np.zeros((30, 28), np.uint8)), r"magic number 0x00000802, expected 0x00000803"),
    (gzip.compress(gzip.decompress(FILES["train_images"])[:-5]), r"holds 23515 bytes of data but its IDX header promises 23520"),
    (FILES["train_images"][:40], r"is not a readable gzip file"),
])
def test_corrupt_idx_is_one_line_error(tmp_path, body, message):
    put_files(tmp_path, {**FILES, "train_images": body})
    md5 = {**MD5, "train_images": hashlib.md5(body).hexdigest()}  # past the checksum, to the parser
    with pytest.raises(DataError, match=message) as err:
        mnist.load(mnist.Config(root=str(tmp_path), download=False, md5=md5))
    assert "\n" not in str(err.value) and "train-images-idx3-ubyte.gz" in str(err.value)


def test_cache_is_reused_then_rebuilt_when_a_file_changes(tmp_path):
    folder = put_files(tmp_path)
    cfg = mnist.Config(root=str(tmp_path), download=False, md5=MD5)
    mnist.load(cfg)
    [cache] = (folder / "cache").glob("*.pt")
    stamp = cache.stat().st_mtime_ns
    mnist.load(cfg)
    assert cache.stat().st_mtime_ns == stamp
    # New labels: every test image becomes a 0.
    relabelled = idx_gz(np.zeros(10, np.uint8))
    (folder / mnist.FILES["test_labels"]).write_bytes(relabelled)
    stores = mnist.load(mnist.Config(root=str(tmp_path), download=False, md5={**MD5, "test_labels": ""}))
    assert stores["train"].counts.tolist() == [TRAIN_PER_DIGIT + 10] + [TRAIN_PER_DIGIT] * 5
    assert cache.stat().st_mtime_ns != stamp


def test_yaml_matches_the_config_defaults():
    data = composed_config("mnist")
    assert data.md5 == mnist.OFFICIAL_MD5 and data.base_url == mnist.OFFICIAL_URL
    assert (data.train, data.val, data.test, data.split_seed) == ([], [], [], None)  # the standard split:
    assert mnist.STANDARD_SPLIT == {"train": ["0", "1", "2", "3", "4", "5"], "val": ["6", "7"], "test": ["8", "9"]}
    assert data.image_size == 28 and data.augment.flip is False


# ---------------------------------------------------------------- doublemnist


def double_config(root: Path, **overrides) -> doublemnist.Config:
    return doublemnist.Config(**{"root": str(root), "download": False, "md5": MD5, "images_per_class": 3, **overrides})


def test_doublemnist_composes_a_beside_b_deterministically(tmp_path):
    put_files(tmp_path)
    stores = doublemnist.load(double_config(tmp_path, image_size=56))  # 56: the composed square, not resized
    images, labels = raw_digits()
    of_digit = [{bytes(img) for img in images[labels == d]} for d in range(10)]
    for split, names in doublemnist.TORCHMETA_SPLIT.items():
        store = stores[split]
        assert store.class_names == names and store.counts.eq(3).all() and store.input_shape == (1, 56, 56)
        for c, name in enumerate(names):
            pairs = store.images[store.offsets[c] : store.offsets[c] + 3, 0].numpy()
            assert not pairs[:, :14].any() and not pairs[:, 42:].any()  # empty rows above and below
            for pair in pairs:
                assert bytes(pair[14:42, :28]) in of_digit[int(name[0])]  # left half: an image of digit a
                assert bytes(pair[14:42, 28:]) in of_digit[int(name[1])]  # right half: an image of digit b
    # The same files and options give the same dataset, cache or not; another seed, other images.
    put_files(tmp_path / "elsewhere")
    again = doublemnist.load(double_config(tmp_path / "elsewhere", image_size=56))
    assert torch.equal(again["train"].images, stores["train"].images)
    reseeded = doublemnist.load(double_config(tmp_path, image_size=56, generation_seed=1))
    assert not torch.equal(reseeded["train"].images, stores["train"].images)


def test_doublemnist_default_size_stats_and_downloads(tmp_path, served):
    _, base_url = served
    stores = doublemnist.load(double_config(tmp_path, download=True, base_url=base_url))
    assert sorted(p.name for p in (tmp_path / "mnist").glob("*.gz")) == sorted(mnist.FILES.values())
    train = stores["train"]
    assert train.input_shape == (1, 64, 64) and train.num_classes == 64
    assert stores["val"].num_classes == 16 and stores["test"].num_classes == 20
    mean, std = channel_stats(train.images)  # pooled from the cached per-class stats: the same numbers
    assert train.mean == pytest.approx(mean, abs=1e-9) and train.std == pytest.approx(std, abs=1e-9)
    assert stores["test"].mean == train.mean
    assert doublemnist.sources(double_config(tmp_path)) == mnist.sources(mnist.Config(root=str(tmp_path)))


def test_doublemnist_class_lists(tmp_path):
    put_files(tmp_path)
    # Numbers as YAML or the command line may give them ("07" -> 7 -> "7") are padded back.
    stores = doublemnist.load(double_config(tmp_path, image_size=28, train=["7", "42"], val=["00"], test=["9?"]))
    assert stores["train"].class_names == ["07", "42"] and stores["val"].class_names == ["00"]
    assert stores["test"].class_names == [f"9{d}" for d in range(10)]
    with pytest.raises(ConfigError, match=r"class 42 is in both data.train \(by '42'\) and data.test \(by '42'\)"):
        doublemnist.load(double_config(tmp_path, train=["42"], val=["1"], test=["42"]))
    with pytest.raises(ConfigError, match="data.train entry '100' matches no class of doublemnist"):
        doublemnist.load(double_config(tmp_path, train=["100"], val=["1"], test=["2"]))


def test_doublemnist_yaml_is_torchmeta_split():
    data = composed_config("doublemnist")
    assert (data.train, data.val, data.test, data.split_seed) == ([], [], [], None)  # the standard split: torchmeta's
    split = doublemnist.TORCHMETA_SPLIT
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (64, 16, 20)
    assert sorted(split["train"] + split["val"] + split["test"]) == doublemnist.CLASSES
    assert data.image_size == 64 and data.images_per_class == 1000 and data.md5 == mnist.OFFICIAL_MD5
