"""One site in a real federation: its Flower SuperNode, the warm site worker that trains for it,
and ``segviz federation join``, which starts both and relays the site's progress.

A SuperNode that cannot reach its SuperLink retries forever without a word (Flower issue
6250). :func:`join_federation` therefore probes the address first and then watches the
SuperNode's log for its node id, and gives up with a clear message after ``connect_timeout``
seconds, stopping the SuperNode's whole process group.

Lifetime: nothing outlives ``join``. The SuperNode runs on a lifeline to the join (see
:mod:`~SegVizLogic.federated.processes`): when the join ends, however it ends, the SuperNode
signs off at the SuperLink and exits, and Flower's SuperExec and ClientApp follow it. The
warm worker is a thread of the join. One join per site folder: an OS lock on
``<site>/.segviz/federated/join.lock`` refuses a second one, and the OS releases it when the
join dies, so a crashed join never blocks the next.

Once connected, a lost SuperLink is not fatal: the SuperNode retries with backoff (Flower's
retry policy) and the join reports ``reconnecting`` until it is back. A SuperNode that the
SuperLink no longer knows (restarted without its database) exits; the join starts a new one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SegVizError, SegVizInputError
from ..progress import ProgressReporter, parse_progress_line, read_new_lines, relay_event
from .clientapp_launcher import ClientAppLauncher, launcher_supported
from .processes import (
    ExclusiveLock,
    FlowerProcess,
    LockHeld,
    flower_environment,
    flower_executable,
    format_address,
    free_port,
    parse_host_port,
    wait_for_port,
)
from .site_failures import failure_category
from .task import local_state_dir

__all__ = [
    "JOIN_LOCK_FILE",
    "LeftMidRound",
    "SiteWorker",
    "app_refusals",
    "find_trust_file",
    "join_federation",
    "start_supernode",
]


_CONNECTED_MARK = "SuperNode ID:"
_RECEIVED_MARK = "Received successfully"
_SENT_MARK = "Sent successfully"
_RETRYING_MARK = "Connection attempt failed"
_RECONNECTED_MARK = "Connection successful after"
_MAX_RESTARTS = 3
JOIN_LOCK_FILE = "join.lock"
"""The per-site lock file under ``<site>/.segviz/federated/``."""
_FATAL_MARKS = (
    "Failed to initialize the connection",
    "Exit Code:",
    "Traceback (most recent call last)",
    "Unable to parse",
)
# What Flower 1.42's SuperNode logs when it refuses a run's FAB under --trusted-entities
# (flwr/supernode/start_client_internal.py): the run id comes in the "[RUN <id>" line before.
_REFUSALS = {
    "App verification is not supported by the connected SuperLink": (
        "its app is unsigned (submitted from a folder, not the federation's signed SegViz app)"
    ),
    "the provided trusted entities could not verify the FAB": "its app is not signed by the federation key",
}
_RUN_LINE = re.compile(r"\[RUN (\d+)")


def app_refusals(log_text: str) -> list[tuple[int, str]]:
    """The runs a SuperNode refused to run, from its log: ``[(run id, why)]`` in log order."""
    refusals, run_id = [], None
    for line in log_text.splitlines():
        if found := _RUN_LINE.search(line):
            run_id = int(found.group(1))
        for mark, why in _REFUSALS.items():
            if mark in line and run_id is not None:
                refusals.append((run_id, why))
    return refusals


def find_trust_file(trust: str | Path | None, root_cert: str | Path | None) -> Path | None:
    """The federation's trust file: ``trust`` if given, else ``federation-trust.yaml`` next to
    ``ca.crt`` (the coordinator hands both out together), else ``None``.

    Raises:
        SegVizInputError: ``trust`` is not a readable trust file of Ed25519 keys.
    """
    from ..signing import TRUST_FILE, read_trust_file

    if trust is None and root_cert is not None:
        candidate = Path(root_cert).expanduser().resolve().parent / TRUST_FILE
        trust = candidate if candidate.is_file() else None
    if trust is None:
        return None
    path = Path(trust).expanduser().resolve()
    read_trust_file(path)  # a clear line now, not Flower's exit code later
    return path


def _tls_args_client(root_cert: str | Path | None, insecure: bool) -> list[str]:
    if insecure:
        return ["--insecure"]
    if root_cert is None:
        raise SegVizInputError(
            None, "TLS is the default: pass --root-cert ca.crt (from the coordinator) or ask for --insecure"
        )
    if not Path(root_cert).is_file():
        raise SegVizInputError(root_cert, "root certificate not found")
    return ["--root-certificates", str(Path(root_cert).resolve())]


def start_supernode(
    superlink: str,
    site_dir: str | Path,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    auth_key: str | Path | None = None,
    runtime_port: int | None = None,
    log_path: str | Path | None = None,
    device: str | None = None,
    trust_file: str | Path | None = None,
    share_final_batchnorm: bool = False,
    clientapp_bin: str | Path | None = None,
) -> FlowerProcess:
    """Start ``flower-supernode`` for one site (``--node-config site-dir=...``).

    Each SuperNode also serves a local Runtime API for its ClientApp processes; several sites
    on one machine need different ``runtime_port`` values (a free one by default).

    Args:
        trust_file: the federation's ``federation-trust.yaml``: the SuperNode runs only apps
            signed by its key (Flower's ``--trusted-entities``).
        share_final_batchnorm: the site's consent to send its final-round BatchNorm when the
            coordinator asks (node config ``share-final-batchnorm``).
        clientapp_bin: a folder to put first on the SuperNode's ``PATH``: the ``flwr-clientapp``
            of a :class:`~.clientapp_launcher.ClientAppLauncher`.
    """
    from .client_app import SHARE_FINAL_BATCHNORM_KEY

    site = Path(site_dir).resolve()
    state = local_state_dir(site)
    state.mkdir(parents=True, exist_ok=True)
    node_config = f'site-dir="{site}" {SHARE_FINAL_BATCHNORM_KEY}={str(bool(share_final_batchnorm)).lower()}' + (
        f' device="{device}"' if device else ""
    )
    command = [
        flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        *_tls_args_client(root_cert, insecure),
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port or free_port()),
    ]
    if auth_key is not None:
        if not Path(auth_key).is_file():
            raise SegVizInputError(
                auth_key, "SuperNode private key not found (create one with `segviz federation node-key`)"
            )
        command += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    if trust_file is not None:
        command += ["--trusted-entities", str(Path(trust_file).resolve())]
    env = flower_environment(state / "flwr-home")
    if clientapp_bin is not None:
        env["PATH"] = str(clientapp_bin) + os.pathsep + env["PATH"]
    return FlowerProcess(
        f"SuperNode {site.name}",
        command,
        log_path or state / "supernode.log",
        env,
        cwd=state,
        lifeline=True,
    )


class SiteWorker:
    """A warm training process for one site, serving its ClientApp processes.

    Flower starts a fresh ``flwr-clientapp`` process for each message; this worker (a thread
    of ``segviz federation join``) has torch and MONAI imported already, so a round does not
    pay seconds of imports. It listens on 127.0.0.1 with a random port and a random key, both
    in ``<site>/.segviz/federated/worker.json`` (mode 0600); only processes that can read the
    site's folder can use it. One round at a time.
    """

    def __init__(self, site_dir: str | Path) -> None:
        from multiprocessing.connection import Listener

        from .client_app import WORKER_FILE, run_site_round  # noqa: F401 - imports torch now, not per round
        from .task import train_client_round  # noqa: F401

        self.site_dir = Path(site_dir).resolve()
        self._key = os.urandom(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self._key)
        self.file = local_state_dir(self.site_dir) / WORKER_FILE
        fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"port": self._listener.address[1], "authkey": self._key.hex(), "pid": os.getpid()}, handle)
        self._thread = threading.Thread(target=self._serve, name=f"segviz-worker-{self.site_dir.name}", daemon=True)
        self._closed = threading.Event()
        self._thread.start()

    def _serve(self) -> None:
        from .client_app import run_site_round

        while not self._closed.is_set():
            try:
                connection = self._listener.accept()
            except (OSError, EOFError):
                if self._closed.is_set():
                    return
                continue  # a client with the wrong key, or gone: keep serving
            with connection:
                try:
                    request = connection.recv()
                    if Path(request["site_dir"]).resolve() != self.site_dir:
                        raise ValueError("the worker serves another site")
                    state = request["state"]
                    result = run_site_round(
                        self.site_dir,
                        request["groups"],
                        request["config"],
                        state,
                        Path(request["events"]),
                        request["device"],
                    )
                    result["state"] = state
                    connection.send(("ok", result))
                except Exception as error:  # noqa: BLE001 - reported to the ClientApp, which fails the round
                    # The category may leave the site; the detail (file names) stays in its log.
                    failure = {"category": failure_category(error), "detail": traceback.format_exc()}
                    try:
                        connection.send(("error", failure))
                    except OSError:
                        pass

    def close(self) -> None:
        """Stop serving and remove the worker file."""
        self._closed.set()
        self.file.unlink(missing_ok=True)
        self._listener.close()


class LeftMidRound(SegVizError):
    """The join was interrupted while the coordinator waited for this site's update (its
    SuperNode signed off first, so the coordinator stops waiting for it at once)."""


def _start_launcher(state: Path, reporter: ProgressReporter) -> ClientAppLauncher | None:
    """The site's :class:`~.clientapp_launcher.ClientAppLauncher`, or ``None`` (with a warning
    when it failed) where it cannot run: the site then pays Flower's imports in every message."""
    if not launcher_supported():
        return None
    try:
        return ClientAppLauncher(state, flower_environment(state / "flwr-home"))
    except (OSError, RuntimeError) as error:
        reporter.emit(
            "stage",
            stage="launcher",
            message=f"ClientApp launcher not used ({error}); each message starts Flower afresh",
        )
        return None


def _events_since(events: Path, offset: int) -> tuple[list[dict], int]:
    lines, offset = read_new_lines(events, offset)
    return [e for e in map(parse_progress_line, lines) if e is not None], offset


def join_federation(
    superlink: str,
    site_dir: str | Path,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    auth_key: str | Path | None = None,
    connect_timeout: float = 30.0,
    reporter: ProgressReporter | None = None,
    once: bool = False,
    device: str | None = None,
    stop: threading.Event | None = None,
    linger: float = 15.0,
    warm: bool = True,
    trust: str | Path | None = None,
    share_final_batchnorm: bool = False,
) -> int:
    """Join a federation as one site: validate the site, start its SuperNode, relay progress.

    This is what Slicer's "Join round" starts. Progress events: ``connected``, ``waiting``,
    ``reconnecting``, ``refused``, ``round_started``, ``epoch``, ``update_sent``,
    ``round_finished``, ``run_finished``.

    Args:
        superlink: the coordinator's ``HOST:PORT``.
        site_dir: the site folder (validated before anything starts).
        root_cert: the federation's ``ca.crt``; or ``insecure``.
        auth_key: this site's private key when the SuperLink requires SuperNode authentication.
        connect_timeout: seconds to reach the SuperLink and be accepted by it (also for each
            new SuperNode after the SuperLink forgot the old one).
        reporter: progress.
        once: leave after taking part in one complete run.
        device: training device (``auto``/``cpu``/``cuda``).
        stop: set it to leave (tests, GUIs).
        linger: with ``once``, seconds to stay connected after the final reply was sent.
        warm: train in a warm :class:`SiteWorker` of this process instead of paying torch's
            imports in every ClientApp process.
        trust: the federation's ``federation-trust.yaml`` (default: next to ``root_cert``). With
            TLS it is required: the site runs only the app the federation's key signed, and a
            refused run is reported as a ``refused`` event naming the run and why. With
            ``insecure`` and no trust file, apps are not checked (development only).
        share_final_batchnorm: the site agrees to send its final-round BatchNorm (intensity
            statistics of its features) when the coordinator asks; off by default.

    Returns:
        0 when the node left normally.

    Raises:
        SegVizInputError: the site folder is not usable, or no trust file with TLS.
        SegVizError: another join holds this site folder, the SuperLink is unreachable or
            refused the node, or the node failed.
        LeftMidRound: interrupted (Ctrl-C, SIGTERM) while the coordinator waited for this
            site's update; the SuperNode signed off before this is raised.
    """
    from ..site import validated_site

    # Read every image once per change of the site's files (the rounds then find the record).
    site = validated_site(site_dir)
    _tls_args_client(root_cert, insecure)  # a missing ca.crt is named before the trust file next to it
    trust_file = find_trust_file(trust, root_cert)
    if trust_file is None and not insecure:
        raise SegVizInputError(
            None,
            "a site runs only the app signed by its federation: pass --trust federation-trust.yaml "
            "(from the coordinator, with ca.crt)",
        )
    state = local_state_dir(site_dir)
    state.mkdir(parents=True, exist_ok=True)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with ExclusiveLock(state / JOIN_LOCK_FILE, f"segviz federation join, pid {os.getpid()}, since {since}"):
            return _join_locked(
                _JoinRequest(
                    superlink=superlink,
                    site_dir=site_dir,
                    site=site,
                    root_cert=root_cert,
                    insecure=insecure,
                    auth_key=auth_key,
                    connect_timeout=connect_timeout,
                    once=once,
                    device=device,
                    linger=linger,
                    warm=warm,
                    trust_file=trust_file,
                    share_final_batchnorm=share_final_batchnorm,
                ),
                reporter or ProgressReporter("none"),
                stop or threading.Event(),
            )
    except LockHeld as held:
        raise SegVizError(
            f"{Path(site_dir)}: this site already takes part in a federation ({held.owner}); "
            "leave that join first (one join per site folder)"
        ) from None


@dataclass(frozen=True)
class _JoinRequest:
    """What :func:`join_federation` was asked for, once checked."""

    superlink: str
    site_dir: str | Path
    site: Any
    root_cert: str | Path | None
    insecure: bool
    auth_key: str | Path | None
    connect_timeout: float
    once: bool
    device: str | None
    linger: float
    warm: bool
    trust_file: Path | None
    share_final_batchnorm: bool


def _join_locked(request: _JoinRequest, reporter: ProgressReporter, stop: threading.Event) -> int:
    from .client_app import EVENTS_FILE, WORKER_FILE

    site, site_dir, connect_timeout = request.site, request.site_dir, request.connect_timeout
    host, port = parse_host_port(request.superlink)
    address = format_address(host, port)
    reporter.emit(
        "stage", stage="connect", message=f"site {site.name} ({', '.join(site.organs)}): connecting to {address}"
    )
    reporter.emit(
        "stage",
        stage="trust",
        message=(
            f"runs only apps signed by the key in {request.trust_file.name}"
            if request.trust_file
            else "WARNING: no trust file, so any app submitted to the SuperLink would run here (development only)"
        )
        + f"; final BatchNorm {'shared if the coordinator asks' if request.share_final_batchnorm else 'never shared'}",
    )
    error = wait_for_port(host, port, connect_timeout, alive=lambda: not stop.is_set())
    if error is not None:
        raise SegVizError(
            f"cannot reach the SuperLink at {address} within {connect_timeout:.0f} s ({error}); "
            "check the address, that `segviz federation superlink` runs there and that the port is open"
        )
    state = local_state_dir(site_dir)
    # A join killed without cleaning up leaves its worker file; we hold the site's lock, so
    # whatever it names is dead: remove it before anything could try to use it.
    (state / WORKER_FILE).unlink(missing_ok=True)
    events = state / EVENTS_FILE
    offset = events.stat().st_size if events.exists() else 0
    worker = SiteWorker(site_dir) if request.warm else None
    launcher = _start_launcher(state, reporter) if request.warm else None
    process: FlowerProcess | None = None

    def connect() -> tuple[FlowerProcess, int]:
        """Start a SuperNode and wait for its node id; raise with Flower's reason if it fails."""
        started = time.monotonic()
        node = start_supernode(
            address,
            site_dir,
            request.root_cert,
            request.insecure,
            request.auth_key,
            device=request.device,
            trust_file=request.trust_file,
            share_final_batchnorm=request.share_final_batchnorm,
            clientapp_bin=launcher.bin_dir if launcher else None,
        )
        since = node.log_path.stat().st_size if node.log_path.exists() else 0
        while True:
            text = node.log_text()[since:]
            if _CONNECTED_MARK in text:
                return node, since + len(text)
            failed = not node.alive() or any(mark in text for mark in _FATAL_MARKS)
            if failed or time.monotonic() - started > connect_timeout or stop.is_set():
                why = "refused or failed" if failed else f"did not connect within {connect_timeout:.0f} s"
                reason = node.failure_reason(since, settle=3.0 if failed else 0.0)
                node.stop()
                raise SegVizError(
                    f"the SuperNode for {site.name} {why} (SuperLink {address}; "
                    f"TLS {'off' if request.insecure else 'on'}"
                    f"{', node authentication key given' if request.auth_key else ''}): {reason} (log: {node.log_path})"
                )
            time.sleep(0.2)

    current_round: int | None = None  # training now
    last_round = 0  # its reply may still be on its way
    refused: set[int] = set()
    try:
        process, log_offset = connect()
        reporter.emit("connected", superlink=address)
        reporter.emit("waiting", message="connected; waiting for the coordinator to start a round")
        leaving, sent_at, reconnecting, restarts = False, None, False, []
        seen_retries = 0
        while not stop.is_set():
            text = process.log_text()[log_offset:]
            for run_id, why in app_refusals(text):
                if run_id not in refused:
                    refused.add(run_id)
                    reporter.emit(
                        "refused",
                        run=run_id,
                        reason=why,
                        message=f"refused run {run_id}: {why}; nothing of it ran here",
                    )
            new_events, offset = _events_since(events, offset)
            for event in new_events:
                relay_event(event, reporter)
                if event["event"] == "round_started":
                    current_round = last_round = int(event.get("round", 0))
                elif event["event"] in ("round_finished", "error"):
                    current_round = None
                if event["event"] == "run_finished" and request.once:
                    leaving = True
                elif event["event"] == "round_finished":
                    reporter.emit("waiting", message="update sent; waiting for the next round")
            lost, back = text.rfind(_RETRYING_MARK), text.rfind(_RECONNECTED_MARK)
            retries = text.count(_RETRYING_MARK)
            # A SuperLink that came back between two looks at the log still counts as lost once.
            if (lost > back or retries > seen_retries) and not reconnecting:
                reconnecting = True
                reporter.emit("reconnecting", message=f"lost the SuperLink at {address}; reconnecting with backoff")
            seen_retries = retries
            if reconnecting and back > lost:
                reconnecting = False
                reporter.emit("connected", superlink=address, reconnected=True)
            if leaving and sent_at is None and text.count(_SENT_MARK) >= text.count(_RECEIVED_MARK):
                sent_at = time.monotonic()
            if sent_at is not None and time.monotonic() - sent_at >= request.linger:
                # Leaving unregisters the node, and the SuperLink then drops replies the
                # ServerApp has not pulled yet: linger a little first.
                return 0
            if not process.alive():
                # E.g. a SuperLink restarted without its database no longer knows this node:
                # Flower's SuperNode then exits. A new one registers afresh.
                reason = process.failure_reason(log_offset)
                process.stop()
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 600] + [now]
                if len(restarts) > _MAX_RESTARTS:
                    raise SegVizError(
                        f"the SuperNode for {site.name} stopped {len(restarts)} times in 10 minutes "
                        f"(last exit code {process.process.returncode}): {reason} (log: {process.log_path})"
                    )
                reporter.emit("reconnecting", message=f"the SuperNode stopped ({reason}); starting a new one")
                process = None
                process, log_offset = connect()
                reconnecting = False
                current_round = None
                reporter.emit("connected", superlink=address, reconnected=True)
            stop.wait(0.5)
        return 0
    except KeyboardInterrupt:
        for event in _events_since(events, offset)[0]:  # what the ClientApp wrote since the last look
            if event["event"] == "round_started":
                current_round = last_round = int(event.get("round", 0))
            elif event["event"] in ("round_finished", "error"):
                current_round = None
        in_round = current_round
        if process is not None:
            text = process.log_text()[log_offset:]
            if in_round is None and text.count(_RECEIVED_MARK) > text.count(_SENT_MARK):
                in_round = last_round  # trained, reply not sent yet
            # Signing off first is what tells the coordinator: its round stops waiting for us.
            process.stop()
        if in_round is not None:
            which = f"round {in_round}" if in_round else "a round"
            raise LeftMidRound(
                f"left the federation during {which}: the SuperNode of {site.name} signed off, "
                "so the coordinator goes on without this site's update"
            ) from None
        raise
    finally:
        if process is not None:
            process.stop()
        if launcher:
            launcher.close()
        if worker:
            worker.close()
