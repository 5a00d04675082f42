"""SegViz: apply the federated multi-organ CT model and join federated training rounds from Slicer.

Supported: 3D Slicer 5.10 or later (Python 3.12); Flower 1.42 needs Python >= 3.11, which older
Slicer releases (5.8: Python 3.9) do not have: there the panel shows one message and nothing else.

GUI wiring only. Every decision (button states, what a poll of a job shows, which dialog appears
and when, which settings are read and written) is made by the plain-Python controllers of
``SegVizSlicerLib`` that the pytest suite tests with real child processes and real MRML; the
Logic class is ``SegVizSlicerLib.logic.SegVizSlicerLogic``. Training and inference never run in
Slicer's process: the panel starts ``segviz ...`` children and follows their JSON-lines progress
from a timer, with Cancel / Leave always available.
"""

import logging
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


_sourceTreeFallback()

# Stdlib-only and Python 3.9-safe: decides whether the rest of SegViz can even be imported here.
from SegVizSlicerLib.compatibility import SUPPORTED_RELEASES, unsupported_reason


def _slicerVersion():
    app = getattr(slicer, "app", None)
    return (int(app.majorVersion), int(app.minorVersion)) if app is not None else None


UNSUPPORTED = unsupported_reason(_slicerVersion(), sys.version_info)

if UNSUPPORTED is None:
    from SegVizSlicerLib import dependencies
    from SegVizSlicerLib.compatibility import install_python_packages
    from SegVizSlicerLib.federation_controller import JoinRequest, ticked_organs
    from SegVizSlicerLib.logic import SegVizSlicerLogic
    from SegVizSlicerLib.panel_settings import PanelSettings, default_work_folder
    from SegVizSlicerLib.site_export import (
        Case,
        cases_from_scene,
        read_declaration,
        remove_case,
        replace_question,
        site_cases,
        write_declaration,
    )
    from SegVizSlicerLib.terminology import SegVizTerminology

    from SegVizLogic.organs import ORGAN_NAMES

POLL_INTERVAL_MS = 200


def _resourceFile(filename: str) -> str:
    here = pathlib.Path(__file__).resolve().parent
    for root in (here, here.parent):
        if (root / "Resources" / filename).exists():
            return str(root / "Resources" / filename)
    return str(here / "Resources" / filename)


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
Requires {supported}.
<ul>
<li><b>Apply global model</b>: choose a model bundle (*.segviz) and a CT volume, press Apply, then
<b>Review in Segment Editor</b> to check and correct the organs, and <b>Add to my site</b> to train on it.</li>
<li><b>Federated training</b>: choose this site's folder, tick the organs your site annotated, add
annotated cases, enter what your coordinator gave you and press Join round. Images never leave this
computer; only model updates do.</li>
</ul>
Training and inference run in a separate process: Slicer stays responsive and Cancel / Leave always work.
See the <a href="https://github.com/segviz/SegVizSlicer/blob/main/docs/USER_GUIDE.md">user guide</a>.
""").format(supported=SUPPORTED_RELEASES)
        self.parent.acknowledgementText = _("""
SegViz implements the method of A. Kaushal et al., "SegViz: A federated-learning based framework for
multi-organ segmentation on heterogeneous data sets with partial annotations" (2023), with FedBN
(X. Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR 2021)
keeping each site's BatchNorm layers local. Built on 3D Slicer, MONAI and Flower.
""")
        self.parent.icon = qt.QIcon(_resourceFile("Icons/SegVizSlicer.png"))
        if UNSUPPORTED is None:
            # Register the SegViz terminology once Slicer is up, so the terminology selector and
            # DICOM SEG export know its codes even before the first Apply.
            slicer.app.connect("startupCompleted()", _loadTerminology)


def _loadTerminology() -> None:
    try:
        SegVizTerminology()
    except (RuntimeError, FileNotFoundError) as error:
        logging.getLogger(__name__).error("SegViz terminology not loaded: %s", error)


#
# SegVizSlicerParameterNode
#


@parameterNodeWrapper
class SegVizSlicerParameterNode:
    """What the panel shows for the current scene (settings that outlive a scene are in QSettings).

    inputVolume - CT to segment.
    outputSegmentation - where the organs go (a new segmentation node when empty).
    device - auto, cpu or cuda.
    splitKidney - split the kidney into left and right segments.
    show3D - show the organs in 3D.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    splitKidney: bool = False
    show3D: bool = True


#
# SegVizSlicerWidget
#


class _CloseGuard(qt.QObject):
    """Asks before Slicer's main window closes while this site is training."""

    def __init__(self, widget):
        qt.QObject.__init__(self)
        self.widget = widget

    def eventFilter(self, obj, event):
        if event.type() == qt.QEvent.Close:
            return not self.widget.confirmClose()
        return False


class SegVizSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: the controllers of SegVizSlicerLib decide, this class shows."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._closeGuard = None
        self._modelUsable = False

    def resourcePath(self, filename: str) -> str:
        return _resourceFile(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegVizSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if UNSUPPORTED is not None:
            self.ui.unsupportedLabel.text = UNSUPPORTED
            self.ui.unsupportedLabel.visible = True
            for section in (
                self.ui.applyCollapsibleButton,
                self.ui.federationCollapsibleButton,
                self.ui.dependenciesCollapsibleButton,
            ):
                section.enabled = False
            return

        self.logic = SegVizSlicerLogic(dicom_series=_dicomSeries)
        self._organCheckBoxes = {name: getattr(self.ui, f"{name}CheckBox") for name in ORGAN_NAMES}
        self._settingsStore = qt.QSettings()
        self._loadSettings()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.reviewButton.connect("clicked(bool)", self.onReview)
        self.ui.addToSiteButton.connect("clicked(bool)", self.onAddToSite)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.casesFromSceneButton.connect("clicked(bool)", self.onCasesFromScene)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.openSiteFolderButton.connect("clicked(bool)", self.onOpenSiteFolder)
        self.ui.siteFolderPathLineEdit.connect("currentPathChanged(QString)", self.onSiteFolderChanged)
        self.ui.joinButton.connect("clicked(bool)", self.onJoinButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        for edit in (self.ui.siteNameLineEdit, self.ui.superlinkLineEdit):
            edit.connect("textChanged(QString)", self.onSettingChanged)
        for path in (self.ui.rootCertPathLineEdit, self.ui.trustFilePathLineEdit, self.ui.nodeKeyPathLineEdit):
            path.connect("currentPathChanged(QString)", self.onSettingChanged)
        for box in (self.ui.insecureCheckBox, self.ui.shareBatchNormCheckBox, *self._organCheckBoxes.values()):
            box.connect("toggled(bool)", self.onSettingChanged)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None:  # none when Slicer runs without its main window (tests)
            self._closeGuard = _CloseGuard(self)
            mainWindow.installEventFilter(self._closeGuard)

        self.initializeParameterNode()
        self.onModelPathChanged(self.ui.modelPathLineEdit.currentPath)
        self._refreshCases()
        self._updateDependencyStatus()
        self._updateButtons()

    def cleanup(self) -> None:
        """The module is reloaded or Slicer is ending: end every child process tree."""
        if self._timer:
            self._timer.stop()
        if self._closeGuard is not None and slicer.util.mainWindow() is not None:
            slicer.util.mainWindow().removeEventFilter(self._closeGuard)
        self._closeGuard = None
        if self.logic:
            self.logic.stopAll()
        self.removeObservers()

    def confirmClose(self) -> bool:
        """Slicer's main window is closing: ask (once) whether to leave; Leave ends the whole tree."""
        question = self.logic.federation.close_question() if self.logic else None
        if question is None:
            return True
        if not slicer.util.confirmYesNoDisplay(_(question), windowTitle=_("SegViz")):
            return False
        with slicer.util.WaitCursor():
            self.logic.stopAll()
        return True

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

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        if self.logic is None:
            return
        self.setParameterNode(SegVizSlicerParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # ---------------------------------------------------------------- settings

    def _loadSettings(self) -> None:
        settings = PanelSettings.load(self._settingsStore)
        self._loading = True
        try:
            self.ui.modelPathLineEdit.currentPath = settings.last_model
            self.ui.superlinkLineEdit.text = settings.superlink
            self.ui.siteNameLineEdit.text = settings.site_name
            self.ui.siteFolderPathLineEdit.currentPath = settings.site_folder or str(
                default_work_folder() / "sites" / (settings.site_name or "my-site")
            )
            self.ui.rootCertPathLineEdit.currentPath = settings.root_certificate
            self.ui.trustFilePathLineEdit.currentPath = settings.trust_file
            self.ui.nodeKeyPathLineEdit.currentPath = settings.node_key
            self.ui.insecureCheckBox.checked = settings.insecure
            self.ui.shareBatchNormCheckBox.checked = settings.share_final_batchnorm
            self._loadDeclaration()
        finally:
            self._loading = False

    def _settings(self) -> "PanelSettings":
        return PanelSettings(
            superlink=self.ui.superlinkLineEdit.text,
            site_name=self.ui.siteNameLineEdit.text,
            site_folder=self.ui.siteFolderPathLineEdit.currentPath,
            root_certificate=self.ui.rootCertPathLineEdit.currentPath,
            trust_file=self.ui.trustFilePathLineEdit.currentPath,
            node_key=self.ui.nodeKeyPathLineEdit.currentPath,
            insecure=self.ui.insecureCheckBox.checked,
            share_final_batchnorm=self.ui.shareBatchNormCheckBox.checked,
            last_model=self.ui.modelPathLineEdit.currentPath,
        )

    def onSettingChanged(self, *args) -> None:
        if getattr(self, "_loading", False):
            return
        self._settings().save(self._settingsStore)
        self._updateButtons()

    def _loadDeclaration(self) -> None:
        """The ticks and the site name come from the site folder's site.json (the declaration),
        never from what the scene holds."""
        siteDir = self._settings().site_dir()
        declaration = None
        if siteDir is not None:
            try:
                declaration = read_declaration(siteDir)
            except ValueError as error:
                self.ui.federationStateLabel.text = str(error)
        if declaration is not None:
            name, organs = declaration
            self.ui.siteNameLineEdit.text = name
            for organName, box in self._organCheckBoxes.items():
                box.checked = organName in organs

    def _request(self) -> "JoinRequest":
        settings = self._settings()
        return JoinRequest(
            superlink=settings.superlink,
            site_dir=settings.site_dir(),
            site_name=settings.site_name,
            organs=ticked_organs({name: box.checked for name, box in self._organCheckBoxes.items()}),
            root_certificate=settings.root_certificate,
            insecure=settings.insecure,
            trust_file=settings.trust_file,
            node_key=settings.node_key,
            share_final_batchnorm=settings.share_final_batchnorm,
        )

    # ---------------------------------------------------------------- buttons and status

    def _show(self, button, view) -> None:
        button.text = _(view.text)
        button.enabled = view.enabled
        button.toolTip = _(view.tooltip)

    def _updateButtons(self, caller=None, event=None) -> None:
        if self.logic is None:
            return
        p = self._parameterNode
        self._show(self.ui.applyButton, self.logic.inference.button(p.inputVolume if p else None, self._modelUsable))
        request = self._request()
        self._show(self.ui.joinButton, self.logic.federation.join_button(request))
        result = self.logic.resultSegmentation
        hasResult = result is not None and result.GetScene() is not None
        self._show(self.ui.reviewButton, self.logic.federation.review_button(hasResult))
        self._show(self.ui.addToSiteButton, self.logic.federation.add_case_button(request, hasResult, "Add to my site"))
        hasCase = self.ui.caseVolumeSelector.currentNode() is not None
        hasCase = hasCase and self.ui.caseSegmentationSelector.currentNode() is not None
        self._show(self.ui.addCaseButton, self.logic.federation.add_case_button(request, hasCase))
        self._show(
            self.ui.casesFromSceneButton, self.logic.federation.add_case_button(request, True, "Add all from scene")
        )

    def _updateDependencyStatus(self) -> None:
        missing = dependencies.missing_packages("federation", self.resourcePath("requirements.txt"))
        self.ui.dependenciesStatusLabel.text = _(dependencies.status_line(missing))

    def _ensurePackages(self, feature: str) -> bool:
        """Ask once (listing each package and version), then install: PyTorch through the PyTorch
        extension (the CUDA build for this computer), the rest with Slicer's pip."""
        requirements = self.resourcePath("requirements.txt")
        missing = dependencies.missing_packages(feature, requirements)
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "SegViz needs these Python packages:\n{packages}\n\nInstall them now? This needs the internet and "
                "can take several minutes (PyTorch is about 2 GB)."
            ).format(packages="\n".join(f"  {package.describe()}" for package in missing)),
            windowTitle=_("SegViz: install Python packages"),
        ):
            return False
        torchRequirement, pipRequirements = dependencies.install_plan(missing)
        if torchRequirement is not None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    _(
                        "SegViz installs PyTorch through the PyTorch extension: install it from the Extensions "
                        "Manager, restart Slicer and press the button again."
                    )
                ) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=torchRequirement
            )
            if torch is None:
                raise RuntimeError(_("PyTorch was not installed; see the PyTorch Utils module."))
        install_python_packages(pipRequirements, slicer, "SegViz")
        still = dependencies.missing_packages(feature, requirements)
        self._updateDependencyStatus()
        if still:
            raise RuntimeError(
                _("Still missing after installation: {packages}. Restart Slicer and try again.").format(
                    packages="; ".join(package.describe() for package in still)
                )
            )
        return True

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages."), waitCursor=True):
            self._ensurePackages("federation")
        self._updateDependencyStatus()

    # ---------------------------------------------------------------- model bundle

    def onModelPathChanged(self, path: str) -> None:
        summary = self.logic.describeModel(path or None, self.ui.trustFilePathLineEdit.currentPath or None)
        self._modelUsable = summary.usable
        self.ui.modelInfoLabel.text = summary.text
        self.ui.modelSignatureLabel.text = summary.signature or "–"
        self.onSettingChanged()

    # ---------------------------------------------------------------- apply, review, add to site

    def onApplyButton(self) -> None:
        if self.logic.inference.active:
            self.logic.inference.cancel()
            self._updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the SegViz model."), waitCursor=True):
            if not self._ensurePackages("infer"):
                return
            p = self._parameterNode
            self.logic.startInference(p.inputVolume, self.ui.modelPathLineEdit.currentPath, p.device)
            self.ui.applyStatusLabel.text = _("Starting…")
            self._timer.start()
        self._updateButtons()

    def _pollInference(self) -> bool:
        p = self._parameterNode
        poll = self.logic.pollInference(
            p.outputSegmentation if p else None, p.splitKidney if p else False, p.show3D if p else True
        )
        self.ui.applyProgressBar.setRange(poll.progress[0], poll.progress[1])
        self.ui.applyProgressBar.setValue(poll.progress[2])
        self.ui.applyStatusLabel.text = poll.status
        if poll.result is not None:
            segmentation, table = poll.result
            if p is not None:
                p.outputSegmentation = segmentation
            self._showVolumes(table)
            slicer.util.setSliceViewerLayers(background=self.logic.resultVolume)
        if poll.dialog:
            self._updateButtons()  # the buttons are usable again before the dialog opens
            slicer.util.errorDisplay(_(poll.dialog), windowTitle=_("SegViz"))
        return poll.active

    def _showVolumes(self, tableNode) -> None:
        table = tableNode.GetTable()
        self.ui.organVolumesTable.setRowCount(table.GetNumberOfRows())
        for row in range(table.GetNumberOfRows()):
            self.ui.organVolumesTable.setItem(row, 0, qt.QTableWidgetItem(table.GetValue(row, 0).ToString()))
            self.ui.organVolumesTable.setItem(row, 1, qt.QTableWidgetItem(f"{table.GetValue(row, 1).ToDouble():.1f}"))

    def onReview(self) -> None:
        """Open the result in the Segment Editor, on the CT it was predicted from."""
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self.logic.resultSegmentation)
        editor.setSourceVolumeNode(self.logic.resultVolume)

    def _addCases(self, cases) -> None:
        request = self._request()
        for case in cases:
            question = replace_question(request.site_dir, case.name)
            replace = question is not None
            if replace and not slicer.util.confirmYesNoDisplay(_(question), windowTitle=_("SegViz")):
                continue
            self.logic.addToSite(case.volume_node, case.segmentation_node, request.site_dir, request.organs, replace)
        write_declaration(request.site_dir, request.site_name, request.organs)
        self._refreshCases()

    def onAddToSite(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case to the site folder."), waitCursor=True):
            self._addCases([Case(self.logic.resultVolume, self.logic.resultSegmentation)])

    def onAddCase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case to the site folder."), waitCursor=True):
            self._addCases(
                [Case(self.ui.caseVolumeSelector.currentNode(), self.ui.caseSegmentationSelector.currentNode())]
            )

    def onCasesFromScene(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the scene's cases to the site folder."), waitCursor=True):
            cases = cases_from_scene(slicer.mrmlScene)
            if not cases:
                raise ValueError(_("No segmentation in the scene is paired with a CT volume."))
            self._addCases(cases)

    def onRemoveCase(self) -> None:
        rows = sorted({index.row() for index in self.ui.casesTable.selectedIndexes()})
        names = [self.ui.casesTable.item(row, 0).text() for row in rows]
        if not names:
            return
        if slicer.util.confirmYesNoDisplay(
            _("Delete {cases} from the site folder?").format(cases=", ".join(names)), windowTitle=_("SegViz")
        ):
            for name in names:
                remove_case(self._request().site_dir, name)
            self._refreshCases()

    def onSiteFolderChanged(self, path: str) -> None:
        if getattr(self, "_loading", False):
            return
        self._loadDeclaration()
        self._refreshCases()
        self.onSettingChanged()

    def onOpenSiteFolder(self) -> None:
        folder = self._request().site_dir
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _refreshCases(self) -> None:
        siteDir = self._request().site_dir
        cases = site_cases(siteDir) if siteDir is not None else []
        self.ui.casesTable.setRowCount(len(cases))
        for row, case in enumerate(cases):
            self.ui.casesTable.setItem(row, 0, qt.QTableWidgetItem(case.name))
            self.ui.casesTable.setItem(row, 1, qt.QTableWidgetItem(", ".join(case.present) or _("(none: all absent)")))
        self._updateButtons()

    # ---------------------------------------------------------------- federation

    def onJoinButton(self) -> None:
        if self.logic.federation.active:
            self.logic.leave()
            self._updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to join the federation."), waitCursor=True):
            if not self._ensurePackages("federation"):
                return
            self.logic.joinRound(self._request())
            self.ui.federationLogTextEdit.clear()
            self._timer.start()
        self._updateButtons()

    def _pollFederation(self) -> bool:
        poll = self.logic.pollFederation()
        self.ui.federationStateLabel.text = poll.connection
        self.ui.roundLabel.text = poll.round
        self.ui.epochLabel.text = poll.epoch
        self.ui.globalDiceLabel.text = poll.global_dice
        self.ui.roundTimeLabel.text = poll.round_time
        self.ui.federationProgressBar.setRange(poll.progress[0], poll.progress[1])
        self.ui.federationProgressBar.setValue(poll.progress[2])
        for line in poll.log_lines:
            self.ui.federationLogTextEdit.appendPlainText(line)
        if poll.dialog:
            self._updateButtons()
            slicer.util.errorDisplay(_(poll.dialog), windowTitle=_("SegViz"))
        return poll.active

    # ---------------------------------------------------------------- timer

    def onPoll(self) -> None:
        """Timer tick: read new progress of every running job; stop ticking when none runs."""
        busy = False
        try:
            busy = self._pollInference() | self._pollFederation()
        finally:
            if not busy:
                self._timer.stop()
            self._updateButtons()


def _dicomSeries(instanceUids):
    """Files and series UID of DICOM instances, from Slicer's DICOM database."""
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen:
        return [], None
    files = [database.fileForInstance(uid) for uid in instanceUids]
    series = database.instanceValue(instanceUids[0], "0020,000E") if instanceUids else None
    return [f for f in files if f], series or None


#
# SegVizSlicerTest
#


class SegVizSlicerTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a whole apply with a small model the test builds, and the cases
    and site folder round trip."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegVizSlicer_apply_small_model()

    def test_SegVizSlicer_apply_small_model(self):
        """Build a small model (phantom + `segviz train` children), apply it through the Logic as
        the panel does, review the segments, add the case to a site folder."""
        import tempfile

        import numpy as np
        import SimpleITK as sitk
        from SegVizSlicerLib.site_export import site_cases
        from SegVizSlicerLib.small_model import build_small_model

        missing = dependencies.missing_packages("infer", _resourceFile("requirements.txt"))
        self.assertEqual(missing, [], "install SegViz's Python packages first (SegViz panel, Python packages)")
        with tempfile.TemporaryDirectory() as folder:
            self.delayDisplay("Building a small model (about a minute)")
            model = build_small_model(folder)
            volume = slicer.util.loadVolume(str(model.ct))
            logic = SegVizSlicerLogic()
            request = logic.startInference(volume, model.bundle, "cpu")
            self.assertEqual(request.input.path, model.ct, "the volume's own file is read, not a copy")
            segmentation, table = logic.waitForInference(timeout=900, tick=slicer.app.processEvents)
            logic.stopAll()  # this logic's warm worker (the panel's ends with the module)
            self.assertFalse(request.input.work_dir.exists(), "the job's temporary folder is removed")
            segments = segmentation.GetSegmentation()
            names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
            self.assertIn("liver", names)
            self.assertEqual(table.GetTable().GetNumberOfRows(), len(names))
            liver = segments.GetSegment(segments.GetSegmentIdBySegmentName("liver"))
            self.assertIn("SCT^10200004^Liver", liver.GetTerminology())

            site = pathlib.Path(folder) / "site"
            logic.addToSite(volume, segmentation, site, ["liver"])
            [case] = site_cases(site)
            written = sitk.ReadImage(str(site / "labels" / f"{case.name}.nii.gz"))
            ct = sitk.ReadImage(str(model.ct))
            self.assertEqual(written.GetSize(), ct.GetSize())
            self.assertTrue(np.allclose(written.GetOrigin(), ct.GetOrigin(), atol=1e-3))
        self.delayDisplay("Apply, review and add to site OK")
