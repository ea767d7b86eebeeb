"""Shared helpers for the CLI tests: run ``python -m metalearn`` in a subprocess, quickly."""

from __future__ import annotations

import atexit
import contextlib
import http.server
import os
import re
import subprocess
import threading
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores, so each computes in one thread (torch's default of one thread
    # per core would make the workers' OpenMP threads spin against each other).
    import torch

    torch.set_num_threads(1)

#: The classes of FAST's glyphs (train, val, test): few, since every run draws them.
FAST_SPLIT = [20, 10, 10]

#: A tiny glyphs run: about 5 s a subprocess, most of it imports.
FAST = [
    "data=glyphs", f"data.split_sizes=[{','.join(map(str, FAST_SPLIT))}]",
    "backbone.hidden=16", "meta_batch_size=4", "steps=20", "trainer.log_every=5", "trainer.val_every=10",
    "trainer.val_episodes=10", "trainer.test_episodes=20", "trainer.ckpt_every=10",
]

#: FAST cut to the plumbing (4 steps, validation and a checkpoint every 2, 4 episodes): for tests of
#: sweeps, launchers and resuming, where the numbers do not matter, only that every stage runs.
TINY = [a for a in FAST if not a.startswith(("steps=", "trainer."))] + [
    "steps=4", "trainer.log_every=2", "trainer.val_every=2", "trainer.val_episodes=4", "trainer.test_episodes=4",
    "trainer.ckpt_every=2",
]



def zero_gradient(name: str) -> bool:
    """Whether a meta-parameter's gradient is exactly zero by construction: conv4's first conv bias
    (BatchNorm follows it, and models/ops.py computes that block from the input's patch statistics,
    where the bias cancels), and MAML++'s per-step rates for it. Tests that every parameter is
    trained skip these."""
    return re.search(r"convs[.-]0[.-]bias", name) is not None

def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess.

    One intra-op thread: on a busy 2-core machine torch's default OpenMP threads
    spin against each other and a 5 s run can take minutes.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("METALEARN_DATA", None)
    env.pop("METALEARN_CACHE", None)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: str | os.PathLike, env: dict[str, str] | None = None,
            timeout: float = 300, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m metalearn *args`` in ``cwd``, a process of its own; stdout and stderr captured as text.

    The process is forked from a warm interpreter that has torch, Hydra and TensorBoard imported
    (tests/zygote.py: metalearn itself is imported fresh in every child); METALEARN_TEST_EXEC=1 starts
    each one with a plain ``python -m metalearn`` instead.
    ``file_size_limit``: bytes the process may write to any one file (a full disk, simulated: a write past
    it fails with EFBIG, as one past a full disk fails with ENOSPC)."""
    env = env or cli_env()
    if os.environ.get("METALEARN_TEST_EXEC") == "1":
        def limit() -> None:
            import resource
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        return subprocess.run([sys.executable, "-m", "metalearn", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit if file_size_limit is not None else None)
    return _zygote().run([str(a) for a in args], cwd, env, timeout, file_size_limit)


class _Zygote:
    """This test process's warm interpreter (tests/zygote.py), started on first use."""

    def __init__(self):
        import tempfile

        self.socket = os.path.join(tempfile.mkdtemp(prefix="metalearn-zygote-"), "socket")  # torchrun's workers
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py"), self.socket],
                                     stdin=subprocess.PIPE, env=cli_env(), text=True, cwd=REPO)
        self.lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """End the zygote with this process (it finishes running children first), waited for, so that
        its CPU time counts in the test process's."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=120)
        import shutil

        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)  # the socket's folder

    def run(self, args: list[str], cwd, env: dict[str, str], timeout: float,
            file_size_limit: int | None) -> subprocess.CompletedProcess:
        import json
        import signal
        import tempfile
        import time

        with tempfile.TemporaryDirectory(prefix="metalearn-cli-") as folder:
            files = {k: os.path.join(folder, k) for k in ("out", "err", "pid", "rc")}
            request = {"args": args, "cwd": str(Path(cwd).resolve()), "env": dict(env),
                       "file_size_limit": file_size_limit, **files}
            with self.lock:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the test zygote ended with exit code {self.proc.returncode}")
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while not os.path.exists(files["rc"]):
                if time.monotonic() > deadline:
                    if os.path.exists(files["pid"]):
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(int(Path(files["pid"]).read_text()), signal.SIGKILL)
                    raise subprocess.TimeoutExpired(["metalearn", *args], timeout)
                time.sleep(0.02)
            read = lambda k: Path(files[k]).read_text(errors="replace") if os.path.exists(files[k]) else ""  # noqa: E731
            if os.path.exists(os.path.join(folder, "cpu")):
                CHILD_CPU[0] += float(Path(folder, "cpu").read_text())
            return subprocess.CompletedProcess(["metalearn", *args], int(read("rc")), read("out"), read("err"))


_ZYGOTE: list[_Zygote] = []
CHILD_CPU = [0.0]  # CPU seconds of the zygote's children so far (they are not this process's children)
_ZYGOTE_LOCK = threading.Lock()


def _zygote() -> _Zygote:
    with _ZYGOTE_LOCK:
        if not _ZYGOTE or _ZYGOTE[0].proc.poll() is not None:
            _ZYGOTE[:] = [_Zygote()]
        return _ZYGOTE[0]


def torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    """``torchrun --nproc_per_node=NPROC --standalone -m metalearn ARGS``: each worker a child of the zygote
    (tests/zygote_rank.py stands in for it; run it with ``torchrun_env``), or with METALEARN_TEST_EXEC=1 a
    plain ``python -m metalearn``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    if os.environ.get("METALEARN_TEST_EXEC") == "1":
        return [*launcher, "-m", "metalearn", *map(str, args)]
    return [*launcher, str(REPO / "tests" / "zygote_rank.py"), *map(str, args)]


def torchrun_env(**extra: str) -> dict[str, str]:
    """``cli_env(**extra)`` for ``torchrun_cmd``: where its workers find the zygote."""
    import time

    if os.environ.get("METALEARN_TEST_EXEC") == "1":
        return cli_env(**extra)
    path = _zygote().socket
    deadline = time.monotonic() + 120
    while not os.path.exists(path):  # bound once the zygote has imported torch
        if _zygote().proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the test zygote did not start")
        time.sleep(0.02)
    return cli_env(**extra, METALEARN_TEST_ZYGOTE=path)


def run_many(jobs: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    """Several independent ``run_cli(args, cwd[, file_size_limit])`` at once (one per core), keyed like ``jobs``."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_cli, job[0], job[1], None, 300, *job[2:]) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def describe(proc: subprocess.CompletedProcess) -> str:
    """For assertion messages."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def with_overrides(args: list[str], *overrides: str) -> list[str]:
    """``args`` with each ``key=value`` of ``overrides`` replacing the same key (or added)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(overrides)


class KillResume(NamedTuple):
    """What ``kill_and_resume`` leaves: the two runs' ``checkpoints/last.pt`` and ``results.json``."""

    a: dict  # the uninterrupted run's last checkpoint (tmp_path / "whole")
    b: dict  # the killed and resumed run's (tmp_path / "run")
    results: list[dict]  # results.json of each, in that order
    procs: tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]  # the uninterrupted run, the resume


def kill_and_resume(args: list[str], tmp_path: Path, at: str = "step:5", whole_args: tuple[str, ...] = (),
                    killed_args: tuple[str, ...] = ()) -> KillResume:
    """``metalearn train *args`` twice at once: uninterrupted in ``tmp_path / "whole"`` and, in ``tmp_path / "run"``,
    killed (SIGKILL, ``METALEARN_FAULT=kill_at=<at>``) and then resumed; ``whole_args`` / ``killed_args``: more
    arguments of one run only. Asserts what every such test asserts: the exits, and that both runs end bit for
    bit alike (the step, the model's state, the optimizer's state, the test results)."""
    import json

    import torch

    whole, run = tmp_path / "whole", tmp_path / "run"
    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(run_cli, ["train", *args, *whole_args, f"hydra.run.dir={whole}"], tmp_path)
        killed = run_cli(["train", *args, *killed_args, f"hydra.run.dir={run}"], tmp_path,
                         env=cli_env(METALEARN_FAULT=f"kill_at={at}"))
        proc = uninterrupted.result()
    assert proc.returncode == 0, describe(proc)
    assert killed.returncode == -9 and not (run / "results.json").exists(), describe(killed)
    resumed = run_cli(["train", f"resume={run}"], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (whole, run))
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "model state differs"
    states = list(zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    assert len(states) == len(a["optimizer"]["state"]) == len(b["optimizer"]["state"])
    assert all(torch.equal(x[n], y[n]) for x, y in states for n in x), "optimizer state differs"
    results = [json.loads((r / "results.json").read_text()) for r in (whole, run)]
    assert results[0]["test"] == results[1]["test"]
    return KillResume(a, b, results, (proc, resumed))


class CLI:
    """The helpers above, as the ``cli`` fixture: ``cli.run(args, cwd)``, ``cli.FAST`` ..."""

    FAST = FAST
    TINY = TINY
    REPO = REPO
    env = staticmethod(cli_env)
    run = staticmethod(run_cli)
    run_many = staticmethod(run_many)
    describe = staticmethod(describe)
    with_overrides = staticmethod(with_overrides)


@pytest.fixture(scope="session")
def cli() -> type[CLI]:
    return CLI


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One finished FAST training run, shared read-only (copy a file before changing it)."""
    cwd = tmp_path_factory.mktemp("trained")
    run_dir = cwd / "run"
    proc = run_cli(["train", *FAST, f"hydra.run.dir={run_dir}"], cwd)
    assert proc.returncode == 0, describe(proc)
    return run_dir


#: A short algo=baseline pre-training on the learning tests' glyphs (conv4-32): a backbone for data=features.
BASELINE_RUN = [
    "algo=baseline", "data=glyphs", "data.split_sizes=[100,5,50]",
    "backbone.hidden=32", "meta_batch_size=8", "queries=5", "steps=40", "trainer.log_every=20",
    "trainer.val_every=40", "trainer.val_episodes=10", "trainer.test_episodes=10", "trainer.ckpt_every=40",
]


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory) -> Path:
    """One finished BASELINE_RUN, shared read-only: ``data=features data.run=<it>`` embeds glyphs with it."""
    cwd = tmp_path_factory.mktemp("baseline")
    run_dir = cwd / "run"
    proc = run_cli(["train", *BASELINE_RUN, f"hydra.run.dir={run_dir}"], cwd)
    assert proc.returncode == 0, describe(proc)
    return run_dir


# ---------------------------------------------------------------- learning tests

#: The glyphs problem every learning test uses: 5-way 1-shot, 5 queries, 100 fixed test episodes (the first 100 of the 200 the thresholds were measured on; 2500 queries, so about 0.01 of standard error).
LEARNING_DATA = {"name": "glyphs", "split_sizes": [100, 5, 50], "generation_seed": 0}
LEARNING_TEST_EPISODES = 100


def learning_config(algo: dict | str, steps: int, lr: float = 3e-3, seed: int = 0, optim: dict | None = None,
                    backbone: dict | None = None, precision: str = "fp32"):
    """A RunConfig for a learning test: conv4-32 on glyphs, meta-batch 8, Adam ``lr`` unless ``optim`` says otherwise."""
    from metalearn.config import to_run_config

    algo = {"name": algo} if isinstance(algo, str) else algo
    return to_run_config({
        "algo": algo, "data": LEARNING_DATA,
        "backbone": backbone or {"name": "conv4", "hidden": 32, "layers": 4, "norm": "batch"},
        "device": {"type": "cpu", "data_on_device": True, "precision": precision},
        "ways": 5, "shots": 1, "queries": 5, "meta_batch_size": 8, "steps": steps, "seed": seed,
        "eval": {"ways": 5, "shots": 1, "queries": 5, "batch_size": 50},
        "optim": {"name": "adam", "lr": lr, **(optim or {})},
    })


class Learning:
    """Meta-train with the engine's own pieces and measure test accuracy before and after.

    ``learning.run(cfg)`` -> (accuracy before, accuracy after, seconds of training).
    """

    config = staticmethod(learning_config)

    def __init__(self):
        self._stores = None

    @property
    def stores(self) -> dict:
        if self._stores is None:
            import torch

            from metalearn import engine

            self._stores = engine.load_data(learning_config("protonet", steps=1), torch.device("cpu"))
        return self._stores

    def run(self, cfg, stores: dict | None = None, episodes: int = LEARNING_TEST_EPISODES) -> tuple[float, float, float]:
        """``stores``: other task sources than the shared glyphs (e.g. ``data=features`` of them); ``episodes``:
        test episodes of each accuracy."""
        import time

        import torch

        from metalearn import engine

        cpu, stores, e = torch.device("cpu"), stores or self.stores, cfg.eval
        engine.seed_everything(cfg.seed)
        algo = engine.build_algorithm(cfg, stores["train"])
        optimizer, scheduler = engine.build_optimizer(cfg, algo.parameters())

        def test_accuracy(episodes: int) -> float:
            return engine.evaluate(algo, stores["test"], e.ways, e.shots, e.queries, episodes,
                                   e.batch_size, 1, cpu, precision=cfg.device.precision)["accuracy"]["mean"]

        before = test_accuracy(max(1, episodes // 2))  # the untrained score: the first half of the episodes will do
        sampler = stores["train"].sampler(cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch_size, cfg.seed, training=True)
        start = time.perf_counter()
        algo.train()
        for step in range(cfg.steps):
            batch = sampler.sample()
            algo.begin_step(step, cfg.steps)
            optimizer.zero_grad(set_to_none=True)
            with engine.autocast(cpu, cfg.device.precision):
                metrics = algo.meta_step(batch)
            assert torch.isfinite(metrics["loss"]).all()
            optimizer.step()
            scheduler.step()
        seconds = time.perf_counter() - start
        return before, test_accuracy(episodes), seconds


@pytest.fixture(scope="session")
def learning() -> Learning:
    """Shared glyphs data (built once per session) and the learning-test loop; see ``Learning``."""
    return Learning()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` ({"/path": bytes}); paths under /cut/ promise more bytes than they send, then hang up."""

    def do_GET(self):
        body = self.server.files.get(self.path.removeprefix("/cut"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) * (2 if self.path.startswith("/cut/") else 1)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1: ``(httpd, base_url)``; put files in ``httpd.files["/name"] = bytes``."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# ---------------------------------------------------------------- CPU profile of the suite

if os.environ.get("METALEARN_TEST_CPU"):  # a file: each test's CPU seconds (its own and its subprocesses')
    import json
    import resource

    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + CHILD_CPU[0]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        import time

        start, wall = _cpu(), time.monotonic()
        yield
        with open(os.environ["METALEARN_TEST_CPU"], "a") as f:
            f.write(json.dumps({"test": item.nodeid, "cpu": round(_cpu() - start, 2),
                                "wall": round(time.monotonic() - wall, 2)}) + "\n")
