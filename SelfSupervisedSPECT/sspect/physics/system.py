"""The reconstruction problem: projections, system model (PyTomography) and additive scatter.

Every method gets a ``Problem`` and nothing else, so classical and learned methods see the
same physics: attenuation from the CT at the photopeak energy, depth-dependent collimator-
detector response from the collimator preset, and TEW/DEW scatter as the additive term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SSPECTError
from ..io.nm import ProjectionStudy
from ..io.windows import WindowChoice
from .presets import LU177_PHOTOPEAK_KEV, collimator_preset

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
        return torch.device(name)
    raise SSPECTError(f"Unknown device '{name}'; choose auto, cpu or cuda.")


@dataclass
class Problem:
    projections: "torch.Tensor"  # [Ltheta, Lr, Lz] photopeak counts
    scatter: "torch.Tensor | None"  # same shape, expected scatter counts
    system_matrix: object  # SPECTOperator (fast) or PyTomography's SPECTSystemMatrix (reference)
    object_meta: object
    proj_meta: object
    attenuation_map: "torch.Tensor | None"  # 1/cm on the object grid, also the anatomy for priors
    device: object
    collimator_code: str = ""  # PyTomography / SIMIND code, e.g. GI-MEGP: what a trained network must match
    peak_window_keV: tuple = ()  # (lower, upper) of the photopeak window
    projector: str = "fast"

    def likelihood(self):
        from pytomography.likelihoods import PoissonLogLikelihood

        return PoissonLogLikelihood(self.system_matrix, self.projections, self.scatter)


def scatter_estimate(study: ProjectionStudy, windows: WindowChoice) -> np.ndarray | None:
    """TEW (both windows) or DEW (one) scatter in the photopeak, PyTomography's formula."""
    import torch
    from pytomography.utils import compute_EW_scatter

    if windows.scatter_method == "none":
        return None
    first, second = (windows.lower, windows.upper) if windows.lower else (windows.upper, None)
    scatter = compute_EW_scatter(
        torch.from_numpy(study.projections[first.index]),
        torch.from_numpy(study.projections[second.index]) if second else None,
        first.width_keV, second.width_keV if second else None, windows.peak.width_keV)
    return scatter.cpu().numpy()


PROJECTORS = ("fast", "pytomography")


def check_projector(name: str) -> str:
    if name not in PROJECTORS:
        raise SSPECTError(f"Unknown projector {name!r}; choose {' or '.join(PROJECTORS)}.")
    return name


def build_problem(study: ProjectionStudy, windows: WindowChoice, mu_map: np.ndarray | None,
                  collimator: str, device: str = "auto", photopeak_keV: float = LU177_PHOTOPEAK_KEV,
                  projector: str = "fast") -> Problem:
    """The problem of one bed; ``projector`` "fast" is :class:`.operator.SPECTOperator`, "pytomography"
    PyTomography's own ``SPECTSystemMatrix`` (the reference it is measured against)."""
    import pytomography
    import torch
    from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params
    from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform

    check_projector(projector)
    torch_device = resolve_device(device)
    pytomography.device = torch_device  # PyTomography reads this global when it builds tensors
    preset = collimator_preset(collimator)
    peak = study.projections[windows.peak.index]
    if float(peak.sum()) <= 0:
        raise SSPECTError(f"The photopeak window {windows.peak.describe()} holds zero counts; check the window choice or the acquisition.")
    dx_cm, dz_cm = study.pixel_mm[0] / 10, study.pixel_mm[1] / 10
    object_meta = SPECTObjectMeta((dx_cm, dx_cm, dz_cm), study.object_shape)
    proj_meta = SPECTProjMeta(peak.shape[1:], (dx_cm, dz_cm), study.angles_deg, study.radii_cm)
    psf_meta = get_psfmeta_from_scanner_params(preset.code, energy_keV=photopeak_keV,
                                               intrinsic_resolution_140keV=preset.intrinsic_resolution_140keV_cm)
    mu_tensor = None if mu_map is None else torch.from_numpy(np.ascontiguousarray(mu_map, dtype=np.float32)).to(torch_device)
    if projector == "fast":
        from .operator import SPECTOperator

        system_matrix = SPECTOperator(object_meta, proj_meta, mu_tensor, psf_meta, device=torch_device)
    else:
        transforms = [] if mu_tensor is None else [SPECTAttenuationTransform(mu_tensor)]
        transforms.append(SPECTPSFTransform(psf_meta))
        system_matrix = SPECTSystemMatrix(obj2obj_transforms=transforms, proj2proj_transforms=[],
                                          object_meta=object_meta, proj_meta=proj_meta)
    scatter = scatter_estimate(study, windows)
    return Problem(
        projections=torch.from_numpy(np.ascontiguousarray(peak)).to(torch_device),
        scatter=None if scatter is None else torch.from_numpy(scatter).to(torch_device),
        system_matrix=system_matrix, object_meta=object_meta, proj_meta=proj_meta,
        attenuation_map=mu_tensor, device=torch_device, collimator_code=preset.code,
        peak_window_keV=(float(windows.peak.lower_keV), float(windows.peak.upper_keV)), projector=projector)
