"""CT series -> HU volume in patient coordinates -> attenuation map on the SPECT grid.

Slices are sorted by their position along the slice normal (never by file name or instance
number). The HU -> mu conversion at the photopeak energy is PyTomography's bilinear table; the
resampling repeats what PyTomography's ``get_attenuation_map_from_CT_slices`` does (convert,
then trilinear onto the SPECT grid, zero outside), but from our own validated geometry, so that
a CT from another frame of reference or one that misses the SPECT field of view is refused.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import SSPECTError
from ..volume import Volume
from .nm import ProjectionStudy

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MIN_AXIAL_COVERAGE = 0.9


@dataclass
class CTSeries:
    files: list[str]  # sorted along the slice normal, increasing position
    volume: Volume  # HU
    frame_of_reference_uid: str
    series_uid: str
    kvp: float
    model: str


def _collect_files(source) -> list[Path]:
    if isinstance(source, (str, Path)):
        source = Path(source)
        if not source.exists():
            raise SSPECTError(f"The CT path {source} does not exist; give the folder of the CT series.")
        return sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    return [Path(p) for p in source]


def read_ct_series(source, frame_of_reference_uid: str | None = None) -> CTSeries:
    """Read a CT series from a folder or a list of files in any order."""
    headers = []
    for file in _collect_files(source):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if ds.get("SOPClassUID") == CT_IMAGE_STORAGE and "ImagePositionPatient" in ds:
            headers.append((file, ds))
    if not headers:
        raise SSPECTError(f"No CT image slices were found in {source}; give the folder (or files) of the CT series.")
    series = {}
    for file, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((file, ds))
    if len(series) > 1:
        matching = {uid: items for uid, items in series.items()
                    if frame_of_reference_uid and items[0][1].get("FrameOfReferenceUID") == frame_of_reference_uid}
        series = matching or series
    series_uid, items = max(series.items(), key=lambda kv: len(kv[1]))
    first = items[0][1]
    row_dir, col_dir = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    normal = np.cross(row_dir, col_dir)
    items.sort(key=lambda item: float(np.dot(normal, np.array(item[1].ImagePositionPatient, float))))
    positions = np.array([np.dot(normal, np.array(ds.ImagePositionPatient, float)) for _, ds in items])
    steps = np.diff(positions)
    if len(items) < 2 or np.any(steps <= 0) or np.ptp(steps) > 0.01 * np.median(steps) + 1e-3:
        raise SSPECTError(f"The CT series in {source} has missing, duplicated or unevenly spaced slices; export the complete series again.")
    slices = []
    for file, _ in items:
        ds = pydicom.dcmread(file)
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as error:  # pydicom raises several types for damaged pixel data
            raise SSPECTError(f"The CT slice {file} cannot be read ({error}); copy the series again.") from None
        slices.append(pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)))
    # pixel_array is [row, column]; our axes are (column = i, row = j, slice = k)
    array = np.stack(slices, axis=-1).transpose(1, 0, 2)
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)  # DICOM: row spacing first
    volume = Volume(array=array, spacing=(col_mm, row_mm, float(np.median(steps))),
                    origin=tuple(float(v) for v in items[0][1].ImagePositionPatient),
                    direction=np.column_stack([row_dir, col_dir, normal]), unit="HU")
    return CTSeries(files=[str(f) for f, _ in items], volume=volume,
                    frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")), series_uid=series_uid,
                    kvp=float(first.get("KVP", 120) or 120), model=str(first.get("ManufacturerModelName", "")))


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

    # PyTomography prints which table entry it chose; keep it off the user's screen and stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        hu_to_mu = get_HU2mu_conversion(ct.files, photopeak_keV)
    return Volume(hu_to_mu(ct.volume.array).astype(np.float32), ct.volume.spacing,
                  ct.volume.origin, ct.volume.direction, unit="1/cm")


def attenuation_map(ct: CTSeries, study: ProjectionStudy, photopeak_keV: float) -> np.ndarray:
    """mu (1/cm) at the photopeak energy on the SPECT object grid [Lx, Ly, Lz]."""
    return resample(mu_volume(ct, photopeak_keV), study.affine, study.object_shape)
