"""Evaluation metrics on hand-built inputs whose answers are known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sspect.eval.metrics import (activity_error_percent, checkerboard_index, near_nyquist_power_fraction, background_cov, background_rois, bias_variance,
                                 bias_variance_curve, coefficient_of_variation, contrast_recovery, evaluate,
                                 nrmse, recovery_coefficient, region_activity, region_masks, ssim,
                                 total_activity_error_percent)
from sspect.sim.phantoms.demo import demo_phantom
from sspect.sim.phantoms.geometry import Phantom

SHAPE = (16, 16, 16)


def sphere_mask(shape=SHAPE, centre=(8, 8, 8), radius=3.0):
    i, j, k = np.indices(shape)
    return (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius ** 2


@pytest.fixture
def hot_sphere():
    """Truth: background 1, sphere 4 (4:1). Image: background 1, sphere 3."""
    sphere = sphere_mask()
    truth = np.where(sphere, 4.0, 1.0)
    image = np.where(sphere, 3.0, 1.0)
    return image, truth, sphere, ~sphere


def test_recovery_coefficient_mean_and_max(hot_sphere):
    image, truth, sphere, _ = hot_sphere
    assert recovery_coefficient(image, truth, sphere) == pytest.approx(0.75)
    # One hot voxel: the max sees it, the mean sees 1/N of it.
    image = image.copy()
    centre = (8, 8, 8)
    image[centre] = 5.0
    n = sphere.sum()
    assert recovery_coefficient(image, truth, sphere, kind="max") == pytest.approx(5.0 / 4.0)
    assert recovery_coefficient(image, truth, sphere, kind="mean") == pytest.approx((3.0 * (n - 1) + 5.0) / n / 4.0)
    with pytest.raises(ValueError):
        recovery_coefficient(image, truth, sphere, kind="median")


def test_recovery_coefficient_uses_true_mean_not_max():
    truth = np.array([[[2.0, 6.0]]])  # true mean 4
    image = np.array([[[4.0, 4.0]]])
    assert recovery_coefficient(image, truth, np.ones_like(truth, bool)) == pytest.approx(1.0)


def test_contrast_recovery(hot_sphere):
    image, truth, sphere, background = hot_sphere
    assert contrast_recovery(image, truth, sphere, background) == pytest.approx((3 - 1) / (4 - 1))
    # Contrast, not absolute level: a global scale leaves it unchanged ...
    assert contrast_recovery(2.5 * image, truth, sphere, background) == pytest.approx(2 / 3)
    # ... while a raised background lowers it: (3/1.5 - 1) / (4 - 1).
    raised = np.where(sphere, 3.0, 1.5)
    assert contrast_recovery(raised, truth, sphere, background) == pytest.approx(1 / 3)
    # Cold region (true contrast 0.25:1) recovered at 0.5:1 -> (0.5 - 1) / (0.25 - 1).
    cold_truth = np.where(sphere, 0.25, 1.0)
    cold_image = np.where(sphere, 0.5, 1.0)
    assert contrast_recovery(cold_image, cold_truth, sphere, background) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):  # no true contrast: undefined
        contrast_recovery(image, np.ones(SHAPE), sphere, background)


def test_coefficient_of_variation_two_valued_region():
    image = np.zeros((4, 4, 4))
    image[:2] = 1.0
    image[2:] = 3.0  # mean 2, population SD 1
    mask = np.ones(image.shape, bool)
    assert coefficient_of_variation(image, mask) == pytest.approx(0.5)
    n = mask.sum()
    assert coefficient_of_variation(image, mask, ddof=1) == pytest.approx(0.5 * math.sqrt(n / (n - 1)))
    # Only the voxels in the mask count: a uniform half has CoV 0.
    half = np.zeros(image.shape, bool)
    half[2:] = True
    assert coefficient_of_variation(image, half) == pytest.approx(0.0)


def test_background_rois_and_background_cov():
    mask = np.zeros((6, 6, 3), bool)
    mask[:, :4] = True  # room for 2 x 1 boxes of 3x3x3
    rois = background_rois(mask, (3, 3, 3))
    assert rois.dtype == np.int32 and rois.max() == 2
    assert np.all(mask[rois > 0])
    image = np.where(rois == 1, 1.0, 3.0)  # ROI means 1 and 3 -> mean 2, sample SD sqrt(2)
    assert background_cov(image, rois) == pytest.approx(math.sqrt(2) / 2)
    assert background_cov(image, [rois == 1, rois == 2]) == pytest.approx(math.sqrt(2) / 2)
    # Voxel noise that averages out inside each ROI leaves the ROI-scale variability at 0,
    # while the voxel CoV of the same region is not 0.
    noisy = np.full(mask.shape, 7.0)
    for roi in (1, 2):
        noisy[rois == roi] = 2.0 + np.linspace(-1.0, 1.0, 27)
    assert background_cov(noisy, rois) == pytest.approx(0.0, abs=1e-12)
    assert coefficient_of_variation(noisy, rois > 0) == pytest.approx(np.std(np.linspace(-1, 1, 27)) / 2.0)
    with pytest.raises(ValueError):
        background_cov(image, rois == 1)


def test_nrmse():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 2.0, SHAPE)
    assert nrmse(1.1 * truth, truth) == pytest.approx(0.1)
    assert nrmse(truth, truth) == 0.0
    # Normalised by ||t|| (RMS of the truth), not by its mean or range.
    image = truth + 1.0
    assert nrmse(image, truth) == pytest.approx(1.0 / np.sqrt(np.mean(truth ** 2)))
    # Only the masked voxels count.
    mask = np.zeros(SHAPE, bool)
    mask[:8] = True
    image = np.where(mask, 0.8 * truth, 100.0)
    assert nrmse(image, truth, mask) == pytest.approx(0.2)


def test_ssim_identical_is_one_and_falls_with_noise():
    truth = np.where(sphere_mask(), 4.0, 1.0)
    assert ssim(truth, truth) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    scores = [ssim(truth + sigma * rng.standard_normal(SHAPE), truth) for sigma in (0.05, 0.3, 1.0)]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    # A thin volume still works (window shrinks to 5).
    thin = truth[:, :, 5:10]
    assert ssim(thin, thin) == pytest.approx(1.0)
    # data_range defaults to the truth's range: a larger one is more forgiving.
    noisy = truth + 0.3 * rng.standard_normal(SHAPE)
    assert ssim(noisy, truth, data_range=30.0) > ssim(noisy, truth)
    assert ssim(noisy, truth) == pytest.approx(ssim(noisy, truth, data_range=3.0))


def test_activity_errors():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.1, 1.0, SHAPE)
    mask = sphere_mask()
    assert activity_error_percent(1.05 * truth, truth, mask, voxel_ml=0.512) == pytest.approx(5.0)
    assert total_activity_error_percent(1.05 * truth, truth) == pytest.approx(5.0)
    # Activity, not mean concentration: spreading the same counts inside the mask is no error.
    image = truth.copy()
    image[mask] = truth[mask].mean()
    assert activity_error_percent(image, truth, mask) == pytest.approx(0.0)
    # Counts leaking out of the region are lost from it, not from the total.
    image = truth.copy()
    lost = 0.1 * truth[mask].sum()
    image[mask] *= 0.9
    image[~mask] += lost / (~mask).sum()
    assert activity_error_percent(image, truth, mask) == pytest.approx(-10.0)
    assert total_activity_error_percent(image, truth) == pytest.approx(0.0, abs=1e-9)
    assert region_activity(np.full(SHAPE, 2.0), mask, voxel_ml=0.5) == pytest.approx(mask.sum())


def test_region_masks_from_phantom_and_arrays():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    labels[2:, :2] = 2
    names = {"body": 1, "lesion": 2, "absent": 3}
    masks = region_masks(labels, names)
    assert list(masks) == ["body", "lesion", "absent"]
    assert masks["body"].sum() == 32 and masks["lesion"].sum() == 16 and not masks["absent"].any()
    assert list(region_masks(labels, names, skip_empty=True)) == ["body", "lesion"]
    phantom = Phantom(np.zeros(labels.shape, np.float32), np.zeros(labels.shape, np.float32), labels, names,
                      (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    assert np.array_equal(region_masks(phantom)["lesion"], masks["lesion"])


def test_bias_variance_known_mean_and_std():
    truth = np.full((2, 2, 2), 2.0)
    mask = np.ones(truth.shape, bool)
    # Region means 1.8, 2.0, 2.2 -> mean 2.0 (bias 0), sample SD 0.2 (10 % of 2).
    # Voxel values alternate by +-d inside each realisation: region mean is unaffected,
    # voxel ensemble SD is set by d.
    sign = np.where(np.indices(truth.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)
    images = [m + d * sign for m, d in ((1.8, 0.0), (2.0, 0.3), (2.2, -0.3))]
    stats = bias_variance(images, truth, mask)
    assert stats["n_realisations"] == 3
    assert stats["true_mean"] == pytest.approx(2.0)
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["rc"] == pytest.approx(1.0)
    assert stats["bias_pct"] == pytest.approx(0.0, abs=1e-9)
    assert stats["std_pct"] == pytest.approx(10.0)
    np.testing.assert_allclose(stats["region_means"], [1.8, 2.0, 2.2])
    # Half the voxels see (1.8, 2.3, 1.9) over the realisations, the other half (1.8, 1.7, 2.5).
    expected_voxel_sd = (np.std([1.8, 2.3, 1.9], ddof=1) + np.std([1.8, 1.7, 2.5], ddof=1)) / 2
    assert stats["noise_pct"] == pytest.approx(100 * expected_voxel_sd / 2.0)
    assert stats["noise_pct"] > stats["std_pct"]
    # A biased set: every realisation 10 % low, identical -> bias -10 %, no spread.
    stats = bias_variance(np.stack([0.9 * truth] * 4), truth, mask)
    assert stats["bias_pct"] == pytest.approx(-10.0)
    assert stats["std_pct"] == pytest.approx(0.0) and stats["noise_pct"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        bias_variance([truth], truth, mask)


def test_bias_variance_curve_on_converging_sequence():
    """Iterate n of realisation r: region mean T * (1 - 0.5**n) + noise_r * n.

    Bias falls as 100 * -0.5**n while the ensemble SD grows linearly with n: the classic
    recovery-vs-noise trade-off of OSEM iterations.
    """
    truth = np.full((3, 3, 3), 4.0)
    mask = np.ones(truth.shape, bool)
    offsets = np.array([-0.1, 0.0, 0.1])  # sample SD 0.1
    n_iter = 5
    iterates = [[truth * (1 - 0.5 ** n) + offset * n for n in range(1, n_iter + 1)] for offset in offsets]
    curve = bias_variance_curve(iterates, truth, mask)
    assert len(curve) == n_iter
    for (iteration, bias, std), n in zip(curve, range(1, n_iter + 1)):
        assert iteration == n
        assert bias == pytest.approx(-100 * 0.5 ** n)
        assert std == pytest.approx(100 * 0.1 * n / 4.0)
    biases = [b for _, b, _ in curve]
    stds = [s for _, _, s in curve]
    assert np.all(np.diff(np.abs(biases)) < 0) and np.all(np.diff(stds) > 0)
    # Custom iteration labels, voxel noise (here equal to the region SD: uniform offsets).
    curve = bias_variance_curve(iterates, truth, mask, iterations=[2, 4, 6, 8, 10], std="voxel")
    assert [c[0] for c in curve] == [2, 4, 6, 8, 10]
    assert curve[-1][2] == pytest.approx(100 * 0.1 * 5 / 4.0)
    with pytest.raises(ValueError):
        bias_variance_curve([iterates[0], iterates[1][:3]], truth, mask)


def test_evaluate_row_on_hand_built_phantom(hot_sphere):
    image, truth, sphere, background = hot_sphere
    labels = np.where(sphere, 2, 1).astype(np.uint8)
    names = {"body": 1, "lesion": 2}
    row = evaluate(image, truth, labels, names, voxel_ml=0.512)
    assert list(row)[:3] == ["nrmse", "ssim", "total_activity_error_pct"]
    assert row["rc_mean_lesion"] == pytest.approx(0.75)
    assert row["rc_max_lesion"] == pytest.approx(0.75)
    assert row["rc_mean_body"] == pytest.approx(1.0)
    assert row["activity_error_pct_lesion"] == pytest.approx(-25.0)
    assert row["activity_error_pct_body"] == pytest.approx(0.0)
    assert row["cr_lesion"] == pytest.approx(2 / 3)
    assert "cr_body" not in row  # body is the background
    assert row["cov_body"] == pytest.approx(0.0) and row["cov_lesion"] == pytest.approx(0.0)
    n = sphere.sum()
    assert row["total_activity_error_pct"] == pytest.approx(100 * (-n) / (truth.sum()))
    assert row["nrmse"] == pytest.approx(np.sqrt(n / np.sum(truth ** 2)))
    assert 0 < row["ssim"] < 1
    assert all(isinstance(v, float) for v in row.values())


def test_evaluate_on_demo_phantom_is_perfect_for_the_truth_and_nan_where_undefined():
    phantom = demo_phantom(shape=(24, 24, 24), voxel_mm=16.0)
    row = evaluate(phantom.activity, phantom)
    for name in phantom.label_names:
        if (phantom.labels == phantom.label_names[name]).any():
            assert row[f"rc_mean_{name}"] == pytest.approx(1.0)
            assert row[f"activity_error_pct_{name}"] == pytest.approx(0.0, abs=1e-9)
            assert row[f"cov_{name}"] == pytest.approx(0.0)
    assert row["nrmse"] == 0.0 and row["ssim"] == pytest.approx(1.0)
    # Regions passed explicitly; an empty one gives nan, not an exception.
    regions = {"body": phantom.labels == phantom.label_names["body"], "nothing": np.zeros(phantom.labels.shape, bool)}
    row = evaluate(1.2 * phantom.activity, phantom, regions=regions, uniform_regions=["body"])
    assert row["rc_mean_body"] == pytest.approx(1.2)
    assert math.isnan(row["rc_mean_nothing"]) and math.isnan(row["cr_nothing"])
    assert row["total_activity_error_pct"] == pytest.approx(20.0)
    with pytest.raises(ValueError):
        evaluate(phantom.activity, phantom.activity)  # no labels, no regions


def test_shape_and_mask_checks():
    truth = np.ones(SHAPE)
    with pytest.raises(ValueError):
        nrmse(np.ones((4, 4, 4)), truth)
    with pytest.raises(ValueError):  # a label array is not a mask
        recovery_coefficient(truth, truth, np.full(SHAPE, 2))
    with pytest.raises(ValueError):
        recovery_coefficient(truth, truth, np.zeros(SHAPE, bool))
    assert recovery_coefficient(truth, truth, np.ones(SHAPE, np.uint8)) == pytest.approx(1.0)


def test_near_nyquist_power_tells_a_checkerboard_from_a_smooth_image_and_from_noise():
    i, j, k = np.indices((32, 32, 32))
    smooth = np.exp(-((i - 16) ** 2 + (j - 14) ** 2 + (k - 17) ** 2) / (2 * 5.0 ** 2))
    checkerboard = 0.05 * smooth.max() * (-1.0) ** (i + j + k)  # what a stride-2 transposed convolution paints
    noise = np.random.default_rng(0).normal(size=smooth.shape)
    assert near_nyquist_power_fraction(smooth) < 1e-4
    with_pattern = near_nyquist_power_fraction(smooth + checkerboard)
    pattern_share = (checkerboard ** 2).sum() / ((smooth - smooth.mean() + checkerboard) ** 2).sum()
    assert with_pattern == pytest.approx(pattern_share, rel=0.01)
    outside = np.mean(np.abs(np.fft.fftfreq(32)) < 0.375)  # white noise: the band's share of the frequencies
    assert near_nyquist_power_fraction(noise) == pytest.approx(1 - outside ** 3, abs=0.01)
    with pytest.raises(ValueError):
        near_nyquist_power_fraction(np.ones((8, 8, 8)))


def test_checkerboard_index_tells_a_pattern_from_noise_whatever_the_noise_level():
    i, j, k = np.indices((32, 32, 32))
    smooth = np.exp(-((i - 16) ** 2 + (j - 14) ** 2 + (k - 17) ** 2) / (2 * 5.0 ** 2))
    rng = np.random.default_rng(0)
    for noise_level in (0.01, 0.1):  # white noise of any level: flat across the band
        assert 0.8 < checkerboard_index(smooth + noise_level * rng.normal(size=smooth.shape)) < 1.25
    noisy = smooth + 0.02 * rng.normal(size=smooth.shape)
    assert checkerboard_index(noisy + 0.03 * (-1.0) ** (i + j + k)) > 5  # a pattern as strong as the noise
    with pytest.raises(ValueError):
        checkerboard_index(np.ones((7, 9, 5)))
