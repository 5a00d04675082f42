"""The warm ClientApp launcher: Flower's ``flwr-clientapp`` forked from a process that imported it once.

Real processes: the launcher, the ``flwr-clientapp`` script the SuperExec would find on its PATH,
Flower's own entry point, signals and exit codes. (The launcher in a whole federation:
test_federated_deployment.py.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from SegVizLogic.federated.clientapp_launcher import (
    REQUEST_TIMEOUT,
    ClientAppLauncher,
    launcher_supported,
    write_clientapp_command,
)
from SegVizLogic.federated.processes import flower_environment

pytestmark = pytest.mark.skipif(not launcher_supported(), reason="the launcher needs fork and Unix sockets")


def _launches(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "ClientApp process" in line]


def _call(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, **kwargs)


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_flowers_clientapp_runs_forked_from_the_launcher(tmp_path):
    launcher = ClientAppLauncher(tmp_path / "state", flower_environment(tmp_path / "flwr-home"))
    try:
        command = str(launcher.bin_dir / "flwr-clientapp")
        helped = _call([command, "--help"], cwd=tmp_path)
        wrong = _call([command, "--bogus"], cwd=tmp_path)
        _wait_for(lambda: len([x for x in _launches(launcher.log_path) if "exited" in x]) == 2)
    finally:
        launcher.close()
    # Flower's own argument parser answered, on the caller's streams, with its exit codes.
    assert helped.returncode == 0 and helped.stdout.startswith("usage: flwr-clientapp")
    assert "--runtime-api-address" in helped.stdout
    assert wrong.returncode == 2 and "flwr-clientapp: error:" in wrong.stderr
    # ... from processes the launcher forked, not from the real flwr-clientapp.
    lines = _launches(launcher.log_path)
    assert [line.split()[0] for line in lines] == ["started", "ClientApp", "started", "ClientApp"]
    assert "exited with 0" in lines[1] and "exited with 2" in lines[3]
    # close() removed the socket's private folder and the command; the launcher ended.
    assert launcher.process.poll() is not None
    assert not launcher.socket_path.parent.exists() and not launcher.bin_dir.exists()


def _custom_launcher(tmp_path: Path, entry_source: str) -> tuple[subprocess.Popen, Path, Path]:
    """A launcher serving ``entry`` (defined in ``entry_source``) and the command in front of it."""
    sock = Path(os.path.realpath("/tmp")) / f"segviz-test-{os.getpid()}-{time.monotonic_ns()}.sock"
    code = (
        textwrap.dedent(entry_source)
        + f"\nfrom SegVizLogic.federated.clientapp_launcher import serve\nserve({str(sock)!r}, entry=entry)\n"
    )
    log = tmp_path / "launcher.log"
    with open(log, "wb") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-c", code], stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path)
    _wait_for(sock.exists)
    real = tmp_path / "real-clientapp"
    real.write_text('#!/bin/sh\necho "real $*"\nexit 7\n')
    real.chmod(0o700)
    return process, sock, write_clientapp_command(tmp_path / "bin", sock, real)


def test_child_takes_the_callers_arguments_directory_environment_and_streams(tmp_path):
    process, sock, command = _custom_launcher(
        tmp_path,
        """
        import os, sys
        def entry():
            print("argv", sys.argv[1:], "cwd", os.getcwd(), "flag", os.environ.get("SEGVIZ_TEST_FLAG"))
            print("to stderr", file=sys.stderr)
            return 5
        """,
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        done = _call(
            [str(command), "--token", "abc", "two words"], cwd=workdir, env={**os.environ, "SEGVIZ_TEST_FLAG": "on"}
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert done.returncode == 5
    assert done.stdout.strip() == f"argv ['--token', 'abc', 'two words'] cwd {workdir} flag on"
    assert done.stderr.strip() == "to stderr"
    assert not sock.exists(), "the launcher removes its socket when it stops"


def test_signals_reach_the_child_and_its_exit_is_the_callers(tmp_path):
    process, _sock, command = _custom_launcher(
        tmp_path,
        """
        import time
        def entry():
            print("running", flush=True)
            time.sleep(60)
        """,
    )
    try:
        caller = subprocess.Popen([str(command)], stdout=subprocess.PIPE, text=True)
        assert caller.stdout.readline().strip() == "running"
        started = time.monotonic()
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 10
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert "exited with 143" in (tmp_path / "launcher.log").read_text()


def test_without_a_launcher_the_real_flwr_clientapp_runs(tmp_path):
    process, sock, command = _custom_launcher(tmp_path, "def entry():\n    return 0\n")
    process.terminate()
    process.wait(timeout=10)
    assert not sock.exists()
    done = _call([str(command), "--token", "t"])
    assert (done.returncode, done.stdout.strip()) == (7, "real --token t")
    # A socket file left by a launcher that was killed hard: nobody listens, the real one runs too.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    try:
        done = _call([str(command), "x"])
    finally:
        sock.unlink()
    assert (done.returncode, done.stdout.strip()) == (7, "real x")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts the launcher's descriptors in /proc")
def test_a_malformed_request_is_refused_and_the_launcher_keeps_serving(tmp_path):
    process, sock, command = _custom_launcher(tmp_path, "def entry():\n    return 3\n")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(str(sock))
            bad.sendall(b"\x00\x00\x00\x05hello")  # no standard streams, not JSON
            assert bad.recv(100) == b""  # closed without starting anything
        baseline = len(os.listdir(f"/proc/{process.pid}/fd"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as streams_but_no_json:
            streams_but_no_json.connect(str(sock))
            socket.send_fds(streams_but_no_json, [b"\x00\x00\x00\x03{{{"], [0, 1, 2])
            assert streams_but_no_json.recv(100) == b""
        assert len(os.listdir(f"/proc/{process.pid}/fd")) == baseline  # the passed streams were closed
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(str(sock))  # sends nothing: dropped after REQUEST_TIMEOUT, not forever
            started = time.monotonic()
            done = _call([str(command)])
            waited = time.monotonic() - started
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert done.returncode == 3 and waited < REQUEST_TIMEOUT + 5
    log = (tmp_path / "launcher.log").read_text()
    assert "refused a launch request: expected 3 standard streams, got 0" in log
    assert "refused a launch request: timed out" in log
    assert "refused a launch request: Expecting property name" in log
    assert log.count("started ClientApp process") == 1


def test_the_socket_is_private_to_its_user(tmp_path):
    launcher = ClientAppLauncher(tmp_path / "state", flower_environment(tmp_path / "flwr-home"))
    try:
        assert launcher.socket_path.stat().st_mode & 0o777 == 0o600
        assert launcher.socket_path.parent.stat().st_mode & 0o777 == 0o700
        assert (launcher.bin_dir / "flwr-clientapp").stat().st_mode & 0o777 == 0o700
    finally:
        launcher.close()


def test_the_launcher_leaves_with_its_parent_and_takes_its_folder(tmp_path):
    """A join killed with SIGKILL cannot clean up: its launcher notices and removes its own socket and folder."""
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from SegVizLogic.federated.clientapp_launcher import ClientAppLauncher
        from SegVizLogic.federated.processes import flower_environment
        launcher = ClientAppLauncher(Path({str(tmp_path / "state")!r}), flower_environment())
        print(launcher.socket_path, launcher.process.pid, flush=True)
        time.sleep(120)
        """
    )
    join = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    socket_path, _pid = join.stdout.readline().split()
    assert Path(socket_path).exists()
    join.kill()
    join.wait(timeout=10)
    _wait_for(lambda: not Path(socket_path).parent.exists(), timeout=10)  # its last act before it exits
