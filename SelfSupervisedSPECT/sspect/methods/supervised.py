"""Supervised reconstruction: networks trained on simulated (data -> truth) pairs, shipped as verified weights.

Two methods, both starting from the same short OSEM image ``x0`` of the scan (PyTomography):

* ``post-unet``: a MONAI 3D U-Net maps ``x0`` (and the attenuation map, a second channel) to the
  activity: ``x = m softplus(softplus^-1(x0 / m) + f_theta(x0 / m, mu / mu_water))``. The
  network's last layer starts at zero, so an untrained network returns ``x0``: it learns a
  correction of OSEM, not an image from nothing.
* ``unrolled-mapem``: K unrolled MAP-EM iterations (Mehranian & Reader, FBSEM-Net, IEEE TRPMS
  2021; Li, Dewaraja & Fessler, IEEE TRPMS 2023, trained end to end for 177Lu). Each iteration
  takes a small CNN step ``u = m softplus(softplus^-1(x / m) + g_theta(x / m, mu))`` (one CNN
  shared by all iterations, as in FBSEM-Net) and fuses it with an EM step in closed form: the
  minimiser of EM's surrogate ``S x - c log x`` plus ``beta_k / 2 (x - u)^2`` with ``S = A^T 1``
  and ``c = x A^T(y / (A x + s))`` is ``x+ = (-(S - beta_k u) + sqrt((S - beta_k u)^2 + 4 beta_k c)) / (2 beta_k)``.
  ``beta_k`` is learned per iteration, in units of ``mean(S) / m`` so that the whole map is
  equivariant to the count level. Trained end to end: the gradient passes the EM steps through
  :mod:`sspect.physics.differentiable` (exact forward and back projection layers), not through PyTomography.

Both outputs are scaled to the total of ``x0`` at the end: OSEM's total follows the measured
counts (EM keeps ``sum(A x + s) = sum(y)``), and networks trained by NRMSE alone came out low in
total (post-unet -4 % on an unseen torso; unrolled-mapem -1.5 to -3.9 % on the phantoms and
-5.7 % on the real bed), which dosimetry cannot accept: the networks only move activity within
the image.

``m`` is the mean of ``x0`` over the grid: the networks see images of order one whatever the
count level or scan time, and an image ``k`` times brighter gives an output ``k`` times brighter
(up to noise). Training (:mod:`sspect.training.supervised`, ``sspect train``) minimises the NRMSE^2 of the
output against the truth in the same count units.

A weights file is safetensors with a header describing it: kind, architecture, isotope, energy
window, collimator, voxel size, matrix, the start OSEM, the training data's manifest and its
sha256, the code version, the validation metrics and the sha256 of the tensors (a JSON copy of
the header is written beside it for people). Loading refuses, in one sentence, a damaged file,
another kind of network, and a study whose isotope or photopeak (window without the trained one),
collimator or voxel size (more than 10 %) differs from the training data's: a convolutional
network learns the blur and noise texture of one collimator at one voxel size, and a 113 keV or
Tc-99m study would be another problem altogether. A different matrix is accepted (the networks
are convolutional) and recorded in the result's info.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import SSPECTError
from . import Events, Method, Param, Result, register
from .toolkit.counts import check_subsets, scatter_or_zeros
from .toolkit.fitting import reproducible
from .toolkit.inputs import ct_channel, osem
from .toolkit.networks import Padding, inverse_softplus, unet
from .toolkit.weights import check_study, load_state, read_weights, \
    resolve_weights, save_weights, tensors_of, voxel_mm

FORMAT = "sspect-supervised/1"
KINDS = ("post-unet", "unrolled-mapem")
# sspect/weights/<stem>_<voxel size>.safetensors; 'shipped' takes the one at the study's voxel size
SHIPPED = {"post-unet": "post_unet_lu177_megp", "unrolled-mapem": "unrolled_mapem_lu177_megp"}


# ---------------------------------------------------------------- what the networks see of a scan


class Scan:
    """One bed as the networks see it: counts, scatter, the start image ``x0``, its scale ``m``, the CT channel."""

    def __init__(self, problem, start_iterations: int, start_subsets: int, use_ct: bool):
        self.problem = problem
        self.system_matrix = problem.system_matrix
        self.counts = problem.projections.to(problem.device).float()
        self.scatter = scatter_or_zeros(problem).float()
        check_subsets(problem, start_subsets)
        self.start = osem(self.system_matrix, self.counts, self.scatter, start_iterations, start_subsets).float()
        self.scale = max(float(self.start.mean()), 1e-12)
        self.ct = ct_channel(problem) if use_ct else None
        self.padding = Padding(self.start.shape)  # a multiple of 8: both networks halve the grid at most three times
        self._sensitivity = None

    @property
    def sensitivity(self):
        """``A^T 1`` (exact back projection), computed once when an unrolled network first needs it."""
        import torch

        from ..physics.differentiable import back_project

        if self._sensitivity is None:
            self._sensitivity = back_project(torch.ones_like(self.counts), self.system_matrix).float()
        return self._sensitivity

    def network_input(self, image):
        """[1, C, padded grid]: ``image / m`` and, with a CT, ``mu / mu_water``."""
        import torch

        channels = [image / self.scale] + ([self.ct] if self.ct is not None else [])
        return self.padding.pad(torch.stack(channels)[None])

    def with_start_total(self, image):
        """``image`` scaled to the total of ``x0`` (OSEM's, which follows the counts; see the module docstring)."""
        return image * (self.start.sum() / image.sum().clamp_min(1e-12))

    def corrected(self, network, image):
        """``m softplus(softplus^-1(image / m) + network(...))``: ``image`` itself while the network outputs zero."""
        import torch.nn.functional as F

        z = (image / self.scale).clamp_min(1e-4)
        return self.scale * F.softplus(inverse_softplus(z) + self.padding.crop(network(self.network_input(image)))[0, 0])


def build_model(kind: str, features: int, in_channels: int, iterations: int = 3, upsampling: str = "transposed"):
    """The network of ``kind``, a ``torch.nn.Module`` called as ``model(scan, events)`` -> image in counts per voxel."""
    import torch

    class PostReconstructionUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet(features, in_channels, head="correction", upsampling=upsampling)

        def forward(self, scan: Scan, events: Events | None = None):
            return scan.with_start_total(scan.corrected(self.unet, scan.start))

    class UnrolledMAPEM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = unet(features, in_channels, head="correction", levels=3, upsampling=upsampling)
            self.log_beta = torch.nn.Parameter(torch.full((iterations,), math.log(0.1)))

        def forward(self, scan: Scan, events: Events | None = None):
            from ..physics.differentiable import back_project_differentiable, project

            sensitivity = scan.sensitivity
            seen = sensitivity > 1e-6 * float(sensitivity.max())
            beta_unit = float(sensitivity[seen].mean()) / scan.scale
            x = scan.start
            for k in range(iterations):
                u = scan.corrected(self.cnn, x)
                expected = project(x, scan.system_matrix) + scan.scatter
                ratio = torch.where(expected > 0, scan.counts / expected.clamp_min(1e-12), torch.zeros_like(expected))
                c = x * back_project_differentiable(ratio, scan.system_matrix)
                beta = torch.exp(self.log_beta[k]) * beta_unit
                b = sensitivity - beta * u
                root = torch.sqrt((b * b + 4 * beta * c).clamp_min(1e-20))
                # the two algebraically equal roots, each free of cancellation on its side of b = 0
                fused = torch.where(b > 0, 2 * c / (b + root).clamp_min(1e-20), (root - b) / (2 * beta))
                x = torch.where(seen, fused, torch.zeros_like(fused))
                if events is not None:
                    events.progress(0.5 + 0.5 * (k + 1) / iterations, f"unrolled MAP-EM iteration {k + 1}/{iterations}",
                                    stage="network", step=k + 1)
            return scan.with_start_total(x)

    if kind == "post-unet":
        return PostReconstructionUNet()
    if kind == "unrolled-mapem":
        return UnrolledMAPEM()
    raise SSPECTError(f"Unknown supervised network '{kind}'; choose {' or '.join(KINDS)}.")


# ---------------------------------------------------------------- weights on disk


def save_model(model, path, *, kind: str, architecture: dict, start_osem: tuple, problem, matrices: list,
               training: dict, validation: dict, code_version: str) -> dict:
    """Write the weights and their description (in the header and in a JSON copy beside it); returns the description."""
    import monai
    import torch

    description = {
        "format": FORMAT, "kind": kind, "architecture": architecture, "isotope": problem.isotope.name,
        "photopeak_keV": problem.photopeaks_keV[0], "energy_window_keV": list(problem.peak_window_keV),
        "collimator": problem.collimator_code, "voxel_mm": voxel_mm(problem), "matrices": matrices,
        "start_osem": {"iterations": start_osem[0], "subsets": start_osem[1]},
        "input": "x0 / mean(x0)" + (f", mu / {problem.isotope.mu_water_per_cm:g} per cm" if architecture["in_channels"] == 2 else ""),
        "training": training, "validation": validation, "code_version": code_version,
        "torch": torch.__version__, "monai": monai.__version__,
    }
    return save_weights(tensors_of(model), path, description, json_copy=True)


def load_model(path, kind: str, problem):
    """(model, description) from a file :func:`save_model` wrote, refused in one sentence if it does not fit the study."""
    path = Path(path)
    state, description = read_weights(path, "sspect train", FORMAT, "a supervised network")
    if description["kind"] != kind:
        raise SSPECTError(f"The network {path} is a {description['kind']} network, not {kind}; use it with the method "
                          f"{description['kind']} or give a {kind} network.")
    check_study(path, description, problem, "train a network at this one")
    architecture = description["architecture"]
    if architecture["in_channels"] == 2 and problem.attenuation_map is None:
        raise SSPECTError(f"The network {path} needs the CT as its second input; give the study's CT.")
    model = build_model(kind, architecture["features"], architecture["in_channels"], architecture.get("iterations", 3),
                        architecture.get("upsampling", "transposed"))  # networks written before it was recorded
    return load_state(model, state, path, "train").to(problem.device).eval(), description


def _trained_on(description: dict) -> dict:
    """What the provenance keeps of the training data: how many scans, which seeds and levels, the manifest's hash."""
    data = description["training"].get("data", {})
    seeds = data.get("phantom_seeds") or [None]
    return {"scans": len(data.get("training_cases", [])), "validation_scans": len(data.get("validation_cases", [])),
            "phantom_seeds": f"{min(seeds)}-{max(seeds)}" if None not in seeds else "", "seconds_per_view": data.get("seconds_per_view"),
            "manifest_sha256": data.get("manifest_sha256", ""), "steps": description["training"].get("steps_done")}


# ---------------------------------------------------------------- the methods


def _runner(kind: str):
    def run(problem, params, events: Events) -> Result:
        import torch

        path = resolve_weights(params["weights"], SHIPPED[kind], problem)
        with reproducible(problem.device, 0):  # building the network draws initial weights, replaced by the file's
            model, description = load_model(path, kind, problem)
        start = description["start_osem"]
        events.progress(0.0, f"start image: OSEM {start['iterations']} x {start['subsets']}", stage="start")
        scan = Scan(problem, start["iterations"], start["subsets"], description["architecture"]["in_channels"] == 2)
        events.progress(0.5, "network", stage="network")
        with torch.no_grad():
            image = model(scan, events)
        if events.wants_iterates:
            events.iterate(1, image.cpu().numpy().copy())
        events.progress(1.0, "done", stage="done")
        matrix = list(problem.object_meta.shape)
        return Result(image.cpu().numpy(), {
            "weights": str(path), "weights_sha256": description["sha256"], "kind": kind,
            "trained_on": _trained_on(description), "validation": description["validation"],
            "start_osem": start, "matrix": matrix, "matrix_seen_in_training": matrix in description["matrices"],
        })

    return run


WEIGHTS_HELP = ("The trained network: 'shipped' for the one that comes with the engine at the study's voxel size (177Lu, GE MEGP; "
                "post-unet at 4.4 and 8.8 mm, unrolled-mapem at 8.8 mm: 2x2-binned 4.4 mm detectors), or a .safetensors file "
                "written by `sspect train`")

register(Method("post-unet", "Post-reconstruction U-Net (supervised, on OSEM + CT)", "supervised",
                (Param("weights", str, "shipped", WEIGHTS_HELP),), _runner("post-unet")))
register(Method("unrolled-mapem", "Unrolled MAP-EM (supervised, EM steps fused with a CNN)", "supervised",
                (Param("weights", str, "shipped", WEIGHTS_HELP),), _runner("unrolled-mapem")))
