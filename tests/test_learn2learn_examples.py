"""examples/learn2learn/: programs written for learn2learn run with metalearn.learn2learn, the import line changed.

Each example's source is read, its one ``import learn2learn as l2l`` line (and nothing else) becomes
``import metalearn.learn2learn as l2l``, and the result runs as a real subprocess (one thread, on the CPU)
with a small budget; the test asserts it exits 0 and that the ``Meta Test Accuracy`` it prints is well
above chance on classes it never trained on.

Offline data. The examples load ``get_tasksets('omniglot', ..., root='~/data')``, which with metalearn
needs the two full official Omniglot archives (downloaded when missing). No line of an example is
edited to avoid that: the examples' own command-line options, which map one to one to keyword
arguments of their ``main``, choose the data. ``--root`` points at a temporary root holding copies of
the two real small Omniglot subsets of the shared data (``images_background_small{1,2}.zip``, 5
alphabets each: 114 training, 22 validation and 106 test characters of 20 drawings, by alphabet), and
``--config omniglot_small`` is passed by the example to ``get_tasksets`` as ``config=`` (the example
adds that keyword only when the option is given). So the default tier runs the very benchmark the
examples name, ``omniglot``, with its task transforms (fused N-ways K-shots, one random 90-degree
rotation per class), on real handwriting; those tests skip only when the shared data is absent. The
zips are decoded once, in the fixture, into the temporary root's cache (as a first run would do), so
each subprocess times the example, not the PNG decoding. The default tier runs the maml example on it, the
long tier (``-m slow``) the protonet example too, and both examples with ``--dataset glyphs`` (metalearn's procedural, offline glyphs), which needs no data at all.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metalearn.learn2learn as l2l

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "learn2learn"
SHARED = REPO.parent / "shared" / "data" / "omniglot"
LEARN2LEARN_IMPORT = "import learn2learn as l2l"
METALEARN_IMPORT = "import metalearn.learn2learn as l2l"
#: A small glyphs set for the long tier: 60/10/30 classes of 20 samples, drawn in about a second.
GLYPHS = '{"split_sizes": [60, 10, 30]}'

#: Small budgets: each run is 6-8 s of CPU (about 3.5 s of it importing torch and building Adam).
MAML_ARGS = ["--num-iterations", "40", "--meta-batch-size", "8", "--meta-lr", "0.005", "--test-tasks", "200",
             "--log-every", "20"]
PROTONET_ARGS = ["--max-epoch", "2", "--episodes-per-epoch", "50", "--train-ways", "10", "--hidden-size", "32",
                 "--lr", "0.003", "--val-episodes", "10", "--test-episodes", "200"]


def with_metalearn(source: str) -> str:
    """``source`` with its one top-level ``import learn2learn as l2l`` line changed to metalearn's, nothing else."""
    lines = source.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == LEARN2LEARN_IMPORT]
    assert len(hits) == 1, f"expected exactly one line {LEARN2LEARN_IMPORT!r}, found {len(hits)}"
    lines[hits[0]] = METALEARN_IMPORT + "\n"
    changed = "".join(lines)
    # The docstrings may name metalearn; the code itself must not import it.
    assert not re.search(r"^\s*(import|from)\s+metalearn", source, re.M), "the example itself imports metalearn"
    return changed


def run_example(name: str, tmp_path: Path, args: list[str], timeout: float = 300) -> tuple[float, float, str]:
    """Run ``examples/learn2learn/<name>`` with the import line changed, in ``tmp_path``, one thread, on the CPU.
    Returns (meta-test accuracy, CPU seconds of the subprocess, its output)."""
    script = tmp_path / name
    script.write_text(with_metalearn((EXAMPLES / name).read_text()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    for var in ("METALEARN_DATA", "METALEARN_CACHE"):  # the data and its cache: under --root only
        env.pop(var, None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *args, "--no-cuda"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output[-4000:]}"
    found = re.findall(r"^Meta Test Accuracy ([0-9.eE+-]+)$", proc.stdout, re.M)
    assert len(found) == 1, f"{name} printed no single 'Meta Test Accuracy':\n{output[-4000:]}"
    print(f"{name}: meta-test accuracy {float(found[0]):.3f}, {cpu:.1f} s CPU, {wall:.1f} s wall")
    return float(found[0]), cpu, output


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    """A data root with copies of the two real small Omniglot zips, decoded once into its cache."""
    if not (SHARED / "images_background_small1.zip").is_file() or \
            not (SHARED / "images_background_small2.zip").is_file():
        pytest.skip(f"shared Omniglot subsets not found at {SHARED}")
    root = tmp_path_factory.mktemp("data")
    (root / "omniglot").mkdir()
    for name in ("images_background_small1", "images_background_small2"):
        shutil.copy(SHARED / f"{name}.zip", root / "omniglot")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("METALEARN_DATA", raising=False)
        mp.delenv("METALEARN_CACHE", raising=False)
        tasksets = l2l.vision.benchmarks.get_tasksets("omniglot", root=str(root), config="omniglot_small")
    assert [len(t.dataset.labels) for t in tasksets] == [114, 22, 106]
    return root


def test_the_examples_are_learn2learn_programs():
    for name in ("maml_omniglot.py", "protonet_omniglot.py"):
        source = (EXAMPLES / name).read_text()
        changed = with_metalearn(source)
        diff = [(a, b) for a, b in zip(source.splitlines(), changed.splitlines()) if a != b]
        assert diff == [(LEARN2LEARN_IMPORT, METALEARN_IMPORT)]
        assert "get_tasksets('omniglot'" not in source  # the dataset is an argument, 'omniglot' by default
        assert "dataset='omniglot'" in source and "root='~/data'" in source
        compile(changed, name, "exec")


def test_maml_omniglot_example_learns_real_omniglot(tmp_path, omniglot_root):
    # 40 second-order meta-steps of 8 tasks (5-way 1-shot, OmniglotFC), then 200 test tasks (1000 queries).
    # Chance is 0.2; with no meta-training (--num-iterations 0) one adaptation step from the initial
    # weights gives 0.31/0.30/0.31 (seeds 1/2/3). Measured after training, seeds 1/2/3: 0.520/0.458/0.560
    # and 0.525 for seed 42 (the default, run here), 6.3-7.9 s CPU each on a shared, loaded 2-core machine.
    accuracy, cpu, _ = run_example("maml_omniglot.py", tmp_path,
                                   ["--root", str(omniglot_root), "--config", "omniglot_small", *MAML_ARGS])
    assert accuracy > 0.38, accuracy


@pytest.mark.slow  # CI time: the default tier runs the maml example on real Omniglot (above)
def test_protonet_omniglot_example_learns_real_omniglot(tmp_path, omniglot_root):
    # 2 epochs of 50 10-way 1-shot episodes (OmniglotCNN features, 32 filters), then 200 5-way 1-shot test
    # tasks (1000 queries). Chance is 0.2; untrained features give 0.37-0.39. Measured after training,
    # seeds 1/2/3: 0.610/0.631/0.650 and 0.663 for seed 42 (the default, run here), 6.1-7.2 s CPU each on a
    # shared, loaded 2-core machine.
    accuracy, cpu, _ = run_example("protonet_omniglot.py", tmp_path,
                                   ["--root", str(omniglot_root), "--config", "omniglot_small", *PROTONET_ARGS])
    assert accuracy > 0.5, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name, args, threshold", [
    # Measured, seeds 1/2/3/42: 0.723/0.734/0.663/0.751 (7-8.5 s CPU each).
    ("maml_omniglot.py", MAML_ARGS, 0.5),
    # Measured, seeds 1/2/3/42: 0.788/0.773/0.777/0.761 (6-9 s CPU each).
    ("protonet_omniglot.py", PROTONET_ARGS, 0.6),
])
def test_examples_learn_offline_glyphs(tmp_path, name, args, threshold):
    accuracy, cpu, _ = run_example(name, tmp_path, ["--dataset", "glyphs", "--config", GLYPHS, *args])
    assert accuracy > threshold, accuracy


def test_vision_transforms_rotations():
    transforms = l2l.vision.transforms
    assert transforms.RandomClassRotation is l2l.vision.benchmarks.RandomClassRotation
    rotate = transforms.RandomDiscreteRotation([0.0, 90.0, 180.0, 270.0])
    image = torch.arange(12.0).view(1, 3, 4)
    random.seed(0)
    seen = set()
    for _ in range(40):
        out = rotate(image)
        turns = next(k for k in range(4) if out.shape == torch.rot90(image, k, (-2, -1)).shape
                     and torch.equal(out, torch.rot90(image, k, (-2, -1))))
        seen.add(turns)
    assert seen == {0, 1, 2, 3}
    random.seed(0)
    first = [rotate(image).shape for _ in range(10)]
    random.seed(0)
    assert [rotate(image).shape for _ in range(10)] == first  # Python's random draws the angles
    # PIL images turn as torchvision turns them: counter-clockwise, same size.
    square = Image.fromarray(np.arange(9, dtype=np.uint8).reshape(3, 3))
    turned = np.array(transforms.RandomDiscreteRotation([90])(square))
    assert (turned == torch.rot90(torch.arange(9).view(3, 3), 1).numpy()).all()
    with pytest.raises(NotImplementedError, match="multiples of 90"):
        transforms.RandomDiscreteRotation([45])(image)
    with pytest.raises(ValueError, match="non-empty list"):
        transforms.RandomDiscreteRotation([])
