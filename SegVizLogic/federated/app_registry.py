"""The SegViz Flower app as sites accept it: built without code, signed with the federation's key,
and handed to the coordinator's SuperLink by a loopback registry that speaks Flower Hub's protocol.

Why a registry: a Flower SuperNode started with ``--trusted-entities`` runs only a FAB whose
``verifications`` carry a valid Ed25519 signature by a trusted key (Flower 1.42,
``flwr/supernode/start_client_internal.py``). A FAB submitted from a folder (``flwr run ./app``)
carries no verifications; they only come with an app fetched by app spec
(``flwr run @account/app==x.y.z``), for which the SuperLink POSTs to
``$FLWR_SUPERGRID_API_URL/hub/fetch-fab`` and downloads the FAB from the URL it is given
(``flwr/superlink/servicer/control/control_handlers.py``, ``_get_remote_fab``). The coordinator's
SuperLink is therefore started with ``FLWR_SUPERGRID_API_URL`` pointing at
``http://127.0.0.1:<registry port>/v1`` (:func:`registry_url`), and ``segviz federation run``
serves :class:`AppRegistry` there while it submits the run: it holds one FAB, the one this run
signed, and exists only for the seconds the submission takes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SegVizError

__all__ = [
    "APP_ID",
    "APP_PUBLISHER",
    "AppRegistry",
    "app_spec",
    "build_app_fab",
    "registry_url",
    "sign_fab",
    "stage_app",
]

APP_PUBLISHER = "segviz"
APP_ID = f"@{APP_PUBLISHER}/segviz"


def app_spec() -> str:
    """The app spec ``flwr run`` submits: ``@segviz/segviz==<SegViz version>``."""
    return f"{APP_ID}=={__version__}"


def registry_url(port: int) -> str:
    """``FLWR_SUPERGRID_API_URL`` for a SuperLink whose app registry listens on ``port`` (loopback)."""
    return f"http://127.0.0.1:{port}/v1"


def _app_pyproject() -> dict:
    from .task import APP_CONFIG_DEFAULTS

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
                    "publisher": APP_PUBLISHER,
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
    """Write the Flower app that becomes the FAB: only a ``pyproject.toml`` with the
    ``[tool.flwr.app]`` section (components and run config), no code.

    Flower puts a FAB's folder first on ``sys.path``; a FAB without Python files makes every
    SuperNode load ``SegVizLogic.federated.client_app`` from the SegViz its site installed.
    With the FAB signed by the federation key and every SuperNode verifying it
    (``segviz federation join --trust``), no code sent by anyone runs at a hospital. (The
    repository's own ``pyproject.toml`` is not used: ``flwr run`` 1.42 rewrites one that still
    has a legacy ``[tool.flwr.federations]`` section.)
    """
    import tomli_w

    app = Path(folder) / "segviz"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps(_app_pyproject()), encoding="utf-8")
    return app


def build_app_fab(work_dir: str | Path) -> bytes:
    """The SegViz FAB (Flower's own builder over :func:`stage_app`'s folder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(stage_app(work_dir))


def sign_fab(fab: bytes, key) -> dict[str, Any]:
    """A Flower verification record for ``fab``, signed with the federation's key.

    The signature is Flower's: Ed25519 over ``create_message_to_sign(sha256(fab), signed_at)``,
    base64url without padding, as ``flwr app review`` makes it for Flower Hub.

    Args:
        fab: the FAB's bytes.
        key: the federation's private key (or the path of ``federation.key``).

    Returns:
        ``{"public_key_id", "signature", "signed_at"}``, one entry of fetch-fab's ``verifications``.
    """
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    from ..signing import load_signing_key, public_key_id

    if not hasattr(key, "sign"):
        key = load_signing_key(key)
    signed_at = int(time.time())
    signature = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return {
        "public_key_id": public_key_id(key.public_key()),
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
    }


class AppRegistry:
    """A Flower-Hub-compatible registry on 127.0.0.1 serving one signed FAB.

    Answers ``POST /v1/hub/fetch-fab`` for :data:`APP_ID` at this SegViz version with a download
    URL and the verification record, and ``GET /v1/fab/<sha256>.fab`` with the FAB. Anything
    else is 404. Use it as a context manager around the ``flwr run`` that submits the run.

    Args:
        fab: the FAB's bytes.
        verification: :func:`sign_fab`'s record.
        port: the port the SuperLink was told (its ``FLWR_SUPERGRID_API_URL``).

    Raises:
        SegVizError: the port is taken (one line naming it).
    """

    def __init__(self, fab: bytes, verification: Mapping[str, Any], port: int) -> None:
        self.fab, self.verification, self.port = fab, dict(verification), port
        self.fab_path = f"/v1/fab/{hashlib.sha256(fab).hexdigest()}.fab"
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                registry.requests.append(f"{self.command} {self.path}")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    request = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    request = {}
                if self.path != "/v1/hub/fetch-fab" or request.get("app_id") != APP_ID:
                    return self._reply(404, b'{"detail": "not found"}', "application/json")
                if request.get("app_version") not in (None, __version__):
                    detail = {"detail": {"available_app_versions": [__version__]}}
                    return self._reply(404, json.dumps(detail).encode(), "application/json")
                body = {
                    "fab_url": f"http://127.0.0.1:{registry.port}{registry.fab_path}",
                    "verifications": [registry.verification],
                }
                return self._reply(200, json.dumps(body).encode(), "application/json")

            def do_GET(self) -> None:
                if self.path != registry.fab_path:
                    return self._reply(404, b"not found", "text/plain")
                return self._reply(200, registry.fab, "application/octet-stream")

        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as error:
            raise SegVizError(
                f"the SegViz app registry cannot listen on 127.0.0.1:{port} ({error.strerror}); "
                "is another `segviz federation run` submitting right now?"
            ) from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="segviz-app-registry", daemon=True)

    def __enter__(self) -> AppRegistry:  # noqa: PYI034 - typing.Self needs Python 3.11; we support 3.10
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
