"""Several processes for one run: ``torchrun --nproc_per_node=2 -m metalearn train`` on the gloo backend.

Real torchrun jobs (``python -m torch.distributed.run``, two CPU worker processes) against
single-process runs of the same config. The optimizer in the equality checks is plain SGD:
Adam turns float rounding noise in gradients that are zero in exact arithmetic (the bias of
a convolution followed by BatchNorm) into steps of +-lr, so with Adam two runs that differ
only in summation order drift apart by ~lr; SGD shows the meta-gradients themselves agree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import FAST, describe, run_cli, torchrun_cmd, torchrun_env, with_overrides

#: FAST with 4 steps, validation and checkpoints every 2, plain SGD, and an evaluation batch that
#: gives an uneven number of batches per rank (20 episodes in 5 batches over 2 ranks).
CONFIG = with_overrides(FAST, "steps=4", "trainer.log_every=2", "trainer.val_every=2", "trainer.ckpt_every=2",
                        "eval.batch_size=4", "trainer.progress=false",
                        "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0")


def run_torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, nproc), cwd=cwd, env=torchrun_env(), capture_output=True, text=True,
                          timeout=300)


def in_parallel(*calls):
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(fn, *args) for fn, *args in calls]]


def model_of(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_model(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def assert_same_results(a: Path, b: Path) -> None:
    import json

    ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert ra["best_val"]["step"] == rb["best_val"]["step"]
    assert ra["best_val"]["value"] == pytest.approx(rb["best_val"]["value"], abs=1e-6)
    for k in ra["test"]:
        assert ra["test"][k]["mean"] == pytest.approx(rb["test"][k]["mean"], abs=1e-5)
        assert ra["test"][k]["episodes"] == rb["test"][k]["episodes"] == 20


def only_run_dir(cwd: Path) -> Path:
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, found {runs}"
    return runs[0]


def test_maml_two_processes_equal_one_and_resume(cli, tmp_path):
    """2 ranks x 2 tasks = 1 process x 4 tasks, through a stop and a resume under torchrun;
    one run directory, written by rank 0 alone."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    one, first = in_parallel((run_cli, ["train", *CONFIG, "hydra.run.dir=run"], single),
                             (run_torchrun, ["train", *CONFIG, "trainer.stop_at=2"], multi))
    assert one.returncode == 0, describe(one)
    assert first.returncode == 0, describe(first)
    run = only_run_dir(multi)
    # rank 0 alone wrote: one events file, one log, the checkpoints; it alone printed
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events.")) == [
        ".hydra", "checkpoints", "train.log"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert first.stderr.count("stopped at trainer.stop_at=2: saved step 2") == 1, describe(first)
    assert "x 2 processes" in (run / "train.log").read_text()
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["rng_ranks"]) == 2

    resumed = run_torchrun(["train", f"resume={run}"], multi)
    assert resumed.returncode == 0, describe(resumed)
    assert only_run_dir(multi) == run
    assert resumed.stdout.count("results:") == 1 and resumed.stdout.count("accuracy:") == 1, describe(resumed)
    assert_same_model(model_of(run), model_of(single / "run"), atol=1e-5)
    assert_same_results(run, single / "run")


def test_protonet_two_processes_equal_one(cli, tmp_path):
    """A metric learner (one backward over the batch) splits the same way."""
    args = ["train", *with_overrides(CONFIG, "algo=protonet")]
    one, two = in_parallel((run_cli, [*args, "hydra.run.dir=single"], tmp_path),
                           (run_torchrun, [*args, "hydra.run.dir=multi"], tmp_path))
    assert one.returncode == 0, describe(one)
    assert two.returncode == 0, describe(two)
    assert_same_model(model_of(tmp_path / "multi"), model_of(tmp_path / "single"), atol=1e-5)
    assert_same_results(tmp_path / "multi", tmp_path / "single")


@pytest.mark.slow
def test_reptile_resume_continues_every_ranks_random_stream(cli, tmp_path):
    """Reptile draws its inner minibatches from torch's global generator, one stream per rank:
    stopped and resumed under torchrun, it ends exactly where an uninterrupted torchrun run does."""
    args = ["train", *with_overrides(CONFIG, "algo=reptile", "algo.inner_steps=2", "algo.test_inner_steps=2")]
    whole, first = in_parallel((run_torchrun, [*args, "hydra.run.dir=whole"], tmp_path),
                               (run_torchrun, [*args, "hydra.run.dir=parts", "trainer.stop_at=2"], tmp_path))
    assert whole.returncode == 0, describe(whole)
    assert first.returncode == 0, describe(first)
    resumed = run_torchrun(["train", f"resume={tmp_path / 'parts'}"], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert_same_model(model_of(tmp_path / "parts"), model_of(tmp_path / "whole"), atol=0)


def test_meta_batch_that_does_not_split_is_one_error_line(cli, tmp_path):
    proc = run_torchrun(["train", *with_overrides(CONFIG, "meta_batch_size=3")], tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metalearn: error:")]
    assert errors == ["metalearn: error: meta_batch_size=3 does not split evenly over 2 processes; "
                      "use a multiple of 2 (or another --nproc_per_node)"], describe(proc)
    assert "Traceback" not in proc.stderr.split("metalearn: error:")[0]  # none from metalearn before torchrun's report
    assert not (tmp_path / "outputs").exists()  # no run directory left behind


def _worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    ranks = {}
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK="))
        ranks[int(rank)] = int(pid)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(cli, tmp_path):
    args = ["train", *with_overrides(CONFIG, "steps=100000", "trainer.log_every=1", "trainer.val_every=100000",
                                     "trainer.ckpt_every=100000"), "hydra.run.dir=run"]
    proc = subprocess.Popen(torchrun_cmd(args), cwd=tmp_path, env=torchrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        log = tmp_path / "run" / "train.log"
        deadline = time.monotonic() + 120
        while not (log.is_file() and "step 2/" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)  # rank 1 only
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = [line for line in err.splitlines() if line.startswith("metalearn: interrupted: saved step")]
    assert len(stopped) == 1, err
    step = int(stopped[0].split("saved step ")[1].split(";")[0])
    assert stopped[0].endswith(f"continue with: torchrun --nproc_per_node=2 -m metalearn train resume={tmp_path / 'run'}")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == step
    assert "Traceback" not in err.split("metalearn: interrupted")[0]


def run_torchrun_with_fault(args: list[str], cwd: Path, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args), cwd=cwd, env=torchrun_env(METALEARN_FAULT=fault), capture_output=True,
                          text=True, timeout=300)


def test_a_failure_on_rank_1_only_reaches_the_console_once_and_ends_every_process(cli, tmp_path):
    """Rank 1 alone fails at step 3 (the testing hook METALEARN_FAULT, metalearn/faults.py): its line, with its rank,
    once; rank 0 (waiting in a collective) ends too, quietly, and the job exits non-zero. Rank 1 SIGKILLed instead
    leaves no message of its own: rank 0 says so in one line."""
    args = ["train", *with_overrides(CONFIG, "steps=6", "trainer.val_every=100", "trainer.ckpt_every=100")]
    raised, killed = in_parallel(
        (run_torchrun_with_fault, [*args, "hydra.run.dir=raised"], tmp_path, "raise_at=step:3@1"),
        (run_torchrun_with_fault, [*args, "hydra.run.dir=killed"], tmp_path, "kill_at=step:3@1"))
    for proc in (raised, killed):
        assert proc.returncode != 0, describe(proc)
        assert "Traceback" not in proc.stderr.split("metalearn: error:")[-1].split("\n", 1)[0]
    errors = [line for line in raised.stderr.splitlines() if line.startswith("metalearn: ")]
    assert errors == ["metalearn: error: rank 1: a fault injected by METALEARN_FAULT=raise_at=step:3@1 "
                      "(a testing hook); unset it"], describe(raised)
    assert "Traceback" not in raised.stderr.split("metalearn: error:")[0], describe(raised)
    errors = [line for line in killed.stderr.splitlines() if line.startswith("metalearn: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "metalearn: error: another process of this torchrun job ended without a message"), describe(killed)
    for run in (tmp_path / "raised", tmp_path / "killed"):
        assert not (run / "results.json").exists()


def test_a_failure_every_rank_meets_is_printed_once_however_far_apart(cli, tmp_path):
    """Both ranks raise the same error at step 3: together, and with rank 0 6 s after rank 1 (beyond rank 1's wait
    for rank 0, so rank 1 prints it, with its rank). Either way the console shows it once."""
    args = ["train", *with_overrides(CONFIG, "steps=6", "trainer.val_every=100", "trainer.ckpt_every=100")]

    def run(run_dir: str, delay: str) -> subprocess.CompletedProcess:
        env = torchrun_env(METALEARN_FAULT="raise_at=step:3", METALEARN_FAULT_DELAY=delay)
        return subprocess.run(torchrun_cmd([*args, f"hydra.run.dir={run_dir}"]), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    together, apart = in_parallel((run, "together", ""), (run, "apart", "0:6"))
    message = "a fault injected by METALEARN_FAULT=raise_at=step:3 (a testing hook); unset it"
    for proc, wording in ((together, (f"metalearn: error: {message}", f"metalearn: error: rank 1: {message}")),
                          (apart, (f"metalearn: error: rank 1: {message}",))):
        assert proc.returncode != 0, describe(proc)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("metalearn: ")]
        assert len(errors) == 1 and errors[0] in wording, describe(proc)


def test_the_process_group_module_does_not_import_the_engine():
    """The dependency runs one way: engine -> distributed (the torchrun followers' loop is ``engine.follow``)."""
    code = "import sys, metalearn.distributed; assert 'metalearn.engine' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
