"""Starting and following a federated run from the coordinator: the SegViz Flower app that
``flwr run`` submits, SuperNode registration, and relaying a run's progress.

Following is where a run's faults become visible: :func:`follow_run` watches the run's status
at the SuperLink, says in one line when the SuperLink stays away, and continues a run whose
ServerApp died (a SuperLink restart ends it) from the last round bundle it wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SegVizError, SegVizInputError
from ..progress import ProgressReporter, parse_progress_line, read_new_lines, relay_event
from .processes import (
    flower_environment,
    flower_executable,
    parse_host_port,
    wait_for_port,
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
    (app / "pyproject.toml").write_text(tomli_w.dumps(_app_pyproject()))
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
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "segviz", "segviz": connection}}))


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
    config_file.write_text(tomli_w.dumps(overrides))
    done = _flwr(["run", str(app), "segviz", "--format", "json", "--run-config", str(config_file)], home)
    payload = _json_from_output(done.stdout)
    if done.returncode != 0 or not payload.get("success"):
        message = payload.get("error-message") or done.stderr.strip() or done.stdout.strip()
        raise SegVizError(f"the SuperLink at {superlink} did not accept the run: {message}")
    return int(payload["run-id"])


def _run_status(run_id: int, home: Path) -> str | None:
    """The run's status at the SuperLink (``running``, ``finished:failed``...), ``""`` for a run
    it does not know, ``None`` when the SuperLink does not answer."""
    try:
        done = _flwr(["list", "--run-id", str(run_id), "--format", "json"], home, timeout=20)
    except SegVizError:
        return None
    payload = _json_from_output(done.stdout)
    if done.returncode != 0 or "runs" not in payload:
        return None
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", ""))
    return ""


def _answers(address: str) -> bool:
    """Whether the SuperLink's port accepts a TCP connection within a few seconds."""
    host, port = parse_host_port(address)
    return wait_for_port(host, port, timeout=5.0) is None


def _intact_bundle(paths: Sequence[Path]) -> Path | None:
    """The newest of ``paths`` that exists and loads (a round bundle is written after its
    ``round_finished`` event, so the newest may be missing or cut short if the ServerApp died)."""
    from ..bundle import load_bundle
    from ..errors import BundleError

    for path in reversed(paths):
        try:
            load_bundle(path)
            return path
        except BundleError:
            continue
    return None


def follow_run(
    out_dir: str | Path,
    reporter: ProgressReporter,
    run_id: int | None = None,
    flwr_home: str | Path | None = None,
    timeout: float | None = None,
    offset: int = 0,
    resubmit: Callable[[Path | None], int] | None = None,
    superlink_grace: float = 45.0,
    max_resumes: int = 3,
    status_every: float = 10.0,
    superlink: str | None = None,
) -> Path:
    """Relay a run's ``<out_dir>/progress.jsonl`` until ``run_finished`` and return the model.

    With ``run_id`` and ``flwr_home`` the run's status at the SuperLink is checked every
    ``status_every`` seconds, so a run never hangs silently:

    - a SuperLink that has not answered for ``superlink_grace`` seconds ends the follow with
      one line (how to resume included);
    - a run that ended without ``run_finished`` and without an ``error`` event lost its
      ServerApp (a SuperLink restart ends the run's ServerApp and marks the run failed): with
      ``resubmit`` a new run continues from the newest intact round bundle this run wrote
      (``resubmit(path)`` submits it and returns its run id; ``path`` is ``None`` when no round
      had finished), at most ``max_resumes`` times.

    ``superlink`` (``HOST:PORT``) is probed over TCP to tell a SuperLink that is gone from a
    ``flwr list`` that was merely slow on a loaded machine (which decides nothing).

    Raises:
        SegVizError: the run reported an error, failed or was stopped, the SuperLink stayed
            away, or ``timeout`` passed.
    """
    progress = Path(out_dir) / "progress.jsonl"
    started = time.monotonic()
    last_status = started
    unreachable_since: float | None = None
    bundles: list[Path] = []
    resumes = 0
    while True:
        lines, offset = read_new_lines(progress, offset)
        for line in lines:
            event = parse_progress_line(line)
            if event is None:
                continue
            if event["event"] == "error":
                raise SegVizError(f"the federated run failed: {event.get('message', '')}")
            relay_event(event, reporter)
            if event["event"] == "round_finished" and event.get("bundle"):
                bundles.append(Path(event["bundle"]))
            if event["event"] == "run_finished":
                return Path(event.get("outputs", {}).get("model", Path(out_dir) / "model.segviz"))
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            raise SegVizError(f"the federated run did not finish within {timeout:.0f} s")
        if run_id is not None and flwr_home is not None and now - last_status > status_every:
            last_status = now
            answers = _answers(superlink) if superlink else None
            status = _run_status(run_id, Path(flwr_home)) if answers is not False else None
            if answers is not False and status is None and superlink:
                continue  # the port answers; `flwr list` was slow or failed: ask again later
            if status is None:
                unreachable_since = unreachable_since or now
                if now - unreachable_since > superlink_grace:
                    newest = _intact_bundle(bundles)
                    hint = f"; when it is back, continue with --resume-from {newest}" if newest else ""
                    raise SegVizError(
                        f"the SuperLink has not answered for {now - unreachable_since:.0f} s: run {run_id} cannot "
                        f"continue{hint}"
                    )
                if unreachable_since == now:
                    reporter.emit(
                        "waiting", message=f"the SuperLink does not answer; waiting up to {superlink_grace:.0f} s"
                    )
                continue
            unreachable_since = None
            if status.startswith("finished") and "completed" not in status:
                lines, offset = read_new_lines(progress, offset)
                errors = [e for e in map(parse_progress_line, lines) if e and e["event"] == "error"]
                if errors:
                    raise SegVizError(f"the federated run failed: {errors[0].get('message', '')}")
                if "stopped" in status or resubmit is None or resumes >= max_resumes:
                    raise SegVizError(
                        f"run {run_id} ended as {status!r} without finishing; see `flwr log {run_id}` on the coordinator"
                    )
                resumes += 1
                newest = _intact_bundle(bundles)
                previous, run_id = run_id, resubmit(newest)
                reporter.emit(
                    "stage",
                    stage="resume",
                    message=f"run {previous} lost its ServerApp ({status}); continuing as run {run_id} "
                    + (f"from {newest.name}" if newest else "from the start (no round had finished)"),
                )
        time.sleep(0.5)
