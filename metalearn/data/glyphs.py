"""glyphs: a procedural, offline, deterministic Omniglot-like dataset.

Each class is a few random pen strokes (smooth polylines); each sample redraws
the strokes with per-point jitter, a small random affine transform and a
random pen width, rasterised to a uint8 image with ink = 255. The whole
dataset is a pure function of ``seed`` and the sizes, so every machine builds
the same images in well under a second: the quickstart and the test workhorse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metalearn.data.episodes import ClassStore
from metalearn.errors import ConfigError


@dataclass
class Config:
    name: str = "glyphs"
    train_classes: int = 300
    val_classes: int = 100
    test_classes: int = 100
    samples_per_class: int = 20
    image_size: int = 28
    strokes: int = 3  # strokes per class (1..strokes, drawn uniformly)
    points: int = 4  # control points per stroke
    jitter: float = 0.1  # per-point noise, as a fraction of the image
    seed: int = 0  # the dataset's own seed: independent of the run's seed


def load(cfg: Config) -> dict[str, ClassStore]:
    sizes = {"train": cfg.train_classes, "val": cfg.val_classes, "test": cfg.test_classes}
    for key, value in [*sizes.items(), ("samples_per_class", cfg.samples_per_class), ("strokes", cfg.strokes)]:
        if value < 1:
            raise ConfigError(f"data.{key if key in ('samples_per_class', 'strokes') else key + '_classes'} must be >= 1 (got {value})")
    if cfg.image_size < 8 or cfg.points < 2:
        raise ConfigError("glyphs needs data.image_size >= 8 and data.points >= 2")
    g = torch.Generator().manual_seed(cfg.seed)
    stores, first = {}, 0
    for split, n in sizes.items():
        shapes = _class_shapes(n, cfg.strokes, cfg.points, g)
        images = _render_samples(shapes, cfg.samples_per_class, cfg.image_size, cfg.jitter, g)
        labels = torch.arange(n).repeat_interleave(cfg.samples_per_class)
        names = [f"glyph{first + i:05d}" for i in range(n)]
        stores[split] = ClassStore(images, labels, names)
        first += n
    return stores


def sources(cfg: Config) -> list:
    return []  # drawn from the seed in about a second: nothing on disk


def _class_shapes(n: int, max_strokes: int, points: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Control points [n, S, P, 2] in [-0.7, 0.7]^2 and a stroke mask [n, S]."""
    # Strokes are random walks with momentum, so they look like pen strokes, not noise.
    start = (torch.rand(n, max_strokes, 1, 2, generator=g) - 0.5) * 1.0
    angle = torch.rand(n, max_strokes, 1, generator=g) * 2 * math.pi
    turn = (torch.rand(n, max_strokes, points - 1, generator=g) - 0.5) * 2.0
    angles = angle + torch.cumsum(turn, dim=2)
    step = 0.25 + 0.2 * torch.rand(n, max_strokes, points - 1, 1, generator=g)
    moves = torch.stack([angles.cos(), angles.sin()], dim=-1) * step
    pts = torch.cat([start, start + torch.cumsum(moves, dim=2)], dim=2).clamp(-0.7, 0.7)
    used = torch.randint(1, max_strokes + 1, (n, 1), generator=g)
    mask = torch.arange(max_strokes)[None] < used
    return pts, mask


def _render_samples(shapes, samples: int, size: int, jitter: float, g: torch.Generator, chunk: int = 2048) -> torch.Tensor:
    pts, mask = shapes
    n, S, P, _ = pts.shape
    pts = pts.repeat_interleave(samples, dim=0)
    mask = mask.repeat_interleave(samples, dim=0)
    m = pts.shape[0]
    # Per-sample variation: jitter of each control point, then rotation, scale, shift.
    pts = pts + torch.randn(pts.shape, generator=g) * jitter * 2
    theta = (torch.rand(m, generator=g) - 0.5) * 0.6
    scale = 0.9 + 0.2 * torch.rand(m, generator=g)
    shift = (torch.rand(m, 1, 1, 2, generator=g) - 0.5) * 0.2
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1), torch.stack([theta.sin(), theta.cos()], -1)], -2)
    pts = torch.einsum("mspd,med->mspe", pts, rot) * scale[:, None, None, None] + shift
    width = (0.045 + 0.03 * torch.rand(m, 1, generator=g))
    out = torch.empty(m, 1, size, size, dtype=torch.uint8)
    grid = (torch.arange(size) + 0.5) / size * 2 - 1
    pix = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)  # [H*W, 2] as (x, y)
    a, b = pts[:, :, :-1].reshape(m, -1, 2), pts[:, :, 1:].reshape(m, -1, 2)  # segment ends [m, S*(P-1), 2]
    seg_mask = mask[:, :, None].expand(m, S, P - 1).reshape(m, -1)
    for lo in range(0, m, chunk):
        sl = slice(lo, lo + chunk)
        d = _segment_distance(pix, a[sl], b[sl])  # [c, H*W, segs]
        d = d.masked_fill(~seg_mask[sl, None, :], float("inf")).amin(dim=2)
        ink = ((width[sl] - d) / (1.0 / size) + 0.5).clamp(0, 1)  # about one pixel of anti-aliasing
        out[sl] = (ink * 255).round().to(torch.uint8).view(-1, 1, size, size)
    return out


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of points p [Q, 2] to segments a->b [c, M, 2]: [c, Q, M]."""
    ab = (b - a)[:, None]  # [c, 1, M, 2]
    ap = p[None, :, None] - a[:, None]  # [c, Q, M, 2]
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    return (ap - t[..., None] * ab).norm(dim=-1)
