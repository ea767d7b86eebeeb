"""Decoding and resizing images: the one path every image dataset's files go through.

- ``decode(source, ...)``: an encoded image (a path, bytes or a binary stream) as a uint8
  tensor ``[C, H, W]``, converted to greyscale (``mode="L"``, C = 1) or RGB, resized to
  ``size`` x ``size`` (aspect ratio not kept), optionally resized larger and centre-cropped
  (``crop_margin``) and inverted (255 - x). Pillow and numpy only.
- ``resize(images, size)``: uint8 images ``[N, C, H, W]`` that are already tensors (MNIST, CIFAR,
  pickled or npz arrays), antialiased bilinear.
- ``decode_many(decode_one, items)``: ``decode_one`` over many items on a pool of threads, in
  order, with a bounded number in flight; the first failure (in item order) is raised.
  ``decode_into(out, decode_one, items)`` writes the results into a preallocated tensor.

Resampling. The datasets were published (and their caches built) with three filters, and
each keeps its own, because changing one would change every cached image and every number
computed from them. They differ by up to a grey level or two per pixel, not more:

- ``PIL_BILINEAR`` (cub, imagefolder, episodes, omniglot): Pillow's BILINEAR on the decoded
  uint8 image, which on downsampling averages over the source pixels (a triangle filter
  stretched by the scale), in Pillow's fixed-point arithmetic. What torchvision's Resize does
  to PIL images.
- ``PIL_BOX`` (scripts/build_miniimagenet.py): Pillow's BOX, the pixel-area average, as
  cv2.INTER_AREA in the scripts that built the shared miniImageNet files.
- ``TORCH_BILINEAR`` (miniimagenet's images/ form, tieredimagenet's PNGs; and ``resize``, used
  by mnist, doublemnist, cifar100 and the pickle/npz forms): the image decoded at its own size,
  then ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` on float, rounded to
  the nearest integer. The same filter as PIL_BILINEAR, computed in float.

Decoding the same file gives the same tensor with a given Pillow (and libjpeg) build; JPEG
decoders of other builds may differ by a grey level here and there.
"""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metalearn.errors import DataError

PIL_BILINEAR = "pil-bilinear"
PIL_BOX = "pil-box"
TORCH_BILINEAR = "torch-bilinear"
RESAMPLING = (PIL_BILINEAR, PIL_BOX, TORCH_BILINEAR)
_PIL_FILTERS = {PIL_BILINEAR: Image.Resampling.BILINEAR, PIL_BOX: Image.Resampling.BOX}
MODES = {"L": 1, "RGB": 3}  # Pillow mode -> channels

# decode_many: items read ahead of the one being yielded at most (bounds the memory held by
# encoded bytes and decoded images waiting their turn), and items handed to a thread at once
# (a thread pool costs some tens of microseconds per task; a small PNG decodes in about as long).
WINDOW = 256
GROUP = 16

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]
T = TypeVar("T")
R = TypeVar("R")
_BYTES = (bytes, bytearray, memoryview)


def decode(source: Source, *, mode: str = "RGB", size: int | None = None, resample: str = PIL_BILINEAR,
           crop_margin: float = 1.0, invert: bool = False,
           error: Callable[[Exception], str] | None = None) -> torch.Tensor:
    """One encoded image as a uint8 tensor ``[C, size, size]`` (C = 1 for ``mode="L"``, 3 for ``"RGB"``).

    ``size``: None keeps the image's own size. ``resample``: one of RESAMPLING (see the module
    docstring). ``crop_margin`` > 1: resize to ``int(size * crop_margin)`` square instead and
    keep the central ``size`` square, its corner at ``round((scaled - size) / 2)`` as
    torchvision's CenterCrop puts it. ``invert``: 255 - x, last.

    A file Pillow cannot read (missing, truncated, not an image, a decompression bomb) raises
    a DataError whose message is ``error(exception)``: each dataset says what to do about it.
    """
    return torch.from_numpy(decode_array(source, mode=mode, size=size, resample=resample, crop_margin=crop_margin,
                                         invert=invert, error=error))


def decode_array(source: Source, *, mode: str = "RGB", size: int | None = None, resample: str = PIL_BILINEAR,
                 crop_margin: float = 1.0, invert: bool = False, error: Callable[[Exception], str] | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """``decode`` as a numpy array [C, H, W] (C-contiguous, writable), or written into ``out`` (a uint8
    array of that shape, e.g. a row of ``decode_into``'s tensor) and returned."""
    if mode not in MODES or resample not in RESAMPLING or not crop_margin >= 1.0:
        raise ValueError(f"mode must be one of {sorted(MODES)} (got {mode!r}), resample one of {RESAMPLING} "
                         f"(got {resample!r}), crop_margin >= 1 (got {crop_margin})")
    scaled = None if size is None else size if crop_margin == 1.0 else int(size * crop_margin)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, _BYTES) else source) as image:
            converted = image.convert(mode)
        if scaled is not None and resample != TORCH_BILINEAR and converted.size != (scaled, scaled):
            converted = converted.resize((scaled, scaled), _PIL_FILTERS[resample])
        pixels = np.asarray(converted)  # [H, W] or [H, W, 3], read-only
    except MemoryError:
        raise
    except Exception as e:  # Pillow reports broken files with many exception types
        raise DataError(error(e) if error is not None else _unreadable(source, e)) from None
    # Channels first, as views; one copy at the end. Few numpy calls: this runs once per image.
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if scaled is not None and resample == TORCH_BILINEAR:
        # Resized from an [H, W, C] copy permuted to [C, H, W] (not made contiguous): the layout
        # these datasets' images were always resized in (the float kernels may sum in layout order).
        hwc = torch.from_numpy(np.array(chw.transpose(1, 2, 0)))
        chw = resize(hwc.permute(2, 0, 1)[None], scaled)[0].numpy()
    if size is not None and scaled != size:
        corner = int(round((scaled - size) / 2.0))
        chw = chw[:, corner : corner + size, corner : corner + size]
    # 255 - x is the bitwise not of a uint8 (np.invert: a little faster, and this runs per image).
    if out is not None:  # written in place: no array allocated per image
        if invert:
            np.invert(chw, out=out)
        else:
            np.copyto(out, chw)
        return out
    return np.invert(chw, order="C") if invert else np.array(chw, order="C")


def decode_into(out: torch.Tensor, decode_one: Callable[[T, np.ndarray], object], items: Iterable[T],
                **options) -> torch.Tensor:
    """Fill ``out`` (a uint8 tensor [N, C, H, W]) with the N items, decoded on threads as by
    ``decode_many`` (``options``: its keywords), in order; returns ``out``.

    ``decode_one(item, row)`` writes item i into ``row``, a numpy view of ``out[i]`` (pass it
    on as ``decode_array(..., out=row)``). One preallocated tensor holds each image once (not a
    list of them and then a stacked copy), and nothing is allocated per image: decoding small
    images is mostly Python (Pillow's file parsing) holding the GIL, so microseconds count.
    """
    buffer = out.numpy()

    def store(numbered: tuple[int, T]) -> None:
        i, item = numbered
        if i >= len(buffer):
            raise ValueError(f"decode_into: more images than the {len(buffer)} that the output tensor holds")
        decode_one(item, buffer[i])

    count = sum(len(batch) for batch in _batches(store, enumerate(items), **options))
    if count != len(out):
        raise ValueError(f"decode_into: {count} images decoded into a tensor of {len(out)}")
    return out


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize images [..., C, H, W] to ``size`` (antialiased bilinear on float: TORCH_BILINEAR); integer images
    are rounded back to their dtype, float ones stay float32.

    Images already of that size are returned as they are (the same tensor)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    shape = images.shape
    out = F.interpolate(images.reshape(-1, *shape[-3:]).float(), size=size, mode="bilinear", antialias=True,
                        align_corners=False)
    if not images.is_floating_point():
        out = out.round_().clamp_(0, 255).to(images.dtype)
    return out.reshape(*shape[:-2], *size)


def decode_many(decode_one: Callable[[T], R], items: Iterable[T], *, workers: int | None = None,
                window: int = WINDOW, group: int = GROUP) -> Iterator[R]:
    """``decode_one(item)`` for each item, computed on a pool of threads, yielded in the items' order.

    Pillow releases the GIL while it decodes and resizes, and threads overlap the file reads.
    ``items`` is read lazily, at most ``window`` ahead of the result being yielded, so a stream
    of encoded bytes (an archive read member by member) is never all in memory at once. The
    first error in item order (``decode``'s DataError naming the file) is raised when that
    item's turn comes; the queued work is then cancelled (as on Ctrl-C), not waited for.
    """
    for batch in _batches(decode_one, items, workers=workers, window=window, group=group):
        yield from batch


def _batches(decode_one: Callable[[T], R], items: Iterable[T], *, workers: int | None = None,
             window: int = WINDOW, group: int = GROUP) -> Iterator[list[R]]:
    """decode_many's work: the results of ``group`` consecutive items at a time, in order."""
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    group = max(1, min(group, window))
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque = deque()
    try:
        batch: list[T] = []
        for item in items:
            batch.append(item)
            if len(batch) == group:
                pending.append(pool.submit(_each, decode_one, batch))
                batch = []
                while len(pending) * group >= window:
                    yield pending.popleft().result()
        if batch:
            pending.append(pool.submit(_each, decode_one, batch))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _each(decode_one: Callable[[T], R], batch: list[T]) -> list[R]:
    return [decode_one(item) for item in batch]


def _unreadable(source: Source, e: Exception) -> str:
    lines = str(e).splitlines()
    reason = lines[0] if lines else type(e).__name__
    what = f"image {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "an image"
    return f"cannot decode {what} ({reason}); replace or delete it"
