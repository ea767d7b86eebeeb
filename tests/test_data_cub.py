"""CUB-200-2011, on a tiny CUB_200_2011.tgz built here in the official layout (200 class folders
of 2 small JPEGs, classes.txt, images.txt and the other listings), downloaded from the local
test server and read by the real loader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import cub
from metalearn.errors import ConfigError, DataError

CLASS_NAMES = [f"{i:03d}.Bird_{i:03d}" for i in range(1, 201)]  # the real ones read like 001.Black_footed_Albatross
GREY = 77  # the second photo of class 001 is greyscale, with this value
LEFT, RIGHT = (250, 10, 10), (10, 10, 250)  # the second photo of class 003: 16x8, left half red, right half blue


def colour(c: int) -> tuple[int, int, int]:
    """The solid colour of the photos of class index c: distinct per channel, to check the channel order."""
    return (c, 255 - c, 60)


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def framed(size: int = 40, border: int = 6) -> Image.Image:
    """White square of side size - 2*border in the middle of a black one."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[border:-border, border:-border] = 255
    return Image.fromarray(pixels)


def photo(c: int, k: int) -> bytes:
    if (c, k) == (0, 1):
        return jpeg(Image.new("L", (10, 14), GREY))
    if (c, k) == (2, 1):
        halves = np.zeros((8, 16, 3), np.uint8)
        halves[:, :8], halves[:, 8:] = LEFT, RIGHT
        return jpeg(Image.fromarray(halves))
    if (c, k) == (4, 1):
        return jpeg(framed())
    return jpeg(Image.new("RGB", (12, 9), colour(c)))


def cub_members(per_class: int = 2) -> dict[str, bytes]:
    """The archive's files, official names and formats: ``CUB_200_2011/...`` and the top-level attributes.txt."""
    members = {"attributes.txt": b"1 has_bill_shape::curved_(up_or_down)\n", "CUB_200_2011/README": b"CUB-200-2011\n"}
    listing, labels, split = [], [], []
    for c, name in enumerate(CLASS_NAMES):
        for k in range(per_class):
            path = f"{name}/Bird_{c + 1:03d}_{k:04d}_{1000 + k}.jpg"
            members[f"CUB_200_2011/images/{path}"] = photo(c, k)
            image_id = len(listing) + 1
            listing.append(f"{image_id} {path}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {k % 2}")
    members["CUB_200_2011/classes.txt"] = "".join(f"{i} {n}\n" for i, n in enumerate(CLASS_NAMES, 1)).encode()
    members["CUB_200_2011/images.txt"] = ("\n".join(listing) + "\n").encode()
    members["CUB_200_2011/image_class_labels.txt"] = ("\n".join(labels) + "\n").encode()
    members["CUB_200_2011/train_test_split.txt"] = ("\n".join(split) + "\n").encode()
    return members


def tgz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


MEMBERS = cub_members()
ARCHIVE = tgz(MEMBERS)
ARCHIVE_MD5 = hashlib.md5(ARCHIVE).hexdigest()


def put_archive(root: Path, data: bytes = ARCHIVE) -> Path:
    path = root / "cub" / "CUB_200_2011.tgz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def config(root: Path, **overrides) -> cub.Config:
    return cub.Config(**{"root": str(root), "download": False, "md5": ARCHIVE_MD5, **overrides})


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def class_images(store, c: int) -> torch.Tensor:
    """The images of class index c (0-based id in classes.txt order) in ``store``."""
    i = store.class_names.index(CLASS_NAMES[c])
    return store.images[store.offsets[i] : store.offsets[i] + store.counts[i]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A root holding the archive, loaded once at 84x84 (building the cache)."""
    root = tmp_path_factory.mktemp("data")
    put_archive(root)
    return root, cub.load(config(root))


def test_download_then_chen_split_100_50_50(http_server, tmp_path):
    httpd, url = http_server
    httpd.files["/CUB_200_2011.tgz"] = ARCHIVE
    cfg = cub.Config(root=str(tmp_path), base_url=url, md5=ARCHIVE_MD5)
    stores = cub.load(cfg)
    assert {s: stores[s].num_classes for s in stores} == {"train": 100, "val": 50, "test": 50}
    # Chen et al.: 0-based class index i in train if i % 2 == 0, val if i % 4 == 1, test if i % 4 == 3.
    assert stores["train"].class_names[:3] == ["001.Bird_001", "003.Bird_003", "005.Bird_005"]
    assert stores["val"].class_names[:3] == ["002.Bird_002", "006.Bird_006", "010.Bird_010"]
    assert stores["test"].class_names[-2:] == ["196.Bird_196", "200.Bird_200"]
    assert sorted(sum((s.class_names for s in stores.values()), [])) == CLASS_NAMES
    for store in stores.values():
        assert store.counts.eq(2).all() and store.images.dtype == torch.uint8 and store.input_shape == (3, 84, 84)
        assert (store.mean, store.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    archive = tmp_path / "cub" / "CUB_200_2011.tgz"
    assert archive.read_bytes() == ARCHIVE  # kept, so the cache can be rebuilt
    assert cub.sources(cfg) == [archive]
    assert [p.name for p in (tmp_path / "cub" / "cache").iterdir()] == ["cub-84px-v1.pt"]


def test_colours_come_through_in_rgb_order(loaded):
    _, stores = loaded
    for split, c in [("train", 198), ("val", 5), ("test", 3)]:
        first = class_images(stores[split], c)[0].float()
        for channel, value in enumerate(colour(c)):
            assert (first[channel] - value).abs().max() <= 3, (split, c, channel)


def test_greyscale_photo_becomes_rgb(loaded):
    _, stores = loaded
    grey = class_images(stores["train"], 0)[1].float()
    assert grey.shape == (3, 84, 84) and (grey - GREY).abs().max() <= 2


def test_whole_photo_is_resized_not_cropped(loaded):
    _, stores = loaded
    halves = class_images(stores["train"], 2)[1].float()  # a 16x8 photo, squashed to 84x84
    left, right = halves[:, :, :36].mean(dim=(1, 2)), halves[:, :, 48:].mean(dim=(1, 2))
    assert torch.allclose(left, torch.tensor(LEFT, dtype=torch.float), atol=12)
    assert torch.allclose(right, torch.tensor(RIGHT, dtype=torch.float), atol=12)
    frame = class_images(stores["train"], 4)[1].float()  # the black frame is all still there
    assert frame[:, :8].mean() < 20 and frame[:, 30:54, 30:54].mean() > 235


def test_crop_margin_keeps_the_centre(loaded):
    root, stores = loaded
    cropped = cub.load(config(root, image_size=8, crop_margin=2.0))
    # 40x40 -> 16x16, of which the central 8x8 (source pixels 10..29) lies inside the white square (6..33).
    assert class_images(cropped["train"], 4)[1].float().min() > 200
    assert class_images(stores["train"], 4)[1].float().mean() < 160  # uncropped, the frame is there
    assert {p.name for p in (root / "cub" / "cache").iterdir()} == {"cub-8px-crop2-v1.pt", "cub-84px-v1.pt"}
    with pytest.raises(ConfigError):
        cub.load(config(root, crop_margin=0.5))


def test_cache_is_reused_then_rebuilt_when_the_archive_changes(loaded, tmp_path, monkeypatch):
    _, stores = loaded
    archive = put_archive(tmp_path)
    cub.load(config(tmp_path, image_size=16))
    decoded = []
    real = cub._decode_jpeg
    monkeypatch.setattr(cub, "_decode_jpeg", lambda *a: decoded.append(a[-1]) or real(*a))
    again = cub.load(config(tmp_path, image_size=16))
    assert decoded == [] and again["val"].input_shape == (3, 16, 16)

    fewer = {k: v for k, v in MEMBERS.items() if "_0001_" not in k or "/images/" not in k}
    fewer["CUB_200_2011/images.txt"] = b"".join(
        line + b"\n" for line in MEMBERS["CUB_200_2011/images.txt"].splitlines() if b"_0001_" not in line)
    archive.write_bytes(tgz(fewer))
    os.utime(archive, ns=(1, 1))
    rebuilt = cub.load(config(tmp_path, image_size=16, md5=""))
    assert len(decoded) == 200 and rebuilt["test"].counts.eq(1).all()


def test_missing_archive_without_download_names_file_folder_and_url(tmp_path):
    with pytest.raises(DataError) as e:
        cub.load(config(tmp_path))
    message = one_line(e)
    assert "CUB_200_2011.tgz not found in " + str(tmp_path / "cub") in message
    assert "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz" in message and "data.download=true" in message


def test_md5_mismatch_on_download_keeps_nothing(http_server, tmp_path):
    httpd, url = http_server
    httpd.files["/CUB_200_2011.tgz"] = ARCHIVE
    with pytest.raises(DataError) as e:
        cub.load(cub.Config(root=str(tmp_path), base_url=url))  # the official md5, which this is not
    message = one_line(e)
    assert ARCHIVE_MD5 in message and cub.OFFICIAL_MD5 in message and "nothing was kept" in message
    assert list((tmp_path / "cub").iterdir()) == []


def test_archive_put_by_hand_is_md5_checked_before_decoding(tmp_path):
    put_archive(tmp_path)
    with pytest.raises(DataError) as e:
        cub.load(config(tmp_path, md5=cub.OFFICIAL_MD5))
    assert f"has md5 {ARCHIVE_MD5}, expected {cub.OFFICIAL_MD5}" in one_line(e)
    assert not (tmp_path / "cub" / "cache").exists()


def variant(drop: tuple[str, ...] = (), replace: dict[str, bytes] | None = None) -> bytes:
    """The test archive without the members ``drop`` and with ``replace`` (names under CUB_200_2011/) put in."""
    members = {k: v for k, v in MEMBERS.items() if k.removeprefix("CUB_200_2011/") not in drop}
    members.update({f"CUB_200_2011/{k}": v for k, v in (replace or {}).items()})
    return tgz(members)


@pytest.mark.parametrize("content, expected", [
    (b"not a tgz", "is corrupt (ReadError: not a gzip file)"),
    (ARCHIVE[: len(ARCHIVE) // 2], "is corrupt (EOFError"),
    (variant(drop=("classes.txt",)), "has no CUB_200_2011/classes.txt inside"),
    (variant(drop=("images/007.Bird_007/Bird_007_0000_1000.jpg",)),
     "lacks 1 of the 400 images listed in images.txt (first: 007.Bird_007/Bird_007_0000_1000.jpg)"),
    (variant(replace={"classes.txt": b"".join(MEMBERS["CUB_200_2011/classes.txt"].splitlines(keepends=True)[:199])}),
     "classes.txt does not list class ids 1..200 once each"),
    (variant(replace={"images/009.Bird_009/Bird_009_0001_1001.jpg": b"\xff\xd8 not really a jpeg"}),
     "cannot decode"),
    (variant(replace={"images.txt": b"one two three\n"}), "images.txt is not '<id> <path>' lines"),
], ids=["not-gzip", "truncated", "no-classes-txt", "image-missing", "199-classes", "bad-jpeg", "bad-listing"])
def test_corrupt_archive_is_one_line_error(tmp_path, content, expected):
    put_archive(tmp_path, content)
    with pytest.raises(DataError) as e:
        cub.load(config(tmp_path, md5=""))
    message = one_line(e)
    assert expected in message and str(tmp_path / "cub" / "CUB_200_2011.tgz") in message, message
    assert not (tmp_path / "cub" / "cache").exists()


def test_train_cli_end_to_end(cli, tmp_path):
    """``metalearn train data=cub`` with the archive in place and downloads off."""
    put_archive(tmp_path / "data")
    run = tmp_path / "run"
    proc = cli.run([
        "train", "data=cub", f"data.root={tmp_path / 'data'}", "data.download=false", f"data.md5={ARCHIVE_MD5}",
        "algo=protonet", "backbone.hidden=8", "ways=2", "shots=1", "queries=1", "meta_batch_size=2", "steps=2",
        "trainer.val_every=2", "trainer.val_episodes=4", "trainer.test_episodes=4", "trainer.log_every=1",
        "trainer.ckpt_every=2", "eval.batch_size=2", f"hydra.run.dir={run}",
    ], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["test"]["accuracy"]["mean"] <= 1.0 and results["test"]["accuracy"]["episodes"] == 4
    assert "name: cub" in (run / ".hydra" / "config.yaml").read_text()
