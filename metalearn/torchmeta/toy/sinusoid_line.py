"""torchmeta's ``SinusoidAndLine`` (Finn et al. 2018, "Probabilistic Model-Agnostic Meta-Learning")."""

from __future__ import annotations

import torch

from metalearn.torchmeta.toy._base import uniform
from metalearn.torchmeta.toy.sinusoid import Sinusoid

__all__ = ["SinusoidAndLine"]


class SinusoidAndLine(Sinusoid):
    """Tasks that are either a sinusoid (as ``Sinusoid``: amplitude in [0.1, 5.0], phase in [0, pi])
    or a line ``y = slope * x + intercept`` (slope and intercept uniform in [-3.0, 3.0]), inputs
    uniform in [-5.0, 5.0]. Each task is a sinusoid with probability 1/2, drawn with the task
    (torchmeta makes exactly half of its ``num_tasks`` sinusoids, in an unseeded random order);
    ``task.is_sinusoid`` says which.

    ``SinusoidAndLine(num_samples_per_task, num_tasks=1000000, noise_std=None, transform=None,
    target_transform=None, dataset_transform=None)``; otherwise as ``Sinusoid``.
    """

    slope_range = (-3.0, 3.0)
    intercept_range = (-3.0, 3.0)

    def draw(self, generator: torch.Generator, n: int):
        if bool(torch.rand((), generator=generator) < 0.5):
            x, y, parameters = super().draw(generator, n)
            return x, y, {"is_sinusoid": True, **parameters}
        slope = float(uniform(generator, *self.slope_range))
        intercept = float(uniform(generator, *self.intercept_range))
        x = uniform(generator, *self.input_range, (n, 1))
        return x, slope * x + intercept, {"is_sinusoid": False, "slope": slope, "intercept": intercept}
