"""Quantitative SPECT metrics against a known truth, in plain numpy.

Every function takes arrays of one shape: the reconstructed ``image``, the ``truth`` on the
same grid (activity concentration, e.g. MBq/mL) and boolean region masks. Statistics are
accumulated in float64 whatever the input dtype. Conventions:

* Region values are the *mean concentration in the region* (the ROI mean of NEMA NU 2 and of
  the SPECT quantification literature); "true" values come from ``truth`` in the same mask.
* A metric whose reference (denominator) is zero, or whose region is empty, raises
  ``ValueError``; :func:`evaluate` turns those into ``nan`` so a CSV row keeps its columns.
* Percentages are named ``*_pct`` / documented as such; everything else is a fraction.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "recovery_coefficient", "contrast_recovery", "coefficient_of_variation", "background_rois",
    "background_cov", "nrmse", "ssim", "region_activity", "activity_error_percent",
    "total_activity_error_percent", "region_masks", "bias_variance", "bias_variance_curve", "evaluate",
    "near_nyquist_power_fraction", "checkerboard_index",
]

# Region names tried, in order, as the background of contrast recovery when evaluate() is not told.
DEFAULT_BACKGROUND_NAMES = ("background", "body")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _unwrap(array) -> np.ndarray:
    """An ndarray from an ndarray or a ``Volume`` (anything with ``.array``), as float64."""
    return np.asarray(getattr(array, "array", array), dtype=np.float64)


def _mask(mask, shape) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"Mask shape {mask.shape} differs from image shape {tuple(shape)}.")
    if mask.dtype != bool:
        if not np.isin(np.unique(mask), (0, 1)).all():
            raise ValueError("A mask must be boolean (or 0/1); got other values, e.g. a label array.")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("The region mask is empty.")
    return mask


def _pair(image, truth) -> tuple[np.ndarray, np.ndarray]:
    image, truth = _unwrap(image), _unwrap(truth)
    if image.shape != truth.shape:
        raise ValueError(f"Image shape {image.shape} differs from truth shape {truth.shape}.")
    return image, truth


def _nonzero(value: float, what: str) -> float:
    if value == 0 or not np.isfinite(value):
        raise ValueError(f"{what} is {value}; the metric is undefined.")
    return value


# ----------------------------------------------------------------------------------------------
# Single-image region metrics
# ----------------------------------------------------------------------------------------------

def recovery_coefficient(image, truth, mask, kind: str = "mean") -> float:
    """Recovery coefficient of a region: ``RC = C_meas / C_true``.

    ``C_meas`` is the mean (``kind='mean'``, RC_mean) or the maximum (``kind='max'``, RC_max)
    of ``image`` in ``mask``; ``C_true`` is the mean of ``truth`` in ``mask``. This is the RC of
    the SPECT/PET partial-volume literature (sphere RC vs diameter in the NEMA IEC body phantom,
    e.g. 177Lu SPECT studies); 1 means full recovery, < 1 partial-volume loss.
    """
    image, truth = _pair(image, truth)
    mask = _mask(mask, image.shape)
    if kind == "mean":
        measured = image[mask].mean()
    elif kind == "max":
        measured = image[mask].max()
    else:
        raise ValueError(f"kind must be 'mean' or 'max', got {kind!r}.")
    return float(measured / _nonzero(truth[mask].mean(), "The true mean in the region"))


def contrast_recovery(image, truth, hot_mask, background_mask) -> float:
    """Contrast recovery (NEMA NU 2 percent contrast, as a fraction).

    ``CR = (C_hot / C_bkg - 1) / (A_hot / A_bkg - 1)`` with ``C`` the ROI means of ``image`` and
    ``A`` the ROI means of ``truth`` in the hot and background masks (the NEMA NU 2 image-quality
    test's percent contrast ``Q_H = 100 * CR``). 1 is perfect contrast; it also works for cold regions (A_hot < A_bkg).
    """
    image, truth = _pair(image, truth)
    hot, background = _mask(hot_mask, image.shape), _mask(background_mask, image.shape)
    measured = image[hot].mean() / _nonzero(image[background].mean(), "The image background mean")
    true = truth[hot].mean() / _nonzero(truth[background].mean(), "The true background mean")
    return float((measured - 1.0) / _nonzero(true - 1.0, "The true contrast minus 1"))


def coefficient_of_variation(image, mask, ddof: int = 0) -> float:
    """Voxel coefficient of variation in a uniform region: ``CoV = SD / mean`` (a fraction).

    ``SD`` is the standard deviation of the voxel values in ``mask`` (population SD with the
    default ``ddof=0``), ``mean`` their mean: the usual image-noise measure of the SPECT
    literature in a uniform background or organ. Multiply by 100 for percent.
    """
    image = _unwrap(image)
    values = image[_mask(mask, image.shape)]
    return float(values.std(ddof=ddof) / _nonzero(values.mean(), "The region mean"))


def background_rois(background_mask, roi_shape=(3, 3, 3)) -> np.ndarray:
    """NEMA-style background ROIs: tile the grid into ``roi_shape`` boxes, keep those inside the mask.

    Returns an int32 label array (0 = no ROI, 1..K = the K ROIs) for :func:`background_cov`.
    NEMA NU 2 places 12 circular 37 mm ROIs on 5 slices of the phantom background; boxes tiling
    an arbitrary uniform region are the generic equivalent.
    """
    mask = np.asarray(background_mask, bool)
    roi_shape = tuple(int(n) for n in roi_shape)
    if len(roi_shape) != mask.ndim or min(roi_shape) < 1:
        raise ValueError(f"roi_shape {roi_shape} does not fit a {mask.ndim}-D mask.")
    labels = np.zeros(mask.shape, np.int32)
    count = 0
    for start in np.ndindex(*(n // r for n, r in zip(mask.shape, roi_shape))):
        box = tuple(slice(s * r, (s + 1) * r) for s, r in zip(start, roi_shape))
        if mask[box].all():
            count += 1
            labels[box] = count
    return labels


def background_cov(image, rois) -> float:
    """NEMA NU 2 background variability: ``N = SD(C_k) / mean(C_k)`` over K background ROIs.

    ``C_k`` is the mean of ``image`` in ROI ``k``; ``SD`` uses ``K - 1`` (NEMA NU 2 image-quality test).
    ``rois`` is an integer label array (0 = none, as from :func:`background_rois`) or a sequence
    of boolean masks. Unlike :func:`coefficient_of_variation` this measures ROI-scale (not voxel)
    noise. Needs at least 2 ROIs.
    """
    image = _unwrap(image)
    if isinstance(rois, np.ndarray) and np.issubdtype(rois.dtype, np.integer) and rois.ndim == image.ndim:
        if rois.shape != image.shape:
            raise ValueError(f"ROI label shape {rois.shape} differs from image shape {image.shape}.")
        if rois.min() < 0:
            raise ValueError("ROI labels must be >= 0 (0 = no ROI).")
        sums = np.bincount(rois.ravel().astype(np.intp), weights=image.ravel())[1:]
        counts = np.bincount(rois.ravel().astype(np.intp))[1:]
        means = sums[counts > 0] / counts[counts > 0]
    else:
        means = np.array([image[_mask(roi, image.shape)].mean() for roi in rois])
    if means.size < 2:
        raise ValueError(f"Background variability needs at least 2 ROIs, got {means.size}.")
    return float(means.std(ddof=1) / _nonzero(means.mean(), "The mean of the background ROI means"))


# ----------------------------------------------------------------------------------------------
# Whole-image fidelity
# ----------------------------------------------------------------------------------------------

def near_nyquist_power_fraction(image, band: float = 0.375) -> float:
    """The share of an image's spectral power (its mean removed) at frequencies of at least ``band``
    cycles per voxel along some axis, 0.5 being the Nyquist frequency.

    A stride-2 transposed convolution paints a checkerboard there on smooth images; Poisson noise
    through OSEM spreads power over all frequencies, so a network image's share against OSEM's of
    the same data says whether it added a pattern (needs no truth, so it works on patients).
    """
    image = _unwrap(image).astype(np.float64)
    power = np.abs(np.fft.fftn(image - image.mean())) ** 2
    near = np.zeros(image.shape, dtype=bool)
    for axis, size in enumerate(image.shape):
        frequencies = np.abs(np.fft.fftfreq(size)).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
        near |= frequencies >= band
    return float(power[near].sum() / _nonzero(power.sum(), "The image's power (a constant image)"))


def checkerboard_index(image, band: float = 0.375) -> float:
    """Mean spectral power at the Nyquist frequency (a pattern of period two voxels along some axis)
    over the mean power just below it (``band`` to 0.5 cycles per voxel).

    Noise, even noise a network leaves in, has a smooth spectrum there (index near 1); the
    checkerboard of stride-2 transposed convolutions is a peak at exactly 0.5 (index well above 1).
    The array needs an even size along some axis (odd sizes have no Nyquist bin).
    """
    image = _unwrap(image).astype(np.float64)
    power = np.abs(np.fft.fftn(image - image.mean())) ** 2
    nyquist, near = np.zeros(image.shape, dtype=bool), np.zeros(image.shape, dtype=bool)
    for axis, size in enumerate(image.shape):
        frequencies = np.fft.fftfreq(size).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
        nyquist |= frequencies == -0.5
        near |= np.abs(frequencies) >= band
    if not nyquist.any():
        raise ValueError("The image has no even size along any axis, so no Nyquist frequency to measure.")
    return float(power[nyquist].mean() / _nonzero(power[near & ~nyquist].mean(), "The power just below Nyquist"))


def nrmse(image, truth, mask=None) -> float:
    """Normalised RMSE: ``||x - t||_2 / ||t||_2 = sqrt(mean((x - t)^2)) / sqrt(mean(t^2))``.

    Over the voxels of ``mask`` (all voxels when None). Normalised by the RMS of the truth (not
    its range or mean), the convention of most SPECT/PET reconstruction papers; 0.1 = 10 %.
    """
    image, truth = _pair(image, truth)
    if mask is not None:
        mask = _mask(mask, image.shape)
        image, truth = image[mask], truth[mask]
    error = np.sqrt(np.mean((image - truth) ** 2))
    return float(error / _nonzero(np.sqrt(np.mean(truth ** 2)), "The RMS of the truth"))


def ssim(image, truth, data_range: float | None = None, **kwargs) -> float:
    """Mean structural similarity (Wang et al. 2004) in 3D, via ``skimage.metrics.structural_similarity``.

    ``SSIM = (2 mu_x mu_t + C1)(2 s_xt + C2) / ((mu_x^2 + mu_t^2 + C1)(s_x^2 + s_t^2 + C2))``
    averaged over sliding windows, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``. ``L = data_range``
    defaults to ``truth.max() - truth.min()`` (the truth's range, so the score does not depend on
    the image's own noise peaks). skimage defaults otherwise: a uniform 7^3 window (smaller,
    odd, when the volume is thinner than 7) and sample covariances; ``kwargs`` go to skimage.
    1 means identical.
    """
    from skimage.metrics import structural_similarity

    image, truth = _pair(image, truth)
    if data_range is None:
        data_range = float(truth.max() - truth.min())
    _nonzero(float(data_range), "The SSIM data range")
    if "win_size" not in kwargs and not kwargs.get("gaussian_weights", False):
        side = min(7, min(image.shape))
        side -= 1 - side % 2  # largest odd number <= side
        if side < 3:
            raise ValueError(f"SSIM needs at least 3 voxels along every axis, got shape {image.shape}.")
        kwargs["win_size"] = side
    return float(structural_similarity(image, truth, data_range=data_range, channel_axis=None, **kwargs))


# ----------------------------------------------------------------------------------------------
# Activity
# ----------------------------------------------------------------------------------------------

def region_activity(image, mask=None, voxel_ml: float = 1.0) -> float:
    """Total activity in a region: ``sum(image in mask) * voxel_ml`` (MBq for MBq/mL images)."""
    image = _unwrap(image)
    values = image if mask is None else image[_mask(mask, image.shape)]
    return float(values.sum() * voxel_ml)


def activity_error_percent(image, truth, mask, voxel_ml: float = 1.0) -> float:
    """Organ/lesion activity error: ``100 * (A_image - A_true) / A_true`` in percent.

    ``A = sum(values in mask) * voxel_ml``: the total activity the region holds (the quantity
    that enters dosimetry). Image and truth share the grid, so ``voxel_ml`` cancels; it is
    accepted so that a call mirrors :func:`region_activity`.
    """
    image, truth = _pair(image, truth)
    mask = _mask(mask, image.shape)
    measured, true = region_activity(image, mask, voxel_ml), region_activity(truth, mask, voxel_ml)
    return float(100.0 * (measured - true) / _nonzero(true, "The true activity in the region"))


def total_activity_error_percent(image, truth) -> float:
    """Whole-volume activity error: ``100 * (sum(image) - sum(truth)) / sum(truth)`` in percent."""
    image, truth = _pair(image, truth)
    true = truth.sum()
    return float(100.0 * (image.sum() - true) / _nonzero(true, "The total true activity"))


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------

def region_masks(phantom_or_labels, label_names: Mapping[str, int] | None = None,
                 skip_empty: bool = False) -> dict[str, np.ndarray]:
    """``{name: labels == value}`` from a phantom (``.labels``, ``.label_names``) or from arrays.

    Call as ``region_masks(phantom)`` or ``region_masks(labels, label_names)``. Names keep the
    order of ``label_names``; ``skip_empty`` drops labels with no voxel.
    """
    if label_names is None:
        labels, label_names = phantom_or_labels.labels, phantom_or_labels.label_names
    else:
        labels = phantom_or_labels
    labels = np.asarray(labels)
    masks = {name: labels == value for name, value in label_names.items()}
    return {name: m for name, m in masks.items() if m.any()} if skip_empty else masks


# ----------------------------------------------------------------------------------------------
# Across noise realisations
# ----------------------------------------------------------------------------------------------

def bias_variance(images, truth, mask, ddof: int = 1) -> dict:
    """Bias and variance of a region over R noise realisations of one reconstruction.

    ``images``: a sequence of R images or an array [R, ...]. With ``m_r`` the mean of
    realisation ``r`` in ``mask`` and ``T`` the true mean in ``mask``:

    * ``mean`` = mean_r(m_r); ``rc`` = mean / T (ensemble recovery coefficient)
    * ``bias_pct`` = 100 * (mean - T) / T
    * ``std_pct`` = 100 * SD_r(m_r) / T: the *ensemble* SD of the region mean, i.e. the
      reproducibility of the quantified value (the "variance" of a bias-variance trade-off)
    * ``noise_pct`` = 100 * mean over voxels in mask of SD_r(voxel) / T: the *voxel-level*
      noise, the usual "noise" axis of noise-vs-recovery curves (voxel values are far noisier
      than region means, so noise_pct >> std_pct in general)

    SDs over realisations use ``ddof`` (default 1, the unbiased sample variance); R >= 2.
    Also returned: ``true_mean``, ``region_means`` (the R values m_r) and ``n_realisations``.
    """
    stack = np.stack([_unwrap(im) for im in images]) if not isinstance(images, np.ndarray) \
        else np.asarray(images, np.float64)
    truth = _unwrap(truth)
    if stack.shape[1:] != truth.shape:
        raise ValueError(f"Realisations of shape {stack.shape[1:]} differ from truth shape {truth.shape}.")
    n = stack.shape[0]
    if n <= ddof or n < 2:
        raise ValueError(f"bias_variance needs at least 2 realisations (and more than ddof={ddof}), got {n}.")
    mask = _mask(mask, truth.shape)
    true_mean = _nonzero(truth[mask].mean(), "The true mean in the region")
    voxels = stack[:, mask]  # [R, V]
    region_means = voxels.mean(axis=1)
    mean = region_means.mean()
    return {
        "true_mean": float(true_mean),
        "mean": float(mean),
        "rc": float(mean / true_mean),
        "bias_pct": float(100.0 * (mean - true_mean) / true_mean),
        "std_pct": float(100.0 * region_means.std(ddof=ddof) / abs(true_mean)),
        "noise_pct": float(100.0 * voxels.std(axis=0, ddof=ddof).mean() / abs(true_mean)),
        "region_means": region_means,
        "n_realisations": int(n),
    }


def bias_variance_curve(iterates_by_realisation, truth, mask, iterations: Sequence[int] | None = None,
                        std: str = "region", ddof: int = 1) -> list[tuple[int, float, float]]:
    """``[(iteration, bias_pct, std_pct), ...]`` over the iterates of R noise realisations.

    ``iterates_by_realisation[r][n]`` is the image of realisation ``r`` after the ``n``-th saved
    iterate (all realisations must hold the same N). For each ``n`` it is :func:`bias_variance`
    over the R images: ``bias_pct`` and, with ``std='region'`` (default), ``std_pct`` (ensemble
    SD of the region mean) or, with ``std='voxel'``, ``noise_pct`` (mean voxel SD). Plotting
    std against bias (or RC = 1 + bias/100) traces the noise-vs-recovery curve. ``iterations``
    labels the iterates (default 1..N).
    """
    if std not in ("region", "voxel"):
        raise ValueError(f"std must be 'region' or 'voxel', got {std!r}.")
    key = "std_pct" if std == "region" else "noise_pct"
    counts = {len(iterates) for iterates in iterates_by_realisation}
    if len(counts) != 1:
        raise ValueError(f"Every realisation must hold the same number of iterates, got {sorted(counts)}.")
    (count,) = counts
    iterations = list(range(1, count + 1)) if iterations is None else [int(i) for i in iterations]
    if len(iterations) != count:
        raise ValueError(f"{len(iterations)} iteration labels for {count} iterates.")
    curve = []
    for n, iteration in enumerate(iterations):
        stats = bias_variance([iterates[n] for iterates in iterates_by_realisation], truth, mask, ddof=ddof)
        curve.append((iteration, stats["bias_pct"], stats[key]))
    return curve


# ----------------------------------------------------------------------------------------------
# Everything for one image
# ----------------------------------------------------------------------------------------------

def _or_nan(function, *args, **kwargs) -> float:
    try:
        return function(*args, **kwargs)
    except ValueError:
        return float("nan")


def evaluate(image, truth, labels=None, label_names: Mapping[str, int] | None = None,
             voxel_ml: float | None = None, *, regions: Mapping[str, np.ndarray] | None = None,
             uniform_regions: Sequence[str] | None = None, background: str | None = None) -> dict[str, float]:
    """All scalar metrics of one image against the truth, as one flat dict (a CSV row).

    ``truth`` is the true activity array, or a phantom (``.activity``, ``.labels``,
    ``.label_names``, ``.voxel_volume_ml``) whose fields fill the arguments left as None.
    ``regions`` (name -> boolean mask) replaces the label regions, e.g. for sphere masks.

    Keys, in a stable order:

    * ``nrmse``, ``ssim``, ``total_activity_error_pct`` over the whole volume
    * per region ``<name>``: ``rc_mean_<name>``, ``rc_max_<name>``, ``activity_error_pct_<name>``
    * ``cr_<name>`` for every region except the background, the background being ``background``
      or, if None, the first of ``DEFAULT_BACKGROUND_NAMES`` present (no ``cr_`` keys if none)
    * ``cov_<name>`` (voxel CoV of the image) for each of ``uniform_regions``; by default every
      region where the truth is uniform and non-zero (max - min <= 1e-5 * |mean|)

    A metric that is undefined (empty region, zero true value) is ``nan``.
    """
    if hasattr(truth, "activity"):
        phantom = truth
        truth = phantom.activity
        labels = phantom.labels if labels is None else labels
        label_names = phantom.label_names if label_names is None else label_names
        voxel_ml = getattr(phantom, "voxel_volume_ml", None) if voxel_ml is None else voxel_ml
    voxel_ml = 1.0 if voxel_ml is None else float(voxel_ml)
    image, truth = _pair(image, truth)
    if regions is None:
        if labels is None or label_names is None:
            raise ValueError("evaluate needs labels and label_names, or regions, or a phantom.")
        regions = region_masks(labels, label_names)

    row = {
        "nrmse": _or_nan(nrmse, image, truth),
        "ssim": _or_nan(ssim, image, truth),
        "total_activity_error_pct": _or_nan(total_activity_error_percent, image, truth),
    }
    for name, mask in regions.items():
        row[f"rc_mean_{name}"] = _or_nan(recovery_coefficient, image, truth, mask, "mean")
        row[f"rc_max_{name}"] = _or_nan(recovery_coefficient, image, truth, mask, "max")
        row[f"activity_error_pct_{name}"] = _or_nan(activity_error_percent, image, truth, mask, voxel_ml)

    if background is None:
        background = next((name for name in DEFAULT_BACKGROUND_NAMES if name in regions), None)
    elif background not in regions:
        raise ValueError(f"Background region {background!r} is not among {list(regions)}.")
    if background is not None:
        for name, mask in regions.items():
            if name != background:
                row[f"cr_{name}"] = _or_nan(contrast_recovery, image, truth, mask, regions[background])

    if uniform_regions is None:
        uniform_regions = [name for name, mask in regions.items() if _is_uniform(truth, mask)]
    for name in uniform_regions:
        row[f"cov_{name}"] = _or_nan(coefficient_of_variation, image, regions[name])
    return row


def _is_uniform(truth: np.ndarray, mask) -> bool:
    mask = np.asarray(mask, bool)
    if not mask.any():
        return False
    values = truth[mask]
    scale = abs(values.mean())
    return bool(scale > 0 and values.max() - values.min() <= 1e-5 * scale)
