"""The Slicer door, `python -m sspect run-job JOB.json`, run as a real process.

The Slicer module reads the process's stdout line by line, so every line must be one JSON event;
it shows errors as they come, so a failure is one `error` event with one sentence; it lets the
user cancel by killing the process, so a killed job must leave no half-written result.

The child processes run with one OpenMP thread: on a 2-core machine that is busy with anything
else, PyTorch's two OpenMP threads wait for each other at every operation and a 32^3
reconstruction takes a hundred times longer. The protocol under test does not depend on it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sspect.io.dicom_export import read_dicom_series
from sspect.io.volume_files import read_image

GOOD_PARAMS = {"iterations": 2, "subsets": 4}


def _child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _job(small_study, out_dir: Path, **changes) -> dict:
    job = {"version": 1, "nm": [str(small_study["nm"])], "ct": str(small_study["ct"]), "output_dir": str(out_dir),
           "method": "osem", "params": dict(GOOD_PARAMS), "windows": {"peak": None, "lower": None, "upper": None},
           "calibration_cps_per_MBq": small_study["sensitivity_cps_per_mbq"], "device": "cpu", "seed": 7,
           "formats": ["nrrd", "dicom"], "name": None}
    job.update(changes)
    return job


def _write_job(tmp_path: Path, job, name="job.json") -> Path:
    path = tmp_path / name
    path.write_text(job if isinstance(job, str) else json.dumps(job))
    return path


def _run_job(job_path: Path, timeout=240):
    done = subprocess.run([sys.executable, "-m", "sspect", "run-job", str(job_path)], capture_output=True,
                          text=True, timeout=timeout, env=_child_env())
    return done.returncode, _parse_events(done.stdout), done.stderr


def _parse_events(stdout: str) -> list[dict]:
    """Every line of stdout is one JSON object with an 'event' (fails on anything else)."""
    events = []
    for number, line in enumerate(stdout.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"stdout line {number} is not JSON: {line[:200]!r}")
        assert isinstance(event, dict) and "event" in event, line[:200]
        events.append(event)
    return events


def _assert_one_sentence(message: str):
    assert isinstance(message, str) and message.strip() == message and message
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith("."), message
    assert not re.search(r"[.;:!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message}"


def _assert_single_error(code, events, stderr):
    assert code == 2, (code, events, stderr[-2000:])
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1, events
    assert events[-1] is errors[0]
    assert not any(e["event"] in ("progress", "result") for e in events)
    assert "Traceback" not in stderr
    _assert_one_sentence(errors[0]["message"])
    return errors[0]["message"]


@pytest.fixture(scope="module")
def good_run(small_study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run_job_good")
    job = _job(small_study, folder / "out")
    code, events, stderr = _run_job(_write_job(folder, job))
    return {"job": job, "code": code, "events": events, "stderr": stderr}


# ---------------------------------------------------------------- a job that succeeds


def test_events_come_in_protocol_order(good_run):
    assert good_run["code"] == 0, good_run["stderr"][-3000:]
    kinds = [e["event"] for e in good_run["events"]]
    assert kinds[0] == "start" and kinds[-1] == "result", kinds
    middle = kinds[1:-1]
    first_progress = middle.index("progress")
    assert set(middle[:first_progress]) <= {"warning"}, kinds
    assert set(middle[first_progress:]) == {"progress"}, kinds
    assert good_run["events"][0]["job"] == good_run["job"]
    for warning in (e for e in good_run["events"] if e["event"] == "warning"):
        assert isinstance(warning["message"], str) and warning["message"]


def test_progress_fractions_rise_to_one(good_run):
    progress = [e for e in good_run["events"] if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert len(fractions) == GOOD_PARAMS["iterations"] * GOOD_PARAMS["subsets"]
    assert all(0 < f <= 1 for f in fractions)
    assert fractions == sorted(fractions), fractions
    assert fractions[-1] == 1.0
    assert progress[-1]["iteration"] == GOOD_PARAMS["iterations"] and progress[-1]["subset"] == GOOD_PARAMS["subsets"]


def test_result_files_exist_and_provenance_matches_the_job(good_run, small_study):
    result = good_run["events"][-1]
    job = good_run["job"]
    files = result["files"]
    assert {"nrrd", "dicom", "provenance", "preview", "report"} <= set(files)
    for kind, path in files.items():
        assert Path(path).exists(), kind
        assert Path(path).parent.parent == Path(job["output_dir"])  # one folder per result
    assert result["unit"] == "Bq/mL"
    provenance = result["provenance"]
    assert provenance["method"] == job["method"]
    assert provenance["params"] == job["params"]
    assert provenance["seed"] == job["seed"]
    assert provenance["calibration_cps_per_MBq"] == job["calibration_cps_per_MBq"]
    assert provenance["unit"] == "Bq/mL" and provenance["projector"] == "fast"
    assert 0 < provenance["method_run_time_s"] <= provenance["run_time_s"]
    written = json.loads(Path(files["provenance"]).read_text())
    assert {k: written[k] for k in ("method", "params", "seed", "unit")} == \
        {k: provenance[k] for k in ("method", "params", "seed", "unit")}
    image = read_image(files["nrrd"])
    assert image.unit == "Bq/mL" and image.array.shape == (32, 32, 32)
    assert np.all(np.isfinite(image.array)) and image.array.max() > 0
    dicom = read_dicom_series(files["dicom"])
    assert dicom.array.shape == image.array.shape and dicom.unit == "Bq/mL"


def test_same_job_twice_gives_the_same_image(good_run, tmp_path):
    job = {**good_run["job"], "output_dir": str(tmp_path / "again")}
    code, events, stderr = _run_job(_write_job(tmp_path, job))
    assert code == 0, stderr[-3000:]
    first, second = good_run["events"][-1]["files"], events[-1]["files"]
    assert first["nrrd"] != second["nrrd"]
    np.testing.assert_array_equal(read_image(first["nrrd"]).array, read_image(second["nrrd"]).array)
    np.testing.assert_array_equal(read_dicom_series(first["dicom"]).array, read_dicom_series(second["dicom"]).array)
    assert events[-1]["provenance"]["seed"] == good_run["events"][-1]["provenance"]["seed"] == job["seed"]


def test_job_can_choose_pytomographys_projector_as_the_reference(good_run, tmp_path):
    job = {**good_run["job"], "output_dir": str(tmp_path / "reference"), "projector": "pytomography"}
    code, events, stderr = _run_job(_write_job(tmp_path, job))
    assert code == 0, stderr[-3000:]
    assert events[-1]["provenance"]["projector"] == "pytomography"
    fast = read_image(good_run["events"][-1]["files"]["nrrd"]).array.astype(np.float64)
    reference = read_image(events[-1]["files"]["nrrd"]).array.astype(np.float64)
    assert np.linalg.norm(fast - reference) / np.linalg.norm(reference) < 0.01


# ---------------------------------------------------------------- jobs that fail


def test_ct_file_given_as_projections_is_one_error(small_study, tmp_path):
    job = _job(small_study, tmp_path / "out", nm=[str(small_study["ct_files"][0])])
    code, events, stderr = _run_job(_write_job(tmp_path, job))
    message = _assert_single_error(code, events, stderr)
    assert [e["event"] for e in events] == ["start", "error"]
    assert "not SPECT projections" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("text,words", [
    ("{'nm': ['bed1.dcm'],", ("not valid JSON",)),
    ("", ("not valid JSON",)),
    ("[1, 2, 3]", ("JSON object",)),
])
def test_job_file_that_is_not_a_json_object(tmp_path, text, words):
    code, events, stderr = _run_job(_write_job(tmp_path, text))
    message = _assert_single_error(code, events, stderr)
    assert [e["event"] for e in events] == ["error"]
    for word in words:
        assert word in message, message


def test_job_file_with_unknown_keys(small_study, tmp_path):
    job = {**_job(small_study, tmp_path / "out"), "iterations": 3, "outdir": "x"}
    code, events, stderr = _run_job(_write_job(tmp_path, job))
    message = _assert_single_error(code, events, stderr)
    assert [e["event"] for e in events] == ["error"]
    assert "iterations" in message and "outdir" in message


def test_missing_job_file(tmp_path):
    code, events, stderr = _run_job(tmp_path / "nowhere.json")
    assert "does not exist" in _assert_single_error(code, events, stderr)


@pytest.mark.parametrize("changes,words", [
    ({"seed": "abc"}, ("seed",)),
    ({"seed": None}, ("seed",)),
    ({"params": [2, 4]}, ("params",)),
    ({"windows": {"photopeak": 0}}, ("photopeak",)),
    ({"formats": "nrrd"}, ("formats",)),
    ({"params": {"iterations": 0}}, ("iterations", "outside")),
    ({"method": "magic"}, ("Unknown method",)),
    ({"projector": 3}, ("projector", "fast", "pytomography")),
    ({"projector": "magic"}, ("Unknown projector 'magic'",)),
])
def test_bad_job_values_are_one_error(small_study, tmp_path, changes, words):
    """Wrong values a user (or a buggy caller) writes are refused as such, not as an engine failure."""
    code, events, stderr = _run_job(_write_job(tmp_path, _job(small_study, tmp_path / "out", **changes)))
    message = _assert_single_error(code, events, stderr)
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- a job that is killed


def _complete_or_absent(out_dir: Path) -> list[str]:
    """Check every visible entry of the output folder is a complete result set; returns the names of its files."""
    if not out_dir.exists():
        return []
    seen = []
    for result in sorted(out_dir.iterdir()):
        if result.name.startswith("."):
            continue  # hidden partial sets are allowed (a SIGKILL cannot clean up)
        assert result.is_dir(), result
        names = sorted(p.name for p in result.iterdir())
        assert names == sorted(f"{result.name}{suffix}" for suffix in
                               (".nrrd", ".nii.gz", "_dicom", "_preview.png", "_provenance.json", "_report.md")), names
        for entry in sorted(result.iterdir()):
            seen.append(entry.name)
            if entry.is_dir():
                slices = sorted(p for p in entry.iterdir())
                assert len(slices) == 32 and all(p.name.startswith("slice_") for p in slices), [p.name for p in slices]
                assert read_dicom_series(entry).array.shape == (32, 32, 32)
            elif entry.name.endswith((".nrrd", ".nii.gz")):
                image = read_image(entry)
                assert image.array.shape == (32, 32, 32) and np.all(np.isfinite(image.array))
            elif entry.suffix == ".json":
                assert json.loads(entry.read_text())["method"] == "osem"
            elif entry.suffix == ".png":
                data = entry.read_bytes()
                assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-12:-4] == b"\x00\x00\x00\x00IEND", entry
            else:
                text = entry.read_text()
                assert text.startswith("# Reconstruction report") and text.endswith("\n"), entry
    return seen


def _wait_for_partial(out_dir: Path, marker: str, process, timeout_s=60.0) -> bool:
    """Poll the output folder until a hidden partial entry for ``marker`` appears in the partial set; False if none did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        for folder, folders, names in os.walk(out_dir):
            if ".partial-" in folder and any(n.startswith(".") and marker in n and ".partial-" in n for n in folders + names):
                return True
        time.sleep(0.0005)
    return False


@pytest.mark.parametrize("kill_when", ["first progress", ".nrrd", "_dicom", "_preview.png"])
def test_killed_job_leaves_no_half_written_file(small_study, tmp_path, kill_when):
    """SIGKILL to the process group while iterating, or while a result file is being written."""
    out_dir = tmp_path / "out"
    iterations = 50 if kill_when == "first progress" else 2
    job = _job(small_study, out_dir, params={"iterations": iterations, "subsets": 4},
               formats=["nrrd", "nifti", "dicom"])
    process = subprocess.Popen([sys.executable, "-m", "sspect", "run-job", str(_write_job(tmp_path, job))],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_child_env(),
                               start_new_session=True)
    events = []
    try:
        for line in process.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and (kill_when == "first progress" or events[-1]["fraction"] == 1.0):
                break
        assert events and events[-1]["event"] == "progress", events
        if kill_when != "first progress":
            caught = _wait_for_partial(out_dir, kill_when, process)
            # the hidden names say which write was interrupted; a fast write may finish unseen
            print(f"kill while writing {kill_when}: {'caught' if caught else 'missed'}")
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode in (-signal.SIGKILL, 0)
    written = _complete_or_absent(out_dir)
    if kill_when == "first progress":
        assert written == [], written
