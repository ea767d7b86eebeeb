"""torchmeta's ``toy.helpers``: ``sinusoid``, ``harmonic``, ``sinusoid_and_line``.

``sinusoid(shots, shuffle=True, test_shots=None, seed=None, **kwargs)``: the toy dataset with
``num_samples_per_task=shots + test_shots`` (``test_shots`` defaults to ``shots``) and a
``ClassSplitter`` giving each task ``shots`` training and ``test_shots`` test samples, seeded with
``seed`` (None: see ``ToyMetaDataset``). ``kwargs`` go to the dataset class (``num_tasks``,
``noise_std``, ``transform``, ...). Given ``num_samples_per_task`` instead of ``shots``, the
training samples are what ``test_shots`` leaves (half of them without ``test_shots``), as torchmeta's.
"""

from __future__ import annotations

import warnings

from metalearn.torchmeta._errors import InvalidArgument
from metalearn.torchmeta.toy.harmonic import Harmonic
from metalearn.torchmeta.toy.sinusoid import Sinusoid
from metalearn.torchmeta.toy.sinusoid_line import SinusoidAndLine
from metalearn.torchmeta.transforms.splitters import ClassSplitter

__all__ = ["sinusoid", "harmonic", "sinusoid_and_line"]


def _helper(klass, shots, shuffle, test_shots, seed, kwargs):
    if "num_samples_per_task" in kwargs:
        warnings.warn("both shots and num_samples_per_task are given; shots is ignored", stacklevel=3)
        total = kwargs.pop("num_samples_per_task")
        if test_shots is not None:
            shots = total - test_shots
            if shots <= 0:
                raise InvalidArgument(f"test_shots={test_shots} leaves no training samples of num_samples_per_task={total}; "
                                      "give shots instead, or more samples per task")
        else:
            shots = total // 2
    if test_shots is None:
        test_shots = shots
    dataset = klass(num_samples_per_task=shots + test_shots, **kwargs)
    dataset = ClassSplitter(dataset, shuffle=shuffle, num_train_per_class=shots, num_test_per_class=test_shots)
    if seed is not None:
        dataset.seed(seed)
    return dataset


def sinusoid(shots, shuffle=True, test_shots=None, seed=None, **kwargs):
    """``Sinusoid`` tasks split into ``shots`` training and ``test_shots`` test samples."""
    return _helper(Sinusoid, shots, shuffle, test_shots, seed, kwargs)


def harmonic(shots, shuffle=True, test_shots=None, seed=None, **kwargs):
    """``Harmonic`` tasks split into ``shots`` training and ``test_shots`` test samples."""
    return _helper(Harmonic, shots, shuffle, test_shots, seed, kwargs)


def sinusoid_and_line(shots, shuffle=True, test_shots=None, seed=None, **kwargs):
    """``SinusoidAndLine`` tasks split into ``shots`` training and ``test_shots`` test samples."""
    return _helper(SinusoidAndLine, shots, shuffle, test_shots, seed, kwargs)
