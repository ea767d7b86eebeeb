"""torchmeta's ``Sinusoid`` (Finn et al. 2017, MAML's regression benchmark)."""

from __future__ import annotations

import math

import torch

from metalearn.torchmeta.toy._base import ToyMetaDataset, uniform

__all__ = ["Sinusoid"]


class Sinusoid(ToyMetaDataset):
    """Tasks ``y = amplitude * sin(x - phase)``: amplitude uniform in [0.1, 5.0], phase in [0, pi],
    inputs ``x`` uniform in [-5.0, 5.0]; ``noise_std`` adds Gaussian noise to the targets.

    ``Sinusoid(num_samples_per_task, num_tasks=1000000, noise_std=None, transform=None,
    target_transform=None, dataset_transform=None)``; ``dataset[i]`` is task ``i`` (an int),
    ``task[j] == (x [1], y [1])`` as float32 tensors (torchmeta: float64 numpy arrays); with
    ``dataset_transform=ClassSplitter(num_train_per_class=k, num_test_per_class=m)`` (the task is
    one class) ``k`` of its samples train and ``m`` others test. See ``ToyMetaDataset`` for seeding.
    """

    amplitude_range = (0.1, 5.0)
    phase_range = (0.0, math.pi)
    input_range = (-5.0, 5.0)

    def draw(self, generator: torch.Generator, n: int):
        amplitude = float(uniform(generator, *self.amplitude_range))
        phase = float(uniform(generator, *self.phase_range))
        x = uniform(generator, *self.input_range, (n, 1))
        return x, amplitude * torch.sin(x - phase), {"amplitude": amplitude, "phase": phase}
