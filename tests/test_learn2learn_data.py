"""metalearn.learn2learn.data and vision.benchmarks: learn2learn's meta-datasets, Taskset, task transforms and
get_tasksets, over plain datasets and over metalearn's stores (glyphs offline; the real small Omniglot
subsets when the shared data is here); a prototypical network learns from get_tasksets('glyphs')."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from metalearn.data.episodes import ClassStore
from metalearn.errors import ConfigError
from metalearn.learn2learn._errors import InvalidArgument, Unsupported
from metalearn.learn2learn.data import (
    DataDescription, FilteredMetaDataset, InfiniteIterator, MetaDataset, OnDeviceDataset, StoreDataset, TaskDataset,
    Taskset, UnionMetaDataset, partition_task,
)
from metalearn.learn2learn.data.transforms import (
    ConsecutiveLabels, FilterLabels, FusedNWaysKShots, KShots, LoadData, NWays, RemapLabels,
)
from metalearn.learn2learn.vision.benchmarks import (
    BenchmarkTasksets, Lee2019, RandomClassRotation, get_tasksets, list_tasksets, pixels,
)

SHARED = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
#: A small glyphs set (40/10/10 characters of 20 drawings), drawn once per process (get_tasksets caches it).
GLYPHS = {"split_sizes": [40, 10, 10]}


class Plain(Dataset):
    """A dataset MetaDataset can only read sample by sample (tensor labels, counted)."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def toy(labels_per_class: int = 6, classes: int = 10) -> TensorDataset:
    """Samples x = [index, label] (so a task shows which samples it holds), labels interleaved."""
    y = torch.arange(classes).repeat(labels_per_class)
    x = torch.stack([torch.arange(len(y)), y], dim=1).float()
    return TensorDataset(x, y)


def store(classes: int = 12, per_class: int = 5, size: int = 8) -> ClassStore:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ClassStore(images, labels, [f"c{i}" for i in range(classes)])


def pipeline(d, n, k):
    return [NWays(d, n), KShots(d, k), LoadData(d), RemapLabels(d), ConsecutiveLabels(d)]


def test_metadataset_label_maps_bulk_and_sample_by_sample():
    tds = toy(labels_per_class=3, classes=4)  # labels 0 1 2 3 0 1 2 3 0 1 2 3
    meta = MetaDataset(tds)
    assert meta.labels == [0, 1, 2, 3]
    assert meta.labels_to_indices[2] == [2, 6, 10]
    assert meta.indices_to_labels == {i: i % 4 for i in range(12)}
    assert len(meta) == 12 and torch.equal(meta[5][0], tds[5][0])
    plain = Plain(*tds.tensors)
    scanned = MetaDataset(plain)
    assert plain.reads == 12 and dict(scanned.labels_to_indices) == dict(meta.labels_to_indices)
    assert isinstance(scanned.indices_to_labels[0], int)  # tensor labels keyed by .item()
    # Bulk through Subset, ConcatDataset and another MetaDataset: no sample read.
    counted = Plain(*tds.tensors)
    assert MetaDataset(Subset(tds, [1, 2, 5])).labels_to_indices == {1: [0, 2], 2: [1]}
    assert MetaDataset(ConcatDataset([tds, tds])).labels_to_indices[3] == [3, 7, 11, 15, 19, 23]
    assert MetaDataset(meta).labels == [0, 1, 2, 3] and counted.reads == 0
    # Either map given: the other derived from it, nothing read.
    given = MetaDataset(counted, labels_to_indices={"a": [0, 2], "b": [1]})
    assert given.indices_to_labels == {0: "a", 2: "a", 1: "b"} and given.labels == ["a", "b"] and counted.reads == 0
    given = MetaDataset(counted, indices_to_labels={0: 7, 1: 8, 2: 7})
    assert dict(given.labels_to_indices) == {7: [0, 2], 8: [1]}


def test_metadataset_bookkeeping_is_cached(tmp_path):
    plain = Plain(*toy(classes=3).tensors)
    plain._bookkeeping_path = str(tmp_path / "book.pkl")
    first = MetaDataset(plain)
    reads = plain.reads
    again = MetaDataset(plain)
    assert plain.reads == reads and again.labels_to_indices == first.labels_to_indices and again.labels == [0, 1, 2]


def test_metadataset_over_a_classstore_reads_no_image(monkeypatch):
    s = store()

    def refuse(self, i):
        raise AssertionError("an image was read to build the label maps")
    with monkeypatch.context() as m:
        m.setattr(StoreDataset, "__getitem__", refuse)
        meta = MetaDataset(s)
    assert meta.labels == list(range(12)) and meta.labels_to_indices[3] == [15, 16, 17, 18, 19]
    assert meta.indices_to_labels[59] == 11
    x, y = meta[17]
    assert y == 3 and x.dtype == torch.float32 and torch.equal(x, s.images[17].float() / 255)
    assert meta.dataset.class_names[y] == "c3"


def test_union_and_filtered_metadatasets():
    a, b = MetaDataset(toy(labels_per_class=2, classes=3)), toy(labels_per_class=4, classes=2)
    union = UnionMetaDataset([a, b])
    assert len(union) == 6 + 8 and union.labels == [0, 1, 2, 3, 4]
    assert union.labels_to_indices[3] == [6, 8, 10, 12]  # b's label 0, after a's 3 labels and 6 samples
    x, y = union[9]
    assert y == 4 and torch.equal(x, b[3][0])
    assert union[-1][1] == union.indices_to_labels[13]
    filtered = FilteredMetaDataset(toy(labels_per_class=3, classes=5), [4, 1])
    assert filtered.labels == [4, 1] and len(filtered) == 6
    assert filtered.labels_to_indices == {4: [0, 1, 2], 1: [3, 4, 5]}
    assert [int(filtered[i][1]) for i in range(6)] == [4, 4, 4, 1, 1, 1]  # labels keep their values
    with pytest.raises(InvalidArgument, match="not a label"):
        FilteredMetaDataset(a, [0, 9])


def test_task_transforms_behave_as_documented():
    random.seed(0)
    d = MetaDataset(toy(labels_per_class=6, classes=10))
    labels = lambda desc: [d.indices_to_labels[dd.index] for dd in desc]  # noqa: E731
    desc = NWays(d, n=3)(None)
    assert len(set(labels(desc))) == 3 and len(desc) == 18 and all(isinstance(dd, DataDescription) for dd in desc)
    desc = NWays(d, n=2)(desc)
    assert len(set(labels(desc))) == 2 and len(desc) == 12
    desc = KShots(d, k=4)(desc)
    assert sorted(labels(desc).count(c) for c in set(labels(desc))) == [4, 4] and len({dd.index for dd in desc}) == 8
    heavy = KShots(d, k=9, replacement=True)(NWays(d, n=2)(None))
    assert len(heavy) == 18 and len({id(dd) for dd in heavy}) == 18  # copies: each its own transforms
    with pytest.raises(InvalidArgument, match="replacement=True"):
        KShots(d, k=7)(NWays(d, n=2)(None))
    with pytest.raises(ValueError, match="lower n"):
        NWays(d, n=11)(None)
    assert set(labels(FilterLabels(d, [2, 5])(None))) == {2, 5}
    fused = FusedNWaysKShots(d, n=2, k=3, filter_labels=[1, 3, 8])
    for _ in range(5):
        desc = fused(None)
        assert len(desc) == 6 and set(labels(desc)) <= {1, 3, 8} and len(set(labels(desc))) == 2
    # LoadData, RemapLabels, ConsecutiveLabels: labels 0..N-1, k of each, in order.
    taskset = Taskset(d, pipeline(d, 5, 3))
    for _ in range(5):
        x, y = taskset.sample()
        assert x.shape == (15, 2) and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
        assert len(x[:, 1].unique()) == 5 and all(len(x[y == c, 1].unique()) == 1 for c in range(5))
        assert len(x[:, 0].unique()) == 15  # distinct samples
    # ConsecutiveLabels before RemapLabels: each label's samples together, labels in no particular order.
    before = Taskset(d, [NWays(d, 4), KShots(d, 2), LoadData(d), ConsecutiveLabels(d), RemapLabels(d)])
    orders = set()
    for _ in range(20):
        y = before.sample()[1].tolist()
        assert all(y[i] == y[i + 1] for i in range(0, 8, 2)) and sorted(set(y)) == [0, 1, 2, 3]
        orders.add(tuple(y[::2]))
    assert len(orders) > 1
    # shuffle=False: new labels in the order of the dataset's labels.
    plain = Taskset(d, [FilterLabels(d, [7, 2, 9]), LoadData(d), RemapLabels(d, shuffle=False)])
    x, y = plain.sample()
    assert {(int(a), int(b)) for a, b in zip(x[:, 1], y)} == {(2, 0), (7, 1), (9, 2)}
    with pytest.raises(InvalidArgument, match="LoadData before"):
        Taskset(d, [NWays(d, 2), RemapLabels(d), LoadData(d)]).sample()


def test_random_class_rotation_turns_each_class_one_way():
    random.seed(0)
    s = store(classes=6, per_class=4)
    d = MetaDataset(s)
    taskset = Taskset(d, [NWays(d, 6), KShots(d, 4), LoadData(d), RandomClassRotation(d, [0, 90, 180, 270])], 30)
    seen = set()
    for i in range(30):
        x, y = taskset[i]
        description = taskset.sampled_descriptions[i]
        for c in y.unique():
            turns = {dd.transforms[-1].turns for dd, label in zip(description, y) if label == c}
            assert len(turns) == 1  # one rotation per class
            seen |= turns
        for j, dd in enumerate(description):
            assert torch.equal(x[j], torch.rot90(s.images[dd.index].float() / 255, dd.transforms[-1].turns, (-2, -1)))
    assert seen == {0, 1, 2, 3}
    with pytest.raises(NotImplementedError, match="multiples of 90"):
        RandomClassRotation(d, [0, 45])


def test_taskset_caches_by_index_and_is_seeded_by_random():
    d = MetaDataset(toy(labels_per_class=6, classes=10))
    fixed = Taskset(d, pipeline(d, 3, 2), num_tasks=5)
    assert len(fixed) == 5 and TaskDataset is Taskset
    first = fixed[2]
    for _ in range(3):
        again = fixed[2]
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert torch.equal(fixed[-3][0], first[0])
    assert len(list(fixed)) == 5 and len(fixed.sampled_descriptions) == 5
    with pytest.raises(IndexError):
        fixed[5]
    endless = Taskset(d, pipeline(d, 3, 2))
    assert len(endless) == 1
    assert len({tuple(endless[0][0][:, 0].tolist()) for _ in range(10)}) > 1  # a new task each access

    def draws(seed):
        random.seed(seed)
        ts = Taskset(d, pipeline(d, 3, 2), num_tasks=4)
        return [ts.sample()[0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(draws(3), draws(3)))
    assert not all(torch.equal(a, b) for a, b in zip(draws(3), draws(4)))
    # NWays then KShots are drawn together: the same description as applying them in turn.
    for replacement in (False, True):
        random.seed(5)
        fused = Taskset(d, [NWays(d, 4), KShots(d, 3, replacement)]).sample_task_description()
        random.seed(5)
        by_hand = KShots(d, 3, replacement)(NWays(d, 4)(None))
        assert [dd.index for dd in fused] == [dd.index for dd in by_hand]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_tasks"):
            Taskset(d, num_tasks=bad)
    with pytest.raises(NotImplementedError, match="UnionMetaDataset"):
        fixed + fixed


def test_five_way_one_shot_tasks_from_five_thousand_images():
    """Drawn repeatedly from a large set (speed is a benchmark's business, not a test's: about 0.3 ms a task here)."""
    d = MetaDataset(store(classes=250, per_class=20, size=28))  # 5000 images
    taskset = Taskset(d, pipeline(d, 5, 1))
    taskset.sample()
    start = time.perf_counter()
    for _ in range(200):
        x, y = taskset.sample()
    per_task = (time.perf_counter() - start) / 200
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]
    print(f"{per_task * 1e3:.2f} ms per task")


def test_partition_task_splits_each_label_first_shots():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1])  # 3 labels, 4 samples each
    x = torch.arange(12.0)[:, None].expand(12, 3)
    (sx, sy), (qx, qy) = partition_task(x, y, shots=1)
    assert sx.shape == (3, 3) and qx.shape == (9, 3) and sy.tolist() == [0, 1, 2]
    assert qy.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert sx[:, 0].tolist() == [1, 2, 0]  # the first sample of each label
    assert qx[:3, 0].tolist() == [3, 7, 10]
    (sx, sy), (qx, qy) = partition_task(x, y, shots=3)
    assert sy.tolist() == [0] * 3 + [1] * 3 + [2] * 3 and qy.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="same number"):
        partition_task(x[:11], y[:11])
    with pytest.raises(ValueError, match="shots=5"):
        partition_task(x, y, shots=5)


def test_infinite_iterator_and_on_device_dataset():
    batches = InfiniteIterator([1, 2, 3])
    assert [next(batches) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    ondevice = OnDeviceDataset(StoreDataset(store(classes=3, per_class=2)), transform=lambda v: v * 2)
    x, y = ondevice[3]
    assert x.shape == (1, 8, 8) and float(x.max()) <= 2.0 and int(y) == 1
    assert MetaDataset(ondevice).labels_to_indices == {0: [0, 1], 1: [2, 3], 2: [4, 5]}


def test_glyphs_benchmark_shapes_labels_and_disjoint_splits():
    assert list_tasksets()[:5] == ["omniglot", "mini-imagenet", "tiered-imagenet", "fc100", "cifarfs"]
    assert {"cub", "doublemnist", "mnist", "glyphs"} <= set(list_tasksets())
    tasksets = get_tasksets("glyphs", train_ways=4, train_samples=3, test_ways=5, test_samples=6, config=GLYPHS)
    assert isinstance(tasksets, BenchmarkTasksets) and tasksets._fields == ("train", "validation", "test")
    for taskset, ways, samples in ((tasksets.train, 4, 3), (tasksets.validation, 5, 6), (tasksets.test, 5, 6)):
        x, y = taskset.sample()
        assert x.shape == (ways * samples, 1, 28, 28) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
        assert y.tolist() == [c for c in range(ways) for _ in range(samples)]
    names = [set(t.dataset.dataset.class_names) for t in tasksets]
    assert [len(n) for n in names] == [40, 10, 10]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    # Other spellings, the cache (no second generation), num_tasks and device.
    fixed = get_tasksets("Glyphs", num_tasks=3, config=GLYPHS, device="cpu")
    assert fixed.train.dataset.dataset.store is not tasksets.train.dataset.dataset.store  # moved: a copy
    assert len(fixed.test) == 3 and torch.equal(fixed.test[1][0], fixed.test[1][0])
    assert fixed.train.sample()[0].shape == (50, 1, 28, 28)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_puts_images_and_labels_on_the_device():
    tasksets = get_tasksets("glyphs", num_tasks=2, config=GLYPHS, device="cuda")
    x, y = tasksets.validation[1]
    assert x.device.type == "cuda" and y.device.type == "cuda" and y.tolist() == [c for c in range(5) for _ in range(10)]
    assert tasksets.train.dataset.dataset.store.images.device.type == "cuda"
    assert get_tasksets("glyphs", config=GLYPHS).train.dataset.dataset.store.images.device.type == "cpu"


def test_benchmark_errors_are_one_line():
    with pytest.raises(InvalidArgument) as e:
        get_tasksets("imagenet-1k")
    assert "\n" not in str(e.value) and "omniglot, mini-imagenet" in str(e.value) and "glyphs" in str(e.value)
    with pytest.raises(ConfigError, match="lower test_ways"):
        get_tasksets("glyphs", test_ways=11, config=GLYPHS)
    with pytest.raises(ValueError, match="lower train_samples"):
        get_tasksets("glyphs", train_samples=21, config=GLYPHS)
    with pytest.raises(Unsupported, match="data.augment"):
        get_tasksets("glyphs", data_augmentation="lee2019", config=GLYPHS)
    with pytest.raises(InvalidArgument, match="data_augmentation="):
        get_tasksets("glyphs", shuffle=True)
    with pytest.raises(InvalidArgument, match="omniglot_small"):
        get_tasksets("omniglot", config="omniglot_tiny")
    with pytest.raises(ConfigError, match="unknown option data.split_size"):
        get_tasksets("glyphs", config={"split_size": [3, 3, 3]})


def test_imagenet_pixel_conventions():
    image = torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8)
    assert torch.equal(pixels(image), image.float())  # learn2learn's mini-ImageNet: 0..255
    random.seed(0)
    first = Lee2019(augment=True)(image)
    random.seed(0)
    assert first.shape == (3, 84, 84) and torch.equal(first, Lee2019(augment=True)(image))
    plain = Lee2019(augment=False)(image)
    mean = torch.tensor([120.39586422, 115.59361427, 104.54012653]).view(3, 1, 1)
    std = torch.tensor([70.68188272, 68.27635443, 72.54505529]).view(3, 1, 1)
    assert torch.allclose(plain, (image.float() - mean) / std, atol=1e-5)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """A data root holding a copy of one real small Omniglot zip (extracted and cached beside it)."""
    if not (SHARED / "images_background_small1.zip").is_file():
        pytest.skip(f"shared Omniglot subsets not found at {SHARED}")
    root = tmp_path_factory.mktemp("data")
    (root / "omniglot").mkdir()
    shutil.copy(SHARED / "images_background_small1.zip", root / "omniglot")
    return root


def test_omniglot_benchmark_on_a_real_small_subset(shared_root):
    # One of the two small subsets (5 alphabets), split by alphabet: half the decoding of omniglot_small.
    config = {"archives": ["images_background_small1"], "download": False,
              "train": ["Balinese", "Greek", "Korean"], "val": ["Early_Aramaic"], "test": ["Latin"]}
    tasksets = get_tasksets("omniglot", train_ways=5, train_samples=2, test_ways=3, test_samples=4, num_tasks=20,
                            root=str(shared_root), config=config)
    x, y = tasksets.train[0]
    assert x.shape == (10, 1, 28, 28) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert tasksets.test.sample()[0].shape == (12, 1, 28, 28)
    alphabets = [{n.split("/")[0] for n in t.dataset.dataset.class_names} for t in tasksets]
    assert alphabets == [{"Balinese", "Greek", "Korean"}, {"Early_Aramaic"}, {"Latin"}]
    # Characters, not rotated copies, are the classes; each task turns each of its classes one way.
    train = tasksets.train
    s = train.dataset.dataset.store
    assert not any("rot" in n for n in s.class_names)
    turns = set()
    for i in range(20):
        x, y = train[i]
        for j, dd in enumerate(train.sampled_descriptions[i]):
            k = dd.transforms[-1].turns
            turns.add(k)
            assert torch.equal(x[j], torch.rot90(s.images[dd.index].float() / 255, k, (-2, -1)))
    assert turns == {0, 1, 2, 3}
    # Ink 1 on 0, as learn2learn's 1 - ToTensor gives.
    assert int(s.images.max()) == 255 and float(x.min()) == 0.0 and float(x.max()) > 0.5
    assert float((x > 0.5).float().mean()) < 0.3
    with pytest.raises(NotImplementedError, match="RandomClassRotation"):
        get_tasksets("omniglot", root=str(shared_root), config={**config, "rotations": True})


def test_prototypical_network_learns_on_glyphs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        random.seed(0)
        torch.manual_seed(0)
        tasksets = get_tasksets("glyphs", train_ways=5, train_samples=6, test_ways=5, test_samples=6, config=GLYPHS)
        net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, 64))
        optimizer = torch.optim.Adam(net.parameters(), 3e-3)

        def episode(taskset):
            x, y = taskset.sample()
            (sx, sy), (qx, qy) = partition_task(x, y, shots=1)
            z = net(torch.cat([sx, qx]))
            prototypes = torch.stack([z[: len(sx)][sy == c].mean(0) for c in range(5)])
            logits = -torch.cdist(z[len(sx):], prototypes).pow(2)
            return F.cross_entropy(logits, qy), (logits.argmax(1) == qy).float().mean().item()

        def test_accuracy():
            random.seed(1)  # the same 50 test tasks before and after training
            with torch.no_grad():
                return sum(episode(tasksets.test)[1] for _ in range(50)) / 50

        before = test_accuracy()
        for _ in range(200):
            loss, _ = episode(tasksets.train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = test_accuracy()
    finally:
        torch.set_num_threads(threads)
    # 5-way 1-shot on unseen characters: chance is 0.2; measured 0.32 before and 0.62 after training.
    assert after > 0.45 and after > before + 0.15, (before, after)
