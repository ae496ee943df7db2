"""NM projection DICOM (NM Image Storage, TOMO) -> projections, windows, orbit and geometry.

The pixel layout and the angle convention come from PyTomography's
``parse_projection_dataset`` so the engine and a direct PyTomography reconstruction see the same
data. We read the file once with pydicom and validate it first, because PyTomography's readers
fail with tracebacks (or silently) on inputs users do hand us: de-identified files without
Manufacturer, planar or CT files, unknown rotation directions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

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


def _energy_windows(ds: pydicom.Dataset) -> list[EnergyWindow]:
    windows = []
    for index, item in enumerate(ds.EnergyWindowInformationSequence):
        ranges = item.get("EnergyWindowRangeSequence", [])
        if not ranges:
            raise SSPECTError(f"Energy window {index} has no energy range in the file; export the projections with window limits.")
        windows.append(EnergyWindow(index, float(ranges[0].EnergyWindowLowerLimit),
                                    float(ranges[0].EnergyWindowUpperLimit), str(item.get("EnergyWindowName", ""))))
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


def read_projections(path: str) -> ProjectionStudy:
    """Read and validate one bed of NM TOMO projections."""
    from pytomography.io.SPECT.dicom import parse_projection_dataset

    ds = _read_dataset(path)
    path = str(ds.filename)
    _check_is_projection_data(ds, path)
    warnings = []
    rotation_directions = []
    for item in ds.RotationInformationSequence:
        direction = str(item.get("RotationDirection", "")).upper()
        if direction not in ROTATION_DIRECTIONS:
            raise SSPECTError(f"{path} gives the rotation direction '{direction}', neither CW nor CC; the angles cannot be trusted, so correct the Rotation Direction tag.")
        rotation_directions.append(ROTATION_DIRECTIONS[direction])
    if "Manufacturer" not in ds:
        # PyTomography's reader compares Manufacturer with 'Mediso' and fails when it is absent.
        ds.Manufacturer = ""
        warnings.append("The file has no Manufacturer; the GE/Siemens geometry conventions were assumed.")
    try:
        ds.pixel_array  # decode once here so a truncated file fails with a clear message
    except Exception as error:  # pydicom raises several types for damaged pixel data
        raise SSPECTError(f"The pixel data of {path} cannot be read ({error}); the file is probably truncated, so copy it again.") from None
    frames = int(ds.get("NumberOfFrames", 1))
    if len(ds.EnergyWindowVector) != frames or len(ds.DetectorVector) != frames:
        raise SSPECTError(f"{path} has {frames} frames but window/detector vectors of another length; the file is inconsistent, so export it again.")
    projections, angles, radii, _ = parse_projection_dataset(ds)
    projections = projections[:, 0].cpu().numpy()  # first (only) time slot
    windows = _energy_windows(ds)
    if projections.shape[0] != len(windows):
        raise SSPECTError(f"{path} declares {len(windows)} energy windows but holds frames for {projections.shape[0]}; export the projections again.")
    rotation = ds.RotationInformationSequence[0]
    duration_ms = rotation.get("ActualFrameDuration", None)
    if not duration_ms:
        raise SSPECTError(f"{path} gives no frame duration (Actual Frame Duration); quantification needs it, so export the projections with it.")
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
        n_detectors=int(ds.get("NumberOfDetectors", len(ds.DetectorInformationSequence))),
        frame_duration_s=float(duration_ms) / 1000.0,
        collimator=str(detector.get("CollimatorGridName", "")).strip(),
        manufacturer=str(ds.get("Manufacturer", "")),
        model=str(ds.get("ManufacturerModelName", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        radionuclide_code=_radionuclide_code(ds),
        warnings=warnings,
    )
