"""Acquisition and injection date-time and injected activity: from the NM file when it has them, given when not, warned when missing."""
import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK

from cli_outcomes import assert_refused, run_cli
from sspect.jobs import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def deidentified_nm(small_study, tmp_path):
    """The small study's projections without dates, injection or activity, as the real study comes."""
    ds = pydicom.dcmread(small_study["nm"])
    for keyword in ("StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
                    "ContentDate", "ContentTime"):
        setattr(ds, keyword, "")
    del ds.RadiopharmaceuticalInformationSequence
    path = tmp_path / "deidentified.dcm"
    ds.save_as(path)
    return path


def _first_slice(files: dict) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(Path(files["dicom"]).iterdir())[0])


def test_missing_inputs_are_warned_and_the_dicom_stays_valid(capsys, tmp_path, deidentified_nm):
    code, stderr = run_cli(capsys, "reconstruct", "--nm", deidentified_nm, "--out", tmp_path / "out", "--iterations", "1",
                           "--subsets", "2", "--formats", "dicom", "--name", "image")
    assert code == 0, stderr
    provenance = json.loads((tmp_path / "out" / "image" / "image_provenance.json").read_text())
    warned = [w for w in provenance["warnings"] if "dosimetry tools need them" in w]
    assert len(warned) == 1 and f"warning: {warned[0]}" in stderr
    for words in ("acquisition date", "injection date", "injected activity"):
        assert words in warned[0]
    ds = _first_slice(provenance["files"])
    assert (ds.SeriesDate, ds.SeriesTime) == (ds.InstanceCreationDate, ds.InstanceCreationTime)  # Type 1: when it was made
    assert ds.AcquisitionDate == "" and "RadionuclideTotalDose" not in ds.RadiopharmaceuticalInformationSequence[0]


def test_inputs_given_in_a_job_reach_the_dicom(small_study, tmp_path, deidentified_nm):
    job = {"version": 1, "nm": [str(deidentified_nm)], "output_dir": str(tmp_path / "out"), "method": "osem",
           "params": {"iterations": 1, "subsets": 2}, "formats": ["dicom"], "name": "image",
           "acquisition_datetime": "2024-03-01T10:30:12", "injection_datetime": "2024-02-28T09:00:00",
           "injected_activity_MBq": 7400}
    (tmp_path / "job.json").write_text(json.dumps(job))
    stream = io.StringIO()
    assert run_job(tmp_path / "job.json", stream) == 0
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert not [e for e in events if e["event"] == "warning" and "dosimetry" in e["message"]]
    ds = _first_slice(events[-1]["files"])
    assert (ds.AcquisitionDate, ds.AcquisitionTime, ds.SeriesDate) == ("20240301", "103012", "20240301")
    drug = ds.RadiopharmaceuticalInformationSequence[0]
    assert drug.RadiopharmaceuticalStartDateTime == "20240228090000"
    assert float(drug.RadionuclideTotalDose) == pytest.approx(7.4e9)  # Bq in the PET Isotope module
    assert np.isfinite(float(ds.RescaleSlope))


@pytest.mark.parametrize("option, value, words", [
    ("--acquisition-datetime", "yesterday", ["acquisition datetime", "2024-03-01T10:30:00"]),
    ("--injection-datetime", "2024-13-01T00:00:00", ["injection datetime"]),
    ("--injected-activity", "-7400", ["injected activity", "positive"]),
    ("--injected-activity", "nan", ["injected activity", "finite"]),
])
def test_bad_inputs_are_refused_in_one_sentence(capsys, tmp_path, small_study, option, value, words):
    code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--out", tmp_path / "out", option, value)
    assert_refused(code, stderr, *words)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


LU177_HALF_LIFE_S = 6.647 * 86400  # NNDC, independent of the engine's isotope table


def _moment(date: str, time: str) -> datetime:
    return datetime.strptime(date + time.split(".")[0], "%Y%m%d%H%M%S")


def test_decay_correction_scales_by_the_decay_and_says_so_in_the_dicom(capsys, tmp_path, small_study):
    header = pydicom.dcmread(small_study["nm"], stop_before_pixels=True)
    acquired = _moment(header.AcquisitionDate, header.AcquisitionTime)
    injected = datetime.strptime(header.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime[:14], "%Y%m%d%H%M%S")
    duration = float(header.RotationInformationSequence[0].ActualFrameDuration) / 1000 * int(header.NumberOfFrames) / len(header.EnergyWindowInformationSequence) / len(header.DetectorInformationSequence)
    decayed = np.log(2) * duration / LU177_HALF_LIFE_S
    to_start = decayed / (1 - np.exp(-decayed))  # activity at the start over the mean during the acquisition
    expected = {"start": to_start, "injection": to_start * 2 ** ((acquired - injected).total_seconds() / LU177_HALF_LIFE_S)}
    images = {}
    for mode in ("none", "start", "injection"):
        code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--ct", small_study["ct"], "--out", tmp_path,
                               "--iterations", "1", "--subsets", "2", "--calibration", "9", "--decay-correction", mode, "--name", mode)
        assert code == 0, stderr
        provenance = json.loads((tmp_path / mode / f"{mode}_provenance.json").read_text())
        images[mode] = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(provenance["files"]["nrrd"])).astype(np.float64)
        ds = _first_slice(provenance["files"])
        assert ds.DecayCorrection == {"none": "NONE", "start": "START", "injection": "ADMIN"}[mode]
        assert ("DECY" in ds.CorrectedImage) == (mode != "none")
        assert provenance["decay_correction"]["mode"] == mode
        if mode != "none":
            assert float(ds.DecayFactor) == pytest.approx(expected[mode], rel=1e-6)
    assert provenance["decay_correction"]["reference_datetime"] == injected.isoformat()
    hot = images["none"] > 0.1 * images["none"].max()
    for mode in ("start", "injection"):
        assert np.median(images[mode][hot] / images["none"][hot]) == pytest.approx(expected[mode], rel=1e-5)


def test_decay_correction_to_the_injection_needs_its_date(capsys, tmp_path, deidentified_nm):
    code, stderr = run_cli(capsys, "reconstruct", "--nm", deidentified_nm, "--out", tmp_path / "out",
                           "--acquisition-datetime", "2024-03-01T10:30:00", "--decay-correction", "injection")
    assert_refused(code, stderr, "injection date and time", "--injection-datetime")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("options, words", [
    (["--decay-correction", "admin"], ["decay correction", "none, start, injection"]),
    (["--decay-correction", "injection", "--injection-datetime", "2030-01-01T00:00:00"], ["after the acquisition start"]),
    (["--decay-correction", "injection", "--injection-datetime", "1990-01-01T00:00:00"], ["half-lives", "check the dates"]),
])
def test_impossible_decay_corrections_are_refused(capsys, tmp_path, small_study, options, words):
    code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--out", tmp_path / "out", *options)
    assert_refused(code, stderr, *words)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
