"""A warm interpreter for the CLI tests: ``python -m metalearn ...`` without paying for torch's import each time.

A CLI run of the suite spends most of its CPU before metalearn's first line: importing torch, torch._dynamo
(which the first optimizer pulls in), Hydra and TensorBoard, about 5 s per process on a 2-core CI machine,
over two hundred times. This process imports those third-party libraries once and then forks one child per
request. The child is a process of its own (its own pid, cwd, environment, stdout/stderr files, exit status,
signals); it imports metalearn itself fresh (so module-level settings such as METALEARN_FAULT are read as in a
real run) and runs ``metalearn`` as ``python -m metalearn`` does (runpy), then Python's exit handlers.

Protocol (conftest.run_cli): one JSON request per line on stdin, {"args", "cwd", "env", "out", "err", "pid",
"rc", "file_size_limit"}; the child's pid is written to the "pid" file, and when it ends its exit status (as
subprocess reports it: negative for a signal) to the "rc" file, after its CPU seconds to "cpu" beside it. Set METALEARN_TEST_EXEC=1 to run every CLI
test with a plain ``python -m metalearn`` instead.

torchrun's workers come the same way (tests/zygote_rank.py): torchrun starts ``python zygote_rank.py ARGS``, a
stdlib-only process that connects to this zygote's socket (argv[1]), hands over its stdin/stdout/stderr and
environment, and stands in for the forked ``metalearn ARGS`` child: it forwards the signals torchrun sends and ends
with the child's exit status (the same signal if the child was killed). If it dies first, the child is killed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

# The heavy third-party imports, done once (nothing of metalearn: each child imports it).
import hydra  # noqa: F401
import hydra._internal.utils  # noqa: F401
import numpy  # noqa: F401
import omegaconf  # noqa: F401
import PIL.Image  # noqa: F401
import torch
import torch._dynamo  # noqa: F401
import torch.utils.tensorboard  # noqa: F401
import tqdm  # noqa: F401

_pending: dict[int, str] = {}  # child pid -> its rc file
_ranks: dict[int, socket.socket] = {}  # child pid -> the connection of the zygote_rank.py standing in for it
_inherited: list[socket.socket] = []  # sockets no child may keep: the listener and every rank connection


def _write(path: str, text: str) -> None:
    """``text`` into ``path`` atomically (the test polls for the file); a request whose folder has gone
    (its test timed out and cleaned up) is dropped."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except FileNotFoundError:
        pass


def _reap() -> None:
    """Write the exit status of every child that has ended."""
    while _pending or _ranks:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = _ranks.pop(pid, None)
        if conn is not None:  # a torchrun worker: its stand-in ends with the same status
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            _close(conn)
        rc = _pending.pop(pid, None)
        if rc is not None:
            # The child's CPU seconds (its own and its waited-for children's): the suite's CPU profile.
            _write(rc[:-2] + "cpu", str(usage.ru_utime + usage.ru_stime))
            _write(rc, str(os.waitstatus_to_exitcode(status)))


def _close(conn: socket.socket) -> None:
    if conn in _inherited:
        _inherited.remove(conn)
    conn.close()


def _child(request: dict, fds: list[int] | None = None) -> None:
    """In the forked child: become ``python -m metalearn <args>`` in the request's cwd and environment, on the
    stdin/stdout/stderr ``fds`` handed over by a torchrun worker's stand-in, or else on the request's files."""
    import atexit
    import io
    import runpy

    for sock in _inherited:  # another job's pipes or connections kept open here would hang it
        sock.close()
    os.setpgrp()  # signals sent to the test's process group do not reach the zygote, and back
    if request.get("file_size_limit") is not None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(request["file_size_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if fds is not None:
        for fd, given in enumerate(fds):
            os.dup2(given, fd)
            os.close(given)
    else:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False))
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True, line_buffering=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True, line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = os.getcwd()  # what ``python -m`` puts first, then PYTHONPATH's folders
    sys.path[1:1] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.argv = ["metalearn", *request["args"]]
    code = 0
    try:
        runpy.run_module("metalearn", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    try:
        # As the interpreter ends: first join the non-daemon threads and run threading's exit hooks
        # (concurrent.futures and joblib's executors shut down there), then the atexit functions
        # (logging.shutdown, TensorBoard writers).
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork(request: dict, fds: list[int] | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            _child(request, fds)
        except BaseException:  # noqa: BLE001 - set-up failed before metalearn ran: say why
            import traceback

            traceback.print_exc()
        finally:
            os._exit(70)  # never back into this loop, whatever happened
    for fd in fds or ():
        os.close(fd)  # the child has them; kept here, they would hold the job's pipes open
    return pid


def _serve_rank(conn: socket.socket) -> None:
    """A message from a torchrun worker's stand-in: its request (with its three fds), or its end."""
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    except OSError:
        message, fds = b"", []
    owner = next((pid for pid, c in _ranks.items() if c is conn), None)
    if not message:  # the stand-in has gone (killed): its child goes too
        if owner is not None:
            try:
                os.killpg(owner, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            _close(conn)
        return
    pid = _fork(json.loads(message), fds)
    _ranks[pid] = conn
    conn.sendall(f"{pid}\n".encode())


def main() -> None:
    """Serve requests until stdin closes. One thread only (forking a threaded process is unsafe): the loop
    waits for a request at most 20 ms at a time and reaps ended children in between."""
    torch.set_num_threads(1)  # the CLI tests' setting (conftest.cli_env: OMP_NUM_THREADS=1)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(sys.argv[1])
    listener.listen(64)
    _inherited.append(listener)
    buffer = b""
    while True:
        ready, _, _ = select.select([0, *_inherited], [], [], 0.02)
        _reap()
        for sock in ready:
            if sock is listener:
                conn, _ = listener.accept()
                _inherited.append(conn)
            elif sock != 0 and sock in _inherited:
                _serve_rank(sock)
        if 0 not in ready:
            continue
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            pid = _fork(request)
            _pending[pid] = request["rc"]
            _write(request["pid"], str(pid))
    listener.close()
    while _pending or _ranks:  # stdin closed: the test process is ending; let running children finish
        _reap()
        select.select([], [], [], 0.02)


if __name__ == "__main__":
    main()
