"""Keep freed host memory in the process for reuse (glibc), instead of handing it back every step.

PyTorch's CPU allocator is plain ``malloc``/``free``. glibc serves blocks above its mmap
threshold (128 KiB to start) with fresh ``mmap`` and returns them to the kernel on ``free``, and
trims the heap top above 128 KiB. A meta-step allocates and frees the same large activations
(15 MB for conv4's first block at 75 queries) every task, so each one page-faults its memory in
again, zero-filled by the kernel: in the profile of second-order MAML on CPU a ``fill_`` of 15 MB
took 20 ms, the first convolution 17 ms instead of 4. Raising the mmap threshold to its maximum
(32 MiB) and the trim threshold out of reach keeps those blocks in the heap for the next task;
the cost is that the process's resident memory stays at its peak (as PyTorch's CUDA caching
allocator does on the GPU).

``metalearn`` applies this at start-up (``cli.main``); ``METALEARN_RETAIN_HOST_MEMORY=0`` turns it
off. The same is possible for any program with glibc's environment variables
(``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647``) or with jemalloc or
tcmalloc in ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
_TRIM_THRESHOLD = 2**31 - 1  # the largest int: in effect never

_applied = False


def retain_freed_memory() -> bool:
    """Apply the settings above once per process; False where they do not apply (not Linux/glibc,
    or switched off by ``METALEARN_RETAIN_HOST_MEMORY=0``)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("METALEARN_RETAIN_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt, without an ldconfig lookup
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
