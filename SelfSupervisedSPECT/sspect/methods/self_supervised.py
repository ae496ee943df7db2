"""Self-supervised reconstruction: deep image prior with the CT as the network input.

``dip`` is the direct form of Gong et al., IEEE TMI 38(7) 2019: the image is the output of a
3D U-Net whose input is the attenuation map, ``x = c * softplus(f_theta(mu))``, and theta
minimises the Poisson negative log-likelihood of the projections through the system model,
``sum_i [ybar_i - y_i log ybar_i]`` with ``ybar = A x + s``, back-propagated through
:mod:`.projector` (forward projection, exact transpose for the gradient). No ground truth is used.

Run long enough, a deep image prior fits the noise, so it must be stopped early (Hashimoto et al.,
PMB 2025). The stopping point is chosen on held-out counts: binomial thinning splits the
projections into ``y_train ~ Binomial(y, 1 - p)`` and ``y_val = y - y_train``, which for Poisson
data are independent Poisson with means ``(1 - p)(A x + s)`` and ``p (A x + s)``. The network is
trained on ``y_train`` with the system and scatter scaled by ``1 - p``, so ``x`` stays the image
of the *full* acquisition (no rescaling afterwards: the returned image is in the same counts per
voxel as OSEM of all counts). Every ``validation_interval`` steps the validation NLL of
``y_val`` under ``p (A x + s)`` is computed (free: it reuses that step's forward projection); the
image with the lowest validation NLL is kept, and training stops after ``patience`` checks
without improvement. NLL values are reported as ``sum(mu - y + y log(y / mu))`` (the NLL minus
its value for a perfect fit, so 0 is a perfect fit and only differences matter).

Optional pretraining fits the network, by mean squared error, to a 2-iteration OSEM image of
the training counts, which puts it near the right image before the likelihood takes over.
"""
from __future__ import annotations

import contextlib
import copy
import math

from ..errors import SSPECTError
from . import Events, Method, Param, Result, register

UNET_LEVELS = 4  # BasicUNet pools four times: the grid is padded to a multiple of 2**4


PARAMS = (
    Param("iterations", int, 300, "Maximum number of optimiser steps on the likelihood", 1, 100000),
    Param("learning_rate", float, 0.01, "Adam learning rate", 1e-6, 1.0),
    Param("validation_fraction", float, 0.1,
          "Share of the counts held out by binomial thinning to choose when to stop (0: no hold-out, run all iterations)",
          0.0, 0.5),
    Param("validation_interval", int, 5, "Optimiser steps between validation checks", 1, 10000),
    Param("patience", int, 8, "Validation checks without improvement before stopping (0: never stop early)", 0, 100000),
    Param("pretrain_steps", int, 50, "Steps fitting the network to a 2-iteration OSEM image first (0: none)", 0, 100000),
    Param("features", int, 8, "Channels of the U-Net's first level; deeper levels have up to 8 times as many", 2, 64),
    Param("seed", int, 0, "Seed of the network weights and of the count split (same seed, same image on the same machine)",
          0, 2**31 - 1),
)


def _network(features: int):
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=_network_features(features))


def _network_features(f: int) -> tuple[int, ...]:
    """Channels per level of the BasicUNet (five levels and the output block)."""
    return (f, 2 * f, 4 * f, 4 * f, 8 * f, f)


def _padding(shape) -> list[int]:
    """F.pad widths (last dimension first) that make every dimension a multiple of 2**UNET_LEVELS."""
    step = 2 ** UNET_LEVELS
    widths = []
    for size in reversed(shape):
        extra = -size % step
        widths += [extra // 2, extra - extra // 2]
    return widths


@contextlib.contextmanager
def _reproducible(device, seed: int):
    """Seed torch inside, leave the caller's random state and cuDNN flags as they were."""
    import torch

    cuda = [device] if getattr(device, "type", str(device)) == "cuda" else []
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def split_counts(projections, fraction: float, seed: int):
    """(y_train, y_val): ``y_train ~ Binomial(y, 1 - fraction)``, ``y_val = y - y_train``.

    Drawn on the CPU with its own generator so the split is the same on every device. Counts
    must be whole numbers (they are, for raw projections); others are rounded first.
    """
    import torch

    counts = torch.round(projections.detach().to("cpu", torch.float64)).clamp_min(0)
    generator = torch.Generator().manual_seed(seed)
    train = torch.binomial(counts, torch.full_like(counts, 1.0 - fraction), generator=generator)
    dtype, device = projections.dtype, projections.device
    return train.to(device, dtype), (counts - train).to(device, dtype)


def poisson_nll(mean, counts):
    """``sum(mu - y + y log(y / mu))``: the Poisson NLL up to a constant, 0 for a perfect fit."""
    import torch

    mean = mean.clamp_min(1e-10)
    return (mean - counts + torch.xlogy(counts, counts) - counts * torch.log(mean)).sum()


def run_dip(problem, params, events: Events) -> Result:
    import torch
    import torch.nn.functional as F

    from .projector import project

    device = problem.device
    fraction = params["validation_fraction"]
    validating = fraction > 0
    keep = 1.0 - fraction
    with _reproducible(device, params["seed"]):
        counts = problem.projections.to(device)
        if not bool(torch.all(counts == torch.round(counts))):
            events.log("The projections are not whole counts; they are rounded for the count split.")
        y_train, y_val = split_counts(counts, fraction, params["seed"]) if validating else (counts, None)
        scatter = problem.scatter.to(device) if problem.scatter is not None else torch.zeros_like(counts)
        system_matrix = problem.system_matrix

        shape = tuple(problem.object_meta.shape)
        if problem.attenuation_map is not None and float(problem.attenuation_map.max()) > 0:
            mu = problem.attenuation_map.to(device, torch.float32)
            network_input, input_name = mu / mu.max(), "attenuation map"
        else:
            events.log("No CT: the network input is fixed random noise (the original deep image prior).")
            network_input, input_name = torch.rand(shape, device=device), "noise"
        padding = _padding(shape)
        network_input = F.pad(network_input[None, None], padding, mode="replicate")
        crop = tuple(slice(padding[2 * i], padding[2 * i] + size) for i, size in enumerate(reversed(shape)))[::-1]

        # c: the image scale, so that the network's outputs are O(1): a high percentile of a
        # short OSEM of the training counts (which is also the pretraining target)
        start = _short_osem(problem, y_train, keep * scatter) / keep
        scale = max(float(torch.quantile(start.flatten().float()[:: max(1, start.numel() // 1_000_000)], 0.999)), 1e-12)

        network = _network(params["features"]).to(device)
        optimiser = torch.optim.Adam(network.parameters(), lr=params["learning_rate"])

        def image():
            output = network(network_input)[0, 0][crop]
            return scale * F.softplus(output)

        total = params["pretrain_steps"] + params["iterations"]
        if params["pretrain_steps"]:
            target = start / scale
            for step in range(1, params["pretrain_steps"] + 1):
                loss = torch.mean((image() / scale - target) ** 2)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                events.progress(step / total, f"pretraining on OSEM, step {step}/{params['pretrain_steps']}, "
                                f"mse {float(loss):.4g}", stage="pretrain", step=step, loss=float(loss))
            optimiser = torch.optim.Adam(network.parameters(), lr=params["learning_rate"])  # fresh moments

        history, best, since_best = [], None, 0
        best_step = stopped_at = 0
        for step in range(1, params["iterations"] + 1):
            x = image()
            expected = project(x, system_matrix) + scatter
            loss = poisson_nll(keep * expected, y_train)
            fields = {"stage": "train", "step": step, "loss": float(loss)}
            checking = validating and (step % params["validation_interval"] == 0 or step == params["iterations"])
            if checking:
                with torch.no_grad():
                    validation = float(poisson_nll(fraction * expected, y_val))
                history.append([step, validation])
                fields["validation"] = validation
                if best is None or validation < best["validation"]:
                    best = {"validation": validation, "step": step, "image": x.detach().clone()}
                    since_best = 0
                else:
                    since_best += 1
                if events.wants_iterates:
                    events.iterate(step, x.detach().cpu().numpy().copy())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            stopped_at = step
            message = f"step {step}/{params['iterations']}, loss {float(loss):.6g}"
            if checking:
                message += f", validation {validation:.6g}"
            events.progress((params["pretrain_steps"] + step) / total, message, **fields)
            if checking and params["patience"] and since_best >= params["patience"]:
                break

        if best is None:  # no hold-out: the image after the last step
            with torch.no_grad():
                final = image().detach()
            best_step = stopped_at
        else:
            final, best_step = best["image"], best["step"]
        stopped_early = stopped_at < params["iterations"]
        events.progress(1.0, f"stopped at step {stopped_at}" + (" (validation stopped improving)" if stopped_early else "")
                        + f"; image from step {best_step}", stage="done", step=stopped_at)
    info = {
        "best_step": best_step, "stopped_at": stopped_at, "stopped_early": stopped_early,
        "validation_nll": history, "validation_fraction": fraction, "pretrain_steps": params["pretrain_steps"],
        "network": f"MONAI BasicUNet {list(_network_features(params['features']))}",
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "input": input_name, "seed": params["seed"],
    }
    image_array = final.cpu().numpy()
    if not math.isfinite(float(image_array.sum())):
        raise SSPECTError("The deep image prior diverged (non-finite image); lower the learning rate.")
    return Result(image_array, info)


def _short_osem(problem, counts, scatter):
    """Two OSEM iterations of ``counts`` (PyTomography), the pretraining target."""
    from pytomography.algorithms import OSEM
    from pytomography.likelihoods import PoissonLogLikelihood

    views = counts.shape[0]
    subsets = max(d for d in range(1, min(views, 8) + 1) if views % d == 0)
    likelihood = PoissonLogLikelihood(problem.system_matrix, counts, scatter)
    return OSEM(likelihood)(2, subsets).detach()


register(Method("dip", "Deep image prior (CT input)", "self-supervised", PARAMS, run_dip))
