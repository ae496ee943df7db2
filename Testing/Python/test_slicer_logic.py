"""The Slicer side (SelfSupervisedSPECTLib) on real MRML (slicer-core), through the real engine door.

DICOM written by the simulator is loaded into a real vtkMRMLScene, reconstructed by a real
`python -m sspect run-job` process, and brought back as a volume node: geometry against the
phantom's truth, units, fusion in a slice view, statistics per segment, a rendered fused slice,
cancel (the whole process tree dies), and failures (one sentence, the scene untouched).

The only stand-ins are those of slicer_app_shim: the app's ScriptedLoadableModule base classes
and `slicer.mrmlScene` set to a real scene. The engine runs with one OpenMP thread (see
test_run_job.py for why).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
psutil = pytest.importorskip("psutil")
import vtk  # noqa: E402  (slicer-core brings vtk)
from vtk.util import numpy_support  # noqa: E402

import slicer_app_shim  # noqa: E402  (pytest puts this folder on sys.path)

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SelfSupervisedSPECT"
LIB_DIR = MODULE_DIR / "SelfSupervisedSPECTLib"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from SelfSupervisedSPECTLib import DoorError, EngineRun, SelfSupervisedSPECTLogicBase  # noqa: E402
from SelfSupervisedSPECTLib.engine import parse_event_line  # noqa: E402
from SelfSupervisedSPECTLib.logic import PET_HEAT, release_headless_logics  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ENGINE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "PYTHONPATH": os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")]))}
RECON = {"method": "osem", "iterations": 2, "subsets": 4}


def _assert_one_sentence(message):
    assert isinstance(message, str) and message == message.strip() and message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert message.endswith("."), message
    assert not re.search(r"[.;:!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message}"


def _matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _node_ids(scene) -> list:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slicer_scene():
    """A real vtkMRMLScene as slicer.mrmlScene, with the app-only base classes installed."""
    scene = slicer_app_shim.install()
    yield scene
    release_headless_logics()
    slicer_app_shim.uninstall()


@pytest.fixture(scope="module")
def logic(slicer_scene, tmp_path_factory):
    return SelfSupervisedSPECTLogicBase(python_executable=sys.executable, engine_env=ENGINE_ENV,
                                        work_root=tmp_path_factory.mktemp("sspect_jobs"))


@pytest.fixture(scope="module")
def red_view(slicer_scene):
    """One axial slice view made headless (the app makes Red/Yellow/Green from its layout)."""
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(slicer_scene)
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(application)
    slice_logic.SetMRMLScene(slicer_scene)
    slice_node = slice_logic.AddSliceNode("Red")
    slice_node.SetOrientationToAxial()
    slice_node.SetDimensions(256, 256, 1)
    slice_logics = vtk.vtkCollection()  # the application logic knows its views' logics, as the app's layout sets them
    slice_logics.AddItem(slice_logic)
    application.SetSliceLogics(slice_logics)
    yield slice_logic
    slice_logic.SetMRMLScene(None)  # gotcha 4: tear the pipeline down before the interpreter does
    application.SetMRMLScene(None)


@pytest.fixture(scope="module")
def study(small_study, slicer_scene, logic, red_view):
    """Projections and CT loaded from DICOM, reconstructed through the door, the result loaded."""
    projections = logic.load_projection_series([str(small_study["nm"])])
    ct = logic.load_ct_series([str(p) for p in small_study["ct_files"]])
    events = []
    started = time.perf_counter()
    run = logic.reconstruct(projections, ct, method=RECON["method"], iterations=RECON["iterations"],
                            subsets=RECON["subsets"], calibration_cps_per_MBq=small_study["sensitivity_cps_per_mbq"],
                            device="cpu", wait=True, on_event=events.append)
    seconds = time.perf_counter() - started
    assert run.state == "done", (run.state, run.error, Path(run.log_path).read_text()[-3000:])
    result = logic.load_result(run, ct)
    return {**small_study, "projection_node": projections, "ct_node": ct, "run": run, "events": events,
            "result": result, "seconds": seconds}


# -- the library's boundary ----------------------------------------------------------------------
def test_library_imports_only_mrml_side():
    """No torch, pytomography, qt, ctk, slicer.app or engine import anywhere; slicer.util.X, never slicer.X."""
    forbidden = {"torch", "pytomography", "qt", "ctk", "sspect", "PythonQt"}
    util_functions = {name for name in dir(slicer.util) if callable(getattr(slicer.util, name)) and not name.startswith("_")}
    classes = {name for name in dir(slicer) if name.startswith(("vtk", "qMRML", "qSlicer"))}
    problems = []
    for path in sorted(LIB_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                names = []
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in forbidden]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                if node.attr == "app" or node.attr == "modules":
                    problems.append(f"{path.name}:{node.lineno} uses slicer.{node.attr}")
                elif node.attr in util_functions and node.attr not in classes:
                    problems.append(f"{path.name}:{node.lineno} uses the shortcut slicer.{node.attr}; write slicer.util.{node.attr}")
    assert not problems, problems
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import SelfSupervisedSPECTLib; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytomography', 'qt', 'ctk', 'sspect')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_event_lines_are_parsed_and_anything_else_becomes_log():
    assert parse_event_line('{"event": "progress", "fraction": 0.5}\n') == {"event": "progress", "fraction": 0.5}
    assert parse_event_line("Some library printed this\n") == {"event": "log", "message": "Some library printed this"}
    assert parse_event_line("[1, 2]\n") == {"event": "log", "message": "[1, 2]"}
    assert parse_event_line("   \n") is None


def test_background_processes_get_no_console_window_on_windows_and_their_own_group():
    """What every launch (engine runs, the method listing, nvidia-smi, pip) passes to Popen, per system."""
    from SelfSupervisedSPECTLib import background_process_options

    no_window, new_group = 0x08000000, 0x00000200  # CREATE_NO_WINDOW, CREATE_NEW_PROCESS_GROUP (winbase.h)
    assert background_process_options("nt") == {"creationflags": no_window | new_group}
    assert background_process_options("posix") == {"start_new_session": True}
    assert background_process_options() == background_process_options(os.name)
    if hasattr(subprocess, "CREATE_NO_WINDOW"):  # on Windows, the same numbers as the standard library's
        assert (subprocess.CREATE_NO_WINDOW, subprocess.CREATE_NEW_PROCESS_GROUP) == (no_window, new_group)


def test_shim_provides_only_the_app_pieces(slicer_scene):
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

    assert isinstance(slicer.mrmlScene, slicer.vtkMRMLScene) and slicer.mrmlScene is slicer_scene
    assert not hasattr(slicer, "app")

    class DemoLogic(ScriptedLoadableModuleLogic, SelfSupervisedSPECTLogicBase):
        pass

    mixed = DemoLogic()
    assert mixed.moduleName == "Demo" and mixed.python_executable
    before = slicer_scene.GetNumberOfNodes()
    parameters = mixed.getParameterNode()
    assert parameters.IsA("vtkMRMLScriptedModuleNode") and mixed.getParameterNode() is parameters
    slicer_scene.RemoveNode(parameters)
    assert slicer_scene.GetNumberOfNodes() == before
    with pytest.raises(RuntimeError, match="real 3D Slicer"):
        ScriptedLoadableModuleWidget()
    assert ScriptedLoadableModule(None).parent.title == ""
    ScriptedLoadableModuleTest().delayDisplay("delayDisplay prints headless")


def test_methods_come_from_the_engine(logic):
    registry = logic.methods()
    assert "osem" in registry and {p["name"] for p in registry["osem"]["params"]} >= {"iterations", "subsets"}
    assert logic.methods() is registry  # asked once


# -- inputs --------------------------------------------------------------------------------------
def test_projection_and_ct_nodes(study):
    projections, ct = study["projection_node"], study["ct_node"]
    assert projections.GetAttribute("SelfSupervisedSPECT.Role") == "projections"
    assert json.loads(projections.GetAttribute("SelfSupervisedSPECT.ProjectionFiles")) == [str(study["nm"])]
    views = slicer.util.arrayFromVolume(projections)  # [view, row, column]
    # the photopeak window's 24 views; a frame's rows run from the top (highest z) down, columns are Lr
    peak = np.rint(study["projections"].peak)  # [view, Lr, Lz] as simulated
    np.testing.assert_array_equal(views, peak.transpose(0, 2, 1)[:, ::-1, :])

    phantom = study["phantom"]
    np.testing.assert_allclose(_matrix(ct), LPS_TO_RAS @ phantom.hu_volume.affine, atol=1e-4)
    hu = slicer.util.arrayFromVolume(ct).transpose(2, 1, 0)  # [k, j, i] -> [x, y, z]
    np.testing.assert_array_equal(hu, np.clip(np.rint(phantom.hu), -1024, 3071))
    assert json.loads(ct.GetAttribute("SelfSupervisedSPECT.SourceFiles")) == [str(p) for p in study["ct_files"]]
    assert ct.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"


# -- patient and study: as Slicer's DICOM loading makes them ------------------------------------
def _hierarchy():
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)


def _patient_and_study(node):
    study_item = _hierarchy().GetItemParent(_hierarchy().GetItemByDataNode(node))
    return _hierarchy().GetItemParent(study_item), study_item


def _dicom_attributes(item) -> dict:
    return {name: _hierarchy().GetItemAttribute(item, name) for name in _hierarchy().GetItemAttributeNames(item)
            if name.startswith("DICOM.")}


def _patient_items() -> list:
    children = vtk.vtkIdList()
    _hierarchy().GetItemChildren(_hierarchy().GetSceneItemID(), children, False)
    return [children.GetId(i) for i in range(children.GetNumberOfIds()) if _hierarchy().GetItemLevel(children.GetId(i)) == "Patient"]


def _remove_patient_item(patient):
    _hierarchy().RemoveItemChildren(patient)  # slicer-core's recursive RemoveItem of a patient hangs, children first does not
    _hierarchy().RemoveItem(patient)


def _assert_slicer_adds_no_patient(node, patient_id, study_uid, series_uid):
    """What DICOMLib's DICOMPlugin.addSeriesInSubjectHierarchy does after our plugin's load: it
    looks the patient and study up by DICOM UID and fills in only the items it has to make."""
    item = _hierarchy().GetItemByDataNode(node)
    patient, study_item = _patient_and_study(node)
    assert _hierarchy().GetItemByUID("DICOM", patient_id) == patient and _hierarchy().GetItemByUID("DICOM", study_uid) == study_item
    patients = _patient_items()
    _hierarchy().SetItemUID(item, "DICOM", series_uid)
    slicer.vtkSlicerSubjectHierarchyModuleLogic.InsertDicomSeriesInHierarchy(_hierarchy(), patient_id, study_uid, series_uid)
    assert _patient_items() == patients and _patient_and_study(node) == (patient, study_item)


def test_series_sit_under_patient_and_study_items_carrying_the_dicom_tags(study):
    import pydicom

    ds = pydicom.dcmread(study["nm"], stop_before_pixels=True)
    patient, study_item = _patient_and_study(study["projection_node"])
    assert _patient_and_study(study["ct_node"]) == (patient, study_item)
    assert _dicom_attributes(patient) == {"DICOM.PatientName": str(ds.PatientName), "DICOM.PatientID": ds.PatientID,
                                          "DICOM.PatientSex": ds.PatientSex, "DICOM.PatientBirthDate": ds.PatientBirthDate,
                                          "DICOM.PatientComments": ""}
    assert _dicom_attributes(study_item) == {"DICOM.StudyInstanceUID": ds.StudyInstanceUID, "DICOM.StudyID": ds.StudyID,
                                             "DICOM.StudyDescription": ds.StudyDescription, "DICOM.StudyDate": ds.StudyDate,
                                             "DICOM.StudyTime": ds.StudyTime}
    assert _hierarchy().GetItemName(patient) == f"{ds.PatientName} ({ds.PatientID})"
    assert _hierarchy().GetItemName(study_item) == f"{ds.StudyDescription} ({ds.StudyDate})"
    assert _hierarchy().GetItemOwnerPluginName(patient) == _hierarchy().GetItemOwnerPluginName(study_item) == "DICOM"
    _assert_slicer_adds_no_patient(study["projection_node"], ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID)


def test_deidentified_series_with_empty_patient_id_share_one_patient_item(small_study, logic, tmp_path):
    """Slicer's rule for an empty Patient ID: the patient item's ID is "Patient-<Study Instance UID>"."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(small_study["nm"])
    ds.PatientID, ds.PatientName, ds.StudyDescription, ds.StudyDate = "", "", "", ""
    ds.StudyInstanceUID = generate_uid()
    path = tmp_path / "deidentified_nm.dcm"
    ds.save_as(path)
    first, second = (logic.load_projection_series([str(path)]) for _ in range(2))
    patient, study_item = _patient_and_study(first)
    patient_id = f"Patient-{ds.StudyInstanceUID}"
    assert _patient_and_study(second) == (patient, study_item)
    assert _hierarchy().GetItemUID(patient, "DICOM") == patient_id
    assert _dicom_attributes(patient)["DICOM.PatientID"] == patient_id and _dicom_attributes(patient)["DICOM.PatientName"] == "No name"
    assert _dicom_attributes(study_item)["DICOM.StudyDescription"] == "No study description"
    assert _hierarchy().GetItemName(patient) == f"No name ({patient_id})"
    assert _hierarchy().GetItemName(study_item) == "No study description"
    _assert_slicer_adds_no_patient(first, patient_id, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    for node in (first, second):
        slicer.mrmlScene.RemoveNode(node)
    _remove_patient_item(patient)


def test_real_deidentified_study_loads_into_one_patient_and_builds_a_job(real_study, logic):
    """The real GE study has an empty Patient ID: projections and CT share Slicer's patient item."""
    import pydicom

    ds = pydicom.dcmread(real_study["nm"], stop_before_pixels=True)
    projections = logic.load_projection_series([real_study["nm"]])
    ct = logic.load_ct_series(real_study["ct"])
    patient, study_item = _patient_and_study(projections)
    patient_id = f"Patient-{ds.StudyInstanceUID}"
    assert ds.PatientID == "" and _patient_and_study(ct) == (patient, study_item)
    assert _dicom_attributes(patient)["DICOM.PatientID"] == patient_id
    assert _dicom_attributes(study_item)["DICOM.StudyInstanceUID"] == ds.StudyInstanceUID
    assert len([item for item in _patient_items() if _hierarchy().GetItemUID(item, "DICOM") == patient_id]) == 1
    _assert_slicer_adds_no_patient(projections, patient_id, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    job, _ = logic.build_job(projections, ct, "osem", {"iterations": 1})
    assert job["nm"] == [real_study["nm"]] and len(job["ct"]) == len(list(Path(real_study["ct"]).iterdir()))
    for node in (projections, ct):
        slicer.mrmlScene.RemoveNode(node)
    _remove_patient_item(patient)


# -- the result ----------------------------------------------------------------------------------
def test_result_lands_with_truth_geometry_and_units(study):
    result, truth = study["result"], study["truth"]
    np.testing.assert_allclose(_matrix(result), LPS_TO_RAS @ truth.affine, atol=1e-4)
    bounds = np.zeros(6)
    result.GetRASBounds(bounds)
    corners = np.array([LPS_TO_RAS @ truth.affine @ [i, j, k, 1] for i in (-0.5, 31.5) for j in (-0.5, 31.5) for k in (-0.5, 31.5)])
    np.testing.assert_allclose(bounds[0::2], corners[:, :3].min(axis=0), atol=1e-3)
    np.testing.assert_allclose(bounds[1::2], corners[:, :3].max(axis=0), atol=1e-3)

    from sspect.io.volume_files import read_image
    written = read_image(study["run"].result["files"]["nrrd"])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result).transpose(2, 1, 0), written.array, rtol=1e-6)
    assert written.unit == "Bq/mL"

    assert result.GetName() == "OSEM 2it 4ss [Bq/mL]"
    assert result.GetVoxelValueUnits().GetCodeValue() == "Bq/mL"
    assert result.GetVoxelValueUnits().GetCodingSchemeDesignator() == "UCUM"
    assert result.GetAttribute("SelfSupervisedSPECT.Unit") == "Bq/mL"
    assert result.GetAttribute("SelfSupervisedSPECT.Method") == "osem"
    assert json.loads(result.GetAttribute("SelfSupervisedSPECT.Params")) == {"iterations": 2, "subsets": 4}
    assert Path(result.GetAttribute("SelfSupervisedSPECT.ProvenanceFile")).is_file()

    display = result.GetDisplayNode()
    assert display.GetColorNodeID() == PET_HEAT and slicer.mrmlScene.GetNodeByID(PET_HEAT) is not None
    values = slicer.util.arrayFromVolume(result)
    assert display.GetWindowLevelMin() == pytest.approx(0.0)
    assert display.GetWindowLevelMax() == pytest.approx(np.percentile(values, 99.5), rel=1e-4)

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    result_item, ct_item = hierarchy.GetItemByDataNode(result), hierarchy.GetItemByDataNode(study["ct_node"])
    assert result_item and ct_item and hierarchy.GetItemParent(result_item) == hierarchy.GetItemParent(ct_item)
    assert hierarchy.GetItemLevel(hierarchy.GetItemParent(result_item)) == "Study"

    # The brightest voxel lies in an organ the phantom made hot, and activity is conserved.
    phantom = study["phantom"]
    hottest = np.unravel_index(np.argmax(written.array), written.array.shape)
    assert phantom.labels[hottest] in (phantom.label_names["lesion_liver"], phantom.label_names["lesion_node"],
                                        phantom.label_names["kidney_left"], phantom.label_names["kidney_right"])
    total_mbq = written.array.sum(dtype=np.float64) * truth.voxel_volume_ml / 1e6
    assert total_mbq == pytest.approx(phantom.total_activity_mbq(), rel=0.15)

    kinds = [e["event"] for e in study["events"]]
    assert kinds[0] == "start" and kinds[-1] == "result" and "progress" in kinds
    assert study["run"].progress == pytest.approx(1.0)
    print(f"\nreconstruct(wait=True) through the door: {study['seconds']:.1f} s")


def test_uncertainty_map_and_binned_grid_arrive_with_the_image(study, logic):
    """A method with replicates (n2n) on a 2x2-binned grid: its voxel SD map loads as a second volume,
    in the image's unit, referenced from the image and equal to the engine's file."""
    from SelfSupervisedSPECTLib.logic import ROLE, UNCERTAINTY_REFERENCE

    run = logic.reconstruct(study["projection_node"], study["ct_node"], method="n2n", features=4, iterations=2,
                            subsets=4, steps=4, validation_interval=2, detector_binning=2,
                            calibration_cps_per_MBq=study["sensitivity_cps_per_mbq"], device="cpu", wait=True)
    assert run.state == "done", (run.state, run.error)
    image = logic.load_result(run, study["ct_node"])
    sd = image.GetNodeReference(UNCERTAINTY_REFERENCE)
    assert sd is not None and sd.GetAttribute(ROLE) == "uncertainty" and image.GetAttribute(ROLE) == "result"
    assert sd.GetName() == f"{image.GetName()} SD" and sd.GetAttribute("SelfSupervisedSPECT.Unit") == "Bq/mL"
    values, spread = slicer.util.arrayFromVolume(image), slicer.util.arrayFromVolume(sd)
    assert values.shape == spread.shape == (16, 16, 16)  # 32^3 study binned 2x2
    assert np.all(spread >= 0) and 0 < spread.mean() < values.mean()
    np.testing.assert_array_equal(_matrix(sd), _matrix(image))
    from sspect.io.volume_files import read_image
    np.testing.assert_allclose(spread, read_image(run.result["files"]["uncertainty"]).array.transpose(2, 1, 0))
    # leave the shared scene as the other tests expect it: the OSEM result fused with the CT
    for node in (image, sd):
        slicer.mrmlScene.RemoveNode(node)
    logic.show_fused(study["ct_node"], study["result"])


def test_shipped_supervised_network_runs_through_the_door_and_refuses_another_voxel_size(study, logic, slicer_scene,
                                                                                        tmp_path):
    """post-unet with the network that ships with the extension: refused in one sentence on the 12 mm study,
    run on an 8.8 mm study (its training voxel size), with the image in Bq/mL and OSEM's total activity."""
    import contextlib
    import io

    from sspect.sim.dicom_writer import write_demo_study

    before = _node_ids(slicer_scene)
    refused = logic.reconstruct(study["projection_node"], study["ct_node"], method="post-unet",
                                calibration_cps_per_MBq=study["sensitivity_cps_per_mbq"], device="cpu", wait=True)
    assert refused.state == "failed"
    _assert_one_sentence(refused.error)
    assert "8.8392" in refused.error and "12.0" in refused.error
    assert _node_ids(slicer_scene) == before
    with contextlib.redirect_stdout(io.StringIO()):
        written = write_demo_study(tmp_path, seed=2, n_views=24, shape=(32, 32, 32), voxel_mm=8.8392)
    projections = logic.load_projection_series([str(written["nm"])])
    ct = logic.load_ct_series([str(p) for p in written["ct_files"]])
    images = {}
    for method, params in (("post-unet", {}), ("osem", {"iterations": 4, "subsets": 6})):
        run = logic.reconstruct(projections, ct, method=method, calibration_cps_per_MBq=written["sensitivity_cps_per_mbq"],
                                device="cpu", wait=True, **params)
        assert run.state == "done", (run.state, run.error)
        images[method] = logic.load_result(run, ct)
    supervised = images["post-unet"]
    assert supervised.GetAttribute("SelfSupervisedSPECT.Unit") == "Bq/mL"
    totals = {m: float(slicer.util.arrayFromVolume(node).sum()) for m, node in images.items()}
    assert abs(totals["post-unet"] / totals["osem"] - 1) < 0.05, totals
    for node in (*images.values(), projections, ct):
        slicer.mrmlScene.RemoveNode(node)
    logic.show_fused(study["ct_node"], study["result"])


def test_fusion_in_every_slice_view(study, red_view):
    composite = red_view.GetSliceCompositeNode()
    assert composite.GetBackgroundVolumeID() == study["ct_node"].GetID()
    assert composite.GetForegroundVolumeID() == study["result"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    assert composite.GetLinkedControl()


def test_fused_views_are_fitted_to_the_images_and_pass_through_the_hottest_voxel(study, red_view):
    """A slice view left far from the images is brought back: fitted to CT and activity, and its
    slice through the result's hottest voxel."""
    logic = SelfSupervisedSPECTLogicBase(python_executable=sys.executable, application_logic=red_view.GetMRMLApplicationLogic())
    slice_node = red_view.GetSliceNode()
    slice_node.SetFieldOfView(10.0, 10.0, 1.0)
    slice_node.JumpSliceByCentering(5000.0, 5000.0, 5000.0)
    logic.show_fused(study["ct_node"], study["result"])
    ct_bounds = np.zeros(6)
    study["ct_node"].GetRASBounds(ct_bounds)
    extent = ct_bounds[1::2] - ct_bounds[0::2]
    field = slice_node.GetFieldOfView()
    assert field[0] >= extent[0] - 1e-3 and field[1] >= extent[1] - 1e-3, (field, extent)
    centre = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())[:3, 3]
    assert all(ct_bounds[2 * axis] <= centre[axis] <= ct_bounds[2 * axis + 1] for axis in range(2)), (centre, ct_bounds)
    values = slicer.util.arrayFromVolume(study["result"])
    hottest_kji = np.unravel_index(int(np.argmax(values)), values.shape)
    hottest_ras = _matrix(study["result"]) @ [*hottest_kji[::-1], 1.0]
    assert slice_node.GetSliceOffset() == pytest.approx(hottest_ras[2], abs=1e-3)


def _segmentation_from_labels(phantom, name="Phantom organs"):
    """A real segmentation node from the phantom's label array, one named segment per organ."""
    labels = np.ascontiguousarray(phantom.labels.transpose(2, 1, 0))  # [x, y, z] -> [k, j, i]
    labelmap = slicer.util.addVolumeFromArray(labels, LPS_TO_RAS @ phantom.activity_volume.affine,
                                              name="phantom labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    by_value = {value: label for label, value in phantom.label_names.items()}
    segments = segmentation.GetSegmentation()
    for index in range(segments.GetNumberOfSegments()):
        segment = segments.GetNthSegment(index)
        segment.SetName(by_value[segment.GetLabelValue()])
    slicer.mrmlScene.RemoveNode(labelmap)
    return segmentation


def _table_rows(table) -> dict:
    vtk_table = table.GetTable()
    names = [vtk_table.GetColumnName(c) for c in range(vtk_table.GetNumberOfColumns())]
    rows = {}
    for r in range(vtk_table.GetNumberOfRows()):
        values = {names[c]: vtk_table.GetValue(r, c) for c in range(len(names))}
        rows[values["Segment"].ToString()] = {k: v.ToDouble() for k, v in values.items() if k != "Segment"}
    return rows


def test_dosimetry_table_against_phantom_truth(study, logic):
    phantom, truth = study["phantom"], study["truth"]
    segmentation = _segmentation_from_labels(phantom)
    truth_node = slicer.util.addVolumeFromArray(np.ascontiguousarray(truth.array.transpose(2, 1, 0) * 1e6),
                                                LPS_TO_RAS @ truth.affine, name="Truth [Bq/mL]")
    truth_node.SetAttribute("SelfSupervisedSPECT.Unit", "Bq/mL")
    result = study["result"]

    table = logic.dosimetry_table(segmentation, [result, truth_node])
    rows = _table_rows(table)
    assert set(rows) == set(phantom.label_names)
    columns = set(next(iter(rows.values())))
    assert columns == {"Volume (mL)"} | {f"{n.GetName()} {s}" for n in (result, truth_node) for s in ("mean", "max", "MBq")}
    assert table.GetTable().GetColumnName(0) == "Segment"

    recon, exact = result.GetName(), truth_node.GetName()
    for label, value in phantom.label_names.items():
        inside = phantom.labels == value
        row = rows[label]
        assert row["Volume (mL)"] == pytest.approx(inside.sum() * phantom.voxel_volume_ml, rel=1e-9)
        # the truth column checks the statistics machinery exactly
        assert row[f"{exact} mean"] == pytest.approx(phantom.activity[inside].mean() * 1e6, rel=1e-5)
        assert row[f"{exact} max"] == pytest.approx(phantom.activity[inside].max() * 1e6, rel=1e-5)
        assert row[f"{exact} MBq"] == pytest.approx(phantom.total_activity_mbq(label), rel=1e-5)
        assert row[f"{recon} max"] >= row[f"{recon} mean"] > 0

    # 2 OSEM iterations: large organs near truth, small hot ones still low (partial volume, slow convergence)
    def recovery(label):
        return rows[label][f"{recon} mean"] / rows[label][f"{exact} mean"]

    assert 0.75 <= recovery("liver") <= 1.25
    for kidney in ("kidney_left", "kidney_right"):
        assert 0.5 <= recovery(kidney) <= 1.25
    total = sum(row[f"{recon} MBq"] for row in rows.values())
    assert total == pytest.approx(phantom.total_activity_mbq(), rel=0.15)

    # a counts image gets mean and max but no MBq column
    counts_node = slicer.util.addVolumeFromArray(np.ones((32, 32, 32), np.float32), LPS_TO_RAS @ truth.affine, name="Counts")
    counts_node.SetAttribute("SelfSupervisedSPECT.Unit", "counts")
    names = {_name for _name in _table_rows(logic.dosimetry_table(segmentation, counts_node))["liver"]}
    assert names == {"Volume (mL)", "Counts mean", "Counts max"}


def test_fused_slice_renders_with_the_hot_spot_on_the_hot_organ(study, red_view, tmp_path):
    """CPU blending of the slice logic (no OpenGL): the fused slice, written as PNG; its hottest
    foreground pixels lie on the phantom's hottest organ in that slice (the liver lesion)."""
    phantom = study["phantom"]
    lesion = phantom.labels == phantom.label_names["lesion_liver"]
    centre_ras = (LPS_TO_RAS @ phantom.activity_volume.affine @ np.append(np.argwhere(lesion).mean(axis=0), 1.0))[:3]
    slice_node = red_view.GetSliceNode()
    composite = red_view.GetSliceCompositeNode()
    red_view.FitSliceToAll()
    red_view.SetSliceOffset(float(centre_ras[2]))

    def render():
        red_view.UpdateImageData() if hasattr(red_view, "UpdateImageData") else None
        producer = red_view.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        nx, ny, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1).copy()
        return image, pixels

    image, fused = render()
    png = tmp_path / "fused_axial.png"
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(png))
    writer.SetInputData(image)
    writer.Write()
    assert png.stat().st_size > 1000
    composite.SetForegroundOpacity(0.0)
    try:
        _, ct_only = render()
    finally:
        composite.SetForegroundOpacity(0.5)

    rgb_fused, rgb_ct = fused[..., :3].astype(float), ct_only[..., :3].astype(float)
    assert np.abs(rgb_fused - rgb_ct).max() > 50  # the foreground is visible
    assert (rgb_fused[..., 0] - rgb_fused[..., 2]).max() > 40  # in heat colours (red over blue)
    foreground = (rgb_fused - rgb_ct).sum(axis=2)  # what the activity adds to each pixel
    hot = foreground >= np.percentile(foreground, 99.7)
    ys, xs = np.nonzero(hot)
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    hot_ras = (xy_to_ras @ np.array([xs.mean(), ys.mean(), 0.0, 1.0]))[:3]
    voxel = float(phantom.spacing[0])
    print(f"\nhot spot RAS {np.round(hot_ras, 1)}, liver lesion centre RAS {np.round(centre_ras, 1)}, {hot.sum()} hot pixels; PNG {png}")
    assert np.linalg.norm(hot_ras[:2] - centre_ras[:2]) <= 2 * voxel, (hot_ras, centre_ras)
    assert abs(hot_ras[2] - centre_ras[2]) < 1e-3


# -- cancel and failures -------------------------------------------------------------------------
def test_cancel_kills_the_whole_process_tree(study, slicer_scene, tmp_path):
    """The engine behind a launcher (as PythonSlicer starts the real interpreter as a child):
    cancel after the first progress event kills launcher and worker, and the scene is untouched."""
    launcher = tmp_path / "PythonLauncher"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')
    launcher.chmod(0o755)
    logic = SelfSupervisedSPECTLogicBase(python_executable=str(launcher), engine_env=ENGINE_ENV, work_root=tmp_path / "jobs")
    before = _node_ids(slicer_scene)
    run = logic.reconstruct(study["projection_node"], study["ct_node"], method="osem", iterations=200, subsets=4,
                            calibration_cps_per_MBq=study["sensitivity_cps_per_mbq"], device="cpu")
    assert isinstance(run, EngineRun) and run.state == "running"
    deadline = time.monotonic() + 120
    seen = []
    while not any(e["event"] == "progress" for e in seen):
        assert time.monotonic() < deadline, "no progress event within 120 s"
        assert run.state == "running", (run.state, run.error)
        seen += run.poll()
        time.sleep(0.02)
    tree = [psutil.Process(run.pid)] + psutil.Process(run.pid).children(recursive=True)
    assert len(tree) >= 2, "the launcher should have started the engine as its child"
    started = time.perf_counter()
    assert run.cancel() == "cancelled"
    cancel_seconds = time.perf_counter() - started

    def gone(process):
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert all(gone(p) for p in tree), [(p.pid, p.status()) for p in tree if not gone(p)]
    assert run.state == "cancelled" and run.poll() == [] and run.state == "cancelled"
    assert not list(Path(run.job_path).parent.rglob("*.nrrd"))  # nothing half-written
    assert _node_ids(slicer_scene) == before
    with pytest.raises(DoorError) as refused:
        logic.load_result(run, study["ct_node"])
    _assert_one_sentence(str(refused.value))
    assert _node_ids(slicer_scene) == before
    print(f"\ncancel took {cancel_seconds:.2f} s for {len(tree)} processes")


def test_engine_error_arrives_as_one_sentence(study, logic, slicer_scene):
    before = _node_ids(slicer_scene)
    run = logic.reconstruct(study["projection_node"], study["ct_node"], method="osem", iterations=1, subsets=48,
                            calibration_cps_per_MBq=study["sensitivity_cps_per_mbq"], device="cpu", wait=True)
    assert run.state == "failed" and run.result is None
    _assert_one_sentence(run.error)
    assert "48 subsets" in run.error and "24 views" in run.error
    with pytest.raises(DoorError) as refused:
        logic.load_result(run, study["ct_node"])
    _assert_one_sentence(str(refused.value))
    assert _node_ids(slicer_scene) == before
    assert Path(run.log_path).is_file()  # stderr went to the job's log, not to the user


def test_user_errors_are_one_sentence_and_leave_the_scene_alone(study, logic, slicer_scene):
    before = _node_ids(slicer_scene)
    jobs_before = sorted(logic.work_root.iterdir())
    projections, ct = study["projection_node"], study["ct_node"]
    loose = slicer.vtkMRMLScalarVolumeNode()
    loose.SetName("Drawn by hand")
    attempts = {
        "CT node as projections": lambda: logic.reconstruct(ct, ct, iterations=2),
        "projections as CT": lambda: logic.build_job(projections, projections),
        "CT file as projections": lambda: logic.load_projection_series([str(study["ct_files"][0])]),
        "no DICOM source": lambda: logic.files_for_node(loose),
        "unknown method": lambda: logic.build_job(projections, ct, method="magic"),
        "unknown parameter": lambda: logic.reconstruct(projections, ct, iterations=2, smoothness=3),
        "bad calibration": lambda: logic.build_job(projections, ct, calibration_cps_per_MBq=-1),
        "bad injected activity": lambda: logic.build_job(projections, ct, injected_activity_MBq="lots"),
        "bad window role": lambda: logic.build_job(projections, ct, windows={"photopeak": 1}),
        "unknown projector": lambda: logic.build_job(projections, ct, projector="fastest"),
        "unknown isotope": lambda: logic.build_job(projections, ct, isotope="Xe133"),
        "bad photopeaks": lambda: logic.build_job(projections, ct, photopeaks="high"),
        "no segmentation": lambda: logic.dosimetry_table(None, [study["result"]]),
        "missing file": lambda: logic.load_ct_series([str(study["ct_files"][0]) + ".missing"]),
    }
    for what, attempt in attempts.items():
        with pytest.raises(DoorError) as refused:
            attempt()
        _assert_one_sentence(str(refused.value))
        assert _node_ids(slicer_scene) == before, what
    assert "not SPECT projections" in str(pytest.raises(DoorError, attempts["CT node as projections"]).value)
    assert "load it through the DICOM browser" in str(pytest.raises(DoorError, attempts["no DICOM source"]).value)
    assert sorted(logic.work_root.iterdir()) == jobs_before  # no job folder for a refused job


def test_job_file_follows_the_engine_schema(study, logic):
    from sspect.jobs import JOB_KEYS, read_job

    job, path = logic.build_job(study["projection_node"], study["ct_node"], "osem", {"iterations": 3},
                                calibration_cps_per_MBq=9.0, device="cpu", windows={"lower": "none"},
                                projector="pytomography", isotope="177Lu", photopeaks="113, 208",
                                injection_datetime="2024-02-28T09:00:00", injected_activity_MBq="7400")
    assert job["injection_datetime"] == "2024-02-28T09:00:00" and job["injected_activity_MBq"] == 7400.0
    assert set(job) == JOB_KEYS and read_job(path).model_dump() == job and job["projector"] == "pytomography"
    assert job["isotope"] == "177Lu" and job["photopeaks"] == [113.0, 208.0]
    assert job["nm"] == [str(study["nm"])] and job["ct"] == [str(p) for p in study["ct_files"]]
    assert job["formats"] == ["nrrd"] and job["windows"] == {"peak": None, "lower": "none", "upper": None}
    assert Path(job["output_dir"]) == path.parent and path.parent.parent == logic.work_root
    with pytest.raises(DoorError) as refused:
        EngineRun(path, python_executable=str(path.parent / "no-such-python"))
    _assert_one_sentence(str(refused.value))


def test_calibration_through_the_door_is_listed_and_chosen_by_name(study, slicer_scene, tmp_path):
    from sspect.jobs import read_job, settings_from_job
    from sspect.pipeline import check_settings

    store = tmp_path / "calibrations.json"
    logic = SelfSupervisedSPECTLogicBase(python_executable=sys.executable, engine_env={**ENGINE_ENV, "SSPECT_CALIBRATIONS": str(store)},
                                         work_root=tmp_path / "jobs")
    phantom = study["phantom"]
    activity = float(phantom.activity.sum(dtype=np.float64)) * float(np.prod(phantom.spacing)) / 1000
    run = logic.calibrate(study["projection_node"], study["ct_node"], "door", activity, method="osem", iterations=1,
                          subsets=2, device="cpu", wait=True)
    assert run.state == "done", (run.state, run.error)
    listed = logic.calibrations()
    assert list(listed) == ["door"] and listed["door"] == run.result["calibration"]
    assert listed["door"]["method"] == "osem" and listed["door"]["params"] == {"iterations": 1, "subsets": 2}
    job, path = logic.build_job(study["projection_node"], study["ct_node"], "osem", {}, calibration="door",
                                decay_correction="injection", device="cpu")
    assert (job["task"], job["calibration"], job["decay_correction"]) == ("reconstruct", "door", "injection")
    check_settings(settings_from_job(read_job(path)))
    for wrong, words in (({"decay_correction": "admin"}, "decay correction"),
                         ({"calibration": "door", "calibration_cps_per_MBq": 9.0}, "not both")):
        with pytest.raises(DoorError, match=words):
            logic.build_job(study["projection_node"], study["ct_node"], "osem", {}, **wrong)
    with pytest.raises(DoorError, match="name"):
        logic.calibrate(study["projection_node"], study["ct_node"], " ", activity)
