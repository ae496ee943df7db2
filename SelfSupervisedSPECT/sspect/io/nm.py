"""NM projection DICOM (NM Image Storage, TOMO) -> projections, windows, orbit and geometry.

The pixel layout and the angle convention come from PyTomography's
``parse_projection_dataset`` so the engine and a direct PyTomography reconstruction see the same
data. We read the file once with pydicom and validate it first, because PyTomography's readers
fail with tracebacks (or silently) on inputs users do hand us: de-identified files without
Manufacturer, planar or CT files, unknown or lowercase rotation directions, orbits whose step,
views and arc disagree, frame counts that disagree with the pixel data, signed or float pixels.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DA, DT, TM

from ..errors import SSPECTError

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
ROTATION_DIRECTIONS = {"CW": "CW", "CC": "CC", "CCW": "CC"}


@dataclass
class EnergyWindow:
    index: int  # 0-based position in the Energy Window Information Sequence
    lower_keV: float
    upper_keV: float
    name: str = ""

    @property
    def width_keV(self) -> float:
        return self.upper_keV - self.lower_keV

    @property
    def centre_keV(self) -> float:
        return (self.upper_keV + self.lower_keV) / 2

    def describe(self) -> str:
        label = f" '{self.name}'" if self.name else ""
        return f"#{self.index}{label} {self.lower_keV:.1f}-{self.upper_keV:.1f} keV"


@dataclass
class ProjectionStudy:
    """One bed of a SPECT acquisition, as read from an NM TOMO file."""

    path: str
    header: pydicom.Dataset  # the file without pixel data, for export and provenance
    windows: list[EnergyWindow]
    projections: np.ndarray  # [window, view, Lr, Lz] counts, PyTomography's order
    angles_deg: np.ndarray  # detector angles, PyTomography convention, ascending
    radii_cm: np.ndarray
    pixel_mm: tuple[float, float]  # (across the detector, axial)
    affine: np.ndarray  # object voxel index -> LPS mm (identity direction)
    rotation_directions: list[str]
    n_detectors: int
    frame_duration_s: float
    collimator: str
    manufacturer: str
    model: str
    frame_of_reference_uid: str
    study_uid: str
    radionuclide_code: str = ""  # RadionuclideCodeSequence CodeValue (SNOMED CT), "" when absent
    warnings: list[str] = field(default_factory=list)

    @property
    def n_views(self) -> int:
        return int(self.projections.shape[1])

    @property
    def object_shape(self) -> tuple[int, int, int]:
        n_r, n_z = self.projections.shape[2:]
        return (n_r, n_r, n_z)

    @property
    def object_spacing_mm(self) -> tuple[float, float, float]:
        return (self.pixel_mm[0], self.pixel_mm[0], self.pixel_mm[1])

    def axial_range_mm(self, window: int | None = None) -> tuple[float, float]:
        """Patient z (S) of the first and last slice centres that the detector saw.

        With a window, only slices whose counts exceed 1% of the axial profile's peak count:
        the matrix (e.g. 128 x 4.4 mm = 566 mm) is longer than a detector's useful field
        (about 400 mm), and the rows beyond it hold no data to correct.
        """
        slices = np.arange(self.object_shape[2])
        if window is not None:
            profile = self.projections[window].sum(axis=(0, 1))
            slices = np.nonzero(profile > 0.01 * profile.max())[0] if profile.max() > 0 else slices
        z0, dz = self.affine[2, 3], self.affine[2, 2]
        return z0 + dz * slices.min(), z0 + dz * slices.max()


def _read_dataset(path: str) -> pydicom.Dataset:
    file = Path(path)
    if not file.exists():
        raise SSPECTError(f"The projection file {path} does not exist; give the path of the NM TOMO DICOM file.")
    if file.is_dir():
        candidates = find_projection_files(file)
        if len(candidates) != 1:
            found = "no" if not candidates else f"{len(candidates)}"
            raise SSPECTError(
                f"The folder {path} holds {found} NM TOMO projection files; give the file itself.")
        file = candidates[0]
    try:
        ds = pydicom.dcmread(file)
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise SSPECTError(f"{file} is not a readable DICOM file ({error}); give the NM TOMO projection file.") from None
    return ds


def find_projection_files(folder: Path) -> list[Path]:
    """NM TOMO projection files in a folder (not recursive), by header only."""
    found = []
    for candidate in sorted(Path(folder).iterdir()):
        if not candidate.is_file():
            continue
        try:
            ds = pydicom.dcmread(candidate, stop_before_pixels=True, specific_tags=["SOPClassUID", "ImageType"])
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if ds.get("SOPClassUID") == NM_IMAGE_STORAGE and "TOMO" in list(ds.get("ImageType", [])):
            found.append(candidate)
    return found


def _check_is_projection_data(ds: pydicom.Dataset, path: str) -> None:
    modality = ds.get("Modality", "")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if ds.get("SOPClassUID") != NM_IMAGE_STORAGE or modality != "NM":
        what = f"a {modality} image" if modality else "not an NM image"
        raise SSPECTError(f"{path} is {what}, not SPECT projections; give the NM TOMO projection file.")
    if "RECON TOMO" in " ".join(image_type) or "RECON" in image_type:
        raise SSPECTError(f"{path} is an already reconstructed SPECT image; give the raw NM TOMO projection file.")
    if "TOMO" not in image_type:
        kind = next((t for t in ("STATIC", "WHOLE BODY", "DYNAMIC", "GATED") if t in image_type), "planar")
        raise SSPECTError(f"{path} is a {kind.lower()} NM acquisition, not a tomographic one; give the NM TOMO projection file.")
    for keyword in ("EnergyWindowInformationSequence", "RotationInformationSequence", "DetectorInformationSequence",
                    "EnergyWindowVector", "DetectorVector", "PixelSpacing"):
        if keyword not in ds:
            raise SSPECTError(f"{path} lacks the DICOM attribute {keyword} that SPECT reconstruction needs; export the projections from the scanner again.")


def _energy_windows(ds: pydicom.Dataset, path: str) -> list[EnergyWindow]:
    windows = []
    for index, item in enumerate(ds.EnergyWindowInformationSequence):
        ranges = item.get("EnergyWindowRangeSequence", [])
        if not ranges:
            raise SSPECTError(f"Energy window {index} has no energy range in the file; export the projections with window limits.")
        lower = _values(ranges[0], "EnergyWindowLowerLimit", f"lower limit of energy window {index}", path, count=1)[0]
        upper = _values(ranges[0], "EnergyWindowUpperLimit", f"upper limit of energy window {index}", path, count=1)[0]
        if not 0 <= lower < upper:
            raise SSPECTError(f"{path} gives energy window {index} from {lower:g} to {upper:g} keV; its lower limit must be at least 0 and below its upper limit, so correct the window limits.")
        windows.append(EnergyWindow(index, lower, upper, str(item.get("EnergyWindowName", ""))))
    return windows


def _object_affine(ds: pydicom.Dataset) -> np.ndarray:
    """Same grid as PyTomography's ``_get_affine_spect_projections``, from the header in memory.

    Written out because PyTomography's version re-reads the file and needs Manufacturer; a test
    checks both agree on the real study.
    """
    sx, sy, sz = (float(v) for v in ds.DetectorInformationSequence[0].ImagePositionPatient)
    dx = float(ds.PixelSpacing[0])
    dz = float(ds.PixelSpacing[1])
    rows = int(ds.Rows)
    if sy == 0:
        sx -= (rows - 1) / 2 * dx
        sy -= (rows - 1) / 2 * dx
        sy -= float(ds.RotationInformationSequence[0].get("TableHeight", 0) or 0)
    elif ds.get("Manufacturer", "") == "Mediso":
        sy = -(rows - 1) / 2 * dx
    sz -= (rows - 1) * dz
    return np.array([[dx, 0, 0, sx], [0, dx, 0, sy], [0, 0, dz, sz], [0, 0, 0, 1]], dtype=float)


def bin_detector(study: ProjectionStudy, factor: int) -> ProjectionStudy:
    """The same bed with ``factor`` x ``factor`` detector pixels summed: counts kept, the object grid ``factor`` times coarser.

    Networks trained through the projector cost about ``factor^3`` times less per step on the coarser
    grid, which makes them usable on a CPU (a 128^3 bed becomes 64^3). Voxel centres move to the
    centre of each block of fine voxels, so the field of view and the patient position are unchanged.
    """
    if factor == 1:
        return study
    n_windows, n_views, n_r, n_z = study.projections.shape
    if factor < 1 or n_r % factor or n_z % factor:
        raise SSPECTError(f"Detector binning {factor} does not divide the {n_r} x {n_z} projection matrix; choose 1, 2 or another divisor of both.")
    binned = study.projections.reshape(n_windows, n_views, n_r // factor, factor, n_z // factor, factor).sum(axis=(3, 5))
    affine = study.affine.copy()
    affine[:3, 3] += (factor - 1) / 2 * np.diag(study.affine)[:3]
    affine[:3, :3] *= factor
    return replace(study, projections=binned, pixel_mm=(study.pixel_mm[0] * factor, study.pixel_mm[1] * factor),
                   affine=affine)


def _radionuclide_code(ds: pydicom.Dataset) -> str:
    """The code value of the first radiopharmaceutical's radionuclide ("" when the file does not say)."""
    for drug in ds.get("RadiopharmaceuticalInformationSequence") or []:
        for code in drug.get("RadionuclideCodeSequence") or []:
            return str(code.get("CodeValue", "")).strip()
    return ""


def acquisition_start(header: pydicom.Dataset) -> dt.datetime | None:
    """When the acquisition began (Acquisition Date and Time); None when either is missing or malformed."""
    try:
        date, time = DA(header.get("AcquisitionDate", "") or None), TM(header.get("AcquisitionTime", "") or None)
    except (TypeError, ValueError):
        return None
    if date is None or time is None:
        return None
    return dt.datetime.combine(dt.date(date.year, date.month, date.day),
                               dt.time(time.hour, time.minute, time.second, time.microsecond))


def _radiopharmaceutical(header: pydicom.Dataset):
    return (header.get("RadiopharmaceuticalInformationSequence") or [None])[0]


def injection_start(header: pydicom.Dataset) -> dt.datetime | None:
    """When the radiopharmaceutical was given (its Start DateTime; a Start Time without a date is
    ambiguous for scans days after the injection, so it counts as unknown)."""
    drug = _radiopharmaceutical(header)
    try:
        moment = DT(drug.get("RadiopharmaceuticalStartDateTime", "") or None) if drug is not None else None
    except (TypeError, ValueError):
        return None
    return None if moment is None else dt.datetime.fromisoformat(moment.isoformat())


def injected_activity_MBq(header: pydicom.Dataset) -> float | None:
    """The Radionuclide Total Dose (NM states MBq); None when absent or 0, which scanners write for "not entered"."""
    drug = _radiopharmaceutical(header)
    try:
        dose = float(drug.get("RadionuclideTotalDose", None)) if drug is not None else 0.0
    except (TypeError, ValueError):
        return None
    return dose if np.isfinite(dose) and dose > 0 else None


def read_projections(path: str) -> ProjectionStudy:
    """Read and validate one bed of NM TOMO projections."""
    from pytomography.io.SPECT.dicom import parse_projection_dataset

    ds = _read_dataset(path)
    path = str(ds.filename)
    _check_is_projection_data(ds, path)
    warnings = []
    rotation_directions = _normalise_rotation_directions(ds, path)
    if "Manufacturer" not in ds:
        # PyTomography's reader compares Manufacturer with 'Mediso' and fails when it is absent.
        ds.Manufacturer = ""
        warnings.append("The file has no Manufacturer; the GE/Siemens geometry conventions were assumed.")
    check_orbit(ds, path)
    windows = _energy_windows(ds, path)
    check_frames(ds, path)
    projections, angles, radii, _ = parse_projection_dataset(ds)
    projections = projections[:, 0].cpu().numpy()  # first (only) time slot
    if projections.shape[0] != len(windows):
        raise SSPECTError(f"{path} declares {len(windows)} energy windows but holds frames for {projections.shape[0]}; export the projections again.")
    if not np.all(np.isfinite(radii)) or np.any(radii <= 0) or len(radii) != len(angles):  # after GE Xeleris's private offsets
        raise SSPECTError(f"{path} gives radial positions that are not one positive distance per view; correct the Radial Position tags or export the projections again.")
    warnings += _orbit_warnings(np.asarray(angles, dtype=float), float(ds.RotationInformationSequence[0].AngularStep))
    warnings += _hot_pixel_warnings(projections, windows)
    rotation = ds.RotationInformationSequence[0]
    detector = ds.DetectorInformationSequence[0]
    header = ds.copy()
    del header.PixelData
    return ProjectionStudy(
        path=path,
        header=header,
        windows=windows,
        projections=projections,
        angles_deg=np.asarray(angles, dtype=float),
        radii_cm=np.asarray(radii, dtype=float),
        pixel_mm=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
        affine=_object_affine(ds),
        rotation_directions=rotation_directions,
        n_detectors=len(ds.DetectorInformationSequence),
        frame_duration_s=float(rotation.ActualFrameDuration) / 1000.0,
        collimator=str(detector.get("CollimatorGridName", "")).strip(),
        manufacturer=str(ds.get("Manufacturer", "")),
        model=str(ds.get("ManufacturerModelName", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        radionuclide_code=_radionuclide_code(ds),
        warnings=warnings,
    )


# ---------------------------------------------------------------- validation of the header
# Every value PyTomography's reader uses is checked here first, because it trusts the header:
# a lowercase direction mirrors the orbit, a wrong step or frame count gives wrong angles, and a
# missing tag ends in an AttributeError deep inside it.

PIXEL_MM_RANGE = (0.5, 30.0)  # what gamma cameras record; beyond it the collimator model is meaningless
MAX_RADIUS_MM = 1000.0  # beyond any gantry
HOT_PIXEL_RATIO = 10.0  # a detector element this many times its neighbours' median over all views
HOT_PIXEL_MIN_EXCESS = 100.0  # summed counts above the median, so that empty regions do not count


def _values(item, keyword: str, label: str, path: str, count: int | None = None) -> list[float]:
    """The attribute's numbers (all finite), refused in one sentence when absent, empty or not numbers."""
    if keyword not in item or item[keyword].value in (None, "", []):
        raise SSPECTError(f"{path} gives no {label} ({keyword}); export the projections from the scanner again.")
    raw = item[keyword].value
    raw = list(raw) if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else [raw]
    try:
        numbers = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise SSPECTError(f"{path} gives the {label} ({keyword}) as '{raw[0]}', not a number; correct the header or export the projections again.") from None
    if not all(np.isfinite(numbers)):
        raise SSPECTError(f"{path} gives a {label} ({keyword}) that is not a finite number; correct the header or export the projections again.")
    if count is not None and len(numbers) != count:
        raise SSPECTError(f"{path} gives {len(numbers)} values of the {label} ({keyword}) where {count} are needed; correct the header or export the projections again.")
    return numbers


def _whole(item, keyword: str, label: str, path: str, minimum: int = 1) -> int:
    value = _values(item, keyword, label, path, count=1)[0]
    if value != int(value) or value < minimum:
        raise SSPECTError(f"{path} gives the {label} ({keyword}) as {value:g}, not a whole number of at least {minimum}; correct the header or export the projections again.")
    return int(value)


def _normalise_rotation_directions(ds: pydicom.Dataset, path: str) -> list[str]:
    """Each rotation's direction as CW or CC, written back so that PyTomography (which compares case-sensitively) reads it so."""
    if not ds.RotationInformationSequence:
        raise SSPECTError(f"{path} has an empty Rotation Information Sequence, so the views have no angles; export the projections from the scanner again.")
    directions = []
    for item in ds.RotationInformationSequence:
        direction = str(item.get("RotationDirection", "") or "").strip().upper()
        if direction not in ROTATION_DIRECTIONS:
            raise SSPECTError(f"{path} gives the rotation direction '{direction}', neither CW nor CC; the angles cannot be trusted, so correct the Rotation Direction tag.")
        item.RotationDirection = ROTATION_DIRECTIONS[direction]
        directions.append(ROTATION_DIRECTIONS[direction])
    return directions


def check_orbit(ds: pydicom.Dataset, path: str) -> None:
    """Check the orbit, detectors and spacing PyTomography will read."""
    detectors = ds.DetectorInformationSequence
    if not detectors:
        raise SSPECTError(f"{path} has an empty Detector Information Sequence; export the projections from the scanner again.")
    declared = _whole(ds, "NumberOfDetectors", "number of detectors", path) if ds.get("NumberOfDetectors") not in (None, "") else len(detectors)
    if declared != len(detectors):
        raise SSPECTError(f"{path} declares {declared} detectors but describes {len(detectors)}; correct Number of Detectors or export the projections again.")
    rotation = ds.RotationInformationSequence[0]
    views = _whole(rotation, "NumberOfFramesInRotation", "number of frames in rotation", path)
    step = _values(rotation, "AngularStep", "angular step", path, count=1)[0]
    if step <= 0:
        raise SSPECTError(f"{path} gives an angular step of {step:g} degrees; it must be positive (the direction is the Rotation Direction tag), so correct the header.")
    if views * step > 360 + 0.5 * step:
        raise SSPECTError(f"{path} gives {views} views of {step:g} degrees, more than one turn; correct the angular step or the number of frames in rotation.")
    if "ScanArc" in rotation and rotation.ScanArc not in (None, ""):
        arc = _values(rotation, "ScanArc", "scan arc", path, count=1)[0]
        if min(abs(views * step - arc), abs((views - 1) * step - arc)) > 0.01 * max(arc, step):
            raise SSPECTError(f"{path} gives {views} frames in rotation with an angular step of {step:g} degrees ({views * step:g} degrees) but a scan arc of {arc:g} degrees; the angles cannot be trusted, so correct the header.")
    for number, detector in enumerate(detectors):
        source = detector if "StartAngle" in detector else rotation
        _values(source, "StartAngle", f"start angle of detector {number + 1}", path, count=1)
        radii = _radii_item(ds, detector, number)
        if radii is None:
            raise SSPECTError(f"{path} gives no radial position of detector {number + 1} (RadialPosition); export the projections from the scanner again.")
        values = _values(radii, "RadialPosition", f"radial position of detector {number + 1}", path)
        if len(values) not in (1, views):
            raise SSPECTError(f"{path} gives {len(values)} radial positions of detector {number + 1} for {views} views; correct the Radial Position tag or export the projections again.")
        if min(values) <= 0 or max(values) > MAX_RADIUS_MM:
            wrong = min(values) if min(values) <= 0 else max(values)
            raise SSPECTError(f"{path} gives a radial position of {wrong:g} mm for detector {number + 1}; a detector is more than 0 and at most {MAX_RADIUS_MM:g} mm from the axis, so correct the header.")
    _values(detectors[0], "ImagePositionPatient", "detector's image position (patient)", path, count=3)
    if rotation.get("TableHeight") not in (None, ""):
        _values(rotation, "TableHeight", "table height", path, count=1)
    spacing = _values(ds, "PixelSpacing", "pixel spacing", path, count=2)
    if not all(PIXEL_MM_RANGE[0] <= v <= PIXEL_MM_RANGE[1] for v in spacing):
        raise SSPECTError(f"{path} gives a pixel spacing of {spacing[0]:g} x {spacing[1]:g} mm, outside the {PIXEL_MM_RANGE[0]:g} to {PIXEL_MM_RANGE[1]:g} mm gamma cameras record; correct the Pixel Spacing tag.")
    duration = _values(rotation, "ActualFrameDuration", "frame duration (Actual Frame Duration)", path, count=1)[0]
    if duration <= 0:
        raise SSPECTError(f"{path} gives a frame duration of {duration:g} ms; quantification needs a positive one, so correct the Actual Frame Duration tag.")


def _radii_item(ds: pydicom.Dataset, detector, number: int):
    """The item whose RadialPosition PyTomography reads for this detector (None when there is none)."""
    rotations = ds.RotationInformationSequence
    if ds.get("Manufacturer", "") == "Mediso" or "RadialPosition" not in detector:
        return rotations[number] if number < len(rotations) and "RadialPosition" in rotations[number] else None
    return detector


def check_frames(ds: pydicom.Dataset, path: str) -> None:
    """The frames must be counts (whole, non-negative), as many as declared, each named a window and detector of the file.

    pydicom keeps the decoded array, so PyTomography's reader does not decode it again.
    """
    frames = _whole(ds, "NumberOfFrames", "number of frames", path)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise SSPECTError(f"{path} holds floating-point pixel data; SPECT projections are whole counts, so give the scanner's original projection file.")
    if "PixelData" not in ds:
        raise SSPECTError(f"{path} holds no pixel data; copy the projection file again.")
    rows, columns = _whole(ds, "Rows", "number of rows", path), _whole(ds, "Columns", "number of columns", path)
    bits = _whole(ds, "BitsAllocated", "bits allocated", path)
    if bits not in (8, 16, 32):
        raise SSPECTError(f"{path} gives {bits} bits allocated per pixel; projections hold 8, 16 or 32, so export the projections again.")
    if not ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian).is_compressed:
        held = len(ds.PixelData) * 8 // (bits * rows * columns)
        if held != frames:
            raise SSPECTError(f"{path} says Number of Frames is {frames} but its pixel data holds {held} frames of {rows} x {columns}; the file is inconsistent, so export it again.")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises several types for damaged pixel data
        raise SSPECTError(f"The pixel data of {path} cannot be read ({error}); the file is probably truncated, so copy it again.") from None
    pixels = pixels.reshape(frames, rows, columns) if pixels.ndim == 2 else pixels
    if pixels.shape != (frames, rows, columns):
        raise SSPECTError(f"{path} says Number of Frames is {frames} but its pixel data holds {pixels.shape[0]}; the file is inconsistent, so export it again.")
    if pixels.min() < 0:
        raise SSPECTError(f"{path} holds negative counts (signed pixel data down to {int(pixels.min())}); counts are never negative, so check Pixel Representation or export the projections again.")
    views = int(ds.RotationInformationSequence[0].NumberOfFramesInRotation)
    window_vector = [int(v) for v in _values(ds, "EnergyWindowVector", "energy window vector", path, count=frames)]
    detector_vector = [int(v) for v in _values(ds, "DetectorVector", "detector vector", path, count=frames)]
    n_windows = len(ds.EnergyWindowInformationSequence)
    if not set(window_vector) <= set(range(1, n_windows + 1)):
        raise SSPECTError(f"{path} has an energy window vector naming windows beyond the {n_windows} it describes; export the projections again.")
    if not set(detector_vector) <= set(range(1, len(ds.DetectorInformationSequence) + 1)):
        raise SSPECTError(f"{path} has a detector vector naming detectors beyond the {len(ds.DetectorInformationSequence)} it describes; export the projections again.")
    slots = len(set(ds.get("TimeSlotVector") or [1]))
    for window in sorted(set(window_vector)):
        held = window_vector.count(window)
        if held != views * len(ds.DetectorInformationSequence) * slots:
            raise SSPECTError(f"{path} holds {held} frames of energy window {window} but its rotation declares {views} views for each of {len(ds.DetectorInformationSequence)} detector(s); the angles cannot be trusted, so correct Number of Frames in Rotation or export again.")


def _orbit_warnings(angles: np.ndarray, step: float) -> list[str]:
    covered = len(np.unique(np.round(angles, 3))) * step
    if covered < 360 - 0.5 * step:
        return [f"The views cover only {covered:.0f} degrees, not a full turn; the image may show limited-angle artefacts."]
    return []


def _hot_pixel_warnings(projections: np.ndarray, windows: list[EnergyWindow]) -> list[str]:
    """Detector elements far above their neighbours in every view: a collimator blur never makes a one-pixel spike."""
    from scipy.ndimage import median_filter

    found = []
    for window in windows:
        summed = projections[window.index].sum(axis=0)
        neighbours = median_filter(summed, size=3, mode="nearest")
        hot = (summed > HOT_PIXEL_RATIO * neighbours) & (summed - neighbours > HOT_PIXEL_MIN_EXCESS)
        if hot.any():
            ratio = float((summed[hot] / np.maximum(neighbours[hot], 1)).max())
            found.append(f"Window {window.describe()} has {int(hot.sum())} hot detector pixel(s), up to {ratio:.0f} times their neighbours over all views; check the detector's uniformity, the image may show a streak.")
    return found
