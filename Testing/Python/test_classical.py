"""The classical methods (OSEM, OSL-MAP, BSREM, kernel EM from PyTomography) on the small simulated study: images, calibration, progress."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from sspect.errors import SSPECTError
from sspect.methods import Cancelled, Events, get_method
from sspect.pipeline import Settings, bed_problem, reconstruct_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem_without_ct(study):
    return bed_problem(dataclasses.replace(study, ct=None), device="cpu")


@pytest.fixture(scope="module")
def regions(small_study):
    """Uniform regions of the phantom, away from edges: the liver without its lesion, and the body."""
    phantom = small_study["phantom"]
    labels, names = phantom.labels, phantom.label_names
    liver = binary_erosion(labels == names["liver"]) & ~binary_dilation(labels == names["lesion_liver"], iterations=2)
    body = binary_erosion(labels == names["body"], iterations=2)
    assert liver.sum() > 100 and body.sum() > 1000
    return {"liver": liver, "body": body}


def coefficient_of_variation(image, mask) -> float:
    values = image[mask]
    return float(values.std() / values.mean())


# ---------------------------------------------------------------- MAP methods run

# Far enough along OSEM's path for its noise to dominate: at 3 x 4 the smoothed scatter estimate
# leaves OSEM's liver nearly as smooth as a prior's on this small study.
NOISY_SCHEDULE = {"iterations": 6, "subsets": 4}


@pytest.mark.parametrize("method,extra", [
    ("osl-map", {}),
    ("osl-map", {"ct_weights": True}),
    ("bsrem", {}),
    ("bsrem", {"ct_weights": True, "ct_neighbours": 6}),
])
def test_map_methods_give_finite_non_negative_images(problem, method, extra):
    result = get_method(method).reconstruct(problem, {"iterations": 2, "subsets": 4, **extra})
    image = result.image
    assert image.shape == (32, 32, 32)
    assert np.all(np.isfinite(image)) and image.min() >= 0 and image.max() > 0
    assert result.info["iterations"] == 2 and result.info["subsets"] == 4


@pytest.mark.parametrize("method", ["osl-map", "bsrem"])
def test_ct_weights_without_a_ct_are_refused(problem_without_ct, method):
    with pytest.raises(SSPECTError, match="need a CT"):
        get_method(method).reconstruct(problem_without_ct, {"iterations": 1, "subsets": 4, "ct_weights": True})


def test_bsrem_with_rdp_is_less_noisy_than_osem_at_the_same_iterations(problem, regions):
    schedule = NOISY_SCHEDULE
    osem = get_method("osem").reconstruct(problem, schedule).image
    bsrem = get_method("bsrem").reconstruct(problem, {**schedule, "beta": 0.3}).image
    for name, mask in regions.items():
        cov_osem, cov_bsrem = coefficient_of_variation(osem, mask), coefficient_of_variation(bsrem, mask)
        assert cov_bsrem < 0.9 * cov_osem, f"{name}: BSREM CoV {cov_bsrem:.3f}, OSEM CoV {cov_osem:.3f}"
        # smoother, not emptier: the regional mean stays close to OSEM's
        assert abs(bsrem[mask].mean() / osem[mask].mean() - 1) < 0.15, name


# ---------------------------------------------------------------- kernel EM


def test_kernel_em_is_smoother_than_osem_and_keeps_the_regional_means(problem, regions):
    schedule = NOISY_SCHEDULE
    osem = get_method("osem").reconstruct(problem, schedule).image
    kem = get_method("kem").reconstruct(problem, {**schedule, "distance_sigma_mm": 12.0}).image
    assert np.all(np.isfinite(kem)) and kem.min() >= 0
    assert abs(kem.sum() / osem.sum() - 1) < 0.01
    for name, mask in regions.items():
        cov_osem, cov_kem = coefficient_of_variation(osem, mask), coefficient_of_variation(kem, mask)
        assert cov_kem < 0.95 * cov_osem, f"{name}: KEM CoV {cov_kem:.3f}, OSEM CoV {cov_osem:.3f}"
        assert abs(kem[mask].mean() / osem[mask].mean() - 1) < 0.05, name


def test_kernel_em_follows_the_ct_and_spills_less_into_air_than_a_ct_blind_kernel(problem, small_study):
    """With the CT's width set so wide that every neighbour looks alike, the kernel is a plain blur."""
    labels = small_study["phantom"].labels
    air = ~binary_dilation(labels > 0, iterations=1)
    schedule = {"iterations": 3, "subsets": 4, "distance_sigma_mm": 12.0}

    def spilled(ct_sigma):
        image = get_method("kem").reconstruct(problem, {**schedule, "ct_sigma": ct_sigma}).image
        return image[air].sum() / image.sum()

    assert spilled(0.1) < 0.95 * spilled(10.0)


def test_kernel_em_without_a_ct_is_refused(problem_without_ct):
    with pytest.raises(SSPECTError, match="needs a CT"):
        get_method("kem").reconstruct(problem_without_ct, {"iterations": 1, "subsets": 4})


# ---------------------------------------------------------------- calibration


def test_calibrated_osem_recovers_the_total_activity(small_study, study):
    phantom = small_study["phantom"]
    settings = Settings(method="osem", params={"iterations": 6, "subsets": 4}, device="cpu",
                        calibration_cps_per_MBq=small_study["sensitivity_cps_per_mbq"])
    with contextlib.redirect_stdout(io.StringIO()):
        image, provenance = reconstruct_study(study, settings)
    assert image.unit == "Bq/mL" and provenance["unit"] == "Bq/mL"
    total_mbq = float(image.array.sum(dtype=np.float64)) * image.voxel_volume_ml / 1e6
    truth_mbq = phantom.total_activity_mbq()
    assert abs(total_mbq / truth_mbq - 1) < 0.05, f"{total_mbq:.1f} MBq reconstructed, {truth_mbq:.1f} MBq true"
    liver = phantom.labels == phantom.label_names["liver"]
    assert abs(image.array[liver].mean() / 1e6 / phantom.activity[liver].mean() - 1) < 0.15


def test_uncalibrated_image_is_in_counts(study):
    settings = Settings(method="osem", params={"iterations": 1, "subsets": 4}, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        image, provenance = reconstruct_study(study, settings)
    assert image.unit == "counts" and provenance["unit"] == "counts"
    assert provenance["calibration_cps_per_MBq"] is None


# ---------------------------------------------------------------- progress and cancellation


@pytest.mark.parametrize("method", ["osem", "osl-map", "bsrem", "kem"])
def test_progress_reaches_one(problem, method):
    events = []
    get_method(method).reconstruct(problem, {"iterations": 2, "subsets": 3}, Events(events.append))
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert len(fractions) == 6 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert math.isclose(fractions[0], 1 / 6, abs_tol=1e-4)
    assert [(e["iteration"], e["subset"]) for e in progress] == [(i, s) for i in (1, 2) for s in (1, 2, 3)]


def test_should_stop_cancels_through_the_pipeline(study, stop_after):
    """The caller's should_stop must reach the method when the pipeline wraps the events per bed."""
    events, seen = stop_after(2)
    settings = Settings(method="osem", params={"iterations": 3, "subsets": 4}, device="cpu")
    with pytest.raises(Cancelled), contextlib.redirect_stdout(io.StringIO()):
        reconstruct_study(study, settings, events)
    assert len(seen) == 2
