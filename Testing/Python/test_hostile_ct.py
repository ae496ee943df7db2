"""A corpus of hostile CT series, each a mutated copy of a CT series on disk (the small simulated study's or the
real study's): every case ends in one sentence (exit 2, no traceback) or, when the input is legal but suspicious,
in a warning and a finite image.

Refusals run `sspect info NM --ct CT`, which reads and checks the CT without reconstructing; warnings run a
one-iteration reconstruction, so that the image is known to come out.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from cli_outcomes import assert_refused, run_cli
from sspect.io.volume_files import read_image

AIR_STORED = 24  # the stored value of -1000 HU in both CTs (Rescale Intercept -1024, Rescale Slope 1)
SMALL_UID = "1.2.3.4"  # sorts before any UID pydicom or a scanner makes ("1.2.8..."), so it wins the last tie-break



def _reconstruct(capsys, tmp_path, nm, ct, *extra):
    args = ["reconstruct", "--nm", nm, "--ct", ct, "--out", tmp_path / "out", "--iterations", "1", "--subsets", "2",
            "--formats", "nrrd", *extra]
    return run_cli(capsys, *args)


def _assert_warned(capsys, tmp_path, nm, ct, phrases, *extra):
    """Exit 0, a finite image, and each phrase in a warning of the provenance and of stderr."""
    code, stderr = _reconstruct(capsys, tmp_path, nm, ct, *extra)
    assert code == 0 and "Traceback" not in stderr and "sspect: " not in stderr, stderr
    provenance = json.loads(next((tmp_path / "out").glob("*/*_provenance.json")).read_text())
    image = read_image(next((tmp_path / "out").glob("*/*.nrrd")))
    assert np.all(np.isfinite(image.array)) and image.array.max() > 0
    printed = "\n".join(line for line in stderr.splitlines() if line.startswith("warning: "))
    for phrase in phrases:
        assert phrase.lower() in "\n".join(provenance["warnings"]).lower(), provenance["warnings"]
        assert phrase.lower() in printed.lower(), stderr


def _write_copy(files, folder, mutate):
    """Copy the series (slices inferior first) into ``folder`` after ``mutate`` changed the list of datasets."""
    folder.mkdir()
    datasets = mutate([pydicom.dcmread(f) for f in files])
    for number, ds in enumerate(datasets):
        ds.save_as(folder / f"CT{number:04d}.dcm")
    return folder


# mutations: each takes the list of slice datasets and returns the list to write

def on(index, *changes):
    """Apply the changes to one slice (an int) or to all (None)."""
    def mutate(slices):
        for ds in slices if index is None else [slices[index]]:
            for change in changes:
                change(ds)
        return slices
    return mutate


def drop(keyword):
    return lambda ds: delattr(ds, keyword)


def put(keyword, text):
    """Write ``text`` as the attribute's raw value, as a broken exporter would (pydicom would refuse to)."""
    def change(ds):
        value = text.encode() + b" " * (len(text) % 2)
        tag = Tag(tag_for_keyword(keyword))
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    return change


def half_rows(ds):
    """The slice cut to its upper half, header and pixels agreeing: a slice of another size."""
    ds.PixelData = ds.pixel_array[: ds.Rows // 2].tobytes()
    ds.Rows = ds.Rows // 2


def rotated_about_z(degrees, centre_xy):
    """The slice turned in its plane about the z axis through ``centre_xy``: legal geometry, oblique."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))

    def change(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        dx, dy = x - centre_xy[0], y - centre_xy[1]
        ds.ImagePositionPatient = [f"{centre_xy[0] + c * dx - s * dy:.6f}", f"{centre_xy[1] + s * dx + c * dy:.6f}", f"{z:.6f}"]
        ds.ImageOrientationPatient = [f"{c:.6f}", f"{s:.6f}", "0", f"{-s:.6f}", f"{c:.6f}", "0"]
    return change


def oblique(slices):
    """The whole series turned 10 deg about the z axis through its centre."""
    first = slices[0]
    extent = (np.array([first.Columns, first.Rows]) - 1) * np.array([float(v) for v in first.PixelSpacing])[::-1]
    centre = np.array([float(v) for v in first.ImagePositionPatient[:2]]) + extent / 2
    return on(None, rotated_about_z(10.0, centre))(slices)


def sheared(slices):
    """Axial slices each moved 3 mm further in x: the stack leans, as a tilted gantry writes it."""
    for k, ds in enumerate(slices):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x + 3.0 * k:.6f}", f"{y:.6f}", f"{z:.6f}"]
    return slices


def as_copy(ds, *changes):
    """``ds`` made a slice of another series (SMALL_UID), with the changes applied."""
    ds.SeriesInstanceUID, ds.SOPInstanceUID = SMALL_UID, generate_uid()
    for change in changes:
        change(ds)
    return ds


def with_copy(*changes, slices=None):
    """The series plus a copy of it (or of its first ``slices``) as another series, the changes applied to the copy."""
    return lambda originals: originals + [as_copy(copy.deepcopy(ds), *changes) for ds in originals[:slices]]


def set_to(keyword, value):
    return lambda ds: setattr(ds, keyword, value)


def air(ds):
    ds.SeriesDescription = "air copy"
    ds.PixelData = np.full((ds.Rows, ds.Columns), AIR_STORED, np.int16).tobytes()


def localizer_beside_derived(slices):
    """A DERIVED volume (as the real study's CT is) and an ORIGINAL one-slice scout of the same Frame of Reference."""
    for ds in slices:
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    scout = copy.deepcopy(slices[0])
    scout.SeriesInstanceUID, scout.ImageType = SMALL_UID, ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return slices + [scout]


REFUSED = [
    pytest.param(on(5, drop("ImagePositionPatient")), ("lacks Image Position (Patient)", "CT0005", "export the CT series again"), id="one-slice-without-position"),
    pytest.param(on(None, drop("ImagePositionPatient")), ("lacks Image Position (Patient)",), id="no-slice-with-position"),
    pytest.param(on(7, drop("ImageOrientationPatient")), ("lacks Image Orientation (Patient)", "CT0007"), id="slice-without-orientation"),
    pytest.param(on(9, drop("PixelSpacing")), ("lacks Pixel Spacing", "CT0009"), id="slice-without-pixel-spacing"),
    pytest.param(on(None, drop("RescaleIntercept")), ("lacks Rescale Intercept",), id="no-rescale-intercept"),
    pytest.param(on(3, drop("RescaleSlope")), ("lacks Rescale Slope", "CT0003"), id="slice-without-rescale-slope"),
    pytest.param(on(None, put("RescaleIntercept", "NaN")), ("Rescale Intercept 'nan'", "finite"), id="rescale-intercept-nan"),
    pytest.param(on(4, put("RescaleSlope", "inf")), ("Rescale Slope 'inf'", "finite"), id="rescale-slope-infinite"),
    pytest.param(on(None, set_to("RescaleSlope", "0")), ("Rescale Slope 0", "must be positive"), id="rescale-slope-zero"),
    pytest.param(on(6, set_to("RescaleSlope", "1e300")), ("beyond any CT", "CT0006"), id="rescale-slope-overflowing"),
    pytest.param(on(None, set_to("PixelSpacing", ["0", "12"])), ("Pixel Spacing 0 x 12 mm", "must be positive"), id="pixel-spacing-zero"),
    pytest.param(on(None, set_to("PixelSpacing", ["-12", "-12"])), ("Pixel Spacing -12 x -12 mm", "must be positive"), id="pixel-spacing-negative"),
    pytest.param(on(None, put("PixelSpacing", "nan\\12")), ("Pixel Spacing", "not 2 finite numbers"), id="pixel-spacing-nan"),
    pytest.param(on(2, put("PixelSpacing", "abc\\12")), ("Pixel Spacing 'abc\\12'", "not 2 finite numbers", "CT0002"), id="pixel-spacing-text"),
    pytest.param(on(None, set_to("PixelSpacing", "12")), ("Pixel Spacing '12'", "not 2 finite numbers"), id="pixel-spacing-one-value"),
    pytest.param(on(8, put("PixelSpacing", "")), ("lacks Pixel Spacing", "CT0008"), id="pixel-spacing-empty"),
    pytest.param(on(10, put("ImagePositionPatient", "inf\\0\\0")), ("Image Position (Patient) 'inf\\0\\0'", "not 3 finite numbers"), id="position-infinite"),
    pytest.param(on(11, set_to("ImagePositionPatient", ["0", "0"])), ("Image Position (Patient) '0\\0'", "not 3 finite numbers"), id="position-two-values"),
    pytest.param(on(12, half_rows), ("differ in size", "32x32 and 16x32 pixels"), id="slices-of-different-size"),
    pytest.param(on(13, set_to("PixelSpacing", ["11", "11"])), ("differ in Pixel Spacing", "12 x 12 and 11 x 11 mm"), id="slices-of-different-spacing"),
    pytest.param(on(14, rotated_about_z(10.0, (0.0, 0.0))), ("differ in Image Orientation (Patient)",), id="slices-of-different-orientation"),
    pytest.param(on(15, set_to("FrameOfReferenceUID", "1.2.3.4.5")), ("differ in Frame of Reference",), id="slices-of-different-frames"),
    pytest.param(on(None, set_to("ImageOrientationPatient", ["2", "0", "0", "0", "1", "0"])), ("not orthogonal unit vectors",), id="orientation-not-unit"),
    pytest.param(on(None, set_to("ImageOrientationPatient", ["1", "0", "0", "0.5", "0.866025", "0"])), ("not orthogonal unit vectors",), id="orientation-not-orthogonal"),
    pytest.param(on(16, set_to("Rows", 0)), ("0 rows and 32 columns", "CT0016"), id="zero-rows"),
    pytest.param(lambda slices: slices[:1], ("only one slice", "give the folder (or files) of the whole CT series"), id="single-slice"),
    pytest.param(on(17, set_to("PixelData", b"\0\0")), ("cannot be read", "CT0017"), id="undecodable-pixel-data"),
    pytest.param(on(18, drop("SeriesInstanceUID")), ("lacks Series Instance UID", "CT0018"), id="slice-without-series-uid"),
    pytest.param(sheared, ("shifted sideways", "resample the CT"), id="slices-sheared-as-a-tilted-gantry-writes-them"),
    pytest.param(on(None, set_to("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2.1")), ("Enhanced (multi-frame) CT", "one file per slice"), id="enhanced-ct"),
]


@pytest.mark.parametrize("mutate,words", REFUSED)
def test_hostile_ct_is_refused_in_one_sentence(capsys, tmp_path, small_study, mutate, words):
    ct = _write_copy(small_study["ct_files"], tmp_path / "ct", mutate)
    assert_refused(*run_cli(capsys, "info", small_study["nm"], "--ct", ct), *words)


WARNED = [
    pytest.param(oblique, ("The CT slices are oblique (tilted 10.0 deg); they were resampled onto the SPECT grid.",), id="oblique"),
    pytest.param(with_copy(air), ("2 CT series were given", "'air copy' (32 slices, 1.2.3.4) was used because it has the smallest Series Instance UID",
                                  "'air copy' (32 slices, 1.2.3.4) holds only air"), id="air-copy-as-second-series"),
    pytest.param(with_copy(set_to("ImageType", ["DERIVED", "SECONDARY", "AXIAL"])), ("because it is ORIGINAL, not DERIVED", "(32 slices, 1.2.3.4) ignored"), id="derived-copy-ignored"),
    pytest.param(with_copy(slices=20), ("because it has the most slices", "(20 slices, 1.2.3.4) ignored"), id="shorter-copy-ignored"),
    pytest.param(with_copy(set_to("FrameOfReferenceUID", "1.2.3.4.5"), drop("ImagePositionPatient")),
                 ("because it is in the SPECT's Frame of Reference",), id="broken-series-of-another-frame-ignored"),
    pytest.param(localizer_beside_derived, ("because it is a volume, not a localizer or a single slice",), id="scout-beside-derived-volume"),
    pytest.param(on(None, set_to("RescaleIntercept", "0")), ("holds almost no air", "Rescale Intercept"), id="intercept-zero-instead-of-1024"),
    pytest.param(on(None, drop("KVP"), drop("ManufacturerModelName")), ("no valid tube voltage (KVP)", "assumed 120 kV"), id="no-kvp-no-model"),
    pytest.param(on(None, put("KVP", "abc")), ("no valid tube voltage (KVP)",), id="kvp-text"),
]


@pytest.mark.parametrize("mutate,phrases", WARNED)
def test_suspicious_ct_is_reconstructed_with_a_warning(capsys, tmp_path, small_study, one_torch_thread, mutate, phrases):
    ct = _write_copy(small_study["ct_files"], tmp_path / "ct", mutate)
    _assert_warned(capsys, tmp_path, small_study["nm"], ct, phrases)


def _real_ct(real_study, folder, changes):
    """The real CT in ``folder``: links to the slices left alone, mutated copies of those named in ``changes``."""
    folder.mkdir()
    for original in Path(real_study["ct"]).iterdir():
        if original.name in changes:
            ds = pydicom.dcmread(original)
            changes[original.name](ds)
            ds.save_as(folder / original.name)
        else:
            (folder / original.name).symlink_to(original)
    return folder


REAL_REFUSED = [
    pytest.param({"CT0150.dcm": drop("RescaleIntercept")}, ("lacks Rescale Intercept", "CT0150.dcm"), id="real-slice-without-intercept"),
    pytest.param({"CT0151.dcm": set_to("PixelSpacing", ["2.0", "2.0"])}, ("differ in Pixel Spacing", "CT0151.dcm"), id="real-slice-of-other-spacing"),
]


@pytest.mark.real_data
@pytest.mark.parametrize("changes,words", REAL_REFUSED)
def test_hostile_real_ct_is_refused_in_one_sentence(capsys, tmp_path, real_study, changes, words):
    ct = _real_ct(real_study, tmp_path / "ct", changes)
    assert_refused(*run_cli(capsys, "info", real_study["nm"], "--ct", ct), *words)


@pytest.mark.real_data
def test_real_ct_beside_its_air_copy_is_reconstructed_with_a_warning(capsys, tmp_path, real_study):
    """The corpus case: a copy of the real CT with its pixels set to air, as a second series that wins the rule."""
    ct = _real_ct(real_study, tmp_path / "ct", {})
    for original in Path(real_study["ct"]).iterdir():
        as_copy(pydicom.dcmread(original), air).save_as(ct / f"air_{original.name}")
    # binned 4x4 on the detector: the CT is read and resampled in full, the reconstruction is quick
    _assert_warned(capsys, tmp_path, real_study["nm"], ct, ("2 CT series were given", "'air copy' (303 slices, 1.2.3.4) holds only air"),
                   "--binning", "4")


# ------------------------------------------------------------------------- random headers

RANDOM_KEYWORDS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleIntercept", "RescaleSlope",
                   "Rows", "Columns", "KVP", "FrameOfReferenceUID", "SeriesInstanceUID", "ImageType", "SliceThickness"]
RAW_TEXT = st.one_of(
    st.sampled_from(["", "0", "-1", "nan", "inf", "1e400", "abc", "0\\0\\0", "1\\0\\0\\0\\1\\0", "1\\0\\0\\0\\0\\0",
                     "-1024", "1\\1", "0.5\\0.5", "1.2.3", "ORIGINAL\\PRIMARY\\AXIAL"]),
    st.lists(st.floats(-1e4, 1e4, allow_nan=False).map(lambda v: f"{v:.4g}"), min_size=1, max_size=7).map("\\".join),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(RANDOM_KEYWORDS), st.one_of(st.none(), RAW_TEXT),
                                  st.one_of(st.none(), st.integers(0, 31))), min_size=1, max_size=3))
def test_random_ct_header_succeeds_finite_or_refused_in_one_sentence(capsys, tmp_path_factory, small_study, changes):
    """Whatever the slices' headers hold (on one slice or all), the run ends in a finite image or in one sentence."""
    folder = tmp_path_factory.mktemp("random_ct")

    def mutate(slices):
        for keyword, text, index in changes:
            for ds in slices if index is None else [slices[index]]:
                if text is None:
                    if keyword in ds:
                        delattr(ds, keyword)
                else:
                    put(keyword, text)(ds)
        return slices

    ct = _write_copy(small_study["ct_files"], folder / "ct", mutate)
    code, stderr = run_cli(capsys, "reconstruct", "--nm", small_study["nm"], "--ct", ct, "--out", folder / "out",
                        "--iterations", "1", "--subsets", "2", "--formats", "nrrd")
    assert "Traceback" not in stderr
    if code == 0:
        image = read_image(next((folder / "out").glob("*/*.nrrd")))
        assert np.all(np.isfinite(image.array)) and image.array.min() >= 0
    else:
        assert_refused(code, stderr)
