"""The options every image dataset shares that shape its episodes: rotations as classes (lazy), Koch et al.'s
affine distortions, and within-group (hierarchical) episodes; through the sampler and through real CLI runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data.common import rotation_splits
from metalearn.data.episodes import ClassStore
from metalearn.data.transforms import AffineConfig, AugmentConfig, EpisodeTransform, check_augment
from metalearn.errors import ConfigError, DataError


def square_store(classes: int = 6, per_class: int = 5, size: int = 6, names: list[str] | None = None) -> ClassStore:
    """Random uint8 images [classes * per_class, 1, size, size] (no image is a turn of another)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ClassStore(images, labels, names or [f"c{c}" for c in range(classes)])


# ---------------------------------------------------------------- rotations as classes


def test_lazy_rotations_draw_the_episodes_of_stored_turned_copies():
    """rotate_classes turns images when drawn, and gives exactly the episodes of a store that holds the four turns
    (Omniglot's way: class 4c + k is class c turned k times), with 4x less memory."""
    base = square_store()
    x, y = base.images, torch.arange(base.num_classes).repeat_interleave(5)
    eager = ClassStore(torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)]),
                       torch.cat([y * 4 + k for k in range(4)]),
                       [f"{n}/rot{90 * k}" for n in base.class_names for k in range(4)])
    lazy = square_store().rotate_classes()
    assert lazy.class_names == eager.class_names and lazy.num_classes == 24 and len(lazy) == 30
    assert lazy.images.data_ptr() != 0 and lazy.images.shape[0] == 30  # no copies kept
    for seed in range(3):
        a, b = eager.sampler(5, 2, 3, 8, seed).sample(), lazy.sampler(5, 2, 3, 8, seed).sample()
        for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert lazy.rotate_classes() is lazy and lazy.num_classes == 24  # once only
    # Readers of images by index (torchmeta's and learn2learn's datasets, embeddings) get the turned images stored.
    stored = lazy.materialized()
    assert stored.turns == 1 and len(stored) == 120 and stored.class_names == eager.class_names
    assert torch.equal(stored.images, eager.images) and torch.equal(stored.counts, eager.counts)
    from metalearn.learn2learn.data.stores import StoreDataset
    dataset = StoreDataset(lazy)
    assert len(dataset) == 120 and torch.equal(dataset[7][0], eager.images[7].float() / 255) and dataset[7][1] == 1
    with pytest.raises(DataError, match="square images"):
        ClassStore(torch.zeros(4, 1, 3, 5, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["a", "b"]).rotate_classes()


def test_rotations_option_values():
    assert rotation_splits(False) == () and rotation_splits(None) == ()
    assert rotation_splits(True) == ("train", "val", "test")
    assert rotation_splits(["test", "train"]) == ("train", "test")
    for bad in (["training"], "yes", 1):
        with pytest.raises(ConfigError, match=r"data.rotations must be true, false or a list of splits"):
            rotation_splits(bad)


# ---------------------------------------------------------------- affine distortions


def blob(n: int = 6, size: int = 28) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, 9:19, 11:17] = 255
    return x


def test_affine_distortions_are_seeded_per_image_and_keep_the_ink():
    koch = AugmentConfig(enabled=True, crop_padding=0, flip=False, color_jitter=0.0,
                         affine=AffineConfig(rotation=10, shear=0.3, scale=0.2, translate=2, probability=0.5))
    transform = EpisodeTransform(augment=koch)
    x = blob()
    a = transform(x, torch.Generator().manual_seed(3))
    b = transform(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # a run's augmentation is fixed by the sampler's generator (so resumes are exact)
    assert not torch.equal(a, transform(x, torch.Generator().manual_seed(4)))
    assert len({tuple(img.flatten().tolist()) for img in a}) > 1  # each image its own distortion
    ink = a.sum(dim=(1, 2, 3)) / x.float().div(255).sum(dim=(1, 2, 3))
    assert bool(((ink > 0.6) & (ink < 1.5)).all()), ink  # scaled by at most 1.2 per axis, nothing cut off

    still = AugmentConfig(enabled=True, crop_padding=0, flip=False, color_jitter=0.0, affine=AffineConfig())
    assert torch.equal(EpisodeTransform(augment=still)(x, torch.Generator()), x.float() / 255)


def test_affine_translation_moves_the_ink_by_at_most_its_range():
    cfg = AugmentConfig(enabled=True, crop_padding=0, flip=False, color_jitter=0.0,
                        affine=AffineConfig(translate=3, probability=1.0))
    x = blob(32)
    moved = EpisodeTransform(augment=cfg)(x, torch.Generator().manual_seed(0))
    rows = torch.arange(28.0)

    def centre(img: torch.Tensor) -> torch.Tensor:
        w = img[0]
        return torch.stack([(w.sum(1) * rows).sum(), (w.sum(0) * rows).sum()]) / w.sum()

    shifts = torch.stack([centre(m) - centre(x[0].float()) for m in moved])
    assert shifts.abs().max() <= 3.01 and shifts.abs().max() > 0.5


@pytest.mark.parametrize("key, value, message", [
    ("rotation", 200, r"data.augment.affine.rotation must be in \[0, 180\)"),
    ("shear", -0.1, r"data.augment.affine.shear must be in \[0, 1\)"),
    ("scale", 1.0, r"data.augment.affine.scale must be in \[0, 1\)"),
    ("translate", -1, r"data.augment.affine.translate must be in >= 0"),
    ("probability", 1.5, r"data.augment.affine.probability must be in \[0, 1\]"),
])
def test_affine_ranges_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=message):
        check_augment(AugmentConfig(affine=AffineConfig(**{key: value})))


# ---------------------------------------------------------------- within-group episodes


GROUPED = [f"{group}/c{c}" for group, size in (("A", 6), ("B", 3), ("C", 5)) for c in range(size)]


def test_within_group_episodes_draw_every_class_of_a_task_from_one_eligible_group():
    store = square_store(classes=len(GROUPED), names=GROUPED)
    groups = [name.split("/")[0] for name in GROUPED]
    batch = store.sampler(4, 1, 2, 64, 0, within_group=True).sample()
    drawn = [{groups[c] for c in row.tolist()} for row in batch.classes]
    assert all(len(d) == 1 for d in drawn)
    assert {g for d in drawn for g in d} == {"A", "C"}  # B has 3 < ways classes: never drawn
    assert all(len(set(row.tolist())) == 4 for row in batch.classes)
    # The plain sampler mixes groups.
    plain = store.sampler(4, 1, 2, 64, 0).sample()
    assert any(len({groups[c] for c in row.tolist()}) > 1 for row in plain.classes)
    # Rotated classes stay in their class's group.
    rotated = square_store(classes=len(GROUPED), names=GROUPED).rotate_classes()
    assert rotated.groups_of_classes()[:4] == ["A"] * 4
    # Classes without groups (flat names) stay alone when turned: their turns are no group.
    with pytest.raises(DataError, match="no group of the train split"):
        square_store().rotate_classes().check_groups("train", 2)
    store.check_groups("train", 6)
    with pytest.raises(DataError, match=r"no group of the val split has that many \(3 groups; the largest, A, has 6\)"):
        store.check_groups("val", 7)


def test_dataset_groups_override_the_names():
    store = square_store(classes=4, names=["w", "x", "y", "z"])
    store.class_groups = ["vehicles", "animals", "vehicles", "animals"]
    batch = store.sampler(2, 1, 1, 32, 0, within_group=True).sample()
    assert all(sorted(row.tolist()) in ([0, 2], [1, 3]) for row in batch.classes)


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def alphabet_tree(tmp_path_factory):
    """An imagefolder tree of two 'alphabets' (6 and 5 classes of 6 28x28 'characters') and a small third one."""
    root = tmp_path_factory.mktemp("alphabets") / "tree"
    rng = np.random.default_rng(0)
    for group, classes in (("Alpha", 6), ("Beta", 5), ("Gamma", 6), ("Delta", 2)):
        for c in range(classes):
            folder = root / group / f"character{c:02d}"
            folder.mkdir(parents=True)
            pattern = rng.random((7, 7)) > 0.5
            for i in range(6):
                img = np.kron(pattern, np.ones((4, 4))).astype(np.uint8) * 255
                img = np.roll(img, (rng.integers(-1, 2), rng.integers(-1, 2)), axis=(0, 1))
                Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    return root


def test_rotations_affine_and_within_group_episodes_in_a_real_run(cli, tmp_path, alphabet_tree):
    """A run on one's own folders with every option: rotations of the training classes only (counted in the
    checkpoint's problem), Koch's distortions, within-group training, validation and test episodes."""
    run = tmp_path / "run"
    args = [a for a in cli.FAST if not a.startswith(("data=", "data.split_sizes"))] + [
        "data=imagefolder", f"data.path={alphabet_tree}", "data.image_size=28", "data.channels=1",
        "data.train=[Alpha,Delta]", "data.val=[Beta]", "data.test=[Gamma]", "data.rotations=[train]",
        "data.augment.enabled=true", "data.augment.crop_padding=0", "data.augment.flip=false",
        "data.augment.color_jitter=0", "data.augment.affine.rotation=10", "data.augment.affine.shear=0.3",
        "data.augment.affine.scale=0.2", "data.augment.affine.translate=2",
        "ways=5", "eval.ways=5", "queries=2", "eval.queries=2", "within_group=true", "eval.within_group=true",
        f"hydra.run.dir={run}",
    ]
    proc = cli.run(["train", *args], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((run / "results.json").read_text())
    assert results["episode"]["within_group"] is True
    assert math.isfinite(results["test"]["accuracy"]["mean"])
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False, map_location="cpu")
    assert ckpt["problem"]["num_train_classes"] == 4 * 8  # Alpha's 6 and Delta's 2 characters, four turns each


@pytest.mark.parametrize("overrides, message", [
    (["within_group=true"], "within_group episodes need a group of at least ways=5 classes, and no group of the train split"),
    (["eval.within_group=true", "data=sinusoid", "backbone=mlp"], "eval.within_group=true draws an episode's classes from one group, "
                                                  "and data=sinusoid has no classes to group"),
    (["data.rotations=[training]"], "data.rotations must be true, false or a list of splits"),
])
def test_option_mistakes_are_one_line_errors(cli, tmp_path, overrides, message):
    tiny = [a for a in cli.TINY if not a.startswith(("data.", "backbone."))] if "data=sinusoid" in overrides else cli.TINY
    proc = cli.run(["train", *cli.with_overrides(tiny, *overrides)], tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], cli.describe(proc)


# ---------------------------------------------------------------- the gain, on glyphs


@pytest.mark.slow  # about a minute on an idle 2-core machine; the sampler tests above check the mechanism
def test_rotations_of_few_training_classes_help_protonet_generalise(learning):
    """With 8 training glyphs, their turns as 24 more classes raise ProtoNet's test accuracy on new glyphs
    (measured: +7 and +11 points for seeds 0 and 1 at 150 steps; asserted: a clear gain at 100)."""
    from metalearn.data import load_splits
    from metalearn.engine import set_transforms

    def accuracy(rotations) -> float:
        cfg = learning.config("protonet", steps=100)
        cfg.data.split_sizes = [8, 5, 50]
        cfg.data.rotations = rotations
        stores = load_splits(cfg.data)
        set_transforms(cfg.data, stores)
        return learning.run(cfg, stores)[1]

    plain, rotated = accuracy(False), accuracy(["train"])
    assert rotated > plain + 0.03, (plain, rotated)


def test_eval_scores_within_group_episodes_and_joins_rotated_splits(cli, tmp_path, alphabet_tree):
    """metalearn eval within_group=true scores a run on within-group episodes; split=all joins a lazily rotated
    training split (turned) with the others."""
    run = tmp_path / "run"
    args = [a for a in cli.TINY if not a.startswith(("data=", "data.split_sizes"))] + [
        "data=imagefolder", f"data.path={alphabet_tree}", "data.image_size=28", "data.channels=1",
        "data.train=[Alpha,Delta]", "data.val=[Beta]", "data.test=[Gamma]", "data.rotations=true",
        "ways=5", "eval.ways=5", "queries=2", "eval.queries=2", "algo=protonet", f"hydra.run.dir={run}",
    ]
    proc = cli.run(["train", *args], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    proc = cli.run(["eval", f"run={run}", "within_group=true", "episodes=8"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    proc = cli.run(["eval", f"run={run}", "episodes=8"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    written = {p.name: json.loads(p.read_text()) for p in run.glob("eval-*.json")}
    assert len(written) == 2 and sum(bool(r["episode"].get("within_group")) for r in written.values()) == 1
    proc = cli.run(["eval", f"run={run}", "tta=4"], tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip() == "metalearn: error: tta=4 sets no option; tta is a group of " \
        "keys: tta.views=4", cli.describe(proc)
    proc = cli.run(["eval", f"run={run}", "split=all", "episodes=4", "ways=20"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    proc = cli.run(["eval", f"run={run}", "split=all", "within_group=true", "ways=30"], tmp_path)
    assert proc.returncode != 0 and "no group of the all split has that many (4 groups; the largest, Alpha, has 24)" in proc.stderr, \
        cli.describe(proc)
