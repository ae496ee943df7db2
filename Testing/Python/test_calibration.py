"""`sspect calibrate`: the sensitivity measured on a phantom of known activity, stored and used by name.

The small simulated study is the phantom: PyTomography's projector made its counts with a known
sensitivity (9 cps/MBq) from a known activity, so the measured factor has an independent answer.
"""
import io
import json
from datetime import datetime, timedelta

import numpy as np
import pydicom
import pytest

from cli_outcomes import assert_refused, run_cli
from sspect.io.calibrations import save_calibration, store_path, stored_calibrations
from sspect.jobs import run_job
from sspect.pipeline import Settings

HALF_LIFE_DAYS = 6.647  # 177Lu, NNDC

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "calibrations.json"
    monkeypatch.setenv("SSPECT_CALIBRATIONS", str(path))
    return path


@pytest.fixture(scope="module")
def phantom_MBq(small_study):
    phantom = small_study["phantom"]
    return float(phantom.activity.sum(dtype=np.float64)) * float(np.prod(phantom.spacing)) / 1000


def _calibrate(capsys, small_study, out, *options, iterations="1"):
    return run_cli(capsys, "calibrate", "--nm", small_study["nm"], "--ct", small_study["ct"], "--out", out,
                   "--iterations", iterations, "--subsets", "6", *options)


def test_the_measured_sensitivity_is_the_simulated_one_and_is_used_by_name(capsys, tmp_path, store, small_study, phantom_MBq):
    code, stderr = _calibrate(capsys, small_study, tmp_path / "phantom", "--activity", f"{phantom_MBq:.6f}", "--name", "GE670 Lu",
                              iterations="4")
    assert code == 0, stderr
    record = stored_calibrations()["GE670 Lu"]
    assert record["cps_per_MBq"] == pytest.approx(small_study["sensitivity_cps_per_mbq"], rel=0.05)
    assert (record["isotope"], record["collimator"], record["photopeaks_keV"], record["method"]) == ("177Lu", "GE-MEGP", [208.0], "osem")
    assert record["scatter_smoothing_cm"] == Settings().scatter_smoothing_cm
    assert store_path() == store

    code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--ct", small_study["ct"], "--out", tmp_path / "patient",
                           "--iterations", "4", "--subsets", "6", "--calibration", "GE670 Lu", "--formats", "nrrd", "--name", "image")
    assert code == 0, stderr
    provenance = json.loads((tmp_path / "patient" / "image" / "image_provenance.json").read_text())
    assert provenance["unit"] == "Bq/mL" and provenance["calibration_name"] == "GE670 Lu"
    assert provenance["calibration_cps_per_MBq"] == record["cps_per_MBq"]


def test_activity_measured_earlier_is_decayed_to_the_scan(capsys, tmp_path, store, small_study, phantom_MBq):
    header = pydicom.dcmread(small_study["nm"], stop_before_pixels=True)
    acquired = datetime.strptime(header.AcquisitionDate + header.AcquisitionTime[:6], "%Y%m%d%H%M%S")
    for name, activity, measured in (("now", phantom_MBq, acquired), ("a half-life before", 2 * phantom_MBq,
                                                                     acquired - timedelta(days=HALF_LIFE_DAYS))):
        code, stderr = _calibrate(capsys, small_study, tmp_path / "phantom", "--activity", f"{activity:.6f}",
                                  "--activity-datetime", measured.isoformat(), "--name", name)
        assert code == 0, stderr
    records = stored_calibrations()
    assert records["a half-life before"]["cps_per_MBq"] == pytest.approx(records["now"]["cps_per_MBq"], rel=1e-6)


def test_a_calibrate_job_stores_its_record_and_says_so(tmp_path, store, small_study, phantom_MBq):
    job = {"version": 1, "task": "calibrate", "nm": [str(small_study["nm"])], "ct": str(small_study["ct"]),
           "output_dir": str(tmp_path / "out"), "params": {"iterations": 1, "subsets": 2},
           "phantom": {"name": "from the panel", "activity_MBq": phantom_MBq}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    stream = io.StringIO()
    assert run_job(tmp_path / "job.json", stream) == 0
    result = json.loads(stream.getvalue().splitlines()[-1])
    assert result["event"] == "result" and result["calibration"] == stored_calibrations()["from the panel"]
    assert result["store"] == str(store) and result["unit"] == "counts"


@pytest.mark.parametrize("change, words", [
    ({"phantom": None}, ["calibrate job needs 'phantom'"]),
    ({"phantom": {"name": "x", "activity_MBq": -5}}, ["activity", "positive"]),
    ({"phantom": {"name": "12.5", "activity_MBq": 5}}, ["must not be a number"]),
    ({"calibration_cps_per_MBq": 9.0}, ["measures the sensitivity"]),
    ({"task": "reconstruct"}, ["belongs to a calibrate job"]),
    ({"task": "measure"}, ["task"]),
])
def test_bad_calibrate_jobs_are_refused_in_one_sentence(tmp_path, store, small_study, change, words):
    job = {"version": 1, "task": "calibrate", "nm": [str(small_study["nm"])], "output_dir": str(tmp_path / "out"),
           "phantom": {"name": "x", "activity_MBq": 100.0}, **change}
    (tmp_path / "job.json").write_text(json.dumps(job))
    stream = io.StringIO()
    assert run_job(tmp_path / "job.json", stream) == 2
    event = json.loads(stream.getvalue().splitlines()[-1])
    assert event["event"] == "error" and all(w in event["message"] for w in words), event["message"]
    assert not store.exists() and not (tmp_path / "out").exists()


def test_a_calibration_is_refused_where_it_does_not_belong(capsys, tmp_path, store, small_study):
    save_calibration({"name": "Tc", "cps_per_MBq": 80.0, "isotope": "99mTc", "collimator": "GE-MEGP",
                      "photopeaks_keV": [140.0], "method": "osem"})
    code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--out", tmp_path / "out", "--calibration", "Tc")
    assert_refused(code, stderr, "'Tc' was measured for the isotope 99mTc", "177Lu")
    code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--out", tmp_path / "out", "--calibration", "Lu")
    assert_refused(code, stderr, "No calibration is stored as 'Lu'", "'Tc'", "sspect calibrate")
    code, stderr = _calibrate(capsys, small_study, tmp_path / "out", "--activity", "100", "--name", "Tc")
    assert_refused(code, stderr, "already stored", "--overwrite")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert stored_calibrations()["Tc"]["cps_per_MBq"] == 80.0


def test_a_calibration_measured_with_another_scatter_smoothing_is_used_with_a_warning(capsys, tmp_path, store, small_study):
    save_calibration({"name": "old", "cps_per_MBq": 9.0, "isotope": "177Lu", "collimator": "GE-MEGP",
                      "photopeaks_keV": [208.0], "method": "osem"})  # stored before the smoothing was recorded
    options = ["--nm", small_study["nm"], "--iterations", "1", "--subsets", "6", "--calibration", "old", "--formats", "nrrd"]
    code, stderr = run_cli(capsys, "reconstruct", *options, "--out", tmp_path / "default")
    assert code == 0 and "smoothed by 0 cm" in stderr and "recalibrate" in stderr, stderr
    code, stderr = run_cli(capsys, "reconstruct", *options, "--out", tmp_path / "unsmoothed", "--scatter-smoothing", "0")
    assert code == 0 and "smoothed by" not in stderr, stderr


def test_a_phantom_measured_after_its_scan_is_refused(capsys, tmp_path, store, small_study):
    code, stderr = _calibrate(capsys, small_study, tmp_path / "out", "--activity", "100", "--name", "late",
                              "--activity-datetime", "2099-01-01T00:00:00")
    assert_refused(code, stderr, "after the acquisition started", "check the dates")
    assert not store.exists()


def test_a_broken_calibrations_file_is_one_sentence(capsys, tmp_path, store, small_study):
    store.write_text("{not json")
    code, stderr = run_cli(capsys, "calibrations")
    assert_refused(code, stderr, str(store), "cannot be read", "calibrate again")
