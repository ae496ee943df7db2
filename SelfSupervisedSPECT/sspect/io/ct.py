"""CT series -> HU volume in patient coordinates -> attenuation map on the SPECT grid.

Every header value the volume depends on is checked before a pixel is read, so a hostile CT
ends in one sentence (SSPECTError) instead of a wrong attenuation map or a traceback: a slice
must carry finite Image Position, Image Orientation (two orthogonal unit vectors), positive
Pixel Spacing, Rows, Columns, Rescale Intercept and Rescale Slope, and the slices of a series
must agree in size, spacing, orientation and Frame of Reference and be evenly stacked along
their normal. Suspicious but legal input goes on with a warning in ``CTSeries.warnings``: an
oblique CT, a missing tube voltage, a CT holding only air or no air, another series ignored.

A source may hold several CT series (slices grouped by Series Instance UID). One is chosen by
this rule, and a warning names it, why, and the series ignored:
  1. the SPECT's Frame of Reference before any other;
  2. a volume before a localizer (scout) or a series of one slice;
  3. ORIGINAL before DERIVED (first value of Image Type);
  4. the most slices;
  5. the smallest Series Instance UID, so that the choice never depends on file names or order.
Only the chosen series is checked, so a broken series that was not chosen does not stop a run.

Slices are sorted by their position along the slice normal (never by file name or instance
number). The HU -> mu conversion at the photopeak energy is PyTomography's bilinear table; the
resampling repeats what PyTomography's ``get_attenuation_map_from_CT_slices`` does (convert,
then trilinear onto the SPECT grid, zero outside), but from our own validated geometry, so that
a CT from another frame of reference or one that misses the SPECT field of view is refused.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import warnings as python_warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from ..errors import SSPECTError
from ..volume import Volume
from .nm import ProjectionStudy

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MIN_AXIAL_COVERAGE = 0.9
AGAIN = "export the CT series again"
UNIT_TOLERANCE = 1e-3  # direction cosines: unit length, orthogonality and agreement between slices
OBLIQUE_DEG = 1.0  # slices tilted more than this from the axes are called oblique
AIR_HU = -500.0  # below: air (and the scanner's padding outside its field of view)
FEW = 0.001  # "almost no voxel": under a thousandth of the CT
MAX_ABS_HU = 1e5  # beyond any CT scale (extended scales reach about 30000 HU)
DEFAULT_KVP = 120.0


@dataclass
class CTSeries:
    files: list[str]  # sorted along the slice normal, increasing position
    volume: Volume  # HU
    frame_of_reference_uid: str
    series_uid: str
    kvp: float
    model: str
    warnings: list[str] = field(default_factory=list)  # suspicious but legal input, for the study's warnings


class SliceHeader(NamedTuple):
    """What one CT slice's header says about its place and its HU, checked."""

    file: Path
    position: np.ndarray  # mm, LPS
    orientation: np.ndarray  # row direction then column direction
    spacing: np.ndarray  # mm: between rows, between columns (DICOM order)
    size: tuple[int, int]  # rows, columns
    slope: float
    intercept: float
    frame_of_reference_uid: str


def _collect_files(source) -> list[Path]:
    if isinstance(source, (str, Path)):
        source = Path(source)
        if not source.exists():
            raise SSPECTError(f"The CT path {source} does not exist; give the folder of the CT series.")
        return sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    return [Path(p) for p in source]


def _values(ds, keyword: str) -> list:
    """The attribute's values as a list, empty when it is absent or empty."""
    with python_warnings.catch_warnings():  # pydicom warns of text in a number; our sentence says it instead
        python_warnings.simplefilter("ignore")
        value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _finite(values: list) -> np.ndarray | None:
    """The values as finite numbers, or None when one is text or not finite."""
    try:
        numbers = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        return None
    return numbers if np.all(np.isfinite(numbers)) else None


def _numbers(ds, keyword: str, count: int, file) -> np.ndarray:
    """The attribute as ``count`` finite numbers, else the sentence naming the file and the attribute."""
    values, name = _values(ds, keyword), dictionary_description(keyword)
    if not values:
        raise SSPECTError(f"The CT slice {file} lacks {name}; {AGAIN}.")
    numbers = _finite(values)
    if numbers is None or numbers.size != count:
        shown = "\\".join(str(v) for v in values)
        raise SSPECTError(f"The CT slice {file} has {name} '{shown}', not {count} finite number{'s' * (count > 1)}; {AGAIN}.")
    return numbers


def _slice_header(file: Path, ds) -> SliceHeader:
    """The slice's geometry and rescale, or the sentence naming what is missing or wrong."""
    position = _numbers(ds, "ImagePositionPatient", 3, file)
    orientation = _numbers(ds, "ImageOrientationPatient", 6, file)
    spacing = _numbers(ds, "PixelSpacing", 2, file)
    rows, columns = _numbers(ds, "Rows", 1, file)[0], _numbers(ds, "Columns", 1, file)[0]
    intercept = _numbers(ds, "RescaleIntercept", 1, file)[0]
    slope = _numbers(ds, "RescaleSlope", 1, file)[0]
    if np.any(spacing <= 0):
        raise SSPECTError(f"The CT slice {file} has Pixel Spacing {spacing[0]:g} x {spacing[1]:g} mm, which must be positive; {AGAIN}.")
    if min(rows, columns) < 1:
        raise SSPECTError(f"The CT slice {file} has {rows:g} rows and {columns:g} columns, not an image; {AGAIN}.")
    if slope <= 0:
        raise SSPECTError(f"The CT slice {file} has Rescale Slope {slope:g}, which must be positive for HU; {AGAIN}.")
    row_dir, col_dir = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(row_dir) - 1) > UNIT_TOLERANCE or abs(np.linalg.norm(col_dir) - 1) > UNIT_TOLERANCE
            or abs(np.dot(row_dir, col_dir)) > UNIT_TOLERANCE):
        raise SSPECTError(f"The CT slice {file} has an Image Orientation (Patient) whose row and column directions are not orthogonal unit vectors; {AGAIN}.")
    return SliceHeader(file, position, orientation, spacing, (int(rows), int(columns)), float(slope), float(intercept),
                       str(ds.get("FrameOfReferenceUID") or ""))


def _check_same_grid(headers: list[SliceHeader]) -> None:
    """Refuse a series whose slices do not share one pixel grid, orientation and Frame of Reference."""
    first = headers[0]
    for other in headers[1:]:
        pair = f"The CT slices {first.file} and {other.file} of one series"
        if other.size != first.size:
            raise SSPECTError(f"{pair} differ in size ({first.size[0]}x{first.size[1]} and {other.size[0]}x{other.size[1]} pixels); {AGAIN}.")
        if not np.allclose(other.spacing, first.spacing, rtol=0, atol=UNIT_TOLERANCE):
            raise SSPECTError(f"{pair} differ in Pixel Spacing ({first.spacing[0]:g} x {first.spacing[1]:g} and {other.spacing[0]:g} x {other.spacing[1]:g} mm); {AGAIN}.")
        if not np.allclose(other.orientation, first.orientation, rtol=0, atol=UNIT_TOLERANCE):
            raise SSPECTError(f"{pair} differ in Image Orientation (Patient); {AGAIN}.")
        if other.frame_of_reference_uid != first.frame_of_reference_uid:
            raise SSPECTError(f"{pair} differ in Frame of Reference; {AGAIN}.")


def _series_label(uid: str, items: list) -> str:
    """How warnings and errors name a series: description (when it has one), slice count, UID."""
    description = str(items[0][1].get("SeriesDescription") or "").strip()
    count = f"{len(items)} slice{'s' * (len(items) != 1)}"
    return f"'{description}' ({count}, {uid})" if description else f"{uid} ({count})"


RULE_REASONS = ("it is in the SPECT's Frame of Reference", "it is a volume, not a localizer or a single slice",
                "it is ORIGINAL, not DERIVED", "it has the most slices", "it has the smallest Series Instance UID")


def _rank(uid: str, items: list, frame_of_reference_uid: str | None) -> tuple:
    """The module docstring's rule as a sort key: smaller is preferred."""
    first = items[0][1]
    image_type = [str(v).strip().upper() for v in _values(first, "ImageType")]
    same_frame = bool(frame_of_reference_uid) and first.get("FrameOfReferenceUID") == frame_of_reference_uid
    return (not same_frame, "LOCALIZER" in image_type or len(items) < 2, image_type[:1] != ["ORIGINAL"], -len(items), uid)


def _choose_series(series: dict, frame_of_reference_uid: str | None, warnings: list[str]) -> tuple[str, list]:
    ranked = sorted(series.items(), key=lambda kv: _rank(*kv, frame_of_reference_uid))
    (uid, items), others = ranked[0], ranked[1:]
    if others:
        ours, runner_up = _rank(uid, items, frame_of_reference_uid), _rank(*others[0], frame_of_reference_uid)
        reason = RULE_REASONS[next(n for n, (a, b) in enumerate(zip(ours, runner_up)) if a != b)]
        ignored = ", ".join(_series_label(*kv) for kv in others)
        warnings.append(f"{len(series)} CT series were given; series {_series_label(uid, items)} was used because {reason}, "
                        f"and {ignored} ignored; give the files of one series to choose another.")
    return uid, items


def _stack(headers: list[SliceHeader], label: str) -> tuple[np.ndarray, float]:
    """Sort the slices along their normal; their direction matrix and slice step, or the sentence why they are no volume."""
    row_dir, col_dir = (v / np.linalg.norm(v) for v in (headers[0].orientation[:3], headers[0].orientation[3:]))
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    headers.sort(key=lambda header: float(np.dot(normal, header.position)))
    positions = np.array([header.position for header in headers])
    along = positions @ normal
    steps = np.diff(along)
    if np.any(steps <= 0) or np.ptp(steps) > 0.01 * np.median(steps) + 1e-3:
        raise SSPECTError(f"The CT series {label} has missing, duplicated or unevenly spaced slices; export the complete series again.")
    sideways = positions - positions[0] - np.outer(along - along[0], normal)
    if np.max(np.linalg.norm(sideways, axis=1)) > 0.5 * headers[0].spacing.min():
        raise SSPECTError(f"The slices of the CT series {label} are shifted sideways from one another (as a tilted gantry writes them), not stacked along their normal; resample the CT to a regular volume first.")
    return np.column_stack([row_dir, col_dir, normal]), float(np.median(steps))


def _read_hu(headers: list[SliceHeader]) -> np.ndarray:
    """HU of the slices as [column, row, slice]."""
    slices = []
    for header in headers:
        try:
            pixels = pydicom.dcmread(header.file).pixel_array
        except Exception as error:  # pydicom raises several types for damaged pixel data
            raise SSPECTError(f"The CT slice {header.file} cannot be read ({error}); copy the series again.") from None
        if pixels.shape != header.size:
            raise SSPECTError(f"The CT slice {header.file} is not a grey-scale image of {header.size[0]}x{header.size[1]} pixels; {AGAIN}.")
        hu = pixels * header.slope + header.intercept
        if np.max(np.abs(hu)) > MAX_ABS_HU:
            raise SSPECTError(f"The CT slice {header.file} gives HU values up to {np.max(np.abs(hu)):.3g} (Rescale Slope {header.slope:g}, Intercept {header.intercept:g}), beyond any CT; {AGAIN}.")
        slices.append(hu.astype(np.float32))
    # pixel_array is [row, column]; our axes are (column = i, row = j, slice = k)
    return np.stack(slices, axis=-1).transpose(1, 0, 2)


def _volume_warnings(volume: Volume, label: str) -> list[str]:
    """Legal but suspicious: oblique slices, a CT of air only, a CT without air."""
    warnings = []
    tilt = float(np.degrees(np.arccos(min(1.0, np.abs(volume.direction).max(axis=0).min()))))
    if tilt > OBLIQUE_DEG:
        warnings.append(f"The CT slices are oblique (tilted {tilt:.1f} deg); they were resampled onto the SPECT grid.")
    above_air = float(np.mean(volume.array > AIR_HU))
    if above_air < FEW:
        warnings.append(f"The CT series {label} holds only air (almost no voxel above {AIR_HU:g} HU), so it corrects no attenuation; give the CT that shows the patient.")
    elif above_air > 1 - FEW:
        warnings.append(f"The CT series {label} holds almost no air (no voxel below {AIR_HU:g} HU), as when its Rescale Intercept is wrong; check that its HU are right.")
    return warnings


def read_ct_series(source, frame_of_reference_uid: str | None = None) -> CTSeries:
    """Read a CT series from a folder or a list of files in any order; refuse or warn on what would mislead."""
    warnings: list[str] = []
    series: dict[str, list] = {}
    enhanced = []
    for file in _collect_files(source):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if ds.get("SOPClassUID") == ENHANCED_CT_IMAGE_STORAGE:
            enhanced.append(file)
        elif ds.get("SOPClassUID") == CT_IMAGE_STORAGE:
            uid = _values(ds, "SeriesInstanceUID")
            if not uid:
                raise SSPECTError(f"The CT slice {file} lacks Series Instance UID; {AGAIN}.")
            series.setdefault(str(uid[0]), []).append((file, ds))
    if not series:
        if enhanced:
            raise SSPECTError(f"The CT {enhanced[0]} is an Enhanced (multi-frame) CT, which is not read; export the CT as one file per slice (CT Image Storage).")
        raise SSPECTError(f"No CT image slices were found in {source}; give the folder (or files) of the CT series.")
    series_uid, items = _choose_series(series, frame_of_reference_uid, warnings)
    label = _series_label(series_uid, items)
    headers = [_slice_header(file, ds) for file, ds in items]
    if len(headers) < 2:
        raise SSPECTError(f"The CT series {label} has only one slice; give the folder (or files) of the whole CT series.")
    _check_same_grid(headers)
    direction, step = _stack(headers, label)
    row_mm, col_mm = headers[0].spacing  # DICOM: row spacing first
    volume = Volume(array=_read_hu(headers), spacing=(float(col_mm), float(row_mm), step),
                    origin=tuple(float(v) for v in headers[0].position), direction=direction, unit="HU")
    warnings += _volume_warnings(volume, label)
    first = items[0][1]
    kvp = _finite(_values(first, "KVP"))
    if kvp is None or kvp.size != 1 or kvp[0] <= 0:
        warnings.append(f"The CT gives no valid tube voltage (KVP); the HU to mu conversion assumed {DEFAULT_KVP:g} kV.")
        kvp = np.array([DEFAULT_KVP])
    return CTSeries(files=[str(header.file) for header in headers], volume=volume,
                    frame_of_reference_uid=headers[0].frame_of_reference_uid, series_uid=series_uid,
                    kvp=float(kvp[0]), model=str(first.get("ManufacturerModelName") or ""), warnings=warnings)


def resample(volume: Volume, target_affine: np.ndarray, target_shape, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Values of ``volume`` at the voxel centres of another grid (trilinear, ``cval`` outside)."""
    from scipy.ndimage import affine_transform

    matrix = np.linalg.inv(volume.affine) @ target_affine
    return affine_transform(volume.array, matrix, output_shape=tuple(target_shape), order=order,
                            mode="constant", cval=cval).astype(np.float32)


def check_ct_matches(ct: CTSeries, study: ProjectionStudy, peak_window: int) -> list[str]:
    """Refuse a CT that belongs to another frame of reference or misses the SPECT field of view."""
    warnings = []
    if ct.frame_of_reference_uid and study.frame_of_reference_uid:
        if ct.frame_of_reference_uid != study.frame_of_reference_uid:
            raise SSPECTError("The CT is from another Frame of Reference than the SPECT projections, so it is not aligned with them; choose the CT acquired with this SPECT.")
    else:
        warnings.append("The CT or the SPECT has no Frame of Reference UID; they were assumed to be aligned.")
    corners = np.array([[i, j, k, 1] for i in (0, ct.volume.array.shape[0] - 1)
                        for j in (0, ct.volume.array.shape[1] - 1) for k in (0, ct.volume.array.shape[2] - 1)]).T
    ct_z = (ct.volume.affine @ corners)[2]
    spect_low, spect_high = study.axial_range_mm(peak_window)
    overlap = max(0.0, min(ct_z.max(), spect_high) - max(ct_z.min(), spect_low))
    coverage = overlap / (spect_high - spect_low)
    if coverage < MIN_AXIAL_COVERAGE:
        raise SSPECTError(
            f"The CT covers only {coverage:.0%} of the axial field of view that the SPECT detector saw ({spect_low:.0f} to {spect_high:.0f} mm); attenuation correction needs a CT of the whole bed, so choose a CT that covers it.")
    if coverage < 0.999:
        warnings.append(f"The CT covers {coverage:.0%} of the SPECT axial field of view; slices outside it are corrected as air.")
    return warnings


def mu_volume(ct: CTSeries, photopeak_keV: float) -> Volume:
    """The CT converted to mu (1/cm) at the photopeak energy, on the CT's own grid."""
    from pytomography.io.SPECT.dicom import get_HU2mu_conversion

    # PyTomography looks its table entry up from a CT file's KVP and model, which a slice may lack or garble; it
    # reads a file holding the values read_ct_series checked. It prints its choice; keep that off stdout.
    header = Dataset()
    header.KVP, header.ManufacturerModelName = format_number_as_ds(ct.kvp), ct.model
    header.file_meta = FileMetaDataset()
    header.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header.preamble = b"\0" * 128
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        probe = str(Path(folder) / "kvp_and_model.dcm")
        header.save_as(probe)
        hu_to_mu = get_HU2mu_conversion([probe], photopeak_keV)
    return Volume(hu_to_mu(ct.volume.array).astype(np.float32), ct.volume.spacing,
                  ct.volume.origin, ct.volume.direction, unit="1/cm")


def attenuation_map(ct: CTSeries, study: ProjectionStudy, photopeak_keV: float) -> np.ndarray:
    """mu (1/cm) at the photopeak energy on the SPECT object grid [Lx, Ly, Lz]."""
    return resample(mu_volume(ct, photopeak_keV), study.affine, study.object_shape)
