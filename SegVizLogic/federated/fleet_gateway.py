"""The coordinator's public address: Flower's Fleet API and nothing else.

Flower 1.42 serves the Fleet, Control and Runtime APIs of a SuperLink on one HTTP(S) port, and
the open-source Control API accepts every caller (account authentication is Flower Enterprise
only). Anyone who can reach that port with ``ca.crt`` could submit a run. SegViz therefore
binds the SuperLink to loopback and puts this gateway on the address the sites use: it forwards
exactly the Fleet routes Flower's own router declares (``POST /v1/fleet/register-node``, ...,
compared byte for byte on the raw path) to the loopback SuperLink and answers everything else
with 403, so the Control and Runtime APIs cannot be reached from another host.
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import SegVizError

__all__ = ["FleetGateway", "bind_listener", "fleet_routes"]

# Connection-level headers of one hop (RFC 9110 section 7.6.1), never forwarded.
_HOP_HEADERS = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}
_REFUSAL = b"SegViz: this address serves only Flower's Fleet API (SuperNodes); the Control API is not reachable here\n"


def fleet_routes() -> frozenset[bytes]:
    """The raw paths the gateway forwards: the POST routes of ``flwr.superlink.routers.fleet.router``."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset(route.path.encode("ascii") for route in router.routes if "POST" in route.methods)


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound now so the port is ours before anything starts.

    Raises:
        SegVizError: the port is in use or the address is not this machine's (one line).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = (
            "already in use (another SuperLink or program listens there)"
            if error.errno == errno.EADDRINUSE
            else error.strerror
        )
        raise SegVizError(f"cannot listen on {shown}: {why}") from None
    return sock


class FleetGateway:
    """Forward the Fleet API from a public listener to the loopback SuperLink, refuse the rest.

    Runs a uvicorn server in a thread of the calling process (``segviz federation superlink``),
    so it lives and dies with that command.

    Args:
        listener: the public socket (:func:`bind_listener`).
        upstream: the SuperLink's loopback base URL (``https://127.0.0.1:9094``).
        certfile: the SuperLink's certificate (``server.crt``); ``None``: plain HTTP (``--insecure``).
        keyfile: its key (``server.key``).
        ca_file: ``ca.crt``, to verify the loopback SuperLink's certificate.
        log_path: refused requests are appended here (time, method, path, client address).
    """

    def __init__(
        self,
        listener: socket.socket,
        upstream: str,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        ca_file: str | Path | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        import uvicorn

        self.listener = listener
        self.upstream = upstream.rstrip("/")
        self.log_path = Path(log_path) if log_path else None
        self.refused = 0
        self.routes = fleet_routes()
        self._ca_file = ca_file
        self._error: BaseException | None = None
        config = uvicorn.Config(
            self._asgi,
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            interface="asgi3",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._client = None
        self._thread = threading.Thread(target=self._run, name="segviz-fleet-gateway", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self.listener])
        except BaseException as error:  # noqa: BLE001 - reported by start()/alive()
            self._error = error

    def start(self, timeout: float = 30.0) -> FleetGateway:
        """Start serving; returns once the listener accepts connections.

        Raises:
            SegVizError: it failed to start (e.g. an unusable certificate).
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive() or time.monotonic() > deadline:
                raise SegVizError(f"the Fleet gateway did not start: {self._error or 'timed out'}")
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        """Whether it still serves."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the listener (idempotent)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.listener.close()

    def _log_refusal(self, scope: dict) -> None:
        self.refused += 1
        if self.log_path is None:
            return
        client = scope.get("client") or ("?", 0)
        path = scope.get("raw_path") or scope.get("path", "").encode()
        line = (
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} refused {scope.get('method', '?')} "
            f"{path.decode('ascii', 'replace')[:200]} from {client[0]}\n"
        )
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(line)

    def _upstream_client(self):
        import httpx

        if self._client is None:
            verify: ssl.SSLContext | bool = False
            if self.upstream.startswith("https://"):
                verify = ssl.create_default_context(cafile=str(self._ca_file))
            # Pulled and pushed objects can be tens of MB on a slow hospital link: long read timeout.
            self._client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(300.0, connect=10.0))
        return self._client

    async def _asgi(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        raw_path = scope.get("raw_path") or scope["path"].encode("ascii", "replace")
        if scope["method"] != "POST" or raw_path not in self.routes or scope.get("query_string"):
            self._log_refusal(scope)
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": _REFUSAL})
            return
        body = bytearray()
        while True:
            message = await receive()
            body.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_HEADERS]
        client = self._upstream_client()
        try:
            request = client.build_request(
                "POST",
                self.upstream + raw_path.decode("ascii"),
                content=bytes(body),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
            )
            response = await client.send(request, stream=True)
            try:
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except Exception:  # noqa: BLE001 - the SuperNode retries; the SuperLink's own log says why
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"SegViz gateway: the SuperLink did not answer\n"})
            return
        reply_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.multi_items()
            if k.lower().encode() not in _HOP_HEADERS
        ]
        reply_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": reply_headers})
        await send({"type": "http.response.body", "body": content})
