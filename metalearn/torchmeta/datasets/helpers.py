"""torchmeta's ``datasets.helpers``: one call for an N-way K-shot meta-dataset.

``omniglot(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs)`` and the
same for the other datasets: the dataset class with ``num_classes_per_task=ways``,
``target_transform=Categorical(ways)``, a ``ClassSplitter`` of ``shots`` training and
``test_shots`` (default ``shots``) test samples per class, seeded with ``seed``. ``kwargs`` go to
the dataset class (``meta_train=True``, ``download=...``, ``transform=...``, ``config=...``).
Omniglot (and ``glyphs``) also default to ``class_augmentations=[Rotation([90, 180, 270])]``.
Besides torchmeta's helpers: ``glyphs``, ``mnist`` and ``imagefolder`` (``folder``: your class
folders); ``triplemnist`` raises ``Unsupported`` (metalearn has no TripleMNIST source).
Images default to float tensors in [0, 1] at the native size (torchmeta's ``Resize`` +
``ToTensor``).
"""

from __future__ import annotations

import warnings
from typing import Any

from metalearn.torchmeta import datasets as D
from metalearn.torchmeta._errors import unsupported
from metalearn.torchmeta.transforms import Categorical, ClassSplitter, Rotation

__all__ = ["omniglot", "miniimagenet", "tieredimagenet", "cifar_fs", "fc100", "cub", "doublemnist", "triplemnist",
           # metalearn's extras
           "glyphs", "mnist", "imagefolder"]


def _helper(klass, folder, shots, ways, shuffle=True, test_shots=None, seed=None, defaults=None, **kwargs) -> Any:
    if "num_classes_per_task" in kwargs:
        warnings.warn("both ways and num_classes_per_task are given; num_classes_per_task is used", stacklevel=3)
        ways = kwargs.pop("num_classes_per_task")
    for key, value in (defaults or {}).items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("target_transform", Categorical(ways))
    dataset = klass(folder, num_classes_per_task=ways, **kwargs)
    dataset = ClassSplitter(dataset, shuffle=shuffle, num_train_per_class=shots,
                            num_test_per_class=shots if test_shots is None else test_shots)
    dataset.seed(seed)
    return dataset


def omniglot(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """Omniglot tasks (rotations as extra classes unless ``class_augmentations`` says otherwise)."""
    return _helper(D.Omniglot, folder, shots, ways, shuffle, test_shots, seed,
                   {"class_augmentations": [Rotation([90, 180, 270])]}, **kwargs)


def miniimagenet(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """miniImageNet tasks."""
    return _helper(D.MiniImagenet, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def tieredimagenet(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """tieredImageNet tasks."""
    return _helper(D.TieredImagenet, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def cifar_fs(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """CIFAR-FS tasks."""
    return _helper(D.CIFARFS, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def fc100(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """FC100 tasks."""
    return _helper(D.FC100, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def cub(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """CUB tasks (84x84, the whole image resized; torchmeta resizes to 126 and crops the centre 84)."""
    return _helper(D.CUB, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def doublemnist(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """DoubleMNIST tasks."""
    return _helper(D.DoubleMNIST, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def glyphs(folder=None, shots=1, ways=5, shuffle=True, test_shots=None, seed=None, **kwargs):
    """Tasks of metalearn's offline procedural glyphs, set up like ``omniglot`` (an extra, not in torchmeta)."""
    return _helper(D.Glyphs, folder, shots, ways, shuffle, test_shots, seed,
                   {"class_augmentations": [Rotation([90, 180, 270])]}, **kwargs)


def mnist(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """Tasks of MNIST digits (an extra, not in torchmeta; the standard split has 2 val/test digits, so
    ``ways=2`` there, or give ``config={"train": [...], "val": [...], "test": [...]}``)."""
    return _helper(D.MNIST, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def imagefolder(folder, shots, ways, shuffle=True, test_shots=None, seed=None, **kwargs):
    """Tasks of your own images, one folder per class under ``folder`` (an extra, not in torchmeta;
    see ``datasets.ImageFolder`` for the split and ``config``)."""
    return _helper(D.ImageFolder, folder, shots, ways, shuffle, test_shots, seed, None, **kwargs)


def triplemnist(*args, **kwargs):
    """Not provided: raises ``Unsupported`` (metalearn has no native TripleMNIST)."""
    raise unsupported("torchmeta.datasets.helpers.triplemnist", "metalearn has no native TripleMNIST; use doublemnist")
