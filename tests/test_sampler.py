"""ClassStore and EpisodeSampler (the episode batches every algorithm sees), and the glyphs dataset.

Most checks run on an "identity" store whose every image is filled with its own
index, so a sampled image can be mapped back to the exact source image and its
class. The store's classes have unequal image counts and the images are given
in a shuffled class order, so grouping by class and the per-class offsets and
counts are exercised too.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metalearn.data import glyphs
from metalearn.data.episodes import ClassStore, EpisodeSampler, TaskBatch
from metalearn.errors import DataError

# Images per class: unequal, the smallest is exactly shots + queries of the default episode.
COUNTS = [5, 9, 6, 12, 5, 7, 8, 5, 10, 6, 11, 5]
WAYS, SHOTS, QUERIES, BATCH = 5, 2, 3, 16
IMAGE = (1, 3, 2)  # C, H, W: tiny and not square


def identity_store(counts=COUNTS, seed: int = 0) -> tuple[ClassStore, torch.Tensor]:
    """A store whose image i is filled with the value i; returns it and the class of each index."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    assert len(labels) < 256
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, *IMAGE).contiguous()
    names = [f"class{c:02d}" for c in range(len(counts))]
    return ClassStore(images, labels, names), labels


def image_ids(x: torch.Tensor) -> torch.Tensor:
    """[..., C, H, W] float images of the identity store -> [...] source indices (checks each is constant)."""
    v = (x * 255).round()
    flat = v.flatten(-3)
    assert torch.equal(flat, flat[..., :1].expand_as(flat)), "an image is not one of the store's images"
    assert torch.allclose(x * 255, v, atol=1e-4)
    return flat[..., 0].long()


def sampler(store: ClassStore, seed: int = 0, ways=WAYS, shots=SHOTS, queries=QUERIES, batch=BATCH) -> EpisodeSampler:
    return EpisodeSampler(store, ways, shots, queries, batch, seed)


def assert_same(a: TaskBatch, b: TaskBatch) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def batches_equal(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("support_x", "support_y", "query_x", "query_y", "classes"))


# ---------------------------------------------------------------- ClassStore


def test_store_groups_images_by_class():
    store, labels = identity_store()
    assert store.num_classes == len(COUNTS) and len(store) == sum(COUNTS)
    assert store.input_shape == IMAGE and store.max_count == max(COUNTS)
    assert store.counts.tolist() == COUNTS
    for c, n in enumerate(COUNTS):
        block = store.images[store.offsets[c] : store.offsets[c] + n]
        ids = block[:, 0, 0, 0].long()
        assert (labels[ids] == c).all()
        assert sorted(ids.tolist()) == sorted(torch.nonzero(labels == c).flatten().tolist())


def test_store_rejects_non_uint8():
    with pytest.raises(ValueError):
        ClassStore(torch.zeros(4, 1, 2, 2), torch.zeros(4), ["a"])
    with pytest.raises(ValueError):
        ClassStore(torch.zeros(4, 2, 2, dtype=torch.uint8), torch.zeros(4), ["a"])


# ---------------------------------------------------------------- EpisodeSampler


def test_shapes_and_dtypes():
    store, _ = identity_store()
    b = sampler(store).sample()
    assert b.support_x.shape == (BATCH, WAYS * SHOTS, *IMAGE)
    assert b.query_x.shape == (BATCH, WAYS * QUERIES, *IMAGE)
    assert b.support_y.shape == (BATCH, WAYS * SHOTS) and b.query_y.shape == (BATCH, WAYS * QUERIES)
    assert b.classes.shape == (BATCH, WAYS)
    assert b.support_x.dtype == b.query_x.dtype == torch.float32
    assert b.support_y.dtype == b.query_y.dtype == b.classes.dtype == torch.long
    for x in (b.support_x, b.query_x):
        assert x.min() >= 0 and x.max() <= 1
    assert b.num_tasks == BATCH and b.ways == WAYS


def test_labels_balanced():
    store, _ = identity_store()
    s = sampler(store)
    for _ in range(3):
        b = s.sample()
        for y, k in ((b.support_y, SHOTS), (b.query_y, QUERIES)):
            assert y.min() >= 0 and y.max() < WAYS
            counts = torch.stack([torch.bincount(row, minlength=WAYS) for row in y])
            assert (counts == k).all()


def test_examples_belong_to_their_labelled_class_and_are_distinct():
    store, labels = identity_store()
    s = sampler(store, batch=64)
    seen = torch.zeros(len(labels), dtype=torch.bool)
    for _ in range(4):
        b = s.sample()
        sid, qid = image_ids(b.support_x), image_ids(b.query_x)
        for t in range(b.num_tasks):
            classes = b.classes[t]
            # the N classes of a task are distinct, valid class indices
            assert len(set(classes.tolist())) == WAYS
            assert classes.min() >= 0 and classes.max() < store.num_classes
            # classes[t, label] is the true class of every example
            assert torch.equal(labels[sid[t]], classes[b.support_y[t]])
            assert torch.equal(labels[qid[t]], classes[b.query_y[t]])
            # no image twice in a task: support and query disjoint, no repeats within either
            ids = torch.cat([sid[t], qid[t]]).tolist()
            assert len(set(ids)) == len(ids) == WAYS * (SHOTS + QUERIES)
            seen[sid[t]] = True
            seen[qid[t]] = True
    # unequal counts: every image of every class gets drawn (the large classes' last images too),
    # and never an image of another class (checked above), i.e. never beyond a class's count
    assert seen.all()


def test_classes_with_exactly_shots_plus_queries_images_use_all_of_them():
    store, labels = identity_store()
    s = sampler(store, batch=64)
    smallest = [c for c, n in enumerate(COUNTS) if n == SHOTS + QUERIES]
    hits = 0
    for _ in range(2):
        b = s.sample()
        ids = torch.cat([image_ids(b.support_x), image_ids(b.query_x)], 1)
        for t in range(b.num_tasks):
            for c in smallest:
                if c in b.classes[t].tolist():
                    mine = ids[t][labels[ids[t]] == c]
                    assert sorted(mine.tolist()) == sorted(torch.nonzero(labels == c).flatten().tolist())
                    hits += 1
    assert hits > 0


def test_last_class_never_reads_past_the_store():
    # The last class (largest offset) is small; any slot past its count would index out of range
    # or, for other classes, read the next class's images.
    counts = [12, 12, 12, 12, 5]
    store, labels = identity_store(counts)
    s = sampler(store, batch=64)
    for _ in range(3):
        b = s.sample()
        sid = image_ids(b.support_x)
        assert torch.equal(labels[sid], torch.gather(b.classes, 1, b.support_y))


def test_order_is_shuffled():
    store, _ = identity_store()
    b = sampler(store, batch=64).sample()
    for y in (b.support_y, b.query_y):
        sorted_rows = (y == y.sort(dim=1).values).all(dim=1)
        assert sorted_rows.float().mean() < 0.5, "labels come out sorted"
        # label 0 does not always sit at the same positions
        assert len({tuple(torch.nonzero(row == 0).flatten().tolist()) for row in y}) > 5
    # the classes behind label 0 vary too (the label order is random, not the class order)
    assert len(set(b.classes[:, 0].tolist())) > 3
    assert not (b.classes.diff(dim=1) > 0).all()


def test_same_seed_same_batches_other_seed_different():
    store, _ = identity_store()
    a, b, c = sampler(store, seed=3), sampler(store, seed=3), sampler(store, seed=4)
    for _ in range(3):
        x, y, z = a.sample(), b.sample(), c.sample()
        assert_same(x, y)
        assert not batches_equal(x, z)
    # and successive batches of one sampler differ
    assert not batches_equal(a.sample(), a.sample())


def test_state_dict_resumes_stream():
    store, _ = identity_store()
    a = sampler(store, seed=7)
    for _ in range(2):
        a.sample()
    state = copy.deepcopy(a.state_dict())
    expected = [a.sample() for _ in range(3)]
    b = sampler(store, seed=123)  # a fresh sampler with another seed
    b.load_state_dict(state)
    for e in expected:
        assert_same(b.sample(), e)
    # the saved state is a snapshot: sampling further did not change it
    c = sampler(store, seed=0)
    c.load_state_dict(state)
    assert_same(c.sample(), expected[0])


def test_taskbatch_indexing_and_to():
    store, _ = identity_store()
    b = sampler(store).sample()
    part = b[2:5]
    assert part.num_tasks == 3
    assert torch.equal(part.support_x, b.support_x[2:5]) and torch.equal(part.classes, b.classes[2:5])
    moved = b.to("cpu")
    assert_same(moved, b)
    assert_same(TaskBatch.cat([b[:3], b[3:4], b[4:]]), b)


def test_one_way_one_shot_and_all_classes():
    store, labels = identity_store()
    b = sampler(store, ways=1, shots=1, queries=1).sample()
    assert (b.support_y == 0).all() and (b.query_y == 0).all()
    b = sampler(store, ways=store.num_classes, shots=1, queries=4).sample()
    assert (b.classes.sort(dim=1).values == torch.arange(store.num_classes)).all()
    assert torch.equal(labels[image_ids(b.query_x)], torch.gather(b.classes, 1, b.query_y))


# ---------------------------------------------------------------- check_episode


def test_check_episode_accepts_what_fits():
    store, _ = identity_store()
    store.check_episode("train", store.num_classes, 1, min(COUNTS) - 1)
    store.check_episode("train", WAYS, SHOTS, QUERIES)


def test_check_episode_too_many_ways():
    store, _ = identity_store()
    with pytest.raises(DataError) as e:
        store.check_episode("val", store.num_classes + 1, 1, 1)
    msg = str(e.value)
    assert f"ways={store.num_classes + 1}" in msg and str(store.num_classes) in msg and "val" in msg


def test_check_episode_too_few_images_names_the_classes():
    store, _ = identity_store()
    need = 7  # classes with 5 or 6 images are too small
    small = [f"class{c:02d}" for c, n in enumerate(COUNTS) if n < need]
    big = [f"class{c:02d}" for c, n in enumerate(COUNTS) if n >= need]
    assert len(small) > 5  # the message lists five and counts the rest
    with pytest.raises(DataError) as e:
        store.check_episode("train", WAYS, 3, need - 3)
    msg = str(e.value)
    assert "shots+queries=7" in msg and "train" in msg and "\n" not in msg
    assert sum(name in msg for name in small) == 5 and f"{len(small) - 5} more" in msg
    assert not any(name in msg for name in big)
    # few small classes: all of them named, with their counts
    store2, _ = identity_store([3, 10, 10, 10, 10, 4])
    with pytest.raises(DataError) as e:
        store2.check_episode("test", 2, 2, 3)
    msg = str(e.value)
    assert "class00 (3)" in msg and "class05 (4)" in msg and "class01" not in msg and "test" in msg


def test_check_episode_too_few_images_uniform():
    store, _ = identity_store([4] * 6)
    with pytest.raises(DataError) as e:
        store.check_episode("train", 5, 1, 4)
    msg = str(e.value)
    assert "shots+queries=5" in msg and "4 images per class" in msg and "train" in msg


@pytest.mark.parametrize("ways,shots,queries", [(0, 1, 1), (2, 0, 1), (2, 1, 0)])
def test_check_episode_nonpositive(ways, shots, queries):
    store, _ = identity_store()
    with pytest.raises(DataError):
        store.check_episode("train", ways, shots, queries)


# ---------------------------------------------------------------- glyphs


def small_glyphs(**overrides) -> glyphs.Config:
    return glyphs.Config(**{"split_sizes": [12, 5, 7], "samples_per_class": 6, **overrides})


@pytest.fixture(scope="module")
def glyph_stores():
    return glyphs.load(small_glyphs())


def test_glyphs_sizes(glyph_stores):
    cfg = small_glyphs()
    sizes = dict(zip(("train", "val", "test"), cfg.split_sizes))
    assert set(glyph_stores) == set(sizes)
    names = []
    for split, n in sizes.items():
        s = glyph_stores[split]
        assert s.num_classes == n and len(s) == n * cfg.samples_per_class
        assert s.counts.tolist() == [cfg.samples_per_class] * n
        assert s.input_shape == (1, cfg.image_size, cfg.image_size)
        assert s.images.dtype == torch.uint8
        names += s.class_names
    assert len(set(names)) == len(names)  # class names unique across splits
    other = glyphs.load(small_glyphs(image_size=20, samples_per_class=3))
    assert other["train"].input_shape == (1, 20, 20) and len(other["val"]) == 5 * 3


def test_glyphs_deterministic(glyph_stores):
    again = glyphs.load(small_glyphs())
    for split, s in glyph_stores.items():
        assert s.images.numpy().tobytes() == again[split].images.numpy().tobytes()
        assert s.class_names == again[split].class_names
        assert torch.equal(s.counts, again[split].counts)


def test_glyphs_seed_changes_data(glyph_stores):
    other = glyphs.load(small_glyphs(generation_seed=1))
    for split, s in glyph_stores.items():
        assert not torch.equal(s.images, other[split].images)
    # and the splits of one dataset are not copies of each other
    a, b = glyph_stores["val"].images, glyph_stores["test"].images[: len(glyph_stores["val"])]
    assert not torch.equal(a, b)


def test_glyphs_ink(glyph_stores):
    for s in glyph_stores.values():
        x = s.images
        assert x.min() == 0 and x.max() == 255
        per_image = x.flatten(1)
        assert (per_image.amax(1) == 255).all()  # every image has full ink (at 28x28)
        assert ((per_image == 0).float().mean(1) > 0.5).all()  # mostly background
    # samples of one class differ (jitter), but are recognisable: 1-nearest-neighbour on blurred
    # pixels finds another sample of the same class far more often than chance (1/12)
    x = glyph_stores["train"].images.float() / 255
    y = torch.arange(12).repeat_interleave(6)
    assert (x.view(12, 6, -1)[:, 0] != x.view(12, 6, -1)[:, 1]).any(dim=1).all()
    d = torch.cdist(*[torch.nn.functional.avg_pool2d(x, 4).flatten(1)] * 2).fill_diagonal_(float("inf"))
    assert (y[d.argmin(1)] == y).float().mean() > 0.25


def test_glyphs_episodes_sample(glyph_stores):
    s = glyph_stores["train"]
    s.check_episode("train", 5, 1, 5)
    b = EpisodeSampler(s, 5, 1, 5, 4, 0).sample()
    assert b.support_x.shape == (4, 5, 1, 28, 28) and b.query_x.shape == (4, 25, 1, 28, 28)
    assert b.support_x.max() == 1.0 and b.support_x.min() == 0.0
    with pytest.raises(DataError):
        s.check_episode("train", 5, 3, 4)  # 7 > 6 images per class
