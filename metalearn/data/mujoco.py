"""MuJoCo task distributions on Gymnasium 1.x (``HalfCheetah-v5``, ``Ant-v5``), stepped here or in worker processes.

The datasets ``halfcheetah_vel``, ``halfcheetah_dir`` and ``ant_dir`` are one file each; this module holds what they
share: ``MujocoTasks``, the batched environment the algorithms see (data/environments.py)::

    env.reset(params [B, P], seeds [B, E] int64) -> (state, obs [B, E, obs_size])
    env.step(params, state, action [B, E, action_size]) -> (state, obs, reward [B, E], done [B, E] bool)

Each of the B * E episodes is one Gymnasium environment (a "sub-environment"): ``reset`` seeds it with its
episode's seed (``env.reset(seed=...)``, which fixes its initial-state noise), ``step`` clips the actions to the
action space and steps every sub-environment whose episode still runs. The observation is Gymnasium's. The reward
is the task's: a forward term from the task parameter and Gymnasium's ``info["x_velocity"]``, plus the costs and
bonus Gymnasium computes with the weights the dataset passes (``reward_ctrl``, and the Ant's ``reward_contact`` and
``reward_survive``); Gymnasium's own forward reward is not used. An episode ends when Gymnasium says
``terminated`` (the Ant when unhealthy); its sub-environment is then left alone (reward 0, the last observation
again) until the next reset. ``state`` is a handle: the simulators live in the pool.

An episode is therefore a function of its task, its seed and the actions alone, whichever process or
sub-environment runs it: the results are the same for any number of workers (tested), and a resumed run is bit
for bit an uninterrupted one.

Where the sub-environments live (``data.workers``):

* ``0``: in this process, stepped one after the other;
* ``W >= 1``: in W worker processes, each owning a contiguous chunk of the B * E sub-environments (its own
  Gymnasium environments, made on first use and kept: a bigger batch adds environments, a smaller one uses the
  first ones). Each reset or step is one message per worker over a pipe (its rows of task parameters and seeds, or
  of actions) and one reply (its observations, rewards and ends: numpy arrays of a few kB), so the cost of the
  processes is two pipe messages per worker per time step, against B * E MuJoCo steps.

This is a pool of our own, not Gymnasium's ``AsyncVectorEnv``, which runs one environment per process: W processes
owning many simulators each would be W "chunk" environments, whose observation and action spaces must keep one
size (a training batch and an evaluation batch differ), whose seeds and task parameters per simulator would travel
in ``options``, and whose per-simulator rewards and ends would travel in ``info``. Speed is not the reason: stepping
dominates both (scripts/bench_sampling.py times them side by side; README).

Worker processes are started by ``forkserver``: forked from a clean single-threaded server process that has
imported metalearn/mujoco_worker.py (the workers' code, without torch) and Gymnasium's MuJoCo environments, so
nothing of the trainer's threads (torch's, TensorBoard's), CUDA state or open files is inherited, which ``fork``
from the trainer would risk; the server starts once per trainer process (a second or two). Windows has no
``forkserver``: there ``data.workers`` > 0 is refused when the data loads (``check_common``). Unlike
multiprocessing's usual way with ``forkserver`` and ``spawn``, a worker does not import the trainer's main script
again (``_main_module_hidden``): a script of yours needs no ``if __name__ == "__main__":`` guard. Workers are
daemonic, ignore SIGINT and SIGTERM (these reach the whole process group, and the trainer decides: a first Ctrl-C
finishes the step and checkpoints), end when the trainer closes their pipe or ends (killed too), and are closed
when the environment is garbage-collected or at exit (``close()``): none outlives the trainer.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import sys
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import torch

from metalearn.errors import ConfigError, DataError
from metalearn.mujoco_worker import Chunk, EnvSpec, make, serve

OBJECTIVES = ("velocity", "direction")
INSTALL = "pip install 'metalearn[mujoco]'"
log = logging.getLogger(__name__)


def require(data_name: str) -> None:
    """Raise DataError (one line) unless Gymnasium 1.x and MuJoCo can be imported."""
    try:
        import gymnasium
        import mujoco  # noqa: F401
    except ImportError as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"data={data_name} needs MuJoCo: {INSTALL} ({reason})") from None
    if int(gymnasium.__version__.split(".")[0]) < 1:
        raise DataError(f"data={data_name} needs MuJoCo on Gymnasium 1.x (found gymnasium {gymnasium.__version__}): "
                        f"{INSTALL}")


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")  # check_common refused data.workers > 0 where there is none
    # The server imports these once (numpy, Gymnasium, MuJoCo; not torch: a second or two) and forks each worker
    # from it. "__main__", Python's default, is left out: the workers need nothing of it (_main_module_hidden).
    # The preload list is process-wide and read only when the server starts: if another library (or Python 3.14+,
    # whose default start method is forkserver) has started the server already, this changes nothing and each
    # worker imports Gymnasium itself after the fork: slower starts, the same episodes.
    ctx.set_forkserver_preload(["metalearn.mujoco_worker", "gymnasium.envs.mujoco.half_cheetah_v5",
                                "gymnasium.envs.mujoco.ant_v5"])
    return ctx


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While workers start: the trainer's ``__main__`` without ``__file__`` and ``__spec__``, so that multiprocessing
    does not make each worker import it again, as it does for every start method but ``fork``. A worker needs
    nothing from it (its code is metalearn.mujoco_worker), and importing it would run a script without an
    ``if __name__ == "__main__":`` guard again, training included, in every worker.

    Not thread-safe: it changes the process-wide ``__main__`` while it runs, so another thread starting processes
    (or reading ``__main__.__file__``) at that moment would see it hidden. The CLI starts the workers from its one
    training thread, with nothing else running then."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class WorkerPool:
    """W processes, each a ``Chunk`` of consecutive sub-environments; the same answers as one ``Chunk``."""

    def __init__(self, spec: EnvSpec, workers: int):
        ctx = _context()
        self.conns, self.procs, self.busy = [], [], False
        try:
            for w in range(workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=serve, args=(child, spec), name=f"metalearn-mujoco-{w}", daemon=True)
                with _main_module_hidden():
                    proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise
        # Before multiprocessing's own exit handler (atexit runs last-registered first), which would wait for
        # daemonic workers that ignore SIGTERM.
        atexit.register(self.close)

    def _bounds(self, n: int) -> list[int]:
        W = len(self.conns)
        return [n * w // W for w in range(W + 1)]

    def _call(self, command: str, arrays: list[np.ndarray]) -> list:
        """Send ``command`` with each worker's rows of ``arrays``; the replies of the workers that had rows."""
        if self.busy:
            raise RuntimeError("the MuJoCo worker pool was interrupted in a previous call")
        bounds = self._bounds(len(arrays[0]))
        active = [w for w in range(len(self.conns)) if bounds[w + 1] > bounds[w]]
        self.busy = True  # until every reply is in: a pool left half-way (an error, Ctrl-C) is not used again
        for w in active:
            try:
                self.conns[w].send((command, *(a[bounds[w]:bounds[w + 1]] for a in arrays)))
            except OSError:
                self._lost(w)
        replies = []
        for w in active:
            try:
                status, value = self.conns[w].recv()
            except (EOFError, OSError):
                self._lost(w)
            if status == "error":  # (the exception's one line, the worker's traceback)
                summary, details = value
                log.debug("MuJoCo worker process %d failed:\n%s", w, details)
                raise RuntimeError(f"MuJoCo worker process {w} failed: {summary}; its traceback is logged at debug "
                                   f"level (hydra.verbose=metalearn), or set data.workers=0 to raise it in the "
                                   f"trainer")
            replies.append(value)
        self.busy = False
        return replies

    def _lost(self, w: int) -> None:
        self.procs[w].join(timeout=1.0)
        raise DataError(f"MuJoCo worker process {w} ended unexpectedly (exit code {self.procs[w].exitcode}); resume "
                        f"the run (resume=<run dir>), or set data.workers=0 to simulate in the trainer") from None

    def reset(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        return np.concatenate(self._call("reset", [params, seeds]))

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        replies = self._call("step", [actions])
        return tuple(np.concatenate(parts) for parts in zip(*replies))

    def close(self) -> None:
        """End the workers: ask, wait a second, then kill (they ignore SIGTERM). Safe to call twice."""
        atexit.unregister(self.close)
        for conn in self.conns:
            try:
                conn.send(("close",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


class Episodes:
    """The ``state`` handle of a reset: which batch of episodes is running (the simulators hold the rest)."""

    def __init__(self, tasks: int, episodes: int):
        self.tasks, self.episodes = tasks, episodes


class MujocoTasks:
    """The batched environment of a MuJoCo task distribution (see the module docstring)."""

    def __init__(self, spec: EnvSpec, horizon: int, workers: int):
        if spec.objective not in OBJECTIVES:
            raise ConfigError(f"unknown MuJoCo task objective {spec.objective!r}; one of: {', '.join(OBJECTIVES)}")
        self.spec, self.horizon, self.workers = spec, horizon, workers
        probe = make(spec)  # the spaces
        self.obs_size = int(np.prod(probe.observation_space.shape))
        self.action_size = int(np.prod(probe.action_space.shape))
        self.action_low = np.asarray(probe.action_space.low, dtype=np.float64)
        self.action_high = np.asarray(probe.action_space.high, dtype=np.float64)
        probe.close()
        self._pool: Chunk | WorkerPool | None = None
        self._running: Episodes | None = None
        self._finalizer: Callable | None = None

    def _ensure_pool(self) -> Chunk | WorkerPool:
        if isinstance(self._pool, WorkerPool) and self._pool.busy:  # a call was interrupted (Ctrl-C): start afresh
            self.close()
        if self._pool is None:
            self._pool = Chunk(self.spec) if self.workers == 0 else WorkerPool(self.spec, self.workers)
            self._finalizer = weakref.finalize(self, self._pool.close)
            self._finalizer.atexit = False  # the pool has its own exit handler, ordered before multiprocessing's
        return self._pool

    def close(self) -> None:
        """Close the sub-environments and end the worker processes (made again on the next reset)."""
        if self._finalizer is not None:
            self._finalizer()  # closes the pool once
        self._pool = self._finalizer = self._running = None

    def reset(self, params: torch.Tensor, seeds: torch.Tensor) -> tuple[Episodes, torch.Tensor]:
        B, E = seeds.shape
        rows = params.detach().cpu().double().numpy().repeat(E, axis=0)  # sub-environment b * E + e: task b
        obs = self._ensure_pool().reset(rows, seeds.detach().cpu().numpy().reshape(-1).astype(np.int64))
        self._running = Episodes(B, E)
        return self._running, torch.from_numpy(obs).view(B, E, -1).to(device=params.device, dtype=params.dtype)

    def step(self, params: torch.Tensor, state: Episodes, action: torch.Tensor):
        if state is not self._running:
            raise RuntimeError("MujocoTasks.step: these episodes are not the last reset's (one batch runs at a time)")
        B, E = state.tasks, state.episodes
        actions = action.detach().cpu().double().numpy().reshape(B * E, -1)
        obs, reward, done = self._pool.step(np.clip(actions, self.action_low, self.action_high))
        as_tensor = lambda x: torch.from_numpy(x).view(B, E, *x.shape[1:]).to(params.device)  # noqa: E731
        return state, as_tensor(obs).to(params.dtype), as_tensor(reward).to(params.dtype), as_tensor(done)

    def __repr__(self) -> str:
        return f"MujocoTasks({self.spec.env_id}, {self.spec.objective}, horizon={self.horizon}, workers={self.workers})"


def check_common(cfg: Any) -> None:
    """The keys every MuJoCo dataset has: horizon, num_tasks, task_seed, workers."""
    if cfg.horizon < 1 or cfg.num_tasks < 0 or cfg.workers < 0:
        raise ConfigError(f"data.horizon must be >= 1, data.num_tasks >= 0 and data.workers >= 0 (got {cfg.horizon}, "
                          f"{cfg.num_tasks}, {cfg.workers})")
    if cfg.workers > 0 and "forkserver" not in multiprocessing.get_all_start_methods():
        raise ConfigError(f"data.workers={cfg.workers} needs multiprocessing's forkserver start method, which this "
                          f"platform lacks (Windows); set data.workers=0 to simulate in the trainer's process")


def draw_directions(n: int, generator: torch.Generator, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """n directions, -1 or +1 with probability 1/2 each: [n, 1]."""
    return torch.randint(2, (n, 1), generator=generator, device=device).float() * 2 - 1
