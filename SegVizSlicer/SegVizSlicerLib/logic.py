"""``SegVizSlicerLogic``: what the SegViz panel does, callable from Python without the widget.

Inside Slicer it is a ``ScriptedLoadableModuleLogic`` (the module's parameter node comes from
there); with the bare MRML of the slicer-core wheel it is a plain class on a scene of its own, so
the pytest suite exercises this very class on real MRML nodes and real child processes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .federation_controller import FederationController, FederationPoll, JoinRequest
from .inference_controller import InferenceController, InferencePoll, SubprocessRunner
from .inference_worker import WorkerRunner
from .model_summary import ModelSummary, describe_model
from .site_export import Case, SiteCase, write_case
from .terminology import SegVizTerminology
from .workflows import load_inference_result

__all__ = ["SegVizSlicerLogic", "scripted_logic_base", "temporary_root"]


def scripted_logic_base(slicer_module=None) -> type:
    """``ScriptedLoadableModuleLogic`` in the Slicer application, ``object`` with bare MRML
    (slicer-core has no ``slicer.ScriptedLoadableModule``: it needs Qt)."""
    try:
        if slicer_module is not None and not hasattr(slicer_module, "app"):
            raise ImportError("no Slicer application")
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
    except ImportError:
        return object
    return ScriptedLoadableModuleLogic


def temporary_root(slicer_module=None) -> Path:
    """Where a job's temporary files go: Slicer's temporary folder (Application settings), else
    the system's."""
    app = getattr(slicer_module, "app", None) if slicer_module is not None else None
    if app is not None and getattr(app, "temporaryPath", ""):
        return Path(app.temporaryPath) / "SegViz"
    return Path(tempfile.gettempdir()) / "SegViz"


class SegVizSlicerLogic(scripted_logic_base()):  # type: ignore[misc]
    """The panel's work: apply a model to a volume, join and leave a federation, save cases.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene``).
        temp_root: folder for inference files (default: :func:`temporary_root`).
        python: interpreter of the ``segviz`` children (default: PythonSlicer inside Slicer).
        dicom_series: maps DICOM instance UIDs to ``(files, series UID)`` (Slicer's DICOM database).
        warm_worker: run applies in one ``segviz serve`` worker kept for the session (the second
            apply pays no imports and no model load); False: a ``segviz infer`` child per apply.

    Example::

        logic = SegVizSlicerLogic(scene)
        logic.startInference(volume, "model.segviz")
        segmentation, table = logic.waitForInference()
    """

    def __init__(
        self, scene=None, temp_root=None, python: str | None = None, dicom_series=None, warm_worker: bool = True
    ) -> None:
        import slicer

        super().__init__()  # ScriptedLoadableModuleLogic names the module's parameter node
        self.scene = scene if scene is not None else slicer.mrmlScene
        runner = WorkerRunner(python) if warm_worker else SubprocessRunner(python)
        self.inference = InferenceController(
            temp_root if temp_root is not None else temporary_root(slicer), runner, dicom_series
        )
        self.federation = FederationController(python)
        self._terminology: SegVizTerminology | None = None
        self.resultVolume = None
        self.resultSegmentation = None

    @property
    def terminology(self) -> SegVizTerminology:
        """The SegViz terminology, loaded into Slicer's Terminologies logic on first use."""
        if self._terminology is None:
            self._terminology = SegVizTerminology()
        return self._terminology

    # model ------------------------------------------------------------------------------

    @staticmethod
    def describeModel(path, trust=None) -> ModelSummary:
        """The model section's text, from the bundle's manifest (milliseconds, no torch)."""
        return describe_model(path, trust)

    # apply ------------------------------------------------------------------------------

    def startInference(self, volumeNode, modelPath, device: str = "auto"):
        """Start ``segviz infer`` on ``volumeNode``; returns the request (files, model)."""
        return self.inference.start(volumeNode, modelPath, device)

    def pollInference(self, segmentationNode=None, splitKidney: bool = False, show3D: bool = True) -> InferencePoll:
        """Advance the running apply; once its label map is ready, load it as segments on the
        volume it segmented (``poll.result`` is then ``(segmentation, table)``)."""
        volume = self.inference.volume_node

        def load(job):
            segmentation, table = load_inference_result(
                job, volume, segmentationNode, splitKidney, show3D, terminology=self.terminology
            )
            self.resultVolume, self.resultSegmentation = volume, segmentation
            return segmentation, table

        return self.inference.poll(load)

    def waitForInference(self, timeout: float = 1800.0, splitKidney: bool = False, show3D: bool = True, tick=None):
        """Poll until the apply ends (tests and the self-test; the panel polls from a timer).

        Returns:
            ``(segmentation, table)``.

        Raises:
            RuntimeError: the apply failed, was cancelled or timed out.
        """
        deadline = time.monotonic() + timeout
        result, poll = None, None
        while time.monotonic() < deadline:
            poll = self.pollInference(None, splitKidney, show3D)
            result = poll.result or result
            if not poll.active:
                break
            if tick is not None:
                tick()
            time.sleep(0.1)
        else:
            self.inference.stop()
            raise RuntimeError(f"the model did not finish within {timeout:.0f} s")
        if result is None:
            raise RuntimeError(poll.status if poll is not None else "no inference running")
        return result

    # site -------------------------------------------------------------------------------

    def addToSite(self, volumeNode, segmentationNode, siteDir, organs, replace: bool = False) -> SiteCase:
        """Save a (corrected) segmentation and its CT into the site folder as a training case."""
        return write_case(Case(volumeNode, segmentationNode), siteDir, organs, replace=replace)

    # federation -------------------------------------------------------------------------

    def joinRound(self, request: JoinRequest):
        """Write the site's declaration and start ``segviz federation join``; returns the job."""
        return self.federation.join(request)

    def leave(self) -> None:
        self.federation.leave()

    def pollFederation(self) -> FederationPoll:
        return self.federation.poll()

    def stopAll(self, timeout: float = 10.0) -> None:
        """End every running child and its process tree (the warm worker too), and remove temporary files."""
        self.inference.stop(timeout=min(timeout, 5.0))
        self.federation.stop(timeout=timeout)
