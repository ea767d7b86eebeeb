"""Image transforms as torch ops on uint8 batches (no torchvision), on whatever device the batch is.

``EpisodeTransform`` turns the uint8 images of an episode into the float input of the
backbone: scale to [0, 1], the standard training augmentation of the 84x84 benchmarks
(random crop of the zero-padded image, horizontal flip, colour jitter) when enabled, and
per-channel normalisation. Random draws come from the episode sampler's generator, so a
run's augmentation is fixed by its seed and resumes exactly from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalearn.data.images import resize  # noqa: F401  (its home was here; the datasets import it from images)
from metalearn.errors import ConfigError


@dataclass
class AugmentConfig:
    enabled: bool = False  # applied to training episodes only (support and query), never to val/test
    crop_padding: int = 8  # random crop of the original size from the image zero-padded by this many pixels (0: off)
    flip: bool = True  # random horizontal flip, probability 1/2
    color_jitter: float = 0.4  # brightness, contrast and saturation factors drawn from [1-j, 1+j] (0: off)


def check_augment(cfg: AugmentConfig) -> None:
    if cfg.crop_padding < 0:
        raise ConfigError(f"data.augment.crop_padding must be >= 0 (got {cfg.crop_padding})")
    if not 0 <= cfg.color_jitter < 1:
        raise ConfigError(f"data.augment.color_jitter must be in [0, 1) (got {cfg.color_jitter})")


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, on the [0, 1] scale, of uint8 images [N, C, H, W] (read in chunks)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for lo in range(0, len(images), chunk):
        x = images[lo : lo + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    n = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class EpisodeTransform:
    """uint8 [..., C, H, W] -> float [..., C, H, W]: scale, optional augmentation, optional normalisation."""

    def __init__(self, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 augment: AugmentConfig | None = None):
        self.mean, self.std = mean, std
        self.augment = augment if augment is not None and augment.enabled else None
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as [1, C, 1, 1] tensors on ``device``, made once: no host copy per episode."""
        if device not in self._on:
            self._on[device] = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (self.mean, self.std))
        return self._on[device]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shape = images.shape
        x = images.reshape(-1, *shape[-3:]).float().div_(255.0)
        if self.augment is not None:
            x = _augment(x, self.augment, generator)
        if self.mean is not None:
            mean, std = self._stats(x.device)
            x = (x - mean) / std
        return x.reshape(shape)


def _augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    dev = x.device
    if cfg.crop_padding > 0:
        p = cfg.crop_padding
        padded = F.pad(x, (p, p, p, p))
        # One offset per image; gather rows then columns of the padded image.
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(n, c, h, w + 2 * p)
        padded = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(n, c, h, w)
        x = padded.gather(3, cols)
    if cfg.flip:
        flip = torch.rand(n, generator=g, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        factors = 1 - j + 2 * j * torch.rand(3, n, 1, 1, 1, generator=g, device=dev)
        brightness, contrast, saturation = factors
        x = (x * brightness).clamp_(0, 1)
        grey = _grey(x)
        x = ((x - grey.mean(dim=(1, 2, 3), keepdim=True)) * contrast + grey.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)
        if c == 3:
            grey = _grey(x)
            x = ((x - grey) * saturation + grey).clamp_(0, 1)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of RGB images [n, 3, H, W], or the image itself for one channel: [n, 1, H, W]."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
