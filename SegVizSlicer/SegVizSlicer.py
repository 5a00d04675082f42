"""SegViz: apply the federated multi-organ CT model and join federated training rounds from Slicer.

GUI and MRML glue only. Everything that can run without the Slicer application (MRML <-> files,
segments, the ``segviz`` child processes and the panel's state machines) lives in
``SegVizSlicerLib`` and is tested with pytest; the organ schema comes from ``SegVizLogic.organs``.
Training and inference never run in Slicer's process: the panel starts ``segviz ...`` as a child
process and follows its JSON-lines progress from a timer, with Cancel / Leave always available.
"""

import logging
import os
import pathlib
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _sourceTreeFallback() -> None:
    """Installed, SegVizLogic/ and Resources/ sit next to this file (CMake copies them there).
    Run from a source checkout (module path = <repo>/SegVizSlicer), they are one folder up."""
    here = pathlib.Path(__file__).resolve().parent
    for root in (here, here.parent):
        if (root / "SegVizLogic" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return


def _resourceFile(filename: str) -> str:
    """Path of a file in Resources/, installed layout first, then the source checkout."""
    here = pathlib.Path(__file__).resolve().parent
    for root in (here, here.parent):
        candidate = root / "Resources" / filename
        if candidate.exists():
            return str(candidate)
    return str(here / "Resources" / filename)


_sourceTreeFallback()

from SegVizSlicerLib import dependencies, workflows
from SegVizSlicerLib.job import model_info
from SegVizSlicerLib.panel_state import FederationState, InferenceState
from SegVizSlicerLib.site_export import Case, annotated_organs, cases_from_scene

from SegVizLogic.organs import ORGAN_NAMES

POLL_INTERVAL_MS = 200

#
# SegVizSlicer
#


class SegVizSlicer(ScriptedLoadableModule):
    """Module metadata (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegViz")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegViz project contributors"]
        self.parent.helpText = _("""
Segment liver, spleen, pancreas and kidneys in CT with a model trained by federated learning
across hospitals that each annotated only some organs, and take part in that training.
<ul>
<li><b>Apply global model</b>: choose a model bundle (*.segviz) and a CT volume, press Apply.
The organs appear as segments with their names, colours and SNOMED codes, and their volumes in a table.</li>
<li><b>Federated training</b>: list this site's annotated cases, tick the organs you annotated,
enter the SuperLink address and certificate you were given, and press Join round.
Images never leave this computer; only model updates do.</li>
</ul>
Training and inference run in a separate process: Slicer stays responsive and Cancel / Leave always work.
See the <a href="https://github.com/segviz/SegVizSlicer/blob/main/docs/USER_GUIDE.md">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
SegViz implements the method of A. Kaushal et al., "SegViz: A federated-learning based framework for
multi-organ segmentation on heterogeneous data sets with partial annotations" (2023), with FedBN
(X. Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR 2021)
keeping each site's BatchNorm layers local. Built on 3D Slicer, MONAI and Flower.
""")
        self.parent.icon = qt.QIcon(_resourceFile("Icons/SegVizSlicer.png"))


#
# SegVizSlicerParameterNode
#


@parameterNodeWrapper
class SegVizSlicerParameterNode:
    """GUI state, saved with the scene.

    modelPath - the global model bundle (*.segviz).
    inputVolume - CT to segment.
    outputSegmentation - where the organs go (a new segmentation node when empty).
    device - auto, cpu or cuda.
    splitKidney - split the kidney into left and right segments.
    show3D - show the organs in 3D.
    siteName, superlink, rootCertificate, insecure - how this site joins the federation.
    workFolder - where the site folder and inference files are written.
    """

    modelPath: pathlib.Path
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    splitKidney: bool = False
    show3D: bool = True
    siteName: str = "site-a"
    superlink: str = ""
    rootCertificate: pathlib.Path
    insecure: bool = False
    workFolder: pathlib.Path


def _is_set(path) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# SegVizSlicerWidget
#


class SegVizSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every action calls SegVizSlicerLogic; a timer polls running jobs."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cases: list[Case] = []
        self._timer = None
        self._logShown = 0

    def resourcePath(self, filename: str) -> str:
        return _resourceFile(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegVizSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegVizSlicerLogic()

        self._organCheckBoxes = {
            "liver": self.ui.liverCheckBox,
            "spleen": self.ui.spleenCheckBox,
            "pancreas": self.ui.pancreasCheckBox,
            "kidney": self.ui.kidneyCheckBox,
        }

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.casesFromSceneButton.connect("clicked(bool)", self.onCasesFromScene)
        self.ui.joinButton.connect("clicked(bool)", self.onJoinButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.openWorkFolderButton.connect("clicked(bool)", self.onOpenWorkFolder)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.initializeParameterNode()
        self._updateDependencyStatus()
        self._updateButtons()

    def cleanup(self) -> None:
        """Slicer is closing or the module reloads: stop timers and end child processes."""
        if self._timer:
            self._timer.stop()
        if self.logic:
            self.logic.stopAll()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Jobs keep running while the person works in another module; only the GUI binding stops.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._cases = []

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self._refreshCasesTable()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not _is_set(self._parameterNode.workFolder):
            self._parameterNode.workFolder = self.logic.defaultWorkFolder()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # ---------------------------------------------------------------- buttons and status

    def _updateButtons(self, caller=None, event=None) -> None:
        """Enable what can be done now; never leave a button greyed out without a tooltip saying why."""
        p = self._parameterNode
        inference = self.logic.inferenceJob
        if inference is not None and inference.status.active:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running inference")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            ready = bool(p and p.inputVolume and _is_set(p.modelPath))
            self.ui.applyButton.enabled = ready
            self.ui.applyButton.toolTip = (
                _("Segment the organs of the input volume with the global model")
                if ready
                else _("Choose a model bundle and an input volume")
            )

        federation = self.logic.federationJob
        if federation is not None and federation.status.active:
            self.ui.joinButton.text = _("Leave")
            self.ui.joinButton.toolTip = _("Stop taking part: ends the SuperNode and everything it started")
            self.ui.joinButton.enabled = True
        else:
            self.ui.joinButton.text = _("Join round")
            ready = bool(p and p.superlink.strip() and p.siteName.strip() and self._cases and self._checkedOrgans())
            self.ui.joinButton.enabled = ready
            self.ui.joinButton.toolTip = (
                _("Export this site's cases and join the federation")
                if ready
                else _("Add cases, tick the annotated organs, and give a site name and SuperLink address")
            )

    def _checkedOrgans(self) -> list[str]:
        return [name for name in ORGAN_NAMES if self._organCheckBoxes[name].checked]

    def _updateDependencyStatus(self) -> None:
        missing = sorted(set(dependencies.missing_modules("infer")) | set(dependencies.missing_modules("federation")))
        if missing:
            self.ui.dependenciesStatusLabel.text = _(
                "Missing Python packages: {packages}. They are installed when first needed, after you confirm."
            ).format(packages=", ".join(missing))
        else:
            self.ui.dependenciesStatusLabel.text = _("All Python packages SegViz needs are installed.")

    # ---------------------------------------------------------------- model bundle

    def onModelPathChanged(self, path: str) -> None:
        if not path or not os.path.isfile(path):
            self.ui.modelInfoLabel.text = _("No model bundle selected.")
            return
        with slicer.util.WaitCursor():
            self.ui.modelInfoLabel.text = self.logic.describeModel(path)

    # ---------------------------------------------------------------- apply model

    def onApplyButton(self) -> None:
        job = self.logic.inferenceJob
        if job is not None and job.status.active:
            job.cancel()
            self._updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the SegViz model."), waitCursor=True):
            if not self.logic.ensureDependencies("infer", self.resourcePath("requirements.txt")):
                return
            p = self._parameterNode
            self.logic.startInference(p.inputVolume, p.modelPath, p.workFolder, p.device)
            self.ui.applyProgressBar.setValue(0)
            self.ui.applyStatusLabel.text = _("Starting…")
            self._timer.start()
        self._updateButtons()

    def _pollInference(self) -> bool:
        job = self.logic.inferenceJob
        if job is None:
            return False
        status = job.poll()
        if status.active and job.output_ready:
            with slicer.util.tryWithErrorDisplay(_("Failed to load the predicted organs."), waitCursor=True):
                p = self._parameterNode
                if p is None:  # the scene was closed while the model ran: load with the defaults
                    segmentation, table = self.logic.loadInferenceResult(None)
                else:
                    segmentation, table = self.logic.loadInferenceResult(p.outputSegmentation, p.splitKidney, p.show3D)
                    p.outputSegmentation = segmentation
                self._showVolumes(table)
            if status.active:  # loading failed: say so instead of spinning forever
                status.fail(_("The result could not be loaded; see the error message."))
        fraction = status.fraction
        if fraction is None:
            self.ui.applyProgressBar.setRange(0, 0 if status.active else 100)
        else:
            self.ui.applyProgressBar.setRange(0, 100)
            self.ui.applyProgressBar.setValue(round(100 * fraction))
        if status.state == InferenceState.FAILED:
            self.ui.applyStatusLabel.text = _("Failed: {message}").format(message=status.message)
            self._reportFailure(job, _("Applying the SegViz model failed:\n{message}").format(message=status.message))
        else:
            self.ui.applyStatusLabel.text = status.message
        if not status.active:
            self.ui.applyProgressBar.setRange(0, 100)
        self._updateButtons()
        return status.active

    def _showVolumes(self, tableNode) -> None:
        table = tableNode.GetTable()
        self.ui.organVolumesTable.setRowCount(table.GetNumberOfRows())
        for row in range(table.GetNumberOfRows()):
            self.ui.organVolumesTable.setItem(row, 0, qt.QTableWidgetItem(table.GetValue(row, 0).ToString()))
            self.ui.organVolumesTable.setItem(row, 1, qt.QTableWidgetItem(f"{table.GetValue(row, 1).ToDouble():.1f}"))

    # ---------------------------------------------------------------- cases

    def onAddCase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case.")):
            volume = self.ui.caseVolumeSelector.currentNode()
            segmentation = self.ui.caseSegmentationSelector.currentNode()
            if volume is None or segmentation is None:
                raise ValueError(_("Choose a volume and its segmentation."))
            self._cases = [c for c in self._cases if c.segmentation_node is not segmentation]
            self._cases.append(Case(volume, segmentation))
            self._refreshCasesTable()

    def onRemoveCase(self) -> None:
        rows = sorted({index.row() for index in self.ui.casesTable.selectedIndexes()}, reverse=True)
        for row in rows:
            if 0 <= row < len(self._cases):
                del self._cases[row]
        self._refreshCasesTable()

    def onCasesFromScene(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to collect cases from the scene.")):
            self._cases = cases_from_scene(slicer.mrmlScene)
            self._refreshCasesTable()

    def _refreshCasesTable(self) -> None:
        self._cases = [c for c in self._cases if c.volume_node.GetScene() and c.segmentation_node.GetScene()]
        self.ui.casesTable.setRowCount(len(self._cases))
        for row, case in enumerate(self._cases):
            organs = ", ".join(sorted(set(case.segment_organs.values()))) or _("(no organ segment)")
            for column, text in enumerate((case.volume_node.GetName(), case.segmentation_node.GetName(), organs)):
                self.ui.casesTable.setItem(row, column, qt.QTableWidgetItem(text))
        found = set(annotated_organs(self._cases))
        for name, box in self._organCheckBoxes.items():
            box.checked = name in found
        self._updateButtons()

    # ---------------------------------------------------------------- federation

    def onJoinButton(self) -> None:
        job = self.logic.federationJob
        if job is not None and job.status.active:
            job.leave()
            self._updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to join the federation."), waitCursor=True):
            if not self.logic.ensureDependencies("federation", self.resourcePath("requirements.txt")):
                return
            p = self._parameterNode
            rootCert = p.rootCertificate if _is_set(p.rootCertificate) else None
            self.logic.joinRound(
                self._cases, self._checkedOrgans(), p.siteName, p.workFolder, p.superlink, rootCert, p.insecure
            )
            self.ui.federationLogTextEdit.clear()
            self._logShown = 0
            self._timer.start()
        self._updateButtons()

    def _pollFederation(self) -> bool:
        job = self.logic.federationJob
        if job is None:
            return False
        status = job.poll()
        self.ui.federationStateLabel.text = {
            FederationState.IDLE: _("Not joined"),
            FederationState.JOINING: _("Connected, waiting for a round")
            if status.connected
            else _("Connecting to {superlink}…").format(superlink=status.superlink),
            FederationState.TRAINING: _("Run finished; sending the last reply…")
            if status.run_finished
            else _("Training"),
            FederationState.FINISHED: _("Finished"),
            FederationState.FAILED: _("Failed: {message}").format(message=status.message),
            FederationState.LEFT: _("Left the federation"),
        }[status.state]
        self.ui.roundLabel.text = (
            _("Round {round} of {rounds}").format(round=status.round, rounds=status.rounds or "?")
            if status.round
            else "–"
        )
        self.ui.epochLabel.text = (
            _("Epoch {epoch}/{epochs}, loss {loss:.4f}").format(
                epoch=status.epoch, epochs=status.epochs or "?", loss=status.loss
            )
            if status.epoch and status.loss is not None
            else "–"
        )
        self.ui.globalDiceLabel.text = (
            ", ".join(f"{organ} {dice:.3f}" for organ, dice in status.global_dice.items())
            if status.global_dice
            else "–"
        )
        if status.rounds:
            self.ui.federationProgressBar.setRange(0, status.rounds)
            self.ui.federationProgressBar.setValue(min(status.round, status.rounds))
        else:
            self.ui.federationProgressBar.setRange(0, 0 if status.active else 1)
        new = min(status.log_total - self._logShown, len(status.log))
        for line in status.log[len(status.log) - new :] if new > 0 else []:
            self.ui.federationLogTextEdit.appendPlainText(line)
        self._logShown = status.log_total
        if status.state == FederationState.FAILED:
            self._reportFailure(
                job, _("Taking part in the federation failed:\n{message}").format(message=status.message)
            )
        if not status.active:
            self.ui.federationProgressBar.setRange(0, 1)
            self.ui.federationProgressBar.setValue(1 if status.state == FederationState.FINISHED else 0)
        self._updateButtons()
        return status.active

    def _reportFailure(self, job, text: str) -> None:
        """Show a failure once per job, after the buttons are usable again."""
        if getattr(job, "failureShown", False):
            return
        job.failureShown = True  # set before the dialog: the timer keeps ticking while it is open
        self._updateButtons()
        slicer.util.errorDisplay(text, windowTitle=_("SegViz"))

    # ---------------------------------------------------------------- timer, settings

    def onPoll(self) -> None:
        """Timer tick: read new progress of every running job; stop ticking when none runs."""
        busy = False
        try:
            busy = self._pollInference() | self._pollFederation()
        finally:
            if not busy:
                self._timer.stop()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages."), waitCursor=True):
            self.logic.ensureDependencies("federation", self.resourcePath("requirements.txt"), always_ask=True)
        self._updateDependencyStatus()

    def onOpenWorkFolder(self) -> None:
        folder = pathlib.Path(self._parameterNode.workFolder)
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))


#
# SegVizSlicerLogic
#


class SegVizSlicerLogic(ScriptedLoadableModuleLogic):
    """What the panel does, callable from Python without the widget.

    The headless work is in ``SegVizSlicerLib``; this class holds the running jobs and the
    Slicer-only parts (the scene, views, pip installs).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.inferenceJob = None
        self.inferenceVolume = None
        self.federationJob = None

    def getParameterNode(self):
        return SegVizSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def defaultWorkFolder() -> pathlib.Path:
        """``~/SegViz``: kept across sessions because the site folder holds its local BatchNorm state."""
        return pathlib.Path.home() / "SegViz"

    # dependencies --------------------------------------------------------

    def ensureDependencies(self, feature: str, requirementsPath: str, always_ask: bool = False) -> bool:
        """Install what ``feature`` needs into Slicer's Python after the person agrees.

        Returns True when everything is importable. Never called at import time.
        """
        missing = dependencies.missing_modules(feature)
        if not missing and not always_ask:
            return True
        requirements = dependencies.requirements_for(
            missing or list(dependencies.FEATURE_MODULES[feature]), requirementsPath, feature
        )
        try:
            from slicer import packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            # Shows its own confirmation dialog and raises RuntimeError if the person declines.
            try:
                packaging.pip_ensure(requirements, requester="SegViz")
            except RuntimeError as exc:
                slicer.util.warningDisplay(
                    _("SegViz needs these Python packages: {packages}\n{reason}").format(
                        packages=", ".join(requirements), reason=exc
                    )
                )
                return False
        else:
            if not slicer.util.confirmOkCancelDisplay(
                _(
                    "SegViz needs these Python packages, which are not installed yet:\n{packages}\n\n"
                    "Download and install them now (this can take several minutes)?"
                ).format(packages="\n".join(requirements))
            ):
                return False
            slicer.util.pip_install(requirements)
        still = dependencies.missing_modules(feature)
        if still:
            raise RuntimeError(
                _("Still missing after installation: {packages}. Restart Slicer and try again.").format(
                    packages=", ".join(still)
                )
            )
        return True

    # model ---------------------------------------------------------------

    def describeModel(self, modelPath) -> str:
        """One paragraph about a model bundle, from ``segviz model-info --json``."""
        try:
            info = model_info(modelPath)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, not a dialog: picking a file is not an error
            return _("Cannot read the model: {error}").format(error=exc)
        sites = info.get("sites") or []
        rounds = info.get("rounds")
        return _("Organs: {organs}\nTrained by: {sites} ({strategy}, {rounds})\nCreated: {created}").format(
            organs=", ".join(info.get("organs") or []) or "?",
            sites=", ".join(str(s) for s in sites) if sites else "?",
            strategy=info.get("strategy") or "?",
            rounds=_("{n} rounds").format(n=rounds) if rounds else _("not federated"),
            created=str(info.get("created") or "?")[:10],
        )

    # inference -----------------------------------------------------------

    def startInference(self, volumeNode, modelPath, workFolder, device="auto"):
        """Write the volume to the working folder and start ``segviz infer``; returns the job."""
        if volumeNode is None:
            raise ValueError(_("Choose an input volume."))
        if self.inferenceJob is not None and self.inferenceJob.status.active:
            raise RuntimeError(_("The model is already running on a volume."))
        self.inferenceJob = workflows.start_inference(volumeNode, modelPath, workFolder, device)
        self.inferenceVolume = volumeNode  # the result belongs to this volume, whatever is selected later
        logging.getLogger(__name__).info("SegViz inference started: %s", " ".join(self.inferenceJob.process.argv))
        return self.inferenceJob

    def loadInferenceResult(self, segmentationNode=None, splitKidney=False, show3D=True):
        """Load the finished job's organs as segments on the volume it segmented;
        returns (segmentation node, volume table node)."""
        volumeNode = self.inferenceVolume
        if volumeNode is None or volumeNode.GetScene() is None:
            raise RuntimeError(_("The segmented volume is no longer in the scene."))
        segmentation, table = workflows.load_inference_result(
            self.inferenceJob, volumeNode, segmentationNode, splitKidney, show3D
        )
        segmentation.GetDisplayNode().SetVisibility(True)
        slicer.util.setSliceViewerLayers(background=volumeNode)
        return segmentation, table

    # federation ----------------------------------------------------------

    def joinRound(self, cases, organs, siteName, workFolder, superlink, rootCertificate=None, insecure=False):
        """Export the cases to the site folder and start ``segviz federation join``; returns the job."""
        if self.federationJob is not None and self.federationJob.status.active:
            raise RuntimeError(_("This site is already in the federation: leave first."))
        self.federationJob = workflows.start_join(
            cases, organs, siteName, workFolder, superlink, rootCertificate, insecure
        )
        return self.federationJob

    def stopAll(self) -> None:
        """End every running child (module unload, application exit)."""
        if self.inferenceJob is not None and self.inferenceJob.process.running:
            self.inferenceJob.cancel(timeout=5.0, wait=True)
        if self.federationJob is not None and self.federationJob.process.running:
            self.federationJob.leave(timeout=5.0, wait=True)


#
# SegVizSlicerTest
#


class SegVizSlicerTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer. The full apply-model test needs a bundle: set SEGVIZ_TEST_MODEL."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegVizSlicer_segments_and_site_folder()
        self.setUp()
        self.test_SegVizSlicer_apply_model()

    def _sampleVolume(self):
        import SampleData

        return SampleData.downloadSample("CTACardio")

    def test_SegVizSlicer_segments_and_site_folder(self):
        """Import a label map as organ segments, export them to a site folder, read it back."""
        import json
        import tempfile

        import numpy as np
        import SimpleITK as sitk
        from SegVizSlicerLib.segment_import import import_label_map, organ_of_terminology, segment_terminology
        from SegVizSlicerLib.site_export import Case, export_site
        from SegVizSlicerLib.volume_nodes import image_from_volume_node

        from SegVizLogic.organs import organ_by_name

        self.delayDisplay("Loading sample CT")
        volume = self._sampleVolume()
        image = image_from_volume_node(volume)
        labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        k, j, i = (s // 2 for s in labels.shape)
        labels[k - 5 : k + 5, j - 10 : j, i - 20 : i - 5] = organ_by_name("liver").label
        labels[k - 5 : k + 5, j - 10 : j, i + 5 : i + 20] = organ_by_name("kidney").label
        labelImage = sitk.GetImageFromArray(labels)
        labelImage.CopyInformation(image)

        segmentation = import_label_map(slicer.mrmlScene, labelImage, reference_volume_node=volume, split_kidney=True)
        names = sorted(
            segmentation.GetSegmentation().GetNthSegment(n).GetName()
            for n in range(segmentation.GetSegmentation().GetNumberOfSegments())
        )
        self.assertEqual(names, ["liver", "right kidney"] if "right kidney" in names else ["left kidney", "liver"])
        liver = segmentation.GetSegmentation().GetSegment(
            segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
        )
        self.assertEqual(organ_of_terminology(segment_terminology(liver))[0].name, "liver")

        with tempfile.TemporaryDirectory() as folder:
            siteJson = export_site([Case(volume, segmentation)], folder, "self-test", ["liver", "kidney"])
            self.assertEqual(json.loads(siteJson.read_text())["organs"], ["liver", "kidney"])
            written = sitk.ReadImage(os.path.join(folder, "labels", f"{Case(volume, segmentation).name}.nii.gz"))
            self.assertTrue(np.array_equal(sitk.GetArrayFromImage(written), labels))
        self.delayDisplay("Segments and site folder OK")

    def test_SegVizSlicer_apply_model(self):
        """Apply a real model bundle (SEGVIZ_TEST_MODEL) to a sample CT and check the segments."""
        import time

        modelPath = os.environ.get("SEGVIZ_TEST_MODEL")
        if not modelPath or not os.path.isfile(modelPath):
            self.delayDisplay("SEGVIZ_TEST_MODEL not set: skipping the apply-model test")
            return
        volume = self._sampleVolume()
        logic = SegVizSlicerLogic()
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            job = logic.startInference(volume, modelPath, folder, "auto")
            deadline = time.monotonic() + 1800
            while job.poll().active and not job.output_ready and time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.2)
            self.assertTrue(job.output_ready, job.status.message)
            segmentation, table = logic.loadInferenceResult(None, splitKidney=True, show3D=True)
        segments = segmentation.GetSegmentation()
        names = {segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())}
        self.assertTrue(names, "the model found no organ")
        self.assertTrue(names <= {"liver", "spleen", "pancreas", "left kidney", "right kidney"}, names)
        self.assertEqual(table.GetTable().GetNumberOfRows(), len(names))
        self.delayDisplay("Apply model OK")
