"""Flower processes and their supervision: what keeps them alive and what stops them.

- :class:`FlowerProcess` runs one Flower process in its own process group (POSIX session,
  Windows process group) with its output in a log file, and stops it with everything it
  started.
- A *lifeline* binds a child to its parent: the child runs Flower's console script inside
  ``python -m SegVizLogic.federated.processes`` with a pipe on its standard input that only
  the parent holds. However the parent ends (exit, crash, ``kill -9``, Slicer force-quit) the
  operating system closes the pipe; the child sees end-of-file and leaves gracefully (Flower's
  SIGTERM handler: a SuperNode signs off at the SuperLink), then hard after a grace period.
  A pipe works the same on Linux, macOS and Windows, and unlike polling the parent's pid it
  fires even while the dead parent is an unreaped zombie. Flower's own children
  (``flower-superexec``, ``flwr-clientapp``) follow their parent by ``--parent-pid``.
- :class:`ExclusiveLock` holds an OS file lock (``fcntl`` / ``msvcrt``) that the OS releases
  when the holder dies, so a crashed holder never blocks the next one.

Every platform difference sits in one small function here: :func:`process_group_kwargs`,
:func:`interrupt_process_group`, :func:`kill_process_group`, :func:`process_group_alive`,
:func:`raise_termination` and :class:`ExclusiveLock`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ..errors import SegVizError, SegVizInputError

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "SUPEREXEC_POLL_SECONDS",
    "SUPERNODE_PULL_SECONDS",
    "ExclusiveLock",
    "FlowerProcess",
    "LockHeld",
    "exit_when_orphaned",
    "flower_environment",
    "flower_executable",
    "format_address",
    "free_port",
    "interrupt_process_group",
    "kill_process_group",
    "lifeline_command",
    "parent_alive",
    "parse_host_port",
    "process_group_alive",
    "process_group_kwargs",
    "push_stranded_replies",
    "raise_termination",
    "shorten_supernode_pull",
    "wait_for_port",
    "waiting_reply_run",
    "watch_lifeline",
]

_WINDOWS = os.name == "nt"

DEFAULT_SUPERLINK_PORT = 9093


SUPEREXEC_POLL_SECONDS = "0.2"
"""How often a SuperExec asks its SuperNode or SuperLink for an app to start
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; Flower's default 1 s is up to a second of every round's
dispatch at each site, and of each run's start at the coordinator)."""


SUPERNODE_PULL_SECONDS = "1"
"""How long a SuperNode waits after a pull that found no message (``SEGVIZ_SUPERNODE_PULL_INTERVAL``).
Flower 1.42 hard-codes 3 s, so a message waits 1.5 s on average (up to 3 s) before its site sees
it; 1 s keeps an idle site at one request a second (100 sites: 100 requests a second at the
SuperLink)."""

_SUPERNODE_PULL_ENV = "SEGVIZ_SUPERNODE_PULL_INTERVAL"
_FLOWER_EMPTY_PULL_WAIT = 3
"""The wait after an empty pull in Flower 1.42's ``flwr.supernode.start_client_internal``."""


def shorten_supernode_pull(seconds: float) -> bool:
    """Make this process's Flower SuperNode wait ``seconds`` after an empty pull instead of 3 s.

    Flower 1.42's node loop (``start_client_internal``) calls ``time.sleep(3)`` when a pull found
    no message, with no option to change it. This gives that module a ``time`` whose ``sleep(3)``
    sleeps ``seconds``; every other wait and every other ``time`` function are Flower's own.

    Returns:
        ``True`` if the loop was changed; ``False`` (nothing changed) where the installed Flower's
        loop does not have the wait this was written for.
    """
    import inspect
    import types

    from flwr.supernode import start_client_internal as node_loop

    if not 0.05 <= seconds <= 60:
        raise ValueError(f"the SuperNode pull interval must be 0.05-60 s, got {seconds!r}")
    source = inspect.getsource(node_loop.start_client_internal)
    if f"time.sleep({_FLOWER_EMPTY_PULL_WAIT})" not in source or node_loop.time is not time:
        return False

    def sleep(duration: float) -> None:
        time.sleep(seconds if duration == _FLOWER_EMPTY_PULL_WAIT else duration)

    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = sleep
    node_loop.time = clock
    return True


def push_stranded_replies() -> bool:
    """Make this process's Flower SuperNode send a ClientApp reply that is waiting, even when no new
    message came.

    Flower 1.42's node loop pushes replies only right after it pulled a message, and then only until
    one reply went out. When a run dies mid-round (a SuperLink restart), the ClientApp of its last
    message still replies; if that stale reply arrives before the reply to the new run's message,
    the loop pushes the stale one (the SuperLink ignores it) and goes back to pulling, and the new
    run's reply waits in the SuperNode until the round times out (seen in CI: a round that never
    finished after a restart). This wraps the loop's pull: when it found no message but a reply is
    waiting (looked at without taking it), the loop goes on to push it.

    Returns:
        ``True`` if the loop was changed (or already was); ``False`` (nothing changed) where the
        installed Flower's loop is not the one this was written for.
    """
    import inspect

    from flwr.supernode import start_client_internal as node_loop

    pull = node_loop._pull_and_store_message
    if getattr(pull, "segviz_pushes_stranded_replies", False):
        return True
    loop = inspect.getsource(node_loop.start_client_internal)
    push = inspect.getsource(node_loop._push_messages)
    expected = ("run_id = _pull_and_store_message(", "if run_id is None:", "_push_messages(")
    if not all(text in loop for text in expected) or "get_messages_legacy(is_reply=True)" not in push:
        return False

    def pull_or_waiting_reply(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is None:
            run_id = waiting_reply_run(kwargs.get("state", args[0] if args else None))
        return run_id

    pull_or_waiting_reply.segviz_pushes_stranded_replies = True
    node_loop._pull_and_store_message = pull_or_waiting_reply
    return True


def waiting_reply_run(state) -> int | None:
    """The run of a reply waiting in a Flower 1.42 in-memory node state, without taking it
    (``get_messages_legacy`` would mark it taken); ``None`` when none waits or the state is another kind."""
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if store is None or lock is None:
        return None
    with lock:
        for entry in store.values():
            message = getattr(entry, "message", None)
            if message is not None and not entry.is_retrieved and message.metadata.reply_to_message_id:
                return int(message.metadata.run_id)
    return None


def _supernode_pull_from_environment() -> None:
    """Apply ``SEGVIZ_SUPERNODE_PULL_INTERVAL`` to this process's SuperNode (a bad value, or a
    Flower without the expected loop, keeps Flower's 3 s and says so on stderr)."""
    raw = os.environ.get(_SUPERNODE_PULL_ENV, SUPERNODE_PULL_SECONDS)
    try:
        changed = shorten_supernode_pull(float(raw))
    except ValueError as error:
        print(
            f"segviz: {_SUPERNODE_PULL_ENV}={raw!r} ignored ({error}); the SuperNode pulls every 3 s", file=sys.stderr
        )
        return
    if changed:
        print(f"segviz: the SuperNode pulls every {float(raw):g} s while it has no message", file=sys.stderr)
    else:
        print(
            "segviz: this Flower's SuperNode loop is not the one SegViz knows; it pulls at Flower's pace",
            file=sys.stderr,
        )


def flower_environment(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: this interpreter's ``bin`` first on ``PATH`` (Flower
    starts ``flower-superexec``, ``flwr-clientapp``, ``flwr-serverapp`` by name), no update
    check, unbuffered output, the SuperExec's poll interval (:data:`SUPEREXEC_POLL_SECONDS`,
    unless already set) and ``FLWR_HOME`` when given."""
    env = dict(os.environ)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_SECONDS)
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


# --- platform differences, one function each -----------------------------------------------


def process_group_kwargs(windows: bool = _WINDOWS) -> dict[str, Any]:
    """``subprocess.Popen`` arguments that start a child as the leader of its own process
    group, so it and everything it starts can be signalled together and a Ctrl-C in the
    parent's terminal does not reach it: a new session on POSIX, ``CREATE_NEW_PROCESS_GROUP``
    on Windows (what ``CTRL_BREAK_EVENT`` needs)."""
    if windows:
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)}
    return {"start_new_session": True}


def interrupt_process_group(process: subprocess.Popen) -> None:
    """Ask a process group started with :func:`process_group_kwargs` to stop gracefully:
    SIGTERM to the group on POSIX, ``CTRL_BREAK_EVENT`` on Windows (Python maps it to
    SIGBREAK, which Flower's processes end on). A group that is gone is not an error."""
    try:
        if _WINDOWS:
            process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        else:
            os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def kill_process_group(process: subprocess.Popen) -> None:
    """Stop a process group at once: SIGKILL to the group on POSIX; on Windows (no SIGKILL,
    no ``killpg``) ``taskkill /F /T`` ends the process and its whole tree."""
    if _WINDOWS:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False, timeout=30)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_group_alive(process: subprocess.Popen) -> bool:
    """Whether any process of the group still runs (on Windows: the leader itself; its
    children follow it through Flower's ``--parent-pid`` monitors)."""
    if _WINDOWS:
        return process.poll() is None
    try:
        os.killpg(process.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def raise_termination() -> None:
    """Ask this process and its process group to end gracefully: SIGTERM to the group on POSIX
    (the group leader's children, e.g. Flower's SuperExec, leave at the same time instead of
    first noticing their parent is gone); on Windows SIGTERM raised in-process, where Flower's
    handler runs (its children follow by ``--parent-pid``)."""
    if _WINDOWS:
        signal.raise_signal(signal.SIGTERM)
    else:
        os.killpg(os.getpgrp(), signal.SIGTERM)


class LockHeld(SegVizError):
    """Another process holds the lock (:attr:`owner` is what it wrote into the file)."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path, self.owner = path, owner
        super().__init__(f"{path}: locked by {owner or 'another process'}")


class ExclusiveLock:
    """An exclusive, non-blocking OS lock on ``path`` (created if missing) for as long as the
    ``with`` block runs or the process lives: the OS releases it when the holder dies, however
    it dies. ``owner`` is written into the file for the message another process gets.

    Raises:
        LockHeld: another process holds it.

    Example::

        with ExclusiveLock(site / ".segviz/federated/join.lock", f"pid {os.getpid()}"):
            ...
    """

    def __init__(self, path: str | Path, owner: str = "") -> None:
        self.path = Path(path)
        self.owner = owner
        self._handle: IO[str] | None = None

    def __enter__(self) -> ExclusiveLock:  # noqa: PYI034
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            _lock_handle(handle)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip()
            handle.close()
            raise LockHeld(self.path, owner) from None
        handle.seek(0)
        handle.truncate()
        handle.write(self.owner)
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
            _unlock_handle(self._handle)
            self._handle.close()
            self._handle = None


def _lock_handle(handle: IO[str]) -> None:
    if _WINDOWS:
        import msvcrt

        handle.seek(0)
        # Locks one byte at offset 0; the owner text may grow past it, which is fine.
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock_handle(handle: IO[str]) -> None:
    try:
        if _WINDOWS:
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:
        pass


def parent_alive(parent_pid: int) -> bool:
    """Whether the process that started this one still runs: on POSIX this process is
    re-parented the moment its parent dies (so a zombie parent counts as gone); Windows does
    not re-parent, so there the parent's pid is looked up (Flower's own check)."""
    if _WINDOWS:
        from flwr.supercore.app_utils import _pid_exists

        return bool(_pid_exists(parent_pid))
    return os.getppid() == parent_pid


def exit_when_orphaned(grace: float = 10.0, poll: float = 1.0) -> threading.Thread:
    """End this process ``grace`` seconds after its parent died, if it has not ended by then.

    For processes that Flower starts and watches with ``--parent-pid`` (a ServerApp under its
    SuperExec): Flower's parent monitor raises SIGINT, whose handler logs and runs exit
    handlers, and a process whose main thread holds the logging lock at that moment (an HTTP
    retry loop against a SuperLink that is gone logs every attempt) never gets out. This
    watchdog does not depend on that handler.
    """
    parent = os.getppid()

    def watch() -> None:
        while parent_alive(parent):
            time.sleep(poll)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, name="segviz-orphan-watchdog", daemon=True)
    thread.start()
    return thread


# --- the lifeline ---------------------------------------------------------------------------

LIFELINE_GRACE = 6.0
"""Seconds a child whose parent died gets to leave gracefully before it ends itself hard."""


def lifeline_command(command: Sequence[str]) -> list[str]:
    """The command that runs Flower's console script ``command[0]`` (by name or path) with
    ``command[1:]`` inside a lifeline process (see the module docstring)."""
    return [sys.executable, "-m", "SegVizLogic.federated.processes", "--lifeline", *command]


def watch_lifeline(
    stream: IO[bytes],
    on_parent_gone: Callable[[], None] = raise_termination,
    grace: float = LIFELINE_GRACE,
    hard_exit: Callable[[], None] | None = None,
) -> threading.Thread:
    """Watch ``stream`` (the read end of the parent's pipe) on a daemon thread: at end of file
    call ``on_parent_gone`` (graceful), and ``hard_exit`` ``grace`` seconds later if this
    process still runs (default: kill this process group on POSIX, ``os._exit`` on Windows)."""

    def hard() -> None:
        if not _WINDOWS:
            try:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            except OSError:
                pass
        os._exit(1)

    def watch() -> None:
        try:
            # The descriptor, not the buffered stream: a daemon thread blocked in a buffered read
            # holds its lock, and interpreter shutdown then aborts ("_enter_buffered_busy").
            while os.read(stream.fileno(), 4096):
                pass  # the parent never writes; anything read is ignored
        except (OSError, ValueError):
            pass
        on_parent_gone()
        time.sleep(grace)
        (hard_exit or hard)()

    thread = threading.Thread(target=watch, name="segviz-lifeline", daemon=True)
    thread.start()
    return thread


def _console_script(name: str) -> Callable[[], Any]:
    """The function behind an installed console script (``flower-supernode`` ..., or ``segviz``)."""
    wanted = Path(name).name
    if wanted.lower().endswith((".exe", ".py")):
        wanted = wanted.rsplit(".", 1)[0]
    if wanted == "segviz":  # this package's own command, also when it runs from a checkout
        from ..cli import main

        return main
    for entry in importlib.metadata.entry_points(group="console_scripts"):
        if entry.name == wanted:
            return entry.load()
    raise SegVizError(f"{wanted}: no such console script in this environment (is Flower installed?)")


def _lifeline_main(argv: Sequence[str]) -> int:
    """``python -m SegVizLogic.federated.processes --lifeline SCRIPT ARGS...``"""
    script = _console_script(argv[0])
    if Path(argv[0]).name.lower().startswith("flower-supernode"):
        _supernode_pull_from_environment()
        if push_stranded_replies():
            print("segviz: the SuperNode sends a waiting reply even when no new message came", file=sys.stderr)
    watch_lifeline(sys.stdin.buffer)
    sys.argv = [argv[0], *argv[1:]]
    result = script()
    return result if isinstance(result, int) else 0


class FlowerProcess:
    """A Flower process in its own process group, its output in a log file.

    Args:
        name: for messages (``"SuperLink"``, ``"SuperNode site-a"``).
        command: the command line.
        log_path: where stdout and stderr go.
        env: the environment.
        cwd: working directory.
        lifeline: run ``command`` (a Flower console script) on a lifeline to this process, so it
            leaves when this process dies, however it dies (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: str | Path,
        env: Mapping[str, str],
        cwd: str | Path | None = None,
        lifeline: bool = False,
    ) -> None:
        self.name = name
        self.command = lifeline_command(command) if lifeline else list(command)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()/finally
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # The lifeline: only this process holds the pipe's write end (Popen's pipes are
            # not inherited by other children), so it closes exactly when this process ends.
            stdin=subprocess.PIPE if lifeline else subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            **process_group_kwargs(),
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
        """Stop the process and everything it started: a graceful signal to the group (a
        SuperNode signs off at its SuperLink), then a hard kill of what is left, including
        children it started in a session of their own (Flower detaches the SuperLink's
        SuperExec; they follow their parent by ``--parent-pid`` within seconds, and are killed
        if they have not after ``grace``)."""
        detached = _descendants(self.process.pid)
        if self.alive():
            interrupt_process_group(self.process)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (superexec, clientapp/serverapp) may outlive the leader: clean the group.
        interrupt_process_group(self.process)
        deadline = time.monotonic() + grace
        while process_group_alive(self.process) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_process_group(self.process)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        while (left := [pid for pid in detached if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.process.stdin is not None:
            self.process.stdin.close()
        self._log.close()
        return self.process.returncode


def _descendants(pid: int) -> set[int]:
    """Every descendant of ``pid`` (Linux: the kernel's child lists; elsewhere none, and
    Flower's ``--parent-pid`` monitors are what ends detached children)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text(encoding="utf-8").split()
        except OSError:
            continue
        for child in map(int, children):
            found |= {child} | _descendants(child)
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (Linux; a zombie has finished)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--lifeline":
        sys.exit(_lifeline_main(sys.argv[2:]))
    sys.exit("usage: python -m SegVizLogic.federated.processes --lifeline SCRIPT [ARGS...]")
