"""A testing hook: crash this process at one exact point of a run, named by ``METALEARN_FAULT``.

Unset (always, outside the fault tests) every hook is one ``is None`` check. Set, it reads

    METALEARN_FAULT=<action>=<phase>:<step>[:<detail>][@<rank>]

* action ``kill_at``: SIGKILL this process (no handler, no cleanup: a power cut, the OOM killer);
  ``raise_at``: raise a TrainingError (an ordinary failure of this process, for the torchrun tests).
* phase and step, where the run is:
  ``step:N``   inside meta-step N: gradients computed, the parameters not updated yet;
  ``val:N:K``  in the validation at step N, after K of its evaluation rounds (K=0: before the first);
  ``save:N[:name]`` writing checkpoint ``name`` (last, best; any if left out) at step N: half the
               temp file is written, before os.replace;
  ``test:N:K`` in the final test (N = steps), after K rounds.
* ``@R``: only rank R of a torchrun job (default: every process).

``METALEARN_FAULT_DELAY=<rank>:<seconds>`` makes that rank wait before its fault (ranks meeting
the same failure seconds apart, for the torchrun tests).

tests/test_faults.py kills runs this way and checks that resuming ends exactly where an
uninterrupted run does; tests/test_distributed.py fails one rank of a torchrun job.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple

from metalearn.errors import ConfigError, TrainingError

ENV = "METALEARN_FAULT"
PHASES = ("step", "val", "save", "test")


class Fault(NamedTuple):
    action: str
    phase: str
    step: int
    detail: str | None
    rank: int | None


def parse(spec: str) -> Fault:
    try:
        action, where = spec.split("=", 1)
        where, _, rank = where.partition("@")
        phase, step, *detail = where.split(":")
        fault = Fault(action.removesuffix("_at"), phase, int(step), detail[0] if detail else None,
                      int(rank) if rank else None)
        if action not in ("kill_at", "raise_at") or phase not in PHASES or len(detail) > 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{ENV}={spec!r} is not a fault point; see metalearn/faults.py "
                          "(e.g. kill_at=save:20:last, kill_at=val:10:2, raise_at=step:3@1), or unset it") from None
    return fault


_SPEC = os.environ.get(ENV) or None  # read once, when metalearn starts
_FAULT: Fault | None = None  # parsed at the first hook (a malformed spec is then one error line)


def at(phase: str, step: int, detail: object = None, rank: int = 0) -> bool:
    """Whether the fault is set for this point."""
    global _FAULT
    if _SPEC is None:
        return False
    f = _FAULT = _FAULT or parse(_SPEC)
    return (f.phase == phase and f.step == step and (f.detail is None or f.detail == str(detail))
            and (f.rank is None or f.rank == rank))


def trigger(rank: int = 0) -> None:
    """Do the fault's action, now (after ``METALEARN_FAULT_DELAY``, if it names this rank)."""
    delay = os.environ.get(ENV + "_DELAY") or ""
    if delay:
        try:
            delay_rank, seconds = int(delay.split(":")[0]), float(delay.split(":")[1])
        except (ValueError, IndexError):
            raise ConfigError(f"{ENV}_DELAY={delay!r} is not <rank>:<seconds> (e.g. 0:6); fix or unset it") from None
        if delay_rank == rank:
            time.sleep(seconds)
    if _FAULT.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise TrainingError(f"a fault injected by {ENV}={_SPEC} (a testing hook); unset it")


def point(phase: str, step: int, detail: object = None, rank: int = 0) -> None:
    """A place a fault can hit: does nothing unless ``METALEARN_FAULT`` names it."""
    if _SPEC is not None and at(phase, step, detail, rank):
        trigger(rank)
