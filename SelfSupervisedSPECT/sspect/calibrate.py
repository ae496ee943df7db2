"""The sensitivity (cps/MBq) from a phantom of known activity, reconstructed as patients are.

As OpenDose3D's calibration step: a phantom (a cylinder, or a point source in air or water)
holding a dose-calibrator-measured activity is scanned and reconstructed with the protocol of
the patient studies; the sensitivity is the image's total (counts per view, PyTomography's
scale) over the frame duration and the activity present during the acquisition. Reconstructing
with the same corrections makes the factor absorb what they leave over (scatter, the
collimator's penetration), which is why it is stored with the method it was measured with.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from . import __version__
from .decay import acquisition_duration_s, acquisition_starts, mean_to_start, seconds_between
from .errors import SSPECTError
from .io.calibrations import check_calibration_free, check_calibration_name, save_calibration
from .methods import Events
from .pipeline import Settings, check_output_folder, check_settings, load_study, reconstruct_study, write_results


def phantom_activity_MBq(activity_MBq: float, measured_at: datetime | None, acquired_at: datetime | None,
                         half_life_s: float, duration_s: float) -> float:
    """The mean activity during the acquisition, from the activity measured at ``measured_at``
    (None: at the acquisition start)."""
    elapsed = 0.0 if measured_at is None else seconds_between(acquired_at, measured_at)
    return activity_MBq * 2.0 ** (-elapsed / half_life_s) / mean_to_start(half_life_s, duration_s)


def calibrate(nm_path, ct_source, settings: Settings, out_dir, name: str, activity_MBq: float,
              activity_datetime: str | None = None, events: Events | None = None) -> dict:
    """Reconstruct the phantom in counts, measure its sensitivity, store it as ``name``.

    Returns the record stored and the phantom's result files (for checking the image).
    """
    events = events or Events()
    check_calibration_name(name)
    check_calibration_free(name, settings.overwrite)  # before any work; storing checks again
    if not (isinstance(activity_MBq, (int, float)) and 0 < activity_MBq < float("inf")):
        raise SSPECTError(f"The phantom's activity must be a positive finite number of MBq, not {activity_MBq!r}.")
    measured_at = _moment(activity_datetime, "phantom activity date and time") if activity_datetime else None
    settings = replace(settings, calibration_cps_per_MBq=None, calibration_name=None, decay_correction="none")
    check_settings(settings)
    check_output_folder(out_dir)
    study = load_study([nm_path], ct_source, settings)
    bed = study.beds[0]
    acquired_at = acquisition_starts([bed], settings.acquisition_datetime)[0]
    if measured_at is not None and acquired_at is None:
        raise SSPECTError("The phantom's activity was measured at a given time but the projection file gives no acquisition "
                          "date and time; give it (--acquisition-datetime).")
    if measured_at is not None and seconds_between(acquired_at, measured_at) < 0:
        raise SSPECTError(f"The phantom's activity was measured ({measured_at.isoformat()}) after the acquisition started "
                          f"({acquired_at.isoformat()}); check the dates.")
    for warning in study.warnings:
        events.emit("warning", message=warning)
    image, provenance = reconstruct_study(study, settings, events)
    total = float(image.array.sum(dtype="float64"))
    duration = acquisition_duration_s(bed)
    present = phantom_activity_MBq(activity_MBq, measured_at, acquired_at, study.isotope.half_life_s, duration)
    sensitivity = total / (bed.frame_duration_s * present)
    if not sensitivity > 0:
        raise SSPECTError("The phantom's image holds no counts; check that this is the phantom's projection file and photopeak window.")
    record = {
        "name": name, "cps_per_MBq": sensitivity, "isotope": study.isotope.name, "collimator": study.collimator.name,
        "photopeaks_keV": [w.photopeak_keV for w in study.peaks], "method": provenance["method"], "params": provenance["params"],
        "corrections": provenance["corrections"], "scatter_smoothing_cm": study.scatter_smoothing_cm,
        "phantom": {"nm": str(nm_path), "activity_MBq": activity_MBq,
                    "activity_datetime": measured_at.isoformat() if measured_at else None,
                    "acquisition_datetime": acquired_at.isoformat() if acquired_at else None,
                    "acquisition_duration_s": duration, "mean_activity_MBq": present,
                    "image_total_counts_per_view": total, "frame_duration_s": bed.frame_duration_s},
        "created": datetime.now().isoformat(timespec="seconds"), "sspect": __version__,
    }
    files = write_results(image, {**provenance, "calibration_measured": record}, study, settings, out_dir)
    path = save_calibration(record, overwrite=settings.overwrite)
    return {"calibration": record, "store": str(path), "files": files, "unit": image.unit}


def _moment(text: str, label: str) -> datetime:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        raise SSPECTError(f"The {label} {text!r} is not a date and time; give it as 2024-03-01T10:30:00.") from None
