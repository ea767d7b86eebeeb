"""The bridge from metalearn's data layer: one split of a native dataset as an (image, label) dataset.

A ``ClassStore`` (``metalearn.data.episodes``) holds a split's images as one uint8 tensor sorted by
class, with each class's offset and count. ``StoreDataset`` serves it the way a torchvision dataset
serves its files, so learn2learn code (``MetaDataset``, ``Taskset``, a ``DataLoader``) can use it, and
it tells ``MetaDataset`` every label from the class counts: no image is read to build the label maps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from metalearn.data.episodes import ClassStore


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """A uint8 image as float in [0, 1] (torchvision's ``ToTensor``); float data (feature vectors) as it is."""
    if image.is_floating_point():
        return image
    return image.float().div_(255.0)


class StoreDataset(Dataset):
    """The images of a metalearn ``ClassStore``: sample ``i`` is ``(image i, its class index)``.

    The label is the class's index in the store (``class_names[label]`` names it), a Python int as a
    torchvision dataset gives. ``decode(uint8 image [C, H, W]) -> tensor`` makes the image the model's
    input (default: float in [0, 1]; a benchmark may normalise or augment here); ``transform`` and
    ``target_transform`` are then applied as a torchvision dataset applies them. The images stay where
    the store keeps them (host memory, a memory-mapped cache, or an accelerator: the samples are then on
    that device).
    """

    def __init__(self, store: ClassStore, transform: Callable | None = None,
                 target_transform: Callable | None = None, decode: Callable | None = None):
        if not isinstance(store, ClassStore):
            raise TypeError(f"StoreDataset wraps a metalearn ClassStore, not {type(store).__name__}")
        self.store = store.materialized()  # lazily turned classes (data.rotations) stored: images are read by index
        self.transform = transform
        self.target_transform = target_transform
        self.decode = decode if decode is not None else to_unit_float
        counts = store.counts.cpu()
        # One int per image: labels are read from here, never by loading an image.
        self._labels: list[int] = torch.repeat_interleave(torch.arange(len(counts)), counts).tolist()

    @property
    def class_names(self) -> list[str]:
        return self.store.class_names

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.decode(self.store.images[index])
        label = self._labels[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def labels(self) -> list:
        """Every sample's label, in index order, without reading an image (what ``MetaDataset`` reads)."""
        if self.target_transform is None:
            return list(self._labels)
        return [_scalar(self.target_transform(y)) for y in self._labels]

    def labels_to_indices(self) -> dict[int, list[int]] | None:
        """Class index -> its sample indices, straight from the store's offsets and counts (None when a
        ``target_transform`` may merge or rename classes: then the labels are read one by one)."""
        if self.target_transform is not None:
            return None
        offsets, counts = self.store.offsets.tolist(), self.store.counts.tolist()
        return {c: list(range(o, o + n)) for c, (o, n) in enumerate(zip(offsets, counts)) if n}


def _scalar(label: Any) -> Any:
    """A label as a plain Python value (learn2learn keys its label maps by ``label.item()``)."""
    return label.item() if hasattr(label, "item") else label
