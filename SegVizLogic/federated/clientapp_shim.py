"""The ``flwr-clientapp`` a site's SuperExec finds first on its ``PATH`` (see :mod:`.clientapp_launcher`).

Run as ``python -IS clientapp_shim.py SOCKET REAL_FLWR_CLIENTAPP ARGS...``: standard library
only, no site-packages, so it starts in milliseconds. It hands ``ARGS`` (Flower's own
``flwr-clientapp`` arguments), its working directory, environment and standard streams to the
site's launcher, which forks a process that has Flower imported already, and then stands in
for that process: it forwards SIGINT and SIGTERM to it and exits with its exit code. When no
launcher answers, it runs the real ``flwr-clientapp`` in its place, so a round never depends
on the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!I")
"""A request is its length (4 bytes, network order) and then its JSON."""


def request_bytes(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    """The launch request for ``flwr-clientapp argv`` in ``cwd`` with ``env``."""
    body = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
    return HEADER.pack(len(body)) + body


def _lines(conn: socket.socket):
    """The launcher's answer, line by line: ``pid N`` once the process runs, ``exit N`` when it ended."""
    buffer = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode("ascii", "replace")


def main(argv: list[str]) -> int:
    socket_path, real, args = argv[0], argv[1], argv[2:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        socket.send_fds(conn, [request_bytes(args, os.getcwd(), dict(os.environ))], [0, 1, 2])
    except OSError:
        conn.close()
        os.execv(real, [real, *args])  # no launcher: the real flwr-clientapp, as Flower would run it
    child = None

    def forward(signum, _frame) -> None:
        if child is not None:
            try:
                os.kill(child, signum)
            except OSError:
                pass

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    for line in _lines(conn):
        kind, _, value = line.partition(" ")
        if kind == "pid":
            child = int(value)
        elif kind == "exit":
            return int(value)
    if child is None:  # the launcher refused or died before it started anything: run the real one
        os.execv(real, [real, *args])
    print(f"flwr-clientapp: the SegViz ClientApp launcher ended while process {child} ran", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
