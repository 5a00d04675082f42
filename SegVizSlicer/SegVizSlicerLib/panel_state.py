"""The panel's state machines, driven by ``--progress json`` events and process exits.

Federated training::

    idle ──join──► joining ──round_started/epoch/update_sent──► training ──run_finished, then exit 0──► finished
                      │                                            │
                      ├──── error event / non-zero exit ───────────┴──► failed
                      └──── leave (user) ──────────────────────────────► left

After ``run_finished`` the SuperNode still owes the coordinator its last reply (FedBN shares each
site's BatchNorm once at the end), so the state stays ``training`` until the child exits by itself.

Inference::

    idle ──apply──► running ──done / exit 0──► done
                       ├──── error / non-zero exit ──► failed
                       └──── cancel (user) ──────────► cancelled

Terminal states accept a new start. Pure Python: no Qt, no subprocess; ``job.py`` feeds it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["FederationState", "FederationStatus", "InferenceState", "InferenceStatus", "StateError"]

_LOG_LINES = 500
# "error: ..." (segviz) or "segviz: error: ..." (argparse usage errors).
_ERROR_LINE = re.compile(r"^(?:[\w.\-]+: )?error:\s*(?P<message>.+)$", re.IGNORECASE)


class StateError(RuntimeError):
    """A transition the state machine does not allow (e.g. joining while training)."""


class FederationState(str, Enum):
    IDLE = "idle"
    JOINING = "joining"
    TRAINING = "training"
    FINISHED = "finished"
    FAILED = "failed"
    LEFT = "left"


class InferenceState(str, Enum):
    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_FED_ACTIVE = (FederationState.JOINING, FederationState.TRAINING)
_INF_ACTIVE = (InferenceState.RUNNING,)


def _exit_message(returncode: int, stderr_tail: list[str]) -> str:
    """The most useful one-line reason a child ended: its ``error:`` line, else its last words."""
    for line in reversed(stderr_tail):
        match = _ERROR_LINE.match(line.strip())
        if match:
            return match.group("message").strip()
    last = next((ln.strip() for ln in reversed(stderr_tail) if ln.strip()), "")
    if returncode < 0:
        reason = f"was killed by signal {-returncode}"
    else:
        reason = f"exited with code {returncode}"
    return f"the SegViz process {reason}" + (f": {last}" if last else "")


@dataclass
class FederationStatus:
    """What the federated-training section shows."""

    state: FederationState = FederationState.IDLE
    superlink: str = ""
    connected: bool = False
    waiting_message: str = ""
    round: int = 0
    rounds: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    global_dice: dict[str, float] = field(default_factory=dict)
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    run_finished: bool = False
    round_started_at: float | None = None
    """``time.monotonic()`` when the current round started (its local training)."""
    last_round_seconds: float | None = None
    """How long the last finished round took, from its start here to the coordinator's result."""
    log: list[str] = field(default_factory=list)
    log_total: int = 0
    _leaving: bool = False

    def round_seconds(self, now: float | None = None) -> float | None:
        """Seconds the current round has taken so far (None between rounds)."""
        if self.round_started_at is None:
            return None
        return max(0.0, (time.monotonic() if now is None else now) - self.round_started_at)

    @property
    def active(self) -> bool:
        """A SuperNode is (or should be) running."""
        return self.state in _FED_ACTIVE

    def add_log(self, line: str) -> None:
        """Append a line to the panel's log (bounded; a line repeated at once is kept once)."""
        line = line.rstrip()
        if self.log and self.log[-1] == line:
            return
        self.log.append(line)
        self.log_total += 1
        del self.log[:-_LOG_LINES]

    def start(self, superlink: str) -> None:
        """Join: idle/finished/failed/left → joining."""
        if self.active:
            raise StateError(f"already {self.state.value}: leave before joining again")
        log, log_total = self.log, self.log_total
        self.__init__(state=FederationState.JOINING, superlink=superlink, log=log, log_total=log_total)  # type: ignore[misc]
        self.message = f"Joining the federation at {superlink}…"
        self.add_log(self.message)

    def request_leave(self) -> None:
        """The user pressed Leave; the state becomes ``left`` when the process has ended."""
        if self.active:
            self._leaving = True
            self.message = "Leaving the federation…"
            self.add_log(self.message)

    def finish(self) -> None:
        """Mark the federation finished (the child has exited after the run, or was told to)."""
        if self.active:
            self.state = FederationState.FINISHED
            self.message = "The federation finished" + (f" after {self.rounds} rounds" if self.rounds else "")
            self.add_log(self.message)

    def fail(self, message: str) -> None:
        """Fail from any active state with a message for the person at the panel."""
        if self.active:
            self.state = FederationState.FAILED
            self.message = message
            self.add_log(f"error: {message}")

    def apply_event(self, event: dict[str, Any], now: float | None = None) -> None:
        """Move the state with one progress event (see ``SegVizLogic.progress``).

        Args:
            event: the event.
            now: ``time.monotonic()`` when it arrived (for the round timer).
        """
        if not self.active:
            return
        now = time.monotonic() if now is None else now
        kind = event.get("event")
        if kind == "connected":
            self.connected = True
            self.superlink = str(event.get("superlink") or self.superlink)
            self.message = f"Connected to {self.superlink}; waiting for a round"
        elif kind == "waiting":
            self.waiting_message = str(event.get("message", ""))
            self.message = self.waiting_message or "Waiting for the next round"
        elif kind == "round_started":
            self.state = FederationState.TRAINING
            self.connected = True
            self.round = int(event.get("round", self.round + 1))
            self.rounds = int(event.get("rounds", self.rounds) or 0)
            self.epoch = 0
            self.round_started_at = now
            self.message = f"Round {self.round} of {self.rounds or '?'}: training locally"
        elif kind == "epoch":
            self.state = FederationState.TRAINING
            self.epoch = int(event.get("epoch", 0))
            self.epochs = int(event.get("epochs", self.epochs) or 0)
            self.loss = _float(event.get("loss"))
        elif kind == "update_sent":
            self.state = FederationState.TRAINING
            self.message = f"Round {event.get('round', self.round)}: update sent ({event.get('num_examples', '?')} cases); waiting for the global model"
        elif kind == "round_finished":
            self.state = FederationState.TRAINING
            self.round = int(event.get("round", self.round))
            self.rounds = int(event.get("rounds", self.rounds) or 0)
            dice = _dice_of(event.get("metrics") or {})
            if dice:
                self.global_dice = dice
            if self.round_started_at is not None:
                self.last_round_seconds = now - self.round_started_at
                self.round_started_at = None
            self.message = f"Round {self.round} of {self.rounds or '?'} finished"
        elif kind in ("run_finished", "done"):
            self.state = FederationState.TRAINING
            self.run_finished = True
            self.outputs = {str(k): str(v) for k, v in (event.get("outputs") or {}).items()}
            self.rounds = int(event.get("rounds") or self.rounds or 0)
            self.message = "The federated run finished; sending the last reply before leaving"
        elif kind == "error":
            self.fail(str(event.get("message", "the SegViz process reported an error")))
            return
        elif kind == "stage" and event.get("message"):
            self.message = str(event["message"])
        self.add_log(_describe(event))

    def process_exited(self, returncode: int, stderr_tail: list[str] | None = None) -> None:
        """The SuperNode process has ended with ``returncode``."""
        stderr_tail = stderr_tail or []
        if self._leaving:
            self._leaving = False
            if self.active:
                self.state = FederationState.LEFT
                self.message = "Left the federation"
                self.add_log(self.message)
            return
        if not self.active:
            return
        if returncode == 0:
            self.finish()
        else:
            self.fail(_exit_message(returncode, stderr_tail))


@dataclass
class InferenceStatus:
    """What the apply-model section shows."""

    state: InferenceState = InferenceState.IDLE
    stage: str = ""
    current: int = 0
    total: int = 0
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    _cancelling: bool = False

    @property
    def active(self) -> bool:
        return self.state in _INF_ACTIVE

    @property
    def fraction(self) -> float | None:
        """Progress in [0, 1], or None when the current stage has no count."""
        if self.state == InferenceState.DONE:
            return 1.0
        return min(1.0, self.current / self.total) if self.total else None

    def start(self) -> None:
        if self.active:
            raise StateError("inference is already running")
        self.__init__(state=InferenceState.RUNNING, message="Starting…")  # type: ignore[misc]

    def request_cancel(self) -> None:
        if self.active:
            self._cancelling = True
            self.message = "Cancelling…"

    def fail(self, message: str) -> None:
        if self.active:
            self.state = InferenceState.FAILED
            self.message = message
            self.log.append(f"error: {message}")

    def finish(self, message: str) -> None:
        """Mark done (the result is loaded)."""
        self.state = InferenceState.DONE
        self.message = message

    def apply_event(self, event: dict[str, Any]) -> None:
        if not self.active:
            return
        kind = event.get("event")
        if kind == "stage":
            self.stage = str(event.get("stage", ""))
            self.message = str(event.get("message") or self.stage)
            self.current, self.total = 0, 0
        elif kind == "progress":
            self.stage = str(event.get("stage", self.stage))
            self.current = int(event.get("current", 0) or 0)
            self.total = int(event.get("total", 0) or 0)
            self.message = f"{self.stage} {self.current}/{self.total or '?'}"
        elif kind == "done":
            self.outputs = {str(k): str(v) for k, v in (event.get("outputs") or {}).items()}
            self.message = "Inference finished; loading the result"
        elif kind == "error":
            self.fail(str(event.get("message", "inference failed")))
            return
        self.log.append(_describe(event))

    def process_exited(self, returncode: int, stderr_tail: list[str] | None = None) -> None:
        """The inference process ended. Exit 0 leaves ``running`` for the caller to load the
        result and call ``finish``; anything else ends in failed or cancelled."""
        if self._cancelling:
            self._cancelling = False
            if self.active:
                self.state = InferenceState.CANCELLED
                self.message = "Cancelled"
            return
        if self.active and returncode != 0:
            self.fail(_exit_message(returncode, stderr_tail or []))


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _dice_of(metrics: dict[str, Any]) -> dict[str, float]:
    """Dice values from round metrics: ``{"dice": {...}}``, ``{"dice_liver": x}``, ``{"dice": x}``."""
    nested = metrics.get("dice")
    if isinstance(nested, dict):
        return {str(k): float(v) for k, v in nested.items() if _float(v) is not None}
    out = {}
    for key, value in metrics.items():
        if "dice" in str(key).lower() and _float(value) is not None:
            organ = str(key).lower().replace("global_", "").replace("dice", "").strip("_-: ") or "mean"
            out[organ] = float(value)
    return out


def _describe(event: dict[str, Any]) -> str:
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time"))
    return f"{event.get('event')} {fields}".rstrip()
