"""`sspect info` summarises a study folder: windows, views, orbit, detectors and the matching CT."""
import shutil

import pydicom

from sspect.cli import main


def test_info_on_a_study_folder_finds_the_matching_ct(capsys, small_study):
    folder = small_study["nm"].parent.parent  # holds NM/ and CT/
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "24 views over 360 deg" in out and "rotation CC" in out and "1 detector(s)" in out
    assert "photopeak #0" in out and "(TEW)" in out
    assert "matching CT: same Frame of Reference" in out
    assert "isotope: 177Lu; collimator GE-MEGP" in out


def test_info_ignores_a_ct_from_another_frame_of_reference(capsys, tmp_path, small_study):
    shutil.copy(small_study["nm"], tmp_path / "projections.dcm")
    (tmp_path / "CT").mkdir()
    for file in small_study["ct_files"]:
        ds = pydicom.dcmread(file)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.save_as(tmp_path / "CT" / file.name)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "matching CT: none found" in out and "not attenuation corrected" in out


def test_info_on_the_real_study(capsys, real_study):
    assert main(["info", real_study["nm"].rsplit("/NM/", 1)[0]]) == 0
    out = capsys.readouterr().out
    assert "60 views over 360 deg" in out and "rotation CC" in out and "25 s per view" in out
    assert "photopeak #1 'Lu177_EM' 187.2-228.8 keV" in out and "lower scatter #3" in out and "upper scatter #2" in out
    assert "matching CT: same Frame of Reference" in out and "303 slices" in out
