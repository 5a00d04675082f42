"""Progress reporting: rich bars for people, one JSON object per line for the Slicer module.

Every long-running command takes ``--progress rich|json|none``. In ``json`` mode each line on
stdout is one event object with at least ``"event"``; the Slicer module and the tests parse
exactly these lines. Events used across SegViz:

=================  ==========================================================
event              fields
=================  ==========================================================
``stage``          ``stage`` (name), ``message``
``progress``       ``stage``, ``current``, ``total``, optional ``elapsed_s``,
                   ``remaining_s`` (estimate) and ``loss``; a task reports at most
                   4 per second and at least one every 2 seconds
``epoch``          ``epoch``, ``epochs``, ``loss``, optional ``dice`` {organ: x}
``connected``      ``superlink``, optional ``reconnected`` (true after an outage)
``reconnecting``   ``message`` (a site lost its SuperLink and retries)
``waiting``        ``message``
``round_started``  ``round``, ``rounds``
``update_sent``    ``round``, ``num_examples``
``round_finished`` ``round``, ``rounds``, ``metrics`` {name: number}
``site_dropped``   ``round``, ``site``, ``reason`` (no reply: left, or offline)
``reply_rejected`` ``round``, ``site``, ``reason`` (the coordinator refused it)
``run_finished``   ``rounds``, ``outputs`` {name: path}
``refused``        ``run``, ``reason``, ``message`` (a site refused a run's unsigned or foreign app)
``done``           ``outputs`` {name: path}, optional ``metrics``
``error``          ``message``
=================  ==========================================================
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

__all__ = ["PROGRESS_MODES", "ProgressReporter", "parse_progress_line", "read_new_lines", "relay_event"]

PROGRESS_MODES = ("rich", "json", "none")


def _jsonable(value: Any) -> Any:
    """Make numpy/torch scalars and paths serialisable."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """Parse one line of ``--progress json`` output.

    Returns the event dict, or ``None`` for a line that is not a progress event (a library's
    stray print, a blank line).
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class ProgressReporter:
    """Report events and progress of a long job.

    Args:
        mode: ``"rich"`` (bars and messages on stderr), ``"json"`` (JSON lines on ``stream``)
            or ``"none"``.
        stream: where JSON lines go (stdout by default).

    Example::

        reporter = ProgressReporter("json")
        with reporter.task("train", total=10) as advance:
            for epoch in range(10):
                advance(loss=0.5)
        reporter.emit("done", outputs={"model": "model.segviz"})
    """

    def __init__(self, mode: str = "rich", stream: TextIO | None = None) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
        self.mode = mode
        self.stream = stream
        self._console = None
        if mode == "rich":
            from rich.console import Console

            self._console = Console(stderr=True)

    def emit(self, event: str, **fields: Any) -> None:
        """Report one event (a JSON line, or a short message for people)."""
        if self.mode == "json":
            stream = self.stream or sys.stdout
            stream.write(json.dumps({"event": event, "time": round(time.time(), 3), **_jsonable(fields)}) + "\n")
            stream.flush()
        elif self.mode == "rich" and event != "progress":
            self._console.print(self._describe(event, fields))

    def message(self, text: str) -> None:
        """Report a free-text stage message."""
        self.emit("stage", stage="message", message=text)

    @staticmethod
    def _describe(event: str, fields: dict[str, Any]) -> str:
        if event == "error":
            return f"[bold red]error:[/] {fields.get('message', '')}"
        if event == "stage":
            return f"[cyan]{fields.get('message', fields.get('stage', ''))}[/]"
        if event == "round_started":
            return f"[bold]round {fields.get('round')} of {fields.get('rounds')}[/]"
        if event == "epoch":
            dice = fields.get("dice") or {}
            dice_text = " ".join(f"{k} {v:.3f}" for k, v in dice.items())
            return f"  epoch {fields.get('epoch')}/{fields.get('epochs')} loss {fields.get('loss', float('nan')):.4f} {dice_text}"
        parts = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{event} {parts}".rstrip()

    @contextmanager
    def task(self, stage: str, total: int | None) -> Iterator[Any]:
        """Context manager yielding ``advance(n=1, **fields)`` for a counted piece of work."""
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            with Progress(*columns, console=self._console, transient=False) as bar:
                task_id = bar.add_task(stage, total=total, info="")

                def advance(n: int = 1, **fields: Any) -> None:
                    info = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
                    bar.update(task_id, advance=n, info=info)

                yield advance
            return

        if self.mode == "none" and type(self).emit is ProgressReporter.emit:
            yield lambda n=1, **fields: None  # nobody listens: no events, no timer thread
            return
        steady = _SteadyProgress(self, stage, total)
        try:
            yield steady.advance
        finally:
            steady.stop()


class _SteadyProgress:
    """``progress`` events of one task at a steady rate: at most one per :attr:`MIN_INTERVAL`
    however short the steps (the last step always reported, at the latest when the task ends), and a heartbeat every
    :attr:`HEARTBEAT` seconds however long one step takes (a full-size case's preprocessing, a
    GPU epoch), each with the elapsed and the estimated remaining seconds."""

    MIN_INTERVAL = 0.25
    HEARTBEAT = 2.0

    def __init__(self, reporter: ProgressReporter, stage: str, total: int | None) -> None:
        self.reporter, self.stage, self.total = reporter, stage, total
        self.current = 0
        self.reported = 0
        self.fields: dict[str, Any] = {}
        self.started = time.monotonic()
        self.last = float("-inf")
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"segviz-progress-{stage}", daemon=True)
        self.thread.start()

    def advance(self, n: int = 1, **fields: Any) -> None:
        with self.lock:
            self.current += n
            self.fields = fields
            now = time.monotonic()
            done = self.total is not None and self.current >= self.total
            if done or now - self.last >= self.MIN_INTERVAL:
                self._send(now)

    def _beat(self) -> None:
        while not self.stopped.wait(self.HEARTBEAT / 4):
            with self.lock:
                now = time.monotonic()
                if now - self.last >= self.HEARTBEAT:
                    self._send(now)

    def _send(self, now: float) -> None:
        elapsed = now - self.started
        remaining = None
        if self.total and self.current:
            remaining = round(elapsed / self.current * max(self.total - self.current, 0), 1)
        self.last, self.reported = now, self.current
        self.reporter.emit(
            "progress",
            stage=self.stage,
            current=self.current,
            total=self.total,
            elapsed_s=round(elapsed, 1),
            remaining_s=remaining,
            **self.fields,
        )

    def stop(self) -> None:
        """End the heartbeat; a step not reported yet is reported now, so the last event is the final state."""
        self.stopped.set()
        self.thread.join()
        with self.lock:
            if self.current != self.reported:
                self._send(time.monotonic())


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """New complete lines of a JSON-lines file after byte ``offset``, and the offset after them
    (a line still being written is left for the next call)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    return data[: end + 1].decode("utf-8", errors="replace").splitlines(), offset + end + 1


def relay_event(event: dict, reporter: ProgressReporter) -> None:
    """Emit a parsed event (from another process's progress file) on ``reporter``."""
    fields = {k: v for k, v in event.items() if k not in ("event", "time")}
    reporter.emit(event["event"], **fields)
