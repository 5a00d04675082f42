"""The panel's state machines move only as the design says, from progress events and exits."""

from __future__ import annotations

import pytest
from SegVizSlicerLib.panel_state import (
    FederationState,
    FederationStatus,
    InferenceState,
    InferenceStatus,
    StateError,
)

# (events, exit code or None, expected state) — a whole federation run as data.
FED_CASES = [
    ([], None, FederationState.JOINING),
    ([{"event": "connected", "superlink": "h:1"}], None, FederationState.JOINING),
    (
        [{"event": "connected", "superlink": "h:1"}, {"event": "round_started", "round": 1, "rounds": 3}],
        None,
        FederationState.TRAINING,
    ),
    # After run_finished the SuperNode still sends its last reply: finished only once it has exited.
    (
        [{"event": "round_started", "round": 3, "rounds": 3}, {"event": "run_finished", "rounds": 3, "outputs": {}}],
        None,
        FederationState.TRAINING,
    ),
    (
        [{"event": "round_started", "round": 3, "rounds": 3}, {"event": "run_finished", "rounds": 3, "outputs": {}}],
        0,
        FederationState.FINISHED,
    ),
    ([{"event": "error", "message": "SuperLink refused the certificate"}], None, FederationState.FAILED),
    ([{"event": "round_started", "round": 1, "rounds": 3}], 1, FederationState.FAILED),
    ([{"event": "round_started", "round": 1, "rounds": 3}], 0, FederationState.FINISHED),
]


@pytest.mark.parametrize("events, exit_code, expected", FED_CASES)
def test_federation_transitions(events, exit_code, expected):
    status = FederationStatus()
    status.start("h:1")
    for event in events:
        status.apply_event(event)
    if exit_code is not None:
        status.process_exited(exit_code, ["Traceback...", "error: something broke"])
    assert status.state == expected


def test_federation_round_epoch_and_dice_are_shown():
    status = FederationStatus()
    status.start("10.0.0.1:9092")
    status.apply_event({"event": "connected", "superlink": "10.0.0.1:9092"})
    assert status.connected and "10.0.0.1:9092" in status.message
    status.apply_event({"event": "round_started", "round": 2, "rounds": 5})
    status.apply_event({"event": "epoch", "epoch": 1, "epochs": 2, "loss": 0.75})
    status.apply_event(
        {
            "event": "round_finished",
            "round": 2,
            "rounds": 5,
            "metrics": {"dice_liver": 0.91, "dice_kidney": 0.8, "loss": 0.3},
        }
    )
    assert (status.round, status.rounds, status.epoch, status.epochs, status.loss) == (2, 5, 1, 2, 0.75)
    assert status.global_dice == {"liver": 0.91, "kidney": 0.8}
    status.apply_event({"event": "round_finished", "round": 3, "rounds": 5, "metrics": {"dice": {"spleen": 0.7}}})
    assert status.global_dice == {"spleen": 0.7}
    assert any("round_finished" in line for line in status.log)


def test_leave_ends_in_left_and_a_new_join_is_allowed():
    status = FederationStatus()
    status.start("h:1")
    with pytest.raises(StateError):
        status.start("h:1")
    status.request_leave()
    status.process_exited(-15)
    assert status.state == FederationState.LEFT
    status.start("h:2")
    assert status.state == FederationState.JOINING and status.round == 0 and status.superlink == "h:2"


def test_crash_message_prefers_the_error_line_then_the_last_words():
    status = FederationStatus()
    status.start("h:1")
    status.process_exited(2, ["noise", "error: site.json: no annotated organ", "trailing"])
    assert status.message == "site.json: no annotated organ"
    status.start("h:1")
    status.process_exited(-9, ["Segmentation fault"])
    assert "signal 9" in status.message and "Segmentation fault" in status.message


def test_events_after_a_terminal_state_change_nothing():
    status = FederationStatus()
    status.start("h:1")
    status.apply_event({"event": "error", "message": "boom"})
    status.apply_event({"event": "round_started", "round": 1, "rounds": 2})
    status.process_exited(0)
    assert status.state == FederationState.FAILED and status.message == "boom"


def test_inference_progress_done_failed_cancelled():
    status = InferenceStatus()
    status.start()
    status.apply_event({"event": "stage", "stage": "load", "message": "loading"})
    assert status.fraction is None and status.message == "loading"
    status.apply_event({"event": "progress", "stage": "sliding window", "current": 3, "total": 4})
    assert status.fraction == pytest.approx(0.75)
    status.apply_event({"event": "done", "outputs": {"labels": "/x.nii.gz"}})
    status.process_exited(0)
    assert status.state == InferenceState.RUNNING  # until the caller has loaded the result
    status.finish("4 organ segments loaded")
    assert status.state == InferenceState.DONE and status.fraction == 1.0

    status.start()
    status.process_exited(2, ["error: model.segviz: checksum mismatch"])
    assert status.state == InferenceState.FAILED and status.message == "model.segviz: checksum mismatch"

    status.start()
    status.request_cancel()
    status.process_exited(-15)
    assert status.state == InferenceState.CANCELLED


def test_argparse_usage_errors_give_their_message():
    status = FederationStatus()
    status.start("h:1")
    status.process_exited(2, ["usage: segviz [-h] COMMAND ...", "segviz: error: unrecognized arguments: join"])
    assert status.message == "unrecognized arguments: join"
