"""Simulated SPECT acquisition: each photopeak's window and its TEW scatter windows, with Poisson noise.
Count levels of a clinical acquisition: :class:`AcquisitionSettings`.

Primary photons go through the engine's system model (:func:`sspect.physics.system.build_system_matrix`,
PyTomography's projector: attenuation + depth-dependent collimator-detector response at each
photopeak's energy), so geometry and units match what the reconstruction uses. PyTomography
has no analytic scatter model (only SIMIND Monte Carlo), so scatter is written here: a heavily
blurred fraction of the primary, split over the lower and upper windows so that the TEW
estimate reproduces the photopeak scatter in expectation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from sspect.errors import SSPECTError
from sspect.physics.collimators import Collimator, default_collimator, get_collimator
from sspect.physics.isotopes import LUTETIUM_177, EnergyRange, Isotope, Photopeak


@dataclass
class SimulatedPeak:
    """Counts in PyTomography's layout [Ltheta, Lr, Lz] of one photopeak's three windows."""

    photopeak: Photopeak
    peak: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    expected_primary: np.ndarray
    expected_scatter: np.ndarray  # scatter in the photopeak window, noiseless

    @property
    def windows(self) -> tuple[EnergyRange, EnergyRange, EnergyRange]:
        return (self.photopeak.window, self.photopeak.lower_scatter, self.photopeak.upper_scatter)


def _main_photopeak(name: str) -> property:
    return property(lambda self: getattr(self.peaks[0], name), doc=f"The main photopeak's {name}.")


@dataclass
class SimulatedProjections:
    """Every simulated photopeak (the main one first) and the orbit; ``peak`` ... are the main photopeak's."""

    peaks: list[SimulatedPeak]
    angles_deg: np.ndarray  # PyTomography detector angles, ascending
    radii_cm: np.ndarray
    isotope: Isotope
    collimator: Collimator

    peak, lower, upper, windows, expected_primary, expected_scatter = (
        _main_photopeak(name) for name in ("peak", "lower", "upper", "windows", "expected_primary", "expected_scatter"))

    def windows_in_order(self, roles=("peak", "upper", "lower")) -> tuple[list[EnergyRange], list[np.ndarray]]:
        """Every photopeak's windows and counts, photopeak by photopeak, in ``roles`` order (GE: peak, upper, lower)."""
        index = {"peak": 0, "lower": 1, "upper": 2}
        windows = [p.windows[index[r]] for p in self.peaks for r in roles]
        counts = [getattr(p, r) for p in self.peaks for r in roles]
        return windows, counts


def forward_project(activity: np.ndarray, mu_map: np.ndarray | None, spacing_mm, angles_deg, radii_cm,
                    collimator: Collimator | str, energy_keV: float) -> np.ndarray:
    """Noiseless primary projections [Ltheta, Lr, Lz] of ``activity`` with the engine's system model.

    A voxel of value a adds a (times its attenuation) to each view's total: no sensitivity,
    no time; callers scale. Detector pixels have the object's x pitch; square axial grid only.
    """
    import pytomography
    import torch

    from sspect.physics.system import Geometry, build_system_matrix

    if activity.ndim != 3 or activity.shape[0] != activity.shape[1]:
        raise SSPECTError(f"The activity grid must be [L, L, Lz] (PyTomography rotates the axial plane); got {activity.shape}.")
    if mu_map is not None and mu_map.shape != activity.shape:
        raise SSPECTError(f"The attenuation map {mu_map.shape} and the activity {activity.shape} must share one grid.")
    if spacing_mm[0] != spacing_mm[1]:
        raise SSPECTError(f"The axial voxels must be square; got spacing {tuple(spacing_mm)} mm.")
    collimator = get_collimator(collimator) if isinstance(collimator, str) else collimator
    geometry = Geometry(tuple(activity.shape), (float(spacing_mm[0]) / 10.0, float(spacing_mm[2]) / 10.0),
                        np.asarray(angles_deg, float), np.asarray(radii_cm, float))
    system_matrix, _, _ = build_system_matrix(geometry, mu_map, collimator, energy_keV, "pytomography", pytomography.device)
    obj = torch.as_tensor(np.ascontiguousarray(activity), dtype=pytomography.dtype, device=pytomography.device)
    return system_matrix.forward(obj).cpu().numpy().astype(np.float32)


def simulate_projections(activity: np.ndarray, mu_map: np.ndarray | Callable[[float], np.ndarray] | None, spacing_mm,
                         n_views: int = 32, radius_mm: float = 250.0, collimator: Collimator | str | None = None,
                         isotope: Isotope = LUTETIUM_177, photopeaks_keV=None,
                         counts_scale: float = 1.0, seed: int = 0, upsample: int = 1, noise: bool = True,
                         scatter_fraction: float | None = None, scatter_sigma_cm: float = 4.0,
                         detector_binning: int = 1) -> SimulatedProjections:
    """Photopeak, lower and upper scatter window counts of each photopeak of an acquisition of ``isotope``.

    ``photopeaks_keV``: the photopeaks to simulate (default: the isotope's default ones).
    ``mu_map``: the mu map at the photopeak (one photopeak), or a function of the energy in keV
    giving it (several). ``collimator``: default, the GE collimator made for the isotope.
    ``counts_scale``: expected primary counts of the main photopeak per unit of voxel value per
    view before attenuation (sensitivity x frame duration x voxel volume when ``activity`` is in
    MBq/mL); other photopeaks get it times their abundance relative to the main one.
    ``upsample`` > 1 projects an object refined by that factor onto detector pixels of the
    finer pitch and sums them back, so that reconstructing with the coarse model is not an
    inverse crime. Scatter in the photopeak is ``scatter_fraction`` times the primary blurred
    by a Gaussian of ``scatter_sigma_cm`` in each view (default: the photopeak's own scatter to
    primary). ``detector_binning`` > 1: ``activity`` is
    already drawn on a grid that many times finer than the reconstruction (a phantom with real
    sub-voxel detail); its projections are summed into detector pixels that many times larger.
    """
    for name, factor in (("upsample", upsample), ("detector_binning", detector_binning)):
        if factor < 1 or int(factor) != factor:
            raise SSPECTError(f"{name} must be a positive integer; got {factor}.")
    upsample = int(upsample)
    photopeaks = [isotope.photopeak(e) for e in photopeaks_keV] if photopeaks_keV else list(isotope.default_photopeaks)
    if mu_map is not None and not callable(mu_map) and len(photopeaks) > 1:
        raise SSPECTError("Several photopeaks need the mu map at each energy; give mu_map as a function of the energy in keV.")
    collimator = (default_collimator("GE", isotope) if collimator is None
                  else get_collimator(collimator) if isinstance(collimator, str) else collimator)
    binning = upsample * int(detector_binning)
    angles_deg = np.linspace(0.0, 360.0, n_views, endpoint=False)
    radii_cm = np.full(n_views, radius_mm / 10.0)
    half_width_mm = activity.shape[0] * spacing_mm[0] / 2
    if radius_mm <= half_width_mm:
        raise SSPECTError(f"The orbit radius {radius_mm} mm must exceed the half-width {half_width_mm} mm of the grid.")

    def refine(array):
        return np.repeat(np.repeat(np.repeat(array, upsample, 0), upsample, 1), upsample, 2) if upsample > 1 else array

    fine_activity = refine(activity) / upsample ** 3  # the same amount spread over u^3 voxels
    fine_spacing = tuple(float(s) / upsample for s in spacing_mm)
    pixel_mm = (float(spacing_mm[0]) * detector_binning, float(spacing_mm[2]) * detector_binning)
    sigma_pixels = (scatter_sigma_cm * 10.0 / pixel_mm[0], scatter_sigma_cm * 10.0 / pixel_mm[1])
    rng = np.random.default_rng(seed)
    simulated = []
    for photopeak in photopeaks:
        mu = mu_map(photopeak.energy_keV) if callable(mu_map) else mu_map
        fine = forward_project(fine_activity, None if mu is None else refine(mu), fine_spacing, angles_deg, radii_cm,
                               collimator, photopeak.energy_keV)
        n_theta, n_r, n_z = fine.shape
        if n_r % binning or n_z % binning:
            raise SSPECTError(f"The grid {activity.shape} does not bin by {binning}; use sizes divisible by it.")
        scale = counts_scale * photopeak.abundance / photopeaks[0].abundance
        primary = scale * fine.reshape(n_theta, n_r // binning, binning, n_z // binning, binning).sum(axis=(2, 4))
        fraction = photopeak.scatter_to_primary if scatter_fraction is None else scatter_fraction
        scatter = fraction * np.stack([gaussian_filter(view, sigma_pixels, mode="constant") for view in primary])
        # TEW: scatter = (lower/w_lower + upper/w_upper) * w_peak / 2, with upper/keV = r * lower/keV.
        ratio = photopeak.upper_to_lower_per_keV
        lower_per_keV = 2.0 * scatter / (photopeak.window.width_keV * (1.0 + ratio))
        expected = (primary + scatter, lower_per_keV * photopeak.lower_scatter.width_keV,
                    ratio * lower_per_keV * photopeak.upper_scatter.width_keV)
        peak, lower, upper = (rng.poisson(np.clip(m, 0, None)) for m in expected) if noise else expected
        simulated.append(SimulatedPeak(photopeak, np.asarray(peak, np.float32), np.asarray(lower, np.float32),
                                       np.asarray(upper, np.float32), primary.astype(np.float32), scatter.astype(np.float32)))
    return SimulatedProjections(simulated, angles_deg, radii_cm, isotope, collimator)


def draw_counts(expected: SimulatedProjections, counts_scale: float, seed: int) -> SimulatedProjections:
    """A Poisson realisation of noiseless projections (simulated with counts_scale 1) at a count level.

    The forward projection is the expensive part of a simulation; the harness projects each
    phantom once and draws every count level and noise realisation from it.
    """
    rng = np.random.default_rng(seed)
    drawn = []
    for simulated in expected.peaks:
        peak, lower, upper = (rng.poisson(np.clip(counts_scale * m, 0, None)).astype(np.float32)
                              for m in (simulated.peak, simulated.lower, simulated.upper))
        drawn.append(SimulatedPeak(simulated.photopeak, peak, lower, upper, counts_scale * simulated.expected_primary,
                                   counts_scale * simulated.expected_scatter))
    return replace(expected, peaks=drawn)


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
