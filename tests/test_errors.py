"""Every user mistake ends with one line on stderr, ``metalearn: error: ...``, naming the problem:
never a traceback. Plus what is left on disk after divergence, Ctrl-C and failed downloads."""

from __future__ import annotations

import functools
import io
import re
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
    "ways above the classes of a split": (["train", *FAST, "ways=25", "hydra.run.dir={tmp}/run"],
                                          ["ways=25", "20 classes", "val"], 2),
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
    "classifier on regression data": (["train", "data=sinusoid", "backbone=mlp", "algo=matchingnet"],
                                      ["algo=matchingnet", "classification", "sinusoid is regression", "maml"], 2),
    "image backbone on vectors": (["train", "data=sinusoid", "backbone=resnet12"], ["backbone=resnet12", "backbone=mlp"], 2),
    "vector backbone on images": (["train", "data=glyphs", "backbone=mlp"], ["backbone=mlp", "1x28x28", "conv4"], 2),
    "data command without action": (["data"], ["usage: metalearn data info|prepare"], 2),
}


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


@pytest.fixture(scope="module")
def mistakes(cli, trained_run, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every case of MISTAKES, run once, side by side: name -> (process, its folder)."""
    root = tmp_path_factory.mktemp("mistakes")
    files = root / "files"
    make_checkpoint_files(files, trained_run)
    jobs, folders = {}, {}
    for name, (args, _, _) in MISTAKES.items():
        folders[name] = tmp = root / slug(name)
        tmp.mkdir()
        jobs[name] = ([a.format(tmp=tmp, files=files) for a in args], tmp)
    procs = cli.run_many(jobs)
    return {name: (procs[name], folders[name]) for name in MISTAKES}


def error_line(cli, proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one stderr line of a failed command (checked: exit code, one line, no traceback)."""
    assert "Traceback" not in proc.stdout + proc.stderr, cli.describe(proc)
    assert proc.returncode == code, cli.describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: "), cli.describe(proc)
    return lines[0]


@pytest.mark.parametrize("name", list(MISTAKES))
def test_mistake_gives_one_error_line(cli, mistakes, name):
    proc, tmp = mistakes[name]
    args, needles, code = MISTAKES[name]
    line = error_line(cli, proc, code)
    files = tmp.parent / "files"
    for needle in needles:
        assert needle.format(tmp=tmp, files=files) in line, line


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


def test_resume_of_a_missing_run_creates_nothing(mistakes):
    proc, tmp = mistakes["resume of a missing run"]
    assert proc.returncode == 2
    assert not (tmp / "nope").exists(), sorted(p.name for p in (tmp / "nope").iterdir())


def test_data_missing_while_offline_downloads_nothing(mistakes):
    _, tmp = mistakes["data missing while offline"]
    assert not (tmp / "data" / "omniglot").exists() or not any((tmp / "data" / "omniglot").iterdir())


def test_a_run_that_fails_before_training_leaves_no_directory(mistakes):
    for name in ("data missing while offline", "image backbone on vectors", "classifier on regression data"):
        _, tmp = mistakes[name]
        assert not (tmp / "run").exists() and not (tmp / "outputs").exists(), (name, sorted(tmp.rglob("*")))


def test_a_failed_run_never_removes_files_it_did_not_write(cli, tmp_path):
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("mine")
    proc = cli.run(["train", *[a.format(tmp=tmp_path) for a in OFFLINE_OMNIGLOT], "hydra.run.dir=mywork"], tmp_path)
    error_line(cli, proc)
    assert (tmp_path / "mywork" / "notes.txt").read_text() == "mine"


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
