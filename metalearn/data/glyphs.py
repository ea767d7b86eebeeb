"""glyphs: a procedural, offline, deterministic Omniglot-like dataset.

Each class is a few random pen strokes (smooth polylines); each sample redraws
the strokes with per-point jitter, a small random affine transform and a
random pen width, rasterised to a uint8 image with ink = 255. The whole
dataset is a pure function of ``generation_seed`` and the sizes, so every
machine builds the same images in well under a second: the quickstart and the
test workhorse.

Size and standard split: ``split_sizes`` = [train, val, test] class counts. The
dataset holds their sum of classes, named ``glyph00000``, ``glyph00001``, ...;
the standard split gives the first ``split_sizes[0]`` to train, the next
``split_sizes[1]`` to val and the rest to test. The classes are drawn block by
block in that order from one generator seeded with ``generation_seed``, so a
class's images depend on ``split_sizes`` (and on nothing else of the split):
``data.train``/``val``/``test`` (names or patterns such as ``glyph000[0-4]*``)
or ``data.split_seed`` choose other splits of the same images.

``generation_seed`` is what draws the glyphs, not a split seed and not the
run's ``seed``: changing it gives another dataset; ``split_seed`` deals the
same classes differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from metalearn.data.common import SplitConfig, check_split_config, choose_split, class_subset, split_indices
from metalearn.data.episodes import ClassStore
from metalearn.data.transforms import AugmentConfig, check_augment
from metalearn.errors import ConfigError


@dataclass
class Config(SplitConfig):
    name: str = "glyphs"
    # [train, val, test] classes of the standard split; the dataset has their sum, glyph00000.. in this order
    split_sizes: list[int] = field(default_factory=lambda: [300, 100, 100])
    samples_per_class: int = 20
    image_size: int = 28
    strokes: int = 3  # strokes per class (1..strokes, drawn uniformly)
    points: int = 4  # control points per stroke
    jitter: float = 0.1  # per-point noise, as a fraction of the image
    generation_seed: int = 0  # draws the glyphs (another seed: another dataset); not the run's seed, not a split seed
    rotations: Any = False  # 90/180/270-degree turns as new classes: false | true (every split) | a list of splits
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training-episode augmentation (affine: Koch et al.)


def load(cfg: Config) -> dict[str, ClassStore]:
    sizes = list(cfg.split_sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ConfigError(f"data.split_sizes must be three class counts >= 1, for train, val and test (got {sizes})")
    for key, value in [("samples_per_class", cfg.samples_per_class), ("strokes", cfg.strokes)]:
        if value < 1:
            raise ConfigError(f"data.{key} must be >= 1 (got {value})")
    if cfg.image_size < 8 or cfg.points < 2:
        raise ConfigError("glyphs needs data.image_size >= 8 and data.points >= 2")
    check_split_config(cfg)
    check_augment(cfg.augment)
    images, labels = generate(cfg)
    names = class_names(sum(sizes))
    chosen = choose_split(cfg, names, standard_split(sizes))
    return {split: class_subset(images, labels, names, classes, None, None)
            for split, classes in split_indices(names, chosen).items()}


def class_names(n: int) -> list[str]:
    return [f"glyph{i:05d}" for i in range(n)]


def standard_split(sizes: list[int]) -> dict[str, list[str]]:
    """The first sizes[0] classes train, the next sizes[1] val, the last sizes[2] test."""
    names = class_names(sum(sizes))
    return {"train": names[: sizes[0]], "val": names[sizes[0] : sizes[0] + sizes[1]], "test": names[sizes[0] + sizes[1] :]}


def generate(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class's images, uint8 [sum(split_sizes) * samples_per_class, 1, S, S] by class, and their labels.

    Drawn one block of the standard split at a time, in the order of train, val, test, from one
    generator: the images of the default 300/100/100 are those glyphs has always drawn."""
    g = torch.Generator().manual_seed(cfg.generation_seed)
    blocks = []
    for n in cfg.split_sizes:
        shapes = _class_shapes(n, cfg.strokes, cfg.points, g)
        blocks.append(_render_samples(shapes, cfg.samples_per_class, cfg.image_size, cfg.jitter, g))
    labels = torch.arange(sum(cfg.split_sizes)).repeat_interleave(cfg.samples_per_class)
    return torch.cat(blocks), labels


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
