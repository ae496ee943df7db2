"""From study files to result files: read, model, reconstruct, calibrate, export, report.

This is what the CLI, the run-job door and the Python API all call, so the same settings
give the same numbers everywhere.
"""
from __future__ import annotations

import math
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from . import __version__
from .decay import DecayCorrection, acquisition_duration_s, check_mode, decay_correction
from .errors import SSPECTError
from .io.calibrations import check_calibration_name, find_calibration
from .io.ct import CTSeries, check_ct_matches, mu_volume, read_ct_series, resample
from .io.nm import ProjectionStudy, acquisition_start, bin_detector, injected_activity_MBq, injection_start, read_projections
from .io.windows import NONE_WORDS, WindowChoice, choose_windows
from .methods import Events, get_method
from .physics.collimators import Collimator, detect_collimator, get_collimator, serving_warning
from .physics.isotopes import Isotope, detect_isotope, get_isotope, parse_photopeaks
from .physics.system import SCATTER_SMOOTHING_CM, Geometry, PeakData, build_problem, tew_scatter
from .volume import Volume

FORMATS = ("nrrd", "nifti", "dicom")
SEED_RANGE = range(0, 2**32)  # what numpy's and torch's generators both take
RESULT_NAME = re.compile(r"[A-Za-z0-9_+()-][A-Za-z0-9 _.+()-]{0,79}")  # a file name on every system, with room for suffixes
ROOM_MARGIN_BYTES = 50e6  # preview, report and DICOM headers


@dataclass
class Settings:
    """Everything a reconstruction depends on besides the files; also the job file's body."""

    method: str = "osem"
    params: dict = field(default_factory=dict)
    peak_window: str | int | None = None
    lower_window: str | int | None = None
    upper_window: str | int | None = None
    collimator: str | None = None
    isotope: str | None = None  # a name or alias; None: from the file
    photopeaks: str | tuple | None = None  # keV values such as "113,208"; None: the isotope's default
    calibration_cps_per_MBq: float | None = None
    calibration_name: str | None = None  # a sensitivity stored by `sspect calibrate`, used instead of a number
    device: str = "auto"
    seed: int = 0
    formats: tuple = ("nrrd", "dicom")
    name: str | None = None
    detector_binning: int = 1  # 2: 2x2 detector pixels summed, a 2x coarser grid (networks ~8x faster)
    projector: str = "fast"  # or "pytomography", the reference model
    overwrite: bool = False  # a result of the same (given) name is replaced instead of refused
    acquisition_datetime: str | None = None  # ISO 8601; for a file that lacks it (de-identified)
    injection_datetime: str | None = None  # ISO 8601; wins over the file's
    injected_activity_MBq: float | None = None  # wins over the file's
    decay_correction: str = "none"  # "start": to the acquisition start; "injection": to the injection
    scatter_smoothing_cm: float = SCATTER_SMOOTHING_CM  # Gaussian sigma of the TEW/DEW estimate in each view; 0: unsmoothed


@dataclass
class Study:
    beds: list[ProjectionStudy]
    ct: CTSeries | None
    isotope: Isotope
    peaks: list[WindowChoice]  # one per photopeak reconstructed, the main one first
    collimator: Collimator
    warnings: list[str]
    decay: DecayCorrection
    scatter_smoothing_cm: float


def check_settings(settings: Settings) -> None:
    """Refuse bad method parameters, device or formats before any file is read."""
    from .physics.system import check_projector, resolve_device

    get_method(settings.method).validate(settings.params)
    resolve_device(settings.device)
    check_projector(settings.projector)
    unknown = sorted(set(settings.formats) - set(FORMATS))
    if unknown:
        raise SSPECTError(f"Unknown output format {', '.join(unknown)}; choose from {', '.join(FORMATS)}.")
    if settings.collimator:
        get_collimator(settings.collimator)
    if settings.isotope:
        parse_photopeaks(get_isotope(settings.isotope), settings.photopeaks)
    calibration = settings.calibration_cps_per_MBq
    if calibration is not None and not (isinstance(calibration, (int, float)) and math.isfinite(calibration) and calibration > 0):
        raise SSPECTError(f"The calibration factor must be a positive finite number of counts per second per MBq, not {calibration!r}.")
    if settings.calibration_name is not None:
        check_calibration_name(settings.calibration_name)
        if calibration is not None:
            raise SSPECTError("Give the sensitivity as a number or as a stored calibration's name, not both.")
    if isinstance(settings.detector_binning, bool) or settings.detector_binning not in range(1, 9):
        raise SSPECTError(f"The detector binning must be a whole number from 1 to 8, not {settings.detector_binning!r}.")
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int) or settings.seed not in SEED_RANGE:
        raise SSPECTError(f"The seed must be a whole number from 0 to {SEED_RANGE.stop - 1}, not {settings.seed!r}.")
    if settings.name is not None:
        check_result_name(settings.name)
    for key in ("acquisition_datetime", "injection_datetime"):
        value = getattr(settings, key)
        if value is not None:
            try:
                datetime.fromisoformat(str(value))
            except ValueError:
                raise SSPECTError(f"The {key.replace('_', ' ')} {value!r} is not a date and time; give it as 2024-03-01T10:30:00.") from None
    check_mode(settings.decay_correction)
    check_scatter_smoothing(settings.scatter_smoothing_cm)
    activity = settings.injected_activity_MBq
    if activity is not None and not (isinstance(activity, (int, float)) and math.isfinite(activity) and activity > 0):
        raise SSPECTError(f"The injected activity must be a positive finite number of MBq, not {activity!r}.")


def check_scatter_smoothing(sigma_cm) -> None:
    if isinstance(sigma_cm, bool) or not (isinstance(sigma_cm, (int, float)) and math.isfinite(sigma_cm) and 0 <= sigma_cm <= 5):
        raise SSPECTError(f"The scatter smoothing must be a number of cm from 0 (none) to 5, not {sigma_cm!r}.")


def check_result_name(name) -> None:
    """A result name is one plain file name: no folder, no hidden file, nothing a file system refuses."""
    if not isinstance(name, str) or not RESULT_NAME.fullmatch(name) or name.endswith((".", " ")):
        shown = repr(name) if len(str(name)) <= 40 else repr(str(name)[:40]) + f"... ({len(str(name))} characters)"
        raise SSPECTError(f"The result name {shown} is not a plain file name; use up to 80 letters, digits, spaces "
                          "and - _ . + ( ), not starting with a dot or a space.")


def check_output_folder(out_dir) -> Path:
    """The output folder exists (created if need be) and takes files; checked before any work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SSPECTError(f"The output folder {out} is a file; choose a folder.")
    probe = out / f".sspect-write-check-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            probe.mkdir()
        finally:  # also when SIGTERM lands right after the mkdir
            if probe.is_dir():
                probe.rmdir()
    except (NotADirectoryError, FileExistsError):
        raise SSPECTError(f"The output folder {out} cannot be made because part of its path is a file; choose another folder.") from None
    except OSError as error:
        raise SSPECTError(f"The output folder {out} cannot be written ({error.strerror or error}); choose a folder you may write to.") from None
    return out


def check_room(out: Path, study: "Study", settings: Settings) -> None:
    """Refuse a result that the output folder's disk cannot hold, before reconstructing it."""
    voxels = sum(int(np.prod(bed.object_shape)) for bed in study.beds)
    volumes = sum(f in settings.formats for f in ("nrrd", "nifti")) + 1  # and an uncertainty map
    needed = voxels * 4 * volumes + voxels * 2 * ("dicom" in settings.formats) + ROOM_MARGIN_BYTES
    free = shutil.disk_usage(out).free
    if free < needed:
        raise SSPECTError(f"The disk of {out} has {free / 1e6:.0f} MB free but the result needs about {needed / 1e6:.0f} MB; "
                          "free space or choose another output folder.")


def load_study(nm_paths, ct_source=None, settings: Settings | None = None) -> Study:
    """Read every bed and the CT, choose windows and collimator, check that they belong together."""
    settings = settings or Settings()
    nm_paths = [nm_paths] if isinstance(nm_paths, (str, Path)) else list(nm_paths)
    if not nm_paths:
        raise SSPECTError("No projection file was given; give the NM TOMO DICOM file of each bed.")
    if settings.detector_binning > 1 and len(nm_paths) > 1:
        raise SSPECTError("Detector binning works on one bed at a time; reconstruct the beds separately or without binning.")
    beds = [bin_detector(read_projections(str(p)), settings.detector_binning) for p in nm_paths]
    warnings = [w for bed in beds for w in bed.warnings]
    first = beds[0]
    for bed in beds[1:]:
        same_acquisition = (
            bed.study_uid == first.study_uid and bed.frame_of_reference_uid == first.frame_of_reference_uid
            and bed.projections.shape[1:] == first.projections.shape[1:] and bed.pixel_mm == first.pixel_mm
            and bed.frame_duration_s == first.frame_duration_s
            and [(w.lower_keV, w.upper_keV) for w in bed.windows] == [(w.lower_keV, w.upper_keV) for w in first.windows])
        if not same_acquisition:
            raise SSPECTError(f"The bed {bed.path} does not belong to the same study and acquisition as {first.path} (study, views, pixels, frame duration and windows must match); give the beds of one study.")
    beds.sort(key=lambda bed: bed.affine[2, 3])
    isotope = study_isotope(first, settings.isotope, warnings)
    photopeaks = parse_photopeaks(isotope, settings.photopeaks)
    if len(photopeaks) > 1 and any(w is not None for w in (settings.peak_window, settings.lower_window, settings.upper_window)):
        raise SSPECTError("Windows given by hand serve one photopeak; give one photopeak with them, or leave the windows automatic.")
    peaks = [choose_windows(first.windows, photopeak.energy_keV, settings.peak_window, settings.lower_window, settings.upper_window)
             for photopeak in photopeaks]
    for bed in beds:
        for windows in peaks:
            if not bed.projections[windows.peak.index].sum() > 0:
                raise SSPECTError(f"The photopeak window {windows.peak.describe()} of {bed.path} holds no counts; check that this is the right projection file and photopeak window.")
    switched_off = any(str(w).strip().lower() in NONE_WORDS for w in (settings.lower_window, settings.upper_window) if w is not None)
    for windows in peaks:
        if windows.scatter_method == "none":
            warnings.append("The scatter windows were switched off; the image is not scatter corrected." if switched_off
                            else f"No scatter window was found next to the {windows.photopeak_keV:g} keV photopeak; it is not scatter corrected.")
    warnings += dosimetry_warnings(first, settings)
    decay = decay_correction(settings.decay_correction, beds, isotope.half_life_s,
                             settings.acquisition_datetime, settings.injection_datetime)
    collimator = get_collimator(settings.collimator) if settings.collimator else detect_collimator(first.manufacturer, first.collimator)
    warnings += [w for w in [serving_warning(collimator, isotope)] if w]
    ct = None
    if ct_source is not None:
        ct = read_ct_series(ct_source, first.frame_of_reference_uid)
        warnings += ct.warnings
        for bed in beds:
            warnings += check_ct_matches(ct, bed, peaks[0].peak.index)
    else:
        warnings.append("No CT was given; the image is not attenuation corrected.")
    return Study(beds, ct, isotope, peaks, collimator, sorted(set(warnings)), decay, float(settings.scatter_smoothing_cm))


def with_stored_calibration(study: Study, settings: Settings) -> Settings:
    """The settings with the named calibration's sensitivity, refused for a study it was not measured for."""
    if settings.calibration_name is None:
        return settings
    record = find_calibration(settings.calibration_name)
    photopeaks = [w.photopeak_keV for w in study.peaks]
    measured = {"isotope": (record.get("isotope"), study.isotope.name), "collimator": (record.get("collimator"), study.collimator.name),
                "photopeaks": (record.get("photopeaks_keV"), photopeaks)}
    for what, (stored, here) in measured.items():
        if stored != here:
            raise SSPECTError(f"The calibration '{record['name']}' was measured for the {what} {stored}, this study has {here}; "
                              "use a calibration measured for it.")
    if record.get("method") != settings.method:
        study.warnings.append(f"The calibration '{record['name']}' was measured with {record.get('method')}, this image uses "
                              f"{settings.method}; their quantification can differ, so check it on the phantom.")
    smoothing = float(record.get("scatter_smoothing_cm", 0.0))  # a record older than the setting was measured unsmoothed
    if smoothing != study.scatter_smoothing_cm:
        study.warnings.append(f"The calibration '{record['name']}' was measured with the scatter estimate smoothed by {smoothing:g} cm, "
                              f"this image smooths it by {study.scatter_smoothing_cm:g} cm; at low phantom counts the sensitivity "
                              "can differ by a few per cent, so recalibrate with the same setting.")
    return replace(settings, calibration_cps_per_MBq=float(record["cps_per_MBq"]))


def dosimetry_warnings(bed: ProjectionStudy, settings: Settings) -> list[str]:
    """What a dosimetry tool needs from the image's DICOM and neither the file nor the settings give."""
    missing = []
    if acquisition_start(bed.header) is None and not settings.acquisition_datetime:
        missing.append("acquisition date and time (--acquisition-datetime)")
    if injection_start(bed.header) is None and not settings.injection_datetime:
        missing.append("injection date and time (--injection-datetime)")
    if injected_activity_MBq(bed.header) is None and settings.injected_activity_MBq is None:
        missing.append("injected activity (--injected-activity)")
    if not missing:
        return []
    return [f"The projection file gives no {', no '.join(missing)}; dosimetry tools need them in the DICOM image, so give them."]


def study_isotope(bed: ProjectionStudy, given: str | None, warnings: list[str]) -> Isotope:
    """The isotope given, else the one the file names (its radionuclide code or its windows)."""
    found = detect_isotope(bed.radionuclide_code, [w.centre_keV for w in bed.windows])
    if given:
        isotope = get_isotope(given)
        if found is not None and found is not isotope and bed.radionuclide_code:
            warnings.append(f"The file names {found.name} but {isotope.name} was given; {isotope.name} is reconstructed.")
        return isotope
    if found is None:
        raise SSPECTError("The file names no radionuclide and no energy window holds a known photopeak; "
                          "give the isotope with --isotope (177Lu, 99mTc, 111In or 131I).")
    return found


def bed_geometry(bed: ProjectionStudy) -> Geometry:
    return Geometry(bed.object_shape, (bed.pixel_mm[0] / 10, bed.pixel_mm[1] / 10), bed.angles_deg, bed.radii_cm)


def peak_data(bed: ProjectionStudy, windows: WindowChoice, mu: np.ndarray | None, smoothing_cm: float) -> PeakData:
    """One photopeak's counts, its own TEW/DEW scatter estimate (smoothed by ``smoothing_cm``) and the mu map at its energy."""
    def counts(window):
        return None if window is None else bed.projections[window.index]

    scatter = tew_scatter(windows.peak.width_keV, counts(windows.lower), windows.lower.width_keV if windows.lower else None,
                          counts(windows.upper), windows.upper.width_keV if windows.upper else None,
                          bed_geometry(bed), smoothing_cm)
    return PeakData(windows.photopeak_keV, bed.projections[windows.peak.index], scatter, mu,
                    (windows.peak.lower_keV, windows.peak.upper_keV))


def ct_mu_volumes(study: Study) -> list[Volume | None]:
    """The CT as mu at each photopeak's energy, on its own grid (converted once, resampled per bed)."""
    return [mu_volume(study.ct, windows.photopeak_keV) if study.ct else None for windows in study.peaks]


def problem_of_bed(study: Study, bed: ProjectionStudy, mu_volumes, device: str = "auto", projector: str = "fast"):
    peaks = [peak_data(bed, windows, None if mu is None else resample(mu, bed.affine, bed.object_shape), study.scatter_smoothing_cm)
             for windows, mu in zip(study.peaks, mu_volumes)]
    return build_problem(peaks, bed_geometry(bed), study.collimator, study.isotope, device, projector)


def bed_problem(study: Study, bed: int = 0, device: str = "auto", projector: str = "fast"):
    """The reconstruction problem of one bed: its counts, the CT's attenuation maps on its grid and the system model."""
    return problem_of_bed(study, study.beds[bed], ct_mu_volumes(study), device, projector)


def bq_per_ml_factor(calibration_cps_per_MBq: float, frame_duration_s: float, voxel_ml: float) -> float:
    """Counts per voxel (PyTomography's scale: counts in one view) -> Bq/mL."""
    return 1e6 / (calibration_cps_per_MBq * frame_duration_s * voxel_ml)


def reconstruct_study(study: Study, settings: Settings, events: Events | None = None) -> tuple[Volume, dict]:
    """Reconstruct every bed, stitch beds, calibrate; returns the image and its provenance."""
    import torch

    events = events or Events()
    method = get_method(settings.method)
    given = dict(settings.params)
    if any(p.name == "seed" for p in method.params):
        given.setdefault("seed", settings.seed)  # the job's seed reaches methods that draw random numbers
    params = method.validate(given)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    started = time.perf_counter()
    first = study.beds[0]
    scale, unit = 1.0, "counts"
    if settings.calibration_cps_per_MBq:
        voxel_ml = float(np.prod(first.object_spacing_mm)) / 1000.0
        scale, unit = bq_per_ml_factor(settings.calibration_cps_per_MBq, first.frame_duration_s, voxel_ml), "Bq/mL"
    images, infos, uncertainties = [], [], []
    method_seconds = 0.0
    mu_volumes = ct_mu_volumes(study)
    for number, bed in enumerate(study.beds):
        problem = problem_of_bed(study, bed, mu_volumes, settings.device, settings.projector)
        bed_events = Events(lambda event, n=number: events.emit(**_per_bed(event, n, len(study.beds))),
                            should_stop=events.should_stop,
                            on_iterate=(lambda iteration, image: events.iterate(iteration, image * scale))
                            if events.wants_iterates and len(study.beds) == 1 else None)
        try:
            method_started = time.perf_counter()
            result = method.reconstruct(problem, params, bed_events)
            method_seconds += time.perf_counter() - method_started
        except torch.OutOfMemoryError:
            raise SSPECTError(f"The {problem.device} ran out of memory; choose the CPU device or close other GPU programs.") from None
        except MemoryError:
            raise SSPECTError("The computer ran out of memory; close other programs or use a machine with more memory.") from None
        images.append(result.image * study.decay.factors[number])
        infos.append(result.info)
        uncertainties.append(None if result.uncertainty is None else result.uncertainty * study.decay.factors[number])
    image, affine = _stitch(images, study.beds)
    volume = Volume((image * scale).astype(np.float32), first.object_spacing_mm, tuple(affine[:3, 3]), np.eye(3), unit)
    if all(u is not None for u in uncertainties):  # SDs stitched like images: exact outside the beds' overlap
        volume.uncertainty = (_stitch(uncertainties, study.beds)[0] * scale).astype(np.float32)
    provenance = {
        "software": {"sspect": __version__, **_versions()},
        "method": method.name, "method_title": method.title, "params": params,
        "seed": settings.seed, "device": str(problem.device), "projector": settings.projector, "unit": volume.unit,
        "isotope": {"name": study.isotope.name, "half_life_s": study.isotope.half_life_s,
                    "code": [study.isotope.code_value, study.isotope.coding_scheme, study.isotope.code_meaning]},
        "windows": [{"photopeak_keV": w.photopeak_keV, "peak": _window_dict(w.peak), "lower": _window_dict(w.lower),
                     "upper": _window_dict(w.upper), "scatter_method": w.scatter_method} for w in study.peaks],
        "collimator": study.collimator.name, "collimator_code": study.collimator.code,
        "corrections": ["attenuation"] * bool(study.ct) + ["scatter"] * any(w.scatter_method != "none" for w in study.peaks)
        + ["collimator_detector_response"],
        "calibration_cps_per_MBq": settings.calibration_cps_per_MBq, "calibration_name": settings.calibration_name,
        "detector_binning": settings.detector_binning,
        "scatter_smoothing_cm": study.scatter_smoothing_cm,
        "decay_correction": study.decay.provenance(),
        "uncertainty": volume.uncertainty is not None,
        "frame_duration_s": first.frame_duration_s,
        "inputs": {"nm": [bed.path for bed in study.beds], "ct_series_uid": study.ct.series_uid if study.ct else None,
                   "ct_files": len(study.ct.files) if study.ct else 0},
        "geometry": {"shape": list(volume.array.shape), "spacing_mm": list(volume.spacing),
                     "origin_lps_mm": list(volume.origin), "direction": np.asarray(volume.direction).tolist()},
        "per_bed": infos, "warnings": study.warnings,
        "run_time_s": round(time.perf_counter() - started, 2),
        "method_run_time_s": round(method_seconds, 2),  # the methods alone, without building the system model
    }
    return volume, provenance


def _per_bed(event: dict, bed: int, n_beds: int) -> dict:
    if event.get("event") == "progress" and n_beds > 1:
        event = {**event, "fraction": round((bed + event["fraction"]) / n_beds, 4),
                 "message": f"bed {bed + 1}/{n_beds}: {event.get('message', '')}"}
    return event


def _stitch(images, beds):
    if len(images) == 1:
        return images[0], beds[0].affine
    import pytomography
    import torch
    from pytomography.io.SPECT.dicom import stitch_multibed

    stacked = torch.stack([torch.from_numpy(i) for i in images]).to(pytomography.device)
    stitched = stitch_multibed(stacked, [bed.path for bed in beds])
    return stitched.cpu().numpy(), beds[0].affine


def slice_decay_factors(study: Study, n_slices: int) -> list[float]:
    """The factor of each axial slice of the stitched image: that of the bed the stitching took it from."""
    factors = study.decay.factors
    if len(set(factors)) == 1:
        return [factors[0]] * n_slices
    shape = study.beds[0].object_shape
    weighted, total = np.zeros(n_slices), np.zeros(n_slices)
    for number, factor in enumerate(factors):  # each bed's share of every slice, stitched as the images are
        share = _stitch([np.full(shape, float(n == number), dtype=np.float32) for n in range(len(factors))], study.beds)[0].astype(np.float64)
        weighted += share[0, 0, :] * factor
        total += share[0, 0, :]
    covering = np.array([_bed_of_slice(study, k) for k in range(n_slices)])  # the end slices the stitching blanks
    return [float(v) for v in np.where(total > 0, weighted / np.maximum(total, 1e-12), np.asarray(factors)[covering])]


def _bed_of_slice(study: Study, k: int) -> int:
    z = study.beds[0].affine[2, 3] + k * study.beds[0].object_spacing_mm[2]
    starts = [bed.affine[2, 3] for bed in study.beds]
    return max([n for n, start in enumerate(starts) if start <= z + 1e-6] or [0])


def _window_dict(window):
    return None if window is None else {"index": window.index, "lower_keV": window.lower_keV,
                                        "upper_keV": window.upper_keV, "name": window.name}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "pytomography", "pydicom", "numpy", "SimpleITK"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def ct_on_grid(study: Study, volume: Volume) -> np.ndarray | None:
    """The CT in HU on the result's grid, for previews."""
    if study.ct is None:
        return None
    return resample(study.ct.volume, volume.affine, volume.array.shape, cval=-1000.0)


def describe_study(study: Study) -> str:
    """A few lines a physicist reads to check that the right study and settings were used."""
    lines = []
    for bed in study.beds:
        angles = bed.angles_deg
        lines.append(
            f"- {Path(bed.path).name}: {bed.manufacturer or 'unknown maker'} {bed.model}, {bed.n_views} views over "
            f"{angles.max() - angles.min() + np.median(np.diff(angles)):.0f} deg, {bed.n_detectors} detector(s), "
            f"rotation {'/'.join(bed.rotation_directions)}, radius {bed.radii_cm.min() * 10:.0f}-{bed.radii_cm.max() * 10:.0f} mm, "
            f"{bed.projections.shape[2]}x{bed.projections.shape[3]} pixels of {bed.pixel_mm[0]:.2f} mm, "
            f"{bed.frame_duration_s:g} s per view, collimator '{bed.collimator}'")
    lines.append(f"- isotope: {study.isotope.name}; collimator {study.collimator.name} ({study.collimator.code})")
    for windows in study.peaks:
        peak = study.beds[0].projections[windows.peak.index]
        lines.append(f"- windows: {windows.describe()}; {float(peak.sum()):.4g} photopeak counts in bed 1")
    if study.ct:
        shape = study.ct.volume.array.shape
        lines.append(f"- CT: {len(study.ct.files)} slices, {shape[0]}x{shape[1]}, "
                     f"{study.ct.volume.spacing[0]:.2f} x {study.ct.volume.spacing[1]:.2f} x {study.ct.volume.spacing[2]:.2f} mm, {study.ct.model}")
    return "\n".join(lines)


def result_name(settings: Settings, params: dict) -> str:
    if settings.name:
        return settings.name
    short = {"iterations": "it", "subsets": "ss", "beta": "b"}
    parts = [f"{value}{short[key]}" for key, value in params.items() if key in short]
    return "_".join([settings.method] + parts)


def write_results(volume: Volume, provenance: dict, study: Study, settings: Settings, out_dir,
                  truth: dict | None = None) -> dict:
    """The result set (image files, provenance, preview, report) as one folder in ``out_dir``, written as a whole.

    A set appears in one rename, so a killed run leaves the old complete set or the new one; a
    default name that is taken gets a number, a given one is refused unless overwriting.
    """
    from .atomic import result_set

    name = result_name(settings, provenance["params"])
    try:
        with result_set(check_output_folder(out_dir), name, numbered=settings.name is None,
                        overwrite=settings.overwrite) as result:
            return _write_set(volume, provenance, study, settings, result, truth)
    except OSError as error:
        raise SSPECTError(f"Writing the result into {out_dir} failed ({error.strerror or error}); "
                          "free space on that disk or choose another output folder.") from None


def _write_set(volume: Volume, provenance: dict, study: Study, settings: Settings, result, truth) -> dict:
    from .atomic import write_json_atomic
    from .io.dicom_export import write_dicom_series
    from .io.volume_files import write_nifti, write_nrrd
    from .report import write_preview, write_report

    name = result.name
    files = {}  # where each file will be once the set is in place

    def place(kind: str, file_name: str) -> Path:
        files[kind] = str(result.folder / file_name)
        return result.temporary / file_name

    if "nrrd" in settings.formats:
        write_nrrd(volume, place("nrrd", f"{name}.nrrd"))
    if "nifti" in settings.formats:
        write_nifti(volume, place("nifti", f"{name}.nii.gz"))
    if volume.uncertainty is not None:  # the method's voxel SD, beside the image in the first volume format asked
        sd = Volume(volume.uncertainty, volume.spacing, volume.origin, volume.direction, volume.unit)
        if "nrrd" in settings.formats or "nifti" not in settings.formats:
            write_nrrd(sd, place("uncertainty", f"{name}_uncertainty.nrrd"))
        else:
            write_nifti(sd, place("uncertainty", f"{name}_uncertainty.nii.gz"))
    if "dicom" in settings.formats:
        first = study.beds[0]
        write_dicom_series(volume, place("dicom", f"{name}_dicom"), reference_nm_path=first.path, overwrite=True, metadata={
            "reconstruction_method": f"{provenance['method_title']} ({', '.join(f'{k}={v}' for k, v in provenance['params'].items())})",
            "corrections": provenance["corrections"], "radionuclide": study.isotope.radionuclide_metadata(),
            "frame_of_reference_uid": (study.ct.frame_of_reference_uid if study.ct else "") or first.frame_of_reference_uid,
            "decay_correction": study.decay.dicom_term, "decay_factor": slice_decay_factors(study, volume.array.shape[2]),
            **{key: getattr(settings, key) for key in ("acquisition_datetime", "injection_datetime", "injected_activity_MBq")
               if getattr(settings, key) is not None},
            "acquisition_duration_s": acquisition_duration_s(first)},
            series_description=f"sspect {name} [{volume.unit}]")
    write_preview(volume, ct_on_grid(study, volume), place("preview", f"{name}_preview.png"), f"{provenance['method_title']} [{volume.unit}]")
    provenance_path = place("provenance", f"{name}_provenance.json")
    report_path = place("report", f"{name}_report.md")
    provenance = {**provenance, "files": files}
    write_json_atomic(provenance_path, provenance)
    write_report(report_path, provenance, volume, files, describe_study(study), truth)
    return files


def run(nm_paths, ct_source, settings: Settings, out_dir, events: Events | None = None) -> dict:
    """The whole job: load, reconstruct, write; returns the written files and the provenance."""
    events = events or Events()
    from .atomic import check_name_free

    check_settings(settings)
    out = check_output_folder(out_dir)
    if settings.name is not None:
        check_name_free(out, settings.name, overwrite=settings.overwrite)
    study = load_study(nm_paths, ct_source, settings)
    settings = with_stored_calibration(study, settings)
    check_room(out, study, settings)
    for warning in study.warnings:
        events.emit("warning", message=warning)
    volume, provenance = reconstruct_study(study, settings, events)
    files = write_results(volume, provenance, study, settings, out_dir)
    return {"files": files, "unit": volume.unit, "provenance": provenance}
