"""NoduleDetectionTraining 3D Slicer module: train or fine-tune the nodule detector without leaving Slicer.

Classes, as Slicer's scripted module template has them:

* ``NoduleDetectionTraining``: module description.
* ``NoduleDetectionTrainingWidget``: the panel (``Resources/UI/NoduleDetectionTraining.ui``); GUI only. The
  training runs in a child process (``NoduleDetectionTrainingLib.process``); a ``qt.QTimer`` polls its log
  once a second to move the progress bar, extend the loss / validation-CPM chart and show its output, so
  the GUI never waits on it. Stop interrupts the child and kills it only if it has not ended 30 s later.
* ``NoduleDetectionTrainingLogic``: everything a script needs (export a scene, prepare a run, start it,
  register its model, list and remove models), without the GUI.
* ``NoduleDetectionTrainingTest``: the self-test run by Slicer's test runner.

A run lives in ``<runs folder>/<model name>/``: ``dataset/`` (exported from the scene), ``config.json``,
``output/`` (``nodule-detection train``'s folder: log, checkpoint, model) and ``output.console.txt``. When it
ends, its model is registered in the per-user models folder (``NoduleDetectionLib.registry``), where the
NoduleDetection module lists it.
"""

import logging
import os
import shutil
import time

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Devices offered: parameter value → label.
DEVICES = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}
#: "Start from" choices besides the registered models.
FROM_SCRATCH = "scratch"
FROM_SHIPPED = "shipped"
#: Parameter node: the folder of the latest run (Resume continues it).
RUN_FOLDER = "RunFolder"


#
# NoduleDetectionTraining
#


class NoduleDetectionTraining(ScriptedLoadableModule):
    """Module description shown in Slicer (Help & Acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Nodule Detection Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["NoduleDetection"]
        self.parent.contributors = ["NoduleDetection developers"]
        self.parent.helpText = """
Trains or fine-tunes the Nodule Detection model on your own scans: a data set folder (LUNA16 layout, or
ct/ + annotations.csv), or the CT volumes of this scene with the nodules you marked (point lists, sized by a
ruler line across each or by a default diameter; or segmentations). Training runs in a separate process with
a live loss / validation-CPM chart; Stop keeps the last checkpoint and Resume continues from it. The
finished model appears in the Nodule Detection module's model list.
<b>Research software, not a medical device.</b>
See the <a href="https://github.com/NoduleDetection/SlicerNoduleDetection">extension documentation</a>.
"""
        self.parent.acknowledgementText = """
Developed by the NoduleDetection developers. Background processing follows SlicerMONAIAuto3DSeg
(Andras Lasso, PerkLab).
"""


#
# NoduleDetectionTrainingWidget
#


class NoduleDetectionTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: data, start model, schedule, device, name; Start / Stop / Resume; chart, log, models."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._run = None  # the running process.TrainingProcess
        self._runDir = None
        self._plot = None
        self._stopAsked = None  # time.monotonic() of the Stop click
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self._poll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleDetectionTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = NoduleDetectionTrainingLogic()

        for device, title in DEVICES.items():
            self.ui.deviceComboBox.addItem(title, device)
        self.ui.dataSceneRadioButton.connect("toggled(bool)", self._updateDataWidgets)
        self.ui.insertLesionsCheckBox.connect("toggled(bool)", self._updateDataWidgets)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.modelsListWidget.connect("currentTextChanged(QString)", self._showCard)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self._populateModels()
        self._updateDataWidgets()
        self._setRunning(False)

    def cleanup(self):
        if self._run is not None:
            self._run.stop()
        self._timer.stop()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self._plot = None  # its nodes go with the scene; a running training goes on and is registered

    # --- panel state ---------------------------------------------------------------------------------------

    def log(self, text):
        self.ui.statusLog.appendPlainText(text.rstrip("\n"))

    def _updateDataWidgets(self, *args):
        fromScene = self.ui.dataSceneRadioButton.checked
        for widget in (self.ui.sceneVolumesSelector, self.ui.sceneMarksSelector, self.ui.excludedMarksSelector,
                       self.ui.defaultDiameterSpinBox):
            widget.enabled = fromScene
        self.ui.dataFolderPathLineEdit.enabled = not fromScene
        self.ui.lesionsPerScanSpinBox.enabled = self.ui.insertLesionsCheckBox.checked

    def _populateModels(self):
        self.ui.modelsListWidget.clear()
        combo = self.ui.startFromComboBox
        current = combo.currentData
        combo.clear()
        combo.addItem("Shipped model (fine-tune)", FROM_SHIPPED)
        combo.addItem("From scratch", FROM_SCRATCH)
        for entry in self.logic.availableModels():
            self.ui.modelsListWidget.addItem(entry.name)
            combo.addItem(f"{entry.name} (fine-tune)", str(entry.path))
        combo.setCurrentIndex(max(combo.findData(current), 0))
        self.ui.removeModelButton.enabled = self.ui.modelsListWidget.count > 0

    def _showCard(self, name):
        entry = next((e for e in self.logic.availableModels() if e.name == name), None)
        self.ui.modelCardTextBrowser.setMarkdown(entry.card_path.read_text(encoding="utf-8")
                                                  if entry and entry.card_path.is_file() else "")

    def _setRunning(self, running):
        for widget in (self.ui.dataCollapsibleButton, self.ui.trainingCollapsibleButton,
                       self.ui.modelsCollapsibleButton):
            widget.enabled = not running
        self.ui.startButton.enabled = not running
        self.ui.resumeButton.enabled = not running and self._resumableRun() is not None
        self.ui.stopButton.enabled = running
        self.ui.progressBar.setVisible(running)
        if running:
            self._stopAsked = None
            self._timer.start()
        else:
            self._timer.stop()

    def _resumableRun(self):
        node = self.logic.getParameterNode()
        runDir = node.GetParameter(RUN_FOLDER) if node else ""
        return runDir if runDir and os.path.isfile(os.path.join(runDir, "output", "checkpoint.pt")) else None

    # --- start, stop, resume -------------------------------------------------------------------------------

    def onStart(self):
        self.ui.statusLog.clear()
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            if not self.logic.setupPythonRequirements():
                self.log("Python packages were not installed: training cannot run.")
                return
            name = self.ui.outputNameLineEdit.text.strip()
            runDir = self.logic.newRunFolder(name)
            if os.path.exists(runDir):
                if not slicer.util.confirmOkCancelDisplay(
                    f"A training named '{name}' was run before:\n{runDir}\n\nDelete it and start again? "
                    "(Resume continues it instead.)", "Replace the earlier run?"
                ):
                    return
                shutil.rmtree(runDir)
            insert = self.ui.lesionsPerScanSpinBox.value if self.ui.insertLesionsCheckBox.checked else 0
            if self.ui.dataSceneRadioButton.checked:
                excluded = self.ui.excludedMarksSelector.currentNode()
                exported = self.logic.exportScene(
                    self.ui.sceneVolumesSelector.checkedNodes(), os.path.join(runDir, "dataset"),
                    self.ui.sceneMarksSelector.checkedNodes() or None,
                    self.ui.defaultDiameterSpinBox.value,
                    [excluded] if excluded else [],
                )
                dataFolder = str(exported.root)
                data = f"scene: {len(exported.scans)} scan(s), {exported.nodule_count} marked nodule(s)"
                self.log(f"Exported {data} to {dataFolder}")
            else:
                dataFolder = self.ui.dataFolderPathLineEdit.currentPath
                data = f"folder {dataFolder}"
            if insert:
                data += f", {insert} synthetic lesions inserted per scan"
            self.logic.writeConfig(
                runDir, dataFolder, self.ui.validationPathLineEdit.currentPath or None, insert,
                self.ui.startFromComboBox.currentData, self.ui.stage1StepsSpinBox.value,
                self.ui.stage2StepsSpinBox.value, self.ui.timeBudgetSpinBox.value or None,
            )
            self._start(runDir, name, data, resume=False)

    def onResume(self):
        runDir = self._resumableRun()
        if runDir is None:
            return
        with slicer.util.tryWithErrorDisplay("Training could not resume.", waitCursor=True):
            metadata = self.logic.runInfo(runDir)
            self._start(runDir, metadata["name"], metadata["data"], resume=True)

    def _start(self, runDir, name, data, resume):
        self._runDir = runDir
        self.logic.getParameterNode().SetParameter(RUN_FOLDER, runDir)
        self.logic.saveRunInfo(runDir, name, data)
        self._plot = self.logic.trainingPlot()
        slicer.modules.plots.logic().ShowChartInLayout(self._plot.chart)
        device = self.ui.deviceComboBox.currentData
        self._run = self.logic.startTraining(runDir, device, resume=resume)
        self.log(f"{'Resuming' if resume else 'Training'} '{name}' on {device}; run folder {runDir}")
        self._setRunning(True)

    def onStop(self):
        if self._run is not None and self._stopAsked is None:
            self._run.interrupt()
            self._stopAsked = time.monotonic()
            self.ui.stopButton.enabled = False
            self.log("Stopping… (the last checkpoint is kept: Resume continues from it)")

    def _poll(self):
        from NoduleDetectionTrainingLib.process import STOP_TIMEOUT_S

        run = self._run
        if run is None:
            self._setRunning(False)
            return
        try:
            records = run.poll()
        except Exception as exc:  # a damaged log: say so, keep following the process
            self.log(f"Training log unreadable: {exc}")
            records = []
        if self._plot is not None and records:
            self._plot.add_records(records)
        progress = [r for r in records if r.get("stage") in ("stage1", "stage1_refine", "stage2")]
        if progress:
            last = progress[-1]
            self.ui.progressBar.setFormat(f"{last['stage']}: step {last['step']}/{last['steps']}")
            self.ui.progressBar.value = int(100 * last["step"] / max(last["steps"], 1))
        text = run.read_console()
        if text:
            self.log(text)
        if self._stopAsked is not None and run.running and time.monotonic() - self._stopAsked > STOP_TIMEOUT_S:
            self.log("The training did not stop by itself: killed.")
            run.kill()
        if not run.running:
            self._finish(run)

    def _finish(self, run):
        self._run = None
        self._setRunning(False)
        status = run.returncode
        if status == 0:
            with slicer.util.tryWithErrorDisplay("The trained model could not be registered.", waitCursor=True):
                info = self.logic.runInfo(self._runDir)
                entry = self.logic.registerTrainedModel(self._runDir, info["name"], info["data"])
                self.log(f"Finished. Model '{entry.name}' registered: {entry.path}\n"
                         "It is listed in the Nodule Detection module's model list.")
                self._populateModels()
        elif run.stop_requested:
            self.log(f"Stopped (exit status {status}). Resume continues from the last checkpoint.")
        else:
            self.log(f"Training failed (exit status {status}); see the output above.")
        self.ui.resumeButton.enabled = self._resumableRun() is not None and status != 0

    # --- models --------------------------------------------------------------------------------------------

    def onRemoveModel(self):
        item = self.ui.modelsListWidget.currentItem()
        if item is None:
            return
        if slicer.util.confirmOkCancelDisplay(f"Delete the model '{item.text()}' and its model card?",
                                              "Remove model"):
            with slicer.util.tryWithErrorDisplay("The model could not be removed."):
                self.logic.removeModel(item.text())
            self._populateModels()


#
# NoduleDetectionTrainingLogic
#


class NoduleDetectionTrainingLogic(ScriptedLoadableModuleLogic):
    """Training for Slicer scripts, without the GUI.

    Example (Slicer's Python console)::

        import NoduleDetectionTraining
        logic = NoduleDetectionTraining.NoduleDetectionTrainingLogic()
        runDir = logic.newRunFolder("my-model")
        exported = logic.exportScene([slicer.util.getNode("CT")], runDir + "/dataset")
        logic.writeConfig(runDir, str(exported.root), startFrom="shipped", stage1Steps=300, stage2Steps=200)
        logic.saveRunInfo(runDir, "my-model", "scene: my marks")
        run = logic.startTraining(runDir, "auto")       # a child process; poll run.poll() from a timer
        ...                                            # once run.returncode == 0:
        logic.registerTrainedModel(runDir, "my-model", "scene: my marks")
    """

    @staticmethod
    def setupPythonRequirements(askConfirmation=True):
        """Install torch and the packages the core needs, as the NoduleDetection module does."""
        from NoduleDetection import NoduleDetectionLogic

        return NoduleDetectionLogic().setupPythonRequirements(askConfirmation)

    @staticmethod
    def runsFolder():
        """Folder of the training runs: ``runs`` beside the per-user models folder."""
        from NoduleDetectionLib import registry

        return str(registry.models_dir().parent / "runs")

    def newRunFolder(self, name):
        """The run folder for a model ``name`` (checked: ``registry.check_name``); not created."""
        from NoduleDetectionLib import registry

        return os.path.join(self.runsFolder(), registry.check_name(name))

    @staticmethod
    def exportScene(volumeNodes, outdir, markNodes=None, defaultDiameterMm=6.0, excludedNodes=()):
        """Write volumes and their marks as a data set (``export.export_scene``); returns its ``ExportResult``."""
        from NoduleDetectionTrainingLib import export

        return export.export_scene(list(volumeNodes), outdir, markNodes, defaultDiameterMm, list(excludedNodes))

    @staticmethod
    def writeConfig(runDir, dataFolder, validationFolder=None, lesionsPerScan=0, startFrom=FROM_SHIPPED,
                    stage1Steps=300, stage2Steps=200, timeBudgetMinutes=None):
        """Write ``runDir/config.json`` for ``nodule-detection train``.

        ``startFrom``: ``"shipped"`` (fine-tune the shipped model), ``"scratch"``, or a model file to
        fine-tune. ``lesionsPerScan`` > 0 inserts that many synthetic lesions into each training scan.
        """
        from NoduleDetectionTrainingLib import process

        insert = {"lesions_per_scan": int(lesionsPerScan), "copies": 2, "seed": 1} if lesionsPerScan else None
        if startFrom == FROM_SHIPPED:
            from NoduleDetectionLib.registry import shipped_model_path

            initModel = str(shipped_model_path())
        else:
            initModel = None if startFrom == FROM_SCRATCH else startFrom
        config = process.training_config(
            [process.source(dataFolder, insert=insert)],
            [process.source(validationFolder)] if validationFolder else [],
            init_model=initModel, stage1={"steps": int(stage1Steps)}, stage2={"steps": int(stage2Steps)},
            time_budget_minutes=timeBudgetMinutes,
        )
        return process.write_config(config, os.path.join(runDir, "config.json"), overwrite=True)

    @staticmethod
    def saveRunInfo(runDir, name, data):
        """Remember the model name and data description of a run (``runDir/run.json``), for Resume."""
        import json

        from NoduleDetectionLib.atomic import write_text_atomic

        write_text_atomic(os.path.join(runDir, "run.json"), json.dumps({"name": name, "data": data}), overwrite=True)

    @staticmethod
    def runInfo(runDir):
        """``{"name", "data"}`` saved by ``saveRunInfo``."""
        import json

        with open(os.path.join(runDir, "run.json"), encoding="utf-8") as f:
            return json.load(f)

    @staticmethod
    def startTraining(runDir, device="auto", resume=False):
        """Start ``nodule-detection train runDir/config.json -o runDir/output`` in a child process (Slicer's
        ``PythonSlicer``); returns the ``process.TrainingProcess`` to poll."""
        from NoduleDetectionTrainingLib.process import TrainingProcess

        return TrainingProcess(os.path.join(runDir, "config.json"), os.path.join(runDir, "output"), device,
                               resume).start()

    @staticmethod
    def trainingPlot(scene=None):
        """The loss / validation-CPM chart nodes of ``scene`` (default: Slicer's scene), emptied."""
        from NoduleDetectionTrainingLib.plot import TrainingPlot

        return TrainingPlot(scene or slicer.mrmlScene)

    @staticmethod
    def registerTrainedModel(runDir, name, data, overwrite=True):
        """Copy the run's model into the models folder with its model card; returns the registry entry."""
        from NoduleDetectionLib import registry

        return registry.add_model(os.path.join(runDir, "output"), name, data=data, overwrite=overwrite)

    @staticmethod
    def availableModels():
        """The registered models (``registry.RegisteredModel``: name, path, card_path, metadata)."""
        from NoduleDetectionLib import registry

        return registry.list_models()

    @staticmethod
    def removeModel(name):
        """Delete a registered model and its card."""
        from NoduleDetectionLib import registry

        registry.remove_model(name)


#
# NoduleDetectionTrainingTest
#


class NoduleDetectionTrainingTest(ScriptedLoadableModuleTest):
    """Self-test in the real Slicer application: a phantom scene with marked nodules → export → a short
    training in a child process (PythonSlicer) → registered model → the NoduleDetection module runs it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scene_to_model()

    def test_scene_to_model(self):
        import tempfile

        import numpy as np
        from NoduleDetectionLib import registry
        from NoduleDetectionLib.synthetic import make_phantom
        from NoduleDetectionLogicLib import scene

        from NoduleDetection import NoduleDetectionLogic

        logic = NoduleDetectionTrainingLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        work = tempfile.mkdtemp(prefix="NoduleDetectionTrainingTest-")
        previous = os.environ.get(registry.MODELS_DIR_ENV)
        os.environ[registry.MODELS_DIR_ENV] = os.path.join(work, "models")
        try:
            phantom = make_phantom(np.random.default_rng(0), n_nodules=3, diameters_mm=(8.0, 12.0))
            volumeNode = scene.add_volume_node(slicer.mrmlScene, phantom.volume)
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "marked nodules")
            for centre, _ in phantom.nodules:
                points.AddControlPoint(vtk.vtkVector3d(-centre[0], -centre[1], centre[2]))
            self.delayDisplay("Exporting the scene")
            runDir = os.path.join(work, "runs", "selftest")
            exported = logic.exportScene([volumeNode], os.path.join(runDir, "dataset"), defaultDiameterMm=10.0)
            self.assertEqual(exported.nodule_count, len(phantom.nodules))
            logic.writeConfig(runDir, str(exported.root), startFrom=FROM_SCRATCH, stage1Steps=40, stage2Steps=20)
            run = logic.startTraining(runDir, "cpu")
            plot = logic.trainingPlot()
            self.delayDisplay("Training in a child process")
            deadline = time.monotonic() + 900
            while run.running and time.monotonic() < deadline:
                plot.add_records(run.poll())
                slicer.app.processEvents()  # the GUI stays live while the child trains
                time.sleep(0.2)
            plot.add_records(run.poll())
            self.assertEqual(run.returncode, 0, run.read_console()[-2000:])
            self.assertEqual(plot.loss_table.GetNumberOfRows(), 60)
            entry = logic.registerTrainedModel(runDir, "selftest", "phantom scene")
            titles = [title for title, _ in NoduleDetectionLogic.availableModels()]
            self.assertIn("selftest", titles)
            markups, segmentation, table = NoduleDetectionLogic().process(volumeNode, model=str(entry.path),
                                                                         threshold=0.0, device="cpu")
            self.assertEqual(table.GetNumberOfRows(), markups.GetNumberOfControlPoints())
            logic.removeModel("selftest")
            self.assertNotIn("selftest", [title for title, _ in NoduleDetectionLogic.availableModels()])
            self.delayDisplay("Training self-test passed")
        finally:
            if previous is None:
                os.environ.pop(registry.MODELS_DIR_ENV, None)
            else:
                os.environ[registry.MODELS_DIR_ENV] = previous
            shutil.rmtree(work, ignore_errors=True)
            logging.info("NoduleDetectionTrainingTest: work folder removed")
