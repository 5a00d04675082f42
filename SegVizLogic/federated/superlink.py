"""The coordinator's Flower SuperLink: ``segviz federation superlink``.

Flower 1.42 serves the Fleet, Control and Runtime APIs of the SuperLink on one HTTPS port
(``--host``/``--port``). Its state (runs, registered nodes, messages) lives in
``<state-dir>/state.db`` (Flower's ``--database``), so a SuperLink restarted with the same state
folder still knows its runs and SuperNodes, which reconnect by themselves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import SegVizError, SegVizInputError
from .processes import (
    DEFAULT_SUPERLINK_PORT,
    FlowerProcess,
    flower_environment,
    flower_executable,
    parse_host_port,
    wait_for_port,
)

__all__ = ["STATE_DATABASE", "start_superlink"]

STATE_DATABASE = "state.db"
"""The SuperLink's database in its state folder: a restart with the same folder resumes it."""


def _tls_args_server(tls_dir: str | Path | None, insecure: bool) -> list[str]:
    if insecure:
        return ["--insecure"]
    if tls_dir is None:
        raise SegVizInputError(
            None, "TLS is the default: pass --tls-dir (from `segviz federation certs`) or ask for --insecure"
        )
    folder = Path(tls_dir)
    files = {name: folder / name for name in ("ca.crt", "server.crt", "server.key")}
    for path in files.values():
        if not path.is_file():
            raise SegVizInputError(
                path, "missing; create the federation's certificates with `segviz federation certs --out DIR`"
            )
    return [
        "--ssl-ca-certfile",
        str(files["ca.crt"]),
        "--ssl-certfile",
        str(files["server.crt"]),
        "--ssl-keyfile",
        str(files["server.key"]),
    ]


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
        state_dir: the SuperLink's working folder (log, Flower home, database ``state.db``); a
            temporary one by default. Restart with the same folder to keep runs and nodes.
        node_auth: only SuperNodes registered with ``segviz federation register`` may join.
        startup_timeout: seconds to wait for the port.

    Raises:
        SegVizError: it exited or did not listen in time (with its last log lines).
    """
    host, port = parse_host_port(address)
    state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="segviz-superlink-"))
    state.mkdir(parents=True, exist_ok=True)
    command = [
        flower_executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--database",
        str((state / STATE_DATABASE).resolve()),
        *_tls_args_server(tls_dir, insecure),
    ]
    if node_auth:
        if insecure:
            raise SegVizInputError(None, "SuperNode authentication needs TLS: drop --insecure")
        command.append("--enable-supernode-auth")
    process = FlowerProcess(
        "SuperLink",
        command,
        state / "superlink.log",
        flower_environment(state / "flwr-home"),
        cwd=state,
        lifeline=True,  # nothing outlives `segviz federation superlink` either
    )
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    error = wait_for_port(probe_host, port, startup_timeout, alive=process.alive)
    if error is not None:
        tail = process.log_tail()
        process.stop()
        raise SegVizError(f"the SuperLink did not start on {address}: {error}\n{tail}")
    return process
