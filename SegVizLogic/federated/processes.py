"""Flower processes and their supervision: environment, executables, addresses and ports, and
:class:`FlowerProcess`, which runs one Flower process in its own process group with its output in
a log file and stops it with everything it started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..errors import SegVizError, SegVizInputError

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "FlowerProcess",
    "flower_environment",
    "flower_executable",
    "format_address",
    "free_port",
    "parse_host_port",
    "wait_for_port",
]


DEFAULT_SUPERLINK_PORT = 9093


def flower_environment(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: this interpreter's ``bin`` first on ``PATH`` (Flower
    starts ``flower-superexec``, ``flwr-clientapp``, ``flwr-serverapp`` by name), no update
    check, unbuffered output, and ``FLWR_HOME`` when given."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NO_COLOR", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SegVizError(f"{name} not found: install Flower (pip install 'flwr>=1.42,<1.43') in this environment")
    return found


def parse_host_port(address: str, default_port: int = DEFAULT_SUPERLINK_PORT) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` -> ``(host, port)``.

    Raises:
        SegVizInputError: not an address.
    """
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise SegVizInputError(None, f"invalid address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:{default_port}")
    return host, number


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> str | None:
    """Wait until ``host:port`` accepts TCP connections.

    Returns:
        ``None`` once it does, else the last connection error (after ``timeout`` seconds,
        or as soon as ``alive()`` turns false).
    """
    deadline = time.monotonic() + timeout
    error = "timed out"
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout))):
                return None
        except OSError as exc:
            error = exc.strerror or str(exc)
        if time.monotonic() >= deadline or (alive is not None and not alive()):
            return error
        time.sleep(0.2)


class FlowerProcess:
    """A Flower process in its own process group, its output in a log file.

    Args:
        name: for messages (``"SuperLink"``, ``"SuperNode site-a"``).
        command: the command line.
        log_path: where stdout and stderr go.
        env: the environment.
        cwd: working directory.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: str | Path,
        env: Mapping[str, str],
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()/finally
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace", encoding="utf-8")
        except OSError:
            return ""

    def _plain_lines(self, since: int = 0) -> list[str]:
        """The non-empty lines written after byte ``since``, stripped, without ANSI colours."""

        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_text()[since:])
        return [line.strip() for line in text.splitlines() if line.strip()]

    def log_tail(self, lines: int = 8) -> str:
        """The last non-empty lines of the log, without ANSI colours."""
        return "\n".join(self._plain_lines()[-lines:])

    def failure_reason(self, since: int = 0, settle: float = 3.0) -> str:
        """Flower's own explanation of a failure, on one line, from the log written after byte
        ``since``: its ERROR lines and the exit-code paragraph (``Exit Code: 305`` ... the
        documentation link), not the web server's shutdown chatter that follows it. Waits up
        to ``settle`` seconds for a dying process so the paragraph is complete."""
        deadline = time.monotonic() + settle
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = self._plain_lines(since)
        reason, in_paragraph = [], False
        for line in lines:
            is_error = line.startswith("ERROR")
            if is_error:
                line = line.split(":", 1)[1].strip()
            if line.startswith("Exit Code:"):
                in_paragraph = True
            if (is_error or in_paragraph) and line not in reason:
                reason.append(line)
            if line.startswith("For more information"):
                in_paragraph = False
        if not reason:
            reason = lines[-3:]
        return "; ".join(reason) or f"no output (see {self.log_path})"

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process and everything it started (SIGTERM to the group, then SIGKILL)."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (superexec, clientapp/serverapp) may outlive the leader: clean the group.
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
