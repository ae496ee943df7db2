"""The module's logic, MRML only: inputs from DICOM/MRML -> job file; results -> nodes, fusion, statistics.

The app's ``SelfSupervisedSPECTLogic(ScriptedLoadableModuleLogic, SelfSupervisedSPECTLogicBase)``
mixes this class in; on its own it runs in the Slicer Python console, in scripts, and headless
on slicer-core. It uses ``slicer.mrmlScene`` and ``slicer.util`` helpers only, never ``slicer.app``,
qt or ctk, and never the engine's Python packages: the engine runs in a separate process.

Every failure a user can cause raises ``DoorError`` with one sentence, before the scene is
touched; nodes are built outside the scene and added together at the end, and removed again if
adding them fails, so a failure never leaves half-added nodes.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from . import dicom
from .engine import DONE, EngineRun, background_process_options, default_python
from .errors import DoorError

ATTRIBUTE = "SelfSupervisedSPECT."
PROJECTION_FILES = ATTRIBUTE + "ProjectionFiles"
SOURCE_FILES = ATTRIBUTE + "SourceFiles"
ROLE = ATTRIBUTE + "Role"
PET_HEAT = "vtkMRMLPETProceduralColorNodePET-Heat"
GREY = "vtkMRMLColorTableNodeGrey"
UNCERTAINTY_REFERENCE = ATTRIBUTE + "Uncertainty"  # node reference from a result image to its voxel SD map
JOB_OPTIONS = ("calibration_cps_per_MBq", "calibration", "device", "windows", "output_dir", "collimator", "seed",
               "detector_binning", "projector", "isotope", "photopeaks", "acquisition_datetime", "injection_datetime",
               "injected_activity_MBq", "decay_correction", "scatter_smoothing_cm")
DECAY_CORRECTIONS = ("none", "start", "injection")  # to the mean over the acquisition, its start, the injection
PROJECTORS = ("fast", "pytomography")  # the engine's system models: its own fast operator, PyTomography's (reference)
ISOTOPES = ("177Lu", "99mTc", "111In", "131I")  # the engine's isotope registry (sspect/physics/isotopes.py)
WINDOW_KEYS = ("peak", "lower", "upper")
SHORT_PARAMS = {"iterations": "it", "subsets": "ss", "beta": "b"}
UNITS = {  # unit the engine writes -> (UCUM code, meaning), quantity
    "Bq/mL": (("Bq/mL", "UCUM", "becquerel per milliliter"),
              ("activity-concentration", "99SSPECT", "Activity concentration")),
    "counts": (("{counts}", "UCUM", "counts"), ("counts-per-voxel", "99SSPECT", "Counts per voxel")),
}

# Headless only: the colour logic that owns the default colour nodes. It must outlive every
# caller (deleting it removes its colour nodes from the scene), so it is kept here, per scene.
_HEADLESS_LOGICS: dict = {}


class SelfSupervisedSPECTLogicBase:
    """Inputs to job files, engine runs, results into the scene; plain Python on MRML."""

    def __init__(self, python_executable=None, engine_env=None, work_root=None, application_logic=None):
        """``application_logic``: the vtkMRMLApplicationLogic that holds the slice views' logics
        (the app's ``slicer.app.applicationLogic()``); ``show_fused`` fits those views to the images."""
        super().__init__()
        self.application_logic = application_logic
        self.python_executable = python_executable or default_python()
        self.engine_env = dict(engine_env or {})
        self.work_root = Path(work_root) if work_root else Path(tempfile.gettempdir()) / "SelfSupervisedSPECT"
        self._methods_cache = None

    # -- the engine ----------------------------------------------------------------------------
    def _engine_environment(self, device: str = "auto") -> dict:
        environment = dict(self.engine_env)
        if str(device).lower() == "cpu":
            environment["CUDA_VISIBLE_DEVICES"] = "-1"
        return environment

    def methods(self) -> dict:
        """The engine's registry, {name: {name, title, family, params: [...]}}, asked once. It blocks
        while the engine starts (seconds): the panel calls it from a worker thread."""
        if self._methods_cache is None:
            self._methods_cache = self._engine_listing(["methods"], "methods")
        return self._methods_cache

    def calibrations(self) -> dict:
        """The sensitivities stored by `sspect calibrate`, {name: record}, asked afresh (blocks like ``methods``)."""
        return self._engine_listing(["calibrations", "--json"], "stored calibrations")

    def _engine_listing(self, arguments, what) -> dict:
        """A JSON object the engine prints for ``python -m sspect <arguments>``; one sentence when it fails."""
        command = [self.python_executable, "-m", "sspect", *arguments]
        environment = {**os.environ, **self._engine_environment()}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment,
                                  stdin=subprocess.DEVNULL, **background_process_options())
        except (OSError, subprocess.SubprocessError) as error:
            raise DoorError(f"The engine could not be started with {self.python_executable} ({error}); "
                            "check the Python interpreter set for the module.") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            cause = lines[-1].strip()[:200] if lines else f"exit code {done.returncode}"
            raise DoorError(f"The engine did not list its {what} ({cause}); check that the sspect package "
                            f"is installed for {self.python_executable}.")
        try:
            listing = json.loads(done.stdout)
        except ValueError:
            raise DoorError(f"The engine's list of {what} was not valid JSON; update the sspect package.") from None
        if not isinstance(listing, dict):
            raise DoorError(f"The engine's list of {what} has an unexpected shape; update the sspect package.")
        return listing

    # -- inputs --------------------------------------------------------------------------------
    def load_projection_series(self, files, name=None):
        """Show an NM TOMO file's photopeak views as a volume; the files go with the node for the job."""
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        loaded = dicom.read_projections(files)
        node = self._volume_node(loaded, name or loaded.info.series_description or "NM projections")
        node.SetAttribute(PROJECTION_FILES, json.dumps(loaded.files))
        node.SetAttribute(ROLE, "projections")
        if loaded.extra.get("photopeak_keV"):
            node.SetAttribute(ATTRIBUTE + "DisplayedWindowKeV", json.dumps(loaded.extra["photopeak_keV"]))
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        display.SetAutoWindowLevel(True)
        self._add_to_scene(node, display, GREY, info=loaded.info)
        return node

    def load_ct_series(self, files, name=None):
        """A CT series from its files (console and tests; in the app Slicer's DICOM plugin loads CT)."""
        if isinstance(files, (str, os.PathLike)):
            path = Path(files)
            files = sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else [str(path)]
        loaded = dicom.read_ct(files)
        node = self._volume_node(loaded, name or loaded.info.series_description or "CT")
        node.SetAttribute(SOURCE_FILES, json.dumps(loaded.files))
        node.SetAttribute(ROLE, "ct")
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(400.0, 40.0)  # soft tissue
        self._add_to_scene(node, display, GREY, info=loaded.info)
        return node

    def files_for_node(self, node) -> list:
        """The DICOM files a node was loaded from: our own attributes, else Slicer's DICOM database."""
        if node is None:
            raise DoorError("No volume was selected; choose the series to use.")
        for key in (PROJECTION_FILES, SOURCE_FILES):
            value = node.GetAttribute(key)
            if value:
                try:
                    files = json.loads(value)
                except ValueError:
                    files = None
                if isinstance(files, list) and files:
                    return [str(f) for f in files]
        uids = node.GetAttribute("DICOM.instanceUIDs")
        database = getattr(slicer, "dicomDatabase", None)
        if uids and database is not None:
            files = [database.fileForInstance(uid) for uid in uids.split()]
            if files and all(files):
                return files
            raise DoorError(f"Some files of '{node.GetName()}' are no longer in the DICOM database; "
                            "import the study into the DICOM database again.")
        raise DoorError(f"'{node.GetName()}' was not loaded from DICOM; load it through the DICOM browser.")

    def _projection_files(self, nodes) -> list:
        files = []
        for node in nodes:
            if node is None:
                raise DoorError("No projection series was selected; choose the NM TOMO series of the study.")
            role = node.GetAttribute(ROLE)
            if role and role != "projections":
                what = "a CT series" if role == "ct" else f"a {role} volume"
                raise DoorError(f"'{node.GetName()}' is {what}, not SPECT projections; choose the NM TOMO series "
                                "(the raw projections) as input.")
            node_files = self.files_for_node(node)
            for path in node_files:
                dicom.check_projection_header(dicom.read_header(path), path)
            files += node_files
        return files

    def _ct_files(self, ct_node, projection_nodes) -> list | None:
        if ct_node is None:
            return None
        if any(ct_node is node for node in projection_nodes) or ct_node.GetAttribute(ROLE) == "projections":
            raise DoorError(f"'{ct_node.GetName()}' holds SPECT projections, not a CT; choose the CT series "
                            "for attenuation correction.")
        if ct_node.GetAttribute(ROLE) == "result":
            raise DoorError(f"'{ct_node.GetName()}' is a reconstruction, not a CT; choose the CT series for "
                            "attenuation correction.")
        files = self.files_for_node(ct_node)
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise DoorError(f"The CT file {missing[0]} no longer exists; reload the CT from the DICOM database.")
        return files

    # -- the job -------------------------------------------------------------------------------
    def build_job(self, projection_node, ct_node, method="osem", params=None, calibration_cps_per_MBq=None,
                  device="auto", windows=None, output_dir=None, collimator=None, seed=0, detector_binning=1,
                  projector="fast", isotope=None, photopeaks=None, acquisition_datetime=None, injection_datetime=None,
                  injected_activity_MBq=None, decay_correction="none", calibration=None, phantom=None,
                  overwrite=False, scatter_smoothing_cm=1.0):
        """Write a job file (sspect/jobs.py schema) into a new folder under ``work_root``.

        ``projection_node`` may be a list of nodes, one per bed. ``isotope``: one of ``ISOTOPES``
        (None: the engine detects it); ``photopeaks``: keV values as a list or "113,208" (None:
        the isotope's default). ``acquisition_datetime``, ``injection_datetime`` (ISO text) and
        ``injected_activity_MBq``: for the DICOM image when the NM file lacks them.
        ``decay_correction``: one of ``DECAY_CORRECTIONS``. ``calibration``: the name of a stored
        calibration instead of ``calibration_cps_per_MBq``. ``phantom`` ({"name", "activity_MBq",
        "activity_datetime"}) makes it a calibrate job. ``scatter_smoothing_cm``: the Gaussian sigma of
        the scatter-window estimate (0: unsmoothed), the engine's default. Returns (job dict, job path).
        """
        projection_nodes = list(projection_node) if isinstance(projection_node, (list, tuple)) else [projection_node]
        params = dict(params or {})
        registry = self.methods()
        if method not in registry:
            raise DoorError(f"The engine has no method '{method}'; choose one of {', '.join(sorted(registry))}.")
        known = [p.get("name") for p in registry[method].get("params", [])]
        unknown = sorted(set(params) - set(known))
        if unknown:
            title = registry[method].get("title", method)
            raise DoorError(f"{title} has no parameter {', '.join(repr(u) for u in unknown)}; "
                            f"its parameters are {', '.join(known) or 'none'}.")
        if calibration_cps_per_MBq is not None:
            try:
                calibration_cps_per_MBq = float(calibration_cps_per_MBq)
            except (TypeError, ValueError):
                calibration_cps_per_MBq = -1.0
            if not calibration_cps_per_MBq > 0:
                raise DoorError("The calibration factor must be a positive number of counts per second per MBq.")
        if injected_activity_MBq is not None:
            try:
                injected_activity_MBq = float(injected_activity_MBq)
            except (TypeError, ValueError):
                injected_activity_MBq = -1.0
            if not 0 < injected_activity_MBq < float("inf"):
                raise DoorError("The injected activity must be a positive number of MBq.")
        if decay_correction not in DECAY_CORRECTIONS:
            raise DoorError(f"Unknown decay correction {decay_correction!r}; choose {', '.join(DECAY_CORRECTIONS)}.")
        if calibration is not None and calibration_cps_per_MBq is not None:
            raise DoorError("Give the sensitivity as a number or as a stored calibration's name, not both.")
        if calibration is not None and not str(calibration).strip():
            calibration = None
        if phantom is not None:
            phantom = _phantom(phantom)
        if isinstance(detector_binning, bool) or detector_binning not in range(1, 9):
            raise DoorError(f"The detector binning must be a whole number from 1 to 8, not {detector_binning!r}.")
        try:
            scatter_smoothing_cm = float(scatter_smoothing_cm)
        except (TypeError, ValueError):
            scatter_smoothing_cm = -1.0
        if not 0 <= scatter_smoothing_cm <= 5:
            raise DoorError("The scatter smoothing must be a number of cm from 0 (none) to 5.")
        if projector not in PROJECTORS:
            raise DoorError(f"Unknown projector {projector!r}; choose fast or pytomography.")
        if isotope is not None and isotope not in ISOTOPES:
            raise DoorError(f"Unknown isotope {isotope!r}; choose {', '.join(ISOTOPES)} or leave it to the file.")
        photopeaks = _photopeak_list(photopeaks)
        windows = dict(windows or {})
        unknown = sorted(set(windows) - set(WINDOW_KEYS))
        if unknown:
            raise DoorError(f"Unknown energy window role {', '.join(unknown)}; the roles are peak, lower and upper.")
        nm_files = self._projection_files(projection_nodes)
        ct_files = self._ct_files(ct_node, projection_nodes)

        folder = self._new_job_folder(method)
        job = {"version": 1, "task": "calibrate" if phantom else "reconstruct", "phantom": phantom,
               "nm": nm_files, "ct": ct_files,
               "output_dir": str(Path(output_dir) if output_dir else folder),
               "method": method, "params": params,
               "windows": {key: windows.get(key) for key in WINDOW_KEYS},
               "collimator": collimator, "calibration_cps_per_MBq": calibration_cps_per_MBq, "calibration": calibration,
               "device": device, "seed": int(seed), "detector_binning": int(detector_binning),
               "projector": projector, "isotope": isotope, "photopeaks": photopeaks, "formats": ["nrrd"], "name": None,
               "overwrite": bool(overwrite),  # the result folder is new per run: this replaces a stored calibration
               "acquisition_datetime": acquisition_datetime, "injection_datetime": injection_datetime,
               "injected_activity_MBq": injected_activity_MBq, "decay_correction": decay_correction,
               "scatter_smoothing_cm": scatter_smoothing_cm}
        job_path = folder / "job.json"
        partial = folder / "job.json.partial"
        partial.write_text(json.dumps(job, indent=2))
        os.replace(partial, job_path)
        return job, job_path

    def _new_job_folder(self, method: str) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(method))
        try:
            self.work_root.mkdir(parents=True, exist_ok=True)
            for number in range(1, 1000):
                folder = self.work_root / (f"{stamp}-{safe}" + (f"-{number}" if number > 1 else ""))
                try:
                    folder.mkdir()
                    return folder
                except FileExistsError:
                    continue
        except OSError as error:
            raise DoorError(f"The work folder {self.work_root} cannot be written ({error.strerror or error}); "
                            "choose another work folder.") from None
        raise DoorError(f"No new job folder could be made in {self.work_root}; clean it up or choose another work folder.")

    def reconstruct(self, projection_node, ct_node, method="osem", wait=False, on_event=None, **params):
        """Start the engine on these nodes; returns the EngineRun (finished when ``wait``).

        Keyword arguments that are job options (``JOB_OPTIONS``: calibration_cps_per_MBq, device,
        windows, output_dir, collimator, seed, isotope, photopeaks, ...) go to the job; the rest
        are the method's parameters.
        """
        options = {key: params.pop(key) for key in JOB_OPTIONS if key in params}
        job, job_path = self.build_job(projection_node, ct_node, method, params, **options)
        run = EngineRun(job_path, self.python_executable, self._engine_environment(job["device"]))
        if wait:
            run.wait(on_event=on_event)
        return run

    def calibrate(self, projection_node, ct_node, name, activity_MBq, activity_datetime=None, method="osem",
                  replace=False, wait=False, on_event=None, **params):
        """Measure the sensitivity on a phantom of known activity and store it as ``name`` (``replace``:
        over a stored one of that name); a background engine run like ``reconstruct``, whose result
        event holds the record under 'calibration'."""
        options = {key: params.pop(key) for key in JOB_OPTIONS if key in params}
        phantom = {"name": name, "activity_MBq": activity_MBq, "activity_datetime": activity_datetime or None}
        job, job_path = self.build_job(projection_node, ct_node, method, params, phantom=phantom, overwrite=replace,
                                       **options)
        run = EngineRun(job_path, self.python_executable, self._engine_environment(job["device"]))
        if wait:
            run.wait(on_event=on_event)
        return run

    # -- results -------------------------------------------------------------------------------
    def load_result(self, run, ct_node=None, name=None):
        """The finished run's image as a volume node in its unit, fused with the CT in every slice view."""
        if run is None or getattr(run, "state", None) != DONE or not getattr(run, "result", None):
            state = getattr(run, "state", "missing")
            reason = f": {run.error}" if getattr(run, "error", None) else ""
            raise DoorError(f"The reconstruction has no result to load (it is {state}{reason.rstrip('.')}).")
        result = run.result
        nrrd = (result.get("files") or {}).get("nrrd")
        if not nrrd or not Path(nrrd).is_file():
            raise DoorError("The reconstruction wrote no NRRD image; run it again with the 'nrrd' output format.")
        node = self._read_volume_file(nrrd, "result image")
        provenance = result.get("provenance") or {}
        unit = str(result.get("unit") or provenance.get("unit") or "counts")
        method = str(provenance.get("method") or "result")
        params = provenance.get("params") or {}
        node.SetName(self._unique_name(name or result_node_name(method, params, unit)))
        self._tag_result(node, "result", run, method, params, unit)
        self._add_to_scene(node, self._display_up_to_percentile(node, 99.5), PET_HEAT, next_to=ct_node)
        uncertainty = (result.get("files") or {}).get("uncertainty")
        if uncertainty:  # the method's voxel SD: shown like any volume, referenced from the image
            sd_node = self._read_volume_file(uncertainty, "uncertainty map")
            sd_node.SetName(self._unique_name(f"{node.GetName()} SD"))
            self._tag_result(sd_node, "uncertainty", run, method, params, unit)
            self._add_to_scene(sd_node, self._display_up_to_percentile(sd_node, 99.5), GREY, next_to=ct_node)
            node.SetNodeReferenceID(UNCERTAINTY_REFERENCE, sd_node.GetID())
        self.show_fused(ct_node, node)
        return node

    @staticmethod
    def _read_volume_file(path, what: str):
        node = slicer.vtkMRMLScalarVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetSingleFile(True)
        if not Path(path).is_file() or not storage.ReadData(node) or node.GetImageData() is None:
            raise DoorError(f"The {what} {path} could not be read; the file may be damaged, run the reconstruction again.")
        return node

    @staticmethod
    def _tag_result(node, role: str, run, method: str, params: dict, unit: str) -> None:
        result = run.result
        node.SetAttribute(ROLE, role)
        node.SetAttribute(ATTRIBUTE + "Method", method)
        node.SetAttribute(ATTRIBUTE + "Params", json.dumps(params, sort_keys=True))
        node.SetAttribute(ATTRIBUTE + "Unit", unit)
        node.SetAttribute(ATTRIBUTE + "ProvenanceFile", str((result.get("files") or {}).get("provenance", "")))
        node.SetAttribute(ATTRIBUTE + "JobFile", str(getattr(run, "job_path", "")))
        set_voxel_units(node, unit)

    @staticmethod
    def _display_up_to_percentile(node, percentile: float):
        """A display node windowed from 0 to the given percentile (a few hot voxels must not wash the image out)."""
        values = slicer.util.arrayFromVolume(node)
        high = float(np.percentile(values, percentile)) if values.size else 0.0
        if not high > 0:
            high = float(values.max()) if values.size and values.max() > 0 else 1.0
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, high)
        return display

    def show_fused(self, ct_node, activity_node, opacity=0.5):
        """Every slice view: CT behind, activity in front at ``opacity``, views linked, fitted to
        the images (a view left elsewhere would show nothing) and through the hottest voxel."""
        scene = self._scene()
        composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        composites.UnRegister(None)
        count = 0
        for index in range(composites.GetNumberOfItems()):
            composite = composites.GetItemAsObject(index)
            modifying = composite.StartModify()
            if ct_node is not None:
                composite.SetBackgroundVolumeID(ct_node.GetID())
            if activity_node is not None:
                composite.SetForegroundVolumeID(activity_node.GetID())
            composite.SetForegroundOpacity(float(opacity))
            if hasattr(composite, "SetLinkedControl"):
                composite.SetLinkedControl(True)
            composite.EndModify(modifying)
            count += 1
        if self.application_logic is not None:
            self.application_logic.FitSliceToAll(False, False)  # every view, its orientation kept
        if activity_node is not None:
            values, reference, _ = self._volume_values(activity_node)
            if values.size and values.max() > 0:
                hottest_ijk = np.unravel_index(int(np.argmax(values)), values.shape)[::-1]
                ijk_to_world = vtk.vtkMatrix4x4()
                reference.GetImageToWorldMatrix(ijk_to_world)
                r, a, s = ijk_to_world.MultiplyPoint([*map(float, hottest_ijk), 1.0])[:3]
                slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.OffsetJumpSlice)
        return count

    def dosimetry_table(self, segmentation_node, volume_nodes):
        """One row per segment: volume (mL) and, per volume, mean, max and (in Bq/mL) total MBq."""
        if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise DoorError("No segmentation was selected; choose a segmentation with the organs and lesions to measure.")
        if volume_nodes is None:
            volume_nodes = []
        elif not isinstance(volume_nodes, (list, tuple)):
            volume_nodes = [volume_nodes]
        if not volume_nodes:
            raise DoorError("No reconstruction was selected; choose at least one volume to measure.")
        segmentation = segmentation_node.GetSegmentation()
        segment_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if not segment_ids:
            raise DoorError(f"The segmentation '{segmentation_node.GetName()}' has no segments; add the organs and lesions first.")
        for volume in volume_nodes:
            if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or volume.GetImageData() is None:
                raise DoorError("One of the selected volumes holds no image; choose reconstructed volumes.")
        binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        if not segmentation.ContainsRepresentation(binary):
            if not segmentation_node.CreateBinaryLabelmapRepresentation():
                raise DoorError(f"The segmentation '{segmentation_node.GetName()}' could not be turned into voxels; "
                                "check that its segments are closed surfaces or labelmaps.")

        masks_by_segment = {sid: self._segment_mask(segmentation_node, sid) for sid in segment_ids}
        names = [segmentation.GetSegment(sid).GetName() for sid in segment_ids]
        columns = [("Volume (mL)", "mL", [masks_by_segment[sid][1] for sid in segment_ids])]
        for volume in volume_nodes:
            values, reference, voxel_ml = self._volume_values(volume)
            unit = volume_unit(volume)
            means, maxima, totals = [], [], []
            for sid in segment_ids:
                mask = _resample_mask(masks_by_segment[sid][0], reference)
                inside = values[mask]
                means.append(float(inside.mean()) if inside.size else float("nan"))
                maxima.append(float(inside.max()) if inside.size else float("nan"))
                totals.append(float(inside.sum(dtype=np.float64) * voxel_ml / 1e6) if inside.size else 0.0)
            label = volume.GetName()
            columns.append((f"{label} mean", unit, means))
            columns.append((f"{label} max", unit, maxima))
            if unit == "Bq/mL":
                columns.append((f"{label} MBq", "MBq", totals))

        table = slicer.vtkMRMLTableNode()
        table.SetName(self._unique_name(f"{segmentation_node.GetName()} dosimetry"))
        segment_column = vtk.vtkStringArray()
        segment_column.SetName("Segment")
        for segment_name in names:
            segment_column.InsertNextValue(segment_name)
        table.AddColumn(segment_column)
        for column_name, unit, numbers in columns:
            array = vtk.vtkDoubleArray()
            array.SetName(column_name)
            for number in numbers:
                array.InsertNextValue(number)
            table.AddColumn(array)
            if unit:
                table.SetColumnUnitLabel(column_name, unit)
        table.SetAttribute(ATTRIBUTE + "Role", "dosimetry")
        scene = self._scene()
        scene.AddNode(table)
        return table

    def _segment_mask(self, segmentation_node, segment_id):
        """(oriented binary labelmap in world coordinates, segment volume in mL)."""
        image = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)  # this segment only, 0/1
        if segmentation_node.GetParentTransformNode() is not None:
            slicer.vtkSlicerSegmentationsModuleLogic.ApplyParentTransformToOrientedImageData(segmentation_node, image)
        scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
        if scalars is None or image.GetNumberOfPoints() == 0:
            return image, 0.0
        count = int(np.count_nonzero(numpy_support.vtk_to_numpy(scalars)))
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        voxel_ml = abs(np.linalg.det(slicer.util.arrayFromVTKMatrix(matrix)[:3, :3])) / 1000.0
        return image, count * voxel_ml

    def _volume_values(self, volume):
        """(voxel values [k, j, i], reference geometry in world coordinates, voxel volume in mL)."""
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijk_to_ras)
        transform = volume.GetParentTransformNode()
        if transform is not None:
            if not transform.IsTransformToWorldLinear():
                raise DoorError(f"'{volume.GetName()}' is under a non-linear transform; harden the transform before measuring.")
            to_world = vtk.vtkMatrix4x4()
            slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(transform, None, to_world)
            vtk.vtkMatrix4x4.Multiply4x4(to_world, ijk_to_ras, ijk_to_ras)
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(volume.GetImageData().GetExtent())
        reference.SetImageToWorldMatrix(ijk_to_ras)
        values = np.array(slicer.util.arrayFromVolume(volume), dtype=np.float64)
        voxel_ml = abs(np.linalg.det(slicer.util.arrayFromVTKMatrix(ijk_to_ras)[:3, :3])) / 1000.0
        return values, reference, voxel_ml

    # -- scene helpers -------------------------------------------------------------------------
    @staticmethod
    def _scene():
        scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("slicer.mrmlScene is not set; run inside 3D Slicer, or install a scene first "
                               "(headless: Testing/Python/slicer_app_shim.install()).")
        return scene

    def _unique_name(self, name: str) -> str:
        scene = self._scene()
        return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) else name

    @staticmethod
    def _volume_node(loaded, name):
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName(name)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(loaded.array))
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(loaded.ijk_to_ras))
        if loaded.info.instance_uids:
            node.SetAttribute("DICOM.instanceUIDs", " ".join(loaded.info.instance_uids))
        return node

    def _add_to_scene(self, node, display, color_id, info=None, next_to=None):
        """Add a data node and its display node together; on any failure remove both again."""
        scene = self._scene()
        added = []
        try:
            if color_id:
                ensure_color_node(scene, color_id)
            added.append(scene.AddNode(display))
            if color_id and scene.GetNodeByID(color_id) is not None:
                display.SetAndObserveColorNodeID(color_id)
            added.append(scene.AddNode(node))
            node.SetAndObserveDisplayNodeID(display.GetID())
            self._place_in_hierarchy(node, info=info, next_to=next_to)
        except Exception:
            for added_node in reversed(added):
                if added_node is not None and scene.IsNodePresent(added_node):
                    scene.RemoveNode(added_node)
            raise
        return node

    def _place_in_hierarchy(self, node, info=None, next_to=None):
        """Put the node under the patient and study of its DICOM series, or beside ``next_to``.

        In the app, subject hierarchy items appear by themselves when a node is added (Qt plugin
        logic); headless they do not, so missing items are created here.
        """
        scene = self._scene()
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if hierarchy is None:
            return
        invalid = hierarchy.GetInvalidItemID()
        scene_item = hierarchy.GetSceneItemID()
        parent = scene_item
        if next_to is not None:
            neighbour = hierarchy.GetItemByDataNode(next_to)
            if neighbour == invalid:
                neighbour = hierarchy.CreateItem(scene_item, next_to)
            parent = hierarchy.GetItemParent(neighbour)
        elif info is not None and (info.patient_id or info.study_uid):
            parent = _study_item(hierarchy, info)
        item = hierarchy.GetItemByDataNode(node)
        if item == invalid:
            hierarchy.CreateItem(parent, node)
        elif hierarchy.GetItemParent(item) != parent:
            hierarchy.SetItemParent(item, parent)


def _study_item(hierarchy, info):
    """The patient and study items of a DICOM series: found by DICOM UID, or made carrying the
    patient and study attributes Slicer's own DICOM loading gives them (DICOMLib's
    DICOMPlugin.addSeriesInSubjectHierarchy fills in only the items it makes itself, and Slicer's
    DICOM export takes the patient and study tags from these attributes)."""
    constants = slicer.vtkMRMLSubjectHierarchyConstants
    uid_name = constants.GetDICOMUIDName()
    invalid = hierarchy.GetInvalidItemID()
    naming = _item_name_settings()
    # A de-identified file may have an empty Patient ID; Slicer then uses "Patient-<Study Instance UID>".
    patient_id = info.patient_id or f"Patient-{info.study_uid}"
    patient = hierarchy.GetItemByUID(uid_name, patient_id)
    if patient == invalid:
        patient_name = info.patient_name or "No name"
        item_name = patient_name
        if naming["patient_id"]:
            item_name += f" ({patient_id})"
        if naming["patient_birth_date"] and info.patient_birth_date:
            item_name += f" ({info.patient_birth_date})"
        patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), item_name)
        hierarchy.SetItemUID(patient, uid_name, patient_id)
        hierarchy.SetItemOwnerPluginName(patient, "DICOM")
        for attribute, value in ((constants.GetDICOMPatientNameAttributeName(), patient_name),
                                 (constants.GetDICOMPatientIDAttributeName(), patient_id),
                                 (constants.GetDICOMPatientSexAttributeName(), info.patient_sex),
                                 (constants.GetDICOMPatientBirthDateAttributeName(), info.patient_birth_date),
                                 (constants.GetDICOMPatientCommentsAttributeName(), info.patient_comments)):
            hierarchy.SetItemAttribute(patient, attribute, value)
    if not info.study_uid:
        return patient
    study = hierarchy.GetItemByUID(uid_name, info.study_uid)
    if study == invalid:
        description = info.study_description or "No study description"
        item_name = description
        if naming["study_id"]:
            item_name += f" ({info.study_id})"
        if naming["study_date"] and info.study_date:
            item_name += f" ({info.study_date})"
        study = hierarchy.CreateStudyItem(patient, item_name)
        hierarchy.SetItemUID(study, uid_name, info.study_uid)
        hierarchy.SetItemOwnerPluginName(study, "DICOM")
        for attribute, value in ((constants.GetDICOMStudyInstanceUIDAttributeName(), info.study_uid),
                                 (constants.GetDICOMStudyIDAttributeName(), info.study_id),
                                 (constants.GetDICOMStudyDescriptionAttributeName(), description),
                                 (constants.GetDICOMStudyDateAttributeName(), info.study_date),
                                 (constants.GetDICOMStudyTimeAttributeName(), info.study_time)):
            hierarchy.SetItemAttribute(study, attribute, value)
    return study


def _item_name_settings() -> dict:
    """Which tags go into patient and study item names: the user's Subject Hierarchy settings in
    the app, else Slicer's defaults (patient ID and study date shown, birth date and study ID not)."""
    handler_class = getattr(slicer, "qSlicerSubjectHierarchyPluginHandler", None)
    if handler_class is None:
        return {"patient_id": True, "patient_birth_date": False, "study_id": False, "study_date": True}
    handler = handler_class.instance()
    return {"patient_id": bool(handler.displayPatientIDInSubjectHierarchyItemName),
            "patient_birth_date": bool(handler.displayPatientBirthDateInSubjectHierarchyItemName),
            "study_id": bool(handler.displayStudyIDInSubjectHierarchyItemName),
            "study_date": bool(handler.displayStudyDateInSubjectHierarchyItemName)}


def ensure_color_node(scene, color_node_id: str) -> None:
    """Make the default colour nodes exist. In the app they always do; headless, a colour logic
    must create them, and it must stay alive, or it takes its nodes with it."""
    if scene.GetNodeByID(color_node_id) is not None:
        return
    key = scene.GetAddressAsString("vtkMRMLScene")
    if key in _HEADLESS_LOGICS:  # the scene was cleared since (a test's setUp): add the defaults again
        _HEADLESS_LOGICS[key][1].AddDefaultColorNodes()
        return
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLApplicationLogic(application)
    colors.SetMRMLScene(scene)
    application.SetColorLogic(colors)
    application.SetModuleLogic("Colors", colors)
    _HEADLESS_LOGICS[key] = (application, colors)


def release_headless_logics() -> None:
    """Headless teardown: drop the colour logics made by ensure_color_node (they remove their nodes)."""
    while _HEADLESS_LOGICS:
        _, (application, colors) = _HEADLESS_LOGICS.popitem()
        colors.SetMRMLScene(None)
        application.SetMRMLScene(None)


def _phantom(phantom) -> dict:
    """A calibrate job's phantom, checked as far as the panel's fields go (the engine checks the rest)."""
    name = str(phantom.get("name") or "").strip()
    if not name:
        raise DoorError("Give the calibration a name, such as 'GE670 MEGP 177Lu', to store it under.")
    try:
        activity = float(phantom.get("activity_MBq"))
    except (TypeError, ValueError):
        activity = -1.0
    if not 0 < activity < float("inf"):
        raise DoorError("The phantom's activity must be a positive number of MBq.")
    return {"name": name, "activity_MBq": activity, "activity_datetime": phantom.get("activity_datetime") or None}


def result_node_name(method: str, params: dict, unit: str) -> str:
    """e.g. 'OSEM 4it 6ss [Bq/mL]'; the full parameters are in the node's Params attribute."""
    parts = [str(method).upper()]
    parts += [f"{value}{SHORT_PARAMS[key]}" for key, value in params.items() if key in SHORT_PARAMS]
    return " ".join(parts) + f" [{unit}]"


def set_voxel_units(node, unit: str) -> None:
    """The unit as a coded entry on the volume (Slicer 5.x), when this Slicer has voxel units."""
    codes = UNITS.get(unit)
    if codes is None or not hasattr(node, "SetVoxelValueUnits") or not hasattr(slicer, "vtkCodedEntry"):
        return
    (unit_code, quantity_code) = codes
    units = slicer.vtkCodedEntry()
    units.SetValueSchemeMeaning(*unit_code)
    node.SetVoxelValueUnits(units)
    if hasattr(node, "SetVoxelValueQuantity"):
        quantity = slicer.vtkCodedEntry()
        quantity.SetValueSchemeMeaning(*quantity_code)
        node.SetVoxelValueQuantity(quantity)


def volume_unit(node) -> str:
    """A volume's unit: ours, else its voxel-value units code, else an empty string."""
    unit = node.GetAttribute(ATTRIBUTE + "Unit")
    if unit:
        return unit
    units = node.GetVoxelValueUnits() if hasattr(node, "GetVoxelValueUnits") else None
    if units is not None and units.GetCodeValue():
        code = units.GetCodeValue()
        return "Bq/mL" if code.lower() == "bq/ml" else code
    return ""


def _resample_mask(image, reference) -> np.ndarray:
    """A segment's binary labelmap on a volume's voxels (nearest neighbour), as a boolean [k, j, i] array."""
    extent = reference.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    mask = np.zeros(shape, bool)
    if image.GetPointData() is None or image.GetPointData().GetScalars() is None or image.GetNumberOfPoints() == 0:
        return mask
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False, False):
        return mask
    scalars = resampled.GetPointData().GetScalars() if resampled.GetPointData() else None
    if scalars is None or resampled.GetNumberOfPoints() == 0:
        return mask
    got = resampled.GetExtent()
    values = numpy_support.vtk_to_numpy(scalars).reshape(
        got[5] - got[4] + 1, got[3] - got[2] + 1, got[1] - got[0] + 1) != 0
    # paste the overlap of the resampled extent into the reference extent
    lo = [max(got[2 * a], extent[2 * a]) for a in range(3)]
    hi = [min(got[2 * a + 1], extent[2 * a + 1]) for a in range(3)]
    if any(l > h for l, h in zip(lo, hi)):
        return mask
    target = tuple(slice(lo[a] - extent[2 * a], hi[a] - extent[2 * a] + 1) for a in (2, 1, 0))
    source = tuple(slice(lo[a] - got[2 * a], hi[a] - got[2 * a] + 1) for a in (2, 1, 0))
    mask[target] = values[source]
    return mask


def _photopeak_list(photopeaks):
    """keV values from "113,208" or a list; None stays None (the isotope's default)."""
    if photopeaks is None:
        return None
    values = photopeaks.split(",") if isinstance(photopeaks, str) else list(photopeaks)
    try:
        keV = [float(v) for v in values if str(v).strip()]
    except (TypeError, ValueError):
        keV = []
    if not keV or any(v <= 0 for v in keV):
        raise DoorError(f"The photopeaks {photopeaks!r} must be keV values such as 208 or 113,208.")
    return keV
