"""Turn Lake et al.'s 20-way one-shot classification runs into metalearn's episode folders.

Lake, Salakhutdinov & Tenenbaum (2015) score one-shot learners on 20 fixed runs, each a
20-way within-alphabet task with one training image per class and 20 test images. The
files are ``python/one-shot-classification/all_runs.zip`` of github.com/brendenlake/omniglot:

    all_runs/run01/training/class01.png .. class20.png   one image of each class (the support set)
    all_runs/run01/test/item01.png .. item20.png         the images to classify (the queries)
    all_runs/run01/class_labels.txt                      "run01/test/item01.png run01/training/class12.png" per line

This writes the layout of ``data=episodes``, one folder per run, one per class (named by its
training image), the test images in the folder of the class class_labels.txt gives them:

    OUT/run01/class12/support/class12.png
    OUT/run01/class12/query/item01.png

Usage (the zip, or its extracted all_runs folder):

    python scripts/prepare_lake_oneshot.py all_runs.zip ~/data/lake_oneshot
    metalearn eval run=<an Omniglot run> data=episodes data.path=~/data/lake_oneshot data.invert=true

The PNGs are black ink on white, so ``data.invert=true`` gives metalearn's ink = 255;
``data.image_size`` and ``data.channels`` default to the checkpoint's (28, 1 for Omniglot
runs). Eval prints the mean accuracy over the 20 runs +- its 95% CI; Lake et al. report the
error rate, 100% minus that mean (every run has 20 test images). Their protocol trains on
the images_background alphabets only: the runs are drawn from images_evaluation.

OUT is written atomically (a temporary folder beside it, renamed when complete) and must not
exist yet. Every mistake ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

LABELS = "class_labels.txt"


class PrepareError(Exception):
    """One line for the user."""


def find_runs(root: Path) -> list[Path]:
    """The run folders (those holding class_labels.txt) at or below ``root``, sorted by name."""
    runs = sorted({p.parent for p in root.rglob(LABELS)
                   if not any(part.startswith(("__", ".")) for part in p.relative_to(root).parts)}, key=lambda p: p.name)
    if not runs:
        raise PrepareError(f"no run folder with {LABELS} under {root}; give Lake's all_runs folder or all_runs.zip")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PrepareError(f"two run folders under {root} have the same name ({names}); give one all_runs folder")
    return runs


def read_run(run: Path) -> dict[str, tuple[Path, list[Path]]]:
    """{class name: (its training image, its test images)} of one run, from class_labels.txt."""
    def resolve(entry: str, line_no: int) -> Path:
        parts = PurePosixPath(entry.replace("\\", "/")).parts
        path = run.joinpath(*parts[-2:])  # "run01/test/item01.png" or "test/item01.png": relative to the run
        if len(parts) < 2 or not path.is_file():
            raise PrepareError(f"{run / LABELS} line {line_no}: {entry} is not a file of {run}")
        return path

    classes: dict[str, tuple[Path, list[Path]]] = {}
    seen: set[Path] = set()
    lines = (run / LABELS).read_text().splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise PrepareError(f"{run / LABELS} line {line_no}: expected '<test image> <training image>', got {line!r}")
        test, train = resolve(fields[0], line_no), resolve(fields[1], line_no)
        if test in seen:
            raise PrepareError(f"{run / LABELS} line {line_no}: {fields[0]} is listed twice")
        seen.add(test)
        classes.setdefault(train.stem, (train, []))[1].append(test)
    training = sorted(p for p in (run / "training").glob("*") if p.is_file() and not p.name.startswith("."))
    untested = [p.name for p in training if p.stem not in classes]
    if untested:
        raise PrepareError(f"{run / LABELS} gives no test image to {', '.join(untested)}; every class needs one")
    if len(classes) < 2:
        raise PrepareError(f"{run} has {len(classes)} class(es); an episode needs two or more")
    return dict(sorted(classes.items()))


def convert(source: Path, out: Path) -> list[tuple[str, int, int]]:
    """Write the episode folders of every run under ``source`` (a folder or a .zip) to ``out``, atomically.

    Returns (run, ways, test images) per run.
    """
    if out.exists():
        raise PrepareError(f"{out} exists already; remove it or give another output folder")
    if not source.exists():
        raise PrepareError(f"{source} does not exist; give Lake's all_runs folder or all_runs.zip")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        root = source
        if source.is_file():
            try:
                with zipfile.ZipFile(source) as archive:
                    archive.extractall(work / "extracted")
            except (zipfile.BadZipFile, OSError) as e:
                raise PrepareError(f"cannot read {source} as a zip archive ({e}); give all_runs.zip or its folder") from None
            root = work / "extracted"
        summary = []
        episodes = work / "episodes"
        for run in find_runs(root):
            classes = read_run(run)
            for name, (train, tests) in classes.items():
                (episodes / run.name / name / "support").mkdir(parents=True)
                (episodes / run.name / name / "query").mkdir()
                shutil.copy2(train, episodes / run.name / name / "support" / train.name)
                for test in tests:
                    shutil.copy2(test, episodes / run.name / name / "query" / test.name)
            summary.append((run.name, len(classes), sum(len(t) for _, t in classes.values())))
        os.replace(episodes, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="all_runs.zip, or the all_runs folder extracted from it")
    parser.add_argument("out", type=Path, help="the episode folder to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.source.expanduser(), args.out.expanduser())
    except PrepareError as e:
        print(f"prepare_lake_oneshot: error: {e}", file=sys.stderr)
        return 2
    ways = sorted({w for _, w, _ in summary})
    tests = sum(t for _, _, t in summary)
    print(f"{len(summary)} episodes ({'/'.join(map(str, ways))}-way 1-shot, {tests} test images) -> {args.out}")
    print(f"score them: metalearn eval run=<run dir> data=episodes data.path={args.out} data.invert=true")
    return 0


if __name__ == "__main__":
    sys.exit(main())
