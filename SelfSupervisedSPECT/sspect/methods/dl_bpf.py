"""Self-supervised DL-BPF: back-project the data, then a network, trained by the likelihood.

Reader, "Self-supervised and supervised deep learning for PET image reconstruction", AIP Conf.
Proc. 2024 (arXiv 2302.13086), frames learned reconstruction as operators on the data; DL-BPF
back-projects the measured data and lets a network turn that into the image,
``x = c * softplus(f_theta(x_BP, mu))``, and theta minimises the Poisson NLL of the projections,
``sum_i [ybar_i - y_i log ybar_i]`` with ``ybar = A x + s``, through the exact transpose for the gradient. No ground truth is used. Unlike the deep image prior, the input
depends on the data, so one network can serve many scans; both of Reader's regimes are here:

* per scan (default, ``weights`` empty): a network with random weights trained on this scan only;
* pretrained + fine-tuned: :func:`sspect.training.dl_bpf.pretrain` trains ONE network over many (simulated) scans with the
  same self-supervised likelihood, one scan a step, and saves it with safetensors; ``weights``
  loads it and ``fine_tune_steps`` likelihood steps adapt it to this scan (0: apply it as is, one
  network evaluation, well under a second).

The input ``x_BP`` is one MLEM update from the uniform image ``u`` whose projection holds the
measured counts, ``x_BP = u * A^T(y / (A u + s)) / A^T 1``, rather than ``A^T y / A^T 1``: dividing
the data by the expected projection ``A u + s`` removes the ray-length and attenuation weighting
of the plain back projection (central voxels are seen by long, attenuated rays and would come out
dim) and takes the scatter out the same way EM does, so ``x_BP`` is already an image of counts per
voxel on OSEM's scale (a blurred first EM iterate). It costs one forward and two back projections.
With a hold-out the input is built from the training counts ``y_train / (1 - p)`` only: built
from all counts it would show the network the held-out noise, and the validation NLL could no
longer see the network copying it.

Count level: ``x_BP`` is linear in the counts (``y, s -> k y, k s`` gives ``u -> k u`` and
``x_BP -> k x_BP``). The network sees ``x_BP / m`` with ``m`` the mean of ``x_BP`` over the grid, and
the image is ``x = m * softplus(f)``: the whole map is then equivariant to the count level, so a
network pretrained on 20-s scans gives, on a 5-s scan, the same image shape times the scan's own
scale (only the noise in the input differs; fine-tuning adapts to it). A percentile would follow
the hottest lesion and its noise; the mean is the measured counts per voxel. The attenuation
channel is ``mu / mu_water`` at the isotope's photopeak (0.136 cm^-1 for 177Lu), a fixed physical scale, so that the same
anatomy gives the same input on every scan (the deep image prior's ``mu / max(mu)`` would change
with the densest bone in the field).

Training is the deep image prior's (:func:`.toolkit.objectives.fit_likelihood`), with two choices
(figures in ``docs/methods/dl-bpf.md``). (1) A new network is first fitted for ``pretrain_steps``
by MSE to a 2-iteration OSEM image of the training counts (cheap: no projection); from a uniform
output the likelihood alone needs many more steps. (2) The gradient reaching the image is
EM-preconditioned (:func:`.toolkit.objectives.em_preconditioned`: times ``x / A^T 1``, which turns
it into the MLEM step ``x - x_EM``, a descent direction of the same NLL with the same stationary
points), which resolves the image in fewer steps. Stopping: binomial thinning holds out
``validation_fraction`` of the counts, the image with the lowest held-out NLL is kept
(``best_step``) and training stops ``patience`` checks after it (``stopped_at``). The network is
dip's small MONAI U-Net with one or two input channels, its output starting uniform.

A pretrained file holds the weights and, in the safetensors header (text only, nothing executed),
the architecture (features, input channels, strides), the voxel size in mm, the collimator code
when known, the isotope and its photopeak, the input normalisation, the training set-up and the sha256 of
the weights. Loading refuses, in one sentence, a file that is not such a network, whose weights
do not match their checksum, whose architecture differs from the one asked for (``features``,
CT channel) or whose voxel size differs by more than 10 % from the scan's: a convolutional network
learns blur and noise texture in voxels, so it is tied to the voxel size it was trained at.

Measurements behind the defaults: ``docs/methods/dl-bpf.md``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SSPECTError
from . import Events, Method, Param, Result, register
from .toolkit import parameters
from .toolkit.counts import hold_out
from .toolkit.fitting import reproducible
from .toolkit.inputs import backprojection_image, ct_channel, has_ct, short_osem
from .toolkit.networks import Padding, describe, unet, upsampling_of
from .toolkit.objectives import fit_likelihood, fit_to_image
from .toolkit.weights import check_study, load_state, read_weights, resolve_weights, \
    save_weights, tensors_of, voxel_mm

FORMAT = "sspect-dl-bpf/1"
# Pretrained with `sspect pretrain` (defaults) on four simulated torso scans; see docs/self-supervised-report.
# The files are sspect/weights/<stem>_<voxel size>.safetensors; 'shipped' takes the one at the study's voxel size.
SHIPPED = "dl_bpf_lu177_megp"

PARAMS = parameters.stopped_training(
    300, 0.003, 5, 10, "Maximum number of optimiser steps on the likelihood for a network trained on this scan only") + (
    parameters.features(16),
    parameters.UPSAMPLING,
    parameters.pretrain_steps(200),
    Param("ct_input", bool, True, "Give the network the attenuation map as a second input channel when there is a CT"),
    Param("weights", str, "", "Pretrained network: a .safetensors file written by `sspect pretrain`, or 'shipped' for the one "
          "that comes with the engine (8.8 mm voxels: 2x2-binned 4.4 mm detectors); empty: train a new network on this scan"),
    Param("fine_tune_steps", int, 100,
          "Likelihood steps adapting the pretrained network to this scan (0: apply it as it is)", 0, 100000),
    parameters.SEED,
    parameters.ENSEMBLE,
)


def uses_ct(problem, ct_input: bool) -> bool:
    return ct_input and has_ct(problem)


class Inputs:
    """The padded network input of one scan (``x_BP / m`` and the CT channel), its scale ``m`` and ``A^T 1``."""

    def __init__(self, problem, counts, scatter, use_ct: bool):
        import torch

        x_bp, self.sensitivity = backprojection_image(problem, counts, scatter)
        x_bp = x_bp.float()
        self.scale = max(float(x_bp.mean()), 1e-12)
        channels = [x_bp / self.scale] + ([ct_channel(problem)] if use_ct else [])
        self.padding = Padding(x_bp.shape)
        self.tensor = self.padding.pad(torch.stack(channels)[None])
        self.channels = len(channels)

    def image(self, network):
        """``x = m softplus(f_theta(x_BP / m, mu / mu_water))`` on the object grid."""
        import torch.nn.functional as F

        return self.scale * F.softplus(self.padding.crop(network(self.tensor))[0, 0])


def save_network(network, path, problem, *, features: int, in_channels: int, training: dict | None = None) -> dict:
    """Write a DL-BPF network and its description; returns the description."""
    import monai
    import torch

    description = {
        "format": FORMAT, "architecture": "monai.networks.nets.UNet", "features": features, "in_channels": in_channels,
        "channels": [features * 2**k for k in range(4)], "strides": [2, 2, 2], "upsampling": upsampling_of(network),
        "voxel_mm": voxel_mm(problem), "collimator": problem.collimator_code, "isotope": problem.isotope.name,
        "photopeak_keV": problem.photopeaks_keV[0],
        "input": "x_BP / mean(x_BP)" + (f", mu / {problem.isotope.mu_water_per_cm:g} per cm" if in_channels == 2 else "")
                 + "; image = mean(x_BP) * softplus(output)",
        "training": training or {}, "torch": torch.__version__, "monai": monai.__version__,
    }
    return save_weights(tensors_of(network), path, description)


def load_network(path, problem, *, features: int, in_channels: int):
    """(network, description) from a file :func:`save_network` wrote, refused in one sentence if it does not fit."""
    path = Path(path)
    state, description = read_weights(path, "sspect pretrain", FORMAT, "a DL-BPF network")
    stored = (description.get("features"), description.get("in_channels"))
    if stored != (features, in_channels):
        raise SSPECTError(
            f"The network {path} has {stored[0]} features and {stored[1]} input channel(s) but this run asks for "
            f"{features} and {in_channels} (the second channel is the CT); set features = {stored[0]} and "
            f"ct_input = {'true' if stored[1] == 2 else 'false'}, with a CT when it needs one, or pretrain a matching network.")
    check_study(path, description, problem, "pretrain a network at this voxel size or train per scan")
    upsampling = description.get("upsampling", "transposed")  # networks written before it was recorded
    return load_state(unet(features, in_channels, head="positive", upsampling=upsampling), state, path, "pretrain"), description


def run_dl_bpf(problem, params, events: Events) -> Result:
    import torch

    use_ct = uses_ct(problem, params["ct_input"])
    if params["ct_input"] and not use_ct:
        events.log("No CT: the network's only input is the back projection.")
    in_channels = 2 if use_ct else 1
    pretrained = bool(params["weights"].strip())
    steps = params["fine_tune_steps"] if pretrained else params["steps"]
    pretrain = 0 if pretrained else params["pretrain_steps"]
    info = {"regime": "per scan", "weights": "", "weights_sha256": "", "pretrain_steps": pretrain}
    with reproducible(problem.device, params["seed"]):
        if pretrained:
            network, description = load_network(resolve_weights(params["weights"], SHIPPED, problem), problem,
                                                 features=params["features"], in_channels=in_channels)
            info.update({"regime": "pretrained, fine-tuned" if steps else "pretrained", "weights": params["weights"],
                         "weights_sha256": description["sha256"], "pretrained_on": description["training"]})
        counts = hold_out(problem, params["validation_fraction"] if steps else 0.0, params["seed"], events)
        inputs = Inputs(problem, counts.train / counts.keep, counts.scatter, use_ct)
        if not pretrained:
            network = unet(params["features"], in_channels, head="positive", upsampling=params["upsampling"])
        network = network.to(problem.device)

        def image():
            return inputs.image(network)

        total = max(pretrain + steps, 1)
        if pretrain:
            start = short_osem(problem.system_matrix, counts.train, counts.keep * counts.scatter) / counts.keep
            fit_to_image(image, network.parameters(), start, inputs.scale, events, steps=pretrain,
                         progress=(0.0, pretrain / total), stage="pretrain")
        if steps:
            fit = fit_likelihood(image, network.parameters(), problem.system_matrix, counts, events, steps=steps,
                                 learning_rate=params["learning_rate"], validation_interval=params["validation_interval"],
                                 patience=params["patience"], progress=(pretrain / total, steps / total), name="DL-BPF",
                                 sensitivity=inputs.sensitivity)
            final, fit_info, summary = fit.kept, fit.info(), fit.summary()
        else:
            with torch.no_grad():
                final = image()
            if events.wants_iterates:
                events.iterate(0, final.cpu().numpy().copy())
            fit_info = {"best_step": 0, "stopped_at": 0, "stopped_early": False, "validation_nll": []}
            summary = "pretrained network applied as it is"
        events.progress(1.0, summary, stage="done", step=fit_info["stopped_at"])
        image_array = final.detach().cpu().numpy()
    info.update({**fit_info, "validation_fraction": counts.fraction,
                 "input": "back projection" + (" + attenuation map" if use_ct else ""), "input_scale": inputs.scale,
                 **describe(network, params["features"]), "seed": params["seed"]})
    info["network"] += f", {in_channels} input channel(s)"
    return Result(image_array, info)


register(Method("dl-bpf", "DL-BPF (back projection into a network, self-supervised)", "self-supervised", PARAMS, run_dl_bpf))
