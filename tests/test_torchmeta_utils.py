"""metalearn.torchmeta beyond the native datasets: the metric/closed-form heads (utils.prototype,
utils.matching, utils.r2d2), the toy regression datasets, the splitters, NonEpisodicWrapper,
one-vs-all tasks, your own ClassDataset subclass end to end, and the helpers of every image dataset.

Each head is checked against a hand-written version of its documented formula; ridge regression
against a least-squares solve in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from metalearn.errors import ConfigError, DataError
from metalearn.torchmeta import Unsupported, InvalidArgument, datasets
from metalearn.torchmeta.datasets import helpers
from metalearn.torchmeta.toy import Harmonic, Sinusoid, SinusoidAndLine
from metalearn.torchmeta.toy.helpers import harmonic, sinusoid, sinusoid_and_line
from metalearn.torchmeta.transforms import Categorical, ClassSplitter, HorizontalFlip, Rotation
from metalearn.torchmeta.transforms.splitters import Splitter, WeightedClassSplitter
from metalearn.torchmeta.utils.data import (
    BatchMetaDataLoader, ClassDataset, CombinationMetaDataset, ConcatTask, MetaDataLoader, NonEpisodicWrapper,
    OneClassSequentialSampler, OneVsAllMetaDataset, SequenceMetaDataset, SubsetTask,
)
from metalearn.torchmeta.utils.matching import matching_log_probas, matching_loss, matching_probas, pairwise_cosine_similarity
from metalearn.torchmeta.utils.prototype import get_num_samples, get_prototypes, prototypical_loss
from metalearn.torchmeta.utils.r2d2 import ridge_regression

#: A small glyphs set (12/4/4 characters of 10 drawings, 8x8): built in well under a second.
GLYPHS = {"split_sizes": [12, 4, 4], "samples_per_class": 10, "image_size": 8}


def episode(batch=3, ways=4, shots=3, dim=5, seed=0, dtype=torch.float64):
    """Support embeddings [B, ways*shots, D] with shuffled labels, every class present."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ways * shots, dim, generator=g, dtype=dtype)
    y = torch.stack([torch.arange(ways).repeat(shots)[torch.randperm(ways * shots, generator=g)] for _ in range(batch)])
    return x, y


# ----------------------------------------------------------------------------- heads

def test_prototypes_are_class_means_and_the_loss_is_cross_entropy_of_squared_distances():
    x, y = episode()
    prototypes = get_prototypes(x, y, 4)
    assert prototypes.shape == (3, 4, 5)
    for b in range(3):
        for k in range(4):
            assert torch.allclose(prototypes[b, k], x[b][y[b] == k].mean(0))
    assert get_num_samples(y, 4).tolist() == [[3] * 4] * 3
    # A class absent from a task gets the zero vector (no division by zero).
    assert torch.equal(get_prototypes(x, y.clamp(max=2), 4)[:, 3], torch.zeros(3, 5, dtype=x.dtype))

    queries, query_y = episode(ways=4, shots=2, seed=1)
    loss = prototypical_loss(prototypes, queries, query_y)
    by_hand = 0.0
    for b in range(3):
        for m in range(8):
            logits = torch.stack([-((queries[b, m] - prototypes[b, k]) ** 2).sum() for k in range(4)])
            by_hand = by_hand - torch.log_softmax(logits, 0)[query_y[b, m]]
    assert torch.allclose(loss, by_hand / 24)
    per_query = prototypical_loss(prototypes, queries, query_y, reduction="none")
    assert per_query.shape == (3, 8) and torch.allclose(per_query.mean(), loss)


def test_matching_probabilities_are_cosine_attention_summed_per_class():
    x, y = episode()
    queries, query_y = episode(shots=2, seed=2)
    similarities = pairwise_cosine_similarity(x, queries)
    assert torch.allclose(similarities, F.cosine_similarity(x.unsqueeze(2), queries.unsqueeze(1), dim=-1))
    probas = matching_probas(x, y, queries, 4)
    assert probas.shape == (3, 4, 8)
    assert torch.allclose(probas.sum(1), torch.ones(3, 8, dtype=x.dtype))
    for b in range(3):
        for m in range(8):
            attention = torch.softmax(F.cosine_similarity(x[b], queries[b, m : m + 1]), 0)
            expected = torch.stack([attention[y[b] == k].sum() for k in range(4)])
            assert torch.allclose(probas[b, :, m], expected)
    log_probas = matching_log_probas(x, y, queries, 4)
    assert torch.allclose(log_probas.exp(), probas)
    loss = matching_loss(x, y, queries, query_y, 4)
    assert torch.allclose(loss, -probas.gather(1, query_y.unsqueeze(1)).log().mean())
    # Zero vectors stay finite (eps), as do large similarities (log-sum-exp shift).
    zero = torch.zeros(1, 2, 5, dtype=x.dtype)
    assert torch.isfinite(matching_log_probas(zero, torch.tensor([[0, 1]]), 100 * queries[:1], 2)).all()


def ridge_by_lstsq(x, y, lam, bias, scale):
    """argmin ||X W - Y||^2 + lam ||W||^2 as the least-squares solution of [X; sqrt(lam) I] W = [Y; 0]."""
    n = x.shape[0]
    if bias:
        x = torch.cat([torch.ones(n, 1, dtype=x.dtype), x], 1)
    if scale:
        x, y = x / math.sqrt(n), y / math.sqrt(n)
    a = torch.cat([x, math.sqrt(lam) * torch.eye(x.shape[1], dtype=x.dtype)])
    b = torch.cat([y, torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype)])
    w = torch.linalg.lstsq(a, b).solution
    return (w[1:].T, w[0]) if bias else (w.T, None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_ridge_regression_matches_a_least_squares_solve_with_and_without_woodbury(bias, scale):
    # few samples, many features (Woodbury's case) and the opposite
    for n, dim in [(6, 20), (30, 4)]:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, n, dim, generator=g, dtype=torch.float64)
        labels = torch.randint(3, (2, n), generator=g)
        for b in range(2):
            expected_w, expected_b = ridge_by_lstsq(x[b], F.one_hot(labels[b], 3).double(), 0.5, bias, scale)
            for woodbury in (True, False, None):
                solution = ridge_regression(x[b], labels[b], 0.5, num_classes=3, use_woodbury=woodbury, scale=scale, bias=bias)
                assert solution.weight.shape == (3, dim) and torch.allclose(solution.weight, expected_w, atol=1e-10)
                if bias:
                    assert solution.bias.shape == (3,) and torch.allclose(solution.bias, expected_b, atol=1e-10)
                else:
                    assert solution.bias is None
        # A batch of tasks gives each task's solution; F.linear applies one.
        batched = ridge_regression(x, labels, 0.5, num_classes=3, scale=scale, bias=bias)
        single = ridge_regression(x[1], labels[1], 0.5, num_classes=3, scale=scale, bias=bias)
        assert batched.weight.shape == (2, 3, dim) and torch.allclose(batched.weight[1], single.weight)
        assert F.linear(x[1], single.weight, single.bias).shape == (n, 3)


def test_ridge_regression_of_float_targets_and_its_argument_checks():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    solution = ridge_regression(x, y, torch.tensor(0.1, dtype=torch.float64))  # reg_lambda may be a tensor
    expected_w, expected_b = ridge_by_lstsq(x, y, 0.1, True, True)
    assert torch.allclose(solution.weight, expected_w) and torch.allclose(solution.bias, expected_b)
    with pytest.warns(UserWarning, match="num_classes"):
        assert ridge_regression(x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 1.0).weight.shape == (3, 5)
    with pytest.raises(ValueError, match="regression targets"):
        ridge_regression(x, y[:, 0], 1.0)


# ----------------------------------------------------------------------------- toy datasets

def test_toy_tasks_are_deterministic_under_a_seed_and_respect_their_ranges():
    a, b = Sinusoid(10, num_tasks=50), Sinusoid(10, num_tasks=50)
    a.seed(3), b.seed(3)
    assert torch.equal(a[7].tensors()[0], b[7].tensors()[0]) and torch.equal(a[7].tensors()[1], b[7].tensors()[1])
    b.seed(4)
    assert not torch.equal(a[7].tensors()[0], b[7].tensors()[0])
    assert len(a) == 50 and Sinusoid(1).num_tasks == 1000000 and Harmonic(1).num_tasks == 5000
    for i in range(30):
        task = a[i]
        x, y = task.tensors()
        assert x.shape == (10, 1) and y.shape == (10, 1) and x.dtype == y.dtype == torch.float32
        assert 0.1 <= task.amplitude <= 5.0 and 0.0 <= task.phase <= math.pi
        assert -5.0 <= float(x.min()) and float(x.max()) <= 5.0
        assert torch.allclose(y, task.amplitude * torch.sin(x - task.phase), atol=1e-5)
    x0, y0 = a[0][0]
    assert x0.shape == (1,) and y0.shape == (1,)
    # Unseeded, torch.manual_seed fixes the tasks.
    torch.manual_seed(0)
    first = Sinusoid(5)[0].tensors()[0]
    torch.manual_seed(0)
    assert torch.equal(first, Sinusoid(5)[0].tensors()[0])

    noisy = Sinusoid(200, noise_std=0.5)
    task = noisy[0]
    residual = task.tensors()[1] - task.amplitude * torch.sin(task.tensors()[0] - task.phase)
    assert 0.3 < float(residual.std()) < 0.7

    h = Harmonic(20)
    h.seed(1)
    for i in range(20):
        task = h[i]
        x, y = task.tensors()
        (a1, a2), (b1, b2), w = task.amplitudes, task.phases, task.frequency
        assert 5.0 <= w <= 7.0 and -4.0 <= task.domain <= 4.0 and all(0 <= p <= 2 * math.pi for p in (b1, b2))
        assert torch.allclose(y, a1 * torch.sin(w * x + b1) + a2 * torch.sin(2 * w * x + b2), atol=1e-4)
    mixed = SinusoidAndLine(10)
    mixed.seed(2)
    kinds = {mixed[i].is_sinusoid for i in range(20)}
    assert kinds == {True, False}
    for i in range(20):
        task = mixed[i]
        if not task.is_sinusoid:
            x, y = task.tensors()
            assert -3 <= task.slope <= 3 and -3 <= task.intercept <= 3
            assert torch.allclose(y, task.slope * x + task.intercept, atol=1e-5)
    with pytest.raises(IndexError):
        a[50]


def test_toy_helpers_split_tasks_and_batch_through_the_loader():
    dataset = sinusoid(shots=5, test_shots=15, seed=0, num_tasks=100)
    task = dataset[4]
    assert list(task) == ["train", "test"] and len(task["train"]) == 5 and len(task["test"]) == 15
    # The split takes distinct samples of the same task (the unsplit task at the same seed).
    whole = Sinusoid(20, num_tasks=100)
    whole.seed(0)
    rows = {tuple(r) for r in whole[4].tensors()[0].tolist()}
    train_rows = {tuple(r) for r in task["train"].tensors()[0].tolist()}
    test_rows = {tuple(r) for r in task["test"].tensors()[0].tolist()}
    assert not train_rows & test_rows and train_rows | test_rows == rows
    again = sinusoid(shots=5, test_shots=15, seed=0, num_tasks=100)[4]
    assert torch.equal(again["train"].tensors()[0], task["train"].tensors()[0])
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=8)))
    assert batch["train"][0].shape == (8, 5, 1) and batch["train"][1].shape == (8, 5, 1)
    assert batch["test"][0].shape == (8, 15, 1) and batch["test"][0].dtype == torch.float32
    sequential = next(iter(BatchMetaDataLoader(dataset, batch_size=2, shuffle=False)))
    assert torch.equal(sequential["test"][1][1], dataset[1]["test"].tensors()[1])
    for helper in (harmonic, sinusoid_and_line):
        b = next(iter(BatchMetaDataLoader(helper(shots=3, seed=1), batch_size=2)))
        assert b["train"][0].shape == (2, 3, 1) and b["test"][0].shape == (2, 3, 1)
    with pytest.warns(UserWarning, match="shots is ignored"):
        assert len(sinusoid(shots=1, test_shots=4, num_samples_per_task=10)[0]["train"]) == 6
    with pytest.raises(ValueError, match="fewer than the 21"):
        ClassSplitter(Sinusoid(20), num_train_per_class=5, num_test_per_class=16)[0]


# ----------------------------------------------------------------------------- your own ClassDataset

class Blobs(ClassDataset):
    """A user's class dataset: class c's images are 1-channel 4x4 images of value ~c (so an input names its class)."""

    def __init__(self, sizes, meta_split="train", class_augmentations=None):
        super().__init__(meta_split=meta_split, class_augmentations=class_augmentations)
        g = torch.Generator().manual_seed(0)
        self.images = [c + 0.01 * torch.rand(n, 1, 4, 4, generator=g) for c, n in enumerate(sizes)]
        self.images[0][:, :, :, 0] += 0.5  # class 0 is not left-right symmetric: its flip is another class

    @property
    def num_classes(self):
        return len(self.images)

    def __getitem__(self, index):
        images = self.images[index % self.num_classes]
        transform = self.get_transform(index, None)
        if transform is not None:
            images = torch.stack([transform(image) for image in images])
        return TensorDataset(images, torch.full((len(images),), index))


def class_of(inputs):
    return inputs.flatten(-3).median(-1).values.round().long()


def test_your_own_class_dataset_end_to_end():
    augmented = Blobs([8, 9, 10, 11, 12, 13], class_augmentations=[HorizontalFlip()])
    assert len(augmented) == 12 and augmented.meta_train and augmented.get_class_augmentation(7) == HorizontalFlip()
    assert torch.equal(augmented[6][0][0], augmented[0][0][0].flip(-1))
    pair = CombinationMetaDataset(augmented, 2, target_transform=Categorical(2))[(0, 6)]  # class 0 and its mirror image
    x, y = pair.tensors()
    assert sorted(set(y[:8].tolist()) | set(y[8:].tolist())) == [0, 1] and torch.equal(x[8:], x[:8].flip(-1))
    classes = Blobs([8, 9, 10, 11, 12, 13, 14, 15])
    dataset = CombinationMetaDataset(classes, 3, target_transform=Categorical(3),
                                     dataset_transform=ClassSplitter(shuffle=True, num_train_per_class=2, num_test_per_class=5))
    assert len(dataset) == math.comb(8, 3)
    task = dataset[(1, 4, 7)]
    assert len(task["train"]) == 6 and len(task["test"]) == 15
    again = dataset[(1, 4, 7)]
    for split in ("train", "test"):
        assert torch.equal(task[split].tensors()[0], again[split].tensors()[0])
        assert torch.equal(task[split].tensors()[1], again[split].tensors()[1])
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=4)))
    (train_x, train_y), (test_x, test_y) = batch["train"], batch["test"]
    assert train_x.shape == (4, 6, 1, 4, 4) and test_x.shape == (4, 15, 1, 4, 4) and test_y.shape == (4, 15)
    for b in range(4):
        assert torch.bincount(train_y[b], minlength=3).tolist() == [2, 2, 2]
        assert torch.bincount(test_y[b], minlength=3).tolist() == [5, 5, 5]
        # each label is one class (within the task, in both splits), and different labels different classes
        label_class = {}
        for x, y in zip(torch.cat([train_x[b], test_x[b]]), torch.cat([train_y[b], test_y[b]])):
            label_class.setdefault(int(y), set()).add(int(class_of(x)))
        assert all(len(v) == 1 for v in label_class.values()) and len(set.union(*label_class.values())) == 3
    # Without a target_transform, targets are what the class datasets give (the class index).
    raw = CombinationMetaDataset(augmented, 2)[(2, 5)]
    assert isinstance(raw, ConcatTask) and sorted(set(raw.tensors()[1].tolist())) == [2, 5]


def test_splitters_counts_disjointness_and_determinism():
    dataset = CombinationMetaDataset(Blobs([8, 9, 10, 11, 12, 13]), 3)
    task = dataset[(0, 3, 5)]  # classes of 8, 11 and 13 samples
    split = ClassSplitter(task, num_support_per_class=3, num_query_per_class=4)
    assert list(split) == ["support", "query"] and isinstance(split["support"], SubsetTask)
    support, query = (set(split[s].indices) for s in ("support", "query"))
    assert not support & query and len(support) == 9 and len(query) == 12
    assert split["support"].tensors()[1].tolist() == [0] * 3 + [3] * 3 + [5] * 3  # grouped by class, in task order
    assert split["support"].indices == ClassSplitter(task, num_support_per_class=3, num_query_per_class=4)["support"].indices
    reseeded = ClassSplitter(task, num_support_per_class=3, num_query_per_class=4, random_state_seed=1)
    assert reseeded["support"].indices != split["support"].indices
    in_order = ClassSplitter(task, shuffle=False, num_train_per_class=2, num_test_per_class=1)
    assert in_order["train"].indices == [0, 1, 8, 9, 19, 20] and in_order["test"].indices == [2, 10, 21]

    weighted = WeightedClassSplitter(task, train_weights=0.5, test_weights=0.25, min_num_samples=3, max_num_samples=6)
    counts = {s: torch.bincount(weighted[s].tensors()[1], minlength=6)[[0, 3, 5]].tolist() for s in ("train", "test")}
    # int(0.5 n) = 4, 5, 6 ; int(0.25 n) = 2, 2, 3 raised to the minimum 3
    assert counts == {"train": [4, 5, 6], "test": [3, 3, 3]}
    assert not set(weighted["train"].indices) & set(weighted["test"].indices)
    equal = WeightedClassSplitter(task, train_weights=0.5, test_weights=0.5, force_equal_per_class=True)
    assert torch.bincount(equal["train"].tensors()[1], minlength=6)[[0, 3, 5]].tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="sum to at most 1"):
        WeightedClassSplitter(train_weights=0.7, test_weights=0.5)

    class FirstAndLast(Splitter):  # a user's splitter: the first sample of the task to train, the last to test
        def __init__(self):
            super().__init__({"train": None, "test": None}, random_state_seed=0)

        def get_indices_task(self, task):
            return {"train": [0], "test": [len(task) - 1]}

    ends = FirstAndLast()(task)
    assert ends["train"].tensors()[1].tolist() == [0] and ends["test"].tensors()[1].tolist() == [5]
    # A splitter as dataset_transform; on the native tasks too (a split StoreTask stays one read).
    glyph_tasks = WeightedClassSplitter(datasets.Glyphs(None, 4, meta_train=True, config=GLYPHS), train_weights=0.3,
                                        test_weights=0.7)
    native = glyph_tasks[(0, 1, 2, 3)]
    assert len(native["train"]) == 12 and len(native["test"]) == 28
    assert not set(native["train"].samples[0].tolist()) & set(native["test"].samples[0].tolist())


def test_non_episodic_wrapper_gives_every_sample_with_its_class_label():
    dataset = datasets.Glyphs(None, 5, meta_train=True, config=GLYPHS, class_augmentations=[Rotation([90])])
    flat = NonEpisodicWrapper(dataset)
    assert len(flat) == 24 * 10 and flat.num_classes == 24 and flat.num_samples == 120
    labels = [flat[i][1] for i in range(len(flat))]
    assert labels == [c for c in range(24) for _ in range(10)]
    store = dataset.dataset
    assert torch.equal(flat[13][0], store.images(1, torch.tensor([3]))[0].float() / 255)
    assert torch.equal(flat[120 + 13][0], torch.rot90(flat[13][0], 1, dims=(1, 2)))  # class 13 = class 1 turned 90
    x, y = next(iter(DataLoader(flat, batch_size=240)))  # batched fetch: the same samples
    assert x.shape == (240, 1, 8, 8) and y.tolist() == labels and torch.equal(x[133], flat[133][0])
    named = NonEpisodicWrapper(dataset, target_transform=store.class_name)
    assert named[125][1] == store.class_name(12) == store.class_name(0) + "/Rotation(90)"
    own = NonEpisodicWrapper(CombinationMetaDataset(Blobs([3, 4, 5]), 2))
    assert len(own) == 12 and [own[i][1] for i in range(12)] == [0] * 3 + [1] * 4 + [2] * 5
    assert int(class_of(own[5][0])) == 1
    with pytest.raises(ValueError, match="CombinationMetaDataset"):
        NonEpisodicWrapper(sinusoid(shots=2))


def test_one_vs_all_tasks_and_samplers():
    own = OneVsAllMetaDataset(Blobs([4, 5, 6, 7]), dataset_transform=ClassSplitter(num_train_per_class=2, num_test_per_class=2))
    assert len(own) == 4
    task = own[1]
    train_x, train_y = task["train"].tensors()
    assert train_y.tolist() == [0, 0, 1, 1] and set(class_of(train_x[:2]).tolist()) == {1}
    assert 1 not in class_of(train_x[2:]).tolist()
    assert list(OneClassSequentialSampler(own)) == [0, 1, 2, 3]
    native = OneVsAllMetaDataset(datasets.Glyphs(None, 5, meta_train=True, config=GLYPHS),
                                 dataset_transform=ClassSplitter(num_train_per_class=3, num_test_per_class=4))
    batch = next(iter(BatchMetaDataLoader(native, batch_size=5)))
    assert batch["train"][0].shape == (5, 6, 1, 8, 8) and batch["test"][1].shape == (5, 8)
    assert (batch["train"][1] == torch.tensor([0, 0, 0, 1, 1, 1])).all()
    assert len(list(MetaDataLoader(native, batch_size=4))) == 3  # 12 classes, drawn with replacement


# ----------------------------------------------------------------------------- datasets, helpers, errors

def test_every_image_dataset_has_a_helper(tmp_path):
    natives = ["omniglot", "miniimagenet", "tieredimagenet", "cifar_fs", "fc100", "cub", "doublemnist", "glyphs",
               "mnist", "imagefolder"]
    assert all(callable(getattr(helpers, name)) for name in natives + ["triplemnist"])
    with pytest.raises(Unsupported, match="TripleMNIST"):
        helpers.triplemnist("data", shots=1, ways=5)
    with pytest.raises(DataError, match="mnist"):
        helpers.mnist(tmp_path, shots=1, ways=2, meta_train=True, download=False)
    # imagefolder: your own class folders, decoded into a cache outside them.
    rng = np.random.default_rng(0)
    for c in range(5):
        folder = tmp_path / "classes" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((10, 10)) * 50 + 40 * c).astype(np.uint8)).save(folder / f"{i}.png")
    config = {"root": str(tmp_path / "cache"), "image_size": 8, "channels": 1}
    dataset = helpers.imagefolder(tmp_path / "classes", shots=2, ways=2, test_shots=3, meta_train=True, config=config, seed=0)
    assert len(dataset.dataset) == 3 and all(n.startswith("class") for n in dataset.dataset.class_names)
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=2)))
    assert batch["train"][0].shape == (2, 4, 1, 8, 8) and batch["test"][1].shape == (2, 6)
    assert sorted({p.name for p in (tmp_path / "classes").rglob("*") if p.is_file()}) == [f"{i}.png" for i in range(6)]


def test_what_is_left_unsupported_says_so_in_one_line():
    with pytest.raises(Unsupported, match="SequenceMetaDataset") as info:
        SequenceMetaDataset(None)
    assert "\n" not in str(info.value) and isinstance(info.value, ConfigError)
    with pytest.raises(Unsupported, match="dataset_transform"):
        CombinationMetaDataset(Blobs([4, 4]), 2, dataset_transform=lambda task: task)
    with pytest.raises(Unsupported, match="subclass"):
        CombinationMetaDataset([TensorDataset(torch.zeros(2))], 1)
    with pytest.raises(InvalidArgument, match="tuple of 2 class indices"):
        CombinationMetaDataset(Blobs([4, 4, 4]), 2)[1]


def test_a_native_task_splits_the_same_way_every_time_for_a_splitters_seed():
    """ClassSplitter applied by hand to one task of a native dataset (the batched path of StoreTask.split)."""
    from metalearn.torchmeta import datasets

    task = datasets.Glyphs(None, 5, meta_train=True, config={"split_sizes": [40, 10, 20], "samples_per_class": 20})[
        (0, 1, 2, 3, 4)]

    def images(split):
        return torch.stack([split[i][0] for i in range(len(split))])

    splitter = ClassSplitter(shuffle=True, num_train_per_class=1, num_test_per_class=5)
    first, again = splitter(task), splitter(task)
    assert torch.equal(images(first["train"]), images(again["train"]))
    assert torch.equal(images(first["test"]), images(again["test"]))
    reseeded = ClassSplitter(shuffle=True, num_train_per_class=1, num_test_per_class=5)
    reseeded.seed(1)
    assert not torch.equal(images(first["train"]), images(reseeded(task)["train"]))



def test_a_native_splits_augmentations_do_not_depend_on_which_split_is_read_first():
    from metalearn.data.transforms import AugmentConfig, EpisodeTransform
    from metalearn.torchmeta import datasets

    augment = EpisodeTransform(augment=AugmentConfig(enabled=True, crop_padding=4, flip=True, color_jitter=0.0))
    dataset = ClassSplitter(datasets.Glyphs(None, 5, meta_train=True, transform=augment,
                                            config={"split_sizes": [40, 10, 20], "samples_per_class": 20}),
                            shuffle=True, num_train_per_class=1, num_test_per_class=5)
    test_first = dataset[(0, 1, 2, 3, 4)]["test"].tensors()[0]
    task = dataset[(0, 1, 2, 3, 4)]
    task["train"].tensors()
    assert torch.equal(task["test"].tensors()[0], test_first)
