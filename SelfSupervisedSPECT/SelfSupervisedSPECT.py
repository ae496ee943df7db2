"""SelfSupervisedSPECT: quantitative 177Lu SPECT reconstruction in 3D Slicer.

Module . Widget . Logic . Test, as in Slicer's scripted-module template. The Widget is the panel
(real Slicer app only: qt and ctk are imported inside its methods); the Logic is the MRML-only
Slicer side (`SelfSupervisedSPECTLib`), which reaches the engine (`sspect`) through its door, a
separate process. Nothing here imports torch or pytomography at file scope, and nothing is
installed when the module loads or its panel is set up: the engine's packages are installed on the
first Run, after the user agrees.
"""
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

from SelfSupervisedSPECTLib import DoorError, SelfSupervisedSPECTLogicBase, background_process_options

MODULE_NAME = "SelfSupervisedSPECT"
ROLE_ATTRIBUTE = "SelfSupervisedSPECT.Role"
ROLE_PROJECTIONS = "projections"

# Device combo box entries, in the .ui's order, as the job file names them.
DEVICES = ("auto", "cpu", "cuda")
BINNING_CHOICES = (1, 2, 4)  # binningComboBox items, in order
PROJECTOR_CHOICES = ("fast", "pytomography")  # projectorComboBox items, in order
ISOTOPE_CHOICES = (None, "177Lu", "99mTc", "111In", "131I")  # isotopeComboBox items, in order (None: from the file)
DECAY_CHOICES = ("none", "start", "injection")  # decayCorrectionComboBox items, in order

POLL_INTERVAL_MS = 150

# Widget states: a small state machine (see SelfSupervisedSPECTWidget._setState).
IDLE, INSTALLING, RUNNING, CANCELLING, DONE, FAILED = "idle", "installing", "running", "cancelling", "done", "failed"


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
it: TEW or DEW); untick <i>Automatic</i> to give them by index or keV range. <i>Dosimetry inputs and calibration</i>
takes the acquisition and injection times and activity a de-identified file lacks, the decay
correction, a stored calibration, and measures one on a phantom (<i>Calibrate</i>). <i>Compute table</i>
measures every segment of a segmentation in the reconstructed images.</p>
<p><b>Self-supervised methods</b> (the deep image prior, Noise2Noise-type denoisers, DL-BPF) train a network on
this scan alone and stop by themselves on held-out counts. On a CPU choose <i>Grid: 2x2 binned</i>
(about 8 times faster); n2n and noise2inverse also load a voxel uncertainty map (<i>... SD</i>).</p>
<p><b>Supervised methods</b> (post-unet, unrolled-mapem) apply networks trained on simulated
<sup>177</sup>Lu torso scans that ship with the extension (no download), for the GE MEGP collimator:
post-unet and unrolled-mapem at 4.4 mm and 8.8 mm voxels (<i>Grid: 2x2 binned</i> takes the 8.8 mm
ones); the one matching the study's voxel size is used, other collimators or voxel
sizes are refused. They generalise only as far as their training data: check them against OSEM.</p>
<p>Needs 3D Slicer 5.10 or newer. The first Run offers to install PyTorch (the CUDA build the
NVIDIA driver runs, else the CPU build) and the engine's other Python packages into a folder that
only the engine's process uses: Slicer's own Python packages are not changed.</p>
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

# The oldest Slicer the extension supports. The engine needs pydicom >= 3 (pytomography 3.4.0 and
# highdicom 0.28 require it), and pydicom 3 needs Python >= 3.10. Slicer 5.6 and 5.8 ship Python
# 3.9.10 (Slicer_REQUIRED_PYTHON_VERSION in Slicer's CMakeLists.txt); 5.10 ships 3.12.10 (Slicer
# pull request 8466, "Upgrade from python 3.9.10 to 3.12.10").
OLDEST_SUPPORTED_SLICER = "5.10"
REQUIRED_PYTHON = (3, 10)

# The engine's packages go into a folder of their own that only the engine's process sees (pip
# install --target, put on that process's PYTHONPATH), never into Slicer's site-packages: the
# requirements cannot be made compatible with what Slicer ships (pytomography 3.4.0 needs
# pydicom >= 3.0.1, Slicer 5.10 ships pydicom 2.x and Slicer main pins pydicom 3.0.1 with
# highdicom 0.27.0, where the engine needs highdicom >= 0.28), and asking consent would still
# change the packages Slicer's own DICOM module imports. The folder also keeps torch out of
# Slicer's process by construction.
TORCH_DISTRIBUTION = "torch"
REQUIREMENTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

# PyTorch's wheel indexes by CUDA version (download.pytorch.org/whl/cuXYZ), oldest first. The
# PyTorch extension's installTorch installs into Slicer's own Python and imports torch there, and
# its getCompatibleComputationBackends pip-installs light-the-torch into Slicer's Python, so the
# CUDA build is chosen here from the CUDA version nvidia-smi reports for the driver.
TORCH_WHEEL_INDEX = "https://download.pytorch.org/whl/"
TORCH_CUDA_BUILDS = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (13, 0))


def unsupportedSlicerSentence(slicerVersion, pythonVersion):
    """None when this Slicer can run the engine, else the one sentence that says which is needed
    (``slicerVersion`` is None headless)."""
    if tuple(pythonVersion[:2]) >= REQUIRED_PYTHON:
        return None
    here = f"Slicer {slicerVersion} has" if slicerVersion else "this has"
    return (f"SelfSupervisedSPECT needs 3D Slicer {OLDEST_SUPPORTED_SLICER} or newer ({here} Python "
            f"{pythonVersion[0]}.{pythonVersion[1]}, the engine needs {REQUIRED_PYTHON[0]}.{REQUIRED_PYTHON[1]} or newer); "
            "install a newer Slicer from download.slicer.org.")


def runningSlicerVersion():
    """'major.minor' of the running Slicer app; None headless."""
    app = getattr(slicer, "app", None)
    return f"{app.majorVersion}.{app.minorVersion}" if app is not None else None


def enginePackagesFolder(settingsFolder, pythonVersion):
    """The folder of the engine's packages: per Python version, since compiled wheels are."""
    return os.path.join(settingsFolder, MODULE_NAME, f"engine-packages-py{pythonVersion[0]}.{pythonVersion[1]}")


def installedEnginePackagesFolder():
    """The engine's package folder of this Slicer (beside the user settings); None headless, where
    the engine's packages are those of the Python that runs the tests."""
    app = getattr(slicer, "app", None)
    if app is None:
        return None
    import sys

    return enginePackagesFolder(os.path.dirname(app.slicerUserSettingsFilePath), sys.version_info)


def readRequirements(path):
    """The requirement lines of a requirements.txt (comments and blank lines dropped)."""
    with open(path) as stream:
        return [line.split("#", 1)[0].strip() for line in stream if line.split("#", 1)[0].strip()]


def unmetRequirements(requirements, paths=None):
    """The requirements the engine's process would not find satisfied: looked up in ``paths`` first,
    then in this Python's path, as the engine's imports will be, from the distributions' metadata
    without importing any of them."""
    import importlib.metadata
    import sys

    from packaging.requirements import Requirement

    importlib.invalidate_caches()
    searchPath = [str(path) for path in paths or []] + sys.path
    unmet = []
    for line in requirements:
        requirement = Requirement(line)
        found = next(iter(importlib.metadata.distributions(name=requirement.name, path=searchPath)), None)
        if found is None or not requirement.specifier.contains(found.version, prereleases=True):
            unmet.append(line)
    return unmet


def missingEnginePackages(requirementsPath=REQUIREMENTS_PATH, packagesFolder=None):
    """The engine's requirements (PyTorch first) that its process would not find."""
    return unmetRequirements([TORCH_DISTRIBUTION] + readRequirements(requirementsPath),
                             paths=[packagesFolder] if packagesFolder else None)


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


def nvidiaSmiCudaVersion(output):
    """(major, minor) of 'CUDA Version: X.Y' in plain `nvidia-smi` output (the newest CUDA the driver
    runs); None without it."""
    import re

    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", output or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def torchIndexUrl(cudaVersion):
    """PyTorch's wheel index for a driver's CUDA version: the newest CUDA build the driver runs, or
    the CPU build without an NVIDIA driver (or one older than every CUDA build)."""
    usable = [build for build in TORCH_CUDA_BUILDS if cudaVersion is not None and build <= tuple(cudaVersion)]
    return TORCH_WHEEL_INDEX + (f"cu{usable[-1][0]}{usable[-1][1]}" if usable else "cpu")


def torchWheelVersion(wheelName):
    """The version in a torch wheel's file name, local label included ('2.5.1+cu121')."""
    return wheelName.split("-")[1]


def torchDownloadCommand(python, torchIndex, wheelsFolder):
    """pip downloads the torch wheel of the chosen build, without its dependencies."""
    return [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--index-url", torchIndex,
            "--dest", wheelsFolder, TORCH_DISTRIBUTION]


def engineInstallCommand(python, packagesFolder, requirementsPath, wheelsFolder, torchVersion):
    """pip installs the engine's packages into their folder in one resolution: torch pinned to the
    downloaded build (found in wheelsFolder), everything else from PyPI."""
    return [python, "-m", "pip", "install", "--upgrade", "--target", packagesFolder, "--find-links", wheelsFolder,
            f"{TORCH_DISTRIBUTION}=={torchVersion}", "-r", requirementsPath]


def runBackgroundCommand(command, timeout=None):
    """Run a command behind Slicer (no console window) and return (exit code, its output)."""
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, errors="replace", timeout=timeout, **background_process_options())
    return done.returncode, done.stdout


def installEnginePackages(python, packagesFolder, requirementsPath, logPath):
    """Install PyTorch (the build the driver runs) and the engine's packages into packagesFolder.
    Runs in a worker thread (no Qt); the pip output goes to logPath. Raises RuntimeError with the
    last line pip printed when a step fails."""
    import shutil

    os.makedirs(packagesFolder, exist_ok=True)
    smi = shutil.which("nvidia-smi")
    cudaVersion = nvidiaSmiCudaVersion(runBackgroundCommand([smi], timeout=30)[1]) if smi else None
    with open(logPath, "w", encoding="utf-8") as log, tempfile.TemporaryDirectory(prefix="sspect-wheels-") as wheels:
        def step(command):
            log.write("$ " + " ".join(command) + "\n")
            code, output = runBackgroundCommand(command)
            log.write(output)
            log.flush()
            if code != 0:
                lines = [line.strip() for line in output.splitlines() if line.strip()]
                raise RuntimeError(lines[-1] if lines else f"pip stopped with exit code {code}")

        step(torchDownloadCommand(python, torchIndexUrl(cudaVersion), wheels))
        wheel = next(name for name in os.listdir(wheels) if name.startswith(f"{TORCH_DISTRIBUTION}-"))
        step(engineInstallCommand(python, packagesFolder, requirementsPath, wheels, torchWheelVersion(wheel)))


def gpuInformation(packagesFolder):
    """Free GPU memory from nvidia-smi, for the device line; runs in a worker thread. Slicer's
    process never imports torch: its presence is read from the engine's package folder."""
    import shutil

    if unmetRequirements([TORCH_DISTRIBUTION], paths=[packagesFolder] if packagesFolder else None):
        return "PyTorch is not installed yet: it is offered on the first Run (with CUDA when a GPU is found)."
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            code, output = runBackgroundCommand([smi, "--query-gpu=name,memory.free,memory.total",
                                                 "--format=csv,noheader,nounits"], timeout=10)
            described = describeNvidiaSmi(output) if code == 0 else ""
            if described:
                return described
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return "GPU memory unknown (nvidia-smi not found); Automatic chooses the GPU at run time when PyTorch sees one."


#
# SelfSupervisedSPECTWidget
#


class SelfSupervisedSPECTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. States: idle -> running -> (done | failed | idle after a cancel), and idle ->
    installing -> (idle | failed) on the first Run; Run becomes Cancel while running and is disabled
    while installing; the engine's events and the worker threads are polled with QTimers so Slicer
    never blocks.
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
        # Work that would block the GUI thread (the engine's method listing, nvidia-smi, pip) runs in
        # worker threads; _backgroundTimer takes the results on the GUI thread.
        self._workers = None
        self._backgroundTimer = None
        self._methodsListing = None
        self._methodsFailure = None  # the sentence of the last failed listing, shown once
        self._gpuQuery = None
        self._gpuText = None
        self._installation = None
        self._installationDialog = None
        self._installationLog = None
        self._calibrationsListing = None

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
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrateButton)
        self.ui.storedCalibrationComboBox.connect("currentIndexChanged(int)", self.updateButtons)
        self.ui.resultSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.fusionOpacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.showFusedButton.connect("clicked(bool)", self.onShowFused)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.dosimetryVolumesSelector.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.computeTableButton.connect("clicked(bool)", self.onComputeTable)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        import concurrent.futures

        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=MODULE_NAME)
        self._backgroundTimer = qt.QTimer()
        self._backgroundTimer.setInterval(POLL_INTERVAL_MS)
        self._backgroundTimer.connect("timeout()", self.onBackgroundTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self.onAutomaticWindowsToggled(self.ui.automaticWindowsCheckBox.checked)
        self._setState(IDLE)
        self.onProjectionChanged(self.ui.projectionSelector.currentNode())

    def enter(self):
        """Each time the panel is shown: the method list and the device line are asked for in worker
        threads (the engine takes seconds to start), never on the GUI thread; a failed listing is
        not asked again until the next Run."""
        if not self._methods and self._methodsFailure is None:
            self._methodsFailure = self._engineNotReady()
            if self._methodsFailure:
                self._setStatus(self._methodsFailure)
            else:
                self._startMethodsListing()
        if self._methodsFailure is None and self._calibrationsListing is None:
            self._calibrationsListing = self._workers.submit(self.logic.calibrations)
            self._backgroundTimer.start()
        self._updateDeviceInfo()

    @staticmethod
    def _engineNotReady():
        """Why the engine cannot list its methods yet (an old Slicer, packages not installed), read
        from metadata in milliseconds; None when it can."""
        import sys

        unsupported = unsupportedSlicerSentence(runningSlicerVersion(), sys.version_info)
        if unsupported:
            return unsupported
        try:
            missing = missingEnginePackages(REQUIREMENTS_PATH, installedEnginePackagesFolder())
        except OSError:
            return f"The list of the engine's packages ({REQUIREMENTS_PATH}) is missing; reinstall the extension."
        if missing:
            return "The engine's Python packages are not installed yet; the first Run offers to install them."
        return None

    def cleanup(self):
        """Module reload or application exit: stop polling and stop the engine process."""
        if self._timer is not None:
            self._timer.stop()
        if self._backgroundTimer is not None:
            self._backgroundTimer.stop()
        if self._workers is not None:
            self._workers.shutdown(wait=False)
        if self._installationDialog is not None:
            self._installationDialog.close()
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
            lineEdit.enabled = not automatic and self._state not in (INSTALLING, RUNNING, CANCELLING)

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

    def _startMethodsListing(self):
        """Ask the engine for its registry in a worker thread (once at a time)."""
        if self._methodsListing is None:
            self._methodsFailure = None
            self._methodsListing = self._workers.submit(self.logic.methods)
            self._backgroundTimer.start()

    def _onMethodsListed(self, listing):
        """On the GUI thread: fill the method list, or remember and show the failure once."""
        try:
            methods = listing.result()
        except DoorError as error:
            methods, failure = None, str(error)
        except Exception as error:
            logging.exception("Listing the engine's methods failed")
            methods, failure = None, f"The engine's methods could not be listed ({type(error).__name__}: {error})."
        else:
            failure = None if methods else "The engine offers no reconstruction method; reinstall the extension."
        if failure is not None:
            self._methodsFailure = failure
            self._setStatus(f"{failure.rstrip('.')}; press Run to try again.", error=True)
            return
        self._methods = methods
        combo = self.ui.methodComboBox
        combo.blockSignals(True)
        combo.clear()
        for name, description in methods.items():
            combo.addItem(description.get("title") or name, name)
        combo.currentIndex = max(0, list(methods).index("osem") if "osem" in methods else 0)
        combo.blockSignals(False)
        self.onMethodChanged(combo.currentIndex)
        self._setStatus(f"{len(methods)} reconstruction methods; select the projections and press Run.")

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
        summary = f"{description.get('family', '')} method '{method}'".strip()
        advice = description.get("advice")
        self.ui.methodDescriptionLabel.text = f"{summary}: {advice}" if advice else summary
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
        self._updateDeviceInfo(refresh=True)

    def _device(self):
        index = self.ui.deviceComboBox.currentIndex
        return DEVICES[index] if 0 <= index < len(DEVICES) else "auto"

    def _updateDeviceInfo(self, refresh=False):
        """The device line: free GPU memory from nvidia-smi, asked in a worker thread."""
        if self._device() == "cpu":
            self.ui.deviceInfoLabel.text = ""
            return
        if self._gpuText is not None and not refresh:
            self.ui.deviceInfoLabel.text = self._gpuText
        elif self._gpuQuery is None:
            self.ui.deviceInfoLabel.text = "Looking for a GPU..."
            self._gpuQuery = self._workers.submit(gpuInformation, installedEnginePackagesFolder())
            self._backgroundTimer.start()

    def onBackgroundTimer(self):
        """Every POLL_INTERVAL_MS while worker threads are busy: take what they finished."""
        if self._methodsListing is not None and self._methodsListing.done():
            listing, self._methodsListing = self._methodsListing, None
            self._onMethodsListed(listing)
        if self._gpuQuery is not None and self._gpuQuery.done():
            query, self._gpuQuery = self._gpuQuery, None
            try:
                self._gpuText = query.result()
            except Exception as error:
                self._gpuText = f"GPU memory unknown ({type(error).__name__}: {error})."
            if self._device() != "cpu":
                self.ui.deviceInfoLabel.text = self._gpuText
        if self._installation is not None and self._installation.done():
            installation, self._installation = self._installation, None
            self._onInstallationDone(installation)
        if self._calibrationsListing is not None and self._calibrationsListing.done():
            listing, self._calibrationsListing = self._calibrationsListing, None
            try:
                self._showStoredCalibrations(listing.result())
            except Exception as error:  # the panel still works with a typed sensitivity
                self._log(f"The stored calibrations could not be listed ({type(error).__name__}: {error}).")
        if (self._methodsListing is None and self._gpuQuery is None and self._installation is None
                and self._calibrationsListing is None):
            self._backgroundTimer.stop()

    # ---- run / cancel: the state machine ------------------------------------------------------

    def _setState(self, state, message=None, error=False):
        self._state = state
        busy = state in (INSTALLING, RUNNING, CANCELLING)
        self.ui.runButton.text = {INSTALLING: "Installing...", RUNNING: "Cancel", CANCELLING: "Cancelling..."}.get(state, "Run")
        self.ui.runButton.toolTip = ("Stop the engine process; nothing half-written is kept." if busy
                                     else "Reconstruct in a background process; Slicer stays responsive.")
        for widget in (self.ui.projectionSelector, self.ui.ctSelector, self.ui.loadProjectionFilesButton,
                       self.ui.loadCTFilesButton, self.ui.automaticWindowsCheckBox, self.ui.methodComboBox,
                       self.ui.parametersWidget, self.ui.calibrationSpinBox, self.ui.deviceComboBox,
                       self.ui.binningComboBox, self.ui.projectorComboBox, self.ui.scatterSmoothingSpinBox, self.ui.isotopeComboBox,
                       self.ui.photopeaksLineEdit, self.ui.storedCalibrationComboBox, self.ui.acquisitionDateTimeLineEdit,
                       self.ui.injectionDateTimeLineEdit, self.ui.injectedActivitySpinBox, self.ui.decayCorrectionComboBox,
                       self.ui.phantomActivitySpinBox, self.ui.phantomDateTimeLineEdit, self.ui.calibrationNameLineEdit,
                       self.ui.replaceCalibrationCheckBox):
            widget.enabled = not busy
        self.onAutomaticWindowsToggled(self.ui.automaticWindowsCheckBox.checked)
        bar = self.ui.progressBar
        if state == INSTALLING:
            bar.value = 0
            bar.format = "Installing the engine's packages..."
        elif state == RUNNING:
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
        busy = self._state in (INSTALLING, RUNNING, CANCELLING)
        ready = self.ui.projectionSelector.currentNode() is not None
        self.ui.runButton.enabled = self._state == RUNNING or (not busy and ready)
        self.ui.calibrateButton.enabled = not busy and ready
        self.ui.calibrationSpinBox.enabled = not busy and self._storedCalibration() is None
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
        self._startEngine(calibrate=False)

    def onCalibrateButton(self):
        """Measure the sensitivity on the selected projections of a phantom, the same way Run reconstructs."""
        if self._state == IDLE or self._state in (DONE, FAILED):
            self._startEngine(calibrate=True)

    def _startEngine(self, calibrate):
        if self._state in (INSTALLING, CANCELLING):
            return
        projection = self.ui.projectionSelector.currentNode()
        if projection is None:
            self._setStatus("Select the SPECT projections first (DICOM module or Load projection files...).", error=True)
            return
        if not self._engineReady():
            return
        ct = self.ui.ctSelector.currentNode()
        method = self._currentMethod()
        options = {"device": self._device(), "windows": self._windows(),
                   "detector_binning": BINNING_CHOICES[self.ui.binningComboBox.currentIndex],
                   "projector": PROJECTOR_CHOICES[self.ui.projectorComboBox.currentIndex],
                   "scatter_smoothing_cm": float(self.ui.scatterSmoothingSpinBox.value),
                   "isotope": ISOTOPE_CHOICES[self.ui.isotopeComboBox.currentIndex],
                   "photopeaks": self.ui.photopeaksLineEdit.text.strip() or None,
                   "acquisition_datetime": self.ui.acquisitionDateTimeLineEdit.text.strip() or None}
        if not calibrate:
            calibration = float(self.ui.calibrationSpinBox.value)
            activity = float(self.ui.injectedActivitySpinBox.value)
            options.update({"calibration": self._storedCalibration(),
                            "calibration_cps_per_MBq": calibration if calibration > 0 and self._storedCalibration() is None else None,
                            "injection_datetime": self.ui.injectionDateTimeLineEdit.text.strip() or None,
                            "injected_activity_MBq": activity if activity > 0 else None,
                            "decay_correction": DECAY_CHOICES[self.ui.decayCorrectionComboBox.currentIndex]})
        self.ui.logTextEdit.clear()
        self._lastProgressMessage = None
        try:
            if calibrate:
                run = self.logic.calibrate(projection, ct, self.ui.calibrationNameLineEdit.text.strip(),
                                           float(self.ui.phantomActivitySpinBox.value),
                                           self.ui.phantomDateTimeLineEdit.text.strip() or None, method=method,
                                           replace=self.ui.replaceCalibrationCheckBox.checked, wait=False,
                                           **options, **self._parameters())
            else:
                run = self.logic.reconstruct(projection, ct, method=method, wait=False, **options, **self._parameters())
        except DoorError as error:
            self._setState(FAILED, str(error), error=True)
            return
        except Exception as error:
            logging.exception("Starting the engine failed")
            self._showError(f"The {'calibration' if calibrate else 'reconstruction'} could not be started "
                            f"({type(error).__name__}: {error}); see the Python console.", state=FAILED)
            return
        self._run = run
        self._runInputs = {"ct": ct, "projection": projection, "method": method, "calibrate": calibrate}
        self._log(f"Started {'calibrating with ' if calibrate else ''}{method} on {projection.GetName()}"
                  + (f" with CT {ct.GetName()}" if ct else " without CT"))
        self._setState(RUNNING, f"{'Calibrating' if calibrate else 'Reconstructing'} with {method}...")
        self._timer.start()

    def _storedCalibration(self):
        """The stored calibration's name chosen, or None for the Sensitivity number (the combo's first item)."""
        combo = self.ui.storedCalibrationComboBox
        return combo.currentText if combo.currentIndex > 0 else None

    def _showStoredCalibrations(self, records, select=None):
        combo = self.ui.storedCalibrationComboBox
        chosen = select or self._storedCalibration()
        combo.blockSignals(True)
        while combo.count > 1:
            combo.removeItem(1)
        for name in sorted(records):
            record = records[name]
            combo.addItem(name)
            combo.setItemData(combo.count - 1, f"{record.get('cps_per_MBq', 0):.4g} cps/MBq, {record.get('isotope')} "
                                               f"{record.get('collimator')}, {record.get('method')}", 3)  # Qt.ToolTipRole
        index = combo.findText(chosen) if chosen else 0
        combo.currentIndex = max(index, 0)
        combo.blockSignals(False)
        self.updateButtons()

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
        record = (run.result or {}).get("calibration")
        if self._runInputs.get("calibrate") and record:
            self._calibrationsListing = self._workers.submit(self.logic.calibrations)
            self._backgroundTimer.start()
            self._showStoredCalibrations({record["name"]: record}, select=record["name"])
            self._setState(DONE, f"Sensitivity {record['cps_per_MBq']:.4g} cps/MBq stored as '{record['name']}' and chosen "
                                 f"for the next Run; the phantom's image is {node.GetName()}.")
            return
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

    def _engineReady(self):
        """Before a Run: a Slicer new enough, the engine's packages present (else one confirmation
        starts their installation, and this Run stops there), and the method list read."""
        import sys

        unsupported = unsupportedSlicerSentence(runningSlicerVersion(), sys.version_info)
        if unsupported:
            self._showError(unsupported)
            return False
        folder = installedEnginePackagesFolder()
        try:
            missing = missingEnginePackages(REQUIREMENTS_PATH, folder)
        except OSError:
            self._showError(f"The list of the engine's packages ({REQUIREMENTS_PATH}) is missing; reinstall the extension.")
            return False
        if missing:
            self._offerInstallation(missing, folder)
            return False
        if not self._methods:
            self._startMethodsListing()
            self._setStatus("Reading the engine's methods; press Run again once they are listed.")
            return False
        return True

    def _offerInstallation(self, missing, folder):
        """Ask once, then install in a worker thread behind a modal dialog (state INSTALLING: Run is
        disabled, so the installation cannot start twice)."""
        import qt

        if not slicer.util.confirmOkCancelDisplay(
                f"The reconstruction engine needs Python packages: {', '.join(missing)}. Install them now into "
                f"{folder}? Only the engine's own process uses that folder: Slicer's own packages are not changed. "
                "PyTorch is large (up to a few GB with CUDA); this takes several minutes.",
                windowTitle=f"{MODULE_NAME}: install packages"):
            self._setStatus("Nothing was installed; Run needs these packages: " + ", ".join(missing) + ".", error=True)
            return
        logPath = os.path.join(os.path.dirname(folder), "install.log")
        self._installationDialog = slicer.util.createProgressDialog(
            labelText="Installing the reconstruction engine's Python packages (several minutes)...", maximum=0,
            windowTitle=MODULE_NAME, windowModality=qt.Qt.ApplicationModal)
        self._installationDialog.setCancelButton(None)
        self._installationDialog.show()
        self._setState(INSTALLING, f"Installing the engine's packages into {folder}; the log is {logPath}.")
        self._installationLog = logPath
        self._installation = self._workers.submit(installEnginePackages, self.logic.python_executable, folder,
                                                  REQUIREMENTS_PATH, logPath)
        self._backgroundTimer.start()

    def _onInstallationDone(self, installation):
        """On the GUI thread: close the dialog, say how it ended, and read the method list."""
        if self._installationDialog is not None:
            self._installationDialog.close()
            self._installationDialog = None
        try:
            installation.result()
            still = missingEnginePackages(REQUIREMENTS_PATH, installedEnginePackagesFolder())
        except Exception as error:
            logging.exception("Installing the engine's packages failed")
            self._showError(f"Installing the engine's Python packages failed ({error}); check the internet connection "
                            f"and free disk space (the log is {self._installationLog}), then press Run again.", state=FAILED)
            return
        if still:
            self._showError(f"The packages {', '.join(still)} are still missing after the installation (the log is "
                            f"{self._installationLog}); press Run to try again.", state=FAILED)
            return
        self._setState(IDLE, "The engine's packages are installed; the methods are being listed, then press Run.")
        self._methods = None
        self._startMethodsListing()
        self._updateDeviceInfo(refresh=True)

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
        SelfSupervisedSPECTLogicBase.__init__(
            self, python_executable=python_executable, work_root=work_root,
            engine_env=engineEnvironment(engine_env, installedEnginePackagesFolder()),
            application_logic=application.applicationLogic() if application else None)


def engineEnvironment(engine_env=None, packagesFolder=None):
    """The engine's environment: the caller's, with the folder that ships `sspect` (beside this
    file) first on PYTHONPATH, so that `PythonSlicer -m sspect` finds the engine however the
    extension is installed (Extensions Manager, build tree, or a source folder added as an
    additional module path), then the engine's package folder when it exists, ahead of Slicer's
    site-packages for that process only."""
    environment = dict(engine_env or {})
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    first = [folder for folder, marker in ((moduleDir, os.path.join(moduleDir, "sspect")), (packagesFolder, packagesFolder))
             if folder and os.path.isdir(marker)]
    if first:
        existing = environment.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        paths = first + [path for path in existing.split(os.pathsep) if path]
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
    # The engine's requirements the test checks before it starts.
    requirements_path = REQUIREMENTS_PATH

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_reconstruct_and_review()

    def test_reconstruct_and_review(self):
        self._skipUnlessTheEngineCanRun()
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

    def _skipUnlessTheEngineCanRun(self):
        """Skip with one sentence where the engine's packages are missing (the Extensions build
        machines, or before the first Run), instead of failing inside the engine."""
        import sys

        unsupported = unsupportedSlicerSentence(runningSlicerVersion(), sys.version_info)
        if unsupported:
            self.skipTest(unsupported)
        missing = missingEnginePackages(self.requirements_path, installedEnginePackagesFolder())
        if missing:
            self.skipTest(f"The self-test needs the engine's Python packages, missing here: {', '.join(missing)}; "
                          "press Run once in the SelfSupervisedSPECT module to install them, then run the test again.")

    def _runEngineDemo(self, logic, folder):
        """Write the demo study with the engine's simulator, in a subprocess (the Slicer side never
        imports sspect). Returns the calibration and the engine's own result image."""
        environment = dict(os.environ)
        environment.update(getattr(logic, "engine_env", None) or self.engine_env or {})
        command = [logic.python_executable, "-m", "sspect", "demo", "--quick", "--out", folder]
        completed = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), env=environment,
                                   capture_output=True, text=True, timeout=600, **background_process_options())
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
