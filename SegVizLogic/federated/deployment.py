"""A real SegViz federation: the Flower SuperLink (coordinator), one SuperNode per site, and
starting a run, each as the real Flower process.

Flower 1.42 serves the Fleet, Control and Runtime APIs of the SuperLink on one HTTPS port
(``--host``/``--port``); sites and ``flwr run`` both use that address. Every process runs in
its own process group, so stopping it also stops the ``flower-superexec`` / ``flwr-clientapp``
/ ``flwr-serverapp`` children it started.

A SuperNode that cannot reach its SuperLink retries forever without a word (Flower issue
6250). :func:`join_federation` therefore probes the address first and then watches the
SuperNode's log for its node id, and gives up with a clear message after ``connect_timeout``
seconds, stopping the SuperNode's whole process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SegVizError, SegVizInputError
from ..progress import ProgressReporter, parse_progress_line
from .task import APP_CONFIG_DEFAULTS, local_state_dir

__all__ = [
    "FlowerProcess",
    "flower_environment",
    "parse_host_port",
    "free_port",
    "wait_for_port",
    "start_superlink",
    "start_supernode",
    "join_federation",
    "stage_app",
    "start_run",
    "follow_run",
    "register_node",
    "SiteWorker",
]

DEFAULT_SUPERLINK_PORT = 9093
_CONNECTED_MARK = "SuperNode ID:"
_RECEIVED_MARK = "Received successfully"
_SENT_MARK = "Sent successfully"
_FATAL_MARKS = ("Failed to initialize the connection", "Exit Code:", "Traceback (most recent call last)", "Unable to parse")


def flower_environment(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: this interpreter's ``bin`` first on ``PATH`` (Flower
    starts ``flower-superexec``, ``flwr-clientapp``, ``flwr-serverapp`` by name), no update
    check, unbuffered output, and ``FLWR_HOME`` when given."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NO_COLOR", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SegVizError(f"{name} not found: install Flower (pip install 'flwr>=1.42,<1.43') in this environment")
    return found


def parse_host_port(address: str, default_port: int = DEFAULT_SUPERLINK_PORT) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` -> ``(host, port)``.

    Raises:
        SegVizInputError: not an address.
    """
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise SegVizInputError(None, f"invalid address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:{default_port}")
    return host, number


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> str | None:
    """Wait until ``host:port`` accepts TCP connections.

    Returns:
        ``None`` once it does, else the last connection error (after ``timeout`` seconds,
        or as soon as ``alive()`` turns false).
    """
    deadline = time.monotonic() + timeout
    error = "timed out"
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout))):
                return None
        except OSError as exc:
            error = exc.strerror or str(exc)
        if time.monotonic() >= deadline or (alive is not None and not alive()):
            return error
        time.sleep(0.2)


class FlowerProcess:
    """A Flower process in its own process group, its output in a log file.

    Args:
        name: for messages (``"SuperLink"``, ``"SuperNode site-a"``).
        command: the command line.
        log_path: where stdout and stderr go.
        env: the environment.
        cwd: working directory.
    """

    def __init__(self, name: str, command: Sequence[str], log_path: str | Path, env: Mapping[str, str], cwd: str | Path | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=dict(env), cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _plain_lines(self, since: int = 0) -> list[str]:
        """The non-empty lines written after byte ``since``, stripped, without ANSI colours."""
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_text()[since:])
        return [line.strip() for line in text.splitlines() if line.strip()]

    def log_tail(self, lines: int = 8) -> str:
        """The last non-empty lines of the log, without ANSI colours."""
        return "\n".join(self._plain_lines()[-lines:])

    def failure_reason(self, since: int = 0, settle: float = 3.0) -> str:
        """Flower's own explanation of a failure, on one line, from the log written after byte
        ``since``: its ERROR lines and the exit-code paragraph (``Exit Code: 305`` ... the
        documentation link), not the web server's shutdown chatter that follows it. Waits up
        to ``settle`` seconds for a dying process so the paragraph is complete."""
        deadline = time.monotonic() + settle
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = self._plain_lines(since)
        reason, in_paragraph = [], False
        for line in lines:
            is_error = line.startswith("ERROR")
            if is_error:
                line = line.split(":", 1)[1].strip()
            if line.startswith("Exit Code:"):
                in_paragraph = True
            if (is_error or in_paragraph) and line not in reason:
                reason.append(line)
            if line.startswith("For more information"):
                in_paragraph = False
        if not reason:
            reason = lines[-3:]
        return "; ".join(reason) or f"no output (see {self.log_path})"

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process and everything it started (SIGTERM to the group, then SIGKILL)."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (superexec, clientapp/serverapp) may outlive the leader: clean the group.
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def __enter__(self) -> "FlowerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _tls_args_server(tls_dir: str | Path | None, insecure: bool) -> list[str]:
    if insecure:
        return ["--insecure"]
    if tls_dir is None:
        raise SegVizInputError(None, "TLS is the default: pass --tls-dir (from `segviz federation certs`) or ask for --insecure")
    folder = Path(tls_dir)
    files = {name: folder / name for name in ("ca.crt", "server.crt", "server.key")}
    for path in files.values():
        if not path.is_file():
            raise SegVizInputError(path, "missing; create the federation's certificates with `segviz federation certs --out DIR`")
    return ["--ssl-ca-certfile", str(files["ca.crt"]), "--ssl-certfile", str(files["server.crt"]), "--ssl-keyfile", str(files["server.key"])]


def _tls_args_client(root_cert: str | Path | None, insecure: bool) -> list[str]:
    if insecure:
        return ["--insecure"]
    if root_cert is None:
        raise SegVizInputError(None, "TLS is the default: pass --root-cert ca.crt (from the coordinator) or ask for --insecure")
    if not Path(root_cert).is_file():
        raise SegVizInputError(root_cert, "root certificate not found")
    return ["--root-certificates", str(Path(root_cert).resolve())]


def start_superlink(
    address: str = f"0.0.0.0:{DEFAULT_SUPERLINK_PORT}",
    tls_dir: str | Path | None = None,
    insecure: bool = False,
    state_dir: str | Path | None = None,
    node_auth: bool = False,
    startup_timeout: float = 60.0,
) -> FlowerProcess:
    """Start ``flower-superlink`` and wait until it listens.

    Args:
        address: ``HOST:PORT`` the sites and ``segviz federation run`` connect to.
        tls_dir: folder with ``ca.crt``, ``server.crt``, ``server.key``.
        insecure: no TLS (must be asked for).
        state_dir: the SuperLink's working folder (log, Flower home); a temporary one by default.
        node_auth: only SuperNodes registered with ``segviz federation register`` may join.
        startup_timeout: seconds to wait for the port.

    Raises:
        SegVizError: it exited or did not listen in time (with its last log lines).
    """
    host, port = parse_host_port(address)
    state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="segviz-superlink-"))
    state.mkdir(parents=True, exist_ok=True)
    command = [_executable("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation", *_tls_args_server(tls_dir, insecure)]
    if node_auth:
        if insecure:
            raise SegVizInputError(None, "SuperNode authentication needs TLS: drop --insecure")
        command.append("--enable-supernode-auth")
    process = FlowerProcess("SuperLink", command, state / "superlink.log", flower_environment(state / "flwr-home"), cwd=state)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    error = wait_for_port(probe_host, port, startup_timeout, alive=process.alive)
    if error is not None:
        tail = process.log_tail()
        process.stop()
        raise SegVizError(f"the SuperLink did not start on {address}: {error}\n{tail}")
    return process


def start_supernode(
    superlink: str,
    site_dir: str | Path,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    auth_key: str | Path | None = None,
    runtime_port: int | None = None,
    log_path: str | Path | None = None,
    device: str | None = None,
) -> FlowerProcess:
    """Start ``flower-supernode`` for one site (``--node-config site-dir=...``).

    Each SuperNode also serves a local Runtime API for its ClientApp processes; several sites
    on one machine need different ``runtime_port`` values (a free one by default).
    """
    site = Path(site_dir).resolve()
    state = local_state_dir(site)
    state.mkdir(parents=True, exist_ok=True)
    node_config = f'site-dir="{site}"' + (f' device="{device}"' if device else "")
    command = [_executable("flower-supernode"), "--superlink", superlink, *_tls_args_client(root_cert, insecure),
               "--node-config", node_config, "--host", "127.0.0.1", "--port", str(runtime_port or free_port())]
    if auth_key is not None:
        if not Path(auth_key).is_file():
            raise SegVizInputError(auth_key, "SuperNode private key not found (create one with `segviz federation node-key`)")
        command += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    return FlowerProcess(f"SuperNode {site.name}", command, log_path or state / "supernode.log", flower_environment(state / "flwr-home"), cwd=state)


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
                    result = run_site_round(self.site_dir, request["groups"], request["config"], state,
                                            Path(request["events"]), request["device"])
                    result["state"] = state
                    connection.send(("ok", result))
                except Exception as error:  # reported to the ClientApp, which fails the round
                    try:
                        connection.send(("error", f"{type(error).__name__}: {error}"))
                    except OSError:
                        pass

    def close(self) -> None:
        """Stop serving and remove the worker file."""
        self._closed.set()
        self.file.unlink(missing_ok=True)
        self._listener.close()


def _follow_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """New complete lines of ``path`` after byte ``offset``."""
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


def _relay(event: dict, reporter: ProgressReporter) -> None:
    fields = {k: v for k, v in event.items() if k not in ("event", "time")}
    reporter.emit(event["event"], **fields)


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
) -> int:
    """Join a federation as one site: validate the site, start its SuperNode, relay progress.

    This is what Slicer's "Join round" starts. Progress events: ``connected``, ``waiting``,
    ``round_started``, ``epoch``, ``update_sent``, ``round_finished``, ``run_finished``.

    Args:
        superlink: the coordinator's ``HOST:PORT``.
        site_dir: the site folder (validated before anything starts).
        root_cert: the federation's ``ca.crt``; or ``insecure``.
        auth_key: this site's private key when the SuperLink requires SuperNode authentication.
        connect_timeout: seconds to reach the SuperLink and be accepted by it.
        reporter: progress.
        once: leave after taking part in one complete run.
        device: training device (``auto``/``cpu``/``cuda``).
        stop: set it to leave (tests, GUIs).
        linger: with ``once``, seconds to stay connected after the final reply was sent.
        warm: train in a warm :class:`SiteWorker` of this process instead of paying torch's
            imports in every ClientApp process.

    Returns:
        0 when the node left normally.

    Raises:
        SegVizInputError: the site folder is not usable.
        SegVizError: the SuperLink is unreachable or refused the node, or the node failed.
    """
    from ..site import validate_site

    reporter = reporter or ProgressReporter("none")
    stop = stop or threading.Event()
    site = validate_site(site_dir)
    host, port = parse_host_port(superlink)
    address = _format_address(host, port)
    reporter.emit("stage", stage="connect", message=f"site {site.name} ({', '.join(site.organs)}): connecting to {address}")
    started = time.monotonic()
    error = wait_for_port(host, port, connect_timeout, alive=lambda: not stop.is_set())
    if error is not None:
        raise SegVizError(f"cannot reach the SuperLink at {address} within {connect_timeout:.0f} s ({error}); "
                          "check the address, that `segviz federation superlink` runs there and that the port is open")
    events = local_state_dir(site_dir) / "events.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    offset = events.stat().st_size if events.exists() else 0
    worker = SiteWorker(site_dir) if warm else None
    try:
        process = start_supernode(address, site_dir, root_cert, insecure, auth_key, device=device)
    except BaseException:
        if worker:
            worker.close()
        raise
    log_offset = process.log_path.stat().st_size if process.log_path.exists() else 0
    try:
        deadline = started + connect_timeout
        while True:
            text = process.log_text()[log_offset:]
            if _CONNECTED_MARK in text:
                break
            if not process.alive() or any(mark in text for mark in _FATAL_MARKS) or time.monotonic() > deadline or stop.is_set():
                failed = not process.alive() or any(m in text for m in _FATAL_MARKS)
                why = "refused or failed" if failed else f"did not connect within {connect_timeout:.0f} s"
                reason = process.failure_reason(log_offset, settle=3.0 if failed else 0.0)
                raise SegVizError(f"the SuperNode for {site.name} {why} (SuperLink {address}; TLS {'off' if insecure else 'on'}"
                                  f"{', node authentication key given' if auth_key else ''}): {reason} (log: {process.log_path})")
            time.sleep(0.2)
        reporter.emit("connected", superlink=address)
        reporter.emit("waiting", message="connected; waiting for the coordinator to start a round")
        leaving, sent_at = False, None
        while not stop.is_set():
            lines, offset = _follow_lines(events, offset)
            for line in lines:
                event = parse_progress_line(line)
                if event is None:
                    continue
                _relay(event, reporter)
                if event["event"] == "run_finished" and once:
                    leaving = True
                elif event["event"] == "round_finished":
                    reporter.emit("waiting", message="update sent; waiting for the next round")
            if leaving and sent_at is None:
                text = process.log_text()[log_offset:]
                if text.count(_SENT_MARK) >= text.count(_RECEIVED_MARK):
                    sent_at = time.monotonic()
            if sent_at is not None and time.monotonic() - sent_at >= linger:
                # Leaving unregisters the node, and the SuperLink then drops replies the
                # ServerApp has not pulled yet (it polls every 3 s): linger a little first.
                return 0
            if not process.alive():
                raise SegVizError(f"the SuperNode for {site.name} stopped (exit code {process.process.returncode}): "
                                  f"{process.failure_reason(log_offset)} (log: {process.log_path})")
            stop.wait(0.5)
        return 0
    finally:
        process.stop()
        if worker:
            worker.close()


# --- starting a run ---------------------------------------------------------------------------


def _app_pyproject() -> dict:
    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "segviz", "version": __version__, "license": "Apache-2.0",
                    "description": "SegViz federated multi-organ CT segmentation (FedBN)", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "segviz",
            "components": {"serverapp": "SegVizLogic.federated.server_app:app", "clientapp": "SegVizLogic.federated.client_app:app"},
            "config": dict(APP_CONFIG_DEFAULTS),
        }}},
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
        return subprocess.run([_executable("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=flower_environment(home), stdin=subprocess.DEVNULL)
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
            raise SegVizError(f"registering {public_key} failed: {payload.get('error-message') or done.stderr.strip() or done.stdout.strip()}")
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
        lines, offset = _follow_lines(progress, offset)
        for line in lines:
            event = parse_progress_line(line)
            if event is None:
                continue
            if event["event"] == "error":
                raise SegVizError(f"the federated run failed: {event.get('message', '')}")
            _relay(event, reporter)
            if event["event"] == "run_finished":
                return Path(event.get("outputs", {}).get("model", Path(out_dir) / "model.segviz"))
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            raise SegVizError(f"the federated run did not finish within {timeout:.0f} s")
        if run_id is not None and flwr_home is not None and now - last_status > 15:
            last_status = now
            status = _run_status(run_id, Path(flwr_home))
            if status.startswith("finished") and "completed" not in status:
                lines, offset = _follow_lines(progress, offset)
                raise SegVizError(f"run {run_id} ended as {status!r} without finishing; see `flwr log {run_id}` on the coordinator")
        time.sleep(0.5)
