"""The door between Slicer (or any caller) and the engine: a job file in, JSON lines out.

Job file (JSON)::

    {"version": 1,
     "nm": ["/path/bed1.dcm", ...],          # one NM TOMO file per bed
     "ct": "/path/ct_folder" | [files] | null,
     "output_dir": "/path/out",
     "method": "osem", "params": {"iterations": 4, "subsets": 6},
     "windows": {"peak": null, "lower": null, "upper": null},   # index, "low-high" keV, "none"
     "collimator": null, "calibration_cps_per_MBq": null,
     "calibration": null,                    # or the name of a sensitivity stored by `sspect calibrate`
     "isotope": null,                        # optional: "177Lu", "99mTc", "111In", "131I"; null: from the file
     "photopeaks": null,                     # optional: keV list such as [113, 208]; null: the isotope's default
     "device": "auto", "seed": 0, "formats": ["nrrd", "dicom"],
     "name": null,                           # the result folder's name; null: from the method, numbered when taken
     "overwrite": false,                     # true: a given name that is taken is replaced (else refused)
     "acquisition_datetime": null,           # ISO, for a file that lacks it; the next two win over the file's
     "injection_datetime": null, "injected_activity_MBq": null,
     "decay_correction": "none",             # "start": to the acquisition start, "injection": to the injection
     "detector_binning": 1,                  # optional: 2 sums 2x2 detector pixels (one bed)
     "scatter_smoothing_cm": 1.0,            # optional: sigma of the scatter-window estimate; 0: unsmoothed
     "projector": "fast"}                    # optional: "pytomography" for PyTomography's own (reference) model

A calibrate job (``"task": "calibrate"``) takes one phantom file in ``nm`` and
``"phantom": {"name": ..., "activity_MBq": ..., "activity_datetime": ISO or null}``; it
reconstructs the phantom in counts, stores the measured sensitivity under that name, and its
result event adds ``"calibration"`` (the record) and ``"store"`` (the file).

The ``Job`` model below is the schema: the keys above and no others, each of its JSON type
(strict: "4" is not 4, true is not 1; ``nm`` is a list even for one bed), ``version`` the number 1,
no NaN or Infinity. Only ``nm`` and ``output_dir`` are required. Value ranges (method parameters,
device, formats, isotope, calibration > 0, ...) are checked by ``pipeline.check_settings``. Every
problem with the file is one sentence naming the key, such as "The job's 'windows.peak' must
be ...", and exit code 2.

Events, one JSON object per line on stdout, nothing else on stdout::

    {"event": "start", "job": ...}
    {"event": "warning", "message": ...}
    {"event": "progress", "fraction": 0.4, "iteration": 2, "subset": 3, "message": ...}
    {"event": "result", "files": {...}, "unit": "Bq/mL", "provenance": {...}}
    {"event": "error", "message": "one sentence"}

The result is one folder, ``output_dir/<name>/``, renamed into place once complete, so a
killed job leaves the old complete result or the new one. Exit codes: 0 done, 2 refused (one
sentence), 3 an engine bug, 130 cancelled, 143 stopped by SIGTERM.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import traceback
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import TERMINATED_EXIT_CODE, SSPECTError, Terminated
from .methods import Cancelled, Events
from .pipeline import Settings, run

JOB_VERSION = 1
JOB_FILE_MAX_BYTES = 4 * 2**20  # a job is kilobytes (a CT of 3000 files: under 1 MiB); more is the wrong file
# Strict: a JSON "4" is not 4 and true is not 1; a number given for a float may be written 3 or 3.0.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Text = Annotated[str, Field(min_length=1)]
Scalar = Union[bool, int, float, str, None]


class Windows(BaseModel):
    """Energy windows by role; null lets the engine choose from the file."""

    model_config = STRICT
    peak: Union[int, str, None] = Field(None, description='a window index, a keV range such as "187-229" or null')
    lower: Union[int, str, None] = Field(None, description='a window index, a keV range such as "166-186", "none" or null')
    upper: Union[int, str, None] = Field(None, description='a window index, a keV range such as "229-250", "none" or null')


class Phantom(BaseModel):
    """A calibration job's phantom: its activity and the name its sensitivity is stored under."""

    model_config = STRICT
    name: Text = Field(description="the calibration's name, such as \"GE670 MEGP 177Lu\"")
    activity_MBq: float = Field(description="a number of MBq")
    activity_datetime: Optional[str] = Field(None, description='an ISO date and time such as "2024-03-01T09:00:00" or null')


class Job(BaseModel):
    """The job file's keys and JSON types; value ranges are the pipeline's to check (check_settings).

    Each description is the words an error sentence uses for what the key must be. ``nm`` is a
    list even for one bed, as the Slicer module writes it, so a job has one shape.
    """

    model_config = STRICT
    # a strict int in 1..1, not Literal[1]: pydantic's Literal[1] takes true and 1.0 even when strict
    version: int = Field(JOB_VERSION, ge=JOB_VERSION, le=JOB_VERSION, description=f"the number {JOB_VERSION}")
    task: Literal["reconstruct", "calibrate"] = Field("reconstruct", description='"reconstruct" or "calibrate"')
    phantom: Optional[Phantom] = Field(None, description="an object with the keys name, activity_MBq and activity_datetime (a calibrate job's)")
    nm: list[Text] = Field(min_length=1, description='a list of NM projection files, one per bed, such as ["/data/bed1.dcm"]')
    ct: Union[Text, Annotated[list[Text], Field(min_length=1)], None] = Field(
        None, description="a CT folder, a list of CT files or null")
    output_dir: Text = Field(description="the path of the folder for the result files")
    method: str = Field("osem", description='a method name such as "osem"')
    params: dict[str, Union[Scalar, list[Scalar]]] = Field(
        default_factory=dict, description='an object of parameter names and values such as {"iterations": 4}')
    windows: Optional[Windows] = Field(None, description="an object with the keys peak, lower and upper, or null")
    collimator: Optional[str] = Field(None, description='a collimator name such as "GE-MEGP" or null')
    isotope: Optional[str] = Field(None, description='a name such as "177Lu" or null')
    photopeaks: Optional[Annotated[list[float], Field(min_length=1)]] = Field(
        None, description="a list of keV values such as [113, 208] or null")
    calibration_cps_per_MBq: Optional[float] = Field(None, description="a number of counts per second per MBq or null")
    calibration: Optional[str] = Field(None, description="the name of a calibration stored by `sspect calibrate`, or null")
    device: str = Field("auto", description='"auto", "cpu" or "cuda"')
    seed: int = Field(0, description="a whole number")
    formats: list[str] = Field(default_factory=lambda: list(Settings.formats), description='a list of names such as ["nrrd", "dicom"]')
    name: Optional[str] = Field(None, description="a file name for the results or null")
    detector_binning: int = Field(1, description="a whole number such as 1 or 2")
    projector: str = Field("fast", description='"fast" or "pytomography"')
    overwrite: bool = Field(False, description="true or false")
    acquisition_datetime: Optional[str] = Field(None, description='an ISO date and time such as "2024-03-01T10:30:00" or null')
    injection_datetime: Optional[str] = Field(None, description='an ISO date and time such as "2024-02-28T09:00:00" or null')
    injected_activity_MBq: Optional[float] = Field(None, description="a number of MBq or null")
    decay_correction: str = Field("none", description='"none", "start" or "injection"')
    scatter_smoothing_cm: float = Field(Settings.scatter_smoothing_cm, description="a number of cm such as 1 (0: unsmoothed)")


JOB_KEYS = frozenset(Job.model_fields)
MODELS = {(): Job, ("windows",): Windows, ("phantom",): Phantom}  # where in a job an object has keys of its own
# words for what pydantic wanted inside a key (a key's own words are its description)
TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
              "list_type": "a list", "string_too_short": "a non-empty string"}


def read_job(path) -> Job:
    """The job file, parsed and type-checked; any problem is one SSPECTError sentence."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise SSPECTError(f"The job file {_path(path)} must hold a JSON object such as {{\"nm\": [...], \"output_dir\": ...}}, "
                          f"not {_shown(data)}.")
    try:
        return Job.model_validate(data)
    except ValidationError as error:
        raise SSPECTError(_sentence(error.errors(include_url=False), data)) from None


def _read_json(path):
    """The file's JSON; whatever is wrong with the file itself is one sentence too."""
    shown = _path(path)
    try:
        with open(path, "rb") as file:
            data = file.read(JOB_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        raise SSPECTError(f"The job file {shown} does not exist.") from None
    except IsADirectoryError:
        raise SSPECTError(f"The job file {shown} is a folder; give the path of the job's JSON file.") from None
    except PermissionError:
        raise SSPECTError(f"The job file {shown} cannot be read (permission denied); allow reading it or write the job elsewhere.") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        cause = getattr(error, "strerror", None) or error
        raise SSPECTError(f"The job file {shown} cannot be read ({cause}); check its path.") from None
    if len(data) > JOB_FILE_MAX_BYTES:
        raise SSPECTError(f"The job file {shown} is larger than {JOB_FILE_MAX_BYTES // 2**20} MiB, far more than a job; "
                          "check that it is the job file.")
    try:
        text = data.decode("utf-8-sig")  # a byte order mark, as some editors write, is no error
    except UnicodeDecodeError as error:
        raise SSPECTError(f"The job file {shown} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_double_int,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise SSPECTError(f"The job file {shown} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from None
    except RecursionError:
        raise SSPECTError(f"The job file {shown} is nested too deeply to be a job; check that it is the job file.") from None


# JSON has no NaN or infinity and its numbers are doubles, though Python's json reads "NaN" and 1e999.
def _refuse_constant(word: str):
    raise SSPECTError(f"The job file holds {word}, which is not a JSON number; write a number or null.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _too_large(text)
    return value


def _double_int(text: str) -> int:
    if len(text) > 310 or abs(int(text)) > sys.float_info.max:  # the length test spares int() thousands of digits
        _too_large(text)
    return int(text)


def _too_large(text: str):
    shown = text if len(text) <= 20 else text[:20] + "..."
    raise SSPECTError(f"The job file holds the number {shown}, too large for JSON; write a smaller number.")


def _unique_keys(pairs: list) -> dict:
    """Python's json keeps the last of two equal keys; a job that says two things is refused instead."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise SSPECTError(f"The job file gives the key '{_key(key)}' more than once; keep one.")
        seen.add(key)
    return dict(pairs)


def _sentence(errors: list[dict], data: dict) -> str:
    """pydantic's errors as one sentence: the first problem, by key path, and how many more there are."""
    problems: dict[tuple, list[dict]] = {}
    for error in errors:
        problems.setdefault(_user_path(error, data), []).append(error)
    # a union reports every member; one that got deeper (into a list) says more than those refused at the key
    deeper = {path[:end] for path in problems for end in range(1, len(path))}
    paths = [p for p in problems if p not in deeper]
    path = paths[0]
    kinds = [error["type"] for error in problems[path]]
    if kinds[0] == "extra_forbidden":
        parent = path[:-1]
        unknown = [p[-1] for p in paths if p[:-1] == parent and problems[p][0]["type"] == "extra_forbidden"]
        names = ", ".join("'" + _key(k) + "'" for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        known = ", ".join(sorted(MODELS[parent].model_fields))
        where = "The job file has" if not parent else f"The job's '{_dotted(parent)}' has"
        sentence = f"{where} unknown {'key' if len(unknown) == 1 else 'keys'} {names}; the known keys are {known}"
        rest = len(paths) - len(unknown)
    elif kinds[0] == "missing":
        sentence, rest = f"The job file lacks '{_dotted(path)}', which must be {_expected(path, kinds)}", len(paths) - 1
    else:
        sentence = f"The job's '{_dotted(path)}' must be {_expected(path, kinds)}, not {_shown(problems[path][0]['input'])}"
        rest = len(paths) - 1
    return sentence + (f" (the job file has {rest} more {'problem' if rest == 1 else 'problems'})." if rest else ".")


def _user_path(error: dict, data) -> tuple:
    """The error's place in the job as written: pydantic's location less its union member names ('list[str]')."""
    loc = error["loc"][:-1] if error["type"] == "missing" else error["loc"]
    path, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int):
            path.append(part)
            node = node[part]
    return tuple(path) + error["loc"][len(loc):]


def _expected(path: tuple, kinds: list[str]) -> str:
    """What a key must be: its own description, else the JSON types pydantic wanted, else its key's description."""
    model = MODELS.get(path[:-1])
    if model is not None and path[-1] in model.model_fields:
        return model.model_fields[path[-1]].description
    words = list(dict.fromkeys(TYPE_WORDS[kind] for kind in kinds if kind in TYPE_WORDS))
    if "a number" in words and "a whole number" in words:
        words.remove("a whole number")
    if words:
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    return Job.model_fields[path[0]].description


def _dotted(path: tuple) -> str:
    """('windows', 'peak') -> windows.peak, ('nm', 0) -> nm[0]; odd keys quoted, so the sentence stays one line."""
    text = _key(path[0])
    for part in path[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if part.isidentifier() else f'["{_key(part)}"]'
    return text


def _path(path) -> str:
    """The path as given, its control characters escaped so that the sentence stays one line."""
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in str(path))


def _key(key: str) -> str:
    return json.dumps(key[:40])[1:-1] + ("..." if len(key) > 40 else "")


def _shown(value) -> str:
    """A JSON value in a few words: strings and numbers shown, objects and lists named."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return "the string " + json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text[:20]}" + ("..." if len(text) > 20 else "")
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "an object" if value else "an empty object"


def settings_from_job(job: Job) -> Settings:
    """The pipeline's settings from a checked job; a key the job leaves out keeps its default."""
    windows = job.windows or Windows()
    return Settings(
        method=job.method, params=dict(job.params),
        peak_window=windows.peak, lower_window=windows.lower, upper_window=windows.upper,
        collimator=job.collimator, isotope=job.isotope, photopeaks=tuple(job.photopeaks) if job.photopeaks else None,
        calibration_cps_per_MBq=job.calibration_cps_per_MBq, calibration_name=job.calibration, device=job.device, seed=job.seed,
        formats=tuple(job.formats) or Settings.formats, name=job.name,
        detector_binning=job.detector_binning, projector=job.projector, overwrite=job.overwrite,
        acquisition_datetime=job.acquisition_datetime, injection_datetime=job.injection_datetime,
        injected_activity_MBq=job.injected_activity_MBq, decay_correction=job.decay_correction,
        scatter_smoothing_cm=job.scatter_smoothing_cm)


def _run_task(job: Job, events: Events) -> dict:
    if job.task == "reconstruct":
        if job.phantom is not None:
            raise SSPECTError("The job's 'phantom' belongs to a calibrate job; remove it or set 'task' to \"calibrate\".")
        return run(job.nm, job.ct, settings_from_job(job), job.output_dir, events)
    from .calibrate import calibrate

    if job.phantom is None:
        raise SSPECTError("A calibrate job needs 'phantom', an object with the keys name, activity_MBq and activity_datetime.")
    if len(job.nm) != 1:
        raise SSPECTError(f"A calibrate job takes one phantom projection file in 'nm', not {len(job.nm)}.")
    if job.calibration is not None or job.calibration_cps_per_MBq is not None:
        raise SSPECTError("A calibrate job measures the sensitivity; remove 'calibration' and 'calibration_cps_per_MBq'.")
    return calibrate(job.nm[0], job.ct, settings_from_job(job), job.output_dir, job.phantom.name,
                     job.phantom.activity_MBq, job.phantom.activity_datetime, events)


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
            emit({"event": "start", "job": job.model_dump(exclude_unset=True)})
            result = _run_task(job, Events(emit))
            emit({"event": "result", **result})
            return 0
        except SSPECTError as error:
            emit({"event": "error", "message": str(error)})
            return 2
        except Terminated:
            emit({"event": "error", "message": "The job was stopped by SIGTERM; result files already complete were kept and none was left half-written."})
            return TERMINATED_EXIT_CODE
        except (KeyboardInterrupt, Cancelled):
            emit({"event": "error", "message": "The job was cancelled; result files already complete were kept and none was left half-written."})
            return 130
        except Exception as error:  # an engine bug: one sentence for the user, the trace on stderr
            traceback.print_exc(file=sys.stderr)
            emit({"event": "error", "message": f"The engine failed unexpectedly ({type(error).__name__}: {error}); please report this with the job file."})
            return 3
