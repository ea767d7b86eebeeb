"""Every user mistake ends with one line on stderr, ``metalearn: error: ...``, naming the problem:
never a traceback. Plus what is left on disk after divergence, Ctrl-C and failed downloads."""

from __future__ import annotations

import functools
import io
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import FAST, with_overrides

# A run whose learning rate is fine for 5 steps and then multiplied by 1e30 (a step schedule with
# decay_gamma=1e30): step 6 updates with lr 1e27, so the loss of step 7 is NaN; last.pt of step 5 is
# a good state. (The loss of a step is that of the weights before its update.)
DIVERGES_AFTER_5 = with_overrides(
    FAST, "optim.scheduler=step", "optim.decay_every=5", "optim.decay_gamma=1e30", "trainer.log_every=1",
    "trainer.ckpt_every=5", "trainer.val_every=1000",
)
OFFLINE_OMNIGLOT = ["data=omniglot", "data.root={tmp}/data", "data.download=false"]

# name: (arguments, words the error line must hold, exit code). In both, {tmp} is a fresh folder
# of the case (also its cwd) and {files} holds checkpoints made from the shared trained run.
MISTAKES = {
    # the longer runs first, so that the pool stays busy
    "loss becomes NaN": (["train", *DIVERGES_AFTER_5, "hydra.run.dir={tmp}/run"],
                         ["NaN", "between steps 7 and 7", "{tmp}/run/checkpoints/last.pt"], 3),
    "loss NaN at once": (["train", *FAST, "algo.inner_lr=1e30", "trainer.log_every=1", "hydra.run.dir={tmp}/run"],
                         ["NaN", "between steps 1 and 1"], 3),
    "learning rate beyond float32": (["train", *FAST, "optim.lr=1e39", "hydra.run.dir={tmp}/run"], ["optim.lr"], 2),
    "ways above the classes of a split": (["train", *FAST, "ways=15", "hydra.run.dir={tmp}/run"],
                                          ["ways=15", "10 classes", "val"], 2),
    "shots+queries above the images of a class": (["train", *FAST, "shots=10", "queries=15", "hydra.run.dir={tmp}/run"],
                                                  ["shots+queries=25", "20 images"], 2),
    "unknown algo": (["train", "algo=foo"], ["'foo'", "maml", "protonet"], 2),
    "unknown algo in a sweep": (["train", "-m", "algo=maml,foo"], ["'foo'", "maml", "protonet"], 2),
    "unknown key of a group": (["train", "algo.inner_lrr=1"],
                               ["'inner_lrr'", "inner_lr, inner_steps, test_inner_steps, first_order"], 2),
    "unknown top-level key": (["train", "foo=1"], ["'foo'"], 2),
    "bad type": (["train", "algo.inner_lr=abc"], ["algo.inner_lr", "'abc'"], 2),
    "bad value": (["train", "steps=0"], ["steps must be >= 1"], 2),
    "unknown command": (["trian"], ["'trian'", "train, eval"], 2),
    "data missing while offline": (["train", *OFFLINE_OMNIGLOT, "hydra.run.dir={tmp}/run"],
                                   ["{tmp}/data/omniglot", "images_background.zip", "images_evaluation.zip",
                                    "data.download=false"], 2),
    "unknown experiment preset": (["train", "experiment=nope", *OFFLINE_OMNIGLOT, "hydra.run.dir={tmp}/run"],
                                  ["experiment", "'nope'"], 2),
    "eval without run or ckpt": (["eval"], ["run=", "ckpt="], 2),
    "eval of a missing run": (["eval", "run={tmp}/nope"], ["{tmp}/nope"], 2),
    "eval of garbage": (["eval", "ckpt={files}/garbage.pt"], ["{files}/garbage.pt", "corrupt"], 2),
    "eval of a truncated checkpoint": (["eval", "ckpt={files}/truncated.pt"], ["{files}/truncated.pt", "corrupt"], 2),
    "eval of a torch file that is no checkpoint": (["eval", "ckpt={files}/foreign.pt"],
                                                   ["{files}/foreign.pt", "not a metalearn checkpoint"], 2),
    "eval of another checkpoint format": (["eval", "ckpt={files}/future.pt"],
                                          ["{files}/future.pt", "format 99", "reads format 1"], 2),
    "eval of a checkpoint that does not fit its config": (["eval", "ckpt={files}/resized.pt"],
                                                          ["{files}/resized.pt", "does not fit"], 2),
    "resume of a missing run": (["train", "resume={tmp}/nope"], ["{tmp}/nope"], 2),
    "resume with fewer steps than done": (["train", "resume={files}/run", "steps=5"],
                                          ["checkpoint is at step 20", "past steps=5", "steps>=20"], 2),
    "resume of a truncated last.pt": (["train", "resume={files}/truncated_run"],
                                      ["{files}/truncated_run/checkpoints/last.pt", "corrupt",
                                       "to resume from {files}/truncated_run/checkpoints/best.pt", "copy it over last.pt"], 2),
    "resume of a last.pt that is no checkpoint": (["train", "resume={files}/foreign_run"],
                                                  ["{files}/foreign_run/checkpoints/last.pt", "not a metalearn checkpoint",
                                                   "start a new run"], 2),
    "resume of another run's last.pt": (["train", "resume={files}/other_run"],
                                        ["{files}/other_run/checkpoints/last.pt", "another run's checkpoint",
                                         "seed=7 in it, 0 in {files}/other_run/.hydra/config.yaml", "start a new run"], 2),
    "resume of a run killed before its first checkpoint": (["train", "resume={files}/unstarted_run"],
                                                           ["{files}/unstarted_run", "before its first checkpoint",
                                                            "nothing to resume", "overrides.yaml"], 2),
    "resume of a directory that is not a run": (["train", "resume={tmp}"], ["{tmp} has no checkpoints/last.pt",
                                                                          "run directory"], 2),
    "torch.compile of a second-order algorithm": (["train", *FAST, "device.compile=true", "hydra.run.dir={tmp}/run"],
                                                  ["device.compile=true", "algo=maml", "algo.first_order=true"], 2),
    "init_from a missing run": (["train", *FAST, "init_from={tmp}/nope", "hydra.run.dir={tmp}/run"],
                                ["init_from={tmp}/nope", "does not exist"], 2),
    "device=cuda without CUDA": (["train", *FAST, "device=cuda", "hydra.run.dir={tmp}/run"],
                                 ["device=cuda", "no CUDA GPU", "device=cpu"], 2),
    "corrupt image file": (["train", "data=imagefolder", "data.path={files}/images", "data.root={tmp}/data",
                            "data.image_size=8", "hydra.run.dir={tmp}/run"],
                           ["cannot read image {files}/images/c2/broken.png", "replace or delete that file"], 2),
    "corrupt or truncated archive": (["train", "data=omniglot", "data.root={files}/archives", "data.download=false",
                                      "hydra.run.dir={tmp}/run"],
                                     ["{files}/archives/omniglot/images_background.zip is corrupt",
                                      "delete it and run again"], 2),
    "report of an empty directory": (["report", "{tmp}"], ["no runs under {tmp}", "give a run or sweep directory"], 2),
    "classifier on regression data": (["train", "data=sinusoid", "backbone=mlp", "algo=matchingnet"],
                                      ["algo=matchingnet", "classification", "sinusoid is regression", "maml"], 2),
    "image backbone on vectors": (["train", "data=sinusoid", "backbone=resnet12"], ["backbone=resnet12", "backbone=mlp"], 2),
    "vector backbone on images": (["train", "data=glyphs", "backbone=mlp"], ["backbone=mlp", "1x28x28", "conv4"], 2),
    "data command without action": (["data"], ["usage: metalearn data info|prepare"], 2),
    "run directory on a read-only file system": (["train", *FAST, "hydra.run.dir=/proc/metalearn-run"],
                                                 ["cannot create the run directory /proc/metalearn-run",
                                                  "hydra.run.dir="], 2),
    "disk full while saving a checkpoint": (["train", *FAST, "hydra.run.dir={tmp}/run"],
                                            ["cannot write {tmp}/run/checkpoints/", "free space"], 4),
    "data root on a read-only file system": (["train", "data=imagefolder", "data.path={files}/images",
                                              "data.root=/proc/metalearn-data", "data.image_size=8", "hydra.run.dir={tmp}/run"],
                                             ["cannot write the imagefolder", "/proc/metalearn-data/imagefolder/cache",
                                              "set data.cache_dir="], 4),
    # keys renamed by the split vocabulary (metalearn/renamed.py)
    "old Omniglot split keys": (["train", "data=omniglot", "data.train_alphabets=[Balinese,Greek]"],
                                ["data.train_alphabets was renamed: use data.train=[Balinese,Greek]"], 2),
    "old Omniglot split choice": (["train", "data=omniglot", "data.split=vinyals"],
                                  ["data.split was removed", "data.train, data.val and data.test empty", "Vinyals"], 2),
    "old class-list keys": (["train", "data=mnist", "data.val_classes=[6,7]"], ["data.val_classes was renamed: use data.val=[6,7]"], 2),
    "old glyphs size keys": (["train", "data=glyphs", "data.train_classes=20", "data.val_classes=10", "data.test_classes=10"],
                             ["data.train_classes, data.val_classes, data.test_classes were renamed",
                              "use data.split_sizes=[20,10,10]"], 2),
    "old dataset seed key": (["train", "data=glyphs", "data.seed=3"], ["data.seed was renamed: use data.generation_seed=3"], 2),
    "old keys in a data YAML": (["train", "--config-dir={files}/conf", "data=old_glyphs", "hydra.run.dir={tmp}/run"],
                                ["data.train_classes, data.val_classes, data.test_classes were renamed",
                                 "use data.split_sizes=[20,10,10]"], 2),
}

#: Cases run with a limit on the bytes written to one file (conftest.run_cli): a full disk, simulated.
FILE_SIZE_LIMIT = {"disk full while saving a checkpoint": 60_000}  # a FAST checkpoint is about 130 kB


#: Cases that only fail as described on some machines.
ONLY_IF = {"device=cuda without CUDA": (not torch.cuda.is_available(), "this machine has CUDA"),
           "run directory on a read-only file system": (Path("/proc/self").is_dir(), "no /proc here"),
           "data root on a read-only file system": (Path("/proc/self").is_dir(), "no /proc here")}


def slug(name: str) -> str:
    return re.sub(r"\W+", "_", name)


def make_checkpoint_files(folder: Path, run: Path) -> None:
    folder.mkdir()
    last = run / "checkpoints" / "last.pt"
    (folder / "garbage.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "truncated.pt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "format_version": 99}, folder / "future.pt")
    ckpt["config"]["backbone"]["hidden"] *= 2
    torch.save(ckpt, folder / "resized.pt")
    (folder / "run" / "checkpoints").mkdir(parents=True)  # a finished run of its own to resume
    (folder / "run" / "checkpoints" / "last.pt").write_bytes(last.read_bytes())
    # Run directories (their recorded config, .hydra/) whose last.pt went wrong, or was never written.
    for name in ("truncated_run", "foreign_run", "other_run", "unstarted_run"):
        shutil.copytree(run / ".hydra", folder / name / ".hydra")
        (folder / name / "checkpoints").mkdir()
    shutil.copy(run / "checkpoints" / "best.pt", folder / "truncated_run" / "checkpoints" / "best.pt")
    shutil.copy(folder / "truncated.pt", folder / "truncated_run" / "checkpoints" / "last.pt")
    shutil.copy(folder / "foreign.pt", folder / "foreign_run" / "checkpoints" / "last.pt")
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["seed"] = 7
    torch.save(ckpt, folder / "other_run" / "checkpoints" / "last.pt")


def make_data_files(folder: Path) -> None:
    """An image folder of 5 classes with one unreadable PNG; Omniglot archives cut short; a data YAML with keys
    of before the split vocabulary."""
    from PIL import Image

    for c in range(5):
        for i in range(2):
            (folder / "images" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 40 * c + i).save(folder / "images" / f"c{c}" / f"{i}.png")
    (folder / "images" / "c2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "archives" / "omniglot").mkdir(parents=True)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images_background/Latin/character01/0001_01.png", b"x" * 1000)
    for name in ("images_background", "images_evaluation"):
        (folder / "archives" / "omniglot" / f"{name}.zip").write_bytes(archive.getvalue()[:200])
    (folder / "conf" / "data").mkdir(parents=True)
    (folder / "conf" / "data" / "old_glyphs.yaml").write_text("name: glyphs\ntrain_classes: 20\nval_classes: 10\ntest_classes: 10\n")


@pytest.fixture(scope="module")
def mistakes(cli, trained_run, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every case of MISTAKES, run once, side by side: name -> (process, its folder)."""
    root = tmp_path_factory.mktemp("mistakes")
    files = root / "files"
    make_checkpoint_files(files, trained_run)
    make_data_files(files)
    jobs, folders = {}, {}
    for name, (args, _, _) in MISTAKES.items():
        if not ONLY_IF.get(name, (True,))[0]:
            continue
        folders[name] = tmp = root / slug(name)
        tmp.mkdir()
        jobs[name] = ([a.format(tmp=tmp, files=files) for a in args], tmp, *([FILE_SIZE_LIMIT[name]] if name in FILE_SIZE_LIMIT else []))
    procs = cli.run_many(jobs)
    return {name: (procs[name], folders[name]) for name in jobs}


def error_line(cli, proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one stderr line of a failed command (checked: exit code, one line, no traceback)."""
    assert "Traceback" not in proc.stdout + proc.stderr, cli.describe(proc)
    assert proc.returncode == code, cli.describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: "), cli.describe(proc)
    return lines[0]


@pytest.mark.parametrize("name", list(MISTAKES))
def test_mistake_gives_one_error_line(cli, mistakes, name):
    if name not in mistakes:
        pytest.skip(ONLY_IF[name][1])
    proc, tmp = mistakes[name]
    args, needles, code = MISTAKES[name]
    line = error_line(cli, proc, code)
    files = tmp.parent / "files"
    for needle in needles:
        assert needle.format(tmp=tmp, files=files) in line, line


def test_readme_lists_every_mistake(cli):
    """README.md's troubleshooting table is scripts/errors_table.py's output for MISTAKES (regenerate it with
    ``python scripts/errors_table.py --write``)."""
    sys.path.insert(0, str(cli.REPO / "scripts"))
    try:
        import errors_table
    finally:
        sys.path.remove(str(cli.REPO / "scripts"))
    readme = (cli.REPO / "README.md").read_text()
    assert errors_table.in_readme(readme, errors_table.render()) == readme, \
        "README.md's errors table is out of date: run python scripts/errors_table.py --write"


def test_nan_loss_keeps_the_last_good_checkpoint(mistakes):
    _, tmp = mistakes["loss becomes NaN"]
    run = tmp / "run"
    assert not (run / "results.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no temp files either
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 5
    weights = [v for v in ckpt["model"].values() if v.is_floating_point()]
    assert weights and all(torch.isfinite(v).all() for v in weights)
    assert max(float(v.abs().max()) for v in weights) < 100  # the state before the learning rate exploded


def test_nan_before_any_checkpoint_does_not_promise_one(mistakes):
    proc, tmp = mistakes["loss NaN at once"]
    assert not (tmp / "run" / "checkpoints" / "last.pt").exists()
    assert "last.pt" not in proc.stderr, proc.stderr


def test_failed_resumes_and_reports_write_nothing(mistakes):
    """A refused resume leaves the run directory as it was (no new log, no temp file); a report of an
    empty directory writes no report into it."""
    files = mistakes["resume of a truncated last.pt"][1].parent / "files"
    for run in ("truncated_run", "foreign_run", "other_run", "unstarted_run"):
        assert sorted(p.name for p in (files / run).rglob("*") if p.is_file()) == sorted(
            ["config.yaml", "hydra.yaml", "overrides.yaml"] + {"truncated_run": ["best.pt", "last.pt"],
                                                                "unstarted_run": []}.get(run, ["last.pt"])), run
    _, tmp = mistakes["report of an empty directory"]
    assert not any(tmp.iterdir())
    assert sorted(p.name for p in (files / "archives" / "omniglot").iterdir()) == ["images_background.zip",
                                                                                   "images_evaluation.zip"]


def test_a_full_disk_leaves_no_partial_checkpoint(mistakes):
    """The refused checkpoint write left no file behind, not even a temp file; the run's log is there."""
    _, tmp = mistakes["disk full while saving a checkpoint"]
    assert list((tmp / "run" / "checkpoints").iterdir()) == []
    assert (tmp / "run" / "train.log").is_file()


def test_resume_of_a_missing_run_creates_nothing(mistakes):
    proc, tmp = mistakes["resume of a missing run"]
    assert proc.returncode == 2
    assert not (tmp / "nope").exists(), sorted(p.name for p in (tmp / "nope").iterdir())


def test_data_missing_while_offline_downloads_nothing(mistakes):
    _, tmp = mistakes["data missing while offline"]
    assert not (tmp / "data" / "omniglot").exists() or not any((tmp / "data" / "omniglot").iterdir())


def test_a_run_that_fails_before_training_leaves_no_directory(mistakes):
    for name in ("data missing while offline", "image backbone on vectors", "classifier on regression data",
                 "corrupt image file", "corrupt or truncated archive", *(["device=cuda without CUDA"] * ("device=cuda without CUDA" in mistakes))):
        _, tmp = mistakes[name]
        assert not (tmp / "run").exists() and not (tmp / "outputs").exists(), (name, sorted(tmp.rglob("*")))


def test_a_failed_run_never_removes_files_it_did_not_write(cli, tmp_path):
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("mine")
    proc = cli.run(["train", *[a.format(tmp=tmp_path) for a in OFFLINE_OMNIGLOT], "hydra.run.dir=mywork"], tmp_path)
    error_line(cli, proc)
    assert (tmp_path / "mywork" / "notes.txt").read_text() == "mine"


def test_optuna_search_whose_every_trial_stops_early_is_one_error_line(cli, tmp_path):
    """Every trial stops at trainer.stop_at (no result): the search has no best trial, and says why in one line."""
    pytest.importorskip("optuna")
    proc = cli.run(["train", "-m", "hparams_search=metric_based", "algo=protonet", *cli.TINY, "trainer.stop_at=2",
                    "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'search'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, cli.describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metalearn: error:")]
    assert errors == ["metalearn: error: no trial of this Optuna search finished: each one stopped early "
                      "(trainer.stop_at, with a checkpoint in its job directory), so the search has no best trial; "
                      "search without trainer.stop_at (or with trainer.stop_at >= steps)"], cli.describe(proc)
    assert proc.stderr.count("stopped at trainer.stop_at=2: saved step 2") == 2, cli.describe(proc)


# ---------------------------------------------------------------- a download with the wrong md5


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path):
    """(a folder, the URL it is served at) on 127.0.0.1, for the length of one test."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_with_wrong_md5_keeps_nothing(cli, tmp_path, http_folder):
    served, url = http_folder
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:  # a real zip, in the right layout, that is not the official one
        zf.writestr("images_background/Latin/character01/0001_01.png", b"not a png")
    (served / "images_background.zip").write_bytes(archive.getvalue())
    data = tmp_path / "data"
    (data / "omniglot").mkdir(parents=True)
    (data / "omniglot" / "notes.txt").write_text("mine")

    proc = cli.run(["train", "data=omniglot", f"data.root={data}", f"data.base_url={url}", f"hydra.run.dir={tmp_path / 'run'}"],
                   tmp_path, env=cli.env(no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost"))
    line = error_line(cli, proc)
    assert "md5" in line and "images_background.zip" in line and f"{url}/images_background.zip" in line, line
    assert sorted(p.name for p in (data / "omniglot").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- Ctrl-C


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(cli, tmp_path):
    run = tmp_path / "run"
    args = with_overrides(FAST, "steps=100000", "trainer.ckpt_every=5", "trainer.val_every=100000")
    last = run / "checkpoints" / "last.pt"
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "metalearn", "train", *args, f"hydra.run.dir={run}"],
                                cwd=tmp_path, env=cli.env(), stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not last.exists():  # the loop (and its signal handler) is running once a checkpoint exists
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "no checkpoint after 240 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert code == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr + (tmp_path / "stdout").read_text()
    match = re.fullmatch(r"metalearn: interrupted[^:\n]*: saved step (\d+); continue with: (metalearn train resume=(\S+))\n", stderr)
    assert match, stderr
    step, hint, resume_dir = int(match.group(1)), match.group(2), match.group(3)
    assert Path(resume_dir) == run
    assert torch.load(last, weights_only=True)["step"] == step >= 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert not (run / "results.json").exists()

    # The hint works (with fewer steps, which may change on resume).
    proc = cli.run([*hint.split()[1:], f"steps={step + 2}"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert (run / "results.json").is_file()
