"""Build miniImageNet's pickle files from ImageNet's train images.

    python scripts/build_miniimagenet.py IMAGENET [--splits DIR] [--out DIR] [--size 84]

IMAGENET is the ILSVRC-2012 folder holding ``train/<wnid>/<wnid>_<number>.JPEG`` (or that
``train`` folder itself). The split files are Ravi & Larochelle's ``train.csv``, ``val.csv``
and ``test.csv`` (github.com/twitter/meta-learning-lstm, data/miniImagenet/), read from
--splits (default: the output folder). A row ``n0153282900000005.jpg,n01532829`` names the
5th image of class n01532829, counting the class folder's ``n01532829_<number>.JPEG`` files
in increasing order of <number> from 1: the convention of the scripts that build
miniImageNet from ImageNet (e.g. mini-imagenet-tools' mini_imagenet_generator.py).

Each image is converted to RGB and resized to --size (84) with Pillow's box filter (the
pixel-area average, as those scripts' cv2.INTER_AREA), and each split is written to
``<out>/mini-imagenet-cache-<split>.pkl`` as ``{"image_data": uint8 [N, size, size, 3],
"class_dict": {wnid: [row indices]}}``, the form ``data=miniimagenet`` reads. The default
output folder is ``$METALEARN_DATA/miniimagenet`` (``~/.cache/metalearn/miniimagenet``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from metalearn.data import SPLITS
from metalearn.data.images import PIL_BOX, decode_array, decode_many
from metalearn.data.miniimagenet import read_split_csv
from metalearn.errors import DataError, MetalearnError
from metalearn.fileio import atomic_path


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path(os.environ.get("METALEARN_DATA", "~/.cache/metalearn")).expanduser()
    out = Path(args.out).expanduser() if args.out else root / "miniimagenet"
    splits = Path(args.splits).expanduser() if args.splits else out
    try:
        if args.size < 1:
            raise DataError(f"--size must be >= 1 (got {args.size})")
        train_dir = imagenet_train_dir(Path(args.imagenet).expanduser())
        csvs = {split: splits / f"{split}.csv" for split in SPLITS}
        missing = [path.name for path in csvs.values() if not path.is_file()]
        if missing:
            raise DataError(
                f"split file(s) {', '.join(missing)} not found in {splits}; put Ravi & Larochelle's train.csv, val.csv "
                "and test.csv there (github.com/twitter/meta-learning-lstm, data/miniImagenet/) or pass --splits DIR"
            )
        for split, csv_path in csvs.items():
            data = build_split(read_split_csv(csv_path), train_dir, args.size)
            path = out / f"mini-imagenet-cache-{split}.pkl"
            write_pickle(data, path)
            print(f"{split}: {len(data['image_data'])} images of {len(data['class_dict'])} classes -> {path}")
    except MetalearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build mini-imagenet-cache-{train,val,test}.pkl from ImageNet's train images.")
    parser.add_argument("imagenet", help="ILSVRC-2012 folder holding train/<wnid>/<wnid>_<n>.JPEG (or that train folder)")
    parser.add_argument("--splits", help="folder with Ravi & Larochelle's train.csv, val.csv, test.csv (default: --out)")
    parser.add_argument("--out", help="output folder (default: $METALEARN_DATA/miniimagenet, else ~/.cache/metalearn/miniimagenet)")
    parser.add_argument("--size", type=int, default=84, help="image side in pixels (default 84, the benchmark's)")
    return parser


def imagenet_train_dir(imagenet: Path) -> Path:
    """``imagenet/train`` if there is one, else ``imagenet`` (given the train folder itself)."""
    train = imagenet / "train" if (imagenet / "train").is_dir() else imagenet
    if not train.is_dir():
        raise DataError(f"ImageNet folder {imagenet} not found; give the folder that holds train/<wnid>/<wnid>_<n>.JPEG")
    return train


def class_images(train_dir: Path, wnid: str) -> list[Path]:
    """The images ``<wnid>_<number>.<ext>`` of a class folder, in increasing order of <number>."""
    folder = train_dir / wnid
    if not folder.is_dir():
        raise DataError(f"class folder {folder} not found; {train_dir} must hold ImageNet's train images as <wnid>/<wnid>_<n>.JPEG")
    numbered = []
    for path in folder.iterdir():
        prefix, _, number = path.stem.rpartition("_")
        if prefix == wnid and number.isdigit():
            numbered.append((int(number), path))
    return [path for _, path in sorted(numbered)]


def source_image(filename: str, wnid: str, images: list[Path]) -> Path:
    """The ImageNet image that a split row names: ``<wnid><8-digit n>.jpg`` is the n-th (from 1) of ``images``."""
    stem = Path(filename).stem
    number = stem[len(wnid):]
    if not stem.startswith(wnid) or not number.isdigit():
        raise DataError(f"split row {filename},{wnid} does not name an image of {wnid} as <wnid><number>.jpg; check the split file")
    n = int(number)
    if not 1 <= n <= len(images):
        raise DataError(
            f"split row {filename} names image {n} of {wnid}, but its ImageNet folder has {len(images)}; "
            "the ImageNet train folder is incomplete"
        )
    return images[n - 1]


def build_split(rows: list[tuple[str, str]], train_dir: Path, size: int) -> dict:
    """``{"image_data": uint8 [N, size, size, 3], "class_dict": {wnid: [row indices]}}`` of one split's rows."""
    folders: dict[str, list[Path]] = {}
    paths, class_dict = [], {}
    for i, (filename, wnid) in enumerate(rows):
        if wnid not in folders:
            folders[wnid] = class_images(train_dir, wnid)
        paths.append(source_image(filename, wnid, folders[wnid]))
        class_dict.setdefault(wnid, []).append(i)
    image_data = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(decode_many(lambda path: load_resized(path, size), paths)):
        image_data[i] = image.transpose(1, 2, 0)  # the pickles hold [N, H, W, 3]
    return {"image_data": image_data, "class_dict": class_dict}


def load_resized(path: Path, size: int) -> np.ndarray:
    """One image as uint8 [3, size, size] RGB, resized with Pillow's box filter."""
    return decode_array(path, mode="RGB", size=size, resample=PIL_BOX,
                        error=lambda e: f"cannot read {path} ({e}); the ImageNet image is damaged: replace it")


def write_pickle(data: dict, path: Path) -> None:
    """Written whole or not at all (a temp file renamed into place)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)  # protocol 4: objects over 4 GB, readable since Python 3.4
    except OSError as e:
        raise DataError(f"cannot write {path} ({e}); make room there or make the folder writable") from None


if __name__ == "__main__":
    sys.exit(main())
