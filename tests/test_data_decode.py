"""Every image dataset decodes and resizes exactly as it did before the shared decoder
(``metalearn/data/images.py``, issue #16): the same uint8 tensors, byte for byte, in the same
order, with the same labels. Cached datasets and published figures depend on it.

The reference is ORACLE below: a frozen copy of the decode and resize code each dataset had
before, run here on the same files, so the check holds with whatever Pillow, libjpeg and CPU
a machine has (JPEG decoders differ across builds; so may float resampling across CPUs).
Where the pipeline is lossless and resamples nothing (PNG, IDX, pickles and npz at their own
size) the outputs are also checked against sha256 digests recorded from the old code: those
inputs are made by integer arithmetic here (no random-number stream), so the digests hold on
any machine. The inputs are tiny (a few hundred images of a few pixels, plus 5 real Omniglot
characters from the shared data when it is there), so this takes a second or two.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metalearn.data import cifar100, cub, doublemnist, episode_folders, imagefolder, miniimagenet, mnist, omniglot
from metalearn.data import tieredimagenet
from test_data_cifar import tar_gz  # the suite's .tar.gz builder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "omniglot"


# ------------------------------------------------------------------ ORACLE: the old code, frozen
# Copied from the datasets as they were before metalearn/data/images.py; do not "fix" it.


def old_pil(source, mode: str, size: int, margin: float = 1.0, invert: bool = False) -> torch.Tensor:
    """cub._decode_jpeg, imagefolder.decode, omniglot._decode_pngs (and episodes, via imagefolder):
    Pillow convert, BILINEAR resize of the uint8 image, CUB's centre crop, 255 - x. -> [C, H, W]."""
    with Image.open(source) as image:
        converted = image.convert(mode)
    scaled = size if margin == 1.0 else int(size * margin)
    converted = converted.resize((scaled, scaled), Image.Resampling.BILINEAR)
    if scaled != size:
        corner = int(round((scaled - size) / 2.0))
        converted = converted.crop((corner, corner, corner + size, corner + size))
    pixels = np.asarray(converted, dtype=np.uint8).reshape(size, size, -1)
    pixels = 255 - pixels if invert else pixels
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def old_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """metalearn.data.transforms.resize: antialiased bilinear on float, rounded (mnist, cifar100,
    doublemnist, miniimagenet, tieredimagenet)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def old_rgb_image(source, size: int) -> torch.Tensor:
    """miniimagenet.rgb_image (miniImageNet's images/ form, tieredImageNet's PNGs): decode whole, then old_resize."""
    with Image.open(source) as image:
        array = np.array(image.convert("RGB"))
    return old_resize(torch.from_numpy(array).permute(2, 0, 1)[None], size)[0]


def old_box(path: Path, size: int) -> np.ndarray:
    """scripts/build_miniimagenet.py load_resized: Pillow BOX. -> [H, W, 3]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX))


# ------------------------------------------------------------------ inputs, the same on every machine


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 pixels that look random, from integer arithmetic only (splitmix64), so identical everywhere."""
    with np.errstate(over="ignore"):
        v = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        v = v ^ (v >> np.uint64(31))
    return (v >> np.uint64(56)).astype(np.uint8).reshape(shape)


def encoded(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# Image files of every kind a folder dataset meets: (file name, bytes).
def mixed_images(seed: int) -> list[tuple[str, bytes]]:
    rgb = lambda h, w, k: noise((h, w, 3), seed * 31 + k)  # noqa: E731
    return [
        ("0.png", encoded(rgb(13, 11, 0), "PNG")),
        ("1.png", encoded(noise((9, 14), seed * 31 + 1), "PNG")),  # greyscale
        ("2.png", encoded(rgb(10, 10, 2), "PNG", "P")),  # palette
        ("3.png", encoded(np.dstack([rgb(7, 12, 3), noise((7, 12), seed)]), "PNG")),  # RGBA
        ("4.png", encoded(noise((15, 15), seed * 31 + 4) > 127, "PNG")),  # 1-bit, as Omniglot's
        ("5.jpg", encoded(rgb(12, 16, 5), "JPEG")),
        ("6.jpeg", encoded(noise((11, 9), seed * 31 + 6), "JPEG")),  # greyscale JPEG
        ("7.bmp", encoded(rgb(6, 5, 7), "BMP")),
        ("8.gif", encoded(rgb(8, 9, 8), "GIF")),
        ("9.webp", encoded(rgb(10, 13, 9), "WEBP")),
    ]


def digest(t: torch.Tensor) -> str:
    t = t.contiguous()
    return hashlib.sha256(f"{tuple(t.shape)} {t.dtype} ".encode() + t.numpy().tobytes()).hexdigest()[:16]


def by_class(stores: dict) -> dict[str, torch.Tensor]:
    """Each class's images, over all splits of a loader: independent of which split holds which class."""
    out = {}
    for store in stores.values():
        for name, o, n in zip(store.class_names, store.offsets.tolist(), store.counts.tolist()):
            out[name] = store.images[o : o + n]
    return out


# ------------------------------------------------------------------ the datasets
# Each case: (what the loader gives now, what ORACLE gives), as dicts of tensors (and name lists).

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def omniglot_tree(root: Path, chosen: dict[str, list[str]]) -> list[Path]:
    """Extract the chosen <Alphabet>/characterNN folders of the shared small subsets, as the loader extracts them."""
    dirs = []
    for archive, prefixes in chosen.items():
        with zipfile.ZipFile(SHARED / f"{archive}.zip") as zf:
            for name in zf.namelist():
                if name.endswith(".png") and any(name.startswith(f"{archive}/{p}/") for p in prefixes):
                    write(root / name, zf.read(name))
        dirs.append(root / archive)
    return dirs


def omniglot_oracle(dirs: list[Path], size: int) -> dict:
    images, chars, keys = [], [], []
    for root in dirs:
        for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                for path in sorted(p for p in char.iterdir() if p.suffix == ".png"):
                    images.append(old_pil(path, "L", size, invert=True))
                    chars.append(len(keys))
                keys.append([root.name, alphabet.name, char.name])
    return {"images": torch.stack(images), "chars": torch.tensor(chars), "keys": keys}


def omniglot_case(dirs: list[Path], names: list[str]) -> tuple[dict, dict]:
    got, expected = {}, {}
    for size in (28, 105, 17):
        data, reference = omniglot._decode_archives(names, dirs, size), omniglot_oracle(dirs, size)
        for field in ("images", "chars", "keys"):
            got[f"{size}px {field}"], expected[f"{size}px {field}"] = data[field], reference[field]
    return got, expected


@case
def omniglot_real(tmp):
    if not SHARED.is_dir():
        pytest.skip(f"shared Omniglot data not found at {SHARED}")
    chosen = {"images_background_small1": ["Greek/character01", "Korean/character05", "Latin/character26"],
              "images_background_small2": ["Tagalog/character03", "Sanskrit/character10"]}
    return omniglot_case(omniglot_tree(tmp, chosen), list(chosen))


@case
def omniglot_fake(tmp):
    names = ["set_a", "set_b"]
    for a, name in enumerate(names):
        for c in range(2):
            for d in range(3):
                pixels = noise((105, 105), 100 * a + 10 * c + d)
                data = encoded(pixels > 30, "PNG") if d < 2 else encoded(pixels, "PNG")
                write(tmp / name / f"Alpha{a}" / f"character{c + 1:02d}" / f"{c:04d}_{d:02d}.png", data)
    return omniglot_case([tmp / n for n in names], names)


@case
def cub_archive(tmp):
    members, listing = {}, []
    class_names = [f"{i:03d}.Bird_{i:03d}" for i in range(1, 201)]
    for c, name in enumerate(class_names):
        path = f"{name}/Bird_{c + 1:03d}_0001.jpg"
        h, w = 9 + c % 7, 12 + c % 5
        if c % 50 == 1:
            data = encoded(noise((h, w), c), "JPEG")  # greyscale photos exist in CUB
        elif c % 50 == 2:
            data = encoded(noise((h, w, 3), c), "JPEG", "CMYK")
        else:
            data = encoded(noise((h, w, 3), c), "JPEG")
        members[f"CUB_200_2011/images/{path}"] = data
        listing.append(path)
    members["CUB_200_2011/classes.txt"] = "".join(f"{i} {n}\n" for i, n in enumerate(class_names, 1)).encode()
    # images.txt lists the images out of class order: the loader sorts them by class.
    order = sorted(range(200), key=lambda i: (i * 7) % 200)
    members["CUB_200_2011/images.txt"] = "".join(f"{k + 1} {listing[i]}\n" for k, i in enumerate(order)).encode()
    archive = write(tmp / "CUB_200_2011.tgz", tar_gz(members))
    got, expected = {}, {}
    for size, margin in ((10, 1.0), (8, 1.5), (12, 1.15)):
        data = cub._decode(archive, size, margin)
        key = f"{size}px margin {margin}"
        got[key], got[f"{key} labels"], got["class_names"] = data["images"], data["labels"], data["class_names"]
        labels = torch.tensor([class_names.index(listing[i].split("/")[0]) for i in order])
        images = torch.stack([old_pil(io.BytesIO(members[f"CUB_200_2011/images/{listing[i]}"]), "RGB", size, margin)
                              for i in order])
        sort = torch.argsort(labels, stable=True)
        expected[key], expected[f"{key} labels"], expected["class_names"] = images[sort], labels[sort], class_names
    return got, expected


def folder_oracle(classes: dict[str, list[Path]], size: int, channels: int, invert: bool) -> dict:
    images = [old_pil(p, "L" if channels == 1 else "RGB", size, invert=invert) for paths in classes.values() for p in paths]
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor([len(p) for p in classes.values()]))
    return {"images": torch.stack(images), "labels": labels, "class_names": list(classes)}


@case
def imagefolder_tree(tmp):
    for c, name in enumerate(["Alpha/x", "Alpha/y", "Beta"]):
        for file, data in mixed_images(c):
            write(tmp / "mixed" / name / file, data)
    for c in range(3):  # lossless and all 8x8: the native-size case
        for i in range(4):
            write(tmp / "native" / f"c{c}" / f"{i}.png", encoded(noise((8, 8, 3), 10 * c + i), "PNG"))
    got, expected = {}, {}
    for tree, size, channels, invert in (("mixed", 8, 3, False), ("mixed", 7, 1, True), ("mixed", 16, 3, True),
                                         ("native", 8, 3, False), ("native", 8, 1, True)):
        classes = imagefolder.find_classes(tmp / tree)
        data = imagefolder._decode_classes(classes, size, channels, invert)
        reference = folder_oracle(classes, size, channels, invert)
        for field in ("images", "labels", "class_names"):
            key = f"{tree} {size}px {channels}ch{' inverted' if invert else ''} {field}"
            got[key], expected[key] = data[field], reference[field]
    return got, expected


@case
def episode_folders_tree(tmp):
    for e in range(2):  # 2-way 1-shot, then 3-way 2-shot; 2 queries a class; files of every kind
        for c in range(2 + e):
            files = mixed_images(10 * e + c)
            for s, chosen in (("support", files[c : c + 1 + e]), ("query", files[5 + c : 7 + c])):
                for file, data in chosen:
                    write(tmp / "episodes" / f"ep{e}" / f"c{c}" / s / file, data)
    got, expected = {}, {}
    for size, channels, invert in ((6, 1, True), (9, 3, False)):
        cfg = episode_folders.Config(path=str(tmp / "episodes"), image_size=size, channels=channels, invert=invert)
        for e, episode in enumerate(episode_folders.load(cfg)["test"].episodes):
            key = f"ep{e} {size}px {channels}ch"
            folder = tmp / "episodes" / f"ep{e}"
            for s in ("support", "query"):
                files = [p for c in sorted(folder.iterdir()) for p in sorted((c / s).iterdir())]
                counts = [len(list((c / s).iterdir())) for c in sorted(folder.iterdir())]
                mode = "L" if channels == 1 else "RGB"
                expected[f"{key} {s}"] = torch.stack([old_pil(p, mode, size, invert=invert) for p in files])
                expected[f"{key} {s} labels"] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
                got[f"{key} {s}"], got[f"{key} {s} labels"] = getattr(episode, f"{s}_x"), getattr(episode, f"{s}_y")
    return got, expected


def mini_class_dict(n: int) -> dict[str, list[int]]:
    """Three classes, rows interleaved, listed out of name order (the loader sorts classes by wnid)."""
    return {wnid: list(range(c, n, 3)) for c, wnid in ((2, "n03"), (0, "n01"), (1, "n02"))}


@case
def miniimagenet_pickle(tmp):
    images = noise((12, 20, 20, 3), 7)
    class_dict = mini_class_dict(len(images))
    path = write(tmp / "mini-imagenet-cache-train.pkl", pickle.dumps({"image_data": images, "class_dict": class_dict}, protocol=4))
    got, expected = {}, {}
    rows = np.concatenate([class_dict[w] for w in sorted(class_dict)])
    for size in (20, 12, 29):
        data = miniimagenet._from_pickle(path, size)
        got[f"{size}px"], got[f"{size}px labels"], got["class_names"] = data["images"], data["labels"], data["class_names"]
        expected[f"{size}px"] = old_resize(torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2), size)
        expected[f"{size}px labels"] = torch.arange(3).repeat_interleave(4)
        expected["class_names"] = sorted(class_dict)
    return got, expected


@case
def miniimagenet_images(tmp):
    folder = tmp / "mini"
    lines, files = ["filename,label"], []
    for i, (file, data) in enumerate(mixed_images(3)[:9]):  # PNGs of every mode and JPEGs, as the CSV names them
        wnid = f"n0{(i * 2) % 3 + 1}"
        name = f"{wnid}{i:08d}{Path(file).suffix}"
        write(folder / "images" / name, data)
        lines.append(f"{name},{wnid}")
        files.append((wnid, folder / "images" / name))
    write(folder / "train.csv", ("\n".join(lines) + "\n").encode())
    got, expected = {}, {}
    ordered = [path for wnid in sorted({w for w, _ in files}) for w, path in files if w == wnid]
    for size in (16, 7):
        data = miniimagenet._from_images(folder / "train.csv", folder / "images", size)
        got[f"{size}px"], got[f"{size}px labels"] = data["images"], data["labels"]
        expected[f"{size}px"] = torch.stack([old_rgb_image(p, size) for p in ordered])
        expected[f"{size}px labels"] = torch.tensor([int(p.name[2]) - 1 for p in ordered])
    return got, expected


@case
def tieredimagenet_png(tmp):
    images = noise((7, 20, 20, 3), 11)
    pngs = [encoded(x, "PNG") for x in images]
    items = list(pngs)
    items[1::2] = [np.frombuffer(b, dtype=np.uint8).reshape(-1, 1) for b in items[1::2]]  # cv2.imencode's arrays
    path = write(tmp / "train_images_png.pkl", pickle.dumps(items, protocol=2))
    got, expected = {}, {}
    for size in (20, 12):
        got[f"{size}px"] = torch.cat(list(tieredimagenet.PngImages(path).chunks(size)))
        expected[f"{size}px"] = torch.stack([old_rgb_image(io.BytesIO(png), size) for png in pngs])
    return got, expected


@case
def tieredimagenet_npz(tmp):
    images = noise((6, 20, 20, 3), 13)
    path = tmp / "train_images.npz"
    np.savez(path, images=images)
    got, expected = {}, {}
    for channels, size in (("bgr", 20), ("rgb", 20), ("bgr", 12), ("rgb", 9)):
        got[f"{channels} {size}px"] = torch.cat(list(tieredimagenet.NpzImages(path, channels).chunks(size)))
        x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2)
        expected[f"{channels} {size}px"] = old_resize(x.flip(1) if channels == "bgr" else x, size)
    return got, expected


def idx_gz(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def mnist_root(tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The four IDX files (3 + 1 images per digit) under tmp/mnist; their images and labels, train file first."""
    parts = []
    for k, (part, per) in enumerate((("train", 3), ("t10k", 1))):
        labels = (np.arange(10 * per) * 7) % 10  # every digit, out of order
        images = noise((len(labels), 28, 28), 50 + k)
        write(tmp / "mnist" / f"{part}-images-idx3-ubyte.gz", idx_gz(images))
        write(tmp / "mnist" / f"{part}-labels-idx1-ubyte.gz", idx_gz(labels))
        parts.append((images, labels))
    return tmp, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


NO_MD5 = {key: "" for key in mnist.FILES}


@case
def mnist_files(tmp):
    root, images, labels = mnist_root(tmp)
    got, expected = {}, {}
    for size in (28, 20, 32):
        stores = mnist.load(mnist.Config(root=str(root), download=False, md5=NO_MD5, image_size=size))
        resized = old_resize(torch.from_numpy(images).unsqueeze(1), size)
        classes = by_class(stores)
        got[f"{size}px"] = torch.cat([classes[str(d)] for d in range(10)])  # each digit's images, in file order
        expected[f"{size}px"] = torch.cat([resized[torch.from_numpy(labels == d)] for d in range(10)])
    return got, expected


@case
def doublemnist_files(tmp):
    root, images, _ = mnist_root(tmp)
    got, expected = {}, {}
    cfg = lambda size: doublemnist.Config(root=str(root), download=False, md5=NO_MD5, images_per_class=2, image_size=size)  # noqa: E731
    names = [f"{n:02d}" for n in range(100)]
    square = by_class(doublemnist.load(cfg(56)))  # 2 digits side by side, padded to 56x56: nothing resampled
    small = by_class(doublemnist.load(cfg(16)))
    got["56px"] = torch.cat([square[n] for n in names])
    got["16px"] = torch.cat([small[n] for n in names])
    expected["16px"] = old_resize(got["56px"], 16)
    # The square itself, rebuilt by the old compose (pad, then old_resize at the square's size: no-op).
    left, right = torch.from_numpy(images[:3]).unsqueeze(1), torch.from_numpy(images[3:6]).unsqueeze(1)
    got["compose 16px"] = doublemnist.compose(left, right, 16)
    pair = torch.cat([left, right], dim=-1)
    expected["compose 16px"] = old_resize(F.pad(pair, (0, 0, 14, 14)), 16)
    expected["56px"] = got["56px"]  # checked by its digest
    return got, expected


@case
def cifar100_archive(tmp):
    fine = [f"fine{i:02d}" for i in range(100)]
    coarse = [f"coarse{i:02d}" for i in range(20)]

    def batch(seed: int) -> tuple[bytes, np.ndarray, list[int]]:
        labels = [(7 * i + seed) % 100 for i in range(100)]
        data = noise((100, 3 * 32 * 32), seed)
        content = {b"fine_labels": labels, b"coarse_labels": [f % 20 for f in labels], b"data": data}
        return pickle.dumps(content, protocol=2), data, labels

    (train, train_x, train_y), (test, test_x, test_y) = batch(1), batch(2)
    meta = pickle.dumps({"fine_label_names": fine, "coarse_label_names": coarse}, protocol=2)
    archive = write(tmp / "cifar-100-python.tar.gz", tar_gz({
        "cifar-100-python/meta": meta, "cifar-100-python/train": train, "cifar-100-python/test": test}))
    got, expected = {}, {}
    labels = torch.tensor(train_y + test_y)
    order = torch.argsort(labels, stable=True)
    flat = torch.from_numpy(np.concatenate([train_x, test_x])).view(-1, 3, 32, 32)[order]
    for size in (32, 20, 40):
        data = cifar100._decode(archive, size)
        got[f"{size}px"], got[f"{size}px labels"] = data["images"], data["fine_labels"]
        expected[f"{size}px"], expected[f"{size}px labels"] = old_resize(flat, size), labels[order]
    return got, expected


@case
def build_miniimagenet_script(tmp):
    spec = importlib.util.spec_from_file_location("build_miniimagenet", REPO / "scripts" / "build_miniimagenet.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    train = tmp / "train"
    rows = []
    for c, wnid in enumerate(["n01", "n02"]):
        for i, (_, data) in enumerate(mixed_images(c)[:6]):
            write(train / wnid / f"{wnid}_{i + 1}.JPEG", data)
            rows.append((f"{wnid}{i + 1:08d}.jpg", wnid))
    got, expected = {}, {}
    for size in (10, 5):
        data = script.build_split(rows, train, size)
        got[f"{size}px"], got[f"{size}px class_dict"] = torch.from_numpy(data["image_data"]), data["class_dict"]
        expected[f"{size}px"] = torch.from_numpy(np.stack(
            [old_box(train / w / f"{w}_{int(f[len(w):-4])}.JPEG", size) for f, w in rows]))
        expected[f"{size}px class_dict"] = {"n01": list(range(6)), "n02": list(range(6, 12))}
    return got, expected


# ------------------------------------------------------------------ the checks

# sha256 (first 16 hex digits) of the outputs that nothing resampled, recorded from the old code.
DIGESTS = {
    "cifar100_archive/32px": "b85deb3a9a9bbb21",
    "cifar100_archive/32px labels": "08f3a07b0bab90e4",
    "doublemnist_files/56px": "ba26b5b5770359de",
    "imagefolder_tree/native 8px 3ch images": "dcb2a17cc0aa7e3b",
    "imagefolder_tree/native 8px 3ch labels": "3662f8b9bde6a6b3",
    "imagefolder_tree/native 8px 1ch inverted images": "5b4d461082fd2fea",
    "miniimagenet_pickle/20px": "755d7d3d0195e890",
    "miniimagenet_pickle/20px labels": "3662f8b9bde6a6b3",
    "mnist_files/28px": "64b0250fd4b7fe83",
    "omniglot_fake/105px images": "041eed6d06784f95",
    "omniglot_fake/105px chars": "40e821deafedbbcf",
    "omniglot_real/105px images": "90e43766785feee0",
    "omniglot_real/105px chars": "4d5f88ac08af88b4",
    "tieredimagenet_npz/bgr 20px": "adff6457b64e32e2",
    "tieredimagenet_npz/rgb 20px": "326e224987169243",
    "tieredimagenet_png/20px": "afffcd19381b4185",
}


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_image_dataset_decodes_byte_identically_to_the_old_code(name, tmp_path):
    got, expected = CASES[name](tmp_path)
    assert sorted(got) == sorted(expected)
    different = [key for key in got if not equal(got[key], expected[key])]
    assert not different, f"{name}: {different} differ from the old decoder's"
    for key, value in got.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            raise AssertionError(f"{name}: {key} is {value.dtype}, not uint8/int64")
    recorded = {k.split("/", 1)[1]: v for k, v in DIGESTS.items() if k.split("/", 1)[0] == name}
    for key, value in recorded.items():
        assert digest(got[key]) == value, f"{name}: {key} differs from the recorded old output"


# ------------------------------------------------------------------ the shared helper itself


def test_decode_many_is_in_order_lazy_and_raises_the_first_failure_in_order():
    import threading
    import time

    from metalearn.data.images import decode_many
    from metalearn.errors import DataError

    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    def slow_first(i):
        if i == 0:
            time.sleep(0.05)  # the others finish first; the order must still be the items'
        return i * i

    results = decode_many(slow_first, items(), workers=4, window=8, group=2)
    assert next(results) == 0 and len(read) <= 8 + 2  # read only a window ahead
    assert list(results) == [i * i for i in range(1, 100)]

    def failing(i):
        if i in (7, 30):
            raise DataError(f"bad {i}")
        return threading.get_ident()

    with pytest.raises(DataError, match="^bad 7$"):
        list(decode_many(failing, range(60), workers=3, window=16, group=4))


def test_decode_reports_an_unreadable_file_in_one_line_naming_it(tmp_path):
    from metalearn.data.images import decode, decode_into
    from metalearn.errors import DataError

    broken = write(tmp_path / "broken.png", b"not an image")
    with pytest.raises(DataError) as e:
        decode(broken, size=4)
    assert str(e.value).startswith(f"cannot decode image {broken} (") and "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"^mine: .*broken.png"):
        decode(broken, size=4, error=lambda err: f"mine: {broken} ({err})")
    good = write(tmp_path / "good.png", encoded(noise((5, 7, 3), 1), "PNG"))
    out = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    decode_into(out, lambda p, row: row.__setitem__(Ellipsis, decode(p, size=4).numpy()), [good, good, good])
    assert all(torch.equal(x, old_pil(good, "RGB", 4)) for x in out)
    with pytest.raises(DataError, match="broken.png"):
        decode_into(out, lambda p, row: decode(p, size=4), [good, broken, good])
