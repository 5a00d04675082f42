"""A real federation on 127.0.0.1 with TLS: `segviz federation superlink`, three `join`s and a
`run`, each starting the real Flower processes; plus the failures a site must see clearly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tomllib
from federated_tiny import TINY_NETWORK

from SegVizLogic.bundle import load_bundle
from SegVizLogic.errors import SegVizError
from SegVizLogic.federated.certs import write_certificates, write_node_key_pair
from SegVizLogic.federated.processes import free_port
from SegVizLogic.federated.runs import register_node, stage_app
from SegVizLogic.federated.site_node import join_federation
from SegVizLogic.federated.superlink import start_superlink
from SegVizLogic.federated.task import APP_CONFIG_DEFAULTS, local_state_dir
from SegVizLogic.progress import ProgressReporter, parse_progress_line
from SegVizLogic.signing import read_trust_file, verify_bundle

REPO = Path(__file__).resolve().parents[2]


def _segviz(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "SegVizLogic.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
        **kwargs,
    )


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose environment or command line mentions ``text`` (Flower children inherit FLWR_HOME)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


def _events(text: str) -> list[dict]:
    return [e for e in map(parse_progress_line, text.splitlines()) if e]


def test_app_config_in_pyproject_matches_the_code():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    assert config["config"] == APP_CONFIG_DEFAULTS
    assert config["components"] == {
        "serverapp": "SegVizLogic.federated.server_app:app",
        "clientapp": "SegVizLogic.federated.client_app:app",
    }


def test_staged_app_is_a_valid_flower_app(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(tmp_path)
    fab = build_fab_from_disk(app)
    assert 0 < len(fab) < 10 * 1024
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]  # no code travels: sites run their own SegViz


def test_real_federation_with_tls(make_sites, tmp_path):
    """The README's "A real federation" walked through as written, from one working folder with
    relative paths: certificates, SuperLink, node keys registered, three joins (two agree to share
    their final BatchNorm), one signed run."""
    sites = make_sites()
    work = tmp_path
    fleet, control, registry = free_port(), free_port(), free_port()

    def segviz(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "SegVizLogic.cli", *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            check=False,
            cwd=work,
            timeout=300,
            env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"},
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    segviz("federation", "certs", "--out", "tls")
    link = _segviz(
        "federation", "superlink", "--address", f"127.0.0.1:{fleet}", "--control-address", f"127.0.0.1:{control}",
        "--app-registry-port", str(registry), "--tls-dir", "tls", "--state-dir", "link", "--progress", "json",
        cwd=work,
    )  # fmt: skip
    joins = []
    try:
        deadline = time.monotonic() + 120
        while socket.socket().connect_ex(("127.0.0.1", control)) != 0:  # the Fleet gateway starts right after
            assert link.poll() is None, link.stderr.read()
            assert time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.3)
        for site in sites:
            segviz("federation", "node-key", "--out", f"keys/{site.name}")
            segviz(
                "federation", "register", "--superlink", f"127.0.0.1:{control}", "--public-key",
                f"keys/{site.name}/node.pub", "--root-cert", "tls/ca.crt", "--name", site.name,
            )  # fmt: skip
        for site in sites:
            consent = "--share-final-batchnorm" if site.name != "site-kidney" else "--no-share-final-batchnorm"
            join_args = ["--superlink", f"127.0.0.1:{fleet}", "--site", f"sites/{site.name}", "--root-cert"]
            join_args += [
                "tls/ca.crt",
                "--trust",
                "tls/federation-trust.yaml",
                "--auth-key",
                f"keys/{site.name}/node.key",
            ]
            joins.append(
                _segviz("federation", "join", *join_args, "--progress", "json", "--device", "cpu", consent, cwd=work)
            )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "SegVizLogic.cli",
                "federation",
                "run",
                "--superlink",
                f"127.0.0.1:{control}",
                "--root-cert",
                "tls/ca.crt",
                "--signing-key",
                "tls/federation.key",
                "--app-registry-port",
                str(registry),
                "--out",
                "out",
                "--rounds",
                "2",
                "--local-epochs",
                "1",
                "--min-clients",
                "3",
                "--wait-timeout",
                "180",
                "--channels",
                ",".join(map(str, TINY_NETWORK.channels)),
                "--patch",
                "32,32,16",
                "--batch-size",
                "2",
                "--samples-per-case",
                "2",
                "--spacing",
                "6",
                "--progress",
                "json",
                "--timeout",
                "400",
            ],
            capture_output=True,
            check=False,
            text=True,
            encoding="utf-8",
            timeout=480,
            cwd=work,
            env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"},
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        events = _events(run.stdout)
        names = [e["event"] for e in events]
        assert names.count("round_started") == 2 and names.count("round_finished") == 2 and names[-1] == "run_finished"
        assert sum(1 for e in events if e["event"] == "update_sent") == 6
    finally:
        for process in joins:
            process.send_signal(signal.SIGTERM)
        join_output = [p.communicate(timeout=60) for p in joins]
        link.send_signal(signal.SIGTERM)
        link.communicate(timeout=60)
    for process, (stdout, stderr) in zip(joins, join_output):
        assert process.returncode == 0, stderr[-2000:]
        site_events = [e["event"] for e in _events(stdout)]
        for name in ("connected", "round_started", "epoch", "update_sent", "round_finished", "run_finished"):
            assert name in site_events, (name, site_events)
        assert "refused" not in site_events
    for site in sites:  # every message's ClientApp was forked by the site's warm launcher, and ended well
        log = (local_state_dir(site) / "clientapp-launcher.log").read_text()
        started, ended = log.count("started ClientApp process"), log.count("exited with 0")
        assert started >= 3 and ended == started, log  # two rounds and the threshold question
        supernode_log = (local_state_dir(site) / "supernode.log").read_text()
        assert "segviz: the SuperNode pulls every 1 s while it has no message" in supernode_log
    assert link.returncode == 0
    out = work / "out"
    for name in ("round-001.segviz", "round-002.segviz", "model.segviz"):
        assert (out / name).is_file()
        assert verify_bundle(out / name, read_trust_file(work / "tls" / "federation-trust.yaml")).trusted
    bundle = load_bundle(out / "model.segviz")
    assert bundle.provenance["mode"] == "deployment" and bundle.provenance["rounds"] == 2
    assert set(bundle.provenance["sites"]) == {"site-liver", "site-spleen", "site-kidney"}
    # Final BatchNorm only from the sites that agreed: the kidney site's never left it.
    assert {"averaged", "organ:liver", "organ:spleen", "site:site-liver", "site:site-spleen"} == set(
        bundle.batchnorm_variants
    )
    # The threshold was chosen on the three sites' validation cases before the bundle was signed.
    asked = bundle.metrics["threshold_validation"]
    assert asked["sites"] == ["site-kidney", "site-liver", "site-spleen"] and asked["failed"] == {}
    assert (bundle.default_batchnorm, bundle.threshold) == (asked["batchnorm"], asked["threshold"])
    assert bundle.manifest["inference"]["threshold_rule"].startswith("chosen on 3 sites'")
    time.sleep(1)
    assert _processes_mentioning(str(tmp_path)) == [], "Flower processes outlived the commands"


def test_join_fails_clearly_when_the_superlink_is_unreachable(make_sites):
    (site,) = make_sites(["site-liver"])
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "SegVizLogic.cli",
            "federation",
            "join",
            "--superlink",
            f"127.0.0.1:{port}",
            "--site",
            str(site),
            "--insecure",
            "--connect-timeout",
            "3",
            "--progress",
            "json",
        ],
        capture_output=True,
        check=False,
        text=True,
        encoding="utf-8",
        timeout=60,
    )
    assert done.returncode == 2
    assert time.monotonic() - started < 45
    errors = [e for e in _events(done.stdout) if e["event"] == "error"]
    assert errors and "cannot reach the SuperLink" in errors[0]["message"] and str(port) in errors[0]["message"]
    assert "error: cannot reach the SuperLink" in done.stderr


def test_join_gives_up_on_a_port_that_is_not_a_superlink(make_sites):
    (site,) = make_sites(["site-spleen"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve():  # accept and drop: a port that answers but never speaks Flower
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
                connection.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(SegVizError, match="SuperNode for site-spleen"):
            join_federation(
                f"127.0.0.1:{port}", site, insecure=True, connect_timeout=8, reporter=ProgressReporter("none")
            )
    finally:
        stop.set()
        thread.join()
        server.close()
    assert time.monotonic() - started < 30
    assert _processes_mentioning(str(site)) == []


def test_unknown_node_is_refused_with_node_authentication(make_sites, tmp_path):
    liver, spleen = make_sites(["site-liver", "site-spleen"])
    tls = write_certificates(tmp_path / "tls")
    address = f"127.0.0.1:{free_port()}"
    # Every port from free_port(): the default registry port (Control + 1) is not checked free, and on a busy
    # CI machine a loopback connection of an earlier test held it once.
    link = start_superlink(
        address,
        tls_dir=tmp_path / "tls",
        state_dir=tmp_path / "link",
        control_address=f"127.0.0.1:{free_port()}",
        registry_port=free_port(),
    )  # node authentication is the default
    try:
        known_key, known_pub = write_node_key_pair(tmp_path / "known")
        unknown_key, _ = write_node_key_pair(tmp_path / "unknown")
        assert register_node(link.control_address, known_pub, tls["ca.crt"], name="liver") > 0
        with pytest.raises(SegVizError, match="refused"):
            join_federation(address, spleen, root_cert=tls["ca.crt"], auth_key=unknown_key, connect_timeout=20)
        stop = threading.Event()
        seen: list[str] = []

        class Recorder(ProgressReporter):
            def emit(self, event, **fields):
                seen.append(event)
                if event == "connected":
                    stop.set()

        assert (
            join_federation(
                address,
                liver,
                root_cert=tls["ca.crt"],
                auth_key=known_key,
                connect_timeout=20,
                reporter=Recorder("none"),
                stop=stop,
            )
            == 0
        )
        assert "connected" in seen
        with pytest.raises(SegVizError, match="CERTIFICATE_VERIFY_FAILED"):
            other = write_certificates(tmp_path / "other")
            join_federation(address, liver, root_cert=other["ca.crt"], auth_key=known_key, connect_timeout=20)
    finally:
        link.stop()
    assert _processes_mentioning(str(tmp_path)) == []


def test_failure_reason_is_flowers_explanation_not_the_shutdown_chatter(tmp_path):
    """On a slow machine the web server's shutdown lines land after Flower's exit-code paragraph;
    the reason must still name the cause, on one line, from this start's part of the log only."""
    from SegVizLogic.federated.processes import FlowerProcess

    log = tmp_path / "supernode.log"
    log.write_text("ERROR :     Exit Code: 999\nan earlier run's failure\n", encoding="utf-8")
    since = log.stat().st_size
    script = (
        "printf 'INFO :      Starting Flower SuperNode\\n"
        "\\033[91mERROR \\033[0m:     SSL/TLS handshake error detected.\\n"
        "ERROR :     Exit Code: 305\\nFailed to initialize the connection to the SuperLink.\\n"
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed\\n\\n"
        "For more information, visit: <https://flower.ai/docs/305.html>\\n"
        "INFO:     Shutting down\\nINFO:     Finished server process [1]\\n'"
    )
    process = FlowerProcess("SuperNode test", ["sh", "-c", script], log, env=os.environ)
    reason = process.failure_reason(since, settle=10)
    assert "\n" not in reason
    assert reason == (
        "SSL/TLS handshake error detected.; Exit Code: 305; Failed to initialize the connection to the SuperLink.; "
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed; "
        "For more information, visit: <https://flower.ai/docs/305.html>"
    )
    quiet = FlowerProcess(
        "SuperNode quiet", ["sh", "-c", "printf 'one\\ntwo\\nthree\\nfour\\n'"], tmp_path / "quiet.log", env=os.environ
    )
    assert quiet.failure_reason(0, settle=10) == "two; three; four"
