"""Starting and following a federated run from the coordinator: submitting the signed SegViz
Flower app with ``flwr run``, SuperNode registration, and relaying a run's progress.

Following is where a run's faults become visible: :func:`follow_run` watches the run's status
at the SuperLink, says in one line when the SuperLink stays away, and continues a run whose
ServerApp died (a SuperLink restart ends it) from the last round bundle it wrote.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SegVizError, SegVizInputError
from ..progress import ProgressReporter, parse_progress_line, read_new_lines, relay_event
from ..signing import FEDERATION_KEY_FILE
from .app_registry import AppRegistry, app_spec, build_app_fab, sign_fab, stage_app
from .processes import (
    flower_environment,
    flower_executable,
    parse_host_port,
    wait_for_port,
)
from .task import APP_CONFIG_DEFAULTS

__all__ = ["find_signing_key", "follow_run", "register_node", "stage_app", "start_run"]


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
            encoding="utf-8",
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


def find_signing_key(signing_key: str | Path | None, root_cert: str | Path | None) -> Path | None:
    """The federation's signing key: ``signing_key`` if given, else ``federation.key`` next to
    ``root_cert`` (``segviz federation certs`` writes both into one folder), else ``None``."""
    if signing_key is not None:
        return Path(signing_key).expanduser().resolve()
    if root_cert is not None:
        candidate = Path(root_cert).expanduser().resolve().parent / FEDERATION_KEY_FILE
        if candidate.is_file():
            return candidate
    return None


def start_run(
    superlink: str,
    out_dir: str | Path,
    run_config: Mapping[str, Any],
    root_cert: str | Path | None = None,
    insecure: bool = False,
    work_dir: str | Path | None = None,
    signing_key: str | Path | None = None,
    registry_port: int | None = None,
    sign_bundles: bool = True,
) -> int:
    """Submit a SegViz run to the SuperLink's Control API and return its run id.

    With a signing key (the default with TLS: ``--signing-key``, or ``federation.key`` next to
    ``ca.crt``) the SegViz FAB is built, signed and submitted by app spec
    (``flwr run @segviz/segviz==<version>``): the SuperLink fetches it, with its signature, from
    an :class:`~SegVizLogic.federated.app_registry.AppRegistry` served on 127.0.0.1 for the
    seconds of the submission, and every site's SuperNode verifies the signature before it runs
    anything. The key's path (never the key) also goes to the ServerApp in the run config, so it
    signs every bundle it writes. Without a key (only with ``insecure``) the app is submitted
    unsigned from a folder, and sites that verify apps refuse it.

    Args:
        superlink: ``HOST:PORT`` of the SuperLink's (loopback) Control API.
        out_dir: where the ServerApp writes bundles and ``progress.jsonl`` (a folder on the
            coordinator's machine: the ServerApp runs there).
        run_config: overrides of ``[tool.flwr.app.config]`` (``num-server-rounds``...).
        root_cert: the federation's ``ca.crt``; or ``insecure``.
        work_dir: where the staged app and Flower's config go (temporary by default).
        signing_key: ``federation.key``; default: :func:`find_signing_key`.
        registry_port: the app registry's port the SuperLink was started with (default: the
            Control API's port + 1, as ``segviz federation superlink`` does).
        sign_bundles: also sign every bundle the run writes with the key (the loopback engine's
            throw-away key signs the app only).

    Raises:
        SegVizInputError: unknown settings, no signing key with TLS, an unusable key.
        SegVizError: the SuperLink refused the run or did not fetch the signed app.
    """
    import tomli_w

    from ..signing import load_signing_key
    from .superlink import default_registry_port

    unknown = sorted(set(run_config) - set(APP_CONFIG_DEFAULTS))
    if unknown:
        raise SegVizInputError(None, f"unknown run settings {unknown}; known: {', '.join(APP_CONFIG_DEFAULTS)}")
    key_path = find_signing_key(signing_key, root_cert)
    if key_path is None and not insecure:
        raise SegVizInputError(
            None,
            "sites run only apps signed by the federation: pass --signing-key federation.key "
            "(from `segviz federation certs`, kept on the coordinator)",
        )
    key = load_signing_key(key_path) if key_path is not None else None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="segviz-run-"))
    home = work / "flwr-home"
    _write_flower_config(home, superlink, root_cert, insecure)
    overrides = {**run_config, "out-dir": str(Path(out_dir).resolve())}
    if key_path is not None and sign_bundles:
        overrides["signing-key"] = str(key_path)
    config_file = work / "run-config.toml"
    config_file.write_text(tomli_w.dumps(overrides), encoding="utf-8")
    options = ["segviz", "--format", "json", "--run-config", str(config_file)]
    if key is None:
        done = _flwr(["run", str(stage_app(work)), *options], home)
        fetched = True
    else:
        fab = build_app_fab(work)
        port = registry_port or default_registry_port(parse_host_port(superlink)[1])
        with AppRegistry(fab, sign_fab(fab, key), port) as registry:
            done = _flwr(["run", app_spec(), *options], home)
        fetched = any(request.startswith("GET") for request in registry.requests)
    payload = _json_from_output(done.stdout)
    if done.returncode != 0 or not payload.get("success"):
        message = payload.get("error-message") or done.stderr.strip() or done.stdout.strip()
        if "403 Forbidden" in message:
            message += (
                " (that address serves only the Fleet API for the sites: pass the Control API's address, "
                "127.0.0.1:<port + 1> on the coordinator unless the SuperLink was given --control-address)"
            )
        elif not fetched:
            message += (
                f" (the SuperLink did not fetch the signed app from 127.0.0.1:{port}: start it with "
                "`segviz federation superlink`, which points it there, and pass the same --app-registry-port)"
            )
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
