"""The module's own self-test (SelfSupervisedSPECTTest, the one Reload and Test runs in the app),
run headless on slicer-core: real MRML, the engine in a real subprocess, Qt-only base classes
stood in by slicer_app_shim. It simulates a small study with the engine's demo, loads it,
reconstructs it (OSEM 2 x 4, Bq/mL), checks unit, geometry, fusion and a dosimetry table."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slicer_app_shim

MODULE_DIR = Path(__file__).resolve().parents[2] / "SelfSupervisedSPECT"


@pytest.fixture(scope="module")
def module():
    slicer_app_shim.install()
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import SelfSupervisedSPECT

        yield SelfSupervisedSPECT
    finally:
        sys.path.remove(str(MODULE_DIR))
        try:
            from SelfSupervisedSPECTLib.logic import release_headless_logics
        except ImportError:
            release_headless_logics = None
        slicer_app_shim.uninstall()
        if release_headless_logics is not None:
            release_headless_logics()


def test_module_file_imports_without_the_app(module):
    assert {"SelfSupervisedSPECT", "SelfSupervisedSPECTWidget", "SelfSupervisedSPECTLogic",
            "SelfSupervisedSPECTTest"} <= set(vars(module))


def test_importing_the_module_loads_no_heavy_or_qt_package():
    """In a fresh interpreter (this one may hold torch from the engine tests)."""
    code = ("import sys, slicer_app_shim; slicer_app_shim.install(); sys.path.insert(0, sys.argv[1]); "
            "import SelfSupervisedSPECT; "
            "print(sorted(m for m in ('torch', 'pytomography', 'qt', 'ctk', 'sspect') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_module_description(module):
    import types

    parent = types.SimpleNamespace(path=str(MODULE_DIR / "SelfSupervisedSPECT.py"))
    module.SelfSupervisedSPECT(parent)
    assert parent.title == "SelfSupervisedSPECT"
    assert parent.categories == ["Nuclear Medicine"]
    assert 'slicer.util.getModuleLogic("SelfSupervisedSPECT")' in parent.helpText
    assert "logic.reconstruct(projNode, ctNode" in parent.helpText
    for citation in ("SoftwareX 29, 102020", "Medical Imaging", "38(7)", "AIP Conference Proceedings"):
        assert citation in parent.acknowledgementText


def test_logic_finds_the_engine_beside_the_module(module):
    logic = module.SelfSupervisedSPECTLogic(engine_env={"OMP_NUM_THREADS": "1"})
    assert logic.engine_env["OMP_NUM_THREADS"] == "1"
    assert logic.engine_env["PYTHONPATH"].split(os.pathsep)[0] == str(MODULE_DIR)
    assert logic.moduleName == "SelfSupervisedSPECT"
    assert "osem" in logic.methods()


def test_selftest_runs_headless(module, capsys):
    test = module.SelfSupervisedSPECTTest()
    test.engine_env = {"OMP_NUM_THREADS": "1"}  # small problem, busy 2-core machine: one thread is fastest
    start = time.monotonic()
    test.runTest()
    elapsed = time.monotonic() - start
    messages = capsys.readouterr().out
    assert "Test passed" in messages
    assert elapsed < 120, f"the self-test took {elapsed:.0f} s"


def test_dependency_check_reads_versions_without_importing(module, tmp_path):
    """The first Run installs only what the engine's process would not find; this venv has it all."""
    requirements = module.readRequirements(MODULE_DIR / "Resources" / "requirements.txt")
    assert "pytomography==3.4.0" in requirements
    assert module.unmetRequirements(["torch", *requirements]) == []
    assert module.missingEnginePackages() == []
    assert module.unmetRequirements(["no-such-package-sspect>=1", "numpy<1", "numpy>=1"]) == \
        ["no-such-package-sspect>=1", "numpy<1"]


def test_the_engine_package_folder_is_looked_up_first(module, tmp_path):
    """An old numpy in the engine's folder shadows this Python's numpy for the engine's process."""
    info = tmp_path / "numpy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 0.1\n")
    assert module.unmetRequirements(["numpy>=1"]) == []
    assert module.unmetRequirements(["numpy>=1"], paths=[tmp_path]) == ["numpy>=1"]
    assert module.unmetRequirements(["numpy<1"], paths=[tmp_path]) == []


def test_only_the_engine_process_sees_its_package_folder(module, tmp_path):
    """The folder goes on the engine's PYTHONPATH, after the engine itself, and nowhere in this process."""
    (tmp_path / "sspect_engine_only_probe.py").write_text("FOUND = True\n")
    environment = module.engineEnvironment({"OMP_NUM_THREADS": "1"}, packagesFolder=str(tmp_path))
    assert environment["PYTHONPATH"].split(os.pathsep)[:2] == [str(MODULE_DIR), str(tmp_path)]
    assert str(tmp_path) not in module.engineEnvironment({}, packagesFolder=str(tmp_path / "absent"))["PYTHONPATH"]
    done = subprocess.run([sys.executable, "-c", "import sspect_engine_only_probe as p; print(p.FOUND)"],
                          env={**os.environ, **environment}, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    import importlib.util

    assert importlib.util.find_spec("sspect_engine_only_probe") is None


def test_slicer_older_than_the_oldest_supported_is_refused_in_one_sentence(module):
    sentence = module.unsupportedSlicerSentence("5.8", (3, 9, 10))
    assert sentence.startswith("SelfSupervisedSPECT needs 3D Slicer 5.10 or newer (Slicer 5.8 has Python 3.9")
    assert sentence.endswith("download.slicer.org.") and sentence.count(". ") == 0
    assert module.unsupportedSlicerSentence("5.10", (3, 12, 10)) is None
    assert module.unsupportedSlicerSentence(None, (3, 10, 0)) is None


def test_torch_build_follows_the_driver(module):
    header = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"
    assert module.nvidiaSmiCudaVersion(header) == (12, 4)
    assert module.nvidiaSmiCudaVersion("command not found") is None
    assert module.torchIndexUrl((12, 4)) == "https://download.pytorch.org/whl/cu124"
    assert module.torchIndexUrl((12, 5)) == "https://download.pytorch.org/whl/cu124"
    assert module.torchIndexUrl((13, 1)) == "https://download.pytorch.org/whl/cu130"
    assert module.torchIndexUrl((11, 2)) == "https://download.pytorch.org/whl/cpu"
    assert module.torchIndexUrl(None) == "https://download.pytorch.org/whl/cpu"
    assert module.torchWheelVersion("torch-2.5.1+cu124-cp312-cp312-win_amd64.whl") == "2.5.1+cu124"


def test_install_commands_write_only_into_the_engine_folder(module, tmp_path):
    download = module.torchDownloadCommand("PythonSlicer", "https://download.pytorch.org/whl/cpu", str(tmp_path))
    assert download[:4] == ["PythonSlicer", "-m", "pip", "download"] and "--no-deps" in download
    assert download[download.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    install = module.engineInstallCommand("PythonSlicer", "/engine", "/req.txt", str(tmp_path), "2.5.1+cpu")
    assert install[:4] == ["PythonSlicer", "-m", "pip", "install"]
    assert install[install.index("--target") + 1] == "/engine" and "--user" not in install
    assert "torch==2.5.1+cpu" in install and install[install.index("-r") + 1] == "/req.txt"


def test_selftest_says_what_is_missing_and_skips(module):
    """Where the engine's packages are missing (Extensions build machines, before the first Run)."""
    import tempfile
    import unittest

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as stream:
        stream.write("no-such-package-sspect>=1\n")
    test = module.SelfSupervisedSPECTTest()
    test.requirements_path = stream.name
    try:
        with pytest.raises(unittest.SkipTest) as skipped:
            test.runTest()
    finally:
        os.unlink(stream.name)
    assert str(skipped.value) == ("The self-test needs the engine's Python packages, missing here: "
                                  "no-such-package-sspect>=1; press Run once in the SelfSupervisedSPECT module "
                                  "to install them, then run the test again.")


def test_free_gpu_memory_text(module):
    output = "NVIDIA H100 80GB HBM3, 80000, 81559\nNVIDIA A100-SXM4-40GB, 1024, 40960\n"
    assert module.describeNvidiaSmi(output) == ("GPU NVIDIA H100 80GB HBM3: 78.1 of 79.6 GiB free; "
                                                "GPU NVIDIA A100-SXM4-40GB: 1.0 of 40.0 GiB free")
    assert module.describeNvidiaSmi("") == ""


class _DatabaseFromFiles:
    """What the plugin asks of slicer.dicomDatabase, answered from the files themselves with pydicom
    (ctkDICOMDatabase.fileValue returns the tag as text, multiple values joined by backslashes)."""

    def fileValue(self, path, tag):
        import pydicom

        group, element = (int(part, 16) for part in tag.split(","))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        item = ds.get((group, element))
        if item is None or item.value is None:
            return ""
        value = item.value
        return "\\".join(str(v) for v in value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else str(value)


@pytest.fixture
def dicom_plugin(module, monkeypatch):
    """The plugin file with the app's DICOMLib base classes stood in (their examine/load logic is ours)."""
    import types

    import slicer

    class DICOMLoadable:
        def __init__(self):
            self.files, self.name, self.tooltip, self.warning, self.selected, self.confidence = [], "Unknown", "", "", False, 0.5

    class DICOMPlugin:
        def __init__(self):
            self.loadType, self.loadableCache, self.tags = "Generic DICOM", {}, {}

        def getCachedLoadables(self, files):
            return self.loadableCache.get(tuple(files))

        def cacheLoadables(self, files, loadables):
            self.loadableCache[tuple(files)] = loadables

        def addSeriesInSubjectHierarchy(self, loadable, node):
            pass

    monkeypatch.setitem(sys.modules, "DICOMLib", types.SimpleNamespace(DICOMLoadable=DICOMLoadable, DICOMPlugin=DICOMPlugin))
    monkeypatch.setattr(slicer, "dicomDatabase", _DatabaseFromFiles(), raising=False)
    monkeypatch.delitem(sys.modules, "DICOMSPECTProjectionsPlugin", raising=False)
    import DICOMSPECTProjectionsPlugin

    yield DICOMSPECTProjectionsPlugin
    sys.modules.pop("DICOMSPECTProjectionsPlugin", None)


def test_dicom_plugin_registers_when_slicer_creates_its_module(dicom_plugin, monkeypatch):
    """Slicer instantiates every scripted module while loading them, before any module's panel is
    built: the DICOM module's plugin list (even as the home module) then includes this plugin."""
    import types

    import slicer

    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)  # the app's module registry
    parent = types.SimpleNamespace()
    dicom_plugin.DICOMSPECTProjectionsPlugin(parent)
    assert slicer.modules.dicomPlugins == {"DICOMSPECTProjectionsPlugin": dicom_plugin.DICOMSPECTProjectionsPluginClass}
    assert parent.hidden and parent.categories == ["Developer Tools.DICOM Plugins"]


def test_dicom_plugin_offers_projections_and_not_ct(dicom_plugin, small_study):
    import slicer

    plugin = dicom_plugin.DICOMSPECTProjectionsPluginClass()
    nm, ct_files = str(small_study["nm"]), [str(f) for f in small_study["ct_files"]]
    loadables = plugin.examine([[nm], ct_files])
    assert len(loadables) == 1
    loadable = loadables[0]
    assert loadable.files == [nm] and loadable.confidence == 0.95 and loadable.selected
    database = _DatabaseFromFiles()
    assert loadable.name == f"{database.fileValue(nm, '0020,0011')}: {database.fileValue(nm, '0008,103E')}"
    assert "energy windows: " in loadable.tooltip and "keV" in loadable.tooltip
    assert dicom_plugin.isProjectionHeader("1.2.840.10008.5.1.4.1.1.20", "NM", "ORIGINAL\\PRIMARY\\RECON TOMO\\EMISSION") is False

    node = plugin.load(loadable)
    assert node is not None and slicer.mrmlScene.GetNodeByID(node.GetID()) is node
    assert node.GetAttribute("SelfSupervisedSPECT.Role") == "projections"
    assert node.GetAttribute("DICOM.instanceUIDs") == _DatabaseFromFiles().fileValue(nm, "0008,0018")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))
    patient = hierarchy.GetItemParent(study)
    assert hierarchy.GetItemAttribute(study, "DICOM.StudyInstanceUID") == database.fileValue(nm, "0020,000D")
    assert hierarchy.GetItemAttribute(patient, "DICOM.PatientID") == database.fileValue(nm, "0010,0020")
