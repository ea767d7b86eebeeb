"""learn2learn's ``vision.benchmarks``: ``get_tasksets(name, ...)``, the train/validation/test Tasksets of a
few-shot benchmark, built on metalearn's own dataset loaders.

    tasksets = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_ways=5, train_samples=2 * shots,
                                                  test_ways=5, test_samples=2 * shots, root="~/data")
    X, y = tasksets.train.sample()       # X [ways * samples, C, H, W], y = [0, .., 0, 1, .., ways-1]

The benchmarks are learn2learn's five, ``omniglot``, ``mini-imagenet``, ``tiered-imagenet``, ``fc100`` and
``cifarfs``, and metalearn's other image datasets, ``cub``, ``doublemnist``, ``mnist``, ``glyphs`` (offline,
procedural, nothing to download) and ``imagefolder`` (your own folders: ``config={"path": ...}``); names
are matched without case, ``-`` or ``_`` (``miniimagenet``, ``tiered_imagenet``, ``cifar-fs`` work too).

Each split is a ``MetaDataset`` over one split of the native dataset (``metalearn.data.<dataset>``, files
under ``<root>/<dataset>/`` in metalearn's layout, decoded once into metalearn's cache, downloaded where
metalearn downloads that dataset and ``download`` is on) and its tasks are learn2learn's:
``NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels`` (Omniglot: ``FusedNWaysKShots`` and a random
rotation of each class, below), ``train_ways``/``train_samples`` for training tasks and
``test_ways``/``test_samples`` for validation and test tasks. Images are float tensors ``[C, H, W]``
at the native loader's size (Omniglot 28, the ImageNet subsets and CUB 84, CIFAR-FS and FC100 32,
DoubleMNIST 64), in [0, 1] (ToTensor) unless said otherwise below.

Options (``**kwargs``): ``data_augmentation`` (mini-imagenet and tiered-imagenet, as in learn2learn:
None, ``'normalize'`` or ``'lee2019'``) and ``config``, the native dataset's options: a data preset name
(a file of ``conf/data/``, e.g. ``'omniglot_small'``) or a dict of ``metalearn.data.<dataset>.Config`` keys
(e.g. ``{"split_sizes": [100, 20, 20]}`` for glyphs, ``{"train": [...], "val": [...], "test": [...]}`` for
another split). ``device``: the images are moved there once, and each task's data and labels are on it.

Where this differs from learn2learn, deliberately:

- the class splits are metalearn's fixed ones. Omniglot: the Vinyals et al. split (1028/172/423
  characters), the same every run, where learn2learn deals the 1623 characters into 1100/100/423 with an
  unseeded shuffle at every call (so its splits change from run to run); other splits via ``config``.
- Omniglot is resized once to 28x28 by metalearn's loader (area-averaging bilinear, not LANCZOS); ink is
  1.0 on 0.0 as in learn2learn. Each task turns each of its classes by one of 0/90/180/270 degrees drawn
  at random (``RandomClassRotation``), in every split as in learn2learn; here each class gets its own
  rotation, as learn2learn documents (its code turns every class of a task by the last class's draw).
- mini-imagenet with ``data_augmentation=None`` gives pixels in 0..255, as learn2learn's does
  (``'normalize'``: [0, 1]); ``'lee2019'`` normalises by the miniImageNet statistics in every split and
  augments training images with metalearn's crop (padding 8), flip and colour jitter (0.4), the images
  first scaled to [0, 1] (learn2learn normalises its 0..255 validation/test pixels as they are).
- validation tasks use the same transforms, in the same order, as train and test tasks (learn2learn's
  mini-imagenet, tiered-imagenet, cifarfs and fc100 put ``ConsecutiveLabels`` before ``RemapLabels``
  there), so every split's labels come out in order (see ``ConsecutiveLabels``).
- files are where metalearn's loaders look (``<root>/<dataset>/``), and nothing is downloaded that
  metalearn does not download (miniImageNet and tieredImageNet are put in place by hand; learn2learn's
  ``mini-imagenet-cache-*.pkl`` pickles are read as they are); options not listed above are refused.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections import namedtuple
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from metalearn.confdir import CONF_DIR
from metalearn.config import typed_group
from metalearn.data import SPLITS, dataset_module
from metalearn.data.episodes import ClassStore
from metalearn.data.miniimagenet import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD
from metalearn.data.transforms import AugmentConfig, EpisodeTransform
from metalearn.learn2learn._errors import InvalidArgument, unsupported
from metalearn.learn2learn.data import MetaDataset, StoreDataset, Taskset
from metalearn.learn2learn.data.task_dataset import DataDescription
from metalearn.learn2learn.data.transforms import (
    ConsecutiveLabels, FusedNWaysKShots, KShots, LoadData, NWays, RemapLabels,
)

__all__ = ["list_tasksets", "get_tasksets", "BenchmarkTasksets", "RandomClassRotation"]

BenchmarkTasksets = namedtuple("BenchmarkTasksets", ("train", "validation", "test"))

#: Benchmark name -> metalearn data option: learn2learn's five, then metalearn's other image datasets.
BENCHMARKS = {
    "omniglot": "omniglot",
    "mini-imagenet": "miniimagenet",
    "tiered-imagenet": "tieredimagenet",
    "fc100": "fc100",
    "cifarfs": "cifarfs",
    "cub": "cub",
    "doublemnist": "doublemnist",
    "mnist": "mnist",
    "glyphs": "glyphs",
    "imagefolder": "imagefolder",
}
# Other spellings (learn2learn's dataset class names), matched as names are: without case, '-' or '_'.
_ALIASES = {"cubirds200": "cub", "cub200": "cub", "fullomniglot": "omniglot"}

# Native stores already loaded in this process, by data option and config (the three splits come from one load).
_LOADED: dict[tuple[str, str], dict[str, ClassStore]] = {}


def list_tasksets() -> list[str]:
    """The names ``get_tasksets`` takes (learn2learn's five benchmarks first)."""
    return list(BENCHMARKS)


def get_tasksets(name: str, train_ways: int = 5, train_samples: int = 10, test_ways: int = 5,
                 test_samples: int = 10, num_tasks: int = -1, root: str = "~/data", device: Any = None,
                 **kwargs: Any) -> BenchmarkTasksets:
    """The tasksets of benchmark ``name``: ``BenchmarkTasksets(train, validation, test)``, three ``Taskset``.

    Training tasks have ``train_ways`` classes of ``train_samples`` images each (support and query
    together: split them with ``partition_task``), validation and test tasks ``test_ways`` and
    ``test_samples``; labels are ``0 .. ways-1`` in order. ``num_tasks``: -1 draws a new task every
    time, ``n > 0`` fixes ``n`` tasks per split. ``root``: the data root (files under
    ``<root>/<dataset>/``; None: metalearn's, ``$METALEARN_DATA`` or ``~/.cache/metalearn``); ``device``:
    where the images and each task's tensors live. ``kwargs``:
    ``data_augmentation`` and ``config`` (see the module's docstring).
    """
    options = dict(kwargs)
    augmentation = options.pop("data_augmentation", None)
    config = options.pop("config", None)
    if options:
        raise InvalidArgument(f"get_tasksets got unknown option(s) {', '.join(sorted(options))}; it takes "
                              f"data_augmentation= and config= (the dataset's metalearn options: a preset name or a dict)")
    benchmark = _benchmark(name)
    data = BENCHMARKS[benchmark]
    train_decode, eval_decode = _decoders(benchmark, augmentation)
    stores = load_stores(data, native_config(benchmark, data, root, config))
    collate = None if device is None else CollateOn(device)
    tasksets = []
    for split, ways, samples, decode in (("train", train_ways, train_samples, train_decode),
                                         ("val", test_ways, test_samples, eval_decode),
                                         ("test", test_ways, test_samples, eval_decode)):
        store = stores[split]
        if device is not None:
            store = copy.copy(store).to(device)  # a copy: the cached store stays where it was loaded
        dataset = MetaDataset(StoreDataset(store, decode=decode))
        _check_fits(benchmark, split, dataset, ways, samples)
        tasksets.append(Taskset(dataset, _task_transforms(benchmark, dataset, ways, samples), num_tasks, collate))
    return BenchmarkTasksets(*tasksets)


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def _benchmark(name: Any) -> str:
    known = {_key(n): n for n in BENCHMARKS}
    known.update({_key(data): n for n, data in BENCHMARKS.items()})
    known.update(_ALIASES)
    found = known.get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise InvalidArgument(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return found


def native_config(benchmark: str, data: str, root: Any, config: str | dict | None) -> Any:
    """The typed native config of ``data``: its preset in ``conf/data/`` (or the preset ``config`` names),
    the data ``root``, then the options of a ``config`` dict."""
    if config is not None and not isinstance(config, (str, dict)):
        raise InvalidArgument(f"config must be a data preset name or a dict of {data} options "
                              f"(got {type(config).__name__})")
    preset = config if isinstance(config, str) else data
    path = CONF_DIR / "data" / f"{preset}.yaml"
    if not path.is_file():
        if isinstance(config, str):
            raise InvalidArgument(f"no data preset {config!r}; the presets of {data} are: {', '.join(_presets(data))}")
        node: dict = {"name": data}
    else:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # ${oc.env:METALEARN_CACHE,..} too
        node.pop("defaults", None)
        if node.get("name") != data:
            raise InvalidArgument(f"data preset {config!r} is a {node.get('name')} preset, not {data}; give one of "
                                  f"{', '.join(_presets(data))}")
    if "root" in dataset_module(data).Config.__dataclass_fields__ and root is not None:
        node["root"] = os.path.expanduser(str(root))
    if isinstance(config, dict):
        node.update(config)
    if benchmark == "omniglot":
        # Rotations are learn2learn's per-task RandomClassRotation, not metalearn's extra classes.
        if isinstance(config, dict) and config.get("rotations"):
            raise unsupported("config={'rotations': True} in get_tasksets('omniglot')",
                              "each task turns its classes at random (RandomClassRotation); for rotated copies as "
                              "classes build a Taskset over metalearn's data=omniglot with rotations on")
        node["rotations"] = False
    return typed_group("data", node)


def _presets(data: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if OmegaConf.load(p).get("name") == data)


def load_stores(data: str, cfg: Any) -> dict[str, ClassStore]:
    """The native train/val/test stores of ``cfg`` (loaded once per process and config)."""
    key = (data, repr(cfg))
    if key not in _LOADED:
        stores = dataset_module(data).load(cfg)
        missing = [s for s in SPLITS if s not in stores]
        if missing:
            raise InvalidArgument(f"data={data} has no {'/'.join(missing)} split (it has {', '.join(stores)}); "
                                  f"get_tasksets needs train, validation and test classes")
        _LOADED[key] = stores
    return _LOADED[key]


def _check_fits(benchmark: str, split: str, dataset: MetaDataset, ways: int, samples: int) -> None:
    prefix = "train" if split == "train" else "test"
    where = f"the {'validation' if split == 'val' else split} split of {benchmark}"
    if ways > len(dataset.labels):
        raise InvalidArgument(f"{prefix}_ways={ways} is more than the {len(dataset.labels)} classes of {where}; "
                              f"lower {prefix}_ways")
    smallest = min((len(v) for v in dataset.labels_to_indices.values()), default=0)
    if samples > smallest:
        raise InvalidArgument(f"{prefix}_samples={samples} is more than the {smallest} images of the smallest class "
                              f"of {where}; lower {prefix}_samples")


def _task_transforms(benchmark: str, dataset: MetaDataset, ways: int, samples: int) -> list:
    if benchmark == "omniglot":
        return [FusedNWaysKShots(dataset, n=ways, k=samples), LoadData(dataset), RemapLabels(dataset),
                ConsecutiveLabels(dataset), RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0])]
    return [NWays(dataset, ways), KShots(dataset, samples), LoadData(dataset), RemapLabels(dataset),
            ConsecutiveLabels(dataset)]


def _decoders(benchmark: str, augmentation: Any) -> tuple[Any, Any]:
    """How the uint8 images of the training and of the validation/test split become tensors (None: [0, 1])."""
    if augmentation not in (None, "normalize", "lee2019"):
        raise InvalidArgument(f"data_augmentation must be None, 'normalize' or 'lee2019' (got {augmentation!r})")
    if augmentation == "lee2019":
        if benchmark not in ("mini-imagenet", "tiered-imagenet"):
            raise unsupported(f"data_augmentation='lee2019' for {benchmark}",
                              "learn2learn defines it for mini-imagenet and tiered-imagenet; metalearn augments any "
                              "dataset's training episodes with data.augment.enabled=true")
        return Lee2019(augment=True), Lee2019(augment=False)
    if benchmark == "mini-imagenet" and augmentation is None:
        return pixels, pixels
    return None, None


def pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in 0..255 (learn2learn's mini-ImageNet without data_augmentation)."""
    return image.float()


class Lee2019:
    """learn2learn's ``data_augmentation='lee2019'`` on one uint8 image: scaled to [0, 1], augmented (training:
    random crop of the image padded by 8, horizontal flip, colour jitter 0.4, metalearn's ``EpisodeTransform``)
    and normalised by miniImageNet's statistics. The draws are seeded from Python's ``random``, so
    ``random.seed`` fixes them as it fixes the tasks."""

    def __init__(self, augment: bool):
        config = AugmentConfig(enabled=augment, crop_padding=8, flip=True, color_jitter=0.4)
        self.augment = augment
        self.transform = EpisodeTransform(IMAGENET_MEAN, IMAGENET_STD, config)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        generator = None
        if self.augment:
            generator = torch.Generator(device=image.device)
            generator.manual_seed(random.getrandbits(63))
        return self.transform(image.unsqueeze(0), generator)[0]


class CollateOn:
    """``default_collate``, then every tensor of the task moved to ``device`` (the labels are made on the host)."""

    def __init__(self, device: Any):
        self.device = torch.device(device)

    def __call__(self, samples: list) -> Any:
        batch = default_collate(samples)
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        return [b.to(self.device) if isinstance(b, torch.Tensor) else b for b in batch]


class RandomClassRotation:
    """learn2learn's ``vision.transforms.RandomClassRotation`` task transform: each class of the task gets one
    rotation drawn uniformly from ``degrees`` (with Python's ``random``), applied to the image (``sample[0]``,
    ``[..., H, W]``) of each of its samples, counter-clockwise as torchvision rotates; put it after ``LoadData``.
    The degrees must be multiples of 90 (an exact turn of the pixel grid; learn2learn also takes other
    angles, which torchvision interpolates)."""

    def __init__(self, dataset: Any, degrees: list):
        turns = []
        for d in degrees:
            quarter = float(d) / 90.0
            if quarter != int(quarter):
                raise unsupported(f"RandomClassRotation(degrees=[.., {d}, ..])", "use multiples of 90 degrees")
            turns.append(int(quarter) % 4)
        if not turns:
            raise InvalidArgument("RandomClassRotation needs at least one rotation in degrees")
        self.dataset = dataset
        self.degrees = list(degrees)
        self._turns = turns

    def __call__(self, task_description: list | None) -> list:
        if task_description is None:
            task_description = [DataDescription(i) for i in range(len(self.dataset))]
        labels = self.dataset.indices_to_labels
        rotations: dict[Any, _Rotate] = {}
        for dd in task_description:
            label = labels[dd.index]
            if label not in rotations:
                rotations[label] = _Rotate(random.choice(self._turns))
            dd.transforms.append(rotations[label])
        return task_description


class _Rotate:
    """Per-sample transform: the loaded sample with its image turned ``turns`` quarter turns counter-clockwise."""

    __slots__ = ("turns",)

    def __init__(self, turns: int):
        self.turns = turns

    def __call__(self, sample: Any) -> Any:
        if not isinstance(sample, (list, tuple)):
            raise InvalidArgument("RandomClassRotation turns loaded samples (image, label): put LoadData before it")
        if self.turns == 0:
            return sample
        sample = list(sample)
        sample[0] = torch.rot90(sample[0], self.turns, dims=(-2, -1))
        return sample
