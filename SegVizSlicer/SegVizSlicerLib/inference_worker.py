"""A warm ``segviz serve`` worker for the session: the second Apply pays no imports and no model load.

:class:`WorkerRunner` plugs into :class:`~SegVizSlicerLib.inference_controller.InferenceController`
in place of one ``segviz infer`` child per apply. The worker starts on the first apply (not when
the module loads: a person who never applies a model never pays for it), serves every later one,
and is started again if it died. Cancelling an apply ends the worker (it is busy in the network
and reads no request until it is done); the next apply starts a new one. The module's cleanup and
Slicer's exit stop it (``stop``), and a worker whose parent died ends by itself at the end of its
stdin.

Requests and events are JSON lines (``SegVizLogic.serve``); each event carries its request's id,
so a late event of a cancelled request never moves the next one.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from SegVizLogic.errors import SegVizError
from SegVizLogic.progress import parse_progress_line

from .job import ProcessJob, segviz_command
from .panel_state import InferenceStatus

if TYPE_CHECKING:
    from .inference_controller import InferenceRequest

__all__ = ["WarmWorker", "WorkerJob", "WorkerRunner", "serve_command"]


def serve_command(python: str | None = None) -> list[str]:
    """argv of ``segviz serve``."""
    return [*segviz_command(python), "serve"]


class WarmWorker:
    """One ``segviz serve`` child, its events routed to the job of the request they name.

    Args:
        python: the interpreter (default: PythonSlicer inside Slicer).
        env: the child's environment (default: ``child_environment()``).
    """

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.python = python
        self.env = env
        self.process: ProcessJob | None = None
        self.starts = 0
        self.ready = False
        self._events: dict[Any, list[dict]] = {}
        self._ids = itertools.count(1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running and self.process is not None else None

    def ensure_started(self) -> None:
        """Start the worker unless one is running (the first apply, or after it died or was stopped)."""
        self.pump()
        if self.running:
            return
        self.process = ProcessJob(serve_command(self.python), env=self.env, stdin=True)
        self.process.start()
        self.starts += 1
        self.ready = False
        self._events.clear()

    def submit(self, request: dict[str, Any]) -> str:
        """Send one request; returns its id."""
        self.ensure_started()
        request_id = f"{self.starts}-{next(self._ids)}"
        assert self.process is not None
        self.process.send(json.dumps({**request, "id": request_id}))
        return request_id

    def pump(self) -> None:
        """Read what the worker wrote; file each event under its request id."""
        if self.process is None:
            return
        for stream, line in self.process.poll():
            event = parse_progress_line(line) if stream == "stdout" else None
            if event is None:
                continue
            if event.get("event") == "ready":
                self.ready = True
            elif "id" in event:
                self._events.setdefault(event["id"], []).append(event)

    def events(self, request_id: str) -> list[dict]:
        """Events of one request since the last call."""
        self.pump()
        return self._events.pop(request_id, [])

    @property
    def stderr_tail(self) -> list[str]:
        return [] if self.process is None else list(self.process.stderr_tail)

    def stop(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Ask the worker to stop (shutdown request, end of input), then end its tree after ``timeout``."""
        if self.process is None or not self.process.running:
            return
        try:
            self.process.send(json.dumps({"command": "shutdown"}))
        except SegVizError:
            pass
        self.process.close_input()
        deadline = time.monotonic() + (timeout if wait else 0.0)
        while wait and self.process.running and time.monotonic() < deadline:
            self.process.poll()
            time.sleep(0.05)
        if self.process.running:
            self.process.stop(timeout=0.0, wait=wait)


class WorkerJob:
    """One apply served by the warm worker, with the shape of ``InferenceJob`` for the controller:
    ``status``, ``poll()``, ``cancel()``, ``output``, ``stats``, ``output_ready``.

    Unlike ``InferenceJob`` it has no ``process``: the worker outlives the job.
    """

    def __init__(self, worker: WarmWorker, request: InferenceRequest) -> None:
        self.worker = worker
        self.output = Path(request.output)
        self.stats = Path(request.stats)
        self.status = InferenceStatus()
        self.served_s: float | None = None
        self.bundle_loaded: bool | None = None
        self._request = {
            "model": str(request.model),
            "input": str(request.input.path),
            "output": str(request.output),
            "stats": str(request.stats),
            "device": request.device,
            "series": request.input.series_uid,
            "force": True,
        }
        self._id: str | None = None
        self._done = False
        self._answered = False  # the worker sent an event for this request
        self._resubmitted = False

    def start(self) -> InferenceStatus:
        self.status.start()
        try:
            self._id = self.worker.submit(self._request)
            self.status.message = (
                "Segmenting (warm worker)" if self.worker.starts and self.worker.ready else "Starting…"
            )
        except SegVizError as exc:
            self.status.fail(f"the SegViz worker could not be started: {exc}")
        return self.status

    def poll(self) -> InferenceStatus:
        if self._id is None or not self.status.active:
            return self.status
        for event in self.worker.events(self._id):
            self._answered = True
            self.status.apply_event(event)
            if event.get("event") == "done":
                self._done = True
            elif event.get("event") == "served":
                self.served_s = float(event.get("seconds", 0.0))
                self.bundle_loaded = bool(event.get("bundle_loaded"))
        if self.status.active and not self._done and not self.worker.running:
            if not self._answered and not self._resubmitted and not self.status._cancelling:
                # The worker died before it took this request (killed between the check that it
                # runs and the request, or as it was sent): start a new one and send it once more.
                self._resubmitted = True
                try:
                    self._id = self.worker.submit(self._request)
                    self.status.message = "Restarting the SegViz worker"
                    return self.status
                except SegVizError as exc:
                    self.status.fail(f"the SegViz worker could not be restarted: {exc}")
                    return self.status
            if self.status._cancelling:
                self.status.process_exited(-1)
            else:
                tail = " ".join(self.worker.stderr_tail[-3:]) or "no message"
                code = self.worker.process.returncode if self.worker.process is not None else None
                self.status.fail(f"the SegViz worker stopped unexpectedly (exit status {code}: {tail})")
        if self._done and self.status.active and not self.output.is_file():
            self.status.fail(f"segviz serve reported done without writing {self.output}")
        return self.status

    @property
    def output_ready(self) -> bool | None:
        """True once the worker said done and the label map exists; None while running."""
        if not self._done:
            return None if self.status.active else False
        return self.output.is_file()

    def cancel(self, timeout: float = 10.0, wait: bool = False) -> None:
        """Stop this apply: the worker is busy with it, so the worker is ended (the next apply starts another)."""
        self.status.request_cancel()
        self.worker.stop(timeout=0.0, wait=wait)
        if wait or not self.worker.running:
            self.poll()


class WorkerRunner:
    """Runs every apply of the session in one warm ``segviz serve`` worker.

    Args:
        python: the interpreter for the worker (default: PythonSlicer inside Slicer).
        env: the worker's environment.
    """

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.worker = WarmWorker(python, env)

    def start(self, request: InferenceRequest) -> WorkerJob:
        job = WorkerJob(self.worker, request)
        job.start()
        return job

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker (module cleanup, Slicer exit)."""
        self.worker.stop(timeout=timeout, wait=True)
