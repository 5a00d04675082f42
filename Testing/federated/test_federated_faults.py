"""Faults of a real federation on 127.0.0.1, with the real processes (`segviz federation
superlink / join / run`, Flower's SuperLink, SuperNodes, SuperExecs and apps): a killed join
leaves nothing running, a site folder takes one join, a site that drops out costs its round
seconds, an interrupted join tells the coordinator and exits non-zero, a SuperLink restart
does not lose the run, and a SuperLink that stays away ends `run` with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from federated_tiny import TINY_NETWORK

from SegVizLogic.bundle import load_bundle
from SegVizLogic.federated.client_app import WORKER_FILE
from SegVizLogic.federated.processes import free_port
from SegVizLogic.federated.site_node import join_federation
from SegVizLogic.federated.task import local_state_dir
from SegVizLogic.progress import ProgressReporter, parse_progress_line

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="walks /proc for the process tree")

ENV = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
TINY_RUN = [
    "--local-epochs",
    "1",
    "--channels",
    ",".join(map(str, TINY_NETWORK.channels)),
    "--patch",
    "32,32,16",
    "--batch-size",
    "2",
    "--samples-per-case",
    "8",
    "--spacing",
    "6",
    "--progress",
    "json",
]


def _segviz(*args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "SegVizLogic.cli", *args],
        stdout=out,
        stderr=subprocess.STDOUT if log else subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        env=ENV,
    )


def _superlink(address: str, control: str, state: Path, log: Path) -> subprocess.Popen:
    """``segviz federation superlink``: the sites' Fleet address, its loopback Control API at ``control``
    (where ``run`` submits), and its app registry on a free port; ready once it says so."""
    process = _segviz(
        "federation", "superlink", "--address", address, "--control-address", control, "--app-registry-port",
        str(free_port()), "--insecure", "--state-dir", str(state), log=log,
    )  # fmt: skip
    _wait(
        lambda: "SuperLink ready" in log.read_text(encoding="utf-8"),
        90,
        f"the SuperLink did not start: {log.read_text(encoding='utf-8')[-2000:]}",
    )
    return process


def _join(address: str, site: Path, log: Path) -> subprocess.Popen:
    return _segviz(
        "federation", "join", "--superlink", address, "--site", str(site), "--insecure", "--device", "cpu",
        "--progress", "json", log=log,
    )  # fmt: skip


def _wait(predicate, timeout: float, message: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, message
        time.sleep(0.2)
    return time.monotonic() - started


def _events(path: Path) -> list[dict]:
    try:
        return [e for e in map(parse_progress_line, path.read_text(encoding="utf-8").splitlines()) if e]
    except FileNotFoundError:
        return []


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (children listed by the kernel, recursively)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text(encoding="utf-8").split()
        except OSError:
            continue
        for child in map(int, children):
            found |= {child} | _descendants(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    """The pids that still run (a zombie waiting to be reaped has finished)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _kill_flower_superlink(cli: subprocess.Popen) -> None:
    """``kill -9`` the ``flower-superlink`` under ``segviz federation superlink`` (a crash, not
    a stop: nothing of Flower's runs on the way out); the command then ends by itself."""
    (pid,) = [p for p in _descendants(cli.pid) if b"flower-superlink" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(pid, signal.SIGKILL)
    assert cli.wait(timeout=60) != 0


def _stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_one_join_per_site_nothing_outlives_a_killed_join_and_run_says_when_the_superlink_is_gone(make_sites, tmp_path):
    (site,) = make_sites(["site-liver"])
    address, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    link = _superlink(address, control, tmp_path / "link", tmp_path / "superlink.out")
    first = _join(address, site, tmp_path / "join1.out")
    run = None
    try:
        _wait(lambda: any(e["event"] == "connected" for e in _events(tmp_path / "join1.out")), 90, "no connection")
        tree = _descendants(first.pid)
        assert len(tree) >= 2, tree  # the SuperNode (on its lifeline) and its SuperExec

        second = subprocess.run(
            [sys.executable, "-m", "SegVizLogic.cli", "federation", "join", "--superlink", address, "--site",
             str(site), "--insecure", "--connect-timeout", "20"],
            capture_output=True, text=True, encoding="utf-8", timeout=120, env=ENV, check=False,
        )  # fmt: skip
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already takes part in a federation" in lines[0], second.stderr
        assert f"pid {first.pid}" in lines[0]

        first.kill()  # SIGKILL: no handler of the join runs
        first.wait()
        seconds = _wait(lambda: not _alive(tree), 10, f"still running 10 s after kill -9: {_alive(tree)}")
        print(f"kill -9 of the join: its {len(tree)} descendants gone after {seconds:.1f} s")
        # Its SuperNode signed off on the way out: the SuperLink saw the node leave.
        _wait(
            lambda: "DeactivateNode" in (tmp_path / "link" / "superlink.log").read_text(encoding="utf-8"),
            10,
            "no sign-off",
        )
        assert (local_state_dir(site) / WORKER_FILE).exists()  # the killed join could not clean up...

        stop = threading.Event()

        class StopWhenConnected(ProgressReporter):
            def emit(self, event, **fields):
                if event == "connected":
                    stop.set()

        # ...and neither its lock nor its stale worker file stops the next join.
        assert join_federation(address, site, insecure=True, reporter=StopWhenConnected("none"), stop=stop) == 0
        assert not (local_state_dir(site) / WORKER_FILE).exists()

        # A run that cannot go on says so in one line, however long it was told to wait.
        run = _segviz(
            "federation", "run", "--superlink", control, "--insecure", "--out", str(tmp_path / "out"),
            "--rounds", "2", "--min-clients", "3", "--wait-timeout", "600", "--superlink-grace", "15", *TINY_RUN,
        )  # fmt: skip
        _wait(lambda: (tmp_path / "out" / "progress.jsonl").exists() or run.poll() is not None, 120, "no run")
        _kill_flower_superlink(link)
        killed = time.monotonic()
        stdout, stderr = run.communicate(timeout=120)
        took = time.monotonic() - killed
        print(f"SuperLink killed: `run` gave up after {took:.1f} s")
        assert run.returncode == 2 and took < 60, (took, stderr)
        errors = [e for e in map(parse_progress_line, stdout.splitlines()) if e and e["event"] == "error"]
        assert len(errors) == 1 and "has not answered" in errors[0]["message"], stdout[-2000:]
        assert len(stderr.strip().splitlines()) == 1, stderr
    finally:
        _stop(*(p for p in (run, first, link) if p is not None))


def test_run_survives_dropouts_and_a_superlink_restart(make_sites, tmp_path):
    """4 sites, 3 rounds, min-clients 2. Round 2: the kidney join is killed (kill -9) and the
    pancreas join interrupted (SIGINT) mid-round; the round completes with the other two in
    seconds and names both. Round 3: the SuperLink is killed and restarted on its database;
    `run` continues the run from round-002.segviz and writes model.segviz."""
    sites = make_sites(["site-liver", "site-spleen", "site-pancreas", "site-kidney"])
    address, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "link", tmp_path / "out"
    progress = out / "progress.jsonl"
    link = _superlink(address, control, state, tmp_path / "superlink.out")
    joins = {s.name: _join(address, s, tmp_path / f"{s.name}.out") for s in sites}
    run = None
    try:
        for name in joins:
            _wait(
                lambda n=name: any(e["event"] == "connected" for e in _events(tmp_path / f"{n}.out")),
                180,
                f"{name} did not connect: {(tmp_path / f'{name}.out').read_text(encoding='utf-8')[-2000:]}",
            )
        started = time.monotonic()
        run = _segviz(
            "federation", "run", "--superlink", control, "--insecure", "--out", str(out), "--rounds", "3",
            "--min-clients", "2", "--round-timeout", "600", "--wait-timeout", "120", *TINY_RUN,
            log=tmp_path / "run.out",
        )  # fmt: skip

        def site_in_round(name: str, server_round: int) -> bool:
            events = _events(local_state_dir(sites[[s.name for s in sites].index(name)]) / "events.jsonl")
            return any(e["event"] == "round_started" and e.get("round") == server_round for e in events)

        kidney_tree: set[int] = set()
        pending = {"site-kidney", "site-pancreas"}

        def drop_as_they_start_round_2() -> bool:
            for name in [n for n in pending if site_in_round(n, 2)]:
                pending.discard(name)
                if name == "site-kidney":
                    kidney_tree.update(_descendants(joins[name].pid))
                    joins[name].kill()  # a crash: nothing of the join runs
                else:
                    joins[name].send_signal(signal.SIGINT)  # Ctrl-C, Slicer's Leave
            return not pending

        _wait(drop_as_they_start_round_2, 300, "round 2 did not start at both sites")
        joins["site-kidney"].wait()
        assert _wait(lambda: not _alive(kidney_tree), 10, f"kidney's processes outlived it: {_alive(kidney_tree)}") < 10
        assert joins["site-pancreas"].wait(timeout=60) != 0
        pancreas_out = (tmp_path / "site-pancreas.out").read_text(encoding="utf-8")
        assert "left the federation during round 2" in pancreas_out, pancreas_out[-2000:]

        def finished(server_round: int) -> list[dict]:
            return [e for e in _events(progress) if e["event"] == "round_finished" and e["round"] == server_round]

        round_2 = _wait(lambda: finished(2), 300, "round 2 did not finish")
        print(f"round 2 finished {round_2:.1f} s after two of four sites dropped out (round timeout 600 s)")
        assert round_2 < 60
        dropped = {e["site"]: e["reason"] for e in _events(progress) if e["event"] == "site_dropped"}
        assert set(dropped) == {"site-kidney", "site-pancreas"} and all("disconnected" in r for r in dropped.values())
        assert finished(2)[0]["metrics"]["num_examples"] == 2  # liver and spleen

        _wait(lambda: any(e["event"] == "round_started" and e["round"] == 3 for e in _events(progress)), 120, "r3")
        time.sleep(2)
        _kill_flower_superlink(link)  # mid-round 3: the run's ServerApp goes with it
        link = _superlink(address, control, state, tmp_path / "superlink2.out")
        assert run.wait(timeout=400) == 0, (tmp_path / "run.out").read_text(encoding="utf-8")[-3000:]
        print(f"run finished {time.monotonic() - started:.0f} s after it started, across a SuperLink restart")
    finally:
        _stop(*(p for p in (run, *joins.values(), link) if p is not None))

    for name in ("site-liver", "site-spleen"):  # the joins said so and carried on
        said = [e["event"] for e in _events(tmp_path / f"{name}.out") if e["event"] in ("reconnecting", "connected")]
        # A SuperNode may not notice a quick restart at all (its next request just succeeds); when
        # the join did report the loss, it reported the reconnection after it. Either way the join
        # carried on: the run's last round (below) has this site's update.
        assert said[0] == "connected" and ("reconnecting" not in said[:-1] or "connected" in said[1:]), said
    run_events = _events(tmp_path / "run.out")
    resumed = [e for e in run_events if e["event"] == "stage" and e.get("stage") == "resume"]
    assert resumed and "round-002.segviz" in resumed[0]["message"], resumed
    model = load_bundle(out / "model.segviz")
    first = load_bundle(out / "round-001.segviz")
    assert model.provenance["round"] == 3 and model.provenance["rounds"] == 3
    assert model.provenance["lineage"] == first.provenance["lineage"]  # the same model, continued
    history = model.metrics["rounds"]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert set(history[1]["dropped"]) == {"site-kidney", "site-pancreas"}
    assert set(model.provenance["sites"]) == {"site-liver", "site-spleen", "site-pancreas", "site-kidney"}
    for name in ("site-liver", "site-spleen"):  # both trained round 3 from their own BatchNorm on disk
        saved = json.loads(
            (local_state_dir(sites[[s.name for s in sites].index(name)]) / "state.json").read_text(encoding="utf-8")
        )
        assert saved["round"] == 3 and saved["lineage"] == first.provenance["lineage"]
