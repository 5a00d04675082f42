"""Apply the global model: every decision of the panel's "Apply" section, without Qt.

The widget only wires: it asks :meth:`InferenceController.button` what the Apply button shows,
calls :meth:`~InferenceController.start` / :meth:`~InferenceController.cancel`, and on each timer
tick shows what :meth:`~InferenceController.poll` returns (progress, status line, at most one
error dialog per job, the loaded result).

Where the child reads the CT: the volume's own file when it has one that ``segviz infer`` reads
and it is unchanged since it was read; the DICOM series folder (with the series UID) when the
volume came from Slicer's DICOM database; otherwise a copy written to Slicer's temporary folder.
Everything written for a job is removed once its result is loaded, or when it fails or is
cancelled.

A runner starts the work. :class:`SubprocessRunner` starts one ``segviz infer`` child per job;
:class:`~SegVizSlicerLib.inference_worker.WorkerRunner` (the panel's) serves every job of the
session in one warm ``segviz serve`` worker, with the same ``start(request) -> job`` shape and a
``stop()`` for the module's cleanup.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .job import InferenceJob, infer_command
from .panel_state import InferenceState
from .site_export import safe_file_stem
from .volume_nodes import write_volume_node

__all__ = [
    "ButtonView",
    "InferenceController",
    "InferenceInput",
    "InferencePoll",
    "InferenceRequest",
    "InferenceRunner",
    "SubprocessRunner",
    "inference_input",
]

# Formats `segviz infer` reads as a single file (SegVizLogic.io).
_READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


@dataclass(frozen=True)
class ButtonView:
    """What a push button shows."""

    text: str
    enabled: bool
    tooltip: str


@dataclass(frozen=True)
class InferenceInput:
    """The CT file (or DICOM folder) ``segviz infer`` reads, and what to delete afterwards."""

    path: Path
    series_uid: str | None = None
    work_dir: Path = Path()
    """The job's own temporary folder (outputs, and the CT copy when one was needed)."""
    copied: bool = False


@dataclass(frozen=True)
class InferenceRequest:
    """One apply: which CT, which model, where its files go."""

    input: InferenceInput
    model: Path
    device: str = "auto"

    @property
    def output(self) -> Path:
        return self.input.work_dir / "organs.nii.gz"

    @property
    def stats(self) -> Path:
        return self.input.work_dir / "stats.json"


class InferenceRunner(Protocol):
    """Starts the work of one request and returns a job with ``poll()``, ``cancel()``,
    ``output_ready``, ``output`` and ``status`` (an :class:`InferenceStatus`)."""

    def start(self, request: InferenceRequest) -> InferenceJob: ...


class SubprocessRunner:
    """One ``segviz infer`` child per request.

    Args:
        python: the interpreter for the child (default: PythonSlicer inside Slicer).
    """

    def __init__(self, python: str | None = None) -> None:
        self.python = python

    def start(self, request: InferenceRequest) -> InferenceJob:
        job = InferenceJob(
            infer_command(
                request.model,
                request.input.path,
                request.output,
                request.device,
                request.stats,
                series_uid=request.input.series_uid,
                python=self.python,
            ),
            output=request.output,
            stats=request.stats,
            cwd=request.input.work_dir,
        )
        job.start()
        return job


def _own_file(volume_node) -> Path | None:
    """The file the volume was read from, if ``segviz infer`` reads it and the volume is unchanged."""
    storage = volume_node.GetStorageNode()
    if storage is None or not storage.GetFileName():
        return None
    if volume_node.GetModifiedSinceRead():
        return None
    path = Path(storage.GetFileName())
    if storage.GetNumberOfFileNames() > 0 or not path.is_file():  # a multi-file series, or gone
        return None
    if not path.name.lower().endswith(_READABLE_SUFFIXES):
        return None
    return path


def inference_input(
    volume_node,
    temp_root: str | Path,
    dicom_series: Callable[[list[str]], tuple[list[str], str | None]] | None = None,
) -> InferenceInput:
    """Decide (and if needed write) the file ``segviz infer`` reads for ``volume_node``.

    Args:
        volume_node: the CT.
        temp_root: where temporary folders go (``slicer.app.temporaryPath`` inside Slicer).
        dicom_series: maps the volume's DICOM instance UIDs to ``(their files, series UID)``
            (Slicer's DICOM database); None when there is no database.

    Raises:
        ValueError: the volume is under a transform (its file would not match what is shown).
    """
    if volume_node.GetParentTransformNode() is not None:
        raise ValueError(
            f"volume {volume_node.GetName()!r} is under a transform: harden it first (Data module, right-click)"
        )
    temp_root = Path(temp_root)
    temp_root.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"segviz-{safe_file_stem(volume_node.GetName())}-", dir=temp_root))
    try:
        uids = (volume_node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split()
        if uids and dicom_series is not None and not volume_node.GetModifiedSinceRead():
            files, series_uid = dicom_series(uids)
            folders = {Path(f).parent for f in files}
            if files and series_uid and len(folders) == 1 and all(Path(f).is_file() for f in files):
                return InferenceInput(folders.pop(), series_uid, work_dir)
        own = _own_file(volume_node)
        if own is not None:
            return InferenceInput(own, None, work_dir)
        return InferenceInput(write_volume_node(volume_node, work_dir / "input.nii.gz"), None, work_dir, copied=True)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


@dataclass(frozen=True)
class InferencePoll:
    """What one timer tick shows."""

    active: bool
    status: str
    progress: tuple[int, int, int]
    """``(minimum, maximum, value)`` of the progress bar; (0, 0, 0) is "busy"."""
    dialog: str | None = None
    """An error to show now (once per job), or None."""
    result: Any = None
    """What the loader returned, on the tick the result was loaded."""


class InferenceController:
    """The Apply section's decisions and the job it runs.

    Args:
        temp_root: Slicer's temporary folder (``slicer.app.temporaryPath``).
        runner: how jobs run (default: a ``segviz infer`` child each).
        dicom_series: see :func:`inference_input`.
    """

    def __init__(
        self,
        temp_root: str | Path,
        runner: InferenceRunner | None = None,
        dicom_series: Callable[[list[str]], tuple[list[str], str | None]] | None = None,
    ) -> None:
        self.temp_root = Path(temp_root)
        self.runner = runner or SubprocessRunner()
        self.dicom_series = dicom_series
        self.job = None
        self.request: InferenceRequest | None = None
        self.volume_node = None
        self._dialog_shown = False

    @property
    def active(self) -> bool:
        return self.job is not None and self.job.status.active

    def button(self, volume_node, model_usable: bool) -> ButtonView:
        """The Apply button: Cancel while running; otherwise enabled when a CT and a usable model are chosen."""
        if self.active:
            return ButtonView("Cancel", True, "Stop the running model")
        if volume_node is None and not model_usable:
            return ButtonView("Apply", False, "Choose a model bundle and an input volume")
        if not model_usable:
            return ButtonView("Apply", False, "Choose a usable model bundle (see the model's description)")
        if volume_node is None:
            return ButtonView("Apply", False, "Choose the CT volume to segment")
        return ButtonView("Apply", True, "Segment the organs of the input volume with the global model")

    def start(self, volume_node, model: str | Path, device: str = "auto") -> InferenceRequest:
        """Prepare the input and start the job.

        Raises:
            RuntimeError: a job is already running.
            ValueError / FileNotFoundError: no volume, no model file, a transformed volume.
        """
        if self.active:
            raise RuntimeError("The model is already running on a volume: cancel it first.")
        if volume_node is None:
            raise ValueError("Choose the CT volume to segment.")
        model = Path(model)
        if not model.is_file():
            raise FileNotFoundError(f"{model}: no such model bundle")
        self.cleanup()
        source = inference_input(volume_node, self.temp_root, self.dicom_series)
        request = InferenceRequest(source, model, device)
        try:
            self.job = self.runner.start(request)
        except BaseException:
            shutil.rmtree(source.work_dir, ignore_errors=True)
            raise
        self.request, self.volume_node, self._dialog_shown = request, volume_node, False
        return request

    def cancel(self) -> None:
        """Stop the running job (its files go when the cancellation is seen by :meth:`poll`)."""
        if self.job is not None and self.job.status.active:
            self.job.cancel()

    def poll(self, load: Callable[[Any], Any]) -> InferencePoll:
        """Advance the job; load its result with ``load(job)`` once; say what to show.

        ``load`` raising marks the job failed with the error's message (shown once).
        """
        job = self.job
        if job is None:
            return InferencePoll(False, "", (0, 100, 0))
        status = job.poll()
        result = None
        if status.active and job.output_ready:
            try:
                result = load(job)
            except Exception as error:  # noqa: BLE001 - any loading failure is shown to the person once
                status.fail(f"the result could not be loaded: {error}")
            if status.active:
                status.finish(status.message or "Done")
        fraction = status.fraction
        if status.active:
            progress = (0, 0, 0) if fraction is None else (0, 100, round(100 * fraction))
        else:
            progress = (0, 100, 100 if status.state == InferenceState.DONE else 0)
        dialog = None
        if status.state == InferenceState.FAILED:
            text = f"Failed: {status.message}"
            if not self._dialog_shown:
                self._dialog_shown = True
                dialog = f"Applying the SegViz model failed:\n{status.message}"
        else:
            text = status.message
        # A failed or cancelled child may take a moment to exit: keep ticking (and keep its files)
        # until it has, so nothing is left running or half-written.
        process = getattr(job, "process", None)
        running = bool(process is not None and process.running)
        if not status.active and not running:
            self.cleanup()
        return InferencePoll(status.active or running, text, progress, dialog, result)

    def cleanup(self) -> None:
        """Remove the finished job's temporary folder (never a volume's own file)."""
        process = getattr(self.job, "process", None)
        if process is not None and process.running:
            return
        if self.request is not None and (self.job is None or not self.job.status.active):
            shutil.rmtree(self.request.input.work_dir, ignore_errors=True)

    def stop(self, timeout: float = 5.0) -> None:
        """End a running job and remove its files, and end the runner's worker (module unload, Slicer exit)."""
        process = getattr(self.job, "process", None)
        if self.job is not None and (self.job.status.active or (process is not None and process.running)):
            self.job.cancel(timeout=timeout, wait=True)
        stop_runner = getattr(self.runner, "stop", None)
        if stop_runner is not None:
            stop_runner(timeout=timeout)
        self.cleanup()
