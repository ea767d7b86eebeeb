"""Several processes (CPU cores, GPUs, nodes) for one run: ``torchrun --nproc_per_node=N -m metalearn train ...``.

torchrun starts N copies of ``metalearn train`` with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in their environment. Rank 0 *is* the run: it parses the command with
Hydra, owns the one run directory, and is the only process that writes (TensorBoard,
checkpoints, ``results.json``, ``train.log``, the console). The other ranks skip Hydra
altogether (so they create no directory of their own): they wait for rank 0's resolved
config and run directory (``Group.share_job``), then run the same engine loop.

How the work is split, exactly (the engine calls the ``Group`` methods; a single
process gets the base ``Group``, whose every method is the identity):

* Meta-training: every rank draws the same full meta-batch from the seeded episode
  sampler (sampling is ~0.1% of a step, and the sampler's state stays one state) and
  keeps its contiguous share of ``meta_batch_size / world_size`` tasks. ``meta_step``
  averages over its tasks, so the average of the ranks' ``.grad`` is the gradient of
  the whole meta-batch, and every rank's optimizer makes the same update. The engine
  averages ``.grad`` after ``meta_step`` (one flat all-reduce per dtype) whatever filled
  it (per-task backward, Reptile's weight difference), so there is no
  DistributedDataParallel wrapper and no special case per algorithm.
* Randomness: the model is initialised from ``seed`` on every rank (identical). After
  that, rank r > 0 reseeds torch's, numpy's and python's global generators from
  (seed, r), so randomness drawn inside ``meta_step`` (Reptile's minibatch orders,
  ResNet-12 dropout) differs between ranks as it differs between tasks; rank 0 keeps
  the single-process stream. Checkpoints keep every rank's generator states.
* Validation and test: batches of fixed episodes go round-robin to the ranks and the
  per-episode metrics are gathered in episode order, so every rank gets the same
  numbers as a single process.
* Logged training metrics are averaged over ranks (the mean over the whole
  meta-batch). Stop requests (Ctrl-C, SIGTERM) are agreed on every step (MAX over
  ranks), NaN checks use the averaged metrics and the (identical) parameters, so all
  ranks stop after the same step.

Failures: each distinct one reaches the console once, however far apart the ranks meet it, and
every process ends non-zero. A failing rank first *claims* its one-line message in the job's
key-value store (an atomic counter per message, ``Group.claim``): only the first claimant prints
it, so a message met by several ranks, at once or minutes apart, is printed once. Rank 0 prints
its own as a single process does; a rank > 0 prints ``metalearn: error: rank R: ...``, after
letting rank 0 go first for ``RANK0_FIRST_S`` (the mistakes every rank meets alike then read as
in a single process; the wait only decides the wording, never whether a line is printed twice).
Each failure is also posted (``Group.failed``). The others then see a collective fail (the failed
process closed its connections) and leave quietly with its exit code (``PeerLost``); if no rank
posted anything (a process killed, e.g. by the OOM killer), rank 0 says so in one line, and
torchrun's report names the rank.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from metalearn.errors import ConfigError, MetalearnError

log = logging.getLogger("metalearn")

T = TypeVar("T")

#: The environment torchrun gives each worker; WORLD_SIZE > 1 makes ``metalearn.cli`` call ``main`` below.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class FollowerExit(Exception):
    """Rank 0 failed at a point where the others wait for it: they leave quietly with its exit code."""

    def __init__(self, exit_code: int):
        super().__init__(f"rank 0 stopped with exit code {exit_code}")
        self.exit_code = exit_code


class PeerLost(SystemExit):
    """A collective failed because another process of the job ended: leave with ``code`` (Hydra and the
    engine let a SystemExit through; the process that failed has told the console why)."""


#: How long a failing rank > 0 lets rank 0 claim a failure first (which only changes the wording).
RANK0_FIRST_S = 2.0
_FAILED_KEY = "metalearn/failed/"
_CLAIMED_KEY = "metalearn/claimed/"


def _collective(method):
    """A collective that fails because a peer is gone raises PeerLost (see the module docstring)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as e:  # torch.distributed.DistError and gloo's "Connection closed by peer"
            raise self.lost(e) from None

    return wrapper


class Group:
    """One process: the identity for every operation, so a single-process run is unchanged."""

    rank = 0
    world_size = 1
    is_main = True
    command = "metalearn"  # how to start this again (for the resume hint)

    def device(self, device: torch.device) -> torch.device:
        return device

    def check(self, meta_batch_size: int) -> None:
        """Raise ConfigError if the meta-batch cannot be split evenly over the processes."""

    def share_job(self, run_cfg, run_dir: Path, resume: str | None) -> None:
        """Rank 0 (which alone runs Hydra): send the resolved config (a RunConfig), the run directory and
        the run to resume to the other ranks."""

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on the others (e.g. downloads, cache builds: one writer)."""
        return fn()

    def seed_rank(self, seed: int) -> None:
        """Give ranks > 0 their own global random streams (after the shared initialisation)."""

    def restore_rng(self, ckpt: dict, seed: int) -> None:
        from metalearn import checkpoint

        checkpoint.set_rng_state(ckpt["rng"])

    def claim(self, message: str) -> bool:
        """Whether this process is the first of its job to report ``message`` (and so prints it)."""
        return True

    def rng_states(self) -> list[dict]:
        """Every rank's global generator states (rank 0's first), for the checkpoint."""
        from metalearn import checkpoint

        return [checkpoint.rng_state()]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank's parameters and buffers rank 0's."""

    def tasks(self, batch):
        """This rank's share of a meta-batch (a TaskBatch)."""
        return batch

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average ``.grad`` over the ranks (a parameter without a gradient anywhere keeps None)."""

    def agree_signal(self, signum: int | None) -> int | None:
        """The stop request of any rank (the same answer on every rank)."""
        return signum

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks."""
        return values

    def gather(self, item: Any) -> list[Any]:
        """Every rank's ``item``, in rank order, on every rank."""
        return [item]

    def barrier(self) -> None:
        pass

    def failed(self, message: str, exit_code: int) -> None:
        """This process fails with the one-line ``message`` (printed already on rank 0): tell the others."""


class ProcessGroup(Group):
    """``torch.distributed`` with the env:// rendezvous torchrun sets up."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not: start several processes with torchrun "
                              "(see the README, 'Several processes or GPUs'), or unset WORLD_SIZE")
        # Gloo carries CPU tensors (and the small control messages), NCCL the CUDA ones.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if not dist.is_initialized():
            # Long enough for rank 0 to build a dataset cache while the others wait (tieredImageNet: many minutes).
            dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        per_node = os.environ.get("LOCAL_WORLD_SIZE")
        self.command = (f"torchrun --nproc_per_node={per_node} -m metalearn" if per_node == str(self.world_size)
                        else "torchrun <the same options> -m metalearn")

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            if device.index is not None:
                raise ConfigError(f"device.type={device} names one GPU; under torchrun use device=cuda "
                                  "(each process takes cuda:LOCAL_RANK)")
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"torchrun started more processes on this node than its {torch.cuda.device_count()} "
                                  f"GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise ConfigError(f"device={device.type} cannot run several processes; use device=cuda or device=cpu")
        return device

    def check(self, meta_batch_size: int) -> None:
        if meta_batch_size % self.world_size:
            raise ConfigError(f"meta_batch_size={meta_batch_size} does not split evenly over {self.world_size} "
                              f"processes; use a multiple of {self.world_size} (or another --nproc_per_node)")

    # ------------------------------------------------------------ the job

    @_collective
    def _broadcast(self, message: Any = None) -> Any:
        box = [message]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_job(self, run_cfg, run_dir: Path, resume: str | None) -> None:
        from metalearn import checkpoint
        from metalearn.config import to_dict

        self.check(run_cfg.meta_batch_size)  # before the others start: one error line, from rank 0
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if run_cfg.device.type in ("cuda", "auto") and torch.cuda.is_available() and per_node > torch.cuda.device_count():
            raise ConfigError(f"torchrun started {per_node} processes on this node, which has "
                              f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
        # Absolute paths: the other ranks may run elsewhere (another node, another working directory).
        self._broadcast({"config": to_dict(run_cfg), "run_dir": str(Path(run_dir).resolve()),
                         "checkpoint": str(checkpoint.find(resume, "last").resolve()) if resume else None})
        self.shared = True

    def end_without_job(self, exit_code: int) -> None:
        """Rank 0 ends before sharing a job (a config error, ``--cfg job``): release the others."""
        if not getattr(self, "shared", False):
            self._broadcast({"exit": exit_code})

    def receive_job(self) -> dict:
        return self._broadcast()

    def main_first(self, fn: Callable[[], T]) -> T:
        if not self.is_main:
            code = self._broadcast()
            if code:
                raise FollowerExit(code)
            return fn()
        try:
            result = fn()
        except BaseException as e:
            self._broadcast(getattr(e, "exit_code", 1) or 1)
            raise
        self._broadcast(0)
        return result

    # ------------------------------------------------------------ random streams

    def _seed(self, seed: int, *more: int) -> None:
        from metalearn.seeding import seed_everything

        entropy = [seed % 2**63, self.rank, *more]  # SeedSequence takes non-negative integers
        seed_everything(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63))

    def seed_rank(self, seed: int) -> None:
        if self.rank:
            self._seed(seed)

    def restore_rng(self, ckpt: dict, seed: int) -> None:
        from metalearn import checkpoint

        states = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(states) == self.world_size:
            checkpoint.set_rng_state(states[self.rank])
            return
        if self.is_main:
            log.warning("the run had %d process(es), now %d: randomness drawn inside meta_step (Reptile's minibatches, "
                        "dropout) takes other streams than an uninterrupted run would", len(states), self.world_size)
        checkpoint.set_rng_state(states[0])
        if self.rank:
            self._seed(seed, ckpt["step"])  # a fresh stream of its own

    def rng_states(self) -> list[dict]:
        from metalearn import checkpoint

        return self.gather(checkpoint.rng_state())

    @_collective
    def broadcast_module(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for tensor in module.state_dict().values():
                self.dist.broadcast(tensor, src=0)

    # ------------------------------------------------------------ the loop

    def tasks(self, batch):
        share = batch.num_tasks // self.world_size
        return batch[self.rank * share:(self.rank + 1) * share]

    @_collective
    def average_gradients(self, params: list[torch.Tensor]) -> None:
        # Which parameters have a gradient on some rank: host-side flags (a CPU tensor through gloo, no GPU sync).
        # One that no rank touched stays None, as an optimizer skips it (a zero would still move Adam's state).
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        self.dist.all_reduce(present, op=self.dist.ReduceOp.MAX)
        buckets: dict[tuple, list[torch.Tensor]] = {}  # one flat all-reduce per (device, dtype)
        for p, anywhere in zip(params, present.tolist()):
            if anywhere:
                buckets.setdefault((p.device, p.dtype), []).append(p)
        for group in buckets.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            self.dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p in group:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()

    @_collective
    def agree_signal(self, signum: int | None) -> int | None:
        flag = torch.tensor([signum or 0])  # a CPU tensor: goes through gloo, never syncs a GPU stream
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return int(flag) or None

    @_collective
    def mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = list(values)  # the same order on every rank: the same algorithm made them
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        self.dist.all_reduce(total)
        return {k: v / self.world_size for k, v in zip(keys, total.tolist())}

    @_collective
    def gather(self, item: Any) -> list[Any]:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, item)
        return out

    @_collective
    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            try:
                self.dist.destroy_process_group()
            except RuntimeError:  # a peer is gone already
                pass

    # ------------------------------------------------------------ failures

    def _store(self):
        return self.dist.distributed_c10d._get_default_store()

    def _posted(self, rank: int) -> dict | None:
        try:
            store, key = self._store(), f"{_FAILED_KEY}{rank}"
            return json.loads(store.get(key)) if store.check([key]) else None
        except (RuntimeError, ValueError):  # the store is gone with rank 0, or unreadable
            return None

    def claim(self, message: str) -> bool:
        try:
            key = _CLAIMED_KEY + hashlib.sha256(message.encode()).hexdigest()
            return self._store().add(key, 1) == 1
        except (RuntimeError, ValueError):  # no store left to ask: printing twice beats printing never
            return True

    def failed(self, message: str, exit_code: int) -> None:
        try:
            self._store().set(f"{_FAILED_KEY}{self.rank}", json.dumps({"message": message, "exit_code": exit_code}))
        except (RuntimeError, ValueError):  # the store is gone with its host, or the group was never made
            pass

    def report(self, message: str, exit_code: int) -> None:
        """A rank > 0 fails: post it, give rank 0 a moment to claim it, and print it with the rank if no
        other process has."""
        self.failed(message, exit_code)
        deadline = time.monotonic() + RANK0_FIRST_S
        while self._posted(0) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.claim(message):
            print(f"metalearn: error: rank {self.rank}: {message}", file=sys.stderr, flush=True)

    def lost(self, error: Exception) -> PeerLost:
        """The exit of a process whose collective failed: another rank's failure is on the console, or
        (rank 0) one line says a process ended without one."""
        others = [p for r in range(self.world_size) if r != self.rank and (p := self._posted(r)) is not None]
        if others:
            log.info("another process of the job failed: %s", others[0]["message"])
            return PeerLost(others[0]["exit_code"] or 1)
        if self.is_main:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"metalearn: error: another process of this torchrun job ended without a message (killed, e.g. "
                  f"out of memory?): {first}; torchrun's report below names its rank and exit code",
                  file=sys.stderr, flush=True)
        return PeerLost(1)


#: The single process.
SINGLE = Group()
#: This process's group: set by ``main`` in a torchrun worker, else the single process.
_current: Group = SINGLE


def current() -> Group:
    """The process group the engine works in (torch.distributed itself keeps such a global too)."""
    return _current


def world_size() -> int:
    """How many processes share this run's meta-batch (torchrun's ``--nproc_per_node`` x nodes; 1 for a single
    process): what an algorithm that needs the whole meta-batch in one process reads in ``check_training``."""
    return _current.world_size


# ---------------------------------------------------------------- the command under torchrun


def main(command: str, args: list[str], run: Callable[[str, list[str]], int],
         follow: Callable[["ProcessGroup"], int]) -> int:
    """``metalearn <command>`` in a torchrun worker: rank 0 runs it with ``run``; the others ``follow``
    (``engine.follow``: given by the caller, so that this module never imports the engine)."""
    rank = int(os.environ.get("RANK", "0") or 0)

    def refuse(message: str) -> int:
        if rank == 0:
            print(f"metalearn: error: {message}", flush=True, file=sys.stderr)
        return 2

    if command != "train":
        return refuse(f"only 'metalearn train' runs under torchrun; run 'metalearn {command}' as one process")
    if any(a in ("-m", "--multirun") for a in args):
        return refuse("a sweep (-m) cannot run under torchrun; start one torchrun per configuration")
    global _current
    try:
        group = _current = ProcessGroup()
    except MetalearnError as e:
        return refuse(str(e))
    try:
        if not group.is_main:
            return follow(group)
        code: Any = 1
        try:
            code = run(command, args)
        except SystemExit as e:
            code = e.code
            raise
        finally:
            try:
                group.end_without_job(code if isinstance(code, int) else (0 if code is None else 1))
            except PeerLost:  # the others are gone already
                pass
        return code
    finally:
        group.close()
        _current = SINGLE
