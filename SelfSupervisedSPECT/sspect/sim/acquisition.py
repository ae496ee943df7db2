"""Simulated 177Lu SPECT acquisition: photopeak and TEW scatter windows with Poisson noise, at the
count levels of a clinical acquisition (:class:`AcquisitionSettings`).

Primary photons go through PyTomography's own system model (attenuation + depth-dependent
collimator-detector response), so geometry and units match what the reconstruction uses.
PyTomography has no analytic scatter model (only SIMIND Monte Carlo), so scatter is written
here: a heavily blurred fraction of the primary, split over the lower and upper windows so
that the TEW estimate reproduces the photopeak scatter in expectation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from sspect.errors import SSPECTError


@dataclass(frozen=True)
class WindowSpec:
    """An energy window as a scanner defines it: a name and a keV range."""

    name: str
    lower_keV: float
    upper_keV: float

    @property
    def width_keV(self) -> float:
        return self.upper_keV - self.lower_keV


# The 177Lu windows of the GE Discovery 670 study in shared/data (same limits, same names).
LU177_PEAK = WindowSpec("Lu177_EM", 187.2, 228.8)
LU177_LOWER_SCATTER = WindowSpec("sc3_SC", 166.89, 186.31)
LU177_UPPER_SCATTER = WindowSpec("sc4_SC", 229.63, 251.16)

# Counts per keV in the upper window relative to the lower one: 0.08 in the real GE study
# (2.1e3 vs 2.6e4 counts/keV); 177Lu has little above the 208 keV peak.
UPPER_TO_LOWER_PER_KEV = 0.08


@dataclass
class SimulatedProjections:
    """Counts in PyTomography's layout [Ltheta, Lr, Lz] for the three 177Lu windows."""

    peak: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    angles_deg: np.ndarray  # PyTomography detector angles, ascending
    radii_cm: np.ndarray
    expected_primary: np.ndarray
    expected_scatter: np.ndarray  # scatter in the photopeak window, noiseless
    windows: tuple[WindowSpec, WindowSpec, WindowSpec] = (LU177_PEAK, LU177_LOWER_SCATTER, LU177_UPPER_SCATTER)


def forward_project(activity: np.ndarray, mu_map: np.ndarray | None, spacing_mm, angles_deg, radii_cm,
                    collimator: str = "GI-MEGP", energy_keV: float = 208.0) -> np.ndarray:
    """Noiseless primary projections [Ltheta, Lr, Lz] of ``activity`` with PyTomography's model.

    A voxel of value a adds a (times its attenuation) to each view's total: no sensitivity,
    no time; callers scale. Detector pixels have the object's x pitch; square axial grid only.
    """
    import pytomography
    import torch
    from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params
    from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform

    if activity.ndim != 3 or activity.shape[0] != activity.shape[1]:
        raise SSPECTError(f"The activity grid must be [L, L, Lz] (PyTomography rotates the axial plane); got {activity.shape}.")
    if mu_map is not None and mu_map.shape != activity.shape:
        raise SSPECTError(f"The attenuation map {mu_map.shape} and the activity {activity.shape} must share one grid.")
    if spacing_mm[0] != spacing_mm[1]:
        raise SSPECTError(f"The axial voxels must be square; got spacing {tuple(spacing_mm)} mm.")
    try:
        psf_meta = get_psfmeta_from_scanner_params(collimator, energy_keV=energy_keV, intrinsic_resolution_140keV=0.38)
    except UnboundLocalError:  # PyTomography's way of saying the code is not in its table
        raise SSPECTError(f"Unknown collimator code '{collimator}'; use one of PyTomography's SIMIND codes such as 'GI-MEGP' or 'SY-ME'.") from None

    dr_cm = tuple(float(s) / 10.0 for s in spacing_mm)
    object_meta = SPECTObjectMeta(dr_cm, tuple(activity.shape))
    proj_meta = SPECTProjMeta((activity.shape[1], activity.shape[2]), (dr_cm[0], dr_cm[2]),
                              np.asarray(angles_deg, float), np.asarray(radii_cm, float))
    transforms = [SPECTPSFTransform(psf_meta)]
    if mu_map is not None:
        mu = torch.as_tensor(np.ascontiguousarray(mu_map), dtype=pytomography.dtype, device=pytomography.device)
        transforms.insert(0, SPECTAttenuationTransform(mu))
    system_matrix = SPECTSystemMatrix(obj2obj_transforms=transforms, proj2proj_transforms=[],
                                      object_meta=object_meta, proj_meta=proj_meta)
    obj = torch.as_tensor(np.ascontiguousarray(activity), dtype=pytomography.dtype, device=pytomography.device)
    return system_matrix.forward(obj).cpu().numpy().astype(np.float32)


def simulate_projections(activity: np.ndarray, mu_map: np.ndarray | None, spacing_mm, n_views: int = 32,
                         radius_mm: float = 250.0, collimator: str = "GI-MEGP", energy_keV: float = 208.0,
                         counts_scale: float = 1.0, seed: int = 0, upsample: int = 1, noise: bool = True,
                         scatter_fraction: float = 0.3, scatter_sigma_cm: float = 4.0,
                         detector_binning: int = 1) -> SimulatedProjections:
    """Photopeak, lower and upper scatter window counts of a 177Lu acquisition.

    ``counts_scale``: expected primary counts per unit of voxel value per view before
    attenuation (sensitivity x frame duration x voxel volume when ``activity`` is in MBq/mL).
    ``upsample`` > 1 projects an object refined by that factor onto detector pixels of the
    finer pitch and sums them back, so that reconstructing with the coarse model is not an
    inverse crime. Scatter in the photopeak is ``scatter_fraction`` times the primary blurred
    by a Gaussian of ``scatter_sigma_cm`` in each view. ``detector_binning`` > 1: ``activity`` is
    already drawn on a grid that many times finer than the reconstruction (a phantom with real
    sub-voxel detail); its projections are summed into detector pixels that many times larger.
    """
    for name, factor in (("upsample", upsample), ("detector_binning", detector_binning)):
        if factor < 1 or int(factor) != factor:
            raise SSPECTError(f"{name} must be a positive integer; got {factor}.")
    upsample = int(upsample)
    binning = upsample * int(detector_binning)
    angles_deg = np.linspace(0.0, 360.0, n_views, endpoint=False)
    radii_cm = np.full(n_views, radius_mm / 10.0)
    half_width_mm = activity.shape[0] * spacing_mm[0] / 2
    if radius_mm <= half_width_mm:
        raise SSPECTError(f"The orbit radius {radius_mm} mm must exceed the half-width {half_width_mm} mm of the grid.")

    fine_activity, fine_mu = activity, mu_map
    if upsample > 1:
        def refine(array):
            return np.repeat(np.repeat(np.repeat(array, upsample, 0), upsample, 1), upsample, 2)
        fine_activity = refine(activity) / upsample ** 3  # the same amount spread over u^3 voxels
        fine_mu = None if mu_map is None else refine(mu_map)
    fine_spacing = tuple(float(s) / upsample for s in spacing_mm)
    fine = forward_project(fine_activity, fine_mu, fine_spacing, angles_deg, radii_cm, collimator, energy_keV)
    n_theta, n_r, n_z = fine.shape
    if n_r % binning or n_z % binning:
        raise SSPECTError(f"The grid {activity.shape} does not bin by {binning}; use sizes divisible by it.")
    primary = counts_scale * fine.reshape(n_theta, n_r // binning, binning, n_z // binning, binning).sum(axis=(2, 4))

    pixel_mm = (float(spacing_mm[0]) * detector_binning, float(spacing_mm[2]) * detector_binning)
    sigma_pixels = (scatter_sigma_cm * 10.0 / pixel_mm[0], scatter_sigma_cm * 10.0 / pixel_mm[1])
    scatter = scatter_fraction * np.stack([gaussian_filter(view, sigma_pixels, mode="constant") for view in primary])
    # TEW: scatter = (lower/w_lower + upper/w_upper) * w_peak / 2, with upper/keV = r * lower/keV.
    lower_per_keV = 2.0 * scatter / (LU177_PEAK.width_keV * (1.0 + UPPER_TO_LOWER_PER_KEV))
    expected_lower = lower_per_keV * LU177_LOWER_SCATTER.width_keV
    expected_upper = UPPER_TO_LOWER_PER_KEV * lower_per_keV * LU177_UPPER_SCATTER.width_keV
    expected_peak = primary + scatter

    if noise:
        rng = np.random.default_rng(seed)
        peak, lower, upper = (rng.poisson(np.clip(m, 0, None)) for m in (expected_peak, expected_lower, expected_upper))
    else:
        peak, lower, upper = expected_peak, expected_lower, expected_upper
    return SimulatedProjections(
        peak=np.asarray(peak, np.float32), lower=np.asarray(lower, np.float32), upper=np.asarray(upper, np.float32),
        angles_deg=angles_deg, radii_cm=radii_cm, expected_primary=primary.astype(np.float32),
        expected_scatter=scatter.astype(np.float32))


def draw_counts(expected: SimulatedProjections, counts_scale: float, seed: int) -> SimulatedProjections:
    """A Poisson realisation of noiseless projections (simulated with counts_scale 1) at a count level.

    The forward projection is the expensive part of a simulation; the harness projects each
    phantom once and draws every count level and noise realisation from it.
    """
    rng = np.random.default_rng(seed)
    peak, lower, upper = (rng.poisson(np.clip(counts_scale * m, 0, None)).astype(np.float32)
                          for m in (expected.peak, expected.lower, expected.upper))
    return SimulatedProjections(peak=peak, lower=lower, upper=upper, angles_deg=expected.angles_deg,
                                radii_cm=expected.radii_cm, expected_primary=counts_scale * expected.expected_primary,
                                expected_scatter=counts_scale * expected.expected_scatter, windows=expected.windows)


@dataclass(frozen=True)
class AcquisitionSettings:
    """A clinical 177Lu SPECT acquisition, for simulating realistic count levels.

    ``sensitivity_cps_per_mbq``: photopeak (208 keV +-10%) counts per second per MBq seen by one
    detector head with a medium-energy (GE MEGP / Siemens ME) collimator, for a source in air
    (planar sensitivity): 9 cps/MBq, an assumption in the 8-11 cps/MBq range of published 177Lu
    ME/MEGP calibrations (the same value as the demo study). Each view is one head's frame, so
    expected counts per view = sensitivity x frame duration x attenuated activity.
    Frame duration and view count are those of the real GE study in shared/data (60 views of
    25 s, 128 x 128 pixels of 4.4196 mm, orbit radius 253.7 mm); the count levels this gives
    for the phantoms: docs/simulation.md.
    """

    sensitivity_cps_per_mbq: float = 9.0
    frame_duration_s: float = 25.0
    n_views: int = 60
    pixel_mm: float = 4.4196
    matrix: int = 128
    radius_mm: float = 253.7
    collimator: str = "GI-MEGP"

    def counts_scale(self, voxel_volume_ml: float) -> float:
        """``simulate_projections``' counts_scale for an activity image in MBq/mL."""
        return realistic_counts_scale(voxel_volume_ml, self.sensitivity_cps_per_mbq, self.frame_duration_s)


ACQUISITION_177LU = AcquisitionSettings()
REAL_GE_STUDY_PHOTOPEAK_COUNTS = 1.39e6  # shared/data/lu177_ge670, bed 1, 60 views x 25 s


def realistic_counts_scale(voxel_volume_ml: float, sensitivity_cps_per_mbq: float = ACQUISITION_177LU.sensitivity_cps_per_mbq,
                           frame_duration_s: float = ACQUISITION_177LU.frame_duration_s) -> float:
    """Expected primary counts per view per (MBq/mL) of voxel value, before attenuation.

    = sensitivity (cps/MBq) x frame duration (s) x voxel volume (mL): pass it as
    ``simulate_projections(..., counts_scale=...)`` for an activity image in MBq/mL.
    """
    if voxel_volume_ml <= 0 or sensitivity_cps_per_mbq <= 0 or frame_duration_s <= 0:
        raise SSPECTError("Voxel volume, sensitivity and frame duration must be positive.")
    return float(sensitivity_cps_per_mbq) * float(frame_duration_s) * float(voxel_volume_ml)
