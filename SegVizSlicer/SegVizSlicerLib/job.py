"""Run ``segviz`` commands as child processes and follow their JSON-lines progress, non-blocking.

Slicer never trains or infers in its own process: the widget starts a job, then calls
``job.poll()`` from a ``qt.QTimer``; tests call ``poll()`` in a loop. Each child runs in its own
process group (session), so Cancel/Leave ends the child *and* everything it started
(a Flower SuperNode spawns its own ClientApp processes).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from SegVizLogic.errors import SegVizError
from SegVizLogic.progress import parse_progress_line

from .panel_state import FederationState, FederationStatus, InferenceState, InferenceStatus

__all__ = [
    "FederationJob",
    "InferenceJob",
    "ProcessJob",
    "infer_command",
    "join_command",
    "model_info",
    "python_executable",
    "segviz_command",
]

# The SegVizLogic package bundled with the module sits next to SegVizSlicer.py; the child gets it on
# PYTHONPATH so the CLI it runs is the same code as the panel (also when `segviz` is not pip-installed).
_LAUNCHER = "import sys; from SegVizLogic.cli import main; sys.exit(main())"
_STDERR_TAIL = 40


def python_executable() -> str:
    """The Python to run the CLI with: Slicer's ``PythonSlicer`` launcher inside Slicer, else ours."""
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
    python: str | None = None,
) -> list[str]:
    """argv of ``segviz infer ... --progress json --force``."""
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
    if stats is not None:
        argv += ["--stats", str(stats)]
    return argv


def join_command(
    superlink: str,
    site_dir: str | Path,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    once: bool = True,
    python: str | None = None,
) -> list[str]:
    """argv of ``segviz federation join ... [--once] --progress json``.

    ``once`` (the panel's "Join round"): the SuperNode leaves by itself after one complete run,
    once its last reply has been collected.

    Raises:
        ValueError: neither a root certificate nor ``insecure``, or a malformed address.
    """
    superlink = superlink.strip()
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"SuperLink address must be HOST:PORT, got {superlink!r}")
    argv = segviz_command(python) + ["federation", "join", "--superlink", superlink, "--site", str(site_dir)]
    if root_cert:
        argv += ["--root-cert", str(root_cert)]
    elif insecure:
        argv += ["--insecure"]
    else:
        raise ValueError("give the federation's root certificate, or tick 'insecure' for a test federation")
    if once:
        argv.append("--once")
    return argv + ["--progress", "json"]


def model_info(model: str | Path, timeout: float = 60.0, python: str | None = None) -> dict[str, Any]:
    """Bundle metadata from ``segviz model-info MODEL --json`` (organs, rounds, sites, created...).

    Raises:
        SegVizError: the file is missing, the CLI refuses it, or prints no JSON.
    """
    model = Path(model)
    if not model.is_file():
        raise SegVizError(f"{model}: no such model bundle")
    try:
        done = subprocess.run(
            segviz_command(python) + ["model-info", str(model), "--json"],
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
            env=child_environment(),
        )
    except subprocess.TimeoutExpired:
        raise SegVizError(f"{model}: reading the bundle took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise SegVizError(_exit_reason(done.stderr) or f"segviz model-info exited with code {done.returncode}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SegVizError(f"{model}: segviz model-info printed no JSON") from None


def _exit_reason(stderr: str) -> str:
    from .panel_state import _ERROR_LINE

    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return match.group("message").strip()
    return lines[-1] if lines else ""


class ProcessJob:
    """A child process in its own process group whose output is read without blocking.

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

    def __init__(self, argv: Sequence[str], cwd: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        if not argv:
            raise ValueError("empty command")
        self.argv = [str(a) for a in argv]
        self.cwd = None if cwd is None else str(cwd)
        self.env = child_environment() if env is None else env
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.stderr_tail: list[str] = []
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._kill_deadline: float | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.returncode is None

    def start(self) -> None:
        """Start the child (its own session/process group) and its two reader threads.

        Raises:
            SegVizError: the program cannot be started.
        """
        if self.running:
            raise RuntimeError("job already running")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **kwargs,
            )
        except OSError as exc:
            raise SegVizError(f"cannot start {self.argv[0]}: {exc.strerror or exc}") from None
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            reader = threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"segviz-{name}")
            reader.start()
            self._readers.append(reader)

    def _read(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((name, line.rstrip("\r\n")))
        except (ValueError, OSError):
            pass

    def poll(self) -> list[tuple[str, str]]:
        """Return the ``(stream, line)`` pairs read since the last call; notice the child's exit.

        Never blocks for long: safe to call from a GUI timer.
        """
        if self.process is None:
            return []
        if self.returncode is None:
            code = self.process.poll()
            if code is None and self._kill_deadline is not None and time.monotonic() > self._kill_deadline:
                self._signal_group(signal.SIGKILL if os.name != "nt" else None)
                self._kill_deadline = float("inf")  # sent; stays set so stop() does not start over
            if code is not None:
                # The child is gone: end whatever it left behind in its group, then drain its pipes.
                self._signal_group(signal.SIGKILL if os.name != "nt" else None)
                for reader in self._readers:
                    reader.join(timeout=2.0)
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

    def _signal_group(self, sig) -> None:
        if self.process is None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False)
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0, wait: bool = False) -> None:
        """End the whole process group: SIGTERM now, SIGKILL after ``timeout`` seconds.

        Args:
            timeout: grace period before SIGKILL (enforced by ``poll``, or here when ``wait``).
            wait: block until the child has exited (for cleanup and tests; not from the GUI).
        """
        if not self.running:
            return
        if self._kill_deadline is None:  # a repeated stop must not push the SIGKILL deadline back
            self._signal_group(signal.SIGTERM if os.name != "nt" else None)
            self._kill_deadline = time.monotonic() + timeout
        if wait:
            try:
                self.process.wait(timeout=timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL if os.name != "nt" else None)
                self.process.wait(timeout=5.0)  # type: ignore[union-attr]
            self.poll()


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
