"""Child-process control with real processes: JSON-lines progress moves the panel's state, Leave
ends the whole process tree (a SuperNode in a session of its own included), a crash ends in
failed with its message, and the real `segviz` CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from SegVizSlicerLib.job import (
    FederationJob,
    InferenceJob,
    ProcessJob,
    child_environment,
    infer_command,
    join_command,
    segviz_command,
)
from SegVizSlicerLib.panel_state import FederationState, InferenceState


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _poll_until(job, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.poll()
        if done(status):
            return status
        time.sleep(0.05)
    raise AssertionError(
        f"timed out; last state {job.status.state}, message {job.status.message!r}, log {job.status.log[-5:]}"
    )


def _gone(pid: int) -> bool:
    """True when no live process has ``pid`` (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split()[2] == "Z"
    except (FileNotFoundError, IndexError):
        return True


# The real layout: `segviz federation join` starts `flower-supernode` in a session of its own
# (FlowerProcess: start_new_session=True), which starts the ClientApp in turn. BEHAVIOUR says what
# the fake join does with SIGTERM: leave cleanly, die on the spot (orphaning its SuperNode), or
# ignore it.
FAKE_SUPERNODE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
FAKE_JOIN = """
    import json, signal, subprocess, sys, time
    BEHAVIOUR = {behaviour!r}
    def emit(**e):
        print(json.dumps(e), flush=True)
    supernode = subprocess.Popen([sys.executable, "-c", {supernode!r}], start_new_session=True)
    def leave(signum, frame):
        supernode.terminate()
        supernode.wait()
        emit(event="stage", stage="leave", message="left the federation")
        sys.exit(0)
    if BEHAVIOUR == "clean":
        signal.signal(signal.SIGTERM, leave)
    elif BEHAVIOUR == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("a stray library line that is not JSON", flush=True)
    emit(event="connected", superlink="127.0.0.1:9092")
    emit(event="waiting", message="waiting for the next round")
    emit(event="round_started", round=1, rounds=3)
    emit(event="epoch", epoch=1, epochs=2, loss=0.5)
    emit(event="supernode", pid=supernode.pid)
    time.sleep(600)
"""


def _wait_gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if not _gone(pid)]


@pytest.mark.skipif(os.name == "nt", reason="POSIX sessions and signals")
@pytest.mark.parametrize("behaviour", ["clean", "dies", "ignore"])
def test_leave_ends_the_whole_tree_with_the_supernode_in_its_own_session(behaviour):
    code = textwrap.dedent(FAKE_JOIN).format(behaviour=behaviour, supernode=FAKE_SUPERNODE)
    job = FederationJob([sys.executable, "-c", code], superlink="127.0.0.1:9092", connect_timeout=None)
    job.start()
    seen = {}

    def seen_supernode(status):
        for line in status.log:
            if line.startswith("supernode"):
                seen["pid"] = int(line.split("pid=")[1])
        return "pid" in seen and len(job.process.descendants()) == 2

    status = _poll_until(job, seen_supernode)
    assert status.state == FederationState.TRAINING
    assert status.connected and (status.round, status.rounds, status.epoch, status.loss) == (1, 3, 1, 0.5)
    assert any("stray library line" in line for line in status.log)
    supernode = seen["pid"]
    assert os.getsid(supernode) == supernode != os.getsid(job.process.pid), "the SuperNode leads its own session"
    tree = job.process.descendants()
    assert supernode in tree and len(tree) == 2  # the SuperNode and its ClientApp

    started = time.monotonic()
    job.leave(timeout=3.0)
    status = _poll_until(job, lambda s: not s.active, timeout=30)
    assert status.state == FederationState.LEFT
    assert _wait_gone([job.process.pid, *tree]) == [], "Leave must end join, its SuperNode and the ClientApp"
    if behaviour == "clean":
        assert job.process.returncode == 0 and time.monotonic() - started < 3.0, "a clean leave needs no kill"
    if behaviour == "ignore":
        assert job.process.returncode == -9, "the fallback kills what ignores the polite signal"


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_failed_child_that_ignores_sigterm_is_killed_although_poll_keeps_stopping_it():
    code = """
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"event": "error", "message": "bad certificate"}), flush=True)
        time.sleep(600)
    """
    job = FederationJob(_python(code), superlink="h:1")
    job.stop_timeout = 1.0
    job.start()
    started = time.monotonic()
    _poll_until(job, lambda s: job.process.returncode is not None, timeout=20)
    assert job.status.state == FederationState.FAILED and job.process.returncode == -9
    assert time.monotonic() - started < 10


def test_a_child_that_dies_ends_in_failed_with_its_message():
    code = """
        import json, sys
        print(json.dumps({"event": "connected", "superlink": "h:1"}), flush=True)
        print(json.dumps({"event": "round_started", "round": 1, "rounds": 2}), flush=True)
        print("Traceback (most recent call last):", file=sys.stderr)
        print("error: CUDA out of memory while training the liver head", file=sys.stderr)
        sys.exit(1)
    """
    job = FederationJob(_python(code), superlink="h:1")
    job.start()
    status = _poll_until(job, lambda s: not s.active)
    assert status.state == FederationState.FAILED
    assert status.message == "CUDA out of memory while training the liver head"
    assert job.process.returncode == 1


def test_after_run_finished_the_child_leaves_by_itself_or_is_ended_after_the_grace():
    code = """
        import json, time
        print(json.dumps({"event": "round_started", "round": 1, "rounds": 1}), flush=True)
        print(json.dumps({"event": "run_finished", "rounds": 1, "outputs": {}}), flush=True)
        time.sleep(1.0)  # the last reply goes out
    """
    job = FederationJob(_python(code), superlink="h:1")
    job.start()
    _poll_until(job, lambda s: s.run_finished)
    assert job.status.state == FederationState.TRAINING and job.process.running
    status = _poll_until(job, lambda s: not s.active)
    assert status.state == FederationState.FINISHED and job.process.returncode == 0

    lingering = FederationJob(_python(code.replace("time.sleep(1.0)", "time.sleep(600)")), superlink="h:1")
    lingering.finish_grace = 0.5
    lingering.start()
    status = _poll_until(lingering, lambda s: not s.active)
    assert status.state == FederationState.FINISHED
    _poll_until(lingering, lambda s: lingering.process.returncode is not None, timeout=15)


def test_an_error_event_fails_and_stops_the_child():
    code = """
        import json, time
        print(json.dumps({"event": "error", "message": "site.json names no annotated organ"}), flush=True)
        time.sleep(600)
    """
    job = FederationJob(_python(code), superlink="h:1")
    job.start()
    status = _poll_until(job, lambda s: not s.active)
    assert status.state == FederationState.FAILED and status.message == "site.json names no annotated organ"
    _poll_until(job, lambda s: job.process.returncode is not None, timeout=15)


def test_no_connection_within_the_timeout_fails_with_a_clear_message():
    job = FederationJob(_python("import time; time.sleep(600)"), superlink="10.255.255.1:9092", connect_timeout=1.0)
    job.start()
    status = _poll_until(job, lambda s: not s.active, timeout=15)
    assert status.state == FederationState.FAILED
    assert "10.255.255.1:9092" in status.message and "could not reach" in status.message
    _poll_until(job, lambda s: job.process.returncode is not None, timeout=15)


def test_a_program_that_cannot_start_fails_instead_of_raising():
    job = FederationJob(["/nonexistent/segviz-python"], superlink="h:1")
    status = job.start()
    assert status.state == FederationState.FAILED and "cannot start" in status.message
    status = job.start()  # every button stays usable: joining again is allowed
    assert status.state == FederationState.FAILED


def test_process_job_reads_output_without_blocking():
    job = ProcessJob(_python("import time; print('a', flush=True); time.sleep(1.0); print('b')"))
    job.start()
    started = time.monotonic()
    lines = list(job.poll())  # what the first poll read counts too ('a' may already be there)
    assert time.monotonic() - started < 0.5
    while job.returncode is None:
        lines += job.poll()
        time.sleep(0.02)
    lines += job.poll()
    assert [line for _, line in lines] == ["a", "b"] and job.returncode == 0


def test_inference_job_success_cancel_and_missing_output(tmp_path):
    output = tmp_path / "organs.nii.gz"
    code = f"""
        import json, pathlib
        for i in range(1, 5):
            print(json.dumps({{"event": "progress", "stage": "sliding window", "current": i, "total": 4}}), flush=True)
        pathlib.Path({str(output)!r}).write_bytes(b"x")
        print(json.dumps({{"event": "done", "outputs": {{"labels": {str(output)!r}}}}}), flush=True)
    """
    job = InferenceJob(_python(code), output=output)
    job.start()
    _poll_until(job, lambda s: job.output_ready is not None)
    assert job.output_ready and job.status.state == InferenceState.RUNNING and job.status.fraction == 1.0
    assert job.status.outputs == {"labels": str(output)}

    job = InferenceJob(_python("import time; time.sleep(600)"), output=tmp_path / "never.nii.gz")
    job.start()
    job.cancel(timeout=2.0)
    status = _poll_until(job, lambda s: not s.active)
    assert status.state == InferenceState.CANCELLED

    job = InferenceJob(_python("pass"), output=tmp_path / "never.nii.gz")
    job.start()
    status = _poll_until(job, lambda s: not s.active)
    assert status.state == InferenceState.FAILED and "without writing" in status.message


def test_commands_are_what_the_cli_contract_says(tmp_path):
    argv = infer_command("m.segviz", "in.nii.gz", "out.nii.gz", "cuda", "s.json", python="py")
    assert argv[:2] == ["py", "-c"]
    assert argv[3:] == [
        "infer",
        "--model",
        "m.segviz",
        "--input",
        "in.nii.gz",
        "--output",
        "out.nii.gz",
        "--device",
        "cuda",
        "--progress",
        "json",
        "--force",
        "--stats",
        "s.json",
    ]
    dicom = infer_command("m.segviz", tmp_path, "o.nii.gz", series_uid="1.2.840.1", python="py")
    assert dicom[dicom.index("--series") + 1] == "1.2.840.1" and dicom[dicom.index("--input") + 1] == str(tmp_path)
    argv = join_command(
        "host:9093",
        tmp_path,
        root_cert="ca.crt",
        trust="federation-trust.yaml",
        auth_key="node.key",
        share_final_batchnorm=False,
        python="py",
    )
    assert argv[3:] == [
        "federation",
        "join",
        "--superlink",
        "host:9093",
        "--site",
        str(tmp_path),
        "--root-cert",
        "ca.crt",
        "--trust",
        "federation-trust.yaml",
        "--auth-key",
        "node.key",
        "--no-share-final-batchnorm",
        "--once",
        "--progress",
        "json",
    ]
    assert "--share-final-batchnorm" in join_command("h:1", tmp_path, insecure=True, share_final_batchnorm=True)
    plain = join_command("h:1", tmp_path, insecure=True, once=False)
    assert "--once" not in plain and not any("batchnorm" in a for a in plain) and "--insecure" in plain
    with pytest.raises(ValueError, match="root certificate"):
        join_command("host:9093", tmp_path)
    with pytest.raises(ValueError, match="not both"):
        join_command("host:9093", tmp_path, root_cert="ca.crt", insecure=True)
    for bad in ("host", "host:", "host:99999", ":9093"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            join_command(bad, tmp_path, insecure=True)
    with pytest.raises(ValueError, match="device"):
        infer_command("m", "i", "o", "gpu")


# ---------------------------------------------------------------- the real segviz CLI


def _cli_has(*words: str, option: str = "--") -> bool:
    """The CLI has the sub-command ``words`` (its help names ``option``; a placeholder parser that
    swallows unknown words would still exit 0 on --help)."""
    done = subprocess.run(
        segviz_command(sys.executable) + [*words, "--help"],
        capture_output=True,
        check=False,
        text=True,
        encoding="utf-8",
        env=child_environment(),
        timeout=120,
    )
    return done.returncode == 0 and option in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_cli_infer_with_a_damaged_bundle_fails_with_its_message(tmp_path):
    if not _cli_has("infer", option="--model"):
        pytest.skip("segviz infer is not available")
    model = tmp_path / "damaged.segviz"
    model.write_bytes(b"not a bundle")
    volume = tmp_path / "ct.nii.gz"
    volume.write_bytes(b"")
    job = InferenceJob(
        infer_command(model, volume, tmp_path / "out.nii.gz", "cpu", python=sys.executable),
        output=tmp_path / "out.nii.gz",
    )
    job.start()
    status = _poll_until(job, lambda s: not s.active, timeout=120)
    assert status.state == InferenceState.FAILED
    assert "damaged.segviz" in status.message or "bundle" in status.message.lower()


@pytest.mark.skipif(os.name == "nt", reason="process groups via POSIX sessions")
def test_real_cli_join_to_an_unreachable_superlink_ends_in_failed(tmp_path, totalseg_example):
    if not _cli_has("federation", "join", option="--superlink"):
        pytest.skip("segviz federation join is not available yet")
    import numpy as np
    import SimpleITK as sitk

    ct_path, labels_path = totalseg_example
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    (site / "labels").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(ct_path)), str(site / "images" / "case.nii.gz"))
    ts = sitk.ReadImage(str(labels_path))
    liver = sitk.GetImageFromArray((sitk.GetArrayFromImage(ts) == 5).astype(np.uint8))
    liver.CopyInformation(ts)
    sitk.WriteImage(liver, str(site / "labels" / "case.nii.gz"))
    (site / "site.json").write_text(
        json.dumps({"name": "site-a", "organs": ["liver"], "labels": {"1": "liver"}}), encoding="utf-8"
    )
    superlink = f"127.0.0.1:{_free_port()}"
    job = FederationJob(
        join_command(superlink, site, insecure=True, python=sys.executable), superlink=superlink, connect_timeout=120.0
    )
    job.start()
    status = _poll_until(job, lambda s: not s.active, timeout=240)
    assert status.state == FederationState.FAILED, status.log[-10:]
    assert superlink in status.message or "connect" in status.message.lower() or "reach" in status.message.lower(), (
        status.message
    )
    assert "no cases" not in status.message
    _poll_until(job, lambda s: job.process.returncode is not None, timeout=30)
