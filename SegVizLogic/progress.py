"""Progress reporting: rich bars for people, one JSON object per line for the Slicer module.

Every long-running command takes ``--progress rich|json|none``. In ``json`` mode each line on
stdout is one event object with at least ``"event"``; the Slicer module and the tests parse
exactly these lines. Events used across SegViz:

=================  ==========================================================
event              fields
=================  ==========================================================
``stage``          ``stage`` (name), ``message``
``progress``       ``stage``, ``current``, ``total`` (and optional ``loss``)
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
``done``           ``outputs`` {name: path}, optional ``metrics``
``error``          ``message``
=================  ==========================================================
"""

from __future__ import annotations

import json
import sys
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

        state = {"current": 0}

        def advance(n: int = 1, **fields: Any) -> None:
            state["current"] += n
            self.emit("progress", stage=stage, current=state["current"], total=total, **fields)

        yield advance


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
