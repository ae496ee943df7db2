"""Reading DICOM for display and for the job file, with pydicom and numpy only.

The engine reads the same files again for reconstruction; what is read here is for showing
the data in Slicer (projection views, CT) and for refusing the wrong file early, in one
sentence, before any node is added to the scene.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DoorError

# Main photopeak (keV) by RadionuclideCodeSequence code value (SNOMED CT): the engine's isotope
# registry (sspect/physics/isotopes.py) has the same, which a static test checks.
MAIN_PHOTOPEAK_KEV = {"447553000": 208.0, "72454006": 140.5, "56609000": 171.3, "1368003": 364.5}
NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SeriesInfo:
    """What the subject hierarchy needs to put a series under its patient and study, and the
    patient and study tags Slicer's DICOM export reads back from those items."""

    patient_id: str = ""
    patient_name: str = ""
    patient_sex: str = ""
    patient_birth_date: str = ""
    patient_comments: str = ""
    study_uid: str = ""
    study_id: str = ""
    study_description: str = ""
    study_date: str = ""
    study_time: str = ""
    series_description: str = ""
    instance_uids: list = field(default_factory=list)


@dataclass
class LoadedVolume:
    array: np.ndarray  # [k, j, i], the order slicer.util array helpers use
    ijk_to_ras: np.ndarray  # 4x4
    files: list
    info: SeriesInfo
    extra: dict = field(default_factory=dict)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DoorError("Reading DICOM needs the pydicom package, which this Python lacks; "
                        "install it with slicer.util.pip_install('pydicom').") from None
    return pydicom


def read_header(path, pixels: bool = False):
    pydicom = _pydicom()
    path = Path(path)
    if not path.is_file():
        raise DoorError(f"The file {path} does not exist; reload the study from the DICOM database.")
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except Exception as error:  # pydicom raises many kinds for a bad file
        raise DoorError(f"{path.name} could not be read as DICOM ({type(error).__name__}); choose a DICOM file.") from None


def _text(value) -> str:
    return str(value) if value is not None else ""


def series_info(ds, instance_uids=()) -> SeriesInfo:
    return SeriesInfo(patient_id=_text(ds.get("PatientID")), patient_name=_text(ds.get("PatientName")),
                      patient_sex=_text(ds.get("PatientSex")), patient_birth_date=_text(ds.get("PatientBirthDate")),
                      patient_comments=_text(ds.get("PatientComments")),
                      study_uid=_text(ds.get("StudyInstanceUID")), study_id=_text(ds.get("StudyID")),
                      study_description=_text(ds.get("StudyDescription")), study_date=_text(ds.get("StudyDate")),
                      study_time=_text(ds.get("StudyTime")),
                      series_description=_text(ds.get("SeriesDescription")), instance_uids=list(instance_uids))


def image_type(ds) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip().upper() for part in value.split("\\")]
    return [str(part).strip().upper() for part in value]


def check_projection_header(ds, path) -> None:
    """Refuse anything that is not NM TOMO projection data, naming what it is instead."""
    name = Path(path).name
    modality = _text(ds.get("Modality")).upper()
    kinds = image_type(ds)
    if modality != "NM" and _text(ds.get("SOPClassUID")) != NM_IMAGE_STORAGE:
        what = f"a {modality} image" if modality else "not a nuclear medicine image"
        raise DoorError(f"{name} is {what}, not SPECT projections; choose the NM TOMO series (the raw projections) of the study.")
    if "RECON" in kinds:
        raise DoorError(f"{name} is a reconstructed SPECT image (ImageType {'/'.join(kinds)}), not projections; "
                        "choose the NM TOMO series with the raw projections.")
    if "TOMO" not in kinds:
        kind = "/".join(kinds) or "missing"
        raise DoorError(f"{name} is not a SPECT tomo acquisition (ImageType {kind}); choose the NM TOMO series "
                        "with the raw projections, not a planar or whole-body image.")


def _energy_windows(ds) -> list[tuple[float, float, str]]:
    windows = []
    for item in ds.get("EnergyWindowInformationSequence") or []:
        ranges = item.get("EnergyWindowRangeSequence") or []
        if ranges:
            lower = float(ranges[0].get("EnergyWindowLowerLimit", 0) or 0)
            upper = float(ranges[0].get("EnergyWindowUpperLimit", 0) or 0)
        else:
            lower = upper = 0.0
        windows.append((lower, upper, _text(item.get("EnergyWindowName"))))
    return windows


def photopeak_index(windows, radionuclide_code: str = "") -> int:
    """0-based index of the window centred (within 1 %, as photopeak windows are) on the
    radionuclide's main photopeak, or on any known main photopeak when the file names none (the
    narrowest if several are); else the first."""
    energies = [MAIN_PHOTOPEAK_KEV[radionuclide_code]] if radionuclide_code in MAIN_PHOTOPEAK_KEV else MAIN_PHOTOPEAK_KEV.values()
    centred = [(upper - lower, index) for index, (lower, upper, _) in enumerate(windows)
               if any(abs((lower + upper) / 2 - energy) <= 0.01 * energy for energy in energies)]
    return min(centred)[1] if centred else 0


def radionuclide_code(ds) -> str:
    """The first radiopharmaceutical's RadionuclideCodeSequence code value ("" when absent)."""
    for drug in ds.get("RadiopharmaceuticalInformationSequence") or []:
        for code in drug.get("RadionuclideCodeSequence") or []:
            return _text(code.get("CodeValue"))
    return ""


def read_projections(files) -> LoadedVolume:
    """The photopeak window's frames of each NM TOMO file, as one volume of views (display only).

    Views are stacked along k in the file's frame order (detector, then view); several files
    (beds) must share the frame size and are stacked one after the other. The geometry is a
    stand-in for display: pixel spacing in-plane, 1 mm between views, rows running inferior.
    """
    files = [str(f) for f in files]
    if not files:
        raise DoorError("No projection file was given; choose the NM TOMO series of the study.")
    stacks, infos, windows_seen, uids = [], [], [], []
    pixel_mm = (1.0, 1.0)
    for path in files:
        header = read_header(path)
        check_projection_header(header, path)
        ds = read_header(path, pixels=True)
        try:
            frames = np.asarray(ds.pixel_array, dtype=np.float32)
        except Exception as error:
            raise DoorError(f"The pixel data of {Path(path).name} could not be decoded ({type(error).__name__}); "
                            "the file may be truncated or compressed in a way pydicom cannot read.") from None
        if frames.ndim == 2:
            frames = frames[None]
        windows = _energy_windows(ds)
        peak = photopeak_index(windows, radionuclide_code(ds))
        vector = ds.get("EnergyWindowVector")
        if vector is not None and len(vector) == frames.shape[0]:
            frames = frames[np.asarray([int(v) for v in vector]) == peak + 1]
        if frames.shape[0] == 0:
            raise DoorError(f"{Path(path).name} holds no frame of its photopeak window; the file is incomplete.")
        if stacks and frames.shape[1:] != stacks[0].shape[1:]:
            raise DoorError(f"{Path(path).name} has frames of {frames.shape[2]}x{frames.shape[1]} pixels and "
                            f"{Path(files[0]).name} of {stacks[0].shape[2]}x{stacks[0].shape[1]}; choose beds of one acquisition.")
        if "PixelSpacing" in ds:
            pixel_mm = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        stacks.append(frames)
        infos.append(ds)
        windows_seen.append(windows[peak] if windows else None)
        uids.append(_text(ds.get("SOPInstanceUID")))
    array = np.concatenate(stacks, axis=0)  # [view, row, column] = [k, j, i]
    ijk_to_ras = np.diag([-pixel_mm[1], -pixel_mm[0], 1.0, 1.0])  # upright in an axial slice view
    peak_window = windows_seen[0]
    extra = {"photopeak_keV": [peak_window[0], peak_window[1]] if peak_window else None,
             "views_per_file": [int(s.shape[0]) for s in stacks]}
    return LoadedVolume(array, ijk_to_ras, files, series_info(infos[0], uids), extra)


def read_ct(files) -> LoadedVolume:
    """A CT series as HU on its own grid, slices sorted by position along the slice normal."""
    files = [str(f) for f in files]
    if not files:
        raise DoorError("No CT file was given; choose the CT series of the study.")
    slices = []
    for path in files:
        ds = read_header(path, pixels=True)
        if "PixelData" not in ds:
            continue  # DICOMDIR, structured reports and the like are not slices
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or _text(ds.get("Modality")).upper() == "NM":
            raise DoorError(f"{Path(path).name} is not a CT slice (modality {_text(ds.get('Modality')) or 'unknown'}); "
                            "choose the CT series of the study.")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise DoorError(f"{Path(path).name} lacks {tag}, so the CT cannot be placed in space; choose a complete CT series.")
        slices.append((path, ds))
    if not slices:
        raise DoorError("None of the given files is an image slice; choose the CT series of the study.")
    series = {_text(ds.get("SeriesInstanceUID")) for _, ds in slices}
    if len(series) > 1:
        raise DoorError(f"The files belong to {len(series)} different series; choose the files of one CT series.")
    orientation = np.asarray([float(v) for v in slices[0][1].ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (column index i), along a column (j)
    normal = np.cross(row_dir, col_dir)
    for path, ds in slices:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-4):
            raise DoorError(f"{Path(path).name} is tilted differently from the other slices; choose a CT series with one orientation.")
        if (ds.Rows, ds.Columns) != (slices[0][1].Rows, slices[0][1].Columns):
            raise DoorError(f"{Path(path).name} has a different image size from the other slices; choose one CT series.")
    slices.sort(key=lambda item: float(np.dot(normal, [float(v) for v in item[1].ImagePositionPatient])))
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    distances = positions @ normal
    if len(slices) > 1:
        steps = np.diff(distances)
        dz = float(np.median(steps))
        if dz <= 0 or np.any(np.abs(steps - dz) > 0.01 * dz + 1e-3):
            raise DoorError("The CT slices are not evenly spaced (missing or duplicate slices); load the complete series.")
    else:
        dz = float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
    arrays = []
    for path, ds in slices:
        try:
            pixels = np.asarray(ds.pixel_array)
        except Exception as error:
            raise DoorError(f"The pixel data of {Path(path).name} could not be decoded ({type(error).__name__}); "
                            "the file may be truncated.") from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        arrays.append(pixels.astype(np.float32) * slope + intercept)
    hu = np.stack(arrays)  # [k, j, i]
    if np.all(hu == np.round(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        hu = hu.astype(np.int16)
    row_mm, col_mm = (float(v) for v in slices[0][1].PixelSpacing)  # between rows, between columns
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0] = row_dir * col_mm
    ijk_to_lps[:3, 1] = col_dir * row_mm
    ijk_to_lps[:3, 2] = normal * dz
    ijk_to_lps[:3, 3] = positions[0]
    sorted_files = [path for path, _ in slices]
    uids = [_text(ds.get("SOPInstanceUID")) for _, ds in slices]
    return LoadedVolume(hu, LPS_TO_RAS @ ijk_to_lps, sorted_files, series_info(slices[0][1], uids))
