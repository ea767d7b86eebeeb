"""torchmeta's ``Harmonic`` (Lacoste et al. 2018, "Uncertainty in Multitask Transfer Learning")."""

from __future__ import annotations

import math

import torch

from metalearn.torchmeta.toy._base import ToyMetaDataset, uniform

__all__ = ["Harmonic"]


class Harmonic(ToyMetaDataset):
    """Tasks ``y = a1 * sin(w * x + b1) + a2 * sin(2 * w * x + b2)``, a sum of two sine waves with a
    frequency ratio of 2: ``w`` uniform in [5.0, 7.0], phases ``b1, b2`` uniform in [0, 2 pi],
    amplitudes ``a1, a2`` standard normal, inputs ``x ~ N(mu_x, 1)`` with ``mu_x`` uniform in
    [-4.0, 4.0] per task. (torchmeta's documentation gives [5.0, 7.0] as the amplitudes' range;
    its code, like the paper, draws the frequency there and the amplitudes from N(0, 1), as here.)

    ``Harmonic(num_samples_per_task, num_tasks=5000, noise_std=None, transform=None,
    target_transform=None, dataset_transform=None)``; otherwise as ``Sinusoid``.
    """

    default_num_tasks = 5000
    frequency_range = (5.0, 7.0)
    phase_range = (0.0, 2 * math.pi)
    domain_range = (-4.0, 4.0)

    def draw(self, generator: torch.Generator, n: int):
        domain = float(uniform(generator, *self.domain_range))
        frequency = float(uniform(generator, *self.frequency_range))
        b1, b2 = uniform(generator, *self.phase_range, (2,)).tolist()
        a1, a2 = torch.randn(2, generator=generator, dtype=torch.float64).tolist()
        x = domain + torch.randn((n, 1), generator=generator, dtype=torch.float64)
        y = a1 * torch.sin(frequency * x + b1) + a2 * torch.sin(2 * frequency * x + b2)
        return x, y, {"domain": domain, "frequency": frequency, "phases": (b1, b2), "amplitudes": (a1, a2)}
