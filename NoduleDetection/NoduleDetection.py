"""NoduleDetection 3D Slicer module: find lung nodules in a chest CT and show them as markups, segments, table.

Classes, as Slicer's scripted module template has them:

* ``NoduleDetection``: module description (title, category, help, acknowledgement).
* ``NoduleDetectionWidget``: the panel (``Resources/UI/NoduleDetection.ui``); GUI only. Runs the detector in
  a worker thread (``NoduleDetectionLogicLib.background``) and polls it with a ``qt.QTimer``, so the GUI
  stays live, the progress bar moves and Cancel stops the run without touching the scene.
* ``NoduleDetectionLogic``: everything a script needs, without the GUI (``logic.process(volumeNode)``); it
  delegates the scene work to ``NoduleDetectionLogicLib.scene`` (pure MRML, tested with pytest + slicer-core)
  and the detection to ``NoduleDetectionLib`` (the pure core).
* ``NoduleDetectionTest``: the self-test run by Slicer's test runner (``slicer_add_python_unittest``).

Python packages are installed at first use, after the user confirms (``setupPythonRequirements``). Until
then only modules that need nothing beyond Slicer's own Python are imported here (``parameters``,
``background``); ``scene`` and the detector are imported inside the functions that use them.
"""

import importlib.util
import logging
import os
import traceback

import qt
import slicer
import vtk
from NoduleDetectionLogicLib import parameters
from NoduleDetectionLogicLib.background import BackgroundTask
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Python packages installed from PyPI at first use (import name → pip requirement). SimpleITK, pydicom and
#: numpy come with Slicer; torch comes through the PyTorch extension (``PyTorchUtils``).
PIP_REQUIREMENTS = {"scipy": "scipy>=1.10", "skimage": "scikit-image>=0.21", "safetensors": "safetensors>=0.4"}
MINIMUM_TORCH_VERSION = "2.0"

#: QSettings key listing model files that the user added (models trained with the NoduleDetectionTraining
#: module are listed from the models folder, ``NoduleDetectionLib.registry``).
MODELS_SETTINGS_KEY = "NoduleDetection/Models"

#: Columns of the panel's results table: (table node column, header, format).
RESULT_COLUMNS = (
    ("label", "#", "{:.0f}"),
    ("R", "R (mm)", "{:.1f}"),
    ("A", "A (mm)", "{:.1f}"),
    ("S", "S (mm)", "{:.1f}"),
    ("diameter_mm", "Diameter (mm)", "{:.1f}"),
    ("volume_mm3", "Volume (mm³)", "{:.0f}"),
    ("probability", "Probability", "{:.2f}"),
    ("kind", "Kind", "{}"),
)


#
# NoduleDetection
#


class NoduleDetection(ScriptedLoadableModule):
    """Module description shown in Slicer (Help & Acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Nodule Detection"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["NoduleDetection developers"]
        self.parent.helpText = """
Finds lung nodules in a chest CT: a 3D U-net proposes candidates, a 3D CNN rejects false positives.
Each finding becomes a control point (at its centre), a segment (its outline) and a table row (centre,
diameter, volume, probability). Click a row to centre the slice views on that nodule.
<b>Research software, not a medical device: not for clinical use or diagnosis.</b>
See the <a href="https://github.com/NoduleDetection/SlicerNoduleDetection">extension documentation</a>.
"""
        self.parent.acknowledgementText = """
Developed by the NoduleDetection developers. The module's Slicer integration follows SlicerTotalSegmentator
and SlicerMONAIAuto3DSeg (Andras Lasso, PerkLab). Test scans: LIDC-IDRI (TCIA, CC BY 3.0).
"""


#
# NoduleDetectionWidget
#


class NoduleDetectionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: settings in the parameter node, a background run, progress, Cancel and the results table."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._task = None
        self._run = None  # what the running task will write to: input volume and the chosen output nodes
        self._lastStage = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.timeout.connect(self._pollTask)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleDetection.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = NoduleDetectionLogic()

        for device, title in parameters.DEVICES.items():
            self.ui.deviceComboBox.addItem(title, device)
        self._populateModels()
        self.ui.resultsTableWidget.setColumnCount(len(RESULT_COLUMNS))
        self.ui.resultsTableWidget.setHorizontalHeaderLabels([header for _, header, _ in RESULT_COLUMNS])
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for selector in (
            self.ui.inputVolumeSelector,
            self.ui.outputMarkupsSelector,
            self.ui.outputSegmentationSelector,
            self.ui.outputTableSelector,
        ):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resultsTableWidget.connect("itemSelectionChanged()", self.onResultSelected)

        self.initializeParameterNode()

    def cleanup(self):
        if self._task is not None:
            self._task.cancel()
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self):
        self._populateModels()  # a model trained meanwhile (NoduleDetectionTraining) appears
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self._task is not None:  # its results have nowhere to go: cancel, and drop them if it still ends
            self._task.cancel()
            self._run = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ------------------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference(parameters.INPUT_VOLUME):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.SetNodeReferenceID(parameters.INPUT_VOLUME, firstVolumeNode.GetID())

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            node = self._parameterNode
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference(parameters.INPUT_VOLUME))
            self.ui.outputMarkupsSelector.setCurrentNode(node.GetNodeReference(parameters.OUTPUT_MARKUPS))
            self.ui.outputSegmentationSelector.setCurrentNode(node.GetNodeReference(parameters.OUTPUT_SEGMENTATION))
            self.ui.outputTableSelector.setCurrentNode(node.GetNodeReference(parameters.OUTPUT_TABLE))
            try:
                settings = parameters.read_settings(node)
            except ValueError as exc:  # a hand-edited scene: show the defaults and say why
                logging.warning(f"NoduleDetection: {exc}; using defaults")
                settings = parameters.DetectionSettings()
            self._selectModel(settings.model)
            self.ui.deviceComboBox.setCurrentIndex(self.ui.deviceComboBox.findData(settings.device))
            self.ui.thresholdSliderWidget.value = settings.threshold

            inputVolume = node.GetNodeReference(parameters.INPUT_VOLUME)
            running = self._task is not None
            self.ui.applyButton.enabled = inputVolume is not None and not running
            self.ui.applyButton.toolTip = "Detect nodules" if inputVolume else "Select an input CT volume first"
            self._showResults(node.GetNodeReference(parameters.RESULTS_TABLE))
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        wasModified = node.StartModify()
        node.SetNodeReferenceID(parameters.INPUT_VOLUME, self.ui.inputVolumeSelector.currentNodeID)
        node.SetNodeReferenceID(parameters.OUTPUT_MARKUPS, self.ui.outputMarkupsSelector.currentNodeID)
        node.SetNodeReferenceID(parameters.OUTPUT_SEGMENTATION, self.ui.outputSegmentationSelector.currentNodeID)
        node.SetNodeReferenceID(parameters.OUTPUT_TABLE, self.ui.outputTableSelector.currentNodeID)
        settings = parameters.DetectionSettings(
            model=self.ui.modelComboBox.currentData or "",
            threshold=self.ui.thresholdSliderWidget.value,
            device=self.ui.deviceComboBox.currentData or "auto",
        )
        parameters.write_settings(node, settings)
        node.EndModify(wasModified)

    # --- models --------------------------------------------------------------------------------------------

    def _populateModels(self):
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for title, path in self.logic.availableModels():
            combo.addItem(title, path)
            combo.setItemData(combo.count - 1, path or "Model shipped with the extension", qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)

    def _selectModel(self, path):
        index = self.ui.modelComboBox.findData(path)
        if index < 0 and os.path.isfile(path):  # a model file named in a loaded scene: offer it
            NoduleDetectionLogic.registerModel(path)
            self._populateModels()
            index = self.ui.modelComboBox.findData(path)
        self.ui.modelComboBox.setCurrentIndex(index)

    def onModelChanged(self, index):
        """A model chosen in the panel brings its own default threshold (a restored scene keeps its saved one)."""
        if self._parameterNode is not None and not self._updatingGUIFromParameterNode:
            self.ui.thresholdSliderWidget.value = parameters.model_threshold(self.ui.modelComboBox.currentData or "")
        self.updateParameterNodeFromGUI()

    def onBrowseModel(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Select a NoduleDetection model file", "", "Model files (*.safetensors)"
        )
        if not path:
            return
        NoduleDetectionLogic.registerModel(path)
        self._populateModels()
        self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(path))

    # --- running -------------------------------------------------------------------------------------------

    def log(self, text):
        self.ui.statusLog.appendPlainText(text)

    def _setRunning(self, running):
        settingsWidgets = (
            self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton
        )
        for widget in settingsWidgets:
            widget.enabled = not running
        self.ui.applyButton.enabled = not running and self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.value = 0
            self._lastStage = None
            self._pollTimer.start()
        else:
            self._pollTimer.stop()

    def onApplyButton(self):
        if self._task is not None:
            return
        self.ui.statusLog.clear()
        try:
            if not self.logic.setupPythonRequirements():
                self.log("Python packages were not installed: detection cannot run.")
                return
        except Exception as exc:
            traceback.print_exc()
            slicer.util.errorDisplay(f"Python packages could not be installed: {exc}")
            return

        inputVolume = self.ui.inputVolumeSelector.currentNode()
        outputs = (
            self.ui.outputMarkupsSelector.currentNode(),
            self.ui.outputSegmentationSelector.currentNode(),
            self.ui.outputTableSelector.currentNode(),
        )
        filled = [node.GetName() for node in outputs if node is not None and self.logic.hasContent(node)]
        if filled and not slicer.util.confirmOkCancelDisplay(
            "The contents of these nodes will be replaced:\n" + "\n".join(filled)
            + "\n\nChoose 'Create new' outputs to keep them.",
            "Replace existing results?",
        ):
            return

        with slicer.util.tryWithErrorDisplay("Nodule detection could not start.", waitCursor=True):
            settings = parameters.read_settings(self._parameterNode)
            self.log(f"Input: {inputVolume.GetName()}; model: {self.ui.modelComboBox.currentText}; "
                     f"sensitivity threshold {settings.threshold:.2f}; device: {settings.device}")
            self._task = self.logic.startProcessing(inputVolume, settings)
            self._run = (inputVolume, *outputs)
        if self._task is not None:
            self._setRunning(True)

    def onCancelButton(self):
        if self._task is not None:
            self._task.cancel()
            self.ui.cancelButton.enabled = False
            self.log("Cancelling…")

    def _pollTask(self):
        task = self._task
        if task is None:
            self._setRunning(False)
            return
        stage, fraction = task.status()
        if stage != self._lastStage:
            self.log(f"{stage}…")
            self._lastStage = stage
        self.ui.progressBar.setFormat(f"{stage}: %p%")
        self.ui.progressBar.value = int(round(100 * fraction))
        if task.done:
            self._task = None
            self._setRunning(False)
            self._finishRun(task)

    def _finishRun(self, task):
        from NoduleDetectionLib.detect import Cancelled
        from NoduleDetectionLib.errors import NoduleDetectionError

        run, self._run = self._run, None
        try:
            result = task.result()
        except Cancelled:
            self.log("Cancelled: the scene was not changed.")
            return
        except NoduleDetectionError as exc:
            self.log(f"Error: {exc}")
            slicer.util.errorDisplay(str(exc))
            return
        except Exception as exc:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            self.log(f"Error: {exc}")
            slicer.util.errorDisplay(f"Nodule detection failed: {exc}")
            return
        if run is None:
            self.log("The scene was closed during the run: results discarded.")
            return
        with slicer.util.tryWithErrorDisplay("The results could not be added to the scene.", waitCursor=True):
            outputs = self.logic.addResults(result, *run)
            self._parameterNode.SetNodeReferenceID(parameters.RESULTS_TABLE, outputs.table.GetID())
            slicer.util.setSliceViewerLayers(background=run[0], fit=False)
            timing = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.timings.items())
            for warning in result.warnings:
                self.log(f"Warning: {warning}")
            self.log(f"Found {len(result.nodules)} finding(s) at threshold {result.threshold:.2f} ({timing}).")
            self.log(f"Results: '{outputs.markups.GetName()}', '{outputs.segmentation.GetName()}', "
                     f"'{outputs.table.GetName()}'.")

    # --- results -------------------------------------------------------------------------------------------

    def _showResults(self, tableNode):
        widget = self.ui.resultsTableWidget
        widget.setRowCount(0)
        self.ui.segmentationShow3DButton.setSegmentationNode(
            tableNode.GetNodeReference(parameters.ROLE_SEGMENTATION) if tableNode else None
        )
        if tableNode is None:
            return
        widget.setRowCount(tableNode.GetNumberOfRows())
        table = tableNode.GetTable()
        for row in range(tableNode.GetNumberOfRows()):
            for column, (name, _, fmt) in enumerate(RESULT_COLUMNS):
                array = table.GetColumnByName(name)
                value = array.GetValue(row) if array is not None else ""
                item = qt.QTableWidgetItem(fmt.format(value) if array is not None else "")
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                widget.setItem(row, column, item)
        widget.resizeColumnsToContents()

    def onResultSelected(self):
        tableNode = self._parameterNode.GetNodeReference(parameters.RESULTS_TABLE) if self._parameterNode else None
        markups = tableNode.GetNodeReference(parameters.ROLE_MARKUPS) if tableNode else None
        rows = {index.row() for index in self.ui.resultsTableWidget.selectedIndexes()}
        if markups is None or len(rows) != 1:
            return
        row = rows.pop()
        if row < markups.GetNumberOfControlPoints():
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(markups.GetID(), row, True)


#
# NoduleDetectionLogic
#


class NoduleDetectionLogic(ScriptedLoadableModuleLogic):
    """Nodule detection for Slicer scripts, without the GUI.

    Example (Slicer's Python console)::

        import NoduleDetection
        logic = NoduleDetection.NoduleDetectionLogic()
        markups, segmentation, table = logic.process(slicer.util.getNode("LIDC-IDRI-0003"))
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._detectors = {}

    def setDefaultParameters(self, parameterNode):
        parameters.set_defaults(parameterNode)

    # --- models --------------------------------------------------------------------------------------------

    @staticmethod
    def availableModels():
        """``[(title, path)]``: the shipped model (path ``""``), the trained models of the per-user models folder
        (``NoduleDetectionLib.registry``: title = model name) and the other added model files that exist."""
        from NoduleDetectionLib import registry

        trained = [(entry.name, str(entry.path)) for entry in registry.list_models()]
        paths = slicer.app.userSettings().value(MODELS_SETTINGS_KEY) or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        added = [(os.path.basename(p), p) for p in paths if os.path.isfile(p) and p not in dict(trained).values()]
        return [("Shipped model", "")] + trained + added

    @staticmethod
    def registerModel(path):
        """Offer the model file ``path`` in the panel's model list (kept in Slicer's settings).

        Models trained with the NoduleDetectionTraining module need no call: they are listed from the models
        folder.
        """
        if not path:
            return
        path = os.path.abspath(path)
        settings = slicer.app.userSettings()
        paths = settings.value(MODELS_SETTINGS_KEY) or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        if path not in paths:
            settings.setValue(MODELS_SETTINGS_KEY, paths + [path])

    # --- dependencies --------------------------------------------------------------------------------------

    def setupPythonRequirements(self, askConfirmation=True):
        """Install what is missing, after one confirmation; return False if the user declined.

        torch through the PyTorch extension (``PyTorchUtils``, which picks the CUDA or CPU build for this
        computer); scipy, scikit-image and safetensors from PyPI (``slicer.util.pip_install``). Nothing else
        is downloaded: the model is shipped with the extension.
        """
        missing = [req for module, req in PIP_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
        needTorch = importlib.util.find_spec("torch") is None
        if not needTorch:
            import torch
            from packaging import version

            if version.parse(torch.__version__) < version.parse(MINIMUM_TORCH_VERSION):
                raise RuntimeError(
                    f"PyTorch {torch.__version__} is too old (NoduleDetection needs {MINIMUM_TORCH_VERSION} or "
                    f"later): use the 'PyTorch Util' module to install >={MINIMUM_TORCH_VERSION}, then restart."
                )
        if not missing and not needTorch:
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                "NoduleDetection needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                "then restart Slicer."
            ) from None
        packages = (["torch (PyTorch extension)"] if needTorch else []) + missing
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "NoduleDetection needs Python packages that are not installed yet:\n  " + "\n  ".join(packages)
            + "\n\nThey will be downloaded and installed now (network connection needed; this can take several "
            "minutes, PyTorch is large).",
            "Install Python packages?",
        ):
            return False
        if needTorch:
            logging.info("NoduleDetection: installing PyTorch through the PyTorch extension")
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise RuntimeError("PyTorch could not be installed: install it with the 'PyTorch Util' module.")
        if missing:
            logging.info(f"NoduleDetection: installing {', '.join(missing)}")
            slicer.util.pip_install(missing)
        return True

    # --- detection -----------------------------------------------------------------------------------------

    def loadDetector(self, model="", device="auto"):
        """The ``detect.Detector`` for a model file (``""``: the shipped model) on a device; cached."""
        from NoduleDetectionLib.detect import Detector

        key = (model or "", device)
        if key not in self._detectors:
            self._detectors[key] = Detector.load(model or None, device=device)
        return self._detectors[key]

    @staticmethod
    def hasContent(node):
        """True if an output node already holds points, segments or rows (the GUI asks before replacing)."""
        if node.IsA("vtkMRMLMarkupsNode"):
            return node.GetNumberOfControlPoints() > 0
        if node.IsA("vtkMRMLSegmentationNode"):
            return node.GetSegmentation().GetNumberOfSegments() > 0
        if node.IsA("vtkMRMLTableNode"):
            return node.GetNumberOfRows() > 0 or node.GetNumberOfColumns() > 0
        return False

    def process(
        self,
        inputVolume,
        outputMarkups=None,
        outputSegmentation=None,
        outputTable=None,
        model="",
        threshold=None,
        device="auto",
        progressCallback=None,
        cancelCallback=None,
    ):
        """Detect nodules in ``inputVolume`` (a CT scalar volume node) and add them to the scene.

        Args:
            inputVolume: ``vtkMRMLScalarVolumeNode`` in HU; its IJK-to-RAS geometry and parent transform are
                honoured.
            outputMarkups, outputSegmentation, outputTable: nodes to fill (their contents are replaced);
                ``None`` (default) creates new nodes, so earlier results stay.
            model: model file (``""``: the shipped model). threshold: probability 0..1 (``None``: the
                model's default). device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
            progressCallback: ``f(stage, fraction)``; cancelCallback: ``f() -> bool`` (True stops the run
                with ``detect.Cancelled`` and the scene unchanged).

        Returns:
            ``(markupsNode, segmentationNode, tableNode)`` (a named tuple: ``.markups``, ``.segmentation``,
            ``.table``): one control point in RAS, one segment and one row per nodule.
        """
        from NoduleDetectionLogicLib import scene

        detector = self.loadDetector(model, device)
        return scene.run_detection(
            inputVolume, detector, threshold, progressCallback, cancelCallback,
            outputMarkups, outputSegmentation, outputTable,
        )

    def startProcessing(self, inputVolume, settings):
        """Start a detection in a worker thread; return its ``BackgroundTask`` (result: ``DetectionResult``).

        The volume is copied now, on the calling (main) thread; the worker never touches the scene. Apply the
        result with ``addResults`` on the main thread once ``task.done``.
        """
        from NoduleDetectionLogicLib import scene

        volume = scene.volume_from_node(inputVolume)
        settings = settings.validate()

        def work(progress, cancel):
            detector = self.loadDetector(settings.model, settings.device)
            return detector.detect(volume, threshold=settings.threshold, progress=progress, cancel=cancel)

        return BackgroundTask(work).start()

    def addResults(self, result, inputVolume, outputMarkups=None, outputSegmentation=None, outputTable=None):
        """Add a ``DetectionResult`` of ``inputVolume`` to the scene (see ``scene.add_result_nodes``)."""
        from NoduleDetectionLogicLib import scene

        return scene.add_result_nodes(result, inputVolume, outputMarkups, outputSegmentation, outputTable)


#
# NoduleDetectionTest
#


class NoduleDetectionTest(ScriptedLoadableModuleTest):
    """Self-test in the real Slicer application: sample CT (or a phantom) → logic → consistent nodes."""

    #: A small chest CT shipped with the extension, searched in ``Resources/Data`` next to the module and in
    #: the source tree's top-level ``Resources/Data``; without it a synthetic phantom is used.
    SAMPLE_CT = "sample_chest_ct.nrrd"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_detect_and_show()
        self.setUp()
        self.test_cancel_leaves_scene_unchanged()

    def _loadSampleCT(self):
        moduleDir = os.path.dirname(slicer.modules.noduledetection.path)
        for folder in (moduleDir, os.path.dirname(moduleDir)):
            path = os.path.join(folder, "Resources", "Data", self.SAMPLE_CT)
            if os.path.isfile(path):
                return slicer.util.loadVolume(path)
        import numpy as np
        from NoduleDetectionLib.synthetic import make_phantom
        from NoduleDetectionLogicLib import scene

        self.delayDisplay("No sample CT found: using a synthetic phantom")
        return scene.add_volume_node(slicer.mrmlScene, make_phantom(np.random.default_rng(0)).volume)

    def test_detect_and_show(self):
        import numpy as np

        logic = NoduleDetectionLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        volumeNode = self._loadSampleCT()
        self.delayDisplay("Detecting nodules")
        stages = []
        markups, segmentation, table = logic.process(volumeNode, progressCallback=lambda s, f: stages.append(s))
        self.assertTrue(stages)
        count = markups.GetNumberOfControlPoints()
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), count)
        self.assertEqual(table.GetNumberOfRows(), count)
        rasToIjk = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(rasToIjk)
        dims = np.array(volumeNode.GetImageData().GetDimensions())
        for i in range(count):
            position = [0.0, 0.0, 0.0]
            markups.GetNthControlPointPosition(i, position)
            row = [float(table.GetTable().GetValueByName(i, axis).ToDouble()) for axis in ("R", "A", "S")]
            np.testing.assert_allclose(position, row, atol=1e-3)
            ijk = np.array(rasToIjk.MultiplyPoint([*position, 1.0])[:3])
            self.assertTrue(np.all(ijk > -0.5) and np.all(ijk < dims - 0.5), "nodule centre outside the volume")
        self.delayDisplay(f"{count} finding(s): test passed")

    def test_cancel_leaves_scene_unchanged(self):
        from NoduleDetectionLib.detect import Cancelled

        logic = NoduleDetectionLogic()
        volumeNode = self._loadSampleCT()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(Cancelled):
            logic.process(volumeNode, cancelCallback=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Cancel: test passed")
