"""metalearn.torchmeta: torchmeta's API over the native data layer.

A torchmeta-style MAML script runs with only its import lines changed (on glyphs for the learning
check, on the real Omniglot subsets when the shared data is here); the rest checks torchmeta's
shapes, labels, task semantics, class augmentations, transforms and the clear errors of what is
not supported.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import omniglot as native_omniglot
from metalearn.data.transforms import EpisodeTransform
from metalearn.errors import ConfigError, DataError
from metalearn.torchmeta import Unsupported, InvalidArgument
from metalearn.torchmeta import datasets, helpers, transforms
from metalearn.torchmeta.datasets.helpers import glyphs
from metalearn.torchmeta.transforms import Categorical, ClassSplitter, Compose, Resize, Rotation, TensorTransform, ToTensor
from metalearn.torchmeta.utils.data import BatchMetaDataLoader

SHARED = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
#: A small glyphs set: 40/10/20 characters of 20 drawings (x4 with the rotations), built in about a second.
GLYPHS = {"split_sizes": [40, 10, 20], "samples_per_class": 20}

# A torchmeta-style MAML script (torchmeta's import lines) with a plain nn.Module called through
# torch.func.functional_call, which gradient_update_parameters also serves. Upper-case names are set by the test.
SCRIPT = '''
from torchmeta.datasets.helpers import omniglot
from torchmeta.utils.data import BatchMetaDataLoader
from torchmeta.utils.gradient_based import gradient_update_parameters

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def conv_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, track_running_stats=False),
                         nn.ReLU(), nn.MaxPool2d(2))


class ConvNet(nn.Module):
    def __init__(self, ways, hidden):
        super().__init__()
        self.features = nn.Sequential(conv_block(1, hidden), conv_block(hidden, hidden),
                                      conv_block(hidden, hidden), conv_block(hidden, hidden))
        self.classifier = nn.Linear(hidden, ways)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def adapt_and_score(model, batch, first_order):
    train_inputs, train_targets = batch["train"]
    test_inputs, test_targets = batch["test"]
    SEEN.append((train_inputs.shape, train_targets.shape, test_inputs.shape, test_targets.shape,
                 int(train_targets.min()), int(train_targets.max()), float(train_inputs.min()), float(train_inputs.max())))
    loss, accuracy = 0.0, 0.0
    for train_input, train_target, test_input, test_target in zip(train_inputs, train_targets, test_inputs, test_targets):
        inner_loss = F.cross_entropy(model(train_input), train_target)
        params = gradient_update_parameters(model, inner_loss, step_size=0.4, first_order=first_order)
        test_logit = functional_call(model, params, (test_input,))
        loss = loss + F.cross_entropy(test_logit, test_target)
        accuracy += (test_logit.argmax(dim=1) == test_target).float().mean().item()
    return loss / len(train_inputs), accuracy / len(train_inputs)


torch.manual_seed(0)
dataset = omniglot("data", ways=5, shots=1, test_shots=15, meta_train=True, download=False)
dataloader = BatchMetaDataLoader(dataset, batch_size=BATCH_SIZE, num_workers=0)
model = ConvNet(ways=5, hidden=16)
meta_optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for batch_idx, batch in enumerate(dataloader):
    model.zero_grad()
    outer_loss, accuracy = adapt_and_score(model, batch, first_order=True)
    outer_loss.backward()
    meta_optimizer.step()
    if batch_idx + 1 >= NUM_BATCHES:
        break

test_dataset = omniglot("data", ways=5, shots=1, test_shots=15, meta_test=True, download=False)
test_loader = BatchMetaDataLoader(test_dataset, batch_size=16, num_workers=0)
scores = []
for batch_idx, batch in enumerate(test_loader):
    scores.append(adapt_and_score(model, batch, first_order=True)[1])
    if batch_idx + 1 >= TEST_BATCHES:
        break
test_accuracy = sum(scores) / len(scores)
'''


def run_script(tmp_path: Path, data_root: Path | None, omniglot_line: str, **names) -> dict:
    """Run SCRIPT in ``tmp_path`` (holding ``data`` -> ``data_root``) with the torchmeta imports moved to
    metalearn.torchmeta and the helper line replaced by ``omniglot_line``; returns the script's namespace."""
    text = SCRIPT.replace("from torchmeta.", "from metalearn.torchmeta.")
    text = text.replace("from metalearn.torchmeta.datasets.helpers import omniglot", omniglot_line)
    if data_root is not None:
        (tmp_path / "data").symlink_to(data_root)
    namespace = {"SEEN": [], **names}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(text, "torchmeta_script", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def small_glyphs(**kwargs):
    return glyphs(None, **{"ways": 5, "shots": 1, "test_shots": 15, "meta_train": True, "config": GLYPHS, **kwargs})


@pytest.mark.slow  # the default tier's torchmeta programs that learn: test_torchmeta_examples.py (maml, protonet)
def test_maml_script_learns_glyphs_with_only_the_imports_changed(tmp_path):
    # 150 first-order meta-steps of 2 tasks, then 160 test tasks: 47.2% measured (55 s on a shared, overloaded 2-core CPU).
    torch.set_num_threads(1)
    line = ("import functools\nfrom metalearn.torchmeta.datasets.helpers import glyphs\n"
            f"omniglot = functools.partial(glyphs, config={GLYPHS!r})")
    ns = run_script(tmp_path, None, line, BATCH_SIZE=2, NUM_BATCHES=150, TEST_BATCHES=10)
    train_shapes, test_shapes = ns["SEEN"][0], ns["SEEN"][-1]
    assert train_shapes[:4] == ((2, 5, 1, 28, 28), (2, 5), (2, 75, 1, 28, 28), (2, 75))
    assert test_shapes[:4] == ((16, 5, 1, 28, 28), (16, 5), (16, 75, 1, 28, 28), (16, 75))
    assert all(s[4] == 0 and s[5] == 4 and 0.0 <= s[6] and s[7] <= 1.0 for s in ns["SEEN"])
    # 5-way: chance is 20%; meta-test classes are unseen glyphs (12000 test predictions: 0.4 is far above chance).
    assert ns["test_accuracy"] > 0.4, ns["test_accuracy"]
    train_names = {n.split("/")[0] for n in ns["dataset"].dataset.class_names}
    test_names = {n.split("/")[0] for n in ns["test_dataset"].dataset.class_names}
    assert not train_names & test_names


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """A data root holding copies of the real small zips (the loader extracts and caches beside them: never
    into the shared data)."""
    if not (SHARED / "images_background_small1.zip").is_file():
        pytest.skip(f"shared Omniglot subsets not found at {SHARED}")
    root = tmp_path_factory.mktemp("data")
    (root / "omniglot").mkdir()
    for name in ("images_background_small1", "images_background_small2"):
        shutil.copy(SHARED / f"{name}.zip", root / "omniglot")
    return root


def test_maml_script_runs_on_real_omniglot_subsets(tmp_path, shared_root):
    line = ("import functools\nfrom metalearn.torchmeta.datasets.helpers import omniglot\n"
            "omniglot = functools.partial(omniglot, config='omniglot_small')")
    ns = run_script(tmp_path, shared_root, line, BATCH_SIZE=16, NUM_BATCHES=2, TEST_BATCHES=1)
    assert ns["SEEN"][0][:4] == ((16, 5, 1, 28, 28), (16, 5), (16, 75, 1, 28, 28), (16, 75))
    assert all(s[4] == 0 and s[5] == 4 for s in ns["SEEN"])


def test_real_omniglot_splits_rotations_and_pixels(shared_root):
    kwargs = dict(num_classes_per_task=5, config="omniglot_small", class_augmentations=[Rotation([90, 180, 270])],
                  target_transform=Categorical(5))
    train = datasets.Omniglot(shared_root, meta_train=True, **kwargs)
    test = datasets.Omniglot(shared_root, meta_split="test", **kwargs)
    native = native_omniglot.load(native_omniglot.Config(
        root=str(shared_root), archives=["images_background_small1", "images_background_small2"], download=False,
        rotations=False, train=["Balinese", "Greek", "Korean", "Latin"],
        val=["Early_Aramaic"], test=["Japanese_(katakana)", "Sanskrit", "Tagalog"]))
    n = native["train"].num_classes
    # Rotations multiply the classes; class i + k*n is class i turned by k*90 degrees (counter-clockwise).
    assert len(train.dataset) == 4 * n and train.dataset.num_classes == n
    assert len(train) == math.comb(4 * n, 5)
    store = native["train"]
    first = store.images[store.offsets[3] : store.offsets[3] + store.counts[3]]
    samples = torch.arange(int(store.counts[3]))
    assert torch.equal(train.dataset.images(3, samples), first)
    assert torch.equal(train.dataset.images(3 + 2 * n, samples), torch.rot90(first, 2, dims=(2, 3)))
    # Meta-train and meta-test characters are disjoint (whole alphabets apart).
    base = lambda ds: {"/".join(name.split("/")[:2]) for name in ds.dataset.class_names}  # noqa: E731
    assert base(train) and base(test) and not base(train) & base(test)
    assert {name.split("/")[0] for name in base(test)} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    # A task without a splitter holds every drawing of its classes, labelled by Categorical.
    task = train[(0, 1, n, 2 * n + 1, 4 * n - 1)]
    x, y = task.tensors()
    assert x.shape == (5 * 20, 1, 28, 28) and sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
    assert torch.equal(x[:20], store.images[store.offsets[0] : store.offsets[0] + 20].float() / 255)


def test_loader_batches_have_torchmeta_shapes_and_labels():
    dataset = small_glyphs()
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=16)))
    assert list(batch) == ["train", "test"]
    (train_x, train_y), (test_x, test_y) = batch["train"], batch["test"]
    assert train_x.shape == (16, 5, 1, 28, 28) and test_x.shape == (16, 75, 1, 28, 28)
    assert train_y.shape == (16, 5) and test_y.shape == (16, 75)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.long
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0
    for b in range(16):  # every task: each label 0..4 once in train and 15 times in test
        assert sorted(train_y[b].tolist()) == [0, 1, 2, 3, 4]
        assert torch.bincount(test_y[b], minlength=5).tolist() == [15] * 5


def test_tasks_are_tuples_of_classes():
    dataset = small_glyphs()
    assert len(dataset.dataset) == 4 * 40 and len(dataset) == math.comb(160, 5)
    task = dataset[(0, 1, 2, 3, 4)]
    again = dataset[(0, 1, 2, 3, 4)]
    # The same task always holds the same images and labels (torchmeta's one task, one dataset).
    for split in ("train", "test"):
        for a, b in zip(task[split].tensors(), again[split].tensors()):
            assert torch.equal(a, b)
    # Train and test samples of each class are distinct drawings.
    for k in range(5):
        assert not set(task["train"].samples[k].tolist()) & set(task["test"].samples[k].tolist())
    # Per-sample access gives what the loader collates.
    x0, y0 = task["test"][0]
    assert torch.equal(x0, task["test"].tensors()[0][0]) and y0 == task["test"].tensors()[1][0]
    other = dataset[(4, 3, 2, 1, 0)]
    assert not torch.equal(other["train"].tensors()[0], task["train"].tensors()[0])
    with pytest.raises(ValueError, match="tuple of 5 class indices"):
        dataset[3]
    with pytest.raises(ValueError, match="repeats a class"):
        dataset[(0, 0, 1, 2, 3)]
    with pytest.raises(ValueError, match="out of range"):
        dataset[(0, 1, 2, 3, 160)]
    sampled = dataset.sample_task()
    assert sampled["train"].tensors()[0].shape == (5, 1, 28, 28)


def test_loader_is_reproducible_and_independent_of_workers():
    dataset = small_glyphs()

    def first_batches(workers: int, n: int = 2):
        torch.manual_seed(7)
        loader = BatchMetaDataLoader(dataset, batch_size=4, num_workers=workers)
        out = []
        for i, batch in enumerate(loader):
            out.append(batch["test"])
            if i + 1 == n:
                break
        return out

    a, b, c = first_batches(0), first_batches(0), first_batches(2)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x[0], y[0]) and torch.equal(x[0], z[0]) and torch.equal(x[1], z[1])
    sequential = BatchMetaDataLoader(dataset, batch_size=2, shuffle=False)
    first = next(iter(sequential))["train"][0]
    assert torch.equal(first[0], dataset[(0, 1, 2, 3, 4)]["train"].tensors()[0])
    assert torch.equal(first[1], dataset[(0, 1, 2, 3, 5)]["train"].tensors()[0])


def test_transforms_on_pil_images_tensors_and_episode_transforms():
    reference = small_glyphs()[(0, 1, 2, 3, 4)]["train"].tensors()[0]
    seen = []

    def on_pil(image):
        seen.append(type(image))
        return np.asarray(image, dtype=np.float32)[None] / 255  # an array: made a tensor

    via_pil = small_glyphs(transform=on_pil)[(0, 1, 2, 3, 4)]["train"].tensors()[0]
    assert set(seen) == {Image.Image} and torch.allclose(via_pil, reference)
    inverted = small_glyphs(transform=TensorTransform(lambda x: 1 - x))[(0, 1, 2, 3, 4)]["train"].tensors()[0]
    assert torch.allclose(inverted, 1 - reference)
    mixed = small_glyphs(transform=Compose([ToTensor(), lambda x: 1 - x]))[(0, 1, 2, 3, 4)]["train"].tensors()[0]
    assert torch.allclose(mixed, 1 - reference)
    small = small_glyphs(transform=Compose([Resize(14), ToTensor()]))
    batch = next(iter(BatchMetaDataLoader(small, batch_size=2)))
    assert batch["train"][0].shape == (2, 5, 1, 14, 14) and batch["train"][0].dtype == torch.float32
    # metalearn's own EpisodeTransform (here: normalisation) runs on whole tasks.
    normalised = small_glyphs(transform=EpisodeTransform((0.5,), (0.25,)))[(0, 1, 2, 3, 4)]["train"].tensors()[0]
    assert torch.allclose(normalised, (reference - 0.5) / 0.25, atol=1e-6)


def test_rotation_turns_counter_clockwise_like_pil():
    image = Image.fromarray((np.random.default_rng(0).random((28, 28)) > 0.7).astype(np.uint8) * 255)
    assert np.array_equal(np.asarray(Rotation(90)(image)), np.asarray(image.rotate(90)))
    turned = np.asarray(Rotation(30)(image))  # resampled: nearest, 0 fill, like PIL's default
    pil = np.asarray(image.rotate(30, resample=Image.Resampling.NEAREST))
    assert (turned == pil).mean() > 0.95
    assert [repr(r) for r in Rotation([90, 180, 270])] == ["Rotation(90)", "Rotation(180)", "Rotation(270)"]
    assert Categorical(3).labels(3, torch.Generator().manual_seed(0)) in ([0, 1, 2], [0, 2, 1], [1, 0, 2],
                                                                        [1, 2, 0], [2, 0, 1], [2, 1, 0])


def test_helpers_import_paths_and_defaults():
    assert helpers.omniglot is datasets.helpers.omniglot
    import metalearn.torchmeta as torchmeta
    import metalearn.torchmeta.helpers as top

    assert torchmeta.datasets.helpers.glyphs is glyphs and torchmeta.utils.data.BatchMetaDataLoader is BatchMetaDataLoader

    assert top.miniimagenet is datasets.helpers.miniimagenet
    dataset = small_glyphs(test_shots=None, shots=2)
    task = dataset[(0, 1, 2, 3, 4)]
    assert len(task["train"]) == 10 and len(task["test"]) == 10  # test_shots defaults to shots
    assert dataset.meta_train and not dataset.meta_test and dataset.meta_split == "train"


def test_unsupported_and_invalid_options_raise_clear_errors():
    def refused(exc, match, fn, *args, **kwargs):
        with pytest.raises(exc, match=match) as info:
            fn(*args, **kwargs)
        assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)
        return info.value

    e = refused(Unsupported, "dataset_transform", small_glyphs, dataset_transform=lambda task: task)
    assert isinstance(e, NotImplementedError) and "ClassSplitter" in str(e)
    refused(Unsupported, "FixedCategory", transforms.FixedCategory, None)
    refused(Unsupported, "use_vinyals_split", datasets.Omniglot, "data", 5, meta_train=True, use_vinyals_split=False)
    refused(Unsupported, "TripleMNIST.*doublemnist", helpers.triplemnist, "data", shots=1, ways=5)
    refused(Unsupported, "TripleMNIST", datasets.TripleMNIST, "data", num_classes_per_task=5, meta_train=True)
    refused(Unsupported, "class augmentation", small_glyphs, class_augmentations=[lambda image: image])
    refused(Unsupported, "expand", Rotation, 90, expand=True)
    refused(Unsupported, "BatchMetaDataLoader over a list", BatchMetaDataLoader, [1, 2, 3])
    refused(Unsupported, "rotations", datasets.Omniglot, "data", 5, meta_train=True, config={"rotations": True})
    e = refused(InvalidArgument, "more than one of meta_train", datasets.Glyphs, None, 5, meta_train=True, meta_test=True)
    assert isinstance(e, ValueError)
    refused(InvalidArgument, "num_classes_per_task", datasets.Glyphs, None, meta_train=True, config=GLYPHS)
    refused(InvalidArgument, "no data preset", datasets.Omniglot, "data", 5, meta_train=True, config="omniglot_tiny")
    refused(ConfigError, "unknown option config.train_clases", datasets.Glyphs, None, 5, meta_train=True,
            config={"train_clases": 10})


def test_missing_native_files_end_in_the_native_one_line_error(tmp_path):
    for klass, folder in [(datasets.MiniImagenet, "miniimagenet"), (datasets.CIFARFS, "cifar100"),
                          (datasets.Omniglot, "omniglot")]:
        with pytest.raises(DataError, match=folder) as info:
            klass(tmp_path, num_classes_per_task=5, meta_train=True, download=False)
        assert "\n" not in str(info.value)
        assert "set data.root" not in str(info.value)  # a torchmeta user gives the folder as an argument


def test_fewer_samples_than_the_splitter_needs_fails_when_the_task_is_built():
    dataset = ClassSplitter(datasets.Glyphs(None, 5, meta_train=True, config=GLYPHS), num_train_per_class=5,
                            num_test_per_class=16)
    with pytest.raises(ValueError, match="has 20 samples, fewer than the 21"):
        dataset[(0, 1, 2, 3, 4)]
