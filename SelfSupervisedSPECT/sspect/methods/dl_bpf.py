"""Self-supervised DL-BPF: back-project the data, then a network, trained by the likelihood.

Reader, "Self-supervised and supervised deep learning for PET image reconstruction", AIP Conf.
Proc. 2024 (arXiv 2302.13086), frames learned reconstruction as operators on the data; DL-BPF
back-projects the measured data and lets a network turn that into the image,
``x = c * softplus(f_theta(x_BP, mu))``, and theta minimises the Poisson NLL of the projections,
``sum_i [ybar_i - y_i log ybar_i]`` with ``ybar = A x + s``, through :mod:`.projector` (exact
transpose for the gradient). No ground truth is used. Unlike the deep image prior, the input
depends on the data, so one network can serve many scans; both of Reader's regimes are here:

* per scan (default, ``weights`` empty): a network with random weights trained on this scan only;
* pretrained + fine-tuned: :func:`pretrain` trains ONE network over many (simulated) scans with the
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
channel is ``mu / 0.136 cm^-1`` (water at 208 keV), a fixed physical scale, so that the same
anatomy gives the same input on every scan (the deep image prior's ``mu / max(mu)`` would change
with the densest bone in the field).

Training is the deep image prior's (:func:`.self_supervised.fit_likelihood`), with two choices
measured here. (1) A new network is first fitted for ``warm_start_steps`` by MSE to a 2-iteration
OSEM image of the training counts (cheap: no projection); from a uniform output the likelihood
alone needs well over 300 steps (NRMSE 0.50 after 300 at learning rate 0.01). (2) The gradient
reaching the image is EM-preconditioned (:func:`.self_supervised.em_preconditioned`: times
``x / A^T 1``, which turns it into the MLEM step ``x - x_EM``, a descent direction of the same NLL
with the same stationary points): from the same start it reached NRMSE 0.345 in 200 steps where
the plain gradient reached 0.46 in 300. Stopping: binomial thinning holds out
``validation_fraction`` of the counts, the image with the lowest held-out NLL is kept
(``best_step``) and training stops ``patience`` checks after it (``stopped_at``). The network is
dip's small MONAI U-Net with one or two input channels, its output starting uniform.

A pretrained file holds the weights and, in the safetensors header (text only, nothing executed),
the architecture (features, input channels, strides), the voxel size in mm, the collimator code
when known, the isotope (177Lu), the input normalisation, the training set-up and the sha256 of
the weights. Loading refuses, in one sentence, a file that is not such a network, whose weights
do not match their checksum, whose architecture differs from the one asked for (``features``,
CT channel) or whose voxel size differs by more than 10 % from the scan's: a convolutional network
learns blur and noise texture in voxels, so it is tied to the voxel size it was trained at.

Measured on the 32^3, 24-view simulated study (12-mm voxels, 20 s per view; 2 cores, one torch
thread; NRMSE against the phantom's truth, OSEM 10 iterations x 4 subsets: 0.325):

* per scan, defaults (warm start 200, at most 300 likelihood steps): NRMSE 0.305, best step 280,
  stopped at 300, ~30 s; total within 0.2 % of OSEM's.
* pretrained on 4 other scans of the phantom (seeds 2-5 at 10, 20, 40 and 20 s per view; 800
  warm-start + 1200 likelihood steps, 250 s, features 16): applied as is (``fine_tune_steps`` 0)
  0.337 in 0.1 s; fine-tuned 100 steps (default) 0.303 in 9 s; 200 steps 0.299 in 18 s.
  A short pretraining is not enough: 150 warm-start + 600 steps gave 0.456 as is, 0.420 fine-tuned.
  Caveat: those scans share the test scan's anatomy (the seed changes concentrations by a few %
  and the noise), so this is the best case for a pretrained network; on patients, pretrain on
  varied anatomy and always fine-tune.

For comparison, dip (CT input, OSEM pretraining) reaches 0.287 on the same study: its input has
no noise to pass through. On a real 64^3-128^3 bed use a GPU (a CPU step costs ~20 s at 128^3)
and the same defaults; the per-step cost is one forward and one back projection, as for dip.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import SSPECTError
from . import Events, Method, Param, Result, register
from .network_files import ISOTOPE, MU_WATER_PER_CM, VOXEL_TOLERANCE, read_network_file, voxel_size_differs, weights_sha256
from .network_files import voxel_mm as _voxel_mm
from .self_supervised import STRIDES, _network, _network_features, _padding, _reproducible, _short_osem, fit_likelihood, \
    fit_to_image, poisson_nll, split_problem_counts

FORMAT = "sspect-dl-bpf/1"
PRETRAIN_LEARNING_RATE = 0.003

PARAMS = (
    Param("iterations", int, 300, "Maximum number of optimiser steps on the likelihood for a network trained on this scan only",
          1, 100000),
    Param("learning_rate", float, 0.003, "Adam learning rate of the likelihood training (and of the fine-tuning)", 1e-6, 1.0),
    Param("validation_fraction", float, 0.1,
          "Share of the counts held out by binomial thinning to choose when to stop (0: no hold-out, run all steps)",
          0.0, 0.5),
    Param("validation_interval", int, 5, "Optimiser steps between validation checks", 1, 10000),
    Param("patience", int, 10, "Validation checks without improvement before stopping (0: never stop early)", 0, 100000),
    Param("features", int, 16, "Channels of the U-Net's first level (doubling at each of its four levels)", 2, 64),
    Param("warm_start_steps", int, 200,
          "Steps fitting a new network to a 2-iteration OSEM image of this scan before the likelihood (0: none; "
          "not used with pretrained weights)", 0, 100000),
    Param("ct_input", bool, True, "Give the network the attenuation map as a second input channel when there is a CT"),
    Param("weights", str, "", "Pretrained network: a .safetensors file written by `sspect pretrain`, or 'shipped' for the one "
          "that comes with the engine (8.8 mm voxels: 2x2-binned 4.4 mm detectors); empty: train a new network on this scan"),
    Param("fine_tune_steps", int, 100,
          "Likelihood steps adapting the pretrained network to this scan (0: apply it as it is)", 0, 100000),
    Param("seed", int, 0, "Seed of the network weights and of the count split (same seed, same image on the same CPU)",
          0, 2**31 - 1),
)


# ---------------------------------------------------------------- the network's input


def backprojection_image(problem, counts, scatter):
    """(``x_BP = u A^T(y / (A u + s)) / A^T 1``, ``A^T 1``): one MLEM update from the uniform image ``u`` with the measured total."""
    import torch

    from .projector import back_project

    system_matrix = problem.system_matrix
    ones = torch.ones(tuple(problem.object_meta.shape), device=counts.device)
    sensitivity = back_project(torch.ones_like(counts), system_matrix)
    ray_sums = system_matrix.forward(ones)
    uniform = max(float(counts.sum() - scatter.sum()), 1e-3 * float(counts.sum())) / float(ray_sums.sum())
    expected = uniform * ray_sums + scatter
    ratio = torch.where(expected > 0, counts / expected.clamp_min(1e-12), torch.zeros_like(counts))
    seen = sensitivity > 1e-6 * float(sensitivity.max())
    x_bp = torch.where(seen, uniform * back_project(ratio, system_matrix) / sensitivity.clamp_min(1e-12),
                       torch.zeros_like(sensitivity))
    return x_bp, sensitivity


def _uses_ct(problem, ct_input: bool) -> bool:
    return ct_input and problem.attenuation_map is not None and float(problem.attenuation_map.max()) > 0


class _Inputs:
    """The padded network input of one scan, its scale ``m``, the crop back to the object grid and ``A^T 1``."""

    def __init__(self, problem, counts, scatter, use_ct: bool):
        import torch
        import torch.nn.functional as F

        x_bp, self.sensitivity = backprojection_image(problem, counts, scatter)
        x_bp = x_bp.float()
        self.scale = max(float(x_bp.mean()), 1e-12)
        channels = [x_bp / self.scale]
        if use_ct:
            channels.append(problem.attenuation_map.to(x_bp.device, torch.float32) / MU_WATER_PER_CM)
        shape = tuple(problem.object_meta.shape)
        padding = _padding(shape)
        self.tensor = F.pad(torch.stack(channels)[None], padding, mode="replicate")
        self.crop = tuple(slice(padding[2 * i], padding[2 * i] + size) for i, size in enumerate(reversed(shape)))[::-1]
        self.channels = len(channels)

    def image(self, network):
        """``x = m softplus(f_theta(x_BP / m, mu / mu_water))`` on the object grid."""
        import torch.nn.functional as F

        return self.scale * F.softplus(network(self.tensor)[0, 0][self.crop])


# ---------------------------------------------------------------- weights on disk

# Pretrained with `sspect pretrain` (defaults) on four simulated torso scans; see docs/self-supervised-report.
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "dl_bpf_lu177_megp_8.8mm.safetensors"


def resolve_weights(value: str) -> Path:
    """'shipped' -> the network that comes with the engine; anything else is a path."""
    return SHIPPED_WEIGHTS if value.strip().lower() == "shipped" else Path(value).expanduser()



def save_network(network, path, *, features: int, in_channels: int, voxel_mm, collimator: str = "",
                 training: dict | None = None) -> dict:
    """Write the network's weights and its description (header metadata) to a .safetensors file; returns the metadata."""
    import monai
    import torch
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    metadata = {
        "format": FORMAT, "architecture": "monai.networks.nets.UNet",
        "features": str(features), "in_channels": str(in_channels),
        "channels": json.dumps(list(_network_features(features))), "strides": json.dumps(list(STRIDES)),
        "voxel_mm": json.dumps([float(v) for v in voxel_mm]), "collimator": collimator, "isotope": ISOTOPE,
        "input": "x_BP / mean(x_BP)" + (", mu / 0.136 per cm" if in_channels == 2 else "")
                 + "; image = mean(x_BP) * softplus(output)",
        "training": json.dumps(training or {}), "torch": torch.__version__, "monai": monai.__version__,
        "sha256": weights_sha256(state),
    }
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata=metadata)
    return metadata


def load_network(path, *, features: int, in_channels: int, voxel_mm):
    """(network, metadata) from a file :func:`save_network` wrote, refused in one sentence if it does not fit."""
    path = Path(path)
    state, metadata = read_network_file(path, "sspect pretrain")
    if metadata.get("format") != FORMAT or "sha256" not in metadata:
        raise SSPECTError(f"The file {path} is not a DL-BPF network (format '{metadata.get('format')}', expected {FORMAT}); give a network written by sspect pretrain.")
    if metadata.get("isotope") != ISOTOPE:
        raise SSPECTError(f"The network {path} was pretrained for {metadata.get('isotope')}, not {ISOTOPE}; pretrain one on {ISOTOPE} scans.")
    stored = (int(metadata.get("features", -1)), int(metadata.get("in_channels", -1)))
    if stored != (features, in_channels):
        raise SSPECTError(
            f"The network {path} has {stored[0]} features and {stored[1]} input channel(s) but this run asks for "
            f"{features} and {in_channels} (the second channel is the CT); set features = {stored[0]} and "
            f"ct_input = {'true' if stored[1] == 2 else 'false'}, with a CT when it needs one, or pretrain a matching network.")
    trained_mm = json.loads(metadata["voxel_mm"])
    if voxel_size_differs(voxel_mm, trained_mm):
        raise SSPECTError(f"The network {path} was pretrained on {trained_mm} mm voxels but this scan has {list(voxel_mm)} mm "
                          f"(more than {VOXEL_TOLERANCE:.0%} apart); pretrain a network at this voxel size or train per scan.")
    network = _network(features, 1.0, in_channels)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError:
        raise SSPECTError(f"The weights in {path} do not fit the network its header describes; pretrain it again.") from None
    return network, metadata


# ---------------------------------------------------------------- pretraining over many scans


def pretrain(problems, out_path, steps: int, seed: int = 0, features: int = 16, *, warm_start_steps: int = 200,
             learning_rate: float = PRETRAIN_LEARNING_RATE, ct_input: bool = True, collimator: str = "",
             events: Events | None = None, training_data: dict | None = None) -> dict:
    """Train one DL-BPF network over ``problems`` by the self-supervised likelihood; save it to ``out_path``.

    No ground truth: each step takes the next scan in turn. ``warm_start_steps`` steps first fit
    the network to each scan's 2-iteration OSEM image (as a per-scan run does), then ``steps``
    steps minimise the scan's Poisson NLL ``sum(A x + s - y log(A x + s)) / sum(y)`` (divided by
    its counts so that every scan weighs the same whatever its count level), EM-preconditioned.
    All counts are used and every step is run (no hold-out: fine-tuning on the target scan stops
    on its own). Returns the metadata written in the file's header; ``collimator`` (e.g.
    "GI-MEGP") and ``training_data`` (what the scans were, how to make them again) are recorded
    there for the user.
    """
    import torch

    from .projector import project
    from .self_supervised import em_preconditioned

    problems = list(problems)
    events = events or Events()
    if not problems:
        raise SSPECTError("Pretraining needs at least one scan; give a list of problems.")
    if steps < 1 or warm_start_steps < 0:
        raise SSPECTError(f"Pretraining needs at least one likelihood step and no negative warm start, not {steps} and {warm_start_steps}.")
    voxel_mm = _voxel_mm(problems[0])
    for problem in problems[1:]:
        if voxel_size_differs(_voxel_mm(problem), voxel_mm):
            raise SSPECTError(f"The scans have different voxel sizes ({voxel_mm} and {_voxel_mm(problem)} mm); pretrain one network per voxel size.")
    with_ct = [_uses_ct(problem, ct_input) for problem in problems]
    if len(set(with_ct)) > 1:
        raise SSPECTError("Some scans have a CT and some do not; pretrain with ct_input false or give every scan its CT.")
    in_channels = 2 if with_ct[0] else 1
    device = problems[0].device
    total = warm_start_steps + steps
    with _reproducible(device, seed):
        scans = []
        for problem in problems:
            counts = problem.projections.to(device)
            scatter = problem.scatter.to(device) if problem.scatter is not None else torch.zeros_like(counts)
            start = _short_osem(problem, counts, scatter) if warm_start_steps else None
            scans.append((problem, counts, scatter, _Inputs(problem, counts, scatter, with_ct[0]), start))
        network = _network(features, 1.0, in_channels).to(device)
        optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
        for step in range(1, total + 1):
            index = (step - 1) % len(scans)
            problem, counts, scatter, inputs, start = scans[index]
            if step <= warm_start_steps:
                loss = torch.mean((inputs.image(network) - start) ** 2) / inputs.scale ** 2
                stage = "warm start"
            else:
                x = em_preconditioned(inputs.image(network), inputs.sensitivity)
                loss = poisson_nll(project(x, problem.system_matrix) + scatter, counts) / counts.sum().clamp_min(1.0)
                stage = "pretrain"
            value = loss.detach().item()
            if not math.isfinite(value):
                raise SSPECTError(f"Pretraining diverged at step {step}; lower the learning rate.")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            events.progress(step / total, f"{stage} step {step}/{total} on scan {index + 1}/{len(scans)}, loss {value:.5g}",
                            stage=stage, step=step, scan=index, loss=value)
    training = {"scans": len(problems), "warm_start_steps": warm_start_steps, "steps": steps, "seed": seed,
                "learning_rate": learning_rate,
                "loss": "MSE to each scan's 2-iteration OSEM, then EM-preconditioned Poisson NLL of all counts per count, "
                        "one scan a step", **({"data": training_data} if training_data else {})}
    return save_network(network, out_path, features=features, in_channels=in_channels, voxel_mm=voxel_mm,
                        collimator=collimator, training=training)


# ---------------------------------------------------------------- the method


def run_dl_bpf(problem, params, events: Events) -> Result:
    import torch

    device = problem.device
    use_ct = _uses_ct(problem, params["ct_input"])
    if params["ct_input"] and not use_ct:
        events.log("No CT: the network's only input is the back projection.")
    in_channels = 2 if use_ct else 1
    pretrained = bool(params["weights"].strip())
    steps = params["fine_tune_steps"] if pretrained else params["iterations"]
    fraction = params["validation_fraction"] if steps else 0.0
    info = {"regime": "per scan", "weights": "", "weights_sha256": "", "warm_start_steps": 0 if pretrained else params["warm_start_steps"]}
    with _reproducible(device, params["seed"]):
        if pretrained:
            network, metadata = load_network(resolve_weights(params["weights"]), features=params["features"], in_channels=in_channels,
                                             voxel_mm=_voxel_mm(problem))
            network = network.to(device)
            info = {"regime": "pretrained, fine-tuned" if steps else "pretrained", "weights": params["weights"],
                    "weights_sha256": metadata["sha256"], "pretrained_on": json.loads(metadata["training"])}
        counts = split_problem_counts(problem, fraction, params["seed"], events)
        inputs = _Inputs(problem, counts.train / counts.keep, counts.scatter, use_ct)
        if not pretrained:
            network = _network(params["features"], 1.0, in_channels).to(device)

        def image():
            return inputs.image(network)

        warm_start_steps = 0 if pretrained else params["warm_start_steps"]
        if warm_start_steps:
            start = _short_osem(problem, counts.train, counts.keep * counts.scatter) / counts.keep
            fit_to_image(image, network.parameters(), start, inputs.scale, events, steps=warm_start_steps, steps_after=steps,
                         stage="warm start")
        if steps:
            fit = fit_likelihood(image, network.parameters(), problem.system_matrix, counts, events,
                                 iterations=steps, learning_rate=params["learning_rate"],
                                 validation_interval=params["validation_interval"], patience=params["patience"],
                                 steps_before=warm_start_steps, name="DL-BPF", sensitivity=inputs.sensitivity)
            final, fit_info = fit.image, {"best_step": fit.best_step, "stopped_at": fit.stopped_at,
                                          "stopped_early": fit.stopped_early, "validation_nll": fit.validation_nll}
        else:
            with torch.no_grad():
                final = image()
            if events.wants_iterates:
                events.iterate(0, final.cpu().numpy().copy())
            events.progress(1.0, "pretrained network applied as it is", stage="done", step=0)
            fit_info = {"best_step": 0, "stopped_at": 0, "stopped_early": False, "validation_nll": []}
        image_array = final.detach().cpu().numpy()
    info.update(fit_info)
    info.update({
        "validation_fraction": fraction, "input": "back projection" + (" + attenuation map" if use_ct else ""),
        "input_scale": inputs.scale,
        "network": f"MONAI UNet channels {list(_network_features(params['features']))}, strides {list(STRIDES)}, "
                   f"{in_channels} input channel(s)",
        "network_parameters": sum(p.numel() for p in network.parameters()), "seed": params["seed"],
    })
    return Result(image_array, info)


register(Method("dl-bpf", "DL-BPF (back projection into a network, self-supervised)", "self-supervised", PARAMS, run_dl_bpf))
