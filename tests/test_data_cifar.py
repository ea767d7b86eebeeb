"""CIFAR-FS and FC100, on a tiny cifar-100-python.tar.gz built here in the official format
(pickles ``train``/``test``/``meta`` with all 100 real classes, 3 images each), downloaded
from the local test server and read by the real loader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metalearn.data import cifar100, cifarfs, fc100
from metalearn.errors import ConfigError, DataError

# CIFAR-100's class hierarchy, as on its web page: superclass -> its 5 fine classes.
HIERARCHY = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
# Label ids are the alphabetical positions, as in the real meta pickle.
FINE = sorted(f for fs in HIERARCHY.values() for f in fs)
COARSE = sorted(HIERARCHY)
SUPERCLASS = {f: c for c, fs in HIERARCHY.items() for f in fs}
# The G plane of every image: pixel (y, x) = (32 y + x) mod 256, to check the row-major layout.
G_PLANE = (np.arange(32 * 32) % 256).astype(np.uint8)


def image_row(fine: int, slot: int) -> np.ndarray:
    """One flattened 32x32 image: R = fine label, G = G_PLANE, B = the image's slot in its class."""
    return np.concatenate([np.full(1024, fine, np.uint8), G_PLANE, np.full(1024, slot, np.uint8)])


def batch_pickle(per_class: int, first_slot: int, skip: frozenset[str] = frozenset()) -> bytes:
    """A ``train``/``test`` pickle holding ``per_class`` images of each fine class (slots first_slot, ...),
    with bytes keys, as the real Python 2 pickles give when read with encoding='bytes'."""
    rows, fine_labels, coarse_labels = [], [], []
    for fine, name in enumerate(FINE):
        if name in skip:
            continue
        for k in range(per_class):
            rows.append(image_row(fine, first_slot + k))
            fine_labels.append(fine)
            coarse_labels.append(COARSE.index(SUPERCLASS[name]))
    content = {
        b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine_labels,
        b"coarse_labels": coarse_labels,
        b"data": np.stack(rows),
    }
    return pickle.dumps(content, protocol=2)


def tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def cifar_archive(skip: frozenset[str] = frozenset(), meta: bytes | None = None) -> bytes:
    """cifar-100-python.tar.gz: 2 train images (slots 0, 1) and 1 test image (slot 2) of each fine class."""
    meta = meta or pickle.dumps({"fine_label_names": FINE, "coarse_label_names": COARSE}, protocol=2)
    return tar_gz({
        "cifar-100-python/file.txt~": b"",
        "cifar-100-python/meta": meta,
        "cifar-100-python/test": batch_pickle(1, 2, skip),
        "cifar-100-python/train": batch_pickle(2, 0, skip),
    })


ARCHIVE = cifar_archive()
ARCHIVE_MD5 = hashlib.md5(ARCHIVE).hexdigest()


def put_archive(root: Path, data: bytes = ARCHIVE) -> Path:
    path = root / "cifar100" / "cifar-100-python.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def class_rows(store, name: str) -> torch.Tensor:
    c = store.class_names.index(name)
    return store.images[store.offsets[c] : store.offsets[c] + store.counts[c]]


def test_cifarfs_downloads_the_archive_and_gives_the_bertinetto_split(http_server, tmp_path):
    httpd, url = http_server
    httpd.files["/cifar-100-python.tar.gz"] = ARCHIVE
    cfg = cifarfs.Config(root=str(tmp_path), base_url=url, md5=ARCHIVE_MD5)
    stores = cifarfs.load(cfg)

    split = cifarfs.bertinetto_split()
    assert {s: stores[s].num_classes for s in stores} == {"train": 64, "val": 16, "test": 20}
    for name, store in stores.items():
        assert store.class_names == sorted(split[name])  # CIFAR-100's label order within a split
        assert store.counts.eq(3).all()  # train and test pickles merged
        assert store.images.dtype == torch.uint8 and store.input_shape == (3, 32, 32)
        assert (store.mean, store.std) == (cifar100.MEAN, cifar100.STD)
    assert sorted(sum((s.class_names for s in stores.values()), [])) == FINE
    assert {"whale", "poppy", "woman", "rocket"} <= set(stores["test"].class_names)
    assert {"otter", "shark", "tractor", "sea"} <= set(stores["val"].class_names)
    assert {"dolphin", "apple", "train", "cloud"} <= set(stores["train"].class_names)

    # Pixels come through with their channel order and layout: R = label, G = ramp, B = slot;
    # slots 0 and 1 are in the train pickle, 2 in the test pickle.
    whale = class_rows(stores["test"], "whale")
    fine = FINE.index("whale")
    assert whale[:, 0].eq(fine).all()
    assert torch.equal(whale[:, 1], torch.from_numpy(G_PLANE).view(1, 32, 32).expand(3, 32, 32))
    assert whale[:, 1, 1, 0].eq(32).all() and whale[:, 1, 0, 1].eq(1).all()
    assert sorted(whale[:, 2, 0, 0].tolist()) == [0, 1, 2] and whale[:, 2].eq(whale[:, 2, :1, :1]).all()

    # The archive is kept (the cache can be rebuilt from it) and listed as the source.
    archive = tmp_path / "cifar100" / "cifar-100-python.tar.gz"
    assert archive.read_bytes() == ARCHIVE
    assert cifarfs.sources(cfg) == [archive] == fc100.sources(fc100.Config(root=str(tmp_path)))
    assert [p.name for p in (tmp_path / "cifar100" / "cache").iterdir()] == ["cifar100-32px-v1.pt"]


def test_fc100_shares_the_archive_and_cache_and_splits_by_superclass(tmp_path, monkeypatch):
    put_archive(tmp_path)
    cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False, md5=ARCHIVE_MD5))

    def no_decoding(*args):
        raise AssertionError("CIFAR-100 decoded again although the shared cache is current")

    monkeypatch.setattr(cifar100, "_decode", no_decoding)
    stores = fc100.load(fc100.Config(root=str(tmp_path), download=False, md5=ARCHIVE_MD5))
    superclasses = fc100.oreshkin_split()
    assert {s: len(v) for s, v in superclasses.items()} == {"train": 12, "val": 4, "test": 4}
    assert {s: stores[s].num_classes for s in stores} == {"train": 60, "val": 20, "test": 20}
    for name, store in stores.items():
        assert {SUPERCLASS[c] for c in store.class_names} == set(superclasses[name])
        assert store.class_names == sorted(store.class_names) and store.counts.eq(3).all()
        # within-group episodes draw from one superclass (5 fine classes each)
        assert store.groups_of_classes() == [SUPERCLASS[c] for c in store.class_names]
        batch = store.sampler(5, 1, 1, 8, 0, within_group=True).sample()
        assert all(len({SUPERCLASS[store.class_names[c]] for c in row.tolist()}) == 1 for row in batch.classes)
    assert set(stores["test"].class_names) == set(HIERARCHY["aquatic_mammals"] + HIERARCHY["insects"]
                                                   + HIERARCHY["medium_mammals"] + HIERARCHY["people"])
    assert "bear" in stores["val"].class_names and "bee" in stores["test"].class_names
    assert class_rows(stores["val"], "bear")[:, 0].eq(FINE.index("bear")).all()
    assert sorted(p.name for p in (tmp_path / "cifar100").iterdir()) == ["cache", "cifar-100-python.tar.gz"]


def test_cache_is_reused_then_rebuilt_when_the_archive_changes(tmp_path, monkeypatch):
    archive = put_archive(tmp_path)
    cfg = cifarfs.Config(root=str(tmp_path), download=False, md5=ARCHIVE_MD5)
    first = cifarfs.load(cfg)
    decodes = []
    real_decode = cifar100._decode
    monkeypatch.setattr(cifar100, "_decode", lambda *a: decodes.append(a) or real_decode(*a))
    again = cifarfs.load(cfg)
    assert decodes == [] and torch.equal(again["test"].images, first["test"].images)

    # A replaced archive (another class missing here) is noticed: the cache is rebuilt from it.
    changed = cifar_archive(skip=frozenset({"apple"}))
    archive.write_bytes(changed)
    os.utime(archive, ns=(1, 1))
    with pytest.raises(DataError) as e:
        cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False, md5=hashlib.md5(changed).hexdigest()))
    assert len(decodes) == 1
    assert "no images of 1 class(es) of the CIFAR-FS split (first: apple)" in one_line(e)


def test_other_image_sizes_are_resized_and_cached_apart(tmp_path):
    put_archive(tmp_path)
    stores = cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False, md5=ARCHIVE_MD5, image_size=20))
    assert stores["train"].input_shape == (3, 20, 20)
    # Uniform planes stay uniform under resizing.
    assert class_rows(stores["train"], "apple")[:, 0].eq(FINE.index("apple")).all()
    assert (tmp_path / "cifar100" / "cache" / "cifar100-20px-v1.pt").is_file()
    with pytest.raises(ConfigError):
        cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False, image_size=0))


def test_missing_archive_without_download_names_file_folder_and_url(tmp_path):
    cfg = fc100.Config(root=str(tmp_path), download=False)
    with pytest.raises(DataError) as e:
        fc100.load(cfg)
    message = one_line(e)
    assert "cifar-100-python.tar.gz" in message and str(tmp_path / "cifar100") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message and "data.download=true" in message


def test_md5_mismatch_on_download_keeps_nothing(http_server, tmp_path):
    httpd, url = http_server
    httpd.files["/cifar-100-python.tar.gz"] = ARCHIVE
    with pytest.raises(DataError) as e:
        cifarfs.load(cifarfs.Config(root=str(tmp_path), base_url=url))  # the official md5, which this is not
    message = one_line(e)
    assert ARCHIVE_MD5 in message and cifar100.OFFICIAL_MD5 in message and "nothing was kept" in message
    assert list((tmp_path / "cifar100").iterdir()) == []


def test_archive_put_by_hand_is_md5_checked_before_decoding(tmp_path):
    put_archive(tmp_path)
    with pytest.raises(DataError) as e:
        cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False))
    assert f"has md5 {ARCHIVE_MD5}, expected {cifar100.OFFICIAL_MD5}" in one_line(e)
    assert not (tmp_path / "cifar100" / "cache").exists()
    # md5 '' skips the check, for a copy the user trusts.
    assert cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False, md5=""))["val"].num_classes == 16


class RunsCode:
    """Pickles as a call of os.system: a pickle that would run code when loaded."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content", [
    b"this is not a tar.gz at all",
    ARCHIVE[: len(ARCHIVE) // 2],  # cut off
    tar_gz({"cifar-100-python/meta": pickle.dumps({"fine_label_names": FINE, "coarse_label_names": COARSE})}),  # no train, test
    cifar_archive(meta=b"\x80\x02garbage"),  # a broken pickle
    cifar_archive(meta=pickle.dumps({"fine_label_names": RunsCode()}, protocol=2)),  # refused, never run
], ids=["not-gzip", "truncated", "members-missing", "bad-pickle", "code-in-pickle"])
def test_corrupt_archive_is_one_line_error(tmp_path, content, capfd):
    put_archive(tmp_path, content)
    with pytest.raises(DataError) as e:
        cifarfs.load(cifarfs.Config(root=str(tmp_path), download=False, md5=""))
    message = one_line(e)
    assert str(tmp_path / "cifar100" / "cifar-100-python.tar.gz") in message and "delete it" in message
    assert "pwned" not in capfd.readouterr().out


def test_fc100_on_an_archive_lacking_classes(tmp_path):
    incomplete = cifar_archive(skip=frozenset({"bear"}))
    put_archive(tmp_path, incomplete)
    with pytest.raises(DataError) as e:
        fc100.load(fc100.Config(root=str(tmp_path), download=False, md5=""))
    assert "4 fine classes of superclass 'large_carnivores', not 5" in one_line(e)


def test_train_cli_end_to_end(cli, tmp_path):
    """``metalearn train data=cifarfs|fc100`` with the archive in place and downloads off."""
    put_archive(tmp_path / "data")
    common = [
        f"data.root={tmp_path / 'data'}", "data.download=false", f"data.md5={ARCHIVE_MD5}", "algo=protonet",
        "backbone.hidden=8", "ways=2", "shots=1", "queries=2", "meta_batch_size=2", "steps=2",
        "trainer.val_every=2", "trainer.val_episodes=4", "trainer.test_episodes=4", "trainer.log_every=1",
        "trainer.ckpt_every=2", "eval.batch_size=2",
    ]
    jobs = {name: (["train", f"data={name}", *common, f"hydra.run.dir={tmp_path / name}"], tmp_path) for name in ("cifarfs", "fc100")}
    procs = cli.run_many(jobs)
    for name, proc in procs.items():
        assert proc.returncode == 0, cli.describe(proc)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert 0.0 <= results["test"]["accuracy"]["mean"] <= 1.0 and results["test"]["accuracy"]["episodes"] == 4
        assert f"name: {name}" in (tmp_path / name / ".hydra" / "config.yaml").read_text()
