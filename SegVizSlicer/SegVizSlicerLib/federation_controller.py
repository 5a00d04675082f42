"""Take part in federated training: every decision of the panel's "Federated training" section.

The widget only wires: it shows :meth:`FederationController.join_button`, calls
:meth:`~FederationController.join` / :meth:`~FederationController.leave`, shows what
:meth:`~FederationController.poll` returns on each timer tick, and before the module or Slicer
closes asks the question :meth:`~FederationController.close_question` gives.

The organ ticks are the site's declaration (written to ``site.json`` at Join), never derived from
what the scene holds; Join follows them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from SegVizLogic.organs import ORGAN_NAMES

from .inference_controller import ButtonView
from .job import FederationJob, join_command
from .panel_state import FederationState
from .site_export import declaration_problems, write_declaration

__all__ = [
    "CLOSE_QUESTION",
    "FederationController",
    "FederationPoll",
    "JoinRequest",
    "format_duration",
    "ticked_organs",
]

CLOSE_QUESTION = "Training is running: leave the federation?"


@dataclass(frozen=True)
class JoinRequest:
    """What Join round needs, as the panel holds it."""

    superlink: str
    site_dir: Path | None
    site_name: str
    organs: tuple[str, ...]
    root_certificate: str = ""
    insecure: bool = False
    trust_file: str = ""
    node_key: str = ""
    share_final_batchnorm: bool = False

    def problems(self) -> list[str]:
        """What is missing before this site can join, one line each (empty: ready)."""
        problems = []
        if not self.superlink.strip():
            problems.append("enter the SuperLink address (HOST:PORT) your coordinator gave you")
        if not self.site_name.strip():
            problems.append("give this site's name")
        if self.site_dir is None:
            problems.append("choose the site folder")
        if not self.organs:
            problems.append("tick the organs this site annotated")
        if not self.insecure and not self.root_certificate.strip():
            problems.append("choose the federation's root certificate (ca.crt)")
        for label, value in (
            ("root certificate", self.root_certificate if not self.insecure else ""),
            ("federation trust file", self.trust_file),
            ("node key", self.node_key),
        ):
            if value.strip() and not Path(value).expanduser().is_file():
                problems.append(f"the {label} {value} does not exist")
        return problems

    def argv(self, python: str | None = None) -> list[str]:
        """The ``segviz federation join`` command line (see :func:`.job.join_command`)."""
        return join_command(
            self.superlink,
            self.site_dir,
            root_cert=None if self.insecure else (str(Path(self.root_certificate).expanduser()) or None),
            insecure=self.insecure,
            trust=str(Path(self.trust_file).expanduser()) if self.trust_file.strip() else None,
            auth_key=str(Path(self.node_key).expanduser()) if self.node_key.strip() else None,
            share_final_batchnorm=self.share_final_batchnorm,
            python=python,
        )


@dataclass(frozen=True)
class FederationPoll:
    """What one timer tick shows in the federated-training section."""

    active: bool
    connection: str
    round: str
    epoch: str
    global_dice: str
    round_time: str
    progress: tuple[int, int, int]
    log_lines: tuple[str, ...] = ()
    dialog: str | None = None


def format_duration(seconds: float | None) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``; ``"–"`` for None."""
    if seconds is None:
        return "–"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class FederationController:
    """The federated-training section's decisions and the ``join`` job it runs.

    Args:
        python: interpreter for the child (default: PythonSlicer inside Slicer).
        connect_timeout: fail with a clear message when no connection comes within this many seconds.
    """

    def __init__(self, python: str | None = None, connect_timeout: float | None = 120.0) -> None:
        self.python = python
        self.connect_timeout = connect_timeout
        self.job: FederationJob | None = None
        self._dialog_shown = False
        self._log_shown = 0

    @property
    def active(self) -> bool:
        return self.job is not None and self.job.status.active

    def join_button(self, request: JoinRequest) -> ButtonView:
        """Leave while joined; otherwise Join round, enabled when nothing is missing (the tooltip
        says what is)."""
        if self.active:
            return ButtonView("Leave", True, "Stop taking part: ends the SuperNode and everything it started")
        problems = request.problems()
        if problems:
            return ButtonView("Join round", False, "To join: " + "; ".join(problems))
        return ButtonView("Join round", True, "Join the federation with the cases in this site's folder")

    def add_case_button(self, request: JoinRequest, has_case: bool, text: str = "Add") -> ButtonView:
        """A button that saves cases into the site folder ("Add", "Add all from scene", "Add to my
        site"): it needs a case, the site folder, its name and the ticks, and no run in progress
        (a case written mid-round would change what the round trains on)."""
        if self.active:
            return ButtonView(text, False, "Leave the federation before changing this site's cases")
        missing = []
        if not has_case:
            missing.append("a CT with its segmentation")
        if request.site_dir is None:
            missing.append("the site folder")
        if not request.site_name.strip():
            missing.append("the site name")
        if not request.organs:
            missing.append("the ticked organs this site annotated")
        if missing:
            return ButtonView(text, False, "Needs " + ", ".join(missing))
        return ButtonView(
            text, True, f"Save into {request.site_dir} with {', '.join(request.organs)} (unticked organs are left out)"
        )

    @staticmethod
    def review_button(has_result: bool) -> ButtonView:
        """ "Review in Segment Editor": once a result is loaded."""
        if not has_result:
            return ButtonView("Review in Segment Editor", False, "Apply the model first")
        return ButtonView(
            "Review in Segment Editor", True, "Open the result in the Segment Editor to check and correct it"
        )

    def join(self, request: JoinRequest) -> FederationJob:
        """Write the site's declaration and start ``segviz federation join``.

        Raises:
            RuntimeError: already joined.
            ValueError: what is missing, or why the site folder cannot train with these ticks.
        """
        if self.active:
            raise RuntimeError("This site is already in the federation: leave first.")
        problems = request.problems()
        if not problems:
            problems = declaration_problems(request.site_dir, request.organs)
        if problems:
            raise ValueError("Cannot join yet:\n" + "\n".join(f"- {p}" for p in problems))
        argv = request.argv(self.python)  # validates the address before anything is written
        write_declaration(request.site_dir, request.site_name, request.organs)
        self.job = FederationJob(
            argv, superlink=request.superlink.strip(), connect_timeout=self.connect_timeout, cwd=request.site_dir
        )
        self._dialog_shown, self._log_shown = False, 0
        self.job.start()
        return self.job

    def leave(self) -> None:
        """Ask ``join`` to leave (it tells the coordinator and stops its SuperNode); the whole
        process tree is ended after the grace period if it has not gone by then."""
        if self.job is not None:
            self.job.leave()

    def close_question(self) -> str | None:
        """The question to ask before the module or Slicer closes, or None when nothing runs."""
        return CLOSE_QUESTION if self.active else None

    def stop(self, timeout: float = 10.0) -> None:
        """Leave and wait until the process tree is gone (the person chose Leave on exit)."""
        if self.job is not None and (self.job.status.active or self.job.process.running):
            self.job.leave(timeout=timeout, wait=True)

    def poll(self, now: float | None = None) -> FederationPoll:
        """Advance the job and say what the section shows."""
        job = self.job
        if job is None:
            return FederationPoll(False, "Not joined", "–", "–", "–", "–", (0, 1, 0))
        status = job.poll()
        now = time.monotonic() if now is None else now
        connection = {
            FederationState.IDLE: "Not joined",
            FederationState.JOINING: (
                "Connected, waiting for the coordinator to start a round"
                if status.connected
                else f"Connecting to {status.superlink}…"
            ),
            FederationState.TRAINING: (
                "Run finished; sending the last reply…" if status.run_finished else "Connected, training"
            ),
            FederationState.FINISHED: "Finished: this site's part in the run is done",
            FederationState.FAILED: f"Failed: {status.message}",
            FederationState.LEFT: "Left the federation",
        }[status.state]
        if status.state in (FederationState.JOINING, FederationState.TRAINING) and job.process.stopping:
            connection = "Leaving the federation…"
        round_line = f"Round {status.round} of {status.rounds or '?'}" if status.round else "–"
        epoch_line = (
            f"Local epoch {status.epoch} of {status.epochs or '?'}, loss {status.loss:.4f}"
            if status.epoch and status.loss is not None
            else "–"
        )
        dice_line = (
            ", ".join(f"{organ} {dice:.3f}" for organ, dice in status.global_dice.items())
            if status.global_dice
            else "–"
        )
        running_for = status.round_seconds(now)
        if running_for is not None:
            round_time = f"{format_duration(running_for)} so far"
        elif status.last_round_seconds is not None:
            round_time = f"last round took {format_duration(status.last_round_seconds)}"
        else:
            round_time = "–"
        if status.rounds:
            progress = (0, status.rounds, min(status.round, status.rounds))
        elif status.active:
            progress = (0, 0, 0)
        else:
            progress = (0, 1, 1 if status.state == FederationState.FINISHED else 0)
        if not status.active:
            progress = (0, 1, 1 if status.state == FederationState.FINISHED else 0)
        new = min(status.log_total - self._log_shown, len(status.log))
        log_lines = tuple(status.log[len(status.log) - new :]) if new > 0 else ()
        self._log_shown = status.log_total
        dialog = None
        if status.state == FederationState.FAILED and not self._dialog_shown:
            self._dialog_shown = True
            dialog = f"Taking part in the federation failed:\n{status.message}"
        return FederationPoll(
            status.active or job.process.running,
            connection,
            round_line,
            epoch_line,
            dice_line,
            round_time,
            progress,
            log_lines,
            dialog,
        )


def ticked_organs(ticks: dict[str, bool]) -> tuple[str, ...]:
    """The ticked organs in schema order."""
    return tuple(name for name in ORGAN_NAMES if ticks.get(name))
