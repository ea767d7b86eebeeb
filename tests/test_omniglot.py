"""The Omniglot loader: on the two real small subsets when the shared data is there,
and on tiny fake archives (official layout, random PNGs) otherwise."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import omniglot
from metalearn.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
SMALL = ["images_background_small1", "images_background_small2"]
SMALL_SPLIT = {
    "train": ["Balinese", "Greek", "Korean", "Latin"],
    "val": ["Early_Aramaic"],
    "test": ["Japanese_(katakana)", "Sanskrit", "Tagalog"],
}
# Characters per alphabet in the small subsets (Greek and Latin are in both).
SMALL_CHARS = {
    "Balinese": 24, "Greek": 24, "Korean": 40, "Latin": 26,
    "Early_Aramaic": 22, "Japanese_(katakana)": 47, "Sanskrit": 42, "Tagalog": 17,
}


def small_config(root: Path, **overrides) -> omniglot.Config:
    return omniglot.Config(**{"root": str(root), "archives": SMALL, "download": False, **SMALL_SPLIT, **overrides})


def fake_archive(folder: Path, name: str, alphabets: dict[str, int], drawings: int = 2) -> Path:
    """Write ``<folder>/<name>.zip`` in the official layout, with random 105x105 PNGs."""
    rng = np.random.default_rng(len(name))
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}.zip", "w") as zf:
        for alphabet, chars in alphabets.items():
            for c in range(1, chars + 1):
                for d in range(1, drawings + 1):
                    png = io.BytesIO()
                    Image.fromarray(rng.random((105, 105)) > 0.1).save(png, format="PNG")
                    zf.writestr(f"{name}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png", png.getvalue())
    return folder / f"{name}.zip"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A data root holding copies of the real small zips, loaded once (building the cache)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared Omniglot data not found at {SHARED}")
    root = tmp_path_factory.mktemp("data")
    (root / "omniglot").mkdir()
    for name in SMALL:
        shutil.copy(SHARED / f"{name}.zip", root / "omniglot")
    start = time.perf_counter()
    stores = omniglot.load(small_config(root))
    return root, stores, time.perf_counter() - start


def test_small_subsets_class_counts_and_images(small):
    _, stores, _ = small
    for split, alphabets in SMALL_SPLIT.items():
        store = stores[split]
        # Greek and Latin are taken once (from the first subset), not from both.
        assert store.num_classes == 4 * sum(SMALL_CHARS[a] for a in alphabets)
        assert store.counts.eq(20).all()
        assert store.images.dtype == torch.uint8 and store.input_shape == (1, 28, 28)
        assert {name.split("/")[0] for name in store.class_names} == set(alphabets)
    assert stores["train"].class_names[:4] == [f"Balinese/character01/rot{r}" for r in (0, 90, 180, 270)]


def test_ink_is_255_on_black(small):
    root, stores, _ = small
    images = stores["train"].images
    assert images.float().mean() < 40  # mostly background
    assert images.max() == 255 and torch.median(images.float()) == 0
    # The first drawing of the first class is the first PNG, inverted and resized.
    first = sorted((root / "omniglot/images_background_small1/Balinese/character01").glob("*.png"))[0]
    expected = 255 - np.asarray(Image.open(first).convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    assert torch.equal(images[0, 0], torch.from_numpy(expected))


def test_rotation_classes_are_rot90_of_each_other(small):
    _, stores, _ = small
    store = stores["test"]
    for c in range(0, store.num_classes, 4 * 17):
        base = store.images[store.offsets[c] : store.offsets[c] + store.counts[c]]
        for k in range(1, 4):
            o = store.offsets[c + k]
            assert store.class_names[c + k] == store.class_names[c].replace("/rot0", f"/rot{90 * k}")
            assert torch.equal(store.images[o : o + store.counts[c + k]], torch.rot90(base, k, dims=(2, 3)))


def test_without_rotations_one_class_per_character(small):
    root, stores, _ = small
    plain = omniglot.load(small_config(root, rotations=False))
    for split, alphabets in SMALL_SPLIT.items():
        assert plain[split].num_classes == sum(SMALL_CHARS[a] for a in alphabets)
        assert plain[split].class_names == [n.removesuffix("/rot0") for n in stores[split].class_names[::4]]
    rotated = stores["val"]
    assert torch.equal(plain["val"].images, rotated.images.view(-1, 4, 20, 1, 28, 28)[:, 0].reshape(-1, 1, 28, 28))


def test_second_load_reads_the_cache(small, monkeypatch):
    root, stores, first_seconds = small

    def no_decoding(*args):
        raise AssertionError("PNGs decoded although the cache exists")

    monkeypatch.setattr(omniglot, "_decode_pngs", no_decoding)
    start = time.perf_counter()
    again = omniglot.load(small_config(root))
    assert time.perf_counter() - start < first_seconds / 3
    for split in stores:
        assert torch.equal(again[split].images, stores[split].images)
        assert again[split].class_names == stores[split].class_names


def test_corrupt_cache_is_rebuilt(small):
    root, stores, _ = small
    (cache,) = (root / "omniglot/cache").glob("*.pt")
    cache.write_bytes(b"not a torch file")
    again = omniglot.load(small_config(root))
    assert torch.equal(again["train"].images, stores["train"].images)
    assert torch.load(cache, weights_only=True)["keys"][0] == ["images_background_small1", "Balinese", "character01"]


def test_unknown_alphabet_lists_the_available_ones(small):
    root, _, _ = small
    with pytest.raises(ConfigError, match=r"data.val entry 'Klingon' matches no character of omniglot; its top-level "
                                          r"names are: Balinese, Early_Aramaic, Greek, Korean, Latin, Japanese_\(katakana\)"):
        omniglot.load(small_config(root, val=["Klingon"]))


def test_missing_archives_without_download_name_the_folder(tmp_path):
    with pytest.raises(DataError) as error:
        omniglot.load(omniglot.Config(root=str(tmp_path), download=False))
    message = str(error.value)
    assert "images_background.zip, images_evaluation.zip not found in " + str(tmp_path / "omniglot") in message
    assert "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip" in message
    assert "\n" not in message


def test_unknown_archives_are_never_downloaded(tmp_path):
    message = "images_background_small1.zip, images_background_small2.zip not found in .*only images_background and images_evaluation can be"
    with pytest.raises(DataError, match=message):
        omniglot.load(small_config(tmp_path, download=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 0}, "data.image_size must be >= 1"),
        ({"test": []}, "data.train and data.val given but data.test empty"),
        ({"archives": ["../images_background"]}, "not a plain archive name"),
        ({"train": ["../Greek"]}, "data.train entry '../Greek' is not a class name or pattern"),
    ],
)
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        omniglot.load(small_config(tmp_path, **overrides))


def test_an_alphabet_in_two_splits_is_named_with_both(small):
    root, _, _ = small
    with pytest.raises(ConfigError, match=r"character Greek/character01 is in both data.train \(by 'Greek'\) and "
                                          r"data.val \(by 'Gr\*'\) \(and 23 more\); give each character to one split only"):
        omniglot.load(small_config(root, val=["Gr*"]))


def test_vinyals_split_file():
    split = omniglot.vinyals_split()
    counts = {name: sum(len(chars) for sets in split[name].values() for chars in sets.values()) for name in split}
    assert counts == {"train": 1028, "val": 172, "test": 423}
    characters = [(s, a, c) for sets in split.values() for s, alphabets in sets.items() for a, chars in alphabets.items() for c in chars]
    assert len(set(characters)) == 1623
    if (SHARED / "vinyals_split").is_dir():
        for name in split:
            assert split[name] == json.loads((SHARED / "vinyals_split" / f"{name}.json").read_text())


def test_vinyals_split_reports_an_incomplete_archive(tmp_path):
    folder = tmp_path / "omniglot"
    fake_archive(folder, "images_background", {"Greek": 3, "Latin": 2})
    fake_archive(folder, "images_evaluation", {"Kannada": 2})
    message = "1616 of the 1623 characters of the Vinyals split are missing under .*the archives look incomplete"
    with pytest.raises(DataError, match=message):
        omniglot.load(omniglot.Config(root=str(tmp_path), download=False))
    # Extracted in place, with nothing left over from extraction.
    assert sorted(p.name for p in folder.iterdir()) == [
        "cache", "images_background", "images_background.zip", "images_evaluation", "images_evaluation.zip"
    ]
    assert sorted(p.name for p in (folder / "images_background").iterdir()) == ["Greek", "Latin"]


def test_alphabets_split_on_fake_archives(tmp_path):
    folder = tmp_path / "omniglot"
    fake_archive(folder, "first", {"A": 3, "B": 2})
    fake_archive(folder, "second", {"A": 5, "C": 1}, drawings=3)
    cfg = omniglot.Config(root=str(tmp_path), archives=["first", "second"], image_size=14,
                          train=["A"], val=["B"], test=["C"], download=False)
    stores = omniglot.load(cfg)
    # A comes from the first archive listing it: 3 characters of 2 drawings, not 5 of 3.
    assert stores["train"].num_classes == 12 and stores["train"].counts.eq(2).all()
    assert stores["test"].num_classes == 4 and stores["test"].counts.eq(3).all()
    assert stores["val"].input_shape == (1, 14, 14)


def test_reextracted_archive_rebuilds_the_cache(tmp_path):
    folder = tmp_path / "omniglot"
    fake_archive(folder, "first", {"A": 2, "B": 1, "C": 1})
    cfg = omniglot.Config(root=str(tmp_path), archives=["first"],
                          train=["A"], val=["B"], test=["C"], download=False)
    assert omniglot.load(cfg)["train"].num_classes == 8
    shutil.rmtree(folder / "first")
    fake_archive(folder, "first", {"A": 3, "B": 1, "C": 1})
    assert omniglot.load(cfg)["train"].num_classes == 12


def test_corrupt_zip_says_to_delete_it(tmp_path):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for name in omniglot.OFFICIAL_MD5:
        (folder / f"{name}.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"images_background.zip is corrupt .*; delete it and run again"):
        omniglot.load(omniglot.Config(root=str(tmp_path)))
    assert sorted(p.name for p in folder.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
