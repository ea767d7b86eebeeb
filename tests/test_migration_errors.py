"""What scripts ported from torchmeta or learn2learn meet at the edges of the two layers (found by running real
user programs with their import lines changed): torchmeta's numpy hand-over to toy transforms, torchvision-strict
Normalize, and one clear line for every module or name that is not provided."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metalearn.learn2learn as l2l
from metalearn.learn2learn._errors import Unsupported as L2LUnsupported
from metalearn.torchmeta import InvalidArgument, Unsupported
from metalearn.torchmeta import transforms
from metalearn.torchmeta.toy import Sinusoid
from metalearn.torchmeta.transforms import ClassSplitter
from metalearn.torchmeta.utils.data import BatchMetaDataLoader


class ToTensor1D:
    """The transform torchmeta's sinusoid examples (and their users) write: numpy in, float32 tensor out."""

    def __call__(self, array):
        return torch.from_numpy(array.astype("float32"))


def test_toy_transforms_get_torchmetas_float64_arrays():
    seen = []
    dataset = Sinusoid(10, num_tasks=50, transform=lambda a: seen.append(a) or ToTensor1D()(a),
                       target_transform=ToTensor1D(),
                       dataset_transform=ClassSplitter(shuffle=True, num_train_per_class=5, num_test_per_class=5))
    dataset.seed(0)
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=4)))
    assert isinstance(seen[0], np.ndarray) and seen[0].dtype == np.float64 and seen[0].shape == (1,)
    assert batch["train"][0].shape == (4, 5, 1) and batch["train"][0].dtype == torch.float32
    plain = Sinusoid(10, num_tasks=50)  # no transform: float32 tensors, the same values
    plain.seed(0)
    with_transform = Sinusoid(10, num_tasks=50, transform=ToTensor1D(), target_transform=ToTensor1D())
    with_transform.seed(0)
    for (x, y), (xt, yt) in zip(plain[3], with_transform[3]):
        assert torch.equal(x, xt) and torch.equal(y, yt)


def test_normalize_refuses_a_channel_mismatch_as_torchvision_does():
    with pytest.raises(InvalidArgument, match="3 means and 3 stds for images of 1 channel"):
        transforms.Normalize([0.5] * 3, [0.5] * 3)(torch.rand(1, 8, 8))
    assert transforms.Normalize([0.5], [0.5])(torch.ones(3, 2, 2)).eq(1).all()


@pytest.mark.parametrize("get", [
    lambda: transforms.RandomResizedCrop(84),
    lambda: __import__("metalearn.torchmeta.transforms", fromlist=["ColorJitter"]).ColorJitter,
])
def test_torchvision_transforms_name_metalearns_augmentation(get):
    with pytest.raises(Unsupported, match="EpisodeTransform.*AugmentConfig"):
        get()


@pytest.mark.parametrize("get, words", [
    (lambda: l2l.optim, "learn2learn.optim"),
    (lambda: __import__("metalearn.learn2learn.optim.transforms"), "learn2learn.optim"),
    (lambda: l2l.gym, "learn2learn.gym"),
    (lambda: l2l.text, "learn2learn.text"),
    (lambda: l2l.nn.MetaModule, "metalearn.torchmeta.modules"),
    (lambda: l2l.algorithms.LightningMAML(None), "metalearn train algo=maml"),
    (lambda: l2l.nn.SVClassifier(), "algo=metaoptnet_svm"),
])
def test_learn2learn_names_not_provided_are_one_line(get, words):
    with pytest.raises(L2LUnsupported, match=words) as info:
        get()
    assert "\n" not in str(info.value) and isinstance(info.value, NotImplementedError)
    with pytest.raises(AttributeError):
        l2l.no_such_name  # noqa: B018 - everything else is a plain AttributeError
