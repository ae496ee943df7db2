"""Hostile NM projection headers: each copy of a study is refused in one sentence, warned about, or read right.

The corpus mutates copies of the small simulated study (one GE-like head, 24 views over 360
degrees, counter-clockwise) and of the real GE study; every case states its exact outcome.
"""
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cli_outcomes import assert_refused, run_cli
from sspect.cli import main
from sspect.io.volume_files import read_image



def _mutated(source, folder: Path, change) -> Path:
    ds = pydicom.dcmread(source)
    change(ds)
    path = folder / "mutated.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


def _frames(ds) -> np.ndarray:
    return ds.pixel_array.copy()


def _set_frames(ds, frames: np.ndarray) -> None:
    ds.PixelData = frames.astype(frames.dtype.newbyteorder("<")).tobytes()


def _rotation(ds):
    return ds.RotationInformationSequence[0]


def _detector(ds):
    return ds.DetectorInformationSequence[0]


def _window_range(ds, index=0):
    return ds.EnergyWindowInformationSequence[index].EnergyWindowRangeSequence[0]


def _set(item_of, keyword, value):
    def change(ds):
        setattr(item_of(ds), keyword, value)
    return change


def _delete(item_of, keyword):
    def change(ds):
        delattr(item_of(ds), keyword)
    return change


def _delete_everywhere(keyword):
    def change(ds):
        for item in [*ds.RotationInformationSequence, *ds.DetectorInformationSequence]:
            if keyword in item:
                delattr(item, keyword)
    return change


def _top(ds):
    return ds


def _signed_with_negatives(ds):
    frames = _frames(ds).astype(np.uint16)
    frames[0, 3, 3] = 65000  # read as signed: -536
    _set_frames(ds, frames)
    ds.PixelRepresentation = 1


def _float_pixels(ds):
    frames = _frames(ds).astype(np.float32)
    del ds.PixelData
    ds.FloatPixelData = frames.tobytes()
    ds.BitsAllocated = 32
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation


def _no_counts(ds):
    _set_frames(ds, np.zeros_like(_frames(ds)))


def _no_photopeak_counts(ds):
    frames = _frames(ds)
    vector = np.asarray(ds.EnergyWindowVector)
    frames[vector == 1] = 0  # window #0 is the photopeak in the GE layout
    _set_frames(ds, frames)


def _frames_vector(keyword, value):
    def change(ds):
        vector = list(getattr(ds, keyword))
        vector[-1] = value
        setattr(ds, keyword, vector)
    return change


def _short_rows(ds):
    ds.Rows = int(ds.Rows) - 4


def _empty_sequence(keyword):
    def change(ds):
        setattr(ds, keyword, [])
    return change


def _radii_of_wrong_length(ds):
    _rotation(ds).RadialPosition = ["250"] * 5


REFUSED = [  # (case, mutation, words of the one sentence)
    ("direction unknown", _set(_rotation, "RotationDirection", "XX"), ["rotation direction"]),
    ("angular step zero", _set(_rotation, "AngularStep", "0"), ["angular step"]),
    ("angular step negative", _set(_rotation, "AngularStep", "-15"), ["angular step"]),
    ("angular step not the arc", _set(_rotation, "AngularStep", "3"), ["angular step", "scan arc"]),
    ("angular step not finite", _set(_rotation, "AngularStep", "nan"), ["angular step"]),
    ("half the views declared", _set(_rotation, "NumberOfFramesInRotation", 12), ["frames"]),
    ("no views declared", _set(_rotation, "NumberOfFramesInRotation", 0), ["frames in rotation"]),
    ("scan arc disagrees", _set(_rotation, "ScanArc", "180"), ["scan arc"]),
    ("radius zero", _set(_rotation, "RadialPosition", "0"), ["radial position"]),
    ("radius negative", _set(_rotation, "RadialPosition", "-250"), ["radial position"]),
    ("radius not finite", _set(_rotation, "RadialPosition", "inf"), ["radial position"]),
    ("radii of the wrong length", _radii_of_wrong_length, ["radial position", "24"]),
    ("radius missing", _delete_everywhere("RadialPosition"), ["radial position"]),
    ("start angle missing", _delete_everywhere("StartAngle"), ["start angle"]),
    ("start angle not finite", _set(_rotation, "StartAngle", "nan"), ["start angle"]),
    ("angular step missing", _delete(_rotation, "AngularStep"), ["angular step"]),
    ("frames in rotation missing", _delete(_rotation, "NumberOfFramesInRotation"), ["frames in rotation"]),
    ("frame duration missing", _delete(_rotation, "ActualFrameDuration"), ["frame duration"]),
    ("frame duration zero", _set(_rotation, "ActualFrameDuration", 0), ["frame duration"]),
    ("frame duration negative", _set(_rotation, "ActualFrameDuration", -20000), ["frame duration"]),
    ("detector position missing", _delete(_detector, "ImagePositionPatient"), ["image position"]),
    ("detector position short", _set(_detector, "ImagePositionPatient", ["0", "0"]), ["image position"]),
    ("detector position not finite", _set(_detector, "ImagePositionPatient", ["0", "nan", "0"]), ["image position"]),
    ("number of frames empty", _set(_top, "NumberOfFrames", None), ["number of frames"]),
    ("number of frames too many", _set(_top, "NumberOfFrames", 200), ["number of frames", "pixel data"]),
    ("number of frames too few", _set(_top, "NumberOfFrames", 40), ["number of frames", "pixel data"]),
    ("rows disagree with pixel data", _short_rows, ["pixel data"]),
    ("window vector out of range", _frames_vector("EnergyWindowVector", 9), ["energy window vector"]),
    ("detector vector out of range", _frames_vector("DetectorVector", 2), ["detector vector"]),
    ("detectors declared but absent", _set(_top, "NumberOfDetectors", 2), ["detector"]),
    ("no rotation item", _empty_sequence("RotationInformationSequence"), ["rotation"]),
    ("no detector item", _empty_sequence("DetectorInformationSequence"), ["detector"]),
    ("float pixel data", _float_pixels, ["floating-point"]),
    ("signed pixels with negative counts", _signed_with_negatives, ["negative"]),
    ("pixel data missing", _delete(_top, "PixelData"), ["pixel data"]),
    ("pixel spacing zero", _set(_top, "PixelSpacing", ["0", "12"]), ["pixel spacing"]),
    ("pixel spacing negative", _set(_top, "PixelSpacing", ["-12", "-12"]), ["pixel spacing"]),
    ("pixel spacing one value", _set(_top, "PixelSpacing", ["12"]), ["pixel spacing"]),
    ("pixel spacing not finite", _set(_top, "PixelSpacing", ["nan", "12"]), ["pixel spacing"]),
    ("window reversed", _set(_window_range, "EnergyWindowLowerLimit", "240"), ["energy window", "lower"]),
    ("window of zero width", _set(_window_range, "EnergyWindowLowerLimit", "229.3"), ["energy window", "lower"]),
    ("window negative", _set(_window_range, "EnergyWindowLowerLimit", "-10"), ["energy window"]),
    ("window limit not finite", _set(_window_range, "EnergyWindowUpperLimit", "nan"), ["energy window"]),
    ("no counts at all", _no_counts, ["no counts"]),
    ("no photopeak counts", _no_photopeak_counts, ["no counts", "photopeak"]),
]


@pytest.mark.parametrize("change, words", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_refused_in_one_sentence(capsys, tmp_path, small_study, change, words):
    nm = _mutated(small_study["nm"], tmp_path, change)
    assert_refused(*run_cli(capsys, "info", nm), *words)


def _reconstruct(capsys, tmp_path, nm, *extra):
    out = tmp_path / "out"
    code, stderr = run_cli(capsys, "reconstruct", "--nm", nm, "--out", out, "--iterations", "1", "--subsets", "2",
                        "--formats", "nrrd", "--name", "image", *extra)
    assert code == 0, stderr
    image = read_image(next(out.rglob("image.nrrd"))).array
    provenance = json.loads(next(out.rglob("image_provenance.json")).read_text())
    return image, provenance, stderr


@pytest.fixture(scope="module")
def reference_images(small_study, tmp_path_factory):
    """The small study reconstructed as written (CC) and with its rotation declared clockwise."""
    images = {}
    for direction in ("CC", "CW"):
        folder = tmp_path_factory.mktemp(f"reference_{direction}")
        nm = _mutated(small_study["nm"], folder, _set(_rotation, "RotationDirection", direction))
        assert main(["reconstruct", "--nm", str(nm), "--out", str(folder / "out"), "--iterations", "1", "--subsets", "2",
                     "--formats", "nrrd", "--name", "image"]) == 0
        images[direction] = read_image(next((folder / "out").rglob("image.nrrd"))).array
    assert not np.allclose(images["CC"], images["CW"], rtol=0.01)  # the direction matters, so the cases below can fail
    return images


@pytest.mark.parametrize("written, meant", [("cc", "CC"), (" CC ", "CC"), ("CCW", "CC"), ("ccw", "CC"), ("cw", "CW")])
def test_rotation_direction_read_as_meant(capsys, tmp_path, small_study, reference_images, written, meant):
    """PyTomography compares the direction case-sensitively; the engine hands it the normalised word."""
    nm = _mutated(small_study["nm"], tmp_path, _set(_rotation, "RotationDirection", written))
    image, provenance, _ = _reconstruct(capsys, tmp_path, nm)
    np.testing.assert_allclose(image, reference_images[meant], rtol=1e-5, atol=1e-6 * reference_images[meant].max())


def _signed_without_negatives(ds):
    ds.PixelRepresentation = 1


def test_signed_pixels_without_negatives_read_as_counts(capsys, tmp_path, small_study, reference_images):
    nm = _mutated(small_study["nm"], tmp_path, _signed_without_negatives)
    image, _, _ = _reconstruct(capsys, tmp_path, nm)
    np.testing.assert_allclose(image, reference_images["CC"], rtol=1e-5, atol=1e-6 * reference_images["CC"].max())


def _half_arc(ds):
    _rotation(ds).AngularStep = "7.5"
    _rotation(ds).ScanArc = "180"


def _hot_pixel(ds):
    frames = _frames(ds)
    frames[np.asarray(ds.EnergyWindowVector) == 1, 5, 20] = 30000  # one detector element, every photopeak view
    _set_frames(ds, frames)


def _no_manufacturer(ds):
    del ds.Manufacturer


WARNED = [  # (case, mutation, options, words of the warning)
    ("short arc", _half_arc, [], ["180 degrees"]),
    ("hot pixel", _hot_pixel, [], ["hot"]),
    ("no manufacturer", _no_manufacturer, ["--collimator", "GE-MEGP"], ["manufacturer"]),
]


@pytest.mark.parametrize("change, options, words", [case[1:] for case in WARNED], ids=[case[0] for case in WARNED])
def test_suspicious_but_legal_is_warned_and_reconstructed(capsys, tmp_path, small_study, change, options, words):
    nm = _mutated(small_study["nm"], tmp_path, change)
    image, provenance, stderr = _reconstruct(capsys, tmp_path, nm, *options)
    assert np.all(np.isfinite(image)) and image.sum() > 0
    warned = [w for w in provenance["warnings"] if all(word.lower() in w.lower() for word in words)]
    assert len(warned) == 1, provenance["warnings"]
    assert f"warning: {warned[0]}" in stderr


def test_unmodified_study_has_no_header_warning(capsys, small_study):
    code, stdout_err = main(["info", str(small_study["nm"])]), capsys.readouterr()
    assert code == 0
    warnings = [line for line in stdout_err.out.splitlines() if line.startswith("- warning:")]
    assert all("CT" in w for w in warnings), warnings  # only that no CT was given


# ------------------------------------------------------------------------- the real GE study

def _reversed_photopeak_window(ds):
    limits = ds.EnergyWindowInformationSequence[1].EnergyWindowRangeSequence[0]  # 187-229 keV in the real study
    limits.EnergyWindowLowerLimit, limits.EnergyWindowUpperLimit = limits.EnergyWindowUpperLimit, limits.EnergyWindowLowerLimit


REAL_REFUSED = [
    ("angular step 3 over 360 degrees", _set(_rotation, "AngularStep", "3"), ["angular step", "scan arc"]),
    ("30 of 60 views declared", _set(_rotation, "NumberOfFramesInRotation", 30), ["frames"]),
    ("radius zero", _set(_rotation, "RadialPosition", "0"), ["radial position"]),
    ("photopeak window reversed", _reversed_photopeak_window, ["energy window", "lower"]),
    ("negative frame duration", _set(_rotation, "ActualFrameDuration", -25000), ["frame duration"]),
    ("frames disagree with pixel data", _set(_top, "NumberOfFrames", 300), ["number of frames", "pixel data"]),
]


@pytest.mark.real_data
@pytest.mark.parametrize("change, words", [case[1:] for case in REAL_REFUSED], ids=[case[0] for case in REAL_REFUSED])
def test_real_study_refused_in_one_sentence(capsys, tmp_path, real_study, change, words):
    nm = _mutated(real_study["nm"], tmp_path, change)
    assert_refused(*run_cli(capsys, "info", nm), *words)


@pytest.mark.real_data
def test_real_study_lowercase_direction_read_as_counter_clockwise(tmp_path, real_study):
    from sspect.io.nm import read_projections

    nm = _mutated(real_study["nm"], tmp_path, _set(_rotation, "RotationDirection", "cc"))
    mutated, original = read_projections(str(nm)), read_projections(str(real_study["nm"]))
    assert mutated.rotation_directions == ["CC"]
    np.testing.assert_array_equal(mutated.angles_deg, original.angles_deg)
    np.testing.assert_array_equal(mutated.projections, original.projections)


# ------------------------------------------------------------------------- random headers

HEADER_FIELDS = [  # (where, keyword)
    (_rotation, "RotationDirection"), (_rotation, "AngularStep"), (_rotation, "ScanArc"), (_rotation, "StartAngle"),
    (_rotation, "NumberOfFramesInRotation"), (_rotation, "RadialPosition"), (_rotation, "ActualFrameDuration"),
    (_rotation, "TableHeight"), (_detector, "ImagePositionPatient"), (_top, "NumberOfFrames"), (_top, "PixelSpacing"),
    (_top, "NumberOfDetectors"), (_top, "Rows"), (_top, "Manufacturer"),
    (_window_range, "EnergyWindowLowerLimit"), (_window_range, "EnergyWindowUpperLimit"),
]
TEXT_VALUES = st.one_of(
    st.just(None), st.integers(-100000, 100000).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: f"{v:.6g}"),
    st.sampled_from(["", "CC", "cw", "CCW", "abc", "1e400", "-0"]),
    st.lists(st.integers(-400, 400).map(str), min_size=0, max_size=30),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(range(len(HEADER_FIELDS))), TEXT_VALUES), min_size=1, max_size=3))
def test_random_header_succeeds_finite_or_refused_in_one_sentence(capsys, tmp_path, small_study, changes):
    """Whatever a header holds, the run ends in a finite image or in one sentence with exit 2."""
    def change(ds):
        for field, value in changes:
            where, keyword = HEADER_FIELDS[field]
            item = where(ds)
            if value is None:
                if keyword in item:
                    delattr(item, keyword)
                continue
            try:
                setattr(item, keyword, value)
            except (ValueError, TypeError, OverflowError):
                pass  # pydicom itself refuses to hold this value; nothing a user could hand us

    try:
        nm = _mutated(small_study["nm"], tmp_path, change)
    except (ValueError, TypeError, OverflowError, KeyError, OSError):
        return  # pydicom cannot write this header, so no user can hand it to us
    out = tmp_path / "out"
    code, stderr = run_cli(capsys, "reconstruct", "--nm", nm, "--out", out, "--iterations", "1", "--subsets", "2",
                        "--formats", "nrrd", "--name", "image", "--overwrite")
    assert "Traceback" not in stderr
    if code == 0:
        image = read_image(next(out.rglob("image.nrrd"))).array
        assert np.all(np.isfinite(image)) and np.all(image >= 0)
    else:
        assert_refused(code, stderr)
