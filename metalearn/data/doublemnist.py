"""DoubleMNIST (Sun 2019, "Multi-digit MNIST for Few-shot Learning"; torchmeta's ``DoubleMNIST``):
100 classes "00".."99", each image two MNIST digits side by side.

Reads the same four official MNIST IDX files as ``mnist``, in ``<root>/mnist/``
(downloaded, md5 checked, when missing; see ``metalearn.data.mnist``), and composes
the images itself instead of downloading Sun's pre-rendered zip (a Google Drive file
that cannot be fetched reliably). Class "ab" gets ``images_per_class`` images, each an
image of digit a beside an image of digit b (28x56; digits drawn from all 70000 MNIST
images, as in Sun's generator), padded with 14 empty rows above and below to a 56x56
square so the digits keep their shape, then resized to ``image_size`` (64 by default,
the size of Sun's and torchmeta's files). The digit images of class "ab" are drawn by
a generator seeded with (``generation_seed``, a, b): the dataset is a pure function of
the MNIST files and these options (``generation_seed`` makes the images; it is not a
split seed, nor the run's seed). Unlike Sun's files, the digits are not shifted at random.

The standard class split is torchmeta's (Sun's generator with seed 123): 64 training, 16
validation and 20 test classes; ``data.train``/``val``/``test`` (names such as ``"07"``, or
patterns such as ``"0?"``) or ``data.split_seed`` give others
(``metalearn.data.common.choose_split``). The composed images are cached once in
``<root>/mnist/cache/doublemnist-<size>px-<n>per-class-seed<generation_seed>-v<N>.pt``
(``<cache_dir>/mnist/cache/`` with ``data.cache_dir`` set) with each class's channel
statistics, from which the training split's mean and std are pooled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metalearn.data import mnist
from metalearn.data.common import (
    ImageConfig, cached, check_image_config, check_split_config, choose_split, data_dirs, file_signature,
)
from metalearn.data.episodes import ClassStore
from metalearn.data.imagefolder import class_stats, pooled_stats
from metalearn.data.images import resize
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CLASSES = [f"{n:02d}" for n in range(100)]
# torchmeta/datasets/assets/doublemnist/{train,val,test}.json.
TORCHMETA_SPLIT = {
    "train": [
        "00", "01", "04", "05", "06", "08", "09", "11", "12", "13", "14", "15", "16", "18", "19", "20",
        "21", "23", "24", "26", "28", "29", "30", "31", "33", "35", "37", "38", "41", "42", "43", "44",
        "45", "50", "51", "53", "54", "56", "59", "60", "62", "63", "65", "69", "70", "72", "74", "75",
        "76", "77", "79", "81", "82", "84", "85", "87", "88", "89", "90", "91", "94", "95", "97", "98",
    ],
    "val": ["03", "07", "10", "22", "27", "34", "39", "40", "48", "52", "58", "61", "64", "71", "93", "99"],
    "test": ["02", "17", "25", "32", "36", "46", "47", "49", "55", "57", "66", "67", "68", "73", "78", "80",
             "83", "86", "92", "96"],
}
# Bump when the cache's content or preprocessing changes, so old caches are rebuilt.
_CACHE_VERSION = 1


@dataclass
class Config(ImageConfig):
    name: str = "doublemnist"
    image_size: int = 64
    images_per_class: int = 1000  # as in Sun's and torchmeta's files
    # picks the MNIST images composing each class (another seed: other images); not the run's seed, not a split seed
    generation_seed: int = 0
    base_url: str = mnist.OFFICIAL_URL  # where the MNIST files are downloaded from
    md5: dict[str, str] = field(default_factory=lambda: dict(mnist.OFFICIAL_MD5))  # of the MNIST files; "" skips one


def load(cfg: Config) -> dict[str, ClassStore]:
    check_image_config(cfg)
    if cfg.images_per_class < 1:
        raise ConfigError(f"data.images_per_class must be >= 1 (got {cfg.images_per_class})")
    check_split_config(cfg)
    splits = choose_split(cfg, CLASSES, TORCHMETA_SPLIT, normalize=_padded)  # before any file is read
    data = _composed(cfg)
    k = cfg.images_per_class
    train = [CLASSES.index(name) for name in splits["train"]]
    mean, std = pooled_stats(data["class_mean"], data["class_std"], torch.full((100,), k), train)
    stores = {}
    for split, names in splits.items():
        # Class c's images are rows c*k .. c*k+k-1 of the cache.
        images = torch.cat([data["images"][CLASSES.index(n) * k : (CLASSES.index(n) + 1) * k] for n in names])
        labels = torch.arange(len(names)).repeat_interleave(k)
        stores[split] = ClassStore(images, labels, names, mean=mean, std=std)
    return stores


def sources(cfg: Config) -> list[Path]:
    """The raw files the loader reads (downloading them when missing): MNIST's."""
    return mnist.sources(cfg)


def compose(left: torch.Tensor, right: torch.Tensor, size: int) -> torch.Tensor:
    """Digit images [n, 1, h, w] side by side, padded to a square (2w x 2w) and resized to ``size``."""
    pair = torch.cat([left, right], dim=-1)
    h, w = pair.shape[-2:]
    top = (w - h) // 2
    square = F.pad(pair, (0, 0, top, w - h - top))  # zeros: MNIST's background
    return resize(square, size)


def _composed(cfg: Config) -> dict:
    """All 100 classes, class c's images at rows c*k..c*k+k-1, from the cache when it is current."""
    k, size = cfg.images_per_class, cfg.image_size
    # Downloads missing MNIST files; memory-mapped, so cheap when the DoubleMNIST cache is current.
    digits = mnist.digits(cfg)
    meta = {"version": _CACHE_VERSION, "image_size": size, "images_per_class": k, "seed": cfg.generation_seed,
            "sources": file_signature(*mnist.sources(cfg))}
    name = f"doublemnist-{size}px-{k}per-class-seed{cfg.generation_seed}-v{_CACHE_VERSION}.pt"
    dirs = data_dirs(cfg, mnist.FOLDER)
    path = dirs.cache(name)

    def build() -> dict:
        images, labels = digits["images"], digits["labels"]
        of_digit = [torch.nonzero(labels == d).flatten().numpy() for d in range(10)]
        absent = [d for d in range(10) if len(of_digit[d]) == 0]
        if absent:
            raise DataError(
                f"the MNIST files in {mnist.sources(cfg)[0].parent} hold no image of digit(s) "
                f"{', '.join(map(str, absent))}; they are incomplete: delete them and run again to download them afresh"
            )
        out = torch.empty(100 * k, 1, size, size, dtype=torch.uint8)
        means, stds = [], []
        for c, name in enumerate(CLASSES):
            a, b = int(name[0]), int(name[1])
            # Seeded per class, so a class's images do not depend on the split or on the other classes.
            rng = np.random.default_rng([cfg.generation_seed, a, b])
            left = rng.choice(of_digit[a], size=k, replace=k > len(of_digit[a]))
            right = rng.choice(of_digit[b], size=k, replace=k > len(of_digit[b]))
            out[c * k : (c + 1) * k] = compose(images[torch.from_numpy(left)], images[torch.from_numpy(right)], size)
            mean, std = class_stats(out[c * k : (c + 1) * k])
            means.append(mean)
            stds.append(std)
        return {"images": out, "class_mean": torch.stack(means), "class_std": torch.stack(stds)}

    return cached(path, meta, build, "DoubleMNIST", dirs)



def _padded(entry: str) -> str:
    """Two-digit class names; YAML and the command line may turn "07" into 7, so numbers are padded back."""
    return entry.zfill(2) if entry.isdigit() else entry
