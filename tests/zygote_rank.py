"""A torchrun worker that runs as a child forked from the test zygote (tests/zygote.py): ``zygote_rank.py ARGS``.

Standard library only, so it starts in milliseconds. It hands its stdin/stdout/stderr, cwd and environment (RANK,
MASTER_PORT, ...) to the zygote at $METALEARN_TEST_ZYGOTE, which forks ``metalearn ARGS`` on them. This process
stands in for that child towards torchrun: it passes on every signal torchrun (or a test) sends it and ends with
the child's exit status, by the same signal if the child was killed by one.
"""

import json
import os
import signal
import socket
import sys

conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(os.environ["METALEARN_TEST_ZYGOTE"])
request = {"args": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}
socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
child = int(conn.recv(64))
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda number, _frame: os.kill(child, number))
reply = conn.recv(64)  # retried after each forwarded signal (PEP 475)
code = int(reply) if reply else 70
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
