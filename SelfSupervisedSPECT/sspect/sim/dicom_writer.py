"""Scanner-like DICOM for simulated studies: one NM tomo file and a CT series.

The NM file is written for PyTomography's reader (``parse_projection_dataset`` and
``_get_affine_spect_projections``), which is the inverse this module must satisfy:

* Projections come in PyTomography's layout [Ltheta, Lr, Lz] with ascending detector angles.
  A DICOM angle is (detector angle + 180) mod 360. Frames are stored in acquisition order
  (window, then head, then view), not sorted: CC views run start + step*k, CW views
  start - step*k. A frame's rows run from the top (highest z) down and its columns are Lr.
* The reconstruction grid: voxel (i, j, k) sits at LPS (Sx + i*dx, Sy + j*dx,
  Sz - (Rows-1)*dz + k*dz) with S = DetectorInformationSequence[0].ImagePositionPatient,
  except when Sy == 0, where the reader centres x and y on the grid (using Rows for both)
  and moves y by -TableHeight. GE files use the direct form, Siemens files the Sy == 0 form.

No library writes NM multi-frame tomo files (highdicom has no NM IOD; PyTomography writes
only reconstructions), hence this module.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, NuclearMedicineImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from sspect.errors import SSPECTError
from sspect.physics.collimators import Collimator, default_collimator
from sspect.physics.isotopes import LUTETIUM_177, EnergyRange, Isotope
from sspect.volume import Volume

from .acquisition import simulate_projections
from .phantoms.demo import demo_phantom

DEFAULT_ACQUISITION_DATETIME = datetime(2024, 5, 14, 10, 30, 0)


@dataclass(frozen=True)
class ScannerLayout:
    """How one vendor lays out a tomo acquisition in DICOM."""

    vendor: str  # as the collimator registry names it
    manufacturer: str
    model: str
    n_heads: int


LAYOUTS = {
    "GE": ScannerLayout("GE", "GE MEDICAL SYSTEMS", "Tandem_Discovery_670_Pro", 1),
    "Siemens": ScannerLayout("SIEMENS", "SIEMENS NM", "Symbia Intevo Bold", 2),
}


def _ds(value: float) -> str:
    """A DS string with as many digits as the 16-character limit allows."""
    return format_number_as_ds(float(value))


def _common_dataset(sop_class_uid: str, modality: str, study_uid: str, series_uid: str,
                    frame_of_reference_uid: str, when: datetime, patient_name: str, patient_id: str,
                    manufacturer: str, model: str, series_description: str, series_number: int) -> Dataset:
    """Patient, study, series and equipment tags that NM and CT share."""
    ds = Dataset()
    sop_instance_uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.StudyDescription = "SSPECT simulated SPECT/CT"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _acquisition_order(n_views: int, n_heads: int, rotation: str, full_circle: bool) -> np.ndarray:
    """Sorted-view index of each (head, view) in acquisition order, shape [n_heads, views per head].

    Head 0 starts at the lowest detector angle whenever it can (always for CC, for CW on a full
    circle): the reader computes every other angle as start +- step*k, and only a start angle
    comes back exact, so the view at 0 degrees never returns as 359.999... and sorts last.
    CW on a partial arc starts from the top of the arc. Heads cover contiguous arcs.
    """
    m = n_views // n_heads
    heads, views = np.meshgrid(np.arange(n_heads), np.arange(m), indexing="ij")
    if rotation == "CC":
        return heads * m + views
    if full_circle:
        return (heads * m - views) % n_views
    return (n_heads - heads) * m - 1 - views


def write_nm_tomo(path, projections_by_window: Sequence[np.ndarray], windows: Sequence[EnergyRange],
                  angles_deg, radii_cm, pixel_mm: float, object_origin_lps_mm, *, layout: str = "GE",
                  rotation: str = "CC", frame_duration_s: float = 20.0, study_uid: str | None = None,
                  frame_of_reference_uid: str | None = None, series_uid: str | None = None,
                  patient_name: str = "SSPECT^Phantom", patient_id: str = "SSPECT-SIM",
                  acquisition_datetime: datetime = DEFAULT_ACQUISITION_DATETIME,
                  injected_activity_mbq: float = 7400.0, injection_datetime: datetime | None = None,
                  isotope: Isotope = LUTETIUM_177, collimator: Collimator | None = None,
                  radiopharmaceutical: str | None = None) -> Path:
    """Write one multi-frame NM tomo file (NM Image Storage) that PyTomography reads back exactly.

    ``projections_by_window``: one [Ltheta, Lr, Lz] count array per window, views sorted by
    ascending PyTomography detector angle (``angles_deg``, uniform step), ``radii_cm`` per view.
    Counts are rounded to uint16. ``isotope`` gives the radionuclide code and half-life; ``collimator``
    (default: the layout's collimator for the isotope) its CollimatorGridName. ``object_origin_lps_mm``: LPS of reconstruction voxel
    (0, 0, 0); the reconstruction grid is [Lr, Lr, Lz] voxels of ``pixel_mm``.
    """
    if layout not in LAYOUTS:
        raise SSPECTError(f"Unknown NM layout '{layout}'; choose one of {', '.join(LAYOUTS)}.")
    if rotation not in ("CC", "CW"):
        raise SSPECTError(f"Unknown rotation direction '{rotation}'; choose CC or CW.")
    scanner = LAYOUTS[layout]
    collimator = collimator or default_collimator(scanner.vendor, isotope)
    if len(projections_by_window) != len(windows) or not windows:
        raise SSPECTError(f"Got {len(projections_by_window)} projection arrays for {len(windows)} energy windows; give one per window.")
    projections = np.stack([np.asarray(p, dtype=np.float64) for p in projections_by_window])
    if projections.ndim != 4:
        raise SSPECTError(f"Each window's projections must be [Ltheta, Lr, Lz]; got {projections.shape[1:]}.")
    n_windows, n_views, n_r, n_z = projections.shape
    angles = np.asarray(angles_deg, dtype=np.float64)
    radii_mm = np.asarray(radii_cm, dtype=np.float64) * 10.0
    if angles.shape != (n_views,) or radii_mm.shape != (n_views,):
        raise SSPECTError(f"Need one angle and one radius per view ({n_views}); got {angles.size} and {radii_mm.size}.")
    if n_views % scanner.n_heads:
        raise SSPECTError(f"A {layout} acquisition with {scanner.n_heads} heads needs a view count divisible by {scanner.n_heads}; got {n_views}.")
    step = (angles[-1] - angles[0]) / (n_views - 1) if n_views > 1 else 0.0
    if n_views > 1 and (step <= 0 or not np.allclose(np.diff(angles), step, atol=1e-6)):
        raise SSPECTError("The detector angles must be ascending with one uniform step (PyTomography order); sort the views first.")
    if np.any(angles < 0) or np.any(angles >= 360):
        raise SSPECTError("The detector angles must lie in [0, 360) degrees (PyTomography convention).")
    full_circle = n_views > 1 and abs(step * n_views - 360.0) < 1e-6
    counts = np.rint(projections)
    if counts.min() < 0 or counts.max() > np.iinfo(np.uint16).max:
        raise SSPECTError(f"Counts must lie within 0-65535 to be stored as uint16; got {counts.min():g} to {counts.max():g}. Lower the count level.")

    order = _acquisition_order(n_views, scanner.n_heads, rotation, full_circle)  # [heads, m]
    views_per_head = order.shape[1]
    dicom_start_angles = (angles[order[:, 0]] + 180.0) % 360.0
    # The reader recomputes angles as start +- step*k from the DS strings and sorts them; a view
    # at 0 degrees that comes back as 359.999... would sort last, so check the order survives.
    sign = 1.0 if rotation == "CC" else -1.0
    read_back = (np.array([float(_ds(a)) for a in dicom_start_angles])[:, None]
                 + sign * float(_ds(step)) * np.arange(views_per_head) + 180.0) % 360.0
    if not np.array_equal(order.ravel()[np.argsort(read_back.ravel())], np.arange(n_views)):
        raise SSPECTError("These angles cannot be stored so that readers sort the views back in the same "
                          "order (round-off at 0 degrees); shift all angles by a small offset.")
    # Frame [row, column] = projection[r = column, z = Rows-1-row]: rows run top (superior) down.
    frames = counts[:, order.ravel()].transpose(0, 1, 3, 2)[:, :, ::-1, :]
    frames = frames.reshape(-1, n_z, n_r).astype(np.uint16)

    ds = _common_dataset(NuclearMedicineImageStorage, "NM", study_uid or generate_uid(), series_uid or generate_uid(),
                         frame_of_reference_uid or generate_uid(), acquisition_datetime, patient_name, patient_id,
                         scanner.manufacturer, scanner.model, f"SPECT {isotope.name} tomo (simulated)", 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    ds.ImageID = "Tomo (simulated)"
    ds.NumberOfFrames = frames.shape[0]
    ds.FrameIncrementPointer = [0x00540010, 0x00540020, 0x00540050, 0x00540090]
    ds.Rows, ds.Columns = n_z, n_r
    ds.PixelSpacing = [_ds(pixel_mm), _ds(pixel_mm)]
    ds.PixelRepresentation = 0
    ds.PixelData = frames.tobytes()
    ds.CountsAccumulated = int(counts.sum())
    ds.AcquisitionTerminationCondition = "TIME"
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"

    frames_per_window = scanner.n_heads * views_per_head
    ds.EnergyWindowVector = np.repeat(np.arange(1, n_windows + 1), frames_per_window).tolist()
    ds.DetectorVector = np.tile(np.repeat(np.arange(1, scanner.n_heads + 1), views_per_head), n_windows).tolist()
    ds.RotationVector = [1] * frames.shape[0]
    ds.AngularViewVector = np.tile(np.arange(1, views_per_head + 1), n_windows * scanner.n_heads).tolist()
    ds.NumberOfEnergyWindows = n_windows
    ds.EnergyWindowInformationSequence = [_energy_window_item(window) for window in windows]

    origin = np.asarray(object_origin_lps_mm, dtype=np.float64)
    centring = (n_z - 1) / 2 * pixel_mm  # the reader centres x and y with Rows, whatever Columns is
    table_height_mm = -origin[1] - centring  # rotation axis at y = -TableHeight in the Sy == 0 form
    top_z = origin[2] + (n_z - 1) * pixel_mm
    if layout == "GE" and origin[1] != 0:
        image_position = [origin[0], origin[1], top_z]
    else:  # Siemens form; also the only way to express y == 0, which the reader takes as this form
        image_position = [origin[0] + centring, 0.0, top_z]

    ds.NumberOfDetectors = scanner.n_heads
    detectors = []
    for head in range(scanner.n_heads):
        item = Dataset()
        item.GantryDetectorTilt = "0"
        item.CenterOfRotationOffset = "0"
        item.CollimatorGridName = next(label for vendor, label in collimator.scanner_labels if vendor == scanner.vendor)
        item.CollimatorType = "PARA"
        item.ImagePositionPatient = [_ds(v) for v in image_position]
        item.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        if scanner.n_heads > 1:  # multi-head files carry each head's start angle and orbit
            item.StartAngle = _ds(dicom_start_angles[head])
            item.RadialPosition = [_ds(r) for r in radii_mm[order[head]]]
        detectors.append(item)
    ds.DetectorInformationSequence = detectors

    rotation_item = Dataset()
    rotation_item.TableHeight = _ds(table_height_mm)
    rotation_item.TableTraverse = "0"
    rotation_item.RotationDirection = rotation
    rotation_item.ScanArc = _ds(step * views_per_head)
    rotation_item.AngularStep = _ds(step)
    rotation_item.ActualFrameDuration = int(round(frame_duration_s * 1000))
    rotation_item.NumberOfFramesInRotation = views_per_head
    rotation_item.StartAngle = _ds(dicom_start_angles[0])
    if scanner.n_heads == 1:
        head_radii = radii_mm[order[0]]
        rotation_item.RadialPosition = (_ds(head_radii[0]) if np.all(head_radii == head_radii[0])
                                        else [_ds(r) for r in head_radii])
    ds.NumberOfRotations = 1
    ds.RotationInformationSequence = [rotation_item]

    injected_at = injection_datetime or (acquisition_datetime - timedelta(hours=24))
    drug = Dataset()
    drug.Radiopharmaceutical = radiopharmaceutical or f"{isotope.name} (simulated)"
    drug.RadiopharmaceuticalStartTime = injected_at.strftime("%H%M%S")
    drug.RadiopharmaceuticalStartDateTime = injected_at.strftime("%Y%m%d%H%M%S")
    drug.RadionuclideTotalDose = _ds(injected_activity_mbq)  # NM modules state this in MBq
    drug.RadionuclideHalfLife = _ds(isotope.half_life_s)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = isotope.code_value, isotope.coding_scheme, isotope.code_meaning
    drug.RadionuclideCodeSequence = [code]
    ds.RadiopharmaceuticalInformationSequence = [drug]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _energy_window_item(window: EnergyRange) -> Dataset:
    limits = Dataset()
    limits.EnergyWindowLowerLimit = _ds(window.lower_keV)
    limits.EnergyWindowUpperLimit = _ds(window.upper_keV)
    item = Dataset()
    item.EnergyWindowRangeSequence = [limits]
    item.EnergyWindowName = window.name
    return item


def write_ct_series(folder, hu_volume: Volume, study_uid: str, frame_of_reference_uid: str, *,
                    series_uid: str | None = None, patient_name: str = "SSPECT^Phantom",
                    patient_id: str = "SSPECT-SIM", acquisition_datetime: datetime = DEFAULT_ACQUISITION_DATETIME,
                    model: str = "Optima CT540", shuffle_seed: int = 0) -> list[Path]:
    """Write an axial CT series, one CT Image Storage file per slice, HU as int16 + 1024.

    HU are rounded and clipped to [-1024, 3071]. File names are shuffled against slice
    position on purpose: readers must sort by ImagePositionPatient. Returns the files in
    slice order (inferior first).
    """
    if not np.allclose(np.asarray(hu_volume.direction), np.eye(3)):
        raise SSPECTError("The CT writer takes axial volumes only (identity direction); resample the volume first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.clip(np.rint(np.asarray(hu_volume.array, dtype=np.float64)), -1024, 3071)
    n_x, n_y, n_z = hu.shape
    dx, dy, dz = (float(s) for s in hu_volume.spacing)
    series_uid = series_uid or generate_uid()
    file_numbers = np.random.default_rng(shuffle_seed).permutation(n_z)
    paths = []
    for k in range(n_z):
        ds = _common_dataset(CTImageStorage, "CT", study_uid, series_uid, frame_of_reference_uid,
                             acquisition_datetime, patient_name, patient_id, "GE MEDICAL SYSTEMS", model,
                             "CT for attenuation (simulated)", 2)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n_z - k  # scanners number from the head down
        ds.KVP = "120"
        ds.SliceThickness = _ds(dz)
        position = hu_volume.index_to_lps((0, 0, k))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(position[2])
        ds.Rows, ds.Columns = n_y, n_x
        ds.PixelSpacing = [_ds(dy), _ds(dx)]  # row spacing (along y), column spacing (along x)
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = (hu[:, :, k].T + 1024).astype(np.int16).tobytes()
        path = folder / f"CT{file_numbers[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def hu_to_mu(hu: np.ndarray, photopeak_keV: float, model: str = "Optima CT540") -> np.ndarray:
    """mu (1/cm) at the photopeak from PyTomography's HU -> mu table for the CT this module writes.

    PyTomography looks the table entry up from a CT file's model and kVp, so one tiny slice of
    such a CT is written to a temporary folder for it to read.
    """
    import tempfile

    from pytomography.io.SPECT.dicom import get_HU2mu_conversion

    with tempfile.TemporaryDirectory() as folder:
        probe = write_ct_series(folder, Volume(np.zeros((2, 2, 1), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
                                generate_uid(), generate_uid(), model=model)
        with contextlib.redirect_stdout(io.StringIO()):
            conversion = get_HU2mu_conversion([str(probe[0])], photopeak_keV)
    return conversion(np.asarray(hu, np.float32)).astype(np.float32)


def write_demo_study(folder, seed: int = 0, layout: str = "GE", rotation: str = "CC", n_views: int = 32,
                     noise: bool = True, upsample: int = 1, shape=(48, 48, 48), voxel_mm: float = 8.0,
                     sensitivity_cps_per_mbq: float = 9.0, frame_duration_s: float = 20.0,
                     radius_mm: float = 250.0, isotope: Isotope = LUTETIUM_177, photopeaks_keV=None,
                     collimator: Collimator | None = None) -> dict:
    """Simulate the demo phantom and write it as a scanner would: NM tomo file + CT series.

    ``isotope``, its ``photopeaks_keV`` (default: its default ones) and ``collimator`` (default:
    the layout's collimator for the isotope) set the windows, the energies, the collimator and
    the radionuclide in the file.
    Returns the paths, the truth (activity concentration in MBq/mL as a Volume), the phantom,
    the attenuation map used, the simulated windows and the 0-based window indices in the file.
    The GE layout orders each photopeak's windows peak, upper, lower (as the real GE study does);
    Siemens orders them peak, lower, upper; photopeaks follow one another, the main one first.
    """
    if layout not in LAYOUTS:
        raise SSPECTError(f"Unknown NM layout '{layout}'; choose one of {', '.join(LAYOUTS)}.")
    folder = Path(folder)
    phantom = demo_phantom(shape, voxel_mm, seed)
    study_uid, frame_of_reference_uid = generate_uid(), generate_uid()
    ct_files = write_ct_series(folder / "CT", phantom.hu_volume, study_uid, frame_of_reference_uid, shuffle_seed=seed)
    mu_maps = {}

    def mu_at(energy_keV):
        return mu_maps.setdefault(energy_keV, hu_to_mu(phantom.hu, energy_keV))

    scanner = LAYOUTS[layout]
    collimator = collimator or default_collimator(scanner.vendor, isotope)
    counts_scale = sensitivity_cps_per_mbq * frame_duration_s * phantom.voxel_volume_ml
    simulated = simulate_projections(phantom.activity, mu_at, phantom.spacing, n_views, radius_mm, collimator, isotope,
                                     photopeaks_keV, counts_scale, seed, upsample, noise)
    roles = ["peak", "upper", "lower"] if layout == "GE" else ["peak", "lower", "upper"]
    windows, counts = simulated.windows_in_order(roles)
    nm_path = write_nm_tomo(folder / "NM" / "projections.dcm", counts, windows, simulated.angles_deg, simulated.radii_cm,
                            voxel_mm, phantom.origin, layout=layout, rotation=rotation,
                            frame_duration_s=frame_duration_s, study_uid=study_uid,
                            frame_of_reference_uid=frame_of_reference_uid, isotope=isotope, collimator=collimator)
    return {
        "nm": nm_path,
        "ct": folder / "CT",
        "ct_files": ct_files,
        "truth": phantom.activity_volume,
        "phantom": phantom,
        "mu_map": mu_at(simulated.peaks[0].photopeak.energy_keV),  # at the main photopeak
        "projections": simulated,
        "index_peak": roles.index("peak"),
        "index_lower": roles.index("lower"),
        "index_upper": roles.index("upper"),
        "collimator": collimator.code,
        "sensitivity_cps_per_mbq": sensitivity_cps_per_mbq,
        "frame_duration_s": frame_duration_s,
        "study_uid": study_uid,
        "frame_of_reference_uid": frame_of_reference_uid,
    }
