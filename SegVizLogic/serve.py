"""``segviz serve``: a warm inference worker that keeps torch, MONAI and model bundles loaded.

Protocol: JSON lines. Each line on stdin is one request, an object with the options of
``segviz infer`` (``model``, ``input``, ``output``, and optionally ``device``, ``batchnorm``,
``stats``, ``series``, ``trust``, ``no_cleanup``, ``allow_nonstandard_intensities``, ``exact``,
``force``) and an ``id``; ``{"command": "shutdown"}`` or the end of stdin stops the worker. Each
line on stdout is an event of ``segviz infer --progress json`` carrying the request's ``id``,
ending with ``done`` or ``error``. The worker says ``ready`` once its imports are done.

Why stdin/stdout and not a socket: the Slicer module already reads JSON-line events from its
children's stdout; a pipe needs no port, no address that another local user could reach, and no
authentication; and it ties the worker's life to its parent's (the end of stdin, when Slicer exits
or dies, stops it), so a worker never outlives the session that started it.

Every request goes through :func:`SegVizLogic.cli.infer_from_args`, the code of ``segviz infer``,
after its options are parsed by ``infer``'s own argument parser: a request gets exactly the
refusals ``infer`` gives, and nothing is written for a refused one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .errors import SegVizError
from .progress import ProgressReporter

__all__ = ["BundleCache", "RequestReporter", "request_argv", "serve"]

# Request keys that are flags of `segviz infer` (true: present), and those that take a value.
_FLAGS = {"no_cleanup", "allow_nonstandard_intensities", "exact", "force"}
_VALUES = {"model", "input", "output", "device", "batchnorm", "threshold", "stats", "series", "trust"}


class RequestReporter(ProgressReporter):
    """JSON-line events on ``stream``, each carrying the request's ``id``."""

    def __init__(self, request_id: Any, stream: TextIO) -> None:
        super().__init__("json", stream)
        self.request_id = request_id

    def emit(self, event: str, **fields: Any) -> None:
        super().emit(event, id=self.request_id, **fields)


class BundleCache:
    """Model bundles loaded once and kept while their file is unchanged (size and modification
    time); a changed file is read and verified again."""

    def __init__(self) -> None:
        self._bundles: dict[Path, tuple[tuple[int, int], Any]] = {}
        self.loads = 0

    def __call__(self, path: str | Path):
        from .bundle import load_bundle

        path = Path(path).resolve()
        try:
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            return load_bundle(path)  # its own error names the file
        cached = self._bundles.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        bundle = load_bundle(path)
        self.loads += 1
        self._bundles[path] = (stamp, bundle)
        return bundle


def request_argv(request: dict) -> list[str]:
    """``segviz infer``'s argv for a request object.

    Raises:
        SegVizError: an option ``infer`` does not have, or a flag that is not true/false.
    """
    argv = ["infer"]
    for key, value in request.items():
        if key in ("id", "command"):
            continue
        name = key.replace("-", "_")
        if name in _FLAGS:
            if not isinstance(value, bool):
                raise SegVizError(f"request option {key!r} must be true or false, got {value!r}")
            if value:
                argv.append("--" + name.replace("_", "-"))
        elif name in _VALUES:
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        else:
            known = ", ".join(sorted(_FLAGS | _VALUES))
            raise SegVizError(f"request option {key!r} is not an option of segviz infer ({known})")
    return argv


def _parse(argv: list[str]):
    """Parse with ``segviz``'s own parser; an argparse refusal becomes a SegVizError (no exit)."""
    from .cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv)
    except SystemExit:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        raise SegVizError(lines[-1] if lines else "invalid request") from None


def _handle(line: str, stream: TextIO, bundles: BundleCache) -> bool:
    """Serve one request line; False when the worker should stop."""
    from .cli import infer_from_args

    try:
        request = json.loads(line)
    except ValueError:
        ProgressReporter("json", stream).emit("error", id=None, message=f"not a JSON object: {line[:80]!r}")
        return True
    if not isinstance(request, dict):
        ProgressReporter("json", stream).emit("error", id=None, message="a request must be a JSON object")
        return True
    reporter = RequestReporter(request.get("id"), stream)
    if request.get("command") == "shutdown":
        reporter.emit("stopped")
        return False
    started = time.perf_counter()
    loads = bundles.loads
    try:
        args = _parse(request_argv(request))
        args.progress = "json"
        infer_from_args(args, reporter, load_bundle=bundles)
        reporter.emit(
            "served",
            seconds=round(time.perf_counter() - started, 3),
            bundle_loaded=bundles.loads > loads,
            pid=os.getpid(),
        )
    except SegVizError as error:
        reporter.emit("error", message=str(error))
    except Exception as error:  # noqa: BLE001 - one failed request must not end the worker
        reporter.emit("error", message=f"{type(error).__name__}: {error}")
    return True


def serve(stdin: TextIO, stdout: TextIO) -> int:
    """Answer requests from ``stdin`` until ``shutdown`` or the end of input; returns 0."""
    t0 = time.perf_counter()
    # Pay the imports once, before the first request.
    from . import inference  # noqa: F401
    from .cli import infer_from_args  # noqa: F401

    bundles = BundleCache()
    ProgressReporter("json", stdout).emit("ready", pid=os.getpid(), startup_s=round(time.perf_counter() - t0, 3))
    for line in stdin:
        if line.strip() and not _handle(line.strip(), stdout, bundles):
            break
    return 0


if __name__ == "__main__":  # pragma: no cover - `segviz serve` is the entry point
    sys.exit(serve(sys.stdin, sys.stdout))
