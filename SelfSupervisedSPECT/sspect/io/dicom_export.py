"""A result volume as a DICOM series for dosimetry tools, and such a series read back.

The series is PET Image Storage (Modality PT), one file per axial slice. Why PT and not NM:
the PET IOD is the one that carries quantitative SPECT for the tools we target (3D Slicer's scalar
volume and PET plugins, OpenDose3D, MIM, Hermes all read PT series; PyTomography's own
``save_dcm`` writes PT for SPECT): it has ``Units`` (BQML, CNTS), ``DecayCorrection``,
``CorrectedImage``, ``ActualFrameDuration`` and the Radiopharmaceutical Information Sequence,
and a per-slice ``RescaleSlope`` that keeps float values. A reconstructed NM image is a single
multi-frame file of unsigned integers with no standard rescale or unit, which dosimetry tools
read inconsistently. We write our own files instead of using ``save_dcm`` because it stores
uint16 with one global slope, refuses existing folders, fails on de-identified studies (empty
StudyDate/StudyID) and omits the acquisition date/time that dosimetry tools require
(PyTomography issue #226).
"""
from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid
from pydicom.valuerep import DS

from .. import __version__
from ..atomic import atomic_directory
from ..errors import SSPECTError
from ..volume import Volume
from .nm import injected_activity_MBq
from .volume_files import three_dimensional_array

# Volume.unit (lower case) -> DICOM Units (0054,1001), and back.
DICOM_UNITS = {"bq/ml": "BQML", "counts": "CNTS", "counts/voxel": "CNTS", "cps": "CPS"}
VOLUME_UNITS = {"BQML": "Bq/mL", "CNTS": "counts", "CPS": "cps"}

# The radionuclide (RadionuclideCodeSequence: SNOMED CT code, DICOM CID 18; half-life) comes
# from the caller (the pipeline passes the study's isotope from sspect.physics.isotopes), else
# from the reference NM; io does not import the registry (physics sits beside io, not under it).
RADIONUCLIDE_KEYS = ("name", "code_value", "coding_scheme", "code_meaning", "half_life_s")

# metadata["corrections"] names -> Corrected Image (0028,0051) defined terms for PT. The
# collimator-detector response has no defined term, so it is stated only in ReconstructionMethod
# and the provenance (validators flag a made-up term).
CORRECTION_TERMS = {
    "attenuation": "ATTN",
    "scatter": "SCAT",
    "collimator_detector_response": None,
}

METADATA_KEYS = {
    "reconstruction_method": "str, e.g. 'OSEM 4 it x 8 subsets': ReconstructionMethod, SeriesDescription",
    "corrections": f"list of {sorted(CORRECTION_TERMS)}: CorrectedImage (those with a defined term)",
    "frame_of_reference_uid": "str: the frame the image lies in (the CT's when it was used; default: the NM's)",
    "decay_correction": "'NONE' (default), 'START' or 'ADMIN': DecayCorrection; adds DECY to CorrectedImage",
    "decay_factor": "float, or one per axial slice, required when decay_correction is not 'NONE': DecayFactor",
    "acquisition_datetime": "datetime or ISO string: the dates/times the reference NM lacks",
    "acquisition_duration_s": "float, whole acquisition (all views): ActualFrameDuration",
    "radionuclide": f"mapping with {', '.join(RADIONUCLIDE_KEYS)} (default: the reference NM's code and half-life)",
    "radiopharmaceutical": "str, e.g. '177Lu-PSMA-617': Radiopharmaceutical",
    "injected_activity_MBq": "float: RadionuclideTotalDose (written in Bq)",
    "injection_datetime": "datetime or ISO string: RadiopharmaceuticalStartDateTime",
    "software": "list of str appended to SoftwareVersions after 'sspect <version>'",
}

INT16_MAX = np.iinfo(np.int16).max
LONG_STRING_MAX = 64  # characters of a DICOM LO value
DATE_TIME_PAIRS = (  # the acquisition's; ContentDate/Time is when this image was made
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
)
MANUFACTURER = "SelfSupervisedSPECT"  # General Equipment describes what made this derived image, not the scanner
PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
COPIED_IF_PRESENT = (
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "StudyDescription",
    "InstitutionName",
)
ORIENTATION_SEQUENCES = ("PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence")  # Type 2


def _long_string(text: str) -> str:
    return str(text)[:LONG_STRING_MAX]


def _as_datetime(value, key: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise SSPECTError(
            f"metadata['{key}'] = {value!r} is not a date and time; give an ISO string such as '2024-03-01T10:30:00'."
        ) from None


def _dicom_date_time(moment: dt.datetime) -> tuple[str, str]:
    time = moment.strftime("%H%M%S") + (f".{moment.microsecond:06d}" if moment.microsecond else "")
    return moment.strftime("%Y%m%d"), time


def _check_metadata(metadata: Mapping) -> None:
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise SSPECTError(f"Unknown DICOM export metadata {unknown}; accepted keys: {sorted(METADATA_KEYS)}.")
    unknown_corrections = sorted(set(metadata.get("corrections", ())) - set(CORRECTION_TERMS))
    if unknown_corrections:
        raise SSPECTError(f"Unknown corrections {unknown_corrections}; accepted are {sorted(CORRECTION_TERMS)}.")
    decay = metadata.get("decay_correction", "NONE")
    if decay not in ("NONE", "START", "ADMIN"):
        raise SSPECTError(f"decay_correction {decay!r} is not one of 'NONE', 'START', 'ADMIN'.")
    if decay != "NONE" and "decay_factor" not in metadata:
        raise SSPECTError(
            "A decay-corrected export needs metadata['decay_factor']; give it or set decay_correction 'NONE'."
        )


def _radionuclide(metadata: Mapping, reference: Dataset) -> dict | None:
    """The radionuclide given in ``metadata``, else the reference NM's (None when neither says)."""
    given = metadata.get("radionuclide")
    if given is not None:
        if not isinstance(given, Mapping) or set(given) != set(RADIONUCLIDE_KEYS):
            raise SSPECTError(f"metadata['radionuclide'] must be a mapping with the keys {', '.join(RADIONUCLIDE_KEYS)}, "
                              f"not {given!r}.")
        return dict(given)
    for drug in reference.get("RadiopharmaceuticalInformationSequence") or []:
        for code in drug.get("RadionuclideCodeSequence") or []:
            half_life = drug.get("RadionuclideHalfLife", None)
            if code.get("CodeValue") and half_life not in (None, ""):
                meaning = str(code.get("CodeMeaning", ""))
                return {"name": meaning.replace("^", ""), "code_value": str(code.CodeValue),
                        "coding_scheme": str(code.get("CodingSchemeDesignator", "")), "code_meaning": meaning,
                        "half_life_s": float(half_life)}
    return None


def _dicom_unit(unit: str) -> str:
    try:
        return DICOM_UNITS[unit.lower()]
    except KeyError:
        raise SSPECTError(f"Volume unit {unit!r} has no DICOM equivalent; use one of {sorted(DICOM_UNITS)}.") from None


def _read_reference(path: str | os.PathLike) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as error:
        raise SSPECTError(
            f"Cannot read the reference NM file {path} ({error}); give the projection DICOM of this study."
        ) from None


def _acquisition_duration_ms(metadata: Mapping, reference: Dataset) -> str:
    """Whole acquisition in ms: metadata first, else views x time per view from the NM rotations."""
    if "acquisition_duration_s" in metadata:
        return str(round(float(metadata["acquisition_duration_s"]) * 1000))
    rotations = reference.get("RotationInformationSequence", [])
    try:
        total = sum(float(r.ActualFrameDuration) * int(r.NumberOfFramesInRotation) for r in rotations)
    except (AttributeError, TypeError, ValueError):
        total = 0
    return str(round(total)) if total > 0 else ""


def _radiopharmaceutical_item(metadata: Mapping, reference: Dataset) -> Dataset:
    """Explicit metadata wins; the NM's own entries are kept where they hold a value."""
    nuclide = _radionuclide(metadata, reference)
    item = Dataset()
    reference_items = reference.get("RadiopharmaceuticalInformationSequence", [])
    if reference_items:
        source = reference_items[0]
        for keyword in ("Radiopharmaceutical", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime"):
            if source.get(keyword, None) not in (None, ""):
                setattr(item, keyword, source.get(keyword))
        dose = injected_activity_MBq(reference)
        if dose is not None:
            item.RadionuclideTotalDose = DS(dose * 1e6, auto_format=True)  # NM states MBq, PET Bq
    if "radiopharmaceutical" in metadata:
        item.Radiopharmaceutical = _long_string(metadata["radiopharmaceutical"])
    if "injected_activity_MBq" in metadata:
        item.RadionuclideTotalDose = DS(float(metadata["injected_activity_MBq"]) * 1e6, auto_format=True)
    if "injection_datetime" in metadata:
        injection = _as_datetime(metadata["injection_datetime"], "injection_datetime")
        date, time = _dicom_date_time(injection)
        item.RadiopharmaceuticalStartDateTime = date + time
        item.RadiopharmaceuticalStartTime = time
    if nuclide is not None:
        code = Dataset()
        code.CodeValue = nuclide["code_value"]
        code.CodingSchemeDesignator = nuclide["coding_scheme"]
        code.CodeMeaning = nuclide["code_meaning"]
        item.RadionuclideCodeSequence = [code]
        item.RadionuclideHalfLife = DS(nuclide["half_life_s"], auto_format=True)
    else:
        item.RadionuclideCodeSequence = []  # Type 2: present, empty, when the radionuclide is unknown
    return item


def _decay_factors(metadata: Mapping, n_slices: int) -> list[DS] | None:
    """DecayFactor per slice (beds acquired one after another decay by different amounts)."""
    if metadata.get("decay_correction", "NONE") == "NONE":
        return None
    given = metadata["decay_factor"]
    factors = [given] * n_slices if np.ndim(given) == 0 else list(given)
    if len(factors) != n_slices or not all(np.isfinite(float(f)) and float(f) > 0 for f in factors):
        raise SSPECTError(f"metadata['decay_factor'] must be one positive number or one per slice ({n_slices}), not {given!r}.")
    return [DS(float(f), auto_format=True) for f in factors]


def _slice_scaling(array: np.ndarray) -> tuple[np.ndarray, list[DS]]:
    """int16 pixels and one RescaleSlope per axial slice (k), so cold slices keep their precision.

    Empty slices take the volume's slope, never 1, so that readers which fix the pixel type from
    the first file (ITK) still see a fractional slope. Pixels are computed from the slope as
    written, so the stored values reproduce exactly what a reader computes.
    """
    volume_max = float(np.abs(array).max())
    volume_slope = volume_max / INT16_MAX if volume_max > 0 else 1.0
    pixels = np.empty(array.shape, dtype=np.int16)
    slopes = []
    for k in range(array.shape[2]):
        slice_max = float(np.abs(array[:, :, k]).max())
        slope = DS(slice_max / INT16_MAX if slice_max > 0 else volume_slope, auto_format=True)
        pixels[:, :, k] = np.clip(np.rint(array[:, :, k] / float(slope)), -INT16_MAX - 1, INT16_MAX)
        slopes.append(slope)
    return pixels, slopes


def _check_geometry(volume: Volume) -> np.ndarray:
    direction = np.asarray(volume.direction, dtype=float)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise SSPECTError(
            "The volume direction is not orthonormal, which DICOM cannot represent; resample the volume first."
        )
    if np.any(np.asarray(volume.spacing, dtype=float) <= 0):
        raise SSPECTError(f"The volume spacing {volume.spacing} must be positive.")
    return direction


def _series_template(
    volume: Volume, reference: Dataset, metadata: Mapping, series_description: str | None, series_number: int | None
) -> Dataset:
    """Everything that is the same in every slice of the series."""
    method = str(metadata.get("reconstruction_method", "")).strip()
    nuclide = _radionuclide(metadata, reference)
    now = dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names copied from the NM keep their characters
    ds.SOPClassUID = PositronEmissionTomographyImageStorage
    ds.Modality = "PT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = _dicom_date_time(now.replace(microsecond=0))
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ImageLaterality = "U"  # unpaired: the field of view is no one side (without it, Laterality is Type 2C required)

    for keyword in PATIENT_TYPE2:  # type 2: present even when the NM is de-identified
        setattr(ds, keyword, reference.get(keyword, ""))
    for keyword in COPIED_IF_PRESENT:
        if reference.get(keyword, None) not in (None, ""):
            setattr(ds, keyword, reference.get(keyword))

    ds.StudyInstanceUID = reference.get("StudyInstanceUID", None) or generate_uid()
    ds.StudyID = reference.get("StudyID", "")
    ds.AccessionNumber = reference.get("AccessionNumber", "")
    ds.ReferringPhysicianName = reference.get("ReferringPhysicianName", "")
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(now.strftime("%j%H%M%S")) if series_number is None else series_number
    default_description = f"{nuclide['name'] + ' ' if nuclide else ''}SPECT {method or 'reconstruction'} (sspect)"
    ds.SeriesDescription = _long_string(series_description or default_description)
    ds.FrameOfReferenceUID = (metadata.get("frame_of_reference_uid") or reference.get("FrameOfReferenceUID", None)
                              or generate_uid())
    ds.PositionReferenceIndicator = reference.get("PositionReferenceIndicator", "")

    acquisition = metadata.get("acquisition_datetime")
    fallback = _dicom_date_time(_as_datetime(acquisition, "acquisition_datetime")) if acquisition else ("", "")
    for date_keyword, time_keyword in DATE_TIME_PAIRS:
        if reference.get(date_keyword, ""):
            setattr(ds, date_keyword, reference.get(date_keyword))
            setattr(ds, time_keyword, reference.get(time_keyword, ""))
        else:
            setattr(ds, date_keyword, fallback[0])
            setattr(ds, time_keyword, fallback[1])
    if not ds.SeriesDate:  # Type 1 in the PET Series module: the day this series was made, when the scan's is unknown
        ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime

    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "sspect"
    ds.SoftwareVersions = [f"sspect {__version__}", *(_long_string(s) for s in metadata.get("software", ()))]
    if reference.get("SOPInstanceUID", None):
        source = Dataset()
        source.ReferencedSOPClassUID = reference.SOPClassUID
        source.ReferencedSOPInstanceUID = reference.SOPInstanceUID
        ds.SourceImageSequence = [source]
        ds.DerivationDescription = "SPECT reconstruction of the referenced NM projections by sspect"

    # PET Series and PET Isotope modules
    ds.Units = _dicom_unit(volume.unit)
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.NumberOfSlices = volume.array.shape[2]
    decay = metadata.get("decay_correction", "NONE")
    corrections = [CORRECTION_TERMS[name] for name in metadata.get("corrections", ()) if CORRECTION_TERMS[name]]
    ds.CorrectedImage = corrections + (["DECY"] if decay != "NONE" else [])
    ds.DecayCorrection = decay
    ds.CollimatorType = ""
    if method:
        ds.ReconstructionMethod = _long_string(method)
    ds.RadiopharmaceuticalInformationSequence = [_radiopharmaceutical_item(metadata, reference)]
    ds.ActualFrameDuration = _acquisition_duration_ms(metadata, reference)
    ds.FrameReferenceTime = 0
    for keyword in ORIENTATION_SEQUENCES:  # NM/PET Patient Orientation module, as the NM states it
        setattr(ds, keyword, reference.get(keyword, None) or [])

    # Image Plane and Image Pixel modules: columns run along axis i, rows along axis j
    direction = np.asarray(volume.direction, dtype=float)
    spacing = [float(s) for s in volume.spacing]
    ds.ImageOrientationPatient = [DS(v, auto_format=True) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [DS(spacing[1], auto_format=True), DS(spacing[0], auto_format=True)]  # row spacing first
    ds.SliceThickness = DS(spacing[2], auto_format=True)
    ds.SpacingBetweenSlices = DS(spacing[2], auto_format=True)
    ds.Rows, ds.Columns = volume.array.shape[1], volume.array.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    return ds


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    reference_nm_path: str | os.PathLike | None = None,
    metadata: Mapping | None = None,
    series_description: str | None = None,
    series_number: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``volume`` as a PET Image Storage series, one file per axial slice, atomically.

    Patient, study, frame of reference, equipment and acquisition dates/times come from the
    reference NM projection file (empty values copied as empty); dates the NM lacks come from
    ``metadata['acquisition_datetime']`` or stay empty, never invented (Series Date and Time,
    which DICOM requires, then state when this series was made). ``metadata`` accepts
    the keys in ``METADATA_KEYS``. ``series_number`` defaults to the creation time (day of the
    year and time of day), so that several reconstructions of one study sort as they were made.
    Returns the folder.
    """
    metadata = dict(metadata or {})
    _check_metadata(metadata)
    array = three_dimensional_array(volume).astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise SSPECTError(
            "The volume contains NaN or infinite values, which DICOM cannot store; check the reconstruction."
        )
    direction = _check_geometry(volume)
    reference = _read_reference(reference_nm_path) if reference_nm_path is not None else Dataset()
    template = _series_template(volume, reference, metadata, series_description, series_number)
    pixels, slopes = _slice_scaling(array)
    decay_factors = _decay_factors(metadata, array.shape[2])
    slice_step = direction[:, 2] * float(volume.spacing[2])
    normal = np.cross(direction[:, 0], direction[:, 1])

    with atomic_directory(folder, overwrite=overwrite) as temporary:
        for k in range(array.shape[2]):
            ds = Dataset()
            ds.update(template)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImageIndex = k + 1
            position = np.asarray(volume.origin, dtype=float) + k * slice_step
            ds.ImagePositionPatient = [DS(v, auto_format=True) for v in position]
            ds.SliceLocation = DS(float(position @ normal), auto_format=True)
            ds.RescaleSlope = slopes[k]
            if decay_factors is not None:
                ds.DecayFactor = decay_factors[k]
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(temporary / f"slice_{k + 1:04d}.dcm", enforce_file_format=True)
    return Path(folder)


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read a single-frame DICOM series (one folder, one series) into a float32 Volume in LPS.

    highdicom sorts the slices and checks that they are evenly spaced; the rescale slope of each
    slice is applied. Axis k runs along the slice normal (row x column direction), so a volume
    written with a left-handed direction comes back with k reversed: same voxels, same places.
    """
    datasets = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            try:
                datasets.append(pydicom.dcmread(path))
            except InvalidDicomError:
                continue
    if not datasets:
        raise SSPECTError(f"No DICOM files in {folder}; give the folder of an exported series.")
    if len({ds.SeriesInstanceUID for ds in datasets}) > 1:
        raise SSPECTError(f"{folder} holds more than one DICOM series; give a folder with one.")
    try:
        series = highdicom.get_volume_from_series(datasets, dtype=np.float32)
    except (ValueError, RuntimeError) as error:
        raise SSPECTError(f"The DICOM series in {folder} is not a regular 3D volume ({error}).") from None
    # highdicom indexes (slice, row, column) and runs the slices against the normal (a
    # right-handed index frame); Volume indexes (i = column, j = row, k = slice along the normal).
    array = series.array.transpose(2, 1, 0)[:, :, ::-1]
    axes = series.affine[:3, [2, 1, 0]] * np.array([1.0, 1.0, -1.0])
    origin = series.affine[:3, 3] - axes[:, 2] * (array.shape[2] - 1)
    spacing = np.linalg.norm(axes, axis=0)
    units = str(datasets[0].get("Units", ""))
    return Volume(
        array=np.ascontiguousarray(array),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=axes / spacing,
        unit=VOLUME_UNITS.get(units, units or "counts"),
    )
