"""The door between Slicer (or any caller) and the engine: a job file in, JSON lines out.

Job file (JSON)::

    {"version": 1,
     "nm": ["/path/bed1.dcm", ...],          # one NM TOMO file per bed
     "ct": "/path/ct_folder" | [files] | null,
     "output_dir": "/path/out",
     "method": "osem", "params": {"iterations": 4, "subsets": 6},
     "windows": {"peak": null, "lower": null, "upper": null},   # index, "low-high" keV, "none"
     "collimator": null, "calibration_cps_per_MBq": null,
     "isotope": null,                        # optional: "177Lu", "99mTc", "111In", "131I"; null: from the file
     "photopeaks": null,                     # optional: keV list such as [113, 208]; null: the isotope's default
     "device": "auto", "seed": 0, "formats": ["nrrd", "dicom"], "name": null,
     "detector_binning": 1,                  # optional: 2 sums 2x2 detector pixels (one bed)
     "projector": "fast"}                    # optional: "pytomography" for PyTomography's own (reference) model

Events, one JSON object per line on stdout, nothing else on stdout::

    {"event": "start", "job": ...}
    {"event": "warning", "message": ...}
    {"event": "progress", "fraction": 0.4, "iteration": 2, "subset": 3, "message": ...}
    {"event": "result", "files": {...}, "unit": "Bq/mL", "provenance": {...}}
    {"event": "error", "message": "one sentence"}

Result files are written atomically, so a killed job leaves no half-written file.
"""
from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path

from .errors import SSPECTError
from .methods import Cancelled, Events
from .pipeline import Settings, run

JOB_VERSION = 1
JOB_KEYS = {"version", "nm", "ct", "output_dir", "method", "params", "windows", "collimator",
            "calibration_cps_per_MBq", "device", "seed", "formats", "name", "detector_binning",
            "projector", "isotope", "photopeaks"}
WINDOW_KEYS = {"peak", "lower", "upper"}


def read_job(path) -> dict:
    try:
        job = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SSPECTError(f"The job file {path} does not exist.") from None
    except (OSError, ValueError) as error:
        raise SSPECTError(f"The job file {path} is not valid JSON ({error}).") from None
    if not isinstance(job, dict):
        raise SSPECTError(f"The job file {path} must hold a JSON object.")
    unknown = sorted(set(job) - JOB_KEYS)
    if unknown:
        raise SSPECTError(f"The job file has unknown keys {', '.join(unknown)}; the known keys are {', '.join(sorted(JOB_KEYS))}.")
    if job.get("version", JOB_VERSION) != JOB_VERSION:
        raise SSPECTError(f"The job file has version {job.get('version')}; this engine reads version {JOB_VERSION}.")
    for key in ("nm", "output_dir"):
        if not job.get(key):
            raise SSPECTError(f"The job file lacks '{key}'.")
    _check_value_types(job)
    return job


def _check_value_types(job: dict) -> None:
    """Values of the wrong JSON type are the caller's mistake, refused as such (not as an engine failure)."""
    windows = job.get("windows")
    if windows is not None and not isinstance(windows, dict):
        raise SSPECTError("The job's 'windows' must be an object with the keys peak, lower and upper.")
    unknown = sorted(set(windows or {}) - WINDOW_KEYS)
    if unknown:
        raise SSPECTError(f"The job's 'windows' has unknown keys {', '.join(unknown)}; the known keys are lower, peak and upper.")
    if job.get("params") is not None and not isinstance(job["params"], dict):
        raise SSPECTError("The job's 'params' must be an object of parameter names and values, such as {\"iterations\": 4}.")
    seed = job.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SSPECTError(f"The job's 'seed' must be a whole number, not {json.dumps(seed)}.")
    projector = job.get("projector", "fast")
    if not isinstance(projector, str):
        raise SSPECTError(f"The job's 'projector' must be \"fast\" or \"pytomography\", not {json.dumps(projector)}.")
    isotope = job.get("isotope")
    if isotope is not None and not isinstance(isotope, str):
        raise SSPECTError(f"The job's 'isotope' must be a name such as \"177Lu\" or null, not {json.dumps(isotope)}.")
    photopeaks = job.get("photopeaks")
    if photopeaks is not None and not (isinstance(photopeaks, list) and photopeaks
                                       and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in photopeaks)):
        raise SSPECTError(f"The job's 'photopeaks' must be a list of keV values such as [113, 208] or null, not {json.dumps(photopeaks)}.")
    formats = job.get("formats")
    if formats is not None and not (isinstance(formats, list) and all(isinstance(f, str) for f in formats)):
        raise SSPECTError("The job's 'formats' must be a list of names such as [\"nrrd\", \"dicom\"].")


def settings_from_job(job: dict) -> Settings:
    windows = job.get("windows") or {}
    return Settings(
        method=job.get("method", "osem"), params=job.get("params") or {},
        peak_window=windows.get("peak"), lower_window=windows.get("lower"), upper_window=windows.get("upper"),
        collimator=job.get("collimator"), isotope=job.get("isotope"), photopeaks=job.get("photopeaks"), calibration_cps_per_MBq=job.get("calibration_cps_per_MBq"),
        device=job.get("device", "auto"), seed=int(job.get("seed", 0)),
        formats=tuple(job.get("formats") or Settings.formats), name=job.get("name"),
        detector_binning=job.get("detector_binning", 1), projector=job.get("projector", "fast"))


def run_job(path, stream=None) -> int:
    """Run a job file, writing events as JSON lines; returns the process exit code."""
    stream = stream or sys.stdout

    def emit(event: dict) -> None:
        stream.write(json.dumps(event, default=str) + "\n")
        stream.flush()

    # Libraries that print (PyTomography does) must not corrupt the event stream.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            job = read_job(path)
            emit({"event": "start", "job": job})
            result = run(job["nm"], job.get("ct"), settings_from_job(job), job["output_dir"], Events(emit))
            emit({"event": "result", **result})
            return 0
        except SSPECTError as error:
            emit({"event": "error", "message": str(error)})
            return 2
        except (KeyboardInterrupt, Cancelled):
            emit({"event": "error", "message": "The job was cancelled; result files already complete were kept and none was left half-written."})
            return 130
        except Exception as error:  # an engine bug: one sentence for the user, the trace on stderr
            traceback.print_exc(file=sys.stderr)
            emit({"event": "error", "message": f"The engine failed unexpectedly ({type(error).__name__}: {error}); please report this with the job file."})
            return 3
