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
    """The first Run installs only what is missing or too old; this venv has the engine's packages."""
    requirements = module.readRequirements(MODULE_DIR / "Resources" / "requirements.txt")
    assert "pytomography==3.4.0" in requirements
    assert module.unmetRequirements(["torch", *requirements]) == []
    assert module.unmetRequirements(["no-such-package-sspect>=1", "numpy<1", "numpy>=1"]) == \
        ["no-such-package-sspect>=1", "numpy<1"]


def test_protecting_constraints_pin_what_is_installed(module, tmp_path):
    import importlib.metadata

    text = Path(module.writeProtectingConstraints(tmp_path / "constraints.txt")).read_text()
    assert f"numpy=={importlib.metadata.version('numpy')}" in text.splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in text.splitlines()


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
