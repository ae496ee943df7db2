"""The reconstruction problem: projections, system model (PyTomography) and additive scatter.

Every method gets a ``Problem`` and nothing else, so classical and learned methods see the
same physics: attenuation from the CT at each photopeak's energy, depth-dependent collimator-
detector response of the collimator at that energy, and TEW/DEW scatter as the additive term.
The model is built from arrays and geometry, so that reconstruction and simulation (on its
finer grid) use the same one; reading files into arrays is the pipeline's job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SSPECTError
from .collimators import Collimator
from .isotopes import Isotope

if TYPE_CHECKING:  # torch is imported where it is used, so that importing the engine stays light
    import torch


def resolve_device(name: str = "auto"):
    """torch.device for 'auto', 'cpu' or 'cuda' ('auto' takes a GPU when there is one)."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SSPECTError("A GPU was asked for but PyTorch sees none; choose the device 'cpu' or 'auto'.")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise SSPECTError(f"Unknown device '{name}'; choose auto, cpu, cuda or cuda:N (N a GPU number).") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SSPECTError(f"There is no GPU {device.index}; this computer has {torch.cuda.device_count()}, so choose cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
        return device
    raise SSPECTError(f"Unknown device '{name}'; choose auto, cpu or cuda.")


@dataclass(frozen=True)
class Geometry:
    """Object grid and orbit in PyTomography's convention: [Lx, Ly, Lz] voxels, detector [Lr, Lz] pixels of the same pitch."""

    object_shape: tuple[int, int, int]
    voxel_cm: tuple[float, float]  # (in the axial plane, along z)
    angles_deg: np.ndarray
    radii_cm: np.ndarray


@dataclass
class PeakData:
    """One photopeak's data on one bed: its counts, its scatter estimate, the mu map at its energy."""

    energy_keV: float
    projections: np.ndarray  # [Ltheta, Lr, Lz] counts in the photopeak window
    scatter: np.ndarray | None  # same shape, expected scatter counts
    mu_map: np.ndarray | None  # 1/cm at energy_keV on the object grid
    window_keV: tuple[float, float]  # (lower, upper) of the photopeak window


@dataclass
class Problem:
    projections: "torch.Tensor"  # [Ltheta, Lr, Lz] photopeak counts; several photopeaks: their views one after the other
    scatter: "torch.Tensor | None"  # same shape, expected scatter counts
    system_matrix: object  # SPECTOperator (fast), PhotopeakStack (several photopeaks) or PyTomography's SPECTSystemMatrix
    object_meta: object
    proj_meta: object
    attenuation_map: "torch.Tensor | None"  # 1/cm at the main photopeak on the object grid, also the anatomy for priors
    device: object
    isotope: Isotope
    collimator_code: str = ""  # PyTomography / SIMIND code, e.g. GI-MEGP: what a trained network must match
    peak_window_keV: tuple = ()  # (lower, upper) of the main photopeak's window
    photopeaks_keV: tuple = ()  # the photopeaks whose views ``projections`` holds, main first
    projector: str = "fast"

    def likelihood(self):
        from pytomography.likelihoods import PoissonLogLikelihood

        return PoissonLogLikelihood(self.system_matrix, self.projections, self.scatter)


# Sigma of the default smoothing: 1 cm takes the total within 0.4 % down to 5 s per view on the
# standard grid (docs/clinical-grid-report/scatter-smoothing); scatter varies over several cm.
SCATTER_SMOOTHING_CM = 1.0


def tew_scatter(peak_width_keV: float, lower: np.ndarray | None, lower_width_keV: float | None,
                upper: np.ndarray | None, upper_width_keV: float | None,
                geometry: Geometry | None = None, smoothing_cm: float = 0.0) -> np.ndarray | None:
    """TEW (both windows) or DEW (one) scatter in the photopeak, PyTomography's formula; None without either.

    ``smoothing_cm`` > 0 smooths the estimate in each view (a Gaussian of that sigma across and along
    the detector, PyTomography's): EM cannot subtract more scatter than a bin holds counts, so a noisy
    estimate leaves the image total too high at low counts (docs/clinical-grid-report/scatter-smoothing)."""
    import pytomography
    import torch
    from pytomography.utils import compute_EW_scatter

    first, second = ((lower, lower_width_keV), (upper, upper_width_keV)) if lower is not None else ((upper, upper_width_keV), (None, None))
    if first[0] is None:
        return None
    proj_meta, sigma = None, 0.0
    if smoothing_cm > 0:
        if geometry is None:
            raise SSPECTError("Smoothing the scatter estimate needs the detector geometry; give it or a smoothing of 0.")
        proj_meta, sigma = projection_metadata(geometry), float(smoothing_cm)

    def tensor(counts):
        return torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32)).to(pytomography.device)  # its kernels live there

    scatter = compute_EW_scatter(tensor(first[0]), None if second[0] is None else tensor(second[0]),
                                 first[1], second[1], peak_width_keV, proj_meta=proj_meta, sigma_r=sigma, sigma_z=sigma)
    return scatter.cpu().numpy()


PROJECTORS = ("fast", "pytomography")


def check_projector(name: str) -> str:
    if name not in PROJECTORS:
        raise SSPECTError(f"Unknown projector {name!r}; choose {' or '.join(PROJECTORS)}.")
    return name


def projection_metadata(geometry: Geometry):
    """PyTomography's projection metadata of ``geometry``: detector [Lr, Lz] pixels, views and radii."""
    from pytomography.metadata.SPECT import SPECTProjMeta

    shape = tuple(int(s) for s in geometry.object_shape)
    return SPECTProjMeta((shape[1], shape[2]), tuple(float(v) for v in geometry.voxel_cm),
                         np.asarray(geometry.angles_deg, float), np.asarray(geometry.radii_cm, float))


def build_system_matrix(geometry: Geometry, mu_map, collimator: Collimator, energy_keV: float,
                        projector: str = "fast", device="cpu"):
    """The system matrix of one photopeak: attenuation by ``mu_map`` (array, tensor or None) and
    ``collimator``'s response at ``energy_keV``; ``projector`` "fast" is :class:`.operator.SPECTOperator`,
    "pytomography" PyTomography's own ``SPECTSystemMatrix`` (the reference it is measured against).
    Returns (system matrix, object metadata, projection metadata)."""
    import pytomography
    import torch
    from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params
    from pytomography.metadata.SPECT import SPECTObjectMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform

    check_projector(projector)
    device = torch.device(device)
    dx_cm, dz_cm = (float(v) for v in geometry.voxel_cm)
    shape = tuple(int(s) for s in geometry.object_shape)
    object_meta = SPECTObjectMeta((dx_cm, dx_cm, dz_cm), shape)
    proj_meta = projection_metadata(geometry)
    psf_meta = get_psfmeta_from_scanner_params(collimator.code, energy_keV=float(energy_keV),
                                               intrinsic_resolution_140keV=collimator.intrinsic_resolution_140keV_cm)
    mu = None if mu_map is None else torch.as_tensor(np.ascontiguousarray(mu_map) if isinstance(mu_map, np.ndarray) else mu_map,
                                                     dtype=torch.float32).to(device)
    if projector == "fast":
        from .operator import SPECTOperator

        return SPECTOperator(object_meta, proj_meta, mu, psf_meta, device=device), object_meta, proj_meta
    pytomography.device = device  # PyTomography reads this global when it builds tensors
    transforms = [] if mu is None else [SPECTAttenuationTransform(mu)]
    transforms.append(SPECTPSFTransform(psf_meta))
    system_matrix = SPECTSystemMatrix(obj2obj_transforms=transforms, proj2proj_transforms=[],
                                      object_meta=object_meta, proj_meta=proj_meta)
    return system_matrix, object_meta, proj_meta


def build_problem(peaks: list[PeakData], geometry: Geometry, collimator: Collimator, isotope: Isotope,
                  device: str = "auto", projector: str = "fast") -> Problem:
    """The problem of one bed from one or several photopeaks (main first); several are one
    :class:`.operator.PhotopeakStack` whose views are each photopeak's views in turn."""
    import pytomography
    import torch

    check_projector(projector)
    if not peaks:
        raise SSPECTError("No photopeak was given; choose at least one of the isotope's photopeaks.")
    if len(peaks) > 1 and projector != "fast":
        raise SSPECTError("Several photopeaks are reconstructed with the fast projector only; choose the fast projector or one photopeak.")
    torch_device = resolve_device(device)
    pytomography.device = torch_device  # PyTomography reads this global when it builds tensors
    for peak in peaks:
        if float(peak.projections.sum()) <= 0:
            raise SSPECTError(f"The {peak.energy_keV:g} keV photopeak window {peak.window_keV[0]:g}-{peak.window_keV[1]:g} keV "
                              "holds zero counts; check the window choice or the acquisition.")
    built = [build_system_matrix(geometry, peak.mu_map, collimator, peak.energy_keV, projector, torch_device) for peak in peaks]
    system_matrix, object_meta, proj_meta = built[0]
    if len(built) > 1:
        from .operator import PhotopeakStack

        abundances = [isotope.photopeak(peak.energy_keV).abundance for peak in peaks]
        system_matrix = PhotopeakStack([matrix for matrix, _, _ in built], [a / abundances[0] for a in abundances])
        proj_meta = system_matrix.proj_meta
    scatters = [peak.scatter for peak in peaks]
    scatter = None
    if any(s is not None for s in scatters):
        scatter = np.concatenate([np.zeros_like(p.projections, dtype=np.float32) if s is None else s
                                  for p, s in zip(peaks, scatters)])
    main = peaks[0]
    return Problem(
        projections=torch.from_numpy(np.ascontiguousarray(np.concatenate([p.projections for p in peaks]), dtype=np.float32)).to(torch_device),
        scatter=None if scatter is None else torch.from_numpy(np.ascontiguousarray(scatter, dtype=np.float32)).to(torch_device),
        system_matrix=system_matrix, object_meta=object_meta, proj_meta=proj_meta,
        attenuation_map=None if main.mu_map is None else torch.as_tensor(np.ascontiguousarray(main.mu_map), dtype=torch.float32).to(torch_device),
        device=torch_device, isotope=isotope, collimator_code=collimator.code,
        peak_window_keV=(float(main.window_keV[0]), float(main.window_keV[1])),
        photopeaks_keV=tuple(float(p.energy_keV) for p in peaks), projector=projector)
