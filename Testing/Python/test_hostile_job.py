"""Hostile job files through the real door, `sspect.jobs.run_job`: each is refused in one sentence.

The job file is the only thing the Slicer module (or a script, or a person with an editor) hands
the engine, so whatever it holds, the engine must answer with exit code 2 and exactly one `error`
event that names the key and what it must be: never a traceback, never "failed unexpectedly"
(exit 3, kept for engine bugs), never a half-started reconstruction. Type and structure problems
are refused before the `start` event, so the corpus runs no reconstruction and is fast. One valid
job, shaped as the Slicer module writes it, runs to the end; the module's own `build_job` output
is read back through the schema; and a property test throws random JSON at every key.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sspect.errors import SSPECTError
from sspect.jobs import JOB_FILE_MAX_BYTES, JOB_KEYS, read_job, run_job, settings_from_job
from sspect.pipeline import check_settings

MODULE_DIR = Path(__file__).resolve().parents[2] / "SelfSupervisedSPECT"
DELETE = object()  # a change that removes the key
RESULT_SUFFIXES = (".nrrd", ".nii.gz", ".json", ".png", ".md")


def valid_job(small_study, out_dir: Path) -> dict:
    """Every key, as SelfSupervisedSPECTLib.logic.build_job writes them (CT as a list of files, formats ["nrrd"])."""
    return {"version": 1, "nm": [str(small_study["nm"])], "ct": [str(p) for p in small_study["ct_files"]],
            "output_dir": str(out_dir), "method": "osem", "params": {"iterations": 1, "subsets": 2},
            "windows": {"peak": None, "lower": None, "upper": None}, "collimator": None,
            "calibration_cps_per_MBq": small_study["sensitivity_cps_per_mbq"], "device": "cpu", "seed": 0,
            "detector_binning": 1, "projector": "fast", "isotope": "177Lu", "photopeaks": [208.0],
            "formats": ["nrrd"], "name": None}


def mutated(job: dict, changes: dict) -> dict:
    """A copy of ``job`` with ``changes``: "windows.peak" reaches into an object, DELETE removes the key."""
    job = json.loads(json.dumps(job))
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = job
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return job


def door(path, capsys) -> tuple[int, list[dict], str]:
    """Run the job file through run_job; every line it writes must be one JSON event."""
    stream = io.StringIO()
    code = run_job(path, stream)
    events = []
    for line in stream.getvalue().splitlines():
        event = json.loads(line)
        assert isinstance(event, dict) and "event" in event, line[:200]
        events.append(event)
    return code, events, capsys.readouterr().err


def assert_one_sentence(message: str) -> None:
    assert isinstance(message, str) and message and message.strip() == message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert message.endswith("."), message
    assert not re.search(r"[.;:!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message}"
    assert "failed unexpectedly" not in message and "pydantic" not in message.lower(), message


def assert_refused(path, capsys, words, out_dir: Path) -> str:
    """Exit 2, only one error event (nothing started), one sentence with ``words``, no result files."""
    code, events, stderr = door(path, capsys)
    assert code == 2, (code, events, stderr[-2000:])
    assert [e["event"] for e in events] == ["error"], events
    message = events[0]["message"]
    assert_one_sentence(message)
    for word in words:
        assert word in message, (word, message)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not out_dir.exists() or not [p for p in out_dir.rglob("*") if p.name.endswith(RESULT_SUFFIXES)]
    return message


# ---------------------------------------------------------------- wrong types and structure
TYPE_CASES = [  # (what, changes to the valid job, words the sentence must hold)
    ("version as a string", {"version": "1"}, ["The job's 'version' must be the number 1, not the string \"1\"."]),
    ("version 2", {"version": 2}, ["'version'", "the number 1", "not the number 2"]),
    ("version true", {"version": True}, ["'version'", "not true"]),
    ("version 1.0", {"version": 1.0}, ["'version'", "the number 1"]),
    ("nm missing", {"nm": DELETE}, ["lacks 'nm'", "list of NM projection files"]),
    ("nm one string", {"nm": "bed1.dcm"}, ["'nm'", "a list", 'not the string "bed1.dcm"']),
    ("nm empty list", {"nm": []}, ["'nm'", "not an empty list"]),
    ("nm number item", {"nm": [3]}, ["'nm[0]'", "a string", "not the number 3"]),
    ("nm empty path", {"nm": [""]}, ["'nm[0]'", "non-empty string"]),
    ("nm nested list", {"nm": [["bed1.dcm"]]}, ["'nm[0]'", "not a list"]),
    ("ct number", {"ct": 3}, ["'ct'", "CT folder", "list of CT files", "null"]),
    ("ct number in list", {"ct": ["ct1.dcm", 7]}, ["'ct[1]'", "a string"]),
    ("ct empty list", {"ct": []}, ["'ct'", "not an empty list"]),
    ("ct object", {"ct": {"folder": "CT"}}, ["'ct'", "not an object"]),
    ("output_dir missing", {"output_dir": DELETE}, ["lacks 'output_dir'", "folder"]),
    ("output_dir empty", {"output_dir": ""}, ["'output_dir'", 'not the string ""']),
    ("output_dir list", {"output_dir": ["out"]}, ["'output_dir'", "not a list"]),
    ("method number", {"method": 3}, ["'method'", "method name", "not the number 3"]),
    ("method null", {"method": None}, ["'method'", "not null"]),
    ("params list", {"params": [2, 4]}, ["'params'", "an object", "not a list"]),
    ("params value object", {"params.iterations": {"n": 1}}, ["'params.iterations'", "a number", "not an object"]),
    ("params value nested list", {"params.subsets": [[2]]}, ["'params.subsets[0]'", "not a list"]),
    ("windows list", {"windows": []}, ["'windows'", "peak, lower and upper", "not an empty list"]),
    ("windows unknown role", {"windows.photopeak": 0}, ["'windows' has unknown key 'photopeak'", "lower, peak, upper"]),
    ("window peak fraction", {"windows.peak": 1.5}, ["'windows.peak'", "window index", "not the number 1.5"]),
    ("window lower true", {"windows.lower": True}, ["'windows.lower'", "not true"]),
    ("window upper object", {"windows.upper": {}}, ["'windows.upper'", "not an empty object"]),
    ("collimator number", {"collimator": 5}, ["'collimator'", "collimator name"]),
    ("isotope number", {"isotope": 177}, ["'isotope'", "177Lu", "not the number 177"]),
    ("photopeaks text", {"photopeaks": "113,208"}, ["'photopeaks'", "list of keV values", 'not the string "113,208"']),
    ("photopeaks empty", {"photopeaks": []}, ["'photopeaks'", "not an empty list"]),
    ("photopeaks true", {"photopeaks": [True]}, ["'photopeaks[0]'", "a number", "not true"]),
    ("calibration text", {"calibration_cps_per_MBq": "5.0"}, ["'calibration_cps_per_MBq'", 'not the string "5.0"']),
    ("calibration true", {"calibration_cps_per_MBq": True}, ["'calibration_cps_per_MBq'", "not true"]),
    ("calibration list", {"calibration_cps_per_MBq": [5]}, ["'calibration_cps_per_MBq'", "not a list"]),
    ("device number", {"device": 0}, ["'device'", '"cpu"', "not the number 0"]),
    ("device null", {"device": None}, ["'device'", "not null"]),
    ("seed text", {"seed": "abc"}, ["The job's 'seed' must be a whole number, not the string \"abc\"."]),
    ("seed digits", {"seed": "4"}, ["'seed'", 'not the string "4"']),
    ("seed true", {"seed": True}, ["'seed'", "not true"]),
    ("seed fraction", {"seed": 2.5}, ["'seed'", "not the number 2.5"]),
    ("formats text", {"formats": "nrrd"}, ["'formats'", "a list", 'not the string "nrrd"']),
    ("formats number item", {"formats": ["nrrd", 1]}, ["'formats[1]'", "a string"]),
    ("name number", {"name": 3}, ["'name'", "file name"]),
    ("binning text", {"detector_binning": "2"}, ["'detector_binning'", 'not the string "2"']),
    ("binning 2.0", {"detector_binning": 2.0}, ["'detector_binning'", "whole number", "not the number 2.0"]),
    ("projector number", {"projector": 3}, ["'projector'", '"fast" or "pytomography"']),
    ("unknown keys", {"iterations": 3, "outdir": "x"}, ["unknown keys 'iterations', 'outdir'", "output_dir"]),
    ("key with a newline", {"bad\nkey": 1}, ["unknown key 'bad\\nkey'"]),
    ("two problems", {"device": 1, "seed": "x"}, ["'device'", "(the job file has 1 more problem)"]),
]


@pytest.mark.parametrize("changes, words", [case[1:] for case in TYPE_CASES], ids=[case[0] for case in TYPE_CASES])
def test_wrong_type_is_one_sentence_naming_the_key(small_study, tmp_path, capsys, changes, words):
    out_dir = tmp_path / "out"
    path = tmp_path / "job.json"
    path.write_text(json.dumps(mutated(valid_job(small_study, out_dir), changes)))
    assert_refused(path, capsys, words, out_dir)


# ---------------------------------------------------------------- files that are no JSON object
def _raw(job: dict, key: str, text: str) -> bytes:
    """The job as JSON with ``text`` written as it is for the value of ``key``."""
    return json.dumps({**job, key: "@raw@"}).replace('"@raw@"', text).encode()


FILE_CASES = [  # (what, the file's bytes from the valid job, words)
    ("not JSON", lambda job: b"{'nm': ['bed1.dcm'],", ["not valid JSON", "line 1, column 2"]),
    ("empty file", lambda job: b"", ["not valid JSON"]),
    ("truncated", lambda job: json.dumps(job)[:-5].encode(), ["not valid JSON"]),
    ("a list", lambda job: b"[1, 2, 3]", ["must hold a JSON object", "not a list"]),
    ("a string", lambda job: b'"job"', ["must hold a JSON object", 'not the string "job"']),
    ("null", lambda job: b"null", ["must hold a JSON object", "not null"]),
    ("deeply nested", lambda job: b"[" * 200_000 + b"]" * 200_000, ["nested too deeply"]),
    ("deeply nested value", lambda job: _raw(job, "params", "[" * 200_000 + "]" * 200_000), ["nested too deeply"]),
    ("NaN calibration", lambda job: json.dumps({**job, "calibration_cps_per_MBq": math.nan}).encode(), ["NaN", "not a JSON number"]),
    ("Infinity calibration", lambda job: json.dumps({**job, "calibration_cps_per_MBq": math.inf}).encode(), ["Infinity"]),
    ("-Infinity photopeak", lambda job: json.dumps({**job, "photopeaks": [-math.inf]}).encode(), ["-Infinity"]),
    ("1e999", lambda job: _raw(job, "photopeaks", "[1e999]"), ["1e999", "too large"]),
    ("400-digit seed", lambda job: _raw(job, "seed", "9" * 400), ["too large"]),
    ("5000-digit seed", lambda job: _raw(job, "seed", "9" * 5000), ["too large"]),
    ("key twice", lambda job: _raw(job, "seed", '0, "seed": 1'), ["'seed' more than once"]),
    ("Latin-1", lambda job: json.dumps({**job, "name": "r\u00e9sultat"}, ensure_ascii=False).encode("latin-1"),
     ["not UTF-8 text", "save it as UTF-8"]),
    ("UTF-16", lambda job: json.dumps(job).encode("utf-16"), ["not UTF-8 text"]),
    ("huge", lambda job: json.dumps({**job, "name": "x" * JOB_FILE_MAX_BYTES}).encode(), ["larger than", "MiB"]),
]


@pytest.mark.parametrize("content, words", [case[1:] for case in FILE_CASES], ids=[case[0] for case in FILE_CASES])
def test_file_that_is_not_a_job_object_is_one_sentence(small_study, tmp_path, capsys, content, words):
    out_dir = tmp_path / "out"
    path = tmp_path / "job.json"
    path.write_bytes(content(valid_job(small_study, out_dir)))
    assert_refused(path, capsys, words, out_dir)


def _under_a_file(folder: Path) -> Path:
    (folder / "plain.txt").write_text("{}")
    return folder / "plain.txt" / "job.json"


PATH_CASES = [  # (what, the job path made in a folder, words)
    ("missing", lambda folder: folder / "nowhere.json", ["does not exist"]),
    ("newline in a missing path", lambda folder: folder / "job\n.json", ["job\\n.json does not exist"]),
    ("a folder", lambda folder: folder, ["is a folder", "JSON file"]),
    ("under a file", _under_a_file, ["cannot be read", "check its path"]),
    ("name too long", lambda folder: folder / ("j" * 300 + ".json"), ["cannot be read"]),
    ("NUL in the path", lambda folder: str(folder / "job\0.json"), ["job\\u0000.json cannot be read"]),
]


@pytest.mark.parametrize("make_path, words", [case[1:] for case in PATH_CASES], ids=[case[0] for case in PATH_CASES])
def test_job_path_that_is_no_readable_file_is_one_sentence(tmp_path, capsys, make_path, words):
    assert_refused(make_path(tmp_path), capsys, words, tmp_path / "out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every file")
def test_unreadable_job_file_is_one_sentence(small_study, tmp_path, capsys):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(valid_job(small_study, tmp_path / "out")))
    path.chmod(0)
    try:
        assert_refused(path, capsys, ["permission denied"], tmp_path / "out")
    finally:
        path.chmod(0o600)


# ---------------------------------------------------------------- what the Slicer module writes
def test_valid_job_runs_to_the_end(small_study, tmp_path, capsys, one_torch_thread):
    job = valid_job(small_study, tmp_path / "out")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job, indent=2))
    code, events, stderr = door(path, capsys)
    assert code == 0, (events[-1], stderr[-3000:])
    assert events[0] == {"event": "start", "job": job}
    assert events[-1]["event"] == "result" and events[-1]["unit"] == "Bq/mL"
    files = events[-1]["files"]
    assert "nrrd" in files and "dicom" not in files and Path(files["nrrd"]).is_file()
    assert events[-1]["provenance"]["params"] == {"iterations": 1, "subsets": 2}
    assert "Traceback" not in stderr


def test_byte_order_mark_is_no_error(small_study, tmp_path):
    """Some Windows editors start UTF-8 files with one; the job reads as without it."""
    job = valid_job(small_study, tmp_path / "out")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job), encoding="utf-8-sig")
    assert read_job(path).model_dump(exclude_unset=True) == job


def test_job_built_by_the_slicer_logic_passes_the_schema(small_study, tmp_path):
    """The module's own build_job, on real MRML nodes, writes a job the engine accepts unchanged."""
    pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
    import slicer_app_shim  # pytest puts this folder on sys.path

    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    from SelfSupervisedSPECTLib import SelfSupervisedSPECTLogicBase
    from SelfSupervisedSPECTLib.logic import release_headless_logics

    slicer_app_shim.install()
    try:
        engine_env = {"OMP_NUM_THREADS": "1",
                      "PYTHONPATH": os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")]))}
        logic = SelfSupervisedSPECTLogicBase(python_executable=sys.executable, engine_env=engine_env,
                                             work_root=tmp_path / "jobs")
        projections = logic.load_projection_series([str(small_study["nm"])])
        ct = logic.load_ct_series([str(p) for p in small_study["ct_files"]])
        job, path = logic.build_job(projections, ct, "osem", {"iterations": 1, "subsets": 2},
                                    calibration_cps_per_MBq=small_study["sensitivity_cps_per_mbq"], device="cpu",
                                    windows={"lower": "none"}, isotope="177Lu", photopeaks="208")
    finally:
        release_headless_logics()
        slicer_app_shim.uninstall()
    assert set(job) == JOB_KEYS
    parsed = read_job(path)
    assert parsed.model_dump() == job
    check_settings(settings_from_job(parsed))


# ---------------------------------------------------------------- random hostile jobs
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
KEYS = sorted(JOB_KEYS) + ["windows.peak", "windows.lower", "windows.upper", "params.iterations", "params.subsets"]
MUTATIONS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), JSON_VALUES),
    st.tuples(st.just("delete"), st.sampled_from(sorted(JOB_KEYS)), st.none()),
    st.tuples(st.just("add"), st.text(max_size=12), JSON_VALUES)), min_size=1, max_size=3)


def apply(job: dict, mutations) -> dict:
    """A copy of ``job`` with hypothesis's mutations (keys added here may hold dots: they are not paths)."""
    job = json.loads(json.dumps(job))
    for kind, key, value in mutations:
        if kind == "delete":
            job.pop(key, None)
        elif kind == "add":
            job[key] = value
        else:
            *parents, last = key.split(".")
            target = job.get(parents[0]) if parents else job
            if isinstance(target, dict):
                target[last] = value
    return job


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=MUTATIONS)
def test_random_jobs_are_refused_in_one_line_or_accepted(small_study, tmp_path_factory, mutations):
    """Whatever JSON lands in a job: exit 2 with one error line, or a job whose settings check says only SSPECTError."""
    folder = tmp_path_factory.getbasetemp() / "hostile_random"
    folder.mkdir(exist_ok=True)
    path = folder / "job.json"
    path.write_text(json.dumps(apply(valid_job(small_study, folder / "out"), mutations)))  # NaN stays NaN: refused
    try:
        job = read_job(path)
    except SSPECTError as refusal:
        event("refused by the schema")
        message = str(refusal)
        assert message and "\n" not in message, message
        stream = io.StringIO()
        assert run_job(path, stream) == 2
        assert [json.loads(line) for line in stream.getvalue().splitlines()] == [{"event": "error", "message": message}]
        return
    try:
        check_settings(settings_from_job(job))
        event("accepted")
    except SSPECTError as refusal:
        event("refused by check_settings")
        assert str(refusal) and "\n" not in str(refusal)
