"""Run ``segviz`` commands as child processes and follow their JSON-lines progress, non-blocking.

Slicer never trains or infers in its own process: the panel starts a job, then calls
``job.poll()`` from a ``qt.QTimer``; tests call ``poll()`` in a loop. Stopping is graceful first
and forceful after a grace period, for the whole process *tree*: ``segviz federation join``
starts its Flower SuperNode in a session of its own (as Flower does), so a process group is not
enough. The tree is followed with ``psutil`` while the child runs, so the SuperNode is found and
ended even when ``join`` itself died first.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from SegVizLogic.errors import SegVizError
from SegVizLogic.progress import parse_progress_line

from .compatibility import child_process_options, graceful_stop_signal
from .panel_state import FederationState, FederationStatus, InferenceState, InferenceStatus

__all__ = [
    "FederationJob",
    "InferenceJob",
    "ProcessJob",
    "child_environment",
    "infer_command",
    "join_command",
    "python_executable",
    "segviz_command",
]

# The SegVizLogic package bundled with the module sits next to SegVizSlicer.py; the child gets it on
# PYTHONPATH so the CLI it runs is the same code as the panel (also when `segviz` is not pip-installed).
_LAUNCHER = "import sys; from SegVizLogic.cli import main; sys.exit(main())"
_STDERR_TAIL = 40
_TREE_REFRESH_S = 1.0


def python_executable() -> str:
    """The Python to run the CLI with: Slicer's ``PythonSlicer`` launcher inside Slicer (on PATH
    there, as ``slicer.util.pip_install`` finds it), else this interpreter."""
    inside_slicer = "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app")
    if inside_slicer:
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return launcher
    return sys.executable


def _package_root() -> Path | None:
    """Folder holding the SegVizLogic package the panel itself imports."""
    try:
        import SegVizLogic
    except ImportError:
        return None
    return Path(SegVizLogic.__file__).resolve().parent.parent


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child: unbuffered output, SegVizLogic importable, JSON progress readable."""
    env = dict(os.environ)
    root = _package_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if extra:
        env.update(extra)
    return env


def segviz_command(python: str | None = None) -> list[str]:
    """The argv prefix that runs the ``segviz`` CLI."""
    return [python or python_executable(), "-c", _LAUNCHER]


def infer_command(
    model: str | Path,
    input_path: str | Path,
    output: str | Path,
    device: str = "auto",
    stats: str | Path | None = None,
    series_uid: str | None = None,
    python: str | None = None,
) -> list[str]:
    """argv of ``segviz infer ... --progress json --force``.

    Args:
        series_uid: the DICOM series to read when ``input_path`` is a DICOM folder.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    argv = segviz_command(python) + [
        "infer",
        "--model",
        str(model),
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--device",
        device,
        "--progress",
        "json",
        "--force",
    ]
    if series_uid:
        argv += ["--series", series_uid]
    if stats is not None:
        argv += ["--stats", str(stats)]
    return argv


def join_command(
    superlink: str,
    site_dir: str | Path,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    trust: str | Path | None = None,
    auth_key: str | Path | None = None,
    share_final_batchnorm: bool | None = None,
    once: bool = True,
    python: str | None = None,
) -> list[str]:
    """argv of ``segviz federation join`` as the panel starts it.

    Args:
        superlink: the coordinator's ``HOST:PORT``.
        site_dir: the site folder.
        root_cert: the federation's ``ca.crt`` (TLS); or ``insecure`` for a test federation.
        trust: the federation's trusted-entities file (``federation-trust.yaml``), so this site
            runs only the SegViz app the coordinator signed.
        auth_key: this site's SuperNode authentication key (``node.key``).
        share_final_batchnorm: the site's consent to send its BatchNorm once, with the final
            reply (``--share-final-batchnorm``) or not (``--no-share-final-batchnorm``); None
            leaves the flag out (the CLI's default).
        once: leave by itself after one complete run (the panel's "Join round").
        python: the interpreter (default :func:`python_executable`).

    Raises:
        ValueError: a malformed address, neither a certificate nor ``insecure``, or both.
    """
    superlink = superlink.strip()
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"SuperLink address must be HOST:PORT, got {superlink!r}")
    argv = segviz_command(python) + ["federation", "join", "--superlink", superlink, "--site", str(site_dir)]
    if root_cert and insecure:
        raise ValueError("give either the federation's root certificate or 'insecure', not both")
    if root_cert:
        argv += ["--root-cert", str(root_cert)]
    elif insecure:
        argv += ["--insecure"]
    else:
        raise ValueError("give the federation's root certificate (ca.crt), or tick 'insecure' for a test federation")
    if trust:
        argv += ["--trust", str(trust)]
    if auth_key:
        argv += ["--auth-key", str(auth_key)]
    if share_final_batchnorm is not None:
        argv.append("--share-final-batchnorm" if share_final_batchnorm else "--no-share-final-batchnorm")
    if once:
        argv.append("--once")
    return argv + ["--progress", "json"]


class ProcessJob:
    """A child process whose output is read without blocking, stopped with its whole tree.

    Args:
        argv: the command.
        cwd: working folder of the child.
        env: environment (default: ``child_environment()``).

    Example::

        job = ProcessJob([sys.executable, "-c", "print('{\\"event\\": \\"done\\"}')"])
        job.start()
        while job.returncode is None:
            for stream, line in job.poll():
                ...
            time.sleep(0.1)
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> None:
        if not argv:
            raise ValueError("empty command")
        self.stdin = stdin
        self.argv = [str(a) for a in argv]
        self.cwd = None if cwd is None else str(cwd)
        self.env = child_environment() if env is None else env
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.stderr_tail: list[str] = []
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._kill_deadline: float | None = None
        self._tree: dict[int, Any] = {}  # pid -> psutil.Process: every descendant seen while running
        self._tree_seen_at = 0.0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.returncode is None

    @property
    def stopping(self) -> bool:
        """A stop was asked for and the child has not exited yet."""
        return self.running and self._kill_deadline is not None

    def start(self) -> None:
        """Start the child (its own session / process group, no console window) and its readers.

        Raises:
            SegVizError: the program cannot be started.
        """
        if self.running:
            raise RuntimeError("job already running")
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **child_process_options(),
            )
        except OSError as exc:
            raise SegVizError(f"cannot start {self.argv[0]}: {exc.strerror or exc}") from None
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            reader = threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"segviz-{name}")
            reader.start()
            self._readers.append(reader)

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (a job started with ``stdin=True``).

        Raises:
            SegVizError: the child is not running or no longer reads its input.
        """
        if not self.running or self.process is None or self.process.stdin is None:
            raise SegVizError("the process is not running")
        try:
            self.process.stdin.write(line.rstrip("\n") + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError) as exc:
            raise SegVizError(f"the process stopped reading its input: {exc}") from None

    def close_input(self) -> None:
        """Close the child's stdin (a worker reading requests then ends by itself)."""
        if self.process is not None and self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def _read(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((name, line.rstrip("\r\n")))
        except (ValueError, OSError):
            pass

    def _follow_tree(self, force: bool = False) -> None:
        """Remember every descendant of the running child (they outlive it when it is killed)."""
        import psutil

        if self.process is None or (not force and time.monotonic() - self._tree_seen_at < _TREE_REFRESH_S):
            return
        self._tree_seen_at = time.monotonic()
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._tree.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def descendants(self) -> list[int]:
        """Process ids of the child's descendants that still run (as far as they were seen)."""
        self._follow_tree(force=True)
        return [pid for pid, proc in self._tree.items() if _alive(proc)]

    def poll(self) -> list[tuple[str, str]]:
        """Return the ``(stream, line)`` pairs read since the last call; notice the child's exit.

        Never blocks for long: safe to call from a GUI timer.
        """
        if self.process is None:
            return []
        if self.returncode is None:
            code = self.process.poll()
            if code is None:
                self._follow_tree()
                if self._kill_deadline is not None and time.monotonic() > self._kill_deadline:
                    self._kill_tree()
                    self._kill_deadline = float("inf")  # done; stays set so stop() does not start over
            else:
                # The child is gone: whatever it left behind (an orphaned SuperNode) goes too.
                self._end_survivors()
                for reader in self._readers:
                    reader.join(timeout=2.0)
                self._close_pipes()
                self.returncode = code
        lines = []
        while True:
            try:
                item = self._lines.get_nowait()
            except queue.Empty:
                break
            if item[0] == "stderr":
                self.stderr_tail.append(item[1])
                del self.stderr_tail[:-_STDERR_TAIL]
            lines.append(item)
        return lines

    def _close_pipes(self) -> None:
        """Close the pipes of a child that ended (a worker killed mid-request leaves its stdin
        open otherwise); its output pipes only once the readers have drained them."""
        process = self.process
        drained = not any(reader.is_alive() for reader in self._readers)
        for stream in (process.stdin, *((process.stdout, process.stderr) if drained else ())):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass  # a broken pipe to a dead child: nothing left to flush

    def _ask_to_stop(self) -> bool:
        """Send the graceful stop signal to the child alone; False when it cannot be delivered."""
        try:
            self.process.send_signal(graceful_stop_signal())  # type: ignore[union-attr]
            return True
        except (OSError, ValueError):
            # Windows: CTRL_BREAK_EVENT needs a console shared with the child, which a GUI Slicer
            # may not have; then only the forceful fallback is left.
            return False

    def _kill_tree(self) -> None:
        """Kill the child and every descendant seen (TerminateProcess on Windows, SIGKILL on POSIX)."""
        import psutil

        self._follow_tree(force=True)
        for proc in [*self._tree.values()]:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass

    def _end_survivors(self, grace: float = 1.0) -> None:
        import psutil

        survivors = [proc for proc in self._tree.values() if _alive(proc)]
        if not survivors:
            return
        for proc in survivors:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(survivors, timeout=grace)
        for proc in still:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(still, timeout=grace)

    def stop(self, timeout: float = 10.0, wait: bool = False) -> None:
        """End the child and its tree: the graceful signal now, a kill after ``timeout`` seconds.

        Args:
            timeout: grace period before the kill (enforced by ``poll``, or here when ``wait``).
            wait: block until the child has exited (application exit, tests; not from a GUI timer).
        """
        if not self.running:
            return
        if self._kill_deadline is None:  # a repeated stop must not push the deadline back
            self._follow_tree(force=True)
            delivered = self._ask_to_stop()
            self._kill_deadline = time.monotonic() + (timeout if delivered else 0.0)
        if wait:
            remaining = max(0.0, self._kill_deadline - time.monotonic())
            try:
                self.process.wait(timeout=remaining)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self._kill_tree()
                self.process.wait(timeout=5.0)  # type: ignore[union-attr]
            self.poll()


def _alive(proc) -> bool:
    """A psutil process that still runs (not a zombie waiting for its parent)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _StatusJob:
    """A ProcessJob whose JSON-lines events move a status state machine."""

    status: FederationStatus | InferenceStatus
    #: grace period between SIGTERM and SIGKILL when the job ends its child itself (failure, finish).
    stop_timeout = 10.0

    def __init__(self, argv: Sequence[str], cwd: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        self.process = ProcessJob(argv, cwd=cwd, env=env)

    def _feed(self) -> None:
        for stream, line in self.process.poll():
            event = parse_progress_line(line) if stream == "stdout" else None
            if event is not None:
                self.status.apply_event(event)
            elif line.strip():
                self._log(line)
        if self.process.returncode is not None:
            self.status.process_exited(self.process.returncode, self.process.stderr_tail)

    def _log(self, line: str) -> None:
        raise NotImplementedError


class FederationJob(_StatusJob):
    """``segviz federation join`` for one site, with the federation state machine.

    Args:
        argv: from ``join_command``.
        superlink: the address, for messages.
        connect_timeout: fail with a clear message if no ``connected`` event arrives in this many
            seconds (a SuperNode alone retries an unreachable SuperLink forever); None to wait.
    """

    #: seconds a SuperNode may stay after ``run_finished`` before the job ends it (the CLI's
    #: ``--once`` leaves by itself ~15 s after its last reply).
    finish_grace = 120.0

    def __init__(
        self,
        argv: Sequence[str],
        superlink: str,
        connect_timeout: float | None = 120.0,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(argv, cwd=cwd, env=env)
        self.superlink = superlink
        self.connect_timeout = connect_timeout
        self.status = FederationStatus()
        self._started_at = 0.0
        self._run_finished_at: float | None = None

    def _log(self, line: str) -> None:
        self.status.add_log(line)

    def start(self) -> FederationStatus:
        self.status.start(self.superlink)
        try:
            self.process.start()
        except SegVizError as exc:
            self.status.fail(str(exc))
        self._started_at = time.monotonic()
        return self.status

    def poll(self) -> FederationStatus:
        """Read new output, move the state, enforce the connect timeout. Non-blocking."""
        self._feed()
        if (
            self.status.state == FederationState.JOINING
            and not self.status.connected
            and self.connect_timeout is not None
            and self.process.running
            and time.monotonic() - self._started_at > self.connect_timeout
        ):
            self.status.fail(
                f"could not reach the SuperLink at {self.superlink} within {self.connect_timeout:.0f} s: "
                "check the address, the port and the firewall"
            )
        if self.status.run_finished and self.status.active and self.process.running:
            # Killing the SuperNode at once would drop its last reply; give it time to leave itself.
            if self._run_finished_at is None:
                self._run_finished_at = time.monotonic()
            elif time.monotonic() - self._run_finished_at > self.finish_grace:
                self.status.finish()
        if self.status.state in (FederationState.FAILED, FederationState.FINISHED) and self.process.running:
            self.process.stop(timeout=self.stop_timeout)
        return self.status

    def leave(self, timeout: float = 10.0, wait: bool = False) -> None:
        """Stop the SuperNode and everything it started (SIGTERM, then SIGKILL after ``timeout``)."""
        self.status.request_leave()
        if self.process.running:
            self.process.stop(timeout=timeout, wait=wait)
            if wait:
                self.poll()
        elif self.status.active:
            self.status.process_exited(self.process.returncode or 0)


class InferenceJob(_StatusJob):
    """``segviz infer`` on one volume, with the inference state machine.

    ``poll`` leaves the status ``running`` after a clean exit until the caller has loaded the
    output (``output_ready``) and called ``status.finish``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        output: str | Path,
        stats: str | Path | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(argv, cwd=cwd, env=env)
        self.output = Path(output)
        self.stats = None if stats is None else Path(stats)
        self.status = InferenceStatus()

    def _log(self, line: str) -> None:
        self.status.log.append(line)

    def start(self) -> InferenceStatus:
        self.status.start()
        try:
            self.process.start()
        except SegVizError as exc:
            self.status.fail(str(exc))
        return self.status

    def poll(self) -> InferenceStatus:
        self._feed()
        if self.status.state == InferenceState.FAILED and self.process.running:
            self.process.stop(timeout=self.stop_timeout)
        if self.output_ready is False and self.process.returncode == 0 and self.status.active:
            self.status.fail(f"segviz infer exited without writing {self.output}")
        return self.status

    @property
    def output_ready(self) -> bool | None:
        """True once the child exited 0 and the label map exists; None while still running."""
        if self.process.returncode is None:
            return None
        return self.process.returncode == 0 and self.output.is_file()

    def cancel(self, timeout: float = 10.0, wait: bool = False) -> None:
        self.status.request_cancel()
        if self.process.running:
            self.process.stop(timeout=timeout, wait=wait)
            if wait:
                self.poll()
        elif self.status.active:
            self.status.process_exited(self.process.returncode or 0)
