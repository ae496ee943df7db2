"""Every failure a user can cause ends in one sentence and a non-zero exit, never a traceback."""
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from cli_outcomes import assert_refused, run_cli



def _modified_nm(small_study, tmp_path, change):
    ds = pydicom.dcmread(small_study["nm"])
    change(ds)
    path = tmp_path / "modified.dcm"
    ds.save_as(path)
    return str(path)


def _reconstruct(capsys, tmp_path, nm, ct=None, *extra):
    args = ["reconstruct", "--nm", str(nm), "--out", str(tmp_path / "out"), "--iterations", "1", "--subsets", "2", *extra]
    if ct is not None:
        args += ["--ct", str(ct)]
    return run_cli(capsys, *args)


def test_ct_slice_given_as_projections(capsys, tmp_path, small_study):
    assert_refused(*_reconstruct(capsys, tmp_path, small_study["ct_files"][0]), "CT image", "not SPECT projections")


def test_planar_nm_given_as_projections(capsys, tmp_path, small_study):
    def make_static(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    nm = _modified_nm(small_study, tmp_path, make_static)
    assert_refused(*_reconstruct(capsys, tmp_path, nm), "static", "not a tomographic")


def test_file_that_is_not_dicom(capsys, tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("these are not projections\n")
    assert_refused(*run_cli(capsys, "info", str(text)), "not a readable DICOM file")


def test_truncated_file(capsys, tmp_path, small_study):
    data = open(small_study["nm"], "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    code, message = run_cli(capsys, "info", str(cut))
    assert_refused(code, message)
    assert "truncated" in message or "not a readable DICOM" in message


def test_no_window_near_208_keV(capsys, tmp_path, small_study):
    def shift_windows(ds):
        for number, item in enumerate(ds.EnergyWindowInformationSequence):
            item.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit = 100 + 20 * number
            item.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit = 115 + 20 * number
    nm = _modified_nm(small_study, tmp_path, shift_windows)
    assert_refused(*run_cli(capsys, "info", nm), "208 keV", "choose the photopeak window")


def test_ct_from_another_frame_of_reference(capsys, tmp_path, small_study):
    other = tmp_path / "other_ct"
    other.mkdir()
    for file in small_study["ct_files"]:
        ds = pydicom.dcmread(file)
        ds.FrameOfReferenceUID = "1.2.3.4.5"
        ds.save_as(other / file.name)
    assert_refused(*_reconstruct(capsys, tmp_path, small_study["nm"], other), "another Frame of Reference")


def test_ct_not_covering_the_field_of_view(capsys, tmp_path, small_study):
    short = tmp_path / "short_ct"
    short.mkdir()
    files = sorted(small_study["ct_files"], key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for file in files[:8]:
        shutil.copy(file, short / file.name)
    assert_refused(*_reconstruct(capsys, tmp_path, small_study["nm"], short), "covers only", "field of view")


def test_zero_counts(capsys, tmp_path, small_study):
    def empty(ds):
        ds.PixelData = np.zeros_like(ds.pixel_array).tobytes()
    nm = _modified_nm(small_study, tmp_path, empty)
    assert_refused(*_reconstruct(capsys, tmp_path, nm, small_study["ct"]), "holds no counts")


def test_unknown_rotation_direction(capsys, tmp_path, small_study):
    def bogus(ds):
        ds.RotationInformationSequence[0].RotationDirection = "XX"
    assert_refused(*run_cli(capsys, "info", _modified_nm(small_study, tmp_path, bogus)), "rotation direction")


@pytest.mark.parametrize("extra,words", [
    (("--method", "magic"), ("Unknown method", "osem")),
    (("--param", "beta=-1", "--method", "bsrem"), ("beta", "outside")),
    (("--collimator", "LEHR"), ("Unknown collimator",)),
    (("--peak-window", "7"), ("no photopeak window #7",)),
    (("--param", "smoothness=3"), ("has no parameter smoothness",)),
    (("--device", "tpu"), ("Unknown device",)),
    (("--projector", "magic"), ("Unknown projector 'magic'", "fast or pytomography")),
])
def test_bad_settings(capsys, tmp_path, small_study, extra, words):
    assert_refused(*_reconstruct(capsys, tmp_path, small_study["nm"], None, *extra), *words)


def test_too_many_subsets(capsys, tmp_path, small_study):
    args = ["reconstruct", "--nm", str(small_study["nm"]), "--out", str(tmp_path / "out"), "--subsets", "50"]
    assert_refused(*run_cli(capsys, *args), "more than the 24 views")


def test_command_line_process_exit_code_and_message(tmp_path):
    """The installed entry point, as a user runs it."""
    missing = tmp_path / "nowhere.dcm"
    done = subprocess.run([sys.executable, "-m", "sspect", "info", str(missing)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
