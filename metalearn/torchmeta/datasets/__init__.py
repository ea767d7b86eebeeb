"""torchmeta's ``datasets``, backed by metalearn's native datasets (``metalearn.data``).

Each class takes torchmeta's arguments and loads the native dataset of the same benchmark
(files under ``<root>/<dataset>/``, decoded once into metalearn's cache, held in memory as
uint8), then serves one split as torchmeta's combination meta-dataset: ``dataset[(i, j, ...)]``
is a task, ``len(dataset)`` the number of class combinations.

Differences from torchmeta, all deliberate:

- images come at the native loader's size (Omniglot 28x28, miniImageNet/tieredImageNet/CUB
  84x84, CIFAR-FS/FC100 32x32, DoubleMNIST 64x64), already resized once in the cache; with
  ``transform=None`` they are float tensors ``[C, H, W]`` in [0, 1] (what torchmeta's helpers
  make with ``Resize`` + ``ToTensor``). Another size: ``config={"image_size": 105}``.
- without a ``target_transform`` the target is the class index in ``dataset.dataset``
  (``dataset.dataset.class_name(i)`` names it), not torchmeta's (name, augmentation) pair.
- ``config``: a native data preset's name (a file of ``conf/data/``, e.g. ``"omniglot_small"``)
  or a dict of native options (``metalearn.data.<dataset>.Config``), e.g. to read the small
  Omniglot subsets or to set ``image_size``. Omniglot's rotations come from
  ``class_augmentations`` as in torchmeta, so the native ``rotations`` option stays off.
- extras, not in torchmeta: ``Glyphs`` (metalearn's offline procedural characters), ``MNIST``
  (the 10 digits as classes) and ``ImageFolder`` (your own images, one folder per class).
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import OmegaConf

from metalearn.errors import DataError, not_provided
from metalearn.confdir import CONF_DIR
from metalearn.data import dataset_module
from metalearn.data.episodes import ClassStore
from metalearn.torchmeta._core import CombinationMetaDataset, StoreClassDataset, meta_split_of
from metalearn.torchmeta._errors import InvalidArgument, unsupported

#: The datasets backed by a native one (torchmeta's, then metalearn's extras).
PROVIDED = ["Omniglot", "MiniImagenet", "TieredImagenet", "CIFARFS", "FC100", "CUB", "DoubleMNIST",
            "Glyphs", "MNIST", "ImageFolder"]

__all__ = [
    *PROVIDED,
    # torchmeta datasets without a native one: using them raises Unsupported
    "TripleMNIST", "CIFAR100", "Pascal5i", "TCGA", "Omniprint", "helpers",
]

# Native stores already loaded in this process, by dataset and config (train/val/test come from one load).
_LOADED: dict[tuple[str, str], dict[str, ClassStore]] = {}


def native_config(name: str, root: Any, download: bool | None, config: str | dict | None, forced: dict | None = None,
                  root_field: str = "root"):
    """The native ``Config`` of dataset ``name``: a preset or dict (``config``), then ``root`` (as the
    option ``root_field``) and ``download``."""
    from metalearn.config import _typed

    module = dataset_module(name)
    fields = set(module.Config.__dataclass_fields__)
    node: dict = {}
    overrides: dict = {}
    if isinstance(config, str):
        path = CONF_DIR / "data" / f"{config}.yaml"
        if not path.is_file():
            presets = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml")
                             if OmegaConf.load(p).get("name") == name)
            raise InvalidArgument(f"no data preset {config!r}; the presets of {name} are: {', '.join(presets)}")
        preset = OmegaConf.load(path)
        if preset.get("name") != name:
            raise InvalidArgument(f"data preset {config!r} is a {preset.get('name')} preset, not {name}; give one of {name}'s")
        if root_field in preset and root is not None:
            preset[root_field] = str(root)
        node = OmegaConf.to_container(preset, resolve=True)
        node.pop("defaults", None)  # the option's choices of other groups (sinusoid: backbone=mlp)
    elif isinstance(config, dict):
        overrides = dict(config)
    elif config is not None:
        raise InvalidArgument(f"config must be a data preset name or a dict of {name} options (got {type(config).__name__})")
    if root is not None and root_field in fields:
        node[root_field] = str(root)
    if download is not None and "download" in fields:
        node["download"] = bool(download)
    for key, value in (forced or {}).items():
        if key in overrides and overrides[key] != value:
            raise unsupported(f"config={{{key!r}: {overrides[key]!r}}}",
                              f"metalearn.torchmeta sets {key}={value!r} itself (use class_augmentations)")
        node[key] = value
    node.update(overrides)
    node["name"] = name
    return _typed(module.Config, node, "config")


def load_native(name: str, cfg: Any) -> dict[str, ClassStore]:
    key = (name, repr(cfg))
    if key not in _LOADED:
        try:
            _LOADED[key] = dataset_module(name).load(cfg)
        except DataError as e:  # the native line speaks of data.root: here that is the dataset's folder argument
            raise type(e)(str(e).replace("set data.root to", "give as the dataset's folder (data.root)")) from None
    return _LOADED[key]


class NativeMetaDataset(CombinationMetaDataset):
    """A torchmeta dataset over one split of the native dataset ``native`` (a ``metalearn.data`` name)."""

    native = ""
    forced: dict = {}
    root_field = "root"  # the native option the first argument sets

    def __init__(self, root: Any, num_classes_per_task: int | None = None, meta_train: bool = False,
                 meta_val: bool = False, meta_test: bool = False, meta_split: str | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 dataset_transform: Any = None, class_augmentations: list | None = None,
                 download: bool = False, config: str | dict | None = None):
        split = meta_split_of(meta_train, meta_val, meta_test, meta_split)
        if num_classes_per_task is None:
            raise InvalidArgument(f"{type(self).__name__} needs num_classes_per_task, the ways of each task")
        cfg = native_config(self.native, root, download, config, self.forced, self.root_field)
        self.config = cfg
        stores = load_native(self.native, cfg)
        super().__init__(StoreClassDataset(stores[split], split, transform, class_augmentations),
                         num_classes_per_task, target_transform, dataset_transform)


class Omniglot(NativeMetaDataset):
    """Omniglot, with the Vinyals et al. split of the background and evaluation sets (1028/172/423
    characters), 28x28, ink 1.0 on 0. ``class_augmentations=[Rotation([90, 180, 270])]`` makes
    each character's rotations further classes (the standard benchmark; ``helpers.omniglot`` sets it).
    The small real subsets: ``config="omniglot_small"`` (split by alphabet, see README)."""

    native = "omniglot"
    forced = {"rotations": False}

    def __init__(self, root, num_classes_per_task=None, meta_train=False, meta_val=False, meta_test=False,
                 use_vinyals_split=True, transform=None, target_transform=None, dataset_transform=None,
                 meta_split=None, class_augmentations=None, download=False, config=None):
        if not use_vinyals_split:
            raise unsupported("Omniglot(use_vinyals_split=False)",
                              "the Vinyals split is used; for a split by alphabet give config={'train': [...], "
                              "'val': [...], 'test': [...]} (alphabet names or patterns)")
        super().__init__(root, num_classes_per_task, meta_train, meta_val, meta_test, meta_split, transform,
                         target_transform, dataset_transform, class_augmentations, download, config)


class MiniImagenet(NativeMetaDataset):
    """miniImageNet, Ravi & Larochelle's 64/16/20 class split, 84x84 RGB (files put in place by hand)."""

    native = "miniimagenet"


class TieredImagenet(NativeMetaDataset):
    """tieredImageNet, Ren et al.'s 351/97/160 class split, 84x84 RGB (files put in place by hand)."""

    native = "tieredimagenet"


class CIFARFS(NativeMetaDataset):
    """CIFAR-FS, Bertinetto et al.'s 64/16/20 split of CIFAR-100, 32x32 RGB."""

    native = "cifarfs"


class FC100(NativeMetaDataset):
    """FC100, Oreshkin et al.'s split of CIFAR-100 by superclass (60/20/20 classes), 32x32 RGB."""

    native = "fc100"


class CUB(NativeMetaDataset):
    """CUB-200-2011, the 100/50/50 class split, 84x84 RGB (whole image resized)."""

    native = "cub"


class DoubleMNIST(NativeMetaDataset):
    """DoubleMNIST, torchmeta's 64/16/20 class split, 64x64 (composed from MNIST by metalearn)."""

    native = "doublemnist"


class Glyphs(NativeMetaDataset):
    """metalearn's procedural Omniglot-like characters: offline, deterministic, nothing on disk
    (``root`` is accepted and unused). An extra, not in torchmeta; options via ``config``, e.g.
    ``config={"split_sizes": [100, 20, 20], "samples_per_class": 20}``."""

    native = "glyphs"

    def __init__(self, root=None, num_classes_per_task=None, meta_train=False, meta_val=False, meta_test=False,
                 meta_split=None, transform=None, target_transform=None, dataset_transform=None,
                 class_augmentations=None, download=False, config=None):
        super().__init__(root, num_classes_per_task, meta_train, meta_val, meta_test, meta_split, transform,
                         target_transform, dataset_transform, class_augmentations, download, config)


class MNIST(NativeMetaDataset):
    """MNIST's 10 digits as classes (about 7000 images each), 28x28, split 0-5 / 6-7 / 8-9 (so
    val/test tasks are at most 2-way; another split: ``config={"train": [...], "val": [...],
    "test": [...]}``). An extra, not in torchmeta; files under ``<root>/mnist/``."""

    native = "mnist"


class ImageFolder(NativeMetaDataset):
    """Your own images, one folder per class (every leaf folder under ``folder`` is a class): an
    extra, not in torchmeta. The classes are dealt 60/20/20 to train/val/test by
    ``config={"split_seed": ...}`` (or listed: ``config={"train": [...], "val": [...], "test":
    [...]}``); images are decoded once (``config``: ``image_size``, 84 by default, ``channels`` 3
    or 1, ``invert``) into metalearn's cache under ``config["root"]`` (``~/.cache/metalearn`` by
    default); nothing is written inside ``folder``."""

    native = "imagefolder"
    root_field = "path"

    def __init__(self, folder, num_classes_per_task=None, meta_train=False, meta_val=False, meta_test=False,
                 meta_split=None, transform=None, target_transform=None, dataset_transform=None,
                 class_augmentations=None, download=False, config=None):
        super().__init__(folder, num_classes_per_task, meta_train, meta_val, meta_test, meta_split, transform,
                         target_transform, dataset_transform, class_augmentations, download, config)


def _not_provided(name: str) -> Callable:
    return not_provided("metalearn.torchmeta", f"torchmeta.datasets.{name}",
                        f"metalearn has no native {name}; available: {', '.join(PROVIDED)}")


TripleMNIST = _not_provided("TripleMNIST")
CIFAR100 = _not_provided("CIFAR100")
Pascal5i = _not_provided("Pascal5i")
TCGA = _not_provided("TCGA")
Omniprint = _not_provided("Omniprint")

from metalearn.torchmeta.datasets import helpers  # noqa: E402  (torchmeta.datasets.helpers)
