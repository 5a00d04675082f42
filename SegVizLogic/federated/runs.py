"""Starting and following a federated run from the coordinator: the SegViz Flower app that
``flwr run`` submits, SuperNode registration, and relaying a run's progress.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SegVizError, SegVizInputError
from ..progress import ProgressReporter, parse_progress_line, read_new_lines, relay_event
from .processes import (
    flower_environment,
    flower_executable,
)
from .task import APP_CONFIG_DEFAULTS

__all__ = ["follow_run", "register_node", "stage_app", "start_run"]


def _app_pyproject() -> dict:
    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "segviz",
            "version": __version__,
            "license": "Apache-2.0",
            "description": "SegViz federated multi-organ CT segmentation (FedBN)",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "segviz",
                    "components": {
                        "serverapp": "SegVizLogic.federated.server_app:app",
                        "clientapp": "SegVizLogic.federated.client_app:app",
                    },
                    "config": dict(APP_CONFIG_DEFAULTS),
                }
            }
        },
    }


def stage_app(folder: str | Path) -> Path:
    """Write the Flower app that ``flwr run`` packs into a FAB: only a ``pyproject.toml`` with
    the ``[tool.flwr.app]`` section (components and run config), no code.

    Flower puts a FAB's folder first on ``sys.path``; a FAB without Python files makes every
    SuperNode load ``SegVizLogic.federated.client_app`` from the SegViz its site installed,
    so no code sent by the coordinator runs at a hospital. (The repository's own
    ``pyproject.toml`` is not used either: ``flwr run`` 1.42 rewrites one that still has a
    legacy ``[tool.flwr.federations]`` section.)
    """
    import tomli_w

    app = Path(folder) / "segviz"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps(_app_pyproject()), encoding="utf-8")
    return app


def _write_flower_config(home: Path, superlink: str, root_cert: str | Path | None, insecure: bool) -> None:
    import tomli_w

    connection: dict[str, Any] = {"address": superlink}
    if insecure:
        connection["insecure"] = True
    else:
        if root_cert is None:
            raise SegVizInputError(None, "TLS is the default: pass --root-cert ca.crt or ask for --insecure")
        connection["root-certificates"] = str(Path(root_cert).resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "segviz", "segviz": connection}}), encoding="utf-8"
    )


def _flwr(args: Sequence[str], home: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [flower_executable("flwr"), *args],
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
            env=flower_environment(home),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise SegVizError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from error


def _json_from_output(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def register_node(superlink: str, public_key: str | Path, root_cert: str | Path | None, name: str | None = None) -> int:
    """Register a site's public key at a SuperLink that requires SuperNode authentication.

    Returns:
        The SuperNode id the SuperLink assigned.
    """
    with tempfile.TemporaryDirectory(prefix="segviz-flwr-") as tmp:
        home = Path(tmp) / "home"
        _write_flower_config(home, superlink, root_cert, insecure=False)
        args = ["supernode", "register", str(Path(public_key).resolve()), "segviz", "--format", "json"]
        if name:
            args += ["--name", name]
        done = _flwr(args, home)
        payload = _json_from_output(done.stdout)
        if done.returncode != 0 or not payload.get("success", False):
            raise SegVizError(
                f"registering {public_key} failed: {payload.get('error-message') or done.stderr.strip() or done.stdout.strip()}"
            )
        return int(payload.get("node-id", 0))


def start_run(
    superlink: str,
    out_dir: str | Path,
    run_config: Mapping[str, Any],
    root_cert: str | Path | None = None,
    insecure: bool = False,
    work_dir: str | Path | None = None,
) -> int:
    """Submit a SegViz run to a SuperLink with ``flwr run`` and return its run id.

    Args:
        superlink: ``HOST:PORT`` of the SuperLink.
        out_dir: where the ServerApp writes bundles and ``progress.jsonl`` (a folder on the
            coordinator's machine: the ServerApp runs there).
        run_config: overrides of ``[tool.flwr.app.config]`` (``num-server-rounds``...).
        root_cert: the federation's ``ca.crt``; or ``insecure``.
        work_dir: where the staged app and Flower's config go (temporary by default).
    """
    import tomli_w

    unknown = sorted(set(run_config) - set(APP_CONFIG_DEFAULTS))
    if unknown:
        raise SegVizInputError(None, f"unknown run settings {unknown}; known: {', '.join(APP_CONFIG_DEFAULTS)}")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="segviz-run-"))
    home = work / "flwr-home"
    _write_flower_config(home, superlink, root_cert, insecure)
    app = stage_app(work)
    overrides = {**run_config, "out-dir": str(Path(out_dir).resolve())}
    config_file = work / "run-config.toml"
    config_file.write_text(tomli_w.dumps(overrides), encoding="utf-8")
    done = _flwr(["run", str(app), "segviz", "--format", "json", "--run-config", str(config_file)], home)
    payload = _json_from_output(done.stdout)
    if done.returncode != 0 or not payload.get("success"):
        message = payload.get("error-message") or done.stderr.strip() or done.stdout.strip()
        raise SegVizError(f"the SuperLink at {superlink} did not accept the run: {message}")
    return int(payload["run-id"])


def _run_status(run_id: int, home: Path) -> str:
    done = _flwr(["list", "--run-id", str(run_id), "--format", "json"], home, timeout=60)
    payload = _json_from_output(done.stdout)
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", ""))
    return ""


def follow_run(
    out_dir: str | Path,
    reporter: ProgressReporter,
    run_id: int | None = None,
    flwr_home: str | Path | None = None,
    timeout: float | None = None,
    offset: int = 0,
) -> Path:
    """Relay a run's ``<out_dir>/progress.jsonl`` until ``run_finished`` and return the model.

    With ``run_id`` and ``flwr_home``, the run's status is also checked every 15 s, so a
    ServerApp that died without writing ``error`` is reported too.

    Raises:
        SegVizError: the run reported an error, failed, or ``timeout`` passed.
    """
    progress = Path(out_dir) / "progress.jsonl"
    started = time.monotonic()
    last_status = started
    while True:
        lines, offset = read_new_lines(progress, offset)
        for line in lines:
            event = parse_progress_line(line)
            if event is None:
                continue
            if event["event"] == "error":
                raise SegVizError(f"the federated run failed: {event.get('message', '')}")
            relay_event(event, reporter)
            if event["event"] == "run_finished":
                return Path(event.get("outputs", {}).get("model", Path(out_dir) / "model.segviz"))
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            raise SegVizError(f"the federated run did not finish within {timeout:.0f} s")
        if run_id is not None and flwr_home is not None and now - last_status > 15:
            last_status = now
            status = _run_status(run_id, Path(flwr_home))
            if status.startswith("finished") and "completed" not in status:
                lines, offset = read_new_lines(progress, offset)
                raise SegVizError(
                    f"run {run_id} ended as {status!r} without finishing; see `flwr log {run_id}` on the coordinator"
                )
        time.sleep(0.5)
