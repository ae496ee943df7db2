"""Two beds of one study, stitched into one image on the patient's axis.

One tall phantom (32 x 32 x 48 voxels of 12 mm) is cut into two overlapping beds: bed 1 sees
slices 0..31, bed 2 slices 16..47. Each bed is simulated on its own sub-volume and written as its
own NM file with its own object origin; one CT covers both. A hot sphere sits in the part that
only bed 1 sees and another in the part that only bed 2 sees, so a bed put at the wrong height,
or the beds swapped, moves a sphere away from its LPS position.
"""
from __future__ import annotations

import contextlib
import io
import re
from datetime import datetime, timedelta

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from sspect.errors import SSPECTError
from sspect.methods import Events
from sspect.pipeline import Settings, load_study, reconstruct_study, slice_decay_factors
from sspect.physics.isotopes import LUTETIUM_177
from sspect.sim.acquisition import simulate_projections
from sspect.sim.dicom_writer import write_ct_series, write_nm_tomo
from sspect.sim.phantoms.geometry import centred_origin
from sspect.volume import Volume

LU208 = LUTETIUM_177.photopeak(208.0)

VOXEL_MM = 12.0
SHAPE = (32, 32, 48)
BED_SLICES = 32
BED_STARTS = (0, 16)  # first slice of each bed in the tall phantom
SENSITIVITY = 9.0  # cps/MBq
FRAME_S = 20.0
N_VIEWS = 24
SPHERE_RADIUS_MM = 30.0
# voxel index of each sphere centre: A only in bed 1 (slices 0..15), B only in bed 2 (32..47)
SPHERES = {"A": ((11, 13, 7), 0.6), "B": ((20, 18, 40), 0.6)}
WINDOWS = [LU208.window, LU208.upper_scatter, LU208.lower_scatter]  # GE order


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tall_phantom():
    origin = centred_origin(SHAPE, VOXEL_MM)
    x, y, z = np.meshgrid(*[origin[a] + VOXEL_MM * np.arange(SHAPE[a]) for a in range(3)], indexing="ij")
    body = x ** 2 + y ** 2 <= 140.0 ** 2
    hu = np.where(body, 20.0, -1000.0).astype(np.float32)
    activity = np.where(body, 0.01, 0.0).astype(np.float32)  # MBq/mL
    centres = {}
    for name, (index, concentration) in SPHERES.items():
        centre = np.asarray(origin) + VOXEL_MM * np.asarray(index, float)
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= SPHERE_RADIUS_MM ** 2
        activity[inside] = concentration
        centres[name] = centre
    return origin, hu, activity, centres


def _mu_map(hu, ct_files):
    from pytomography.io.SPECT.dicom import get_HU2mu_conversion

    with contextlib.redirect_stdout(io.StringIO()):
        hu_to_mu = get_HU2mu_conversion([str(f) for f in ct_files], LU208.energy_keV)
    return hu_to_mu(hu.astype(np.float64)).astype(np.float32)


def _write_bed(path, activity, mu, origin, start, study_uid, frame_uid):
    part = slice(start, start + BED_SLICES)
    simulated = simulate_projections(activity[:, :, part], mu[:, :, part], (VOXEL_MM,) * 3, n_views=N_VIEWS,
                                     radius_mm=250.0, counts_scale=SENSITIVITY * FRAME_S * VOXEL_MM ** 3 / 1000,
                                     noise=False)
    bed_origin = (origin[0], origin[1], origin[2] + start * VOXEL_MM)
    return write_nm_tomo(path, [simulated.peak, simulated.upper, simulated.lower], WINDOWS, simulated.angles_deg,
                         simulated.radii_cm, VOXEL_MM, bed_origin, frame_duration_s=FRAME_S, study_uid=study_uid,
                         frame_of_reference_uid=frame_uid)


@pytest.fixture(scope="module")
def two_beds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_beds")
    origin, hu, activity, centres = _tall_phantom()
    study_uid, frame_uid = generate_uid(), generate_uid()
    ct_files = write_ct_series(folder / "CT", Volume(hu, (VOXEL_MM,) * 3, origin, unit="HU"), study_uid, frame_uid)
    mu = _mu_map(hu, ct_files)
    beds = [_write_bed(folder / "NM" / f"bed{n + 1}.dcm", activity, mu, origin, start, study_uid, frame_uid)
            for n, start in enumerate(BED_STARTS)]
    other_study = _write_bed(folder / "other" / "bed2.dcm", activity, mu, origin, BED_STARTS[1], generate_uid(), frame_uid)
    return {"beds": beds, "ct": folder / "CT", "origin": origin, "activity": activity, "centres": centres,
            "other_study": other_study,
            "truth_mbq": float(activity.sum(dtype=np.float64)) * VOXEL_MM ** 3 / 1000}


@pytest.fixture(scope="module")
def stitched(two_beds):
    settings = Settings(method="osem", params={"iterations": 4, "subsets": 4}, device="cpu",
                        calibration_cps_per_MBq=SENSITIVITY)
    events = []
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(two_beds["beds"], two_beds["ct"], settings)
        image, provenance = reconstruct_study(study, settings, Events(events.append))
    return {"study": study, "image": image, "provenance": provenance, "events": events}


def _hot_centroid(image, k_range) -> np.ndarray:
    """LPS of the centroid of the voxels above half the maximum within slices k_range."""
    part = image.array[:, :, k_range[0]:k_range[1]]
    hot = part >= 0.5 * part.max()
    index = np.argwhere(hot).astype(float)
    weights = part[hot]
    centroid = (index * weights[:, None]).sum(axis=0) / weights.sum() + [0, 0, k_range[0]]
    return image.index_to_lps(centroid)


def test_both_beds_are_read_and_sorted_from_foot_to_head(two_beds):
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(list(reversed(two_beds["beds"])), two_beds["ct"], Settings(device="cpu"))
    assert [str(bed.path) for bed in study.beds] == [str(p) for p in two_beds["beds"]]
    assert study.warnings == []


def test_stitched_image_covers_both_beds_from_bed_one(stitched, two_beds):
    image = stitched["image"]
    assert image.array.shape == SHAPE
    np.testing.assert_allclose(image.origin, two_beds["origin"], atol=1e-6)
    np.testing.assert_allclose(image.origin, stitched["study"].beds[0].affine[:3, 3], atol=1e-6)
    np.testing.assert_allclose(image.spacing, (VOXEL_MM,) * 3)
    top = image.index_to_lps((0, 0, SHAPE[2] - 1))[2]
    assert top == pytest.approx(two_beds["origin"][2] + (SHAPE[2] - 1) * VOXEL_MM)
    assert stitched["provenance"]["geometry"]["shape"] == list(SHAPE)
    assert len(stitched["provenance"]["per_bed"]) == 2
    assert stitched["provenance"]["inputs"]["nm"] == [str(p) for p in two_beds["beds"]]


@pytest.mark.parametrize("sphere,k_range", [("A", (0, 16)), ("B", (32, 48))])
def test_hot_spheres_are_found_at_their_patient_positions(stitched, two_beds, sphere, k_range):
    found = _hot_centroid(stitched["image"], k_range)
    expected = two_beds["centres"][sphere]
    assert np.all(np.abs(found - expected) < VOXEL_MM / 2), f"sphere {sphere}: found {found}, expected {expected}"


def test_each_slice_holds_what_the_phantom_holds(stitched, two_beds):
    """The axial profile follows the phantom's through the overlap (both beds at the right height)."""
    image = stitched["image"]
    reconstructed = image.array.sum(axis=(0, 1)) * image.voxel_volume_ml / 1e6
    truth = two_beds["activity"].sum(axis=(0, 1)) * VOXEL_MM ** 3 / 1000
    inner = slice(2, SHAPE[2] - 2)  # PyTomography's stitching blanks each bed's end slices
    np.testing.assert_allclose(reconstructed[inner], truth[inner], rtol=0.1)
    assert np.argmax(reconstructed[:16]) == SPHERES["A"][0][2]
    assert np.argmax(reconstructed[32:]) + 32 == SPHERES["B"][0][2]


def test_calibrated_total_activity_of_both_beds(stitched, two_beds):
    image = stitched["image"]
    assert image.unit == "Bq/mL"
    total_mbq = float(image.array.sum(dtype=np.float64)) * image.voxel_volume_ml / 1e6
    assert abs(total_mbq / two_beds["truth_mbq"] - 1) < 0.1, (total_mbq, two_beds["truth_mbq"])


def test_progress_runs_once_over_both_beds(stitched):
    progress = [e for e in stitched["events"] if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert len(fractions) == 2 * 4 * 4
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert fractions[15] == 0.5 and progress[16]["message"].startswith("bed 2/2")


def test_beds_of_different_studies_are_refused(two_beds):
    with pytest.raises(SSPECTError) as error, contextlib.redirect_stdout(io.StringIO()):
        load_study([two_beds["beds"][0], two_beds["other_study"]], two_beds["ct"], Settings(device="cpu"))
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.;:!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message}"
    assert "same study" in message and "bed2.dcm" in message


def test_each_bed_is_decay_corrected_to_the_first_beds_start(two_beds, tmp_path):
    """Bed 2 acquired 2 days after bed 1 (an exaggeration that makes the blend measurable) carries
    2^(2 d / T1/2) more; the slices only bed 2 sees say so, those of the overlap lie between."""
    later = tmp_path / "bed2.dcm"
    ds = pydicom.dcmread(two_beds["beds"][1])
    ds.AcquisitionDate = (datetime.strptime(ds.AcquisitionDate, "%Y%m%d") + timedelta(days=2)).strftime("%Y%m%d")
    ds.save_as(later)
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study([two_beds["beds"][0], later], two_beds["ct"], Settings(device="cpu", decay_correction="start"))
    first, second = study.decay.factors
    assert second / first == pytest.approx(2 ** (2 / 6.647), rel=1e-9)  # 177Lu, NNDC
    per_slice = np.array(slice_decay_factors(study, SHAPE[2]))
    assert np.allclose(per_slice[:BED_STARTS[1]], first) and np.allclose(per_slice[BED_SLICES:], second)
    overlap = per_slice[BED_STARTS[1]:BED_SLICES]
    assert np.all((overlap >= first - 1e-9) & (overlap <= second + 1e-9)) and overlap.max() > overlap.min()


def test_decay_correction_of_beds_without_times_is_refused(two_beds, tmp_path):
    undated = []
    for number, bed in enumerate(two_beds["beds"]):
        ds = pydicom.dcmread(bed)
        ds.AcquisitionDate = ""
        ds.save_as(tmp_path / f"bed{number + 1}.dcm")
        undated.append(tmp_path / f"bed{number + 1}.dcm")
    with pytest.raises(SSPECTError, match="each bed's acquisition date and time"), contextlib.redirect_stdout(io.StringIO()):
        load_study(undated, two_beds["ct"], Settings(device="cpu", decay_correction="start"))
