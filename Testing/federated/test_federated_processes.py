"""Process supervision's platform functions (processes.py): the lifeline watcher, the OS lock
that dies with its holder, and the Windows branches that must never reach for SIGKILL or
killpg."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from SegVizLogic.federated import processes
from SegVizLogic.federated.processes import (
    ExclusiveLock,
    LockHeld,
    interrupt_process_group,
    kill_process_group,
    process_group_kwargs,
    watch_lifeline,
)


def test_lifeline_fires_when_the_parent_end_closes_then_ends_hard_after_the_grace():
    read_end, write_end = os.pipe()
    gone, hard = threading.Event(), threading.Event()
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        watch_lifeline(stream, on_parent_gone=gone.set, grace=0.3, hard_exit=hard.set)
        time.sleep(0.3)
        assert not gone.is_set()  # the parent is alive: nothing happens
        os.close(write_end)  # what the OS does when the parent dies, however it dies
        assert gone.wait(5)
        assert not hard.is_set()
        assert hard.wait(5)


def test_lock_refuses_a_second_holder_names_the_first_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "state" / "join.lock"
    with ExclusiveLock(path, "join pid 1"):
        with pytest.raises(LockHeld) as held:
            ExclusiveLock(path, "join pid 2").__enter__()
        assert held.value.owner == "join pid 1"
    with ExclusiveLock(path, "join pid 3"):
        pass
    code = (
        "import time; from SegVizLogic.federated.processes import ExclusiveLock\n"
        f"lock = ExclusiveLock({str(path)!r}, 'crashing holder').__enter__(); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match="crashing holder"):
            ExclusiveLock(path).__enter__()
        holder.kill()  # no cleanup runs: the OS releases the lock
        holder.wait()
        with ExclusiveLock(path, "next"):
            assert path.read_text(encoding="utf-8") == "next"
    finally:
        holder.kill()


class _FakeProcess:
    pid = 4242

    def __init__(self) -> None:
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def poll(self):
        return None


def test_windows_branches_use_process_groups_ctrl_break_and_taskkill(monkeypatch):
    assert process_group_kwargs(windows=False) == {"start_new_session": True}
    assert process_group_kwargs(windows=True) == {"creationflags": 0x200}  # CREATE_NEW_PROCESS_GROUP

    def no_killpg(*args):
        raise AssertionError("os.killpg does not exist on Windows")

    calls: list[list[str]] = []
    monkeypatch.setattr(processes, "_WINDOWS", True)
    monkeypatch.setattr(os, "killpg", no_killpg)
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
    process = _FakeProcess()
    interrupt_process_group(process)
    kill_process_group(process)
    assert process.signals == [1]
    assert calls == [["taskkill", "/F", "/T", "/PID", "4242"]]
    assert processes.process_group_alive(process)


def test_posix_group_stop_reaches_every_process_of_the_group(tmp_path):
    if os.name == "nt":
        pytest.skip("POSIX process groups")
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    leader = subprocess.Popen([sys.executable, "-c", script], **process_group_kwargs())
    try:
        deadline = time.monotonic() + 30
        while len(_group_members(leader.pid)) < 2:
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.1)
        interrupt_process_group(leader)
        leader.wait(timeout=30)
        deadline = time.monotonic() + 10
        while processes.process_group_alive(leader) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_process_group(leader)
        assert not _group_members(leader.pid)
    finally:
        kill_process_group(leader)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def test_an_orphaned_process_ends_itself_after_the_grace(tmp_path):
    if os.name == "nt":
        pytest.skip("POSIX re-parenting")
    pid_file = tmp_path / "grandchild.pid"
    grandchild = (
        "import os, sys, time; from SegVizLogic.federated.processes import exit_when_orphaned\n"
        f"exit_when_orphaned(grace=0.5, poll=0.1); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)",
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text(encoding="utf-8")):
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.1)
        orphan = int(pid_file.read_text(encoding="utf-8"))
        time.sleep(1.0)
        assert Path(f"/proc/{orphan}").exists()  # its parent lives: it keeps running
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while (
            Path(f"/proc/{orphan}").exists()
            and "Z" not in Path(f"/proc/{orphan}/stat").read_text(encoding="utf-8").split(")")[-1][:3]
        ):
            assert time.monotonic() < deadline, "the orphan outlived its grace"
            time.sleep(0.1)
    finally:
        parent.kill()


def test_flower_processes_poll_for_apps_every_fifth_of_a_second_unless_told_otherwise(monkeypatch):
    """The SuperExec's poll interval reaches Flower, which reads it as 0.2 s (its default: 1 s)."""
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval

    from SegVizLogic.federated.processes import flower_environment

    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    env = flower_environment("/tmp/flwr-home")
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2" and env["FLWR_HOME"] == "/tmp/flwr-home"
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"])
    assert _get_task_poll_interval() == 0.2
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")
    assert flower_environment()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"  # an operator's choice stays


def test_supernode_waits_the_configured_interval_after_an_empty_pull_and_nothing_else_changes(monkeypatch):
    """Flower 1.42's node loop sleeps 3 s after an empty pull; SegViz's SuperNode sleeps 0.2 s there,
    while Flower's other waits (0.5 s for a reply) and clock functions stay Flower's."""
    from flwr.supernode import start_client_internal as node_loop

    monkeypatch.setattr(node_loop, "time", time)
    assert processes.shorten_supernode_pull(0.2) is True
    started = time.perf_counter()
    node_loop.time.sleep(3)
    empty_pull_wait = time.perf_counter() - started
    started = time.perf_counter()
    node_loop.time.sleep(0.3)
    other_wait = time.perf_counter() - started
    assert 0.19 <= empty_pull_wait < 0.6, empty_pull_wait
    assert 0.29 <= other_wait < 0.7, other_wait
    assert abs(node_loop.time.time() - time.time()) < 1.0 and node_loop.time.monotonic is time.monotonic
    with pytest.raises(ValueError, match="0.05-60 s"):
        processes.shorten_supernode_pull(0.0)
    assert processes.shorten_supernode_pull(0.2) is False  # already changed: not the loop it knows any more


def test_supernode_lifeline_reports_a_bad_pull_interval_and_keeps_flowers_pace(tmp_path):
    """The setting reaches the SuperNode's own process; a bad value is named on stderr, not fatal."""

    def supernode_help(interval: str) -> tuple[int, str, str]:
        env = processes.flower_environment(tmp_path, {"SEGVIZ_SUPERNODE_PULL_INTERVAL": interval})
        # Its own session, and the lifeline's pipe held open until it exits (a closed pipe ends the group).
        child = subprocess.Popen(
            processes.lifeline_command(["flower-supernode", "--help"]),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            child.wait(timeout=60)
            return child.returncode, child.stdout.read(), child.stderr.read()
        finally:
            child.kill()
            for stream in (child.stdin, child.stdout, child.stderr):
                stream.close()

    code, out, err = supernode_help("often")
    assert code == 0 and "usage" in out.lower()
    assert "SEGVIZ_SUPERNODE_PULL_INTERVAL='often' ignored" in err
    code, out, err = supernode_help("0.5")
    assert code == 0 and "usage" in out.lower()
    assert err.splitlines()[:2] == [
        "segviz: the SuperNode pulls every 0.5 s while it has no message",
        "segviz: the SuperNode sends a waiting reply even when no new message came",
    ]


def test_supernode_pushes_a_reply_that_waits_while_no_message_comes(monkeypatch):
    """Flower 1.42's node loop pushes only right after a pull found a message, and only until one reply
    went out; after a SuperLink restart a stale reply can take that turn and strand the new run's reply
    (a round that never finished in CI). With the shim, a pull that finds nothing but sees a waiting
    reply (without taking it) sends the loop on to push it, through Flower's own push."""
    from flwr.app import Metadata, RecordDict
    from flwr.app.message.message import make_message
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as node_loop
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    pulls = []
    monkeypatch.setattr(node_loop, "_pull_and_store_message", lambda **kwargs: pulls.append(kwargs) or None)
    assert processes.push_stranded_replies() is True
    assert processes.push_stranded_replies() is True  # already in place: not wrapped twice
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)

    def message(run_id: int, reply_to: str = ""):
        metadata = Metadata(
            run_id=run_id, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id=reply_to,
            group_id="", created_at=time.time(), ttl=3600, message_type="train",
        )  # fmt: skip
        made = make_message(metadata, RecordDict())
        node_loop._insert_message(made, state, store)  # Flower's own: the state, and the objects a push reads
        return made

    assert node_loop._pull_and_store_message(state=state) is None  # nothing pulled, nothing waiting
    received = message(7)
    assert node_loop._pull_and_store_message(state=state) is None  # a message being worked on: no reply yet
    reply = message(7, reply_to=received.metadata.message_id)
    assert node_loop._pull_and_store_message(state=state) == 7 and len(pulls) == 3
    sent = []
    node_loop._push_messages(
        state=state,
        object_store=store,
        send=lambda msg, tree, runtime: sent.append(msg.metadata.message_id) or (set(), "session"),
        push_object=lambda *args: None,
    )
    assert sent == [reply.metadata.message_id]
    assert node_loop._pull_and_store_message(state=state) is None and processes.waiting_reply_run(object()) is None
