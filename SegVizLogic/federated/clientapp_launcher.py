"""A warm launcher for a site's ClientApp processes: Flower imported once, forked per message.

Flower 1.42's SuperNode starts a new ``flwr-clientapp`` process for every message, and each
one imports Flower's whole SuperNode command line (about 1.9 s of CPU) before it asks for its
message. With four sites on one machine that is most of a round's dispatch
(docs/BENCHMARKS.md). ``segviz federation join`` therefore starts this launcher next to the
site's SuperNode:

- the launcher (``python -m SegVizLogic.federated.clientapp_launcher SOCKET``) imports
  Flower's ``flwr-clientapp`` entry point once, then listens on a Unix socket in a private
  directory (mode 0700, the socket 0600, and only peers of the same user are served);
- the SuperExec finds a two-line ``flwr-clientapp`` script first on its ``PATH``
  (:func:`write_clientapp_command`); it runs :mod:`.clientapp_shim` with ``python -IS``,
  which sends Flower's arguments, its working directory, environment and standard streams
  to the launcher;
- the launcher forks; the child takes those streams, directory and environment and runs
  Flower's own ``flwr-clientapp`` entry point with those arguments, so the app, its
  verification and its token are Flower's as before. The shim forwards signals to the child
  and exits with its exit code.

The launcher imports nothing of SegViz's ClientApp (the app is what the signed FAB brings) and
runs single-threaded, so forking it is safe. Without the launcher (it died, or the platform has
no ``fork``) the shim runs the real ``flwr-clientapp``. The simulation engine is not affected.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import clientapp_shim
from .processes import FlowerProcess, flower_executable, parent_alive

__all__ = ["SOCKET_NAME", "ClientAppLauncher", "launcher_supported", "serve", "write_clientapp_command"]

SOCKET_NAME = "clientapp.sock"
MAX_REQUEST_BYTES = 1 << 20
"""A request larger than this (Flower's arguments and an environment) is refused."""
REQUEST_TIMEOUT = 5.0
"""Seconds a connected peer has to send its whole request."""


def launcher_supported() -> bool:
    """Whether this platform can run the launcher (``fork`` and Unix sockets with descriptor passing)."""
    return hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


def write_clientapp_command(bin_dir: str | Path, socket_path: str | Path, real: str | Path) -> Path:
    """Write ``bin_dir/flwr-clientapp``: the shim, handing its arguments to the launcher at
    ``socket_path`` (or running ``real``, Flower's ``flwr-clientapp``, when none answers)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "flwr-clientapp"
    command = [sys.executable, "-IS", clientapp_shim.__file__, str(socket_path), str(real)]
    script.write_text(f'#!/bin/sh\nexec {shlex.join(command)} "$@"\n', encoding="utf-8")
    script.chmod(0o700)
    return script


@dataclass
class _Launch:
    """One forked ClientApp and the shim connection waiting for its exit code."""

    conn: socket.socket
    started: float = field(default_factory=time.monotonic)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The shim's request and the three descriptors it passed (stdin, stdout, stderr); a bad
    request raises ``ValueError`` (or ``OSError``) with every descriptor it passed closed."""
    import json

    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
    try:
        if len(data) < clientapp_shim.HEADER.size:
            raise ValueError("short request")
        (size,) = clientapp_shim.HEADER.unpack_from(data)
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {size} bytes (at most {MAX_REQUEST_BYTES})")
        body = data[clientapp_shim.HEADER.size :]
        while len(body) < size:
            chunk = conn.recv(min(65536, size - len(body)))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        if len(fds) != 3:
            raise ValueError(f"expected 3 standard streams, got {len(fds)}")
        request = json.loads(body[:size])
        if (
            not isinstance(request, dict)
            or not isinstance(request.get("argv"), list)
            or not all(isinstance(a, str) for a in request["argv"])
        ):
            raise ValueError("argv must be a list of strings")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this process's user (Linux ``SO_PEERCRED``; elsewhere the
    private directory's permissions are the check)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _run_child(entry, request: dict, fds: list[int], close: list) -> None:
    """In the forked child: become the ClientApp process the shim stands for (``close``: the
    launcher's sockets and selector, which the child must not hold). Never returns."""
    code = 1
    try:
        for resource in close:
            resource.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        os.chdir(request.get("cwd") or ".")
        env = request.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update({str(k): str(v) for k, v in env.items()})
        import random

        random.seed()  # not the launcher's state, shared by every fork
        sys.argv = ["flwr-clientapp", *request["argv"]]
        result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the ClientApp's stderr, like Flower's own crash
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream: nothing left to flush
                stream.flush()
        os._exit(code)


def _exit_code(status: int) -> int:
    """A shell's exit code for a ``waitpid`` status (a signal ``n`` gives ``128 + n``)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def serve(socket_path: str | Path, entry=None, log=None, parent: int | None = None, remove_folder: bool = False) -> int:
    """Serve launch requests on ``socket_path`` until the parent process ends or SIGTERM.

    Args:
        entry: what a child runs (default: Flower's ``flwr-clientapp`` entry point, imported now).
        log: where one line per launch goes (default: stderr).
        parent: leave when this pid is no longer the parent (default: the parent at start).
        remove_folder: on leaving, also remove the socket's folder when it is empty (the private
            folder :class:`ClientAppLauncher` made, which its parent cannot remove if it was killed).
    """
    if entry is None:
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp as entry
    log = log or sys.stderr
    parent = os.getppid() if parent is None else parent
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = Path(socket_path)
    path.unlink(missing_ok=True)
    old_mask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    running: dict[int, _Launch] = {}
    print(f"SegViz ClientApp launcher ready on {path} (pid {os.getpid()})", file=log, flush=True)
    try:
        while not stopping and parent_alive(parent):
            if selector.select(timeout=0.2):
                try:
                    conn, _ = listener.accept()
                except OSError as error:
                    print(f"could not accept a launch request: {error}", file=log, flush=True)
                    continue
                try:
                    if not _same_user(conn):
                        raise PermissionError("peer is another user")
                    conn.settimeout(REQUEST_TIMEOUT)  # a peer that sends nothing must not stall every launch
                    request, fds = _read_request(conn)
                    conn.settimeout(None)
                except (OSError, ValueError) as error:
                    print(f"refused a launch request: {error}", file=log, flush=True)
                    conn.close()
                    continue
                for stream in (sys.stdout, sys.stderr, log):
                    stream.flush()
                try:
                    pid = os.fork()
                except OSError as error:  # the shim sees the connection close and runs the real one
                    pid = None
                    print(f"could not fork a ClientApp process: {error}", file=log, flush=True)
                if pid == 0:
                    _run_child(entry, request, fds, [selector, listener, conn])
                for fd in fds:
                    os.close(fd)
                if pid is None:
                    conn.close()
                    continue
                running[pid] = _Launch(conn)
                with contextlib.suppress(OSError):  # a shim gone already: its child runs on regardless
                    conn.sendall(f"pid {pid}\n".encode())
                print(f"started ClientApp process {pid}", file=log, flush=True)
            while running:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                launch = running.pop(pid, None)
                if launch is None:
                    continue
                code = _exit_code(status)
                with contextlib.suppress(OSError):
                    launch.conn.sendall(f"exit {code}\n".encode())
                launch.conn.close()
                print(
                    f"ClientApp process {pid} exited with {code} after {time.monotonic() - launch.started:.1f} s",
                    file=log,
                    flush=True,
                )
    finally:
        selector.close()
        listener.close()
        path.unlink(missing_ok=True)
        if remove_folder:
            with contextlib.suppress(OSError):  # not empty: not ours to remove
                path.parent.rmdir()
        for launch in running.values():
            launch.conn.close()  # their shims report the launcher gone; the children follow --parent-pid
    return 0


class ClientAppLauncher:
    """The launcher process for one site, and the ``bin`` folder to put first on its SuperNode's ``PATH``.

    Args:
        state_dir: the site's federated state folder (``flwr-clientapp`` goes to its ``clientapp-bin``,
            the launcher's output to ``clientapp-launcher.log``).
        env: the environment of the site's Flower processes.
        ready_timeout: seconds to wait for the launcher to listen.

    Raises:
        RuntimeError: the launcher did not start (its log says why); callers go on without it.
    """

    def __init__(self, state_dir: str | Path, env: dict[str, str], ready_timeout: float = 30.0) -> None:
        self.state_dir = Path(state_dir).resolve()  # absolute: it goes on PATH of processes elsewhere
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._private = Path(tempfile.mkdtemp(prefix="segviz-clientapp-"))  # short: socket paths are limited
        self.socket_path = self._private / SOCKET_NAME
        self.bin_dir = self.state_dir / "clientapp-bin"
        self.log_path = self.state_dir / "clientapp-launcher.log"
        # Its own process group, like every Flower process of the site: stopping it also ends any
        # ClientApp it forked that is still running.
        self._runner = FlowerProcess(
            "ClientApp launcher",
            [sys.executable, "-m", __name__, str(self.socket_path)],
            self.log_path,
            env,
            self.state_dir,
        )
        self.process = self._runner.process
        deadline = time.monotonic() + ready_timeout
        while not self.socket_path.exists():
            if not self._runner.alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the ClientApp launcher did not start (log: {self.log_path})")
            time.sleep(0.05)
        write_clientapp_command(self.bin_dir, self.socket_path, flower_executable("flwr-clientapp"))

    def close(self) -> None:
        """Stop the launcher and whatever it forked that still runs, and remove its files."""
        self._runner.stop(grace=5.0)
        shutil.rmtree(self._private, ignore_errors=True)
        shutil.rmtree(self.bin_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], remove_folder=True))
