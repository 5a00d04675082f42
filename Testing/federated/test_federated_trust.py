"""Only the federation's signed SegViz app runs at a site, and nothing that names a patient leaves
it: real `segviz federation certs / superlink / register / join / run` and `flwr` processes on
loopback with TLS, node authentication, and the commands run as the README writes them (relative
paths from the caller's folder)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from federated_tiny import TINY_NETWORK

from SegVizLogic.federated.processes import free_port
from SegVizLogic.federated.site_failures import failure_category
from SegVizLogic.progress import parse_progress_line
from SegVizLogic.site import SiteValidationError

# A patient's name as hospital exports write it: spaces, DICOM's ^, non-ASCII letters.
PATIENT_CASE = "MRN12345 DOE^JANE Müller"
PATIENT_FRAGMENTS = ("MRN12345", "DOE", "JANE", "Müller")
TINY_RUN = [
    "--rounds", "1", "--local-epochs", "1", "--channels", ",".join(map(str, TINY_NETWORK.channels)),
    "--patch", "32,32,16", "--batch-size", "2", "--samples-per-case", "2", "--spacing", "6", "--progress", "json",
]  # fmt: skip

ROGUE_APP = '''"""Ten lines an outsider would submit: at every site, write a marker (it could read the site)."""
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()

@client.train()
def steal(message: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"])).write_text(str(context.node_config))
    return Message(RecordDict(), reply_to=message)

@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes], timeout=120)
    Path(str(context.run_config["marker"]) + ".replies").write_text("\\n".join(r.error.reason for r in replies if r.has_error()))
'''


def _write_rogue_app(folder: Path, marker: Path, name: str = "rogue", publisher: str = "outsider") -> Path:
    from SegVizLogic import __version__

    folder.mkdir(parents=True)
    (folder / "rogue_app.py").write_text(ROGUE_APP, encoding="utf-8")
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "{name}"\nversion = "{__version__}"\ndescription = "x"\nlicense = "MIT"\n'
        "dependencies = []\n\n"
        f'[tool.flwr.app]\npublisher = "{publisher}"\n\n'
        '[tool.flwr.app.components]\nserverapp = "rogue_app:server"\nclientapp = "rogue_app:client"\n\n'
        f'[tool.flwr.app.config]\nmarker = "{marker}"\n',
        encoding="utf-8",
    )
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


class _Command:
    """A `segviz` command as a process; a thread collects its output lines as they come."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SegVizLogic.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            cwd=cwd,
            env=_env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def events(self, name: str | None = None) -> list[dict]:
        events = [e for e in map(parse_progress_line, list(self.lines)) if e]
        return [e for e in events if name is None or e["event"] == name]

    def wait_for(self, check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := check(self):
                return found
            assert self.process.poll() is None, f"exited while waiting for {what}: {''.join(self.lines)[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout:.0f} s: {''.join(self.lines)[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        return self.process.returncode

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _segviz(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "SegVizLogic.cli", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
    )


def _flwr(home: Path, address: str, ca: Path, *args: str) -> dict:
    """`flwr ...` with a SuperLink connection to ``address`` and only ``ca.crt``: what anyone can do."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{address}"\nroot-certificates = "{ca}"\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        ["flwr", *args, "--format", "json"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
        timeout=120,
        env={
            **_env(),
            "FLWR_HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    start = done.stdout.find("{")
    return json.loads(done.stdout[start:]) if start >= 0 else {"success": False, "error-message": done.stderr}


def _outward_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def _processes_mentioning(text: str) -> list[int]:
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


def _add_patient_case_with_damaged_label(site: Path) -> None:
    image = min((site / "images").iterdir())
    shutil.copyfile(image, site / "images" / f"{PATIENT_CASE}{''.join(image.suffixes)}")
    (site / "labels" / f"{PATIENT_CASE}{''.join(image.suffixes)}").write_bytes(b"NRRD0004\ntype: garbage\n")


def test_only_the_federations_signed_app_runs_at_a_site(make_sites, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from SegVizLogic.federated.app_registry import AppRegistry, app_spec, sign_fab
    from SegVizLogic.federated.certs import write_certificates, write_node_key_pair
    from SegVizLogic.federated.runs import register_node
    from SegVizLogic.signing import write_signing_key

    liver, spleen = make_sites(["site-liver", "site-spleen"])
    work = tmp_path  # the coordinator's and the sites' working folder: the commands use paths relative to it
    fleet, control, registry = free_port(), free_port(), free_port()
    markers = {"unsigned": tmp_path / "MARKER-unsigned", "foreign": tmp_path / "MARKER-foreign"}
    tls = write_certificates(work / "tls")
    other_key, _ = write_signing_key(work / "other")  # a key that is not the federation's
    link = _Command(
        work, "federation", "superlink", "--address", f"0.0.0.0:{fleet}", "--control-address", f"127.0.0.1:{control}",
        "--app-registry-port", str(registry), "--tls-dir", "tls", "--state-dir", "link", "--progress", "json",
    )  # fmt: skip
    joins: list[_Command] = []
    try:
        ready = link.wait_for(lambda c: c.events("stage"), 120, "a ready SuperLink")[0]
        assert ready["control"] == f"127.0.0.1:{control}" and "node authentication on" in ready["message"]
        # One site names its trust file; the other finds federation-trust.yaml next to ca.crt.
        for site, trust in ((liver, ["--trust", "tls/federation-trust.yaml"]), (spleen, [])):
            _, public = write_node_key_pair(work / "keys" / site.name)
            register_node(f"127.0.0.1:{control}", public, tls["ca.crt"], name=site.name)
            join_args = ["--superlink", f"127.0.0.1:{fleet}", "--site", f"sites/{site.name}", "--root-cert"]
            join_args += ["tls/ca.crt", "--auth-key", f"keys/{site.name}/node.key", "--progress", "json", *trust]
            joins.append(_Command(work, "federation", "join", *join_args, "--device", "cpu"))
        for join in joins:
            join.wait_for(lambda c: c.events("connected"), 180, "a connected site")
            assert "runs only apps signed by the key in federation-trust.yaml" in join.text

        # The Control API is not on the network: only the Fleet gateway is.
        outward = _outward_address()
        if outward is not None:
            assert _connects(outward, fleet) and not _connects(outward, control)

        # 1. An outsider with ca.crt and the advertised address: refused at the gateway.
        rogue = _write_rogue_app(tmp_path / "rogue", markers["unsigned"])
        outsider = _flwr(tmp_path / "outsider", f"127.0.0.1:{fleet}", tls["ca.crt"], "run", str(rogue), "x")
        assert not outsider["success"] and "403 Forbidden" in outsider["error-message"], outsider
        assert "refused POST /v1/control/start-run" in (work / "link" / "gateway.log").read_text(encoding="utf-8")
        assert _flwr(tmp_path / "insider", f"127.0.0.1:{control}", tls["ca.crt"], "list")["runs"] == []

        # 2. The same app through the coordinator's own Control API, unsigned: every site refuses it.
        unsigned = _flwr(tmp_path / "insider", f"127.0.0.1:{control}", tls["ca.crt"], "run", str(rogue), "x")
        assert unsigned["success"], unsigned
        # 3. The app posing as SegViz, signed by another key and served where the SuperLink fetches
        #    signed apps: refused too.
        posing = _write_rogue_app(tmp_path / "posing", markers["foreign"], name="segviz", publisher="segviz")
        fab = build_fab_from_disk(posing)
        with AppRegistry(fab, sign_fab(fab, other_key), registry):
            foreign = _flwr(tmp_path / "insider", f"127.0.0.1:{control}", tls["ca.crt"], "run", app_spec(), "x")
        assert foreign["success"], foreign
        runs = {int(unsigned["run-id"]): "unsigned", int(foreign["run-id"]): "not signed by the federation key"}
        for join in joins:
            refused = join.wait_for(
                lambda c: (
                    {e["run"]: e["reason"] for e in c.events("refused")} if len(c.events("refused")) >= 2 else None
                ),
                180,
                "two refusals",
            )
            assert all(why in refused[run] for run, why in runs.items()), refused
            assert any(e["message"].startswith("refused run ") for e in join.events("refused"))
        for marker in markers.values():  # each rogue ServerApp (on the coordinator) got both sites' refusals
            replies = Path(f"{marker}.replies")
            deadline = time.monotonic() + 120
            while not replies.exists() and time.monotonic() < deadline:
                time.sleep(1)
            assert replies.read_text(encoding="utf-8").count("The FAB could not be verified") == 2
            assert not marker.exists(), "a rogue app ran at a site"

        # 4. The federation's signed SegViz run is accepted: the sites run its rounds. Each has a new,
        #    damaged case named after a patient; the coordinator learns a category and a count only.
        _add_patient_case_with_damaged_label(liver)
        _add_patient_case_with_damaged_label(spleen)
        run = _segviz(
            work, "federation", "run", "--superlink", f"127.0.0.1:{control}", "--root-cert", "tls/ca.crt",
            "--app-registry-port", str(registry), "--out", "out", "--min-clients", "2", "--wait-timeout", "120",
            "--timeout", "300", *TINY_RUN, timeout=400,
        )  # fmt: skip
        coordinator_side = run.stdout + run.stderr + (work / "out" / "progress.jsonl").read_text(encoding="utf-8")
        assert run.returncode != 0, coordinator_side[-3000:]
        assert (
            "site-liver: 1 case unreadable" in coordinator_side and "site-spleen: 1 case unreadable" in coordinator_side
        )
        for fragment in (*PATIENT_FRAGMENTS, str(liver), str(spleen)):
            assert fragment not in coordinator_side
        for site, join in zip((liver, spleen), joins):
            assert PATIENT_CASE in (site / ".segviz" / "federated" / "errors.log").read_text(encoding="utf-8")
            join.wait_for(
                lambda c: [e for e in c.events("error") if "MRN12345" in e["message"]], 60, "the local detail"
            )
    finally:
        codes = [join.stop() for join in joins]
        link.stop()
    assert codes == [0, 0], [join.text[-2000:] for join in joins]
    assert not any(marker.exists() for marker in markers.values())
    time.sleep(1)
    assert _processes_mentioning(str(tmp_path)) == [], "processes outlived the commands"


def test_superlink_start_failures_say_one_line_and_leave_nothing(tmp_path):
    work, scratch = tmp_path / "coordinator", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    assert _segviz(work, "federation", "certs", "--out", "tls").returncode == 0
    env_tmp = {"TMPDIR": str(scratch)}

    def superlink(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "SegVizLogic.cli", "federation", "superlink", *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            check=False,
            cwd=work,
            env={**_env(), **env_tmp},
            timeout=180,
        )

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        done = superlink("--address", f"127.0.0.1:{port}", "--tls-dir", "tls")
        assert done.returncode == 2 and done.stdout == ""
        assert (
            done.stderr.strip()
            == f"error: cannot listen on 127.0.0.1:{port}: already in use (another SuperLink or program listens there)"
        )
        free = free_port()
        done = superlink("--address", f"127.0.0.1:{free}", "--control-address", f"127.0.0.1:{port}", "--tls-dir", "tls")
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            f"error: cannot listen on 127.0.0.1:{port}: already in use (another SuperLink or program listens there)"
        ]
    finally:
        busy.close()
    done = superlink("--address", f"127.0.0.1:{free_port()}", "--control-address", "10.1.2.3:9094", "--tls-dir", "tls")
    assert done.returncode == 2 and "is not a loopback address" in done.stderr
    done = superlink("--address", f"127.0.0.1:{free_port()}", "--tls-dir", "missing")
    assert done.returncode == 2 and f"{work / 'missing' / 'ca.crt'}: missing" in done.stderr
    # A SuperLink that fails after it was started (an unusable key) leaves no state folder behind.
    (work / "tls" / "server.key").write_text("not a key\n", encoding="utf-8")
    done = superlink("--address", f"127.0.0.1:{free_port()}", "--tls-dir", "tls")
    assert done.returncode == 2 and "the SuperLink did not start" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(scratch.iterdir()) == []
    assert _processes_mentioning(str(work)) == []


# Messages as sites produce them; each carries identifiers that must never reach the coordinator.
TEST_FAILURES = [
    [
        SiteValidationError("/data/site b", [f"/data/site b/labels/{PATIENT_CASE}.nrrd: unreadable"]),
        "1 case unreadable",
    ],
    [
        SiteValidationError(
            r"D:\PACS\DOE^JANE",
            [rf"D:\PACS\DOE^JANE\images\{PATIENT_CASE}.nii.gz: truncated", r"D:\PACS\DOE^JANE\labels\ct 2.nrrd: bad"],
        ),
        "2 cases unreadable",
    ],
    [
        SiteValidationError(
            r"\\pacs01\export\MRN12345 DOE JANE", [r"\\pacs01\export\MRN12345 DOE JANE\site.json: invalid"]
        ),
        "site folder invalid (1 problem)",
    ],
    [ValueError(r"cannot read \\pacs01\export\MRN12345 DOE JANE\ct.nii.gz"), "training failed (see the site's log)"],
    [
        OSError(f"[Errno 5] Input/output error: '/mnt/Müller Jürgen/{PATIENT_CASE}.nrrd'"),
        "training failed (see the site's log)",
    ],
    [MemoryError("Unable to allocate 4 GiB for DOE^JANE"), "out of memory while training"],
]


@pytest.mark.parametrize("error, category", TEST_FAILURES)
def test_failure_categories_carry_no_identifiers(error, category):
    assert failure_category(error) == category
    for fragment in (*PATIENT_FRAGMENTS, "pacs01", "PACS", "Jürgen", "site b"):
        assert fragment not in failure_category(error)


def test_a_failed_round_replies_with_a_category_and_keeps_the_detail_on_site(make_sites):
    """The ClientApp's reply to a train message when the site has a damaged, patient-named case."""
    import numpy as np
    from federated_tiny import TINY_PREPROCESSING, tiny_training
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from SegVizLogic.federated.client_app import handle_train
    from SegVizLogic.federated.task import FederationSettings
    from SegVizLogic.network import build_network, partition_state

    (site,) = make_sites(["site-spleen"])
    _add_patient_case_with_damaged_label(site)
    settings = FederationSettings(
        network=TINY_NETWORK, training=tiny_training().to_dict(), preprocessing=TINY_PREPROCESSING
    )
    groups = partition_state(build_network(TINY_NETWORK))
    content = RecordDict(
        {
            "config": ConfigRecord(settings.client_config(1, "L1")),
            **{name: ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}) for name, arrays in groups.items() if name != "batchnorm"},
        }
    )  # fmt: skip
    # A train message as a SuperNode hands it over (made outside a run, so with explicit metadata).
    metadata = Metadata(1, "m1", 0, 1, "", "1", time.time(), 3600.0, "train")
    message = Message(content=content, metadata=metadata)
    context = Context(run_id=1, node_id=1, node_config={"site-dir": str(site)}, state=RecordDict(), run_config={})
    events = site / ".segviz" / "federated" / "events.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    reply = handle_train(message, context, site, events=events, device="cpu")
    assert reply.has_error() and reply.error.reason == "site-spleen: 1 case unreadable"
    assert PATIENT_CASE in (site / ".segviz" / "federated" / "errors.log").read_text(encoding="utf-8")
    local = [e for e in map(parse_progress_line, events.read_text(encoding="utf-8").splitlines()) if e]
    assert any(e["event"] == "error" and "MRN12345" in e["message"] for e in local)  # the site's own people see it


def test_keys_are_found_next_to_ca_crt(tmp_path):
    """`join --root-cert ca.crt` finds the trust file, `run --root-cert ca.crt` the signing key, as
    `segviz federation certs` writes them into one folder."""
    from SegVizLogic.federated.certs import write_certificates
    from SegVizLogic.federated.runs import find_signing_key
    from SegVizLogic.federated.site_node import find_trust_file

    paths = write_certificates(tmp_path / "tls")
    assert find_signing_key(None, paths["ca.crt"]) == paths["federation.key"]
    assert find_trust_file(None, paths["ca.crt"]) == paths["federation-trust.yaml"]
    assert find_trust_file(None, None) is None and find_signing_key(None, None) is None
    (tmp_path / "site").mkdir()
    shutil.copy(paths["ca.crt"], tmp_path / "site" / "ca.crt")  # a site given ca.crt alone
    assert find_trust_file(None, tmp_path / "site" / "ca.crt") is None
