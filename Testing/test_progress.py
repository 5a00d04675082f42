"""Progress events at a steady rate in JSON mode: throttled for short steps, a heartbeat with the
remaining time for long ones."""

from __future__ import annotations

import io
import threading
import time

import pytest

from SegVizLogic import progress
from SegVizLogic.progress import ProgressReporter, parse_progress_line


def _events(stream: io.StringIO) -> list[dict]:
    return [e for e in map(parse_progress_line, stream.getvalue().splitlines()) if e]


def test_many_short_steps_are_throttled_and_the_last_is_reported():
    stream = io.StringIO()
    reporter = ProgressReporter("json", stream=stream)
    start = time.monotonic()
    with reporter.task("preprocess", total=2000) as advance:
        for _ in range(2000):
            advance(1)
    seconds = time.monotonic() - start
    events = _events(stream)
    # one per 0.25 s at most (plus the first and the last), not 2000 lines
    assert 2 <= len(events) <= seconds / progress._SteadyProgress.MIN_INTERVAL + 3
    assert events[-1]["current"] == 2000 and events[-1]["remaining_s"] == 0.0


def test_a_long_step_gets_heartbeats_with_elapsed_and_remaining_time(monkeypatch):
    monkeypatch.setattr(progress._SteadyProgress, "HEARTBEAT", 0.2)
    stream = io.StringIO()
    reporter = ProgressReporter("json", stream=stream)
    with reporter.task("train", total=4) as advance:
        advance(1, loss=0.5)
        time.sleep(1.0)  # one long step: the heartbeat keeps reporting
        advance(1)
    events = _events(stream)
    assert len(events) >= 4, events
    beats = [e for e in events if e["current"] == 1][1:]
    assert beats and all(e["elapsed_s"] > 0 and e["remaining_s"] is not None for e in beats)
    assert beats[-1]["remaining_s"] == pytest.approx(3 * beats[-1]["elapsed_s"], abs=0.2)  # 3 steps left at this pace
    assert all(e["loss"] == 0.5 for e in beats)  # the last fields ride along
    assert events[-1]["current"] == 2
    count = len(events)
    time.sleep(0.5)
    assert len(_events(stream)) == count  # the heartbeat ends with the task


def test_none_mode_reports_nothing():
    reporter = ProgressReporter("none")
    with reporter.task("x", total=3) as advance:
        advance(3)
    assert not any(t.name.startswith("segviz-progress") for t in threading.enumerate())
