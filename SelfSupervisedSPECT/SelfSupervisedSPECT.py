"""SelfSupervisedSPECT: quantitative 177Lu SPECT reconstruction in 3D Slicer.

Module . Widget . Logic . Test, as in Slicer's scripted-module template. The Widget is the panel
(real Slicer app only: qt and ctk are imported inside its methods); the Logic is the MRML-only
Slicer side (`SelfSupervisedSPECTLib`), which reaches the engine (`sspect`) through its door, a
separate process. Nothing here imports torch or pytomography at file scope, and nothing is
installed when the module loads or its panel is set up: the engine's packages are installed on the
first Run, after the user agrees.
"""
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import tempfile

import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SelfSupervisedSPECTLib import DoorError, SelfSupervisedSPECTLogicBase

MODULE_NAME = "SelfSupervisedSPECT"
ROLE_ATTRIBUTE = "SelfSupervisedSPECT.Role"
ROLE_PROJECTIONS = "projections"

# PyTorch comes first (through the PyTorch extension when present); Resources/requirements.txt
# holds the engine's other packages, with the versions it needs.
TORCH_DISTRIBUTION = "torch"
# Packages Slicer ships: installing the engine's requirements must never replace them.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "requests", "torch")

# Device combo box entries, in the .ui's order, as the job file names them.
DEVICES = ("auto", "cpu", "cuda")
BINNING_CHOICES = (1, 2, 4)  # binningComboBox items, in order
PROJECTOR_CHOICES = ("fast", "pytomography")  # projectorComboBox items, in order
ISOTOPE_CHOICES = (None, "177Lu", "99mTc", "111In", "131I")  # isotopeComboBox items, in order (None: from the file)

POLL_INTERVAL_MS = 150

# Widget states: a small state machine (see SelfSupervisedSPECTWidget._setState).
IDLE, RUNNING, CANCELLING, DONE, FAILED = "idle", "running", "cancelling", "done", "failed"


#
# SelfSupervisedSPECT
#


class SelfSupervisedSPECT(ScriptedLoadableModule):
    """Module description; uses the ScriptedLoadableModule base class, available at
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SelfSupervisedSPECT"
        self.parent.categories = ["Nuclear Medicine"]
        self.parent.dependencies = []
        self.parent.contributors = ["The SelfSupervisedSPECT developers"]
        self.parent.helpText = """
<p>Quantitative <sup>177</sup>Lu SPECT reconstruction for radiopharmaceutical-therapy dosimetry
(<sup>177</sup>Lu-PSMA, <sup>177</sup>Lu-DOTATATE), with classical (OSEM, MAP with a relative
difference prior), supervised and self-supervised methods. The reconstruction runs in a background
process (PythonSlicer), so Slicer stays responsive; the result is shown in Bq/mL fused with the CT.</p>
<p><b>Use:</b> load the NM TOMO projections and the CT through the DICOM module (or with
<i>Load projection files...</i> / <i>Load CT files...</i>), choose the method and its parameters,
enter the system sensitivity (cps/MBq; 0 keeps the image in counts) and press <i>Run</i>. The
energy windows are chosen automatically (the window containing 208 keV, scatter windows touching
it: TEW or DEW); untick <i>Automatic</i> to give them by index or keV range. <i>Compute table</i>
measures every segment of a segmentation in the reconstructed images.</p>
<p><b>Self-supervised methods</b> (the deep image prior, Noise2Noise-type denoisers, DL-BPF) train a network on
this scan alone and stop by themselves on held-out counts. On a CPU choose <i>Grid: 2x2 binned</i>
(about 8 times faster); n2n and noise2inverse also load a voxel uncertainty map (<i>... SD</i>).</p>
<p><b>Supervised methods</b> (post-unet, unrolled-mapem) apply networks trained on simulated
<sup>177</sup>Lu torso scans that ship with the extension (no download). They were trained for the
GE MEGP collimator at 8.8 mm voxels: choose <i>Grid: 2x2 binned</i> for 4.4 mm detectors; other
collimators or voxel sizes are refused. They generalise only as far as their training data: check
them against OSEM.</p>
<p>The first Run offers to install PyTorch (with the PyTorch extension when present) and the
engine's other Python packages.</p>
<p><b>Python console:</b></p>
<pre>
logic = slicer.util.getModuleLogic("SelfSupervisedSPECT")
projNode = logic.load_projection_series(["/path/NM/bed1.dcm"])
ctNode = logic.load_ct_series(ctFiles)
run = logic.reconstruct(projNode, ctNode, method="osem", iterations=4, subsets=6,
                        calibration_cps_per_MBq=9.4, wait=True)
activityNode = logic.load_result(run, ct_node=ctNode)
logic.show_fused(ctNode, activityNode, opacity=0.5)
table = logic.dosimetry_table(segmentationNode, [activityNode])
print(logic.methods())   # methods and their parameters
</pre>
<p>The same job runs from the command line: <code>sspect reconstruct ...</code> and
<code>sspect run-job job.json</code>.</p>
"""
        self.parent.acknowledgementText = """
<p>Reconstruction uses PyTomography: L. Polson, P. Esquinas, S. Kurkowska, C. Li, P. Sheikhzadeh,
M. Abbasi, F. Uribe, A. Rahmim, C. Uribe. PyTomography: a Python library for medical image
reconstruction. SoftwareX 29, 102020 (2025).</p>
<p>Self-supervised reconstruction with a deep image prior follows K. Gong, C. Catana, J. Qi,
Q. Li. PET image reconstruction using deep image prior. IEEE Transactions on Medical Imaging
38(7), 1655-1665 (2019).</p>
<p>Self-supervised and supervised deep learning for reconstruction: A. J. Reader. Self-supervised
and supervised deep learning for PET image reconstruction. AIP Conference Proceedings (2024).</p>
<p>Unrolled MAP-EM: A. Mehranian, A. J. Reader. Model-based deep learning PET image reconstruction
using forward-backward splitting expectation-maximization. IEEE TRPMS 5(1), 54-64 (2021); Z. Li,
Y. K. Dewaraja, J. A. Fessler. Training end-to-end unrolled iterative neural networks for SPECT
image reconstruction. IEEE TRPMS 7(4), 410-420 (2023).</p>
<p>Noise2Noise by count splitting: Leube et al., Nuklearmedizin (2023); Noise2Inverse:
A. A. Hendriksen, D. M. Pelt, K. J. Batenburg, IEEE Transactions on Computational Imaging 6,
1320-1335 (2020).</p>
<p>The real test study comes from the SlicerSPECTRecon sample data (MIT licence).</p>
"""
        # The DICOM plugin registers itself: Slicer instantiates DICOMSPECTProjectionsPlugin.py's
        # hidden module class while loading the modules (see that file).


#
# Engine dependencies (installed on the first Run, never at start-up)
#


def readRequirements(path):
    """The requirement lines of a requirements.txt (comments and blank lines dropped)."""
    with open(path) as stream:
        return [line.split("#", 1)[0].strip() for line in stream if line.split("#", 1)[0].strip()]


def unmetRequirements(requirements):
    """The requirements this Python does not satisfy (not installed, or outside the version range),
    found from the installed distributions' metadata, without importing any of them."""
    import importlib.metadata
    import re

    try:
        from packaging.requirements import Requirement
    except ImportError:  # no version check without `packaging`: presence only
        Requirement = None
    importlib.invalidate_caches()
    unmet = []
    for line in requirements:
        requirement = Requirement(line) if Requirement is not None else None
        name = requirement.name if requirement is not None else re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(line)
            continue
        if requirement is not None and requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            unmet.append(line)
    return unmet


def writeProtectingConstraints(path):
    """A pip constraints file that pins the packages Slicer already has, so that installing the
    engine's requirements never upgrades or replaces them."""
    import importlib.metadata

    lines = []
    for distribution in PROTECTED_DISTRIBUTIONS:
        try:
            lines.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    with open(path, "w") as stream:
        stream.write("\n".join(lines) + "\n")
    return path


def describeNvidiaSmi(output):
    """'GPU <name>: <free> of <total> GiB free' per line of `nvidia-smi --query-gpu=name,memory.free,
    memory.total --format=csv,noheader,nounits` (MiB); '' when there is none."""
    described = []
    for line in output.splitlines():
        parts = [part.strip() for part in line.rsplit(",", 2)]
        if len(parts) == 3 and parts[0]:
            name, free, total = parts
            described.append(f"GPU {name}: {float(free) / 1024:.1f} of {float(total) / 1024:.1f} GiB free")
    return "; ".join(described)


#
# SelfSupervisedSPECTWidget
#


class SelfSupervisedSPECTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. States: idle -> running -> (done | failed | idle after a cancel); Run becomes
    Cancel while running; the engine's events are polled with a QTimer so Slicer never blocks.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._state = IDLE
        self._run = None
        self._runInputs = {}
        self._timer = None
        self._methods = None
        self._parameterWidgets = {}
        self._parameterValues = {}  # method -> {name: value}: edits survive switching methods
        self._lastProgressMessage = None
        self._parametersMethod = None

    # ---- set-up -------------------------------------------------------------------------------

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SelfSupervisedSPECT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Creating the logic starts nothing and installs nothing.
        self.logic = SelfSupervisedSPECTLogic()

        self.ui.projectionSelector.addAttribute("vtkMRMLScalarVolumeNode", ROLE_ATTRIBUTE, ROLE_PROJECTIONS)
        self.ui.projectionSelector.setMRMLScene(slicer.mrmlScene)

        self.ui.projectionSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onProjectionChanged)
        self.ui.ctSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.loadProjectionFilesButton.connect("clicked(bool)", self.onLoadProjectionFiles)
        self.ui.loadCTFilesButton.connect("clicked(bool)", self.onLoadCTFiles)
        self.ui.automaticWindowsCheckBox.connect("toggled(bool)", self.onAutomaticWindowsToggled)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.runButton.connect("clicked(bool)", self.onRunButton)
        self.ui.resultSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.fusionOpacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.showFusedButton.connect("clicked(bool)", self.onShowFused)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.dosimetryVolumesSelector.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.computeTableButton.connect("clicked(bool)", self.onComputeTable)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self.onAutomaticWindowsToggled(self.ui.automaticWindowsCheckBox.checked)
        self._setState(IDLE)
        self.onProjectionChanged(self.ui.projectionSelector.currentNode())

    def enter(self):
        """Each time the panel is shown: the method list (from the engine's registry) on first use,
        and the device information."""
        self._ensureMethods()
        self._updateDeviceInfo()

    def cleanup(self):
        """Module reload or application exit: stop polling and stop the engine process."""
        if self._timer is not None:
            self._timer.stop()
        if self._run is not None and self._run.state == "running":
            self._run.cancel()
        self._run = None
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self._run is not None and self._state in (RUNNING, CANCELLING):
            self._log("The scene is closing: the reconstruction is cancelled.")
            self._run.cancel()

    # ---- inputs -------------------------------------------------------------------------------

    def onProjectionChanged(self, node=None):
        self.ui.studySummaryLabel.text = self._studySummary(node) if node else "Select the SPECT projections."
        self.updateButtons()

    def _studySummary(self, node):
        """A few lines about the selected projections: views, frame size, files, displayed window."""
        lines = []
        imageData = node.GetImageData()
        if imageData is not None:
            dims = imageData.GetDimensions()
            lines.append(f"{dims[2]} views of {dims[0]} x {dims[1]} pixels")
        try:
            files = self.logic.files_for_node(node)
            lines.append(f"{len(files)} file(s): " + ", ".join(os.path.basename(f) for f in files[:3])
                         + (" ..." if len(files) > 3 else ""))
        except DoorError as error:
            lines.append(str(error))
        window = node.GetAttribute("SelfSupervisedSPECT.DisplayedWindowKeV")
        if window:
            try:
                low, high = json.loads(window)
                lines.append(f"shown: the photopeak window {low:g}-{high:g} keV")
            except (ValueError, TypeError):
                pass
        return "\n".join(lines)

    def onAutomaticWindowsToggled(self, automatic):
        for lineEdit in (self.ui.peakWindowLineEdit, self.ui.lowerWindowLineEdit, self.ui.upperWindowLineEdit):
            lineEdit.enabled = not automatic and self._state not in (RUNNING, CANCELLING)

    def _windows(self):
        """None (automatic) or {"peak", "lower", "upper"}: an index, a keV range, "none" or None."""
        if self.ui.automaticWindowsCheckBox.checked:
            return None
        windows = {}
        for key, lineEdit in (("peak", self.ui.peakWindowLineEdit), ("lower", self.ui.lowerWindowLineEdit),
                              ("upper", self.ui.upperWindowLineEdit)):
            text = lineEdit.text.strip()
            windows[key] = text or None
        return windows

    def onLoadProjectionFiles(self):
        self._loadFiles("NM TOMO projection files (one per bed)", self.logic.load_projection_series, self.ui.projectionSelector)

    def onLoadCTFiles(self):
        self._loadFiles("CT series files (select all slices)", self.logic.load_ct_series, self.ui.ctSelector)

    def _loadFiles(self, title, load, selector):
        """Pick files, load them with the logic and select the new node; errors as one sentence."""
        import qt

        files = qt.QFileDialog.getOpenFileNames(slicer.util.mainWindow(), title, "",
                                                "DICOM (*.dcm *.DCM *.ima *.IMA);;All files (*)")
        if not files:
            return
        node = self._attempt(lambda: load(list(files)), "The files could not be loaded")
        if node is not None:
            selector.setCurrentNode(node)

    def _attempt(self, action, failure):
        """Run a user action; a DoorError (its own sentence) or an unexpected failure (``failure``
        and the cause) is shown in the panel, and None is returned."""
        try:
            return action()
        except DoorError as error:
            self._showError(str(error))
        except Exception as error:
            logging.exception(failure)
            self._showError(f"{failure} ({type(error).__name__}: {error}); see the Python console.")
        return None

    # ---- method and parameters (built from the engine's registry: no GUI code per method) ------

    def _ensureMethods(self):
        if self._methods:
            return True
        try:
            methods = self.logic.methods()
        except DoorError as error:
            self._setStatus(str(error), error=True)
            return False
        except Exception as error:
            logging.exception("Listing the engine's methods failed")
            self._setStatus(f"The engine's methods could not be listed ({type(error).__name__}: {error}).", error=True)
            return False
        if not methods:
            self._setStatus("The engine offers no reconstruction method; reinstall the extension.", error=True)
            return False
        self._methods = methods
        combo = self.ui.methodComboBox
        combo.blockSignals(True)
        combo.clear()
        for name, description in methods.items():
            combo.addItem(description.get("title") or name, name)
        combo.currentIndex = max(0, list(methods).index("osem") if "osem" in methods else 0)
        combo.blockSignals(False)
        self.onMethodChanged(combo.currentIndex)
        return True

    def _currentMethod(self):
        combo = self.ui.methodComboBox
        if combo.currentIndex < 0:
            return None
        return combo.itemData(combo.currentIndex)

    def onMethodChanged(self, index=None):
        if not self._methods:
            return
        previous = self._parametersMethod
        if previous and self._parameterWidgets:
            self._parameterValues[previous] = self._parameters()
        method = self._currentMethod()
        description = self._methods.get(method, {})
        self.ui.methodDescriptionLabel.text = f"{description.get('family', '')} method '{method}'".strip()
        self._buildParameterForm(description.get("params", []), self._parameterValues.get(method, {}))
        self._parametersMethod = method
        self.updateButtons()

    def _buildParameterForm(self, params, values):
        import qt

        layout = self.ui.parametersWidget.layout()
        while layout.rowCount() > 0:
            layout.removeRow(0)
        self._parameterWidgets = {}
        for param in params:
            widget = self._parameterWidget(qt, param, values.get(param["name"], param.get("default")))
            widget.toolTip = param.get("help") or ""
            widget.setObjectName(f"parameter_{param['name']}")
            label = qt.QLabel(param["name"].replace("_", " ").capitalize() + ":")
            label.toolTip = widget.toolTip
            layout.addRow(label, widget)
            self._parameterWidgets[param["name"]] = (param, widget)

    @staticmethod
    def _parameterWidget(qt, param, value):
        kind, minimum, maximum = param.get("type"), param.get("minimum"), param.get("maximum")
        if param.get("choices"):
            widget = qt.QComboBox()
            for choice in param["choices"]:
                widget.addItem(str(choice))
            widget.currentText = str(value)
        elif kind == "bool":
            widget = qt.QCheckBox()
            widget.checked = bool(value)
        elif kind == "int":
            widget = qt.QSpinBox()
            widget.minimum = int(minimum) if minimum is not None else -2**31 + 1
            widget.maximum = int(maximum) if maximum is not None else 2**31 - 1
            widget.value = int(value if value is not None else 0)
        elif kind == "float":
            widget = qt.QDoubleSpinBox()
            widget.decimals = 4
            widget.minimum = float(minimum) if minimum is not None else -1e12
            widget.maximum = float(maximum) if maximum is not None else 1e12
            span = widget.maximum - widget.minimum
            widget.singleStep = 0.01 if span <= 1 else 0.1 if span <= 100 else 1.0
            widget.value = float(value if value is not None else 0.0)
        else:
            widget = qt.QLineEdit()
            widget.text = "" if value is None else str(value)
        return widget

    def _parameters(self):
        values = {}
        for name, (param, widget) in self._parameterWidgets.items():
            if param.get("choices"):
                text = widget.currentText
                values[name] = next((c for c in param["choices"] if str(c) == text), text)
            elif param.get("type") == "bool":
                values[name] = bool(widget.checked)
            elif param.get("type") == "int":
                values[name] = int(widget.value)
            elif param.get("type") == "float":
                values[name] = float(widget.value)
            else:
                values[name] = widget.text
        return values

    # ---- device -------------------------------------------------------------------------------

    def onDeviceChanged(self, index=None):
        self._updateDeviceInfo()

    def _device(self):
        index = self.ui.deviceComboBox.currentIndex
        return DEVICES[index] if 0 <= index < len(DEVICES) else "auto"

    def _updateDeviceInfo(self):
        if self._device() == "cpu":
            self.ui.deviceInfoLabel.text = ""
            return
        self.ui.deviceInfoLabel.text = self._gpuInformation()

    @staticmethod
    def _gpuInformation():
        """Free GPU memory from nvidia-smi; Slicer's process never imports torch."""
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed yet: it is offered on the first Run (with CUDA when a GPU is found)."
        import shutil

        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                output = subprocess.run([smi, "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                                        capture_output=True, text=True, timeout=5, check=True).stdout
                described = describeNvidiaSmi(output)
                if described:
                    return described
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        # The Slicer process never imports torch (DESIGN.md); the engine reports its device when it runs.
        return "GPU memory unknown (nvidia-smi not found); Automatic chooses the GPU at run time when PyTorch sees one."

    # ---- run / cancel: the state machine ------------------------------------------------------

    def _setState(self, state, message=None, error=False):
        self._state = state
        busy = state in (RUNNING, CANCELLING)
        self.ui.runButton.text = {RUNNING: "Cancel", CANCELLING: "Cancelling..."}.get(state, "Run")
        self.ui.runButton.toolTip = ("Stop the engine process; nothing half-written is kept." if busy
                                     else "Reconstruct in a background process; Slicer stays responsive.")
        for widget in (self.ui.projectionSelector, self.ui.ctSelector, self.ui.loadProjectionFilesButton,
                       self.ui.loadCTFilesButton, self.ui.automaticWindowsCheckBox, self.ui.methodComboBox,
                       self.ui.parametersWidget, self.ui.calibrationSpinBox, self.ui.deviceComboBox,
                       self.ui.binningComboBox, self.ui.projectorComboBox, self.ui.isotopeComboBox,
                       self.ui.photopeaksLineEdit):
            widget.enabled = not busy
        self.onAutomaticWindowsToggled(self.ui.automaticWindowsCheckBox.checked)
        bar = self.ui.progressBar
        if state == RUNNING:
            bar.value = 0
            bar.format = "Starting the engine..."
        elif state == CANCELLING:
            bar.format = "Cancelling..."
        elif state == DONE:
            bar.value = bar.maximum
            bar.format = "Done"
        elif state == FAILED:
            bar.format = "Failed"
        else:
            bar.value = 0
            bar.format = "Idle"
        if message is not None:
            self._setStatus(message, error=error)
        self.updateButtons()

    def updateButtons(self, *args):
        if self.ui is None:
            return
        busy = self._state in (RUNNING, CANCELLING)
        ready = self.ui.projectionSelector.currentNode() is not None
        self.ui.runButton.enabled = self._state == RUNNING or (not busy and ready)
        if not busy:
            self.ui.runButton.toolTip = ("Reconstruct in a background process; Slicer stays responsive." if ready
                                         else "Select the SPECT projections first.")
        result = self.ui.resultSelector.currentNode()
        self.ui.showFusedButton.enabled = result is not None
        volumes = self._dosimetryVolumes()
        self.ui.computeTableButton.enabled = self.ui.segmentationSelector.currentNode() is not None and bool(volumes)

    def onRunButton(self):
        if self._state == RUNNING:
            self._cancel()
            return
        if self._state == CANCELLING:
            return
        projection = self.ui.projectionSelector.currentNode()
        if projection is None:
            self._setStatus("Select the SPECT projections first (DICOM module or Load projection files...).", error=True)
            return
        if not self._ensureMethods():
            return
        if not self._ensureEngineDependencies():
            return
        ct = self.ui.ctSelector.currentNode()
        method = self._currentMethod()
        calibration = float(self.ui.calibrationSpinBox.value)
        options = {"calibration_cps_per_MBq": calibration if calibration > 0 else None,
                   "device": self._device(), "windows": self._windows(),
                   "detector_binning": BINNING_CHOICES[self.ui.binningComboBox.currentIndex],
                   "projector": PROJECTOR_CHOICES[self.ui.projectorComboBox.currentIndex],
                   "isotope": ISOTOPE_CHOICES[self.ui.isotopeComboBox.currentIndex],
                   "photopeaks": self.ui.photopeaksLineEdit.text.strip() or None}
        self.ui.logTextEdit.clear()
        self._lastProgressMessage = None
        try:
            run = self.logic.reconstruct(projection, ct, method=method, wait=False, **options, **self._parameters())
        except DoorError as error:
            self._setState(FAILED, str(error), error=True)
            return
        except Exception as error:
            logging.exception("Starting the reconstruction failed")
            self._showError(f"The reconstruction could not be started ({type(error).__name__}: {error}); "
                            "see the Python console.", state=FAILED)
            return
        self._run = run
        self._runInputs = {"ct": ct, "projection": projection, "method": method}
        self._log(f"Started {method} on {projection.GetName()}" + (f" with CT {ct.GetName()}" if ct else " without CT"))
        self._setState(RUNNING, f"Reconstructing with {method}...")
        self._timer.start()

    def _cancel(self):
        if self._run is None:
            return
        self._setState(CANCELLING, "Cancelling: stopping the engine process...")
        self._run.cancel()

    def onPollTimer(self):
        """Every POLL_INTERVAL_MS while running: take the engine's events, settle the state when it ends.
        Nothing may raise into Qt's event loop, or the panel would stay in 'running' for ever."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        try:
            for event in run.poll():
                self._onEvent(event)
            if run.state == "running":
                return
            self._timer.stop()
            self._run = None
            if run.state == "done":
                self._onRunDone(run)
            elif run.state == "cancelled" or self._state == CANCELLING:
                self._setState(IDLE, "Cancelled; the scene is unchanged.")
            else:
                self._showError(run.error or "The reconstruction failed; see the log.", state=FAILED)
        except Exception as error:
            logging.exception("Following the engine failed")
            self._timer.stop()
            if self._run is not None and self._run.state == "running":
                self._run.cancel()
            self._run = None
            self._showError(f"Following the reconstruction failed ({type(error).__name__}: {error}); "
                            "the engine was stopped, see the Python console.", state=FAILED)

    def _onEvent(self, event):
        kind = event.get("event")
        if kind == "progress":
            fraction = max(0.0, min(1.0, float(event.get("fraction") or 0.0)))
            message = str(event.get("message") or "").replace("%", " percent")
            if event.get("iteration") is not None and "iteration" not in message.lower():
                message = f"{message} (iteration {event['iteration']})".strip()
            bar = self.ui.progressBar
            if self._state == RUNNING:
                bar.value = int(round(fraction * bar.maximum))
                bar.format = f"{message}  %p%" if message else "%p%"
            if message and message != self._lastProgressMessage:
                self._log(message)
                self._lastProgressMessage = message
        elif kind in ("warning", "log"):
            self._log(("Warning: " if kind == "warning" else "") + str(event.get("message", "")))
            if kind == "warning":
                self._setStatus(str(event.get("message", "")))
        elif kind == "error":
            self._log("Error: " + str(event.get("message", "")))
        elif kind == "start":
            self._log("The engine started.")
        elif kind == "result":
            self._log("Result files: " + ", ".join(f"{k}: {v}" for k, v in (event.get("files") or {}).items()))

    def _onRunDone(self, run):
        ct = self._runInputs.get("ct")
        try:
            node = self.logic.load_result(run, ct_node=ct)
        except DoorError as error:
            self._showError(str(error), state=FAILED)
            return
        self.ui.resultSelector.setCurrentNode(node)
        self._showFused(node)
        self._setState(DONE, f"Done: {node.GetName()}" + (f", shown over {ct.GetName()}." if ct else "."))

    # ---- result and dosimetry -----------------------------------------------------------------

    def _showFused(self, activity):
        ct = self.ui.ctSelector.currentNode() or self._runInputs.get("ct")
        try:
            self.logic.show_fused(ct, activity, opacity=float(self.ui.fusionOpacitySliderWidget.value))
        except DoorError as error:
            self._setStatus(str(error), error=True)

    def onShowFused(self):
        activity = self.ui.resultSelector.currentNode()
        if activity is not None:
            self._showFused(activity)

    def onOpacityChanged(self, value):
        if self.ui.resultSelector.currentNode() is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=float(value))

    def _dosimetryVolumes(self):
        checked = list(self.ui.dosimetryVolumesSelector.checkedNodes() or [])
        if checked:
            return checked
        result = self.ui.resultSelector.currentNode()
        return [result] if result is not None else []

    def onComputeTable(self):
        segmentation = self.ui.segmentationSelector.currentNode()
        volumes = self._dosimetryVolumes()
        if segmentation is None or not volumes:
            self._setStatus("Select a segmentation and an activity image first.", error=True)
            return
        table = self._attempt(lambda: self.logic.dosimetry_table(segmentation, volumes), "The table could not be computed")
        if table is None:
            return
        self.ui.tableView.setMRMLTableNode(table)
        self._setStatus(f"Table {table.GetName()}: {table.GetNumberOfRows()} rows.")

    # ---- dependencies -------------------------------------------------------------------------

    def _ensureEngineDependencies(self):
        """On the first Run: install PyTorch and the engine's packages into Slicer's Python (the
        engine runs with PythonSlicer, the same environment), after the user agrees."""
        requirementsPath = self.resourcePath("requirements.txt")
        try:
            requirements = [TORCH_DISTRIBUTION] + readRequirements(requirementsPath)
        except OSError:
            self._showError(f"The list of the engine's packages ({requirementsPath}) is missing; reinstall the extension.")
            return False
        unmet = unmetRequirements(requirements)
        if not unmet:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                "The reconstruction engine needs Python packages that Slicer does not have yet: "
                f"{', '.join(unmet)}. Install them now? PyTorch is large (up to a few GB with CUDA); "
                "this takes several minutes and Slicer is busy meanwhile.",
                windowTitle=f"{MODULE_NAME}: install packages"):
            self._setStatus("Nothing was installed; Run needs these packages: " + ", ".join(unmet) + ".", error=True)
            return False
        progress = None
        try:
            progress = slicer.util.createProgressDialog(
                labelText="Installing the reconstruction engine's Python packages...", maximum=0)
            slicer.app.processEvents()
            if TORCH_DISTRIBUTION in unmet:
                self._installTorch()
            self._installRequirements(requirementsPath)
        except _InstallDeclined as declined:
            self._setStatus(str(declined), error=True)
            return False
        except Exception as error:
            logging.exception("Installing the engine's packages failed")
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._showError(
                f"Installing the engine's Python packages failed ({reason}); check the internet connection and "
                "free disk space, then press Run again, or install them in the Python console with "
                f"slicer.util.pip_install(['-r', r'{requirementsPath}']).")
            return False
        finally:
            if progress is not None:
                progress.close()
        still = unmetRequirements(requirements)
        if still:
            self._showError(f"The packages {', '.join(still)} are still not usable after the installation; "
                            "restart Slicer and press Run again.")
            return False
        self._updateDeviceInfo()
        return True

    @staticmethod
    def _installTorch():
        try:
            import PyTorchUtils  # the PyTorch extension picks the CUDA build matching the driver
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
            if torch is None:
                raise _InstallDeclined("PyTorch was not installed; Run needs it (install it from the PyTorch Utils module).")
        else:
            slicer.util.pip_install("torch")

    @staticmethod
    def _installRequirements(requirements):
        with tempfile.TemporaryDirectory(prefix="sspect-pip-") as folder:
            constraints = writeProtectingConstraints(os.path.join(folder, "constraints.txt"))
            try:
                import slicer.pydeps as pydeps  # Slicer >= 5.11
            except ImportError:
                pydeps = None
            if pydeps is not None and hasattr(pydeps, "pip_ensure"):
                pydeps.pip_ensure(pydeps.load_requirements(requirements), constraints=constraints, requester=MODULE_NAME)
            else:
                slicer.util.pip_install(["-r", requirements, "-c", constraints])

    # ---- messages -----------------------------------------------------------------------------

    def _setStatus(self, message, error=False):
        self.ui.statusLabel.text = message
        self.ui.statusLabel.setStyleSheet("color: #d04040;" if error else "")
        if error:
            self._log(message)

    def _showError(self, sentence, state=None):
        """One sentence, in the status line and in a message box; optionally the new state."""
        if state is not None:
            self._setState(state, sentence, error=True)
        else:
            self._setStatus(sentence, error=True)
        slicer.util.errorDisplay(sentence, windowTitle=MODULE_NAME)

    def _log(self, message):
        logging.info(f"{MODULE_NAME}: {message}")
        if self.ui is not None:
            self.ui.logTextEdit.appendPlainText(message)


class _InstallDeclined(Exception):
    """The user declined an installation step (not an error to report as a failure)."""


#
# SelfSupervisedSPECTLogic
#


class SelfSupervisedSPECTLogic(ScriptedLoadableModuleLogic, SelfSupervisedSPECTLogicBase):
    """Everything the panel does, usable without it (Python console, scripts, the self-test):
    see SelfSupervisedSPECTLogicBase for the API. MRML only; the engine runs in its own process.
    """

    def __init__(self, python_executable=None, engine_env=None, work_root=None):
        ScriptedLoadableModuleLogic.__init__(self)
        # The app's slice views are fitted to each fused result; headless there are no views.
        application = getattr(slicer, "app", None)
        SelfSupervisedSPECTLogicBase.__init__(self, python_executable=python_executable,
                                              engine_env=engineEnvironment(engine_env), work_root=work_root,
                                              application_logic=application.applicationLogic() if application else None)


def engineEnvironment(engine_env=None):
    """The engine's environment: the caller's, with the folder that ships `sspect` (beside this
    file) first on PYTHONPATH, so that `PythonSlicer -m sspect` finds the engine however the
    extension is installed (Extensions Manager, build tree, or a source folder added as an
    additional module path)."""
    environment = dict(engine_env or {})
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(moduleDir, "sspect")):
        existing = environment.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        paths = [moduleDir] + [path for path in existing.split(os.pathsep) if path]
        environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


#
# SelfSupervisedSPECTTest
#


class SelfSupervisedSPECTTest(ScriptedLoadableModuleTest):
    """Reconstructs a small simulated 177Lu SPECT/CT end to end: in the real app (Reload and Test)
    and headless on slicer-core (Testing/Python/test_slicer_module_selftest.py)."""

    # Extra environment for the engine processes (the headless CI run sets OMP_NUM_THREADS=1).
    engine_env = None

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_reconstruct_and_review()

    def test_reconstruct_and_review(self):
        import numpy as np

        self.delayDisplay("Simulating a small 177Lu SPECT/CT study (engine demo, in its own process)")
        folder = tempfile.mkdtemp(prefix="SelfSupervisedSPECTTest-")
        logic = SelfSupervisedSPECTLogic(engine_env=self.engine_env, work_root=os.path.join(folder, "jobs"))
        demo = self._runEngineDemo(logic, folder)
        study = os.path.join(folder, "study")
        nmFile = os.path.join(study, "NM", "projections.dcm")
        ctFolder = os.path.join(study, "CT")
        ctFiles = sorted(os.path.join(ctFolder, name) for name in os.listdir(ctFolder) if name.lower().endswith(".dcm"))
        self.assertTrue(os.path.isfile(nmFile), "the demo wrote no NM projections")
        self.assertGreater(len(ctFiles), 10, "the demo wrote no CT series")

        self.delayDisplay("Loading the projections and the CT")
        projections = logic.load_projection_series([nmFile])
        ct = logic.load_ct_series(ctFiles)
        self.assertEqual(projections.GetAttribute(ROLE_ATTRIBUTE), ROLE_PROJECTIONS)
        self.assertEqual(logic.files_for_node(projections), [nmFile])

        methods = logic.methods()
        self.assertIn("osem", methods)
        self.assertEqual({p["name"] for p in methods["osem"]["params"]} >= {"iterations", "subsets"}, True)

        self.delayDisplay("Reconstructing: OSEM, 2 iterations x 4 subsets, in Bq/mL")
        events = []
        run = logic.reconstruct(projections, ct, method="osem", iterations=2, subsets=4,
                                calibration_cps_per_MBq=demo["calibration"], wait=True, on_event=events.append)
        self.assertEqual(run.state, "done", f"the reconstruction failed: {run.error}")
        self.assertTrue(any(e.get("event") == "progress" for e in events), "no progress event reached the logic")

        activity = logic.load_result(run, ct_node=ct)
        self.assertIsNotNone(activity)
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(activity.GetID()))
        units = activity.GetVoxelValueUnits()
        self.assertIsNotNone(units, "the result carries no unit")
        self.assertIn("bq", (units.GetCodeValue() + units.GetCodeMeaning()).lower())

        self.delayDisplay("Checking the result's geometry against the CT")
        values = slicer.util.arrayFromVolume(activity)
        self.assertTrue(np.isfinite(values).all())
        self.assertGreater(float(values.max()), 0.0)
        activityBounds, ctBounds = [0.0] * 6, [0.0] * 6
        activity.GetRASBounds(activityBounds)
        ct.GetRASBounds(ctBounds)
        spacing = max(activity.GetSpacing())
        for axis in range(3):  # the image lies in the CT's field (within one voxel)
            self.assertGreaterEqual(activityBounds[2 * axis], ctBounds[2 * axis] - spacing)
            self.assertLessEqual(activityBounds[2 * axis + 1], ctBounds[2 * axis + 1] + spacing)
        hottest = np.unravel_index(int(np.argmax(values)), values.shape)  # (k, j, i)
        ras = self._ijkToRas(activity, hottest[::-1])
        for axis in range(3):
            self.assertTrue(ctBounds[2 * axis] <= ras[axis] <= ctBounds[2 * axis + 1], "the hot spot lies outside the CT")

        self.delayDisplay("Comparing with the engine's own reconstruction of the same study (same job, same numbers)")
        reference = self._readVolume(demo["image"])
        referenceValues = slicer.util.arrayFromVolume(reference)
        self.assertEqual(referenceValues.shape, values.shape)
        np.testing.assert_allclose(self._ijkToRasArray(activity), self._ijkToRasArray(reference), atol=1e-4)
        np.testing.assert_allclose(values, referenceValues, rtol=0, atol=1e-4 * float(referenceValues.max()))
        slicer.mrmlScene.RemoveNode(reference)

        self.delayDisplay("Showing the result fused with the CT")
        if slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0:
            # Headless there is no view layout: add the composite node a slice view owns in the app.
            composite = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName("Red")
        logic.show_fused(ct, activity, opacity=0.5)
        compositeNodes = [slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                          for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
        self.assertTrue(compositeNodes, "no slice view to show the fusion in")
        for composite in compositeNodes:
            self.assertEqual(composite.GetBackgroundVolumeID(), ct.GetID())
            self.assertEqual(composite.GetForegroundVolumeID(), activity.GetID())
            self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.5)

        self.delayDisplay("Dosimetry table of a segment around the hottest voxel")
        segmentation = self._hotSpotSegmentation(activity, hottest)
        table = logic.dosimetry_table(segmentation, [activity])
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(table.GetID()))
        self.assertGreaterEqual(table.GetNumberOfRows(), 1)
        mean = self._firstValue(table, "mean")
        self.assertGreater(mean, 0.0, "the hot spot's mean activity is not positive")
        self.assertLessEqual(mean, float(values.max()) * (1 + 1e-6))
        voxelMl = abs(float(np.linalg.det(self._ijkToRasArray(activity)[:3, :3]))) / 1000.0
        box = self._boxMask(values.shape, hottest)
        insideVoxels = int(np.count_nonzero(box))
        self.assertAlmostEqual(self._firstValue(table, "volume"), insideVoxels * voxelMl, places=3)
        self.assertAlmostEqual(mean, float(values[box].mean()), delta=1e-4 * mean)
        self.assertAlmostEqual(self._firstValue(table, "mbq"), mean * insideVoxels * voxelMl / 1e6, delta=1e-3)

        import shutil

        shutil.rmtree(folder, ignore_errors=True)  # kept for inspection when the test fails
        self.delayDisplay("Test passed")

    # -- helpers for the test --

    def _runEngineDemo(self, logic, folder):
        """Write the demo study with the engine's simulator, in a subprocess (the Slicer side never
        imports sspect). Returns the calibration and the engine's own result image."""
        environment = dict(os.environ)
        environment.update(getattr(logic, "engine_env", None) or self.engine_env or {})
        command = [logic.python_executable, "-m", "sspect", "demo", "--quick", "--out", folder]
        completed = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=environment,
                                   capture_output=True, text=True, timeout=600)
        self.assertEqual(completed.returncode, 0, f"sspect demo failed: {completed.stderr[-2000:]}")
        with open(os.path.join(folder, "demo_osem", "demo_osem_provenance.json")) as stream:
            provenance = json.load(stream)
        calibration = _findKey(provenance, "calibration_cps_per_MBq")
        self.assertIsNotNone(calibration, "the demo's provenance has no calibration")
        image = provenance["files"]["nrrd"]
        return {"calibration": float(calibration), "image": image}

    @staticmethod
    def _ijkToRas(volume, ijk):
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        return matrix.MultiplyPoint([float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0])[:3]

    @staticmethod
    def _readVolume(path):
        """Read an NRRD with the MRML storage node (works headless and in the app)."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "engine reference")
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(path)
        if not storage.ReadData(node):
            raise AssertionError(f"could not read {path}")
        slicer.mrmlScene.RemoveNode(storage)
        return node

    @staticmethod
    def _ijkToRasArray(volume):
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def _boxMask(shape, hottest, radius=2):
        """A boolean (k, j, i) box of (2 radius + 1)^3 voxels around the hottest voxel (clipped at the edges)."""
        import numpy as np

        mask = np.zeros(shape, dtype=bool)
        k, j, i = (int(v) for v in hottest)
        mask[max(k - radius, 0):k + radius + 1, max(j - radius, 0):j + radius + 1, max(i - radius, 0):i + radius + 1] = True
        return mask

    @classmethod
    def _hotSpotSegmentation(cls, volume, hottest):
        """A box segment around the hottest voxel, on the volume's grid (vtkOrientedImageData)."""
        from vtk.util import numpy_support

        shape = slicer.util.arrayFromVolume(volume).shape  # (k, j, i)
        mask = cls._boxMask(shape, hottest)
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetDimensions(shape[2], shape[1], shape[0])
        labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(shape)[:] = mask
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        labelmap.SetImageToWorldMatrix(ijkToRas)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Hot spot")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(labelmap, "hot spot", [1.0, 0.8, 0.0])
        return segmentation

    @staticmethod
    def _firstValue(table, word):
        """The first row's value in the first column whose name contains `word`."""
        vtkTable = table.GetTable()
        for column in range(vtkTable.GetNumberOfColumns()):
            name = vtkTable.GetColumnName(column) or ""
            if word in name.lower():
                return float(vtkTable.GetValue(0, column).ToDouble())
        raise AssertionError(f"the dosimetry table has no '{word}' column: "
                             + ", ".join(vtkTable.GetColumnName(c) for c in range(vtkTable.GetNumberOfColumns())))


def _findKey(tree, key):
    """The first value stored under `key` anywhere in nested dicts and lists."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _findKey(child, key)
        if found is not None:
            return found
    return None
