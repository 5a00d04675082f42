"""The coordinator's Flower SuperLink: ``segviz federation superlink``.

Flower 1.42 serves the Fleet, Control and Runtime APIs of a SuperLink on one HTTP(S) port, and
its open-source Control API lets every caller submit runs. So the coordinator runs:

- ``flower-superlink`` on a loopback address (``--control-address``, default
  ``127.0.0.1:<port + 1>``): its Control API (``flwr run``, ``segviz federation run`` and
  ``register``) and Runtime API are reachable from this machine only (a remote operator uses an
  SSH tunnel, docs/SECURITY.md);
- :class:`~SegVizLogic.federated.fleet_gateway.FleetGateway` on the public ``--address``:
  the Fleet API for the sites' SuperNodes and nothing else;
- SuperNode authentication on by default (``open_enrolment`` must be asked for);
- ``FLWR_SUPERGRID_API_URL`` pointing at the loopback app registry that
  ``segviz federation run`` serves while it submits the signed SegViz app
  (:mod:`SegVizLogic.federated.app_registry`).

Its state (runs, registered nodes, messages) lives in ``<state-dir>/state.db`` (Flower's
``--database``), so a SuperLink restarted with the same state folder still knows its runs and
SuperNodes, which reconnect by themselves (docs/RESILIENCE.md).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from ..errors import SegVizError, SegVizInputError
from .app_registry import registry_url
from .fleet_gateway import FleetGateway, bind_listener
from .processes import (
    DEFAULT_SUPERLINK_PORT,
    FlowerProcess,
    flower_environment,
    flower_executable,
    format_address,
    parse_host_port,
    wait_for_port,
)

__all__ = [
    "DEFAULT_CONTROL_ADDRESS",
    "STATE_DATABASE",
    "SuperLinkService",
    "default_control_address",
    "default_registry_port",
    "start_superlink",
]

DEFAULT_CONTROL_ADDRESS = f"127.0.0.1:{DEFAULT_SUPERLINK_PORT + 1}"
"""Where ``segviz federation run`` / ``register`` find the Control API by default."""

STATE_DATABASE = "state.db"
"""The SuperLink's database in its state folder: a restart with the same folder resumes it."""


def default_control_address(fleet_port: int) -> str:
    """The loopback Control API address next to a public Fleet port (``port + 1``)."""
    return f"127.0.0.1:{fleet_port + 1}"


def default_registry_port(control_port: int) -> int:
    """The loopback port of the app registry next to a Control API port (``port + 1``)."""
    return control_port + 1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_files(tls_dir: str | Path | None, insecure: bool) -> dict[str, Path] | None:
    if insecure:
        return None
    if tls_dir is None:
        raise SegVizInputError(
            None, "TLS is the default: pass --tls-dir (from `segviz federation certs`) or ask for --insecure"
        )
    # Resolved here, against the caller's folder: the SuperLink runs in its state folder.
    folder = Path(tls_dir).expanduser().resolve()
    files = {name: folder / name for name in ("ca.crt", "server.crt", "server.key")}
    for path in files.values():
        if not path.is_file():
            raise SegVizInputError(
                path, "missing; create the federation's certificates with `segviz federation certs --out DIR`"
            )
    return files


def _check_free(host: str, port: int) -> None:
    bind_listener(host, port).close()


class SuperLinkService:
    """A running coordinator: the loopback ``flower-superlink`` and the public Fleet gateway.

    Attributes:
        flower: the ``flower-superlink`` process.
        gateway: the Fleet gateway on the public address.
        fleet_address: where sites connect.
        control_address: the loopback Control API (``segviz federation run --superlink``).
        registry_port: the loopback port ``segviz federation run`` serves the signed app on.
        node_auth: whether only registered SuperNodes may join.
    """

    def __init__(
        self,
        flower: FlowerProcess,
        gateway: FleetGateway,
        fleet_address: str,
        control_address: str,
        registry_port: int,
        node_auth: bool,
    ) -> None:
        self.flower, self.gateway = flower, gateway
        self.fleet_address, self.control_address = fleet_address, control_address
        self.registry_port, self.node_auth = registry_port, node_auth

    @property
    def process(self):
        """The ``flower-superlink`` ``Popen`` (its ``returncode`` once it ended)."""
        return self.flower.process

    @property
    def pid(self) -> int:
        """Process id of ``flower-superlink``."""
        return self.flower.pid

    @property
    def log_path(self) -> Path:
        """The SuperLink's log."""
        return self.flower.log_path

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of the SuperLink's log."""
        return self.flower.log_tail(lines)

    def alive(self) -> bool:
        """Whether both the SuperLink and the gateway still run."""
        return self.flower.alive() and self.gateway.alive()

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the gateway, then the SuperLink and everything it started.

        Flower's SuperLink starts its ``flower-superexec`` in a session of its own (outside the
        process group :meth:`FlowerProcess.stop` signals) and gives it a second to exit; on a
        busy machine it takes longer, so its children are waited for here, then killed.
        """
        children = _child_pids(self.flower.pid)
        self.gateway.stop()
        code = self.flower.stop(grace)
        deadline = time.monotonic() + grace
        while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return code


def _child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``; empty where it does not exist)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in task.read_text(encoding="utf-8").split()]
        except (OSError, ValueError):
            pass
    return children


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def start_superlink(
    address: str = f"0.0.0.0:{DEFAULT_SUPERLINK_PORT}",
    tls_dir: str | Path | None = None,
    insecure: bool = False,
    state_dir: str | Path | None = None,
    node_auth: bool | None = None,
    startup_timeout: float = 60.0,
    control_address: str | None = None,
    registry_port: int | None = None,
) -> SuperLinkService:
    """Start the coordinator's SuperLink (loopback) and its Fleet gateway (``address``).

    Args:
        address: ``HOST:PORT`` the sites connect to (the Fleet API only).
        tls_dir: folder with ``ca.crt``, ``server.crt``, ``server.key`` (relative to the caller's folder).
        insecure: no TLS (must be asked for; no SuperNode authentication then).
        state_dir: the SuperLink's working folder (log, Flower home, database ``state.db``); a temporary
            one by default, removed again if the start fails. Restart with the same folder to keep runs and nodes.
        node_auth: only SuperNodes registered with ``segviz federation register`` may join.
            Default (``None``): on with TLS; off with ``insecure``, where Flower cannot
            authenticate nodes. ``False`` is ``--open-enrolment``.
        startup_timeout: seconds to wait for the SuperLink.
        control_address: the loopback ``HOST:PORT`` of the Control and Runtime APIs
            (default :func:`default_control_address`).
        registry_port: loopback port of the app registry (default :func:`default_registry_port`).

    Raises:
        SegVizInputError: missing TLS files, a non-loopback control address, node
            authentication without TLS.
        SegVizError: a port in use (one line), or the SuperLink did not start (its last log lines).
    """
    host, port = parse_host_port(address)
    tls = _tls_files(tls_dir, insecure)
    if node_auth is None:
        node_auth = not insecure
    if node_auth and insecure:
        raise SegVizInputError(None, "SuperNode authentication needs TLS: drop --insecure")
    control_host, control_port = parse_host_port(control_address or default_control_address(port))
    if not _is_loopback(control_host):
        raise SegVizInputError(
            None,
            f"--control-address {control_host}:{control_port} is not a loopback address: the Control API must "
            "stay on this machine (a remote coordinator uses an SSH tunnel, see docs/SECURITY.md)",
        )
    registry = registry_port or default_registry_port(control_port)
    if len({port, control_port, registry}) < 3:
        raise SegVizInputError(
            None, f"the Fleet ({port}), Control ({control_port}) and app registry ({registry}) ports must differ"
        )
    listener = bind_listener(host, port)
    created = state_dir is None
    state: Path | None = None
    flower: FlowerProcess | None = None
    try:
        _check_free(control_host, control_port)
        _check_free("127.0.0.1", registry)
        state = Path(tempfile.mkdtemp(prefix="segviz-superlink-")) if created else Path(state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        command = [
            flower_executable("flower-superlink"),
            "--host",
            control_host,
            "--port",
            str(control_port),
            "--disable-runtime-dependency-installation",
            "--database",
            str(state / STATE_DATABASE),
        ]
        if tls is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(tls["ca.crt"]),
                "--ssl-certfile",
                str(tls["server.crt"]),
                "--ssl-keyfile",
                str(tls["server.key"]),
            ]
        if node_auth:
            command.append("--enable-supernode-auth")
        environment = flower_environment(
            state / "flwr-home",
            {
                "FLWR_SUPERGRID_API_URL": registry_url(registry),
                # The SuperLink fetches the signed app from 127.0.0.1: never through a proxy.
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
            },
        )
        # lifeline: nothing outlives `segviz federation superlink` either
        flower = FlowerProcess("SuperLink", command, state / "superlink.log", environment, cwd=state, lifeline=True)
        error = wait_for_port(control_host, control_port, startup_timeout, alive=flower.alive)
        if error is not None:
            reason = flower.failure_reason(settle=3.0)
            raise SegVizError(f"the SuperLink did not start on {control_host}:{control_port}: {error}; {reason}")
        gateway = FleetGateway(
            listener,
            f"{'http' if tls is None else 'https'}://{format_address(control_host, control_port)}",
            certfile=tls and tls["server.crt"],
            keyfile=tls and tls["server.key"],
            ca_file=tls and tls["ca.crt"],
            log_path=state / "gateway.log",
        ).start()
    except BaseException:
        if flower is not None:
            flower.stop()
        listener.close()
        if created and state is not None:
            shutil.rmtree(state, ignore_errors=True)
        raise
    return SuperLinkService(
        flower,
        gateway,
        format_address(host, port),
        format_address(control_host, control_port),
        registry,
        node_auth,
    )
