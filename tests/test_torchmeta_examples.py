"""examples/torchmeta/: torchmeta's five example programs run with metalearn.torchmeta, only their import lines changed.

``maml.py``, ``anil.py``, ``protonet.py``, ``matching_network.py`` and ``maml_higher.py`` are written for
torchmeta (``from torchmeta.datasets.helpers import omniglot``, ``from torchmeta.modules import ...``,
``from torchmeta.utils... import ...``; ``import higher`` for maml-higher). Each test reads an example's
source, rewrites its ``torchmeta`` import lines and nothing else (``from torchmeta.X import Y`` ->
``from metalearn.torchmeta.X import Y``; ``import torchmeta`` -> ``import metalearn.torchmeta as torchmeta``),
writes it to a temporary folder and runs it as a real subprocess (``sys.executable example.py <folder> ...``,
one thread, on the CPU) with a small budget given by the example's own command-line options. The test
asserts it exits 0, saves its model (``--output-folder``) and prints a ``test accuracy`` on meta-test
classes well above chance (0.2 for 5-way) and above what the same network reaches without meta-training.

The data. The examples call ``omniglot(args.folder, shots=..., ways=..., test_shots=..., meta_train=True,
download=args.download)`` and have no option for a dataset configuration, so the data is chosen by the one
line that imports that helper, which the rewrite replaces by one line (still an import line; every other
line of the program is byte for byte the example's, which the first test checks):

- offline, on metalearn's procedural glyphs (the default tier):
  ``from metalearn.torchmeta.datasets.helpers import glyphs as _glyphs; from functools import partial as
  _partial; omniglot = _partial(_glyphs, config={...})``. ``glyphs`` has ``omniglot``'s signature and
  serves Omniglot-like characters (28x28, rotations as extra classes); the bound ``config`` only sizes the
  data set (GLYPHS: 40/10/20 train/val/test characters of 20 drawings, generated in about half a second;
  the default 300/100/100 takes about ten times longer). A plain ``from metalearn.torchmeta.datasets.helpers
  import glyphs as omniglot`` runs the same programs on the full default glyphs.
- on real handwriting, the two small Omniglot subsets of the shared data (5 alphabets each, split by
  alphabet: 114 training and 106 test characters): ``from metalearn.torchmeta.datasets.helpers import
  omniglot as _omniglot; ...; omniglot = _partial(_omniglot, config='omniglot_small')`` (metalearn's
  preset of those archives), with ``folder`` a temporary root holding copies of the zips, which the example
  decodes there on its first call, as a first run would. protonet runs on them in the default tier, the
  other four in the long tier (``-m slow``); those tests skip when the shared data is absent. On glyphs, maml and
  protonet run in the default tier, anil, matching_network and maml_higher in the long tier.

Budgets: 5-way 1-shot tasks with 5 queries per class, 4 tasks a batch, 16 channels, 40-80 meta-batches,
then 10 batches of meta-test tasks (200 tasks, 1000 queries). Each glyphs run costs 6.5-8.5 s of CPU, about
4.5 s of it importing torch and building the first optimizer (which imports torch._dynamo); the real-data
run 12 s (4.5 s of it decoding the zips). The runs of this module are started together, one per core, so
the default tier (about 50 s of CPU) takes about 30 s of wall time on 2 cores.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "torchmeta"
SHARED = REPO.parent / "shared" / "data" / "omniglot"
NAMES = ["maml", "anil", "protonet", "matching_network", "maml_higher"]
#: A small glyphs set: 40/10/20 characters of 20 drawings (x4 with the rotations), drawn in about half a second.
GLYPHS = {"split_sizes": [40, 10, 20], "samples_per_class": 20}
HELPER_IMPORT = "from torchmeta.datasets.helpers import omniglot"
TIMEOUT = 600  # seconds a run may take (each takes about 10 on a 2-core machine)
DATA_LINES = {
    "glyphs": ("from metalearn.torchmeta.datasets.helpers import glyphs as _glyphs; "
               f"from functools import partial as _partial; omniglot = _partial(_glyphs, config={GLYPHS!r})"),
    "omniglot": ("from metalearn.torchmeta.datasets.helpers import omniglot as _omniglot; "
                 "from functools import partial as _partial; omniglot = _partial(_omniglot, config='omniglot_small')"),
}
#: What every run shares: 5-way 1-shot, 5 queries a class, 4 tasks a batch, 16 channels, 10 test batches.
COMMON = ["--num-ways", "5", "--num-shots", "1", "--test-shots", "5", "--batch-size", "4", "--hidden-size", "16",
          "--num-test-batches", "10", "--seed", "0"]
#: Each example's own options (torchmeta's defaults are for GPUs: 64 channels, 16 tasks a batch, 15 queries).
#: MAML's step size is 0.05 rather than the paper's 0.4: with 16 channels and so few meta-steps 0.4 stays near
#: the untrained accuracy (first order, 60 batches: 0.44-0.47, against 0.65-0.68 with 0.05).
ARGS = {
    "maml": ["--step-size", "0.05", "--meta-lr", "0.003", "--num-batches", "40", "--num-workers", "0"],  # second order
    "anil": ["--step-size", "0.4", "--num-steps", "5", "--meta-lr", "0.003", "--num-batches", "40",
             "--num-workers", "0"],  # second order through the head's 5 steps
    # one loader worker process, torchmeta's default
    "protonet": ["--lr", "0.003", "--num-batches", "80", "--num-workers", "1"],
    "matching_network": ["--lr", "0.003", "--num-batches", "40", "--num-workers", "0"],
    "maml_higher": ["--first-order", "--step-size", "0.05", "--meta-lr", "0.003", "--num-batches", "40",
                    "--num-workers", "0"],
}
#: The long tier: 100 meta-batches; maml_higher second order.
SLOW_ARGS = {
    "maml": ["--step-size", "0.05", "--meta-lr", "0.003", "--num-batches", "100", "--num-workers", "0"],
    "anil": ["--step-size", "0.4", "--num-steps", "5", "--meta-lr", "0.003", "--num-batches", "100",
             "--num-workers", "0"],
    "matching_network": ["--lr", "0.003", "--num-batches", "100", "--num-workers", "0"],
    "maml_higher": ["--step-size", "0.05", "--meta-lr", "0.003", "--num-batches", "100", "--num-workers", "0"],
}


def to_metalearn(source: str, data_line: str) -> str:
    """``source`` with its torchmeta import lines moved to metalearn.torchmeta and its ``omniglot`` helper
    import replaced by ``data_line``; every other line unchanged (checked). The import statements are
    found by parsing the program (its docstring shows the metalearn lines, as text)."""
    imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = [alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in imports if isinstance(node, ast.ImportFrom)]
    assert not [m for m in modules if m.split(".")[0] == "metalearn"], "the example itself imports metalearn"
    targets = {node.lineno for node in imports
               if any(m.split(".")[0] == "torchmeta" for m in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                                                               else [alias.name for alias in node.names]))}
    lines = source.splitlines(keepends=True)
    out = list(lines)
    for number in sorted(targets):
        line = lines[number - 1]
        text = line.rstrip("\r\n")
        if text == HELPER_IMPORT:
            text = data_line
        elif text.startswith("from torchmeta."):
            text = "from metalearn.torchmeta." + text[len("from torchmeta."):]
        elif text == "import torchmeta":
            text = "import metalearn.torchmeta as torchmeta"
        else:
            raise AssertionError(f"line {number}: an import this rewrite does not handle: {text}")
        out[number - 1] = text + line[len(line.rstrip("\r\n")):]
    assert sum(line.rstrip("\r\n") == HELPER_IMPORT for line in lines) == 1, f"expected one line {HELPER_IMPORT!r}"
    return "".join(out)


@dataclass
class Run:
    accuracy: float
    cpu: float  # seconds of CPU of the process and its children (the loader's worker)
    wall: float
    output: str  # the tails of stdout and stderr, for messages
    stderr: str
    saved: list[Path]


def run_example(name: str, data: str, args: list[str], folder: Path) -> Run:
    """Run ``examples/torchmeta/<name>.py`` rewritten for ``data`` ("glyphs" or "omniglot") in ``folder``:
    ``python <name>.py <data root> --output-folder <folder>/out ARGS``, one thread, CPU only."""
    folder.mkdir(parents=True)
    script = folder / f"{name}.py"
    script.write_text(to_metalearn((EXAMPLES / f"{name}.py").read_text(), DATA_LINES[data]))
    root = folder / "data"  # unused by glyphs; for omniglot, copies of the small zips, decoded there
    if data == "omniglot":
        (root / "omniglot").mkdir(parents=True)
        for zip_name in ("images_background_small1.zip", "images_background_small2.zip"):
            shutil.copy(SHARED / zip_name, root / "omniglot")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's metalearn
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    for var in ("METALEARN_DATA", "METALEARN_CACHE"):  # data and cache under the run's folder only
        env.pop(var, None)
    out = folder / "out"
    start = time.perf_counter()
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(root), "--output-folder", str(out), *COMMON, *args],
                                cwd=folder, env=env, stdout=stdout, stderr=stderr)
        timer = threading.Timer(TIMEOUT, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this process alone (runs go in parallel)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    assert wall < TIMEOUT, f"{name} on {data} ran past {TIMEOUT} s and was killed"
    stdout, stderr = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    output = f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}"
    assert proc.returncode == 0, f"{name} on {data} exited {proc.returncode}\n{output}"
    found = re.findall(r"^test accuracy: ([0-9.]+)$", stdout, re.M)
    assert len(found) == 1, f"{name} printed no single 'test accuracy'\n{output}"
    run = Run(float(found[0]), usage.ru_utime + usage.ru_stime, wall, output, stderr,
              sorted(out.iterdir()) if out.is_dir() else [])
    return run


class Runs:
    """The example runs of this module, started together, one per core (each is one thread)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
        self.futures: dict[tuple[str, str, bool], Future] = {}

    def start(self, name: str, data: str, slow: bool = False) -> Future:
        key = (name, data, slow)
        if key not in self.futures:
            args = (SLOW_ARGS if slow else ARGS)[name]
            folder = self.folder / f"{name}-{data}{'-slow' if slow else ''}"
            self.futures[key] = self.pool.submit(run_example, name, data, args, folder)
        return self.futures[key]

    def get(self, name: str, data: str, slow: bool = False) -> Run:
        run = self.start(name, data, slow).result()
        print(f"{name} on {data}: test accuracy {run.accuracy:.4f}, {run.cpu:.1f} s CPU, {run.wall:.1f} s wall")
        return run


def shared_data() -> bool:
    return all((SHARED / f"images_background_small{i}.zip").is_file() for i in (1, 2))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Starts every example run the selected tests of this module ask for (longest first), so that they
    share the cores; each test then waits for its own."""
    runs = Runs(tmp_path_factory.mktemp("examples"))
    wanted = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is request.module and spec is not None and "name" in spec.params:
            data = spec.params.get("data", "glyphs")
            if data == "glyphs" or shared_data():
                wanted.append((spec.params["name"], data, item.originalname.endswith("_long")))  # SLOW_ARGS
    order = ["maml", "maml_higher", "anil", "protonet", "matching_network"]
    for name, data, slow in sorted(wanted, key=lambda k: (k[2], k[1] != "omniglot", order.index(k[0]))):
        runs.start(name, data, slow)
    yield runs
    runs.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def need_shared_data():
    if not shared_data():
        pytest.skip(f"shared Omniglot subsets not found at {SHARED}")


def test_the_examples_are_torchmeta_programs():
    """Written against torchmeta (no metalearn import in their code), with torchmeta's command line, and
    the rewrite touches their import lines only."""
    common = ["'folder'", "'--num-shots'", "'--num-ways'", "'--hidden-size'", "'--output-folder'", "'--batch-size'",
              "'--num-batches'", "'--num-workers'", "'--download'", "'--use-cuda'"]
    gradient = ["'--first-order'", "'--step-size'"]
    for name in NAMES:
        source = (EXAMPLES / f"{name}.py").read_text()
        assert HELPER_IMPORT in source.splitlines(), name
        assert "from torchmeta.utils.data import BatchMetaDataLoader" in source.splitlines(), name
        assert "meta_test=True" in source and "print('test accuracy: " in source, name
        for flag in common + (gradient if name in ("maml", "anil", "maml_higher") else []):
            assert f"parser.add_argument({flag}" in source, (name, flag)
        for data, line in DATA_LINES.items():
            changed = to_metalearn(source, line)
            compile(changed, f"{name}.py", "exec")
            old, new = source.splitlines(), changed.splitlines()
            diff = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(old) == len(new) and (HELPER_IMPORT, line) in diff
            assert all(a.startswith("from torchmeta.") and b.startswith("from metalearn.torchmeta.") for a, b in diff)
    imports = {name: set(re.findall(r"^from (torchmeta[.\w]*) import", (EXAMPLES / f"{name}.py").read_text(), re.M))
               for name in NAMES}
    assert "torchmeta.modules" in imports["maml"] & imports["anil"]
    assert "torchmeta.utils.gradient_based" in imports["maml"] & imports["anil"]
    assert "torchmeta.utils.prototype" in imports["protonet"]
    assert "torchmeta.utils.matching" in imports["matching_network"]
    assert re.search(r"^import higher$", (EXAMPLES / "maml_higher.py").read_text(), re.M)
    assert "torchmeta.modules" not in imports["maml_higher"]  # a plain nn.Module, adapted by higher


# Test accuracy (5-way 1-shot on unseen glyph characters, 1000 queries; chance 0.2) measured with the settings
# above for seeds 1/2/3, and seed 0 (the one run here); "untrained": the same program with --num-batches 1 (a
# single meta-step), seed 0. Each run took 6.7-8.5 s of CPU (7-9 s wall, two at once) on a shared 2-core machine.
# anil, matching_network and maml_higher run in the long tier (CI time): maml and protonet stand for the gradient
# and metric programs in the default tier.
GLYPH_CASES = [
    ("maml", 0.55),  # 0.679/0.711/0.704, seed 0: 0.660; untrained 0.364
    pytest.param("anil", 0.65, marks=pytest.mark.slow),  # 0.746/0.760/0.770, seed 0: 0.785; untrained 0.550 (random features, a head adapted in 5 steps)
    ("protonet", 0.7),  # seeds 1/2: 0.828/0.803, seed 0: 0.808; untrained 0.58-0.64 (seeds 0-3)
    pytest.param("matching_network", 0.68, marks=pytest.mark.slow),  # 0.772/0.745/0.732, seed 0: 0.726; untrained 0.58-0.66 (seeds 0-3)
    pytest.param("maml_higher", 0.48, marks=pytest.mark.slow),  # first order: 0.624/0.586/0.559, seed 0: 0.590; untrained 0.400
]


@pytest.mark.parametrize("name, threshold", GLYPH_CASES)
def test_example_learns_glyphs(runs, name, threshold):
    run = runs.get(name, "glyphs")
    assert run.accuracy > threshold, f"{name}: test accuracy {run.accuracy}\n{run.output}"
    assert len(run.saved) == 1 and run.saved[0].suffix in (".th", ".pt"), run.saved
    state = torch.load(run.saved[0], map_location="cpu")
    assert state and all(torch.is_tensor(v) for v in state.values())
    assert "Warning" not in run.stderr, run.stderr  # e.g. a MetaModule running with params it does not hold


@pytest.mark.parametrize("name, data, threshold", [
    # The real subsets' 106 test characters (x4 rotations), 80 batches: seeds 1/2/3: 0.794/0.801/0.771,
    # seed 0: 0.825; untrained 0.516. 11.9 s of CPU, about 4.5 s of it decoding the zips' PNGs.
    ("protonet", "omniglot", 0.65),
])
def test_example_learns_real_omniglot_subsets(runs, need_shared_data, name, data, threshold):
    run = runs.get(name, data)
    assert run.accuracy > threshold, f"{name}: test accuracy {run.accuracy}\n{run.output}"
    assert len(run.saved) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name, data, threshold", [
    # 100 meta-batches on the real subsets (maml_higher second order), seeds 0/1 (0 runs here); untrained, seed 0.
    # 14-20 s of CPU each (decoding included).
    ("maml", "omniglot", 0.55),  # 0.702/0.693; untrained 0.352
    ("anil", "omniglot", 0.65),  # 0.844/0.799; untrained 0.413
    ("matching_network", "omniglot", 0.62),  # 0.746/0.746; untrained 0.512
    ("maml_higher", "omniglot", 0.55),  # 0.728/0.696; untrained 0.342
])
def test_example_learns_real_omniglot_subsets_long(runs, need_shared_data, name, data, threshold):
    run = runs.get(name, data, slow=True)
    assert run.accuracy > threshold, f"{name}: test accuracy {run.accuracy}\n{run.output}"
    assert len(run.saved) == 1
