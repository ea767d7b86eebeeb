"""Image transforms as torch ops on uint8 batches (no torchvision), on whatever device the batch is.

``EpisodeTransform`` turns the uint8 images of an episode into the float input of the
backbone: scale to [0, 1], the standard training augmentation of the 84x84 benchmarks
(random crop of the zero-padded image, horizontal flip, colour jitter) and Koch et al.'s
random affine distortions (rotation, shear, scale, translation) when enabled, and
per-channel normalisation. Random draws come from the episode sampler's generator, so a
run's augmentation is fixed by its seed and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from metalearn.data.images import resize  # noqa: F401  (its home was here; the datasets import it from images)
from metalearn.errors import ConfigError


@dataclass
class AffineConfig:
    """Koch, Zemel & Salakhutdinov (2015)'s distortions: each component is applied to an image with
    probability ``probability``, its value drawn uniformly from its range (0: the component is off)."""

    rotation: float = 0.0  # degrees, from [-r, r] (Koch: 10)
    shear: float = 0.0  # shear factors along x and y, each from [-s, s] (Koch: 0.3)
    scale: float = 0.0  # scale factors along x and y, each from [1-s, 1+s] (Koch: 0.2)
    translate: float = 0.0  # pixels along x and y, each from [-t, t] (Koch: 2, on 105x105 images)
    probability: float = 0.5  # chance that each component applies to an image (Koch: 0.5)

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in (self.rotation, self.shear, self.scale, self.translate))


@dataclass
class AugmentConfig:
    enabled: bool = False  # applied to training episodes only (support and query), never to val/test
    crop_padding: int = 8  # random crop of the original size from the image zero-padded by this many pixels (0: off)
    flip: bool = True  # random horizontal flip, probability 1/2
    color_jitter: float = 0.4  # brightness, contrast and saturation factors drawn from [1-j, 1+j] (0: off)
    affine: AffineConfig = field(default_factory=AffineConfig)  # random affine distortions (all 0: off)


def check_augment(cfg: AugmentConfig) -> None:
    if cfg.crop_padding < 0:
        raise ConfigError(f"data.augment.crop_padding must be >= 0 (got {cfg.crop_padding})")
    if not 0 <= cfg.color_jitter < 1:
        raise ConfigError(f"data.augment.color_jitter must be in [0, 1) (got {cfg.color_jitter})")
    a = cfg.affine
    limits = {"rotation": (a.rotation, 180), "shear": (a.shear, 1), "scale": (a.scale, 1), "translate": (a.translate, math.inf)}
    for key, (value, most) in limits.items():
        if not 0 <= value < most:
            bound = f"[0, {most})" if most != math.inf else ">= 0"
            raise ConfigError(f"data.augment.affine.{key} must be in {bound} (got {value})")
    if not 0 <= a.probability <= 1:
        raise ConfigError(f"data.augment.affine.probability must be in [0, 1] (got {a.probability})")


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
    if cfg.affine.enabled:
        x = _affine(x, cfg.affine, g)
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


def _affine(x: torch.Tensor, cfg: AffineConfig, g: torch.Generator) -> torch.Tensor:
    """Each image through its own random affine map (Koch et al. 2015): rotation, shear, scale and translation,
    each applied with probability ``cfg.probability``; bilinear resampling, zeros outside (the background)."""
    n, _, h, w = x.shape
    dev = x.device
    # One draw of every value for every image, whether applied or not: the stream does not depend on the data.
    u = torch.rand(7, n, generator=g, device=dev) * 2 - 1  # angle, shear x/y, scale x/y, shift x/y in [-1, 1]
    on = torch.rand(4, n, generator=g, device=dev) < cfg.probability
    angle = torch.where(on[0], u[0] * math.radians(cfg.rotation), 0.0)
    shear = torch.where(on[1], u[1:3] * cfg.shear, 0.0)
    scale = torch.where(on[2], 1 + u[3:5] * cfg.scale, 1.0)
    # pixels -> affine_grid's [-1, 1] coordinates
    shift = torch.where(on[3], u[5:7] * cfg.translate, 0.0) * torch.tensor([2.0 / w, 2.0 / h], device=dev)[:, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    one = torch.ones_like(angle)
    shear_m = torch.stack([torch.stack([one, shear[0]], -1), torch.stack([shear[1], one], -1)], -2)
    forward = rotate @ shear_m @ torch.diag_embed(scale.T)  # output = forward @ input (about the centre) + shift
    # affine_grid maps output coordinates to input ones: the inverse map
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift.T[..., None])], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of RGB images [n, 3, H, W], or the image itself for one channel: [n, 1, H, W]."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
