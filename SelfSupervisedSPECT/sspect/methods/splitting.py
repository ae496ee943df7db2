"""Self-supervised denoising by splitting the data: count-splitting Noise2Noise and Noise2Inverse.

Both methods make two (or K) *independent* noisy versions of the same image from one
acquisition and train a per-scan 3D denoiser to map one onto the other; because the noises are
independent and zero-mean, minimising ``E ||f(a) - b||^2`` gives ``f(a) = E[b | a]``, the mean
(Lehtinen et al., ICML 2018). No ground truth is used.

``n2n``: count-splitting Noise2Noise (Leube et al., Nuklearmedizin 2023, 177Lu). Binomial
thinning ``y1 ~ Binomial(y, 1/2)``, ``y2 = y - y1`` gives two independent Poisson halves with means
``(A x + s) / 2`` (scatter ``s / 2`` each). ``domain="image"``: OSEM of each half (x1, x2), a
denoiser trained on x1 -> x2 and x2 -> x1 (both directions every step, MSE), and the image
``(f(x1) + f(x2)) / keep`` (``keep`` = the share of counts not held out, below): each prediction
is the mean of the *other* half, i.e. half the full image, and both inputs are exactly the
distribution the denoiser saw. Applying it instead to the full-count OSEM at the half scale,
``f(x_full h) / h``, feeds it a noise level it never saw and measured worse (below).
``domain="projection"``: the denoiser works on the projections as a volume [Ltheta, Lr, Lz]
(y1 -> y2, y2 -> y1, MSE), ``(f(y1) + f(y2)) / keep`` estimates ``A x + s``, and OSEM (with ``s``)
of those denoised projections is the image.

``noise2inverse``: Hendriksen et al., IEEE TCI 6 2020. The views split into K interleaved
subsets ``J_k = {j : j mod K = k}``; OSEM of each subset ``R(y_Jk)`` and of its complement
``R(y without J_k)`` (a system matrix on those views' angles and radii, :func:`_view_system`);
one denoiser trained on ``sum_k ||f(R(y without J_k)) - R(y_Jk)||^2``; the image is
``mean_k f(R(y without J_k))``. A reconstruction from some of the views is already on the
full-count scale (counts per view are unchanged): measured, the subset and complement OSEM
totals are within 1 % of OSEM of all views.

Common design. The denoiser is the deep image prior's small MONAI ``UNet`` (channels f..8f,
strides 2, instance norm) with a residual skip, ``f(x) = x + g(x)``, g's output layer zero, so it
starts as the identity. Inputs are divided by their 99.9th percentile. Every step mirrors the
pair along a random set of axes: one 32^3 pair is little data, and without the mirroring the
network memorises the other half's noise (the N2N loss fell to 15 % of its start, below the
50 % an ideal denoiser reaches; 43 % with it). Held-out early stopping as ``dip``: binomial
thinning first holds out ``validation_fraction`` of the counts ``y_v``; every
``validation_interval`` steps the current full-count estimate is scored by the Poisson NLL of
``y_v`` under ``p (A x_hat + s)`` (projection domain: ``p`` times the denoised projections,
no projection needed); the best is kept, and training stops after ``patience`` checks without
improvement (``info``: ``best_step``, ``stopped_at``, ``stopped_early``, ``validation_nll``).

Uncertainty (voxel SD of the returned image). n2n: the two predictions, as full-count images
``a = f(x1) / h``, ``b = f(x2) / h`` (h = keep / 2), are independent given the denoiser (x1, x2
are); the image is their mean, so ``SD = |a - b| / 2`` (E[(a - b)^2] / 4 = Var(a) / 2 = Var of the
mean). Projection domain: a, b are OSEM of each denoised half at the full scale. noise2inverse:
assuming the denoiser acts linearly on the noise and the K subsets contribute independent noise
``u_k`` of equal variance ``v``, ``P_k = mean_{m != k} u_m`` has sample SD s with
``E[s^2] = v / (K - 1)^2`` while ``Var(mean_k P_k) = v / K``, so ``SD = s (K - 1) / sqrt(K)``
(for K = 2: ``|P_1 - P_2| / 2``). Both are estimates from one or K - 1 degrees of freedom per voxel:
average them over a region before use.

Scale and total. The returned image is on OSEM's full-count scale. The image-domain outputs are
not clamped at zero: the denoiser returns small negative values in the cold background, and
clamping them raised the total by 3-6 % (measured); the projection domain clamps its denoised
projections (OSEM needs non-negative data) and its image is OSEM's, so non-negative.

Measured on the 32^3, 24-view simulated study (tests' ``problem``; 2 busy cores, one thread;
NRMSE against the truth; OSEM 10x4 0.325, the best OSEM 0.321; a noiseless OSEM 10x4 0.252, 40x4
0.130; a Gaussian of 0.5 voxel on OSEM 10x4 0.39 - this phantom punishes any blur):

| method (300-800 steps, lr 3e-4 unless said) | NRMSE along training | s a run |
| --- | --- | --- |
| n2n image, 20-iteration halves, (f(x1)+f(x2))/keep | 0.322-0.335 | ~40 |
| n2n image, 10-iteration halves, lr 3e-3 | 0.325-0.339 | ~15 |
| n2n image, f(x_full h)/h instead | 0.336-0.357 | ~50 |
| n2n projection | 0.366-0.406 | ~80 |
| noise2inverse K=2, 20 iterations | 0.345-0.366 | ~40 |
| noise2inverse K=4, 10 iterations, lr 3e-3 | 0.41-0.43 | ~20 |
| same U-Net trained on x1 -> noiseless OSEM (Noise2Clean, a ceiling) | 0.29-0.30 | |

With the defaults (20 OSEM iterations, lr 3e-4, at most 300 steps, validation every 25 steps,
patience 4): n2n image 0.337 (best step 75, stopped at 175, 10 s), n2n projection 0.381 (best
150, stopped 250, 10 s), noise2inverse K=2 0.352 (best 25, stopped 125, 10 s); totals within 1 %
of OSEM's for all three.

So on this small study neither method beats OSEM 10x4 by a useful margin: one 32^3 scan is too
little training data for a per-scan denoiser (even with clean targets it reaches only 0.29), and
NRMSE here is dominated by resolution, which a denoiser cannot restore. The image domain beats
the projection domain here, contrary to Leube et al. (who trained on many patients), hence the
default ``domain="image"``; K=2 beats K=4 (the complement of a quarter of the views is too close
to the full data to differ, and each subset has only 6 views), hence ``splits=2``. 20 OSEM
iterations: a sharper (less biased) mean for the denoiser to find. On a 64^3-128^3 bed there
are 8-64 times more voxels to learn from; the defaults are the measured best here and should be
checked on such a study (use a GPU: each step is a U-Net pass over two volumes).

Reproducibility: the seed fixes the held-out split, the halves (another random stream), the
network's initial weights and the mirrors; the caller's random state is left as it was.
"""
from __future__ import annotations

import copy

import numpy as np

from ..errors import SSPECTError
from . import Events, Method, Param, Result, register
from .self_supervised import STRIDES, _network_features, _padding, _reproducible, poisson_nll, split_counts

HALF_SPLIT_SEED_OFFSET = 2**32  # the halves are drawn from another random stream than the held-out counts
RECONSTRUCTION_SHARE = 0.3  # progress fraction given to the reconstructions before training
APPLY_SHARE = 0.05  # and to the reconstructions after it


def _common_params(steps: int, interval: int, patience: int) -> tuple[Param, ...]:
    return (
        Param("iterations", int, 20, "OSEM iterations of every reconstruction the method makes", 1, 200),
        Param("subsets", int, 4, "OSEM subsets of every reconstruction (capped at the views it has)", 1, 64),
        Param("steps", int, steps, "Maximum number of optimiser steps of the denoiser", 1, 100000),
        Param("learning_rate", float, 0.0003, "Adam learning rate of the denoiser", 1e-6, 1.0),
        Param("features", int, 8, "Channels of the denoiser U-Net's first level (doubling at each of its four levels)", 2, 64),
        Param("validation_fraction", float, 0.1,
              "Share of the counts held out by binomial thinning to choose when to stop (0: no hold-out, run all steps)",
              0.0, 0.5),
        Param("validation_interval", int, interval, "Optimiser steps between validation checks (and iterates)", 1, 10000),
        Param("patience", int, patience, "Validation checks without improvement before stopping (0: never stop early)",
              0, 100000),
        Param("seed", int, 0, "Seed of the count splits and of the denoiser's weights (same seed, same image on the same CPU)",
              0, 2**31 - 1),
    )


# ---------------------------------------------------------------- building blocks


def _view_system(problem, views):
    """A system matrix of the same object and physics that sees only ``views``.

    Noise2Inverse reconstructs subsets of the views on their own. The system's own subsets
    (``set_n_subsets``) serve OSEM's ordered subsets of *one* reconstruction and cannot describe
    the complement of a subset. The fast operator restricts its tables to those views; for
    PyTomography's ``SPECTSystemMatrix`` a new one is built on those views' angles and radii
    (SPECTProjMeta), with copies of the problem's transforms: building a system matrix configures
    its transforms for its projection geometry, and a copy keeps the problem's own system untouched
    (the attenuation map tensor is shared, read only; the PSF layers are rebuilt).
    """
    from pytomography.metadata.SPECT import SPECTProjMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix

    from ..physics.operator import SPECTOperator

    system = problem.system_matrix
    if isinstance(system, SPECTOperator):
        return system.select_views(views)
    if type(system) is not SPECTSystemMatrix:
        raise SSPECTError(f"Noise2Inverse needs a SPECT system matrix that can select views, not {type(system).__name__}; "
                          "use n2n or a classical method.")
    meta = system.proj_meta
    index = np.asarray(views, dtype=np.int64)
    angles = meta.angles.detach().cpu().numpy()[index]
    radii = None if meta.radii is None else np.asarray(meta.radii)[index]
    view_meta = SPECTProjMeta(meta.shape[1:], meta.dr, angles, radii)
    return SPECTSystemMatrix([copy.copy(t) for t in system.obj2obj_transforms],
                             [copy.copy(t) for t in system.proj2proj_transforms], system.object_meta, view_meta,
                             system.object_initial_based_on_camera_path)


def _osem(system_matrix, counts, scatter, params, report=None):
    """PyTomography OSEM (``iterations`` x ``subsets``, subsets capped at the views); ``report(done, total)`` per subiteration."""
    from pytomography.algorithms import OSEM
    from pytomography.callbacks import Callback
    from pytomography.likelihoods import PoissonLogLikelihood

    iterations, subsets = params["iterations"], min(params["subsets"], counts.shape[0])

    class Report(Callback):
        def __init__(self):
            pass

        def run(self, object, n_iter, n_subset):
            report(n_iter * subsets + n_subset + 1, iterations * subsets)
            return object

    algorithm = OSEM(PoissonLogLikelihood(system_matrix, counts, scatter))
    return algorithm(iterations, subsets, callback=Report() if report else None).detach()


class _Reconstructions:
    """Runs a known number of OSEM reconstructions, reporting progress over ``[start, start + share]``."""

    def __init__(self, events: Events, params, count: int, start: float, share: float, stage: str):
        self.events, self.params, self.count, self.start, self.share, self.stage = events, params, count, start, share, stage
        self.done = 0

    def __call__(self, system_matrix, counts, scatter, label: str):
        def report(done, total):
            fraction = self.start + self.share * (self.done + done / total) / self.count
            self.events.progress(fraction, f"{label}: OSEM subiteration {done}/{total}", stage=self.stage,
                                 step=self.done * total + done)

        image = _osem(system_matrix, counts, scatter, self.params, report)
        self.done += 1
        return image


def _denoiser(features: int):
    """The dip U-Net (MONAI ``UNet``, channels f..8f, strides 2, instance norm) with a residual skip.

    ``f(x) = x + g(x)`` with ``g``'s output layer set to zero, so the denoiser starts as the
    identity and learns the correction; a denoiser's output is close to its input, and the skip
    makes the first steps useful instead of spent learning to copy.
    """
    import torch
    from monai.networks.nets import UNet

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.correction = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=_network_features(features),
                                   strides=STRIDES, num_res_units=0, norm="instance")
            with torch.no_grad():
                self.correction.model[-1].conv.weight.zero_()
                self.correction.model[-1].conv.bias.zero_()

        def forward(self, x):
            return x + self.correction(x)

    return Residual()


class _Grid:
    """Pads volumes [B, X, Y, Z] to the U-Net's multiple of 8 (replicate) as [B, 1, ...] and crops back."""

    def __init__(self, shape):
        import torch.nn.functional as F

        self._pad = F.pad
        self.padding = _padding(shape)
        self.crop = (slice(None), slice(None)) + tuple(
            slice(self.padding[2 * i], self.padding[2 * i] + size) for i, size in enumerate(reversed(shape)))[::-1]

    def pad(self, volumes):
        return self._pad(volumes[:, None], self.padding, mode="replicate")

    def unpad(self, batch):
        return batch[self.crop][:, 0]


def _scale(volumes) -> float:
    """The 99.9th percentile of the volumes: divides them so that the network sees values of order 1."""
    import torch

    sample = volumes.flatten().float()[:: max(1, volumes.numel() // 1_000_000)]  # torch.quantile's size limit
    return max(float(torch.quantile(sample, 0.999)), 1e-12)


def _split_off_validation(counts, fraction: float, seed: int, events: Events):
    """(counts kept, held-out counts or None): binomial thinning, as dip does."""
    import torch

    if not bool(torch.all(counts == torch.round(counts))):
        events.log("The projections are not whole counts; they are rounded for the count split.")
    if fraction == 0:
        return torch.round(counts).clamp_min(0), None
    return split_counts(counts, fraction, seed)


def _train(network, inputs, targets, grid, params, events: Events, checkpoint, start: float, share: float):
    """Adam on ``mean (f(input) - target)^2`` over the unpadded voxels, with held-out early stopping.

    ``checkpoint(prediction)`` gets the unpadded prediction of the inputs (before the step) every
    ``validation_interval`` steps and returns ``(validation NLL or None, image or None)``; the
    prediction with the lowest validation NLL is kept (the last one without a hold-out).
    Returns (kept prediction, info).
    """
    import math

    import torch

    steps, interval, patience = params["steps"], params["validation_interval"], params["patience"]
    optimiser = torch.optim.Adam(network.parameters(), lr=params["learning_rate"])
    history, best, since_best, step = [], None, 0, 0
    for step in range(1, steps + 1):
        flips = [dim for dim in (2, 3, 4) if bool(torch.rand(()) < 0.5)]  # a random mirror of the pair
        prediction = network(inputs.flip(flips)).flip(flips)
        loss = torch.mean((grid.unpad(prediction) - grid.unpad(targets)) ** 2)
        value = loss.detach().item()
        if not math.isfinite(value):
            raise SSPECTError(f"The denoiser diverged at step {step}; lower the learning rate.")
        fields = {"stage": "train", "step": step, "loss": value}
        message = f"training the denoiser, step {step}/{steps}, mse {value:.4g}"
        if step % interval == 0 or step == steps:
            kept = grid.unpad(prediction.detach())
            with torch.no_grad():
                validation, image = checkpoint(kept)
            if image is not None:
                events.iterate(step, image)
            if validation is not None:
                history.append([step, validation])
                fields["validation"] = validation
                message += f", validation {validation:.6g}"
                if best is None or validation < best["validation"]:
                    best, since_best = {"validation": validation, "step": step, "prediction": kept.clone()}, 0
                else:
                    since_best += 1
            else:
                best = {"validation": None, "step": step, "prediction": kept.clone()}
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        events.progress(start + share * step / steps, message, **fields)
        if best is not None and best["validation"] is not None and patience and since_best >= patience:
            break
    info = {"best_step": best["step"], "stopped_at": step, "stopped_early": step < steps, "validation_nll": history}
    return best["prediction"], info


def _held_out_nll(expected_full, held_out, fraction):
    """Poisson NLL of the held-out counts under ``fraction`` x the predicted full-acquisition counts."""
    return float(poisson_nll(fraction * expected_full, held_out))


def _network_info(network, params) -> dict:
    return {"network": f"MONAI UNet + residual skip, channels {list(_network_features(params['features']))}, "
                       f"strides {list(STRIDES)}",
            "network_parameters": sum(p.numel() for p in network.parameters())}


# ---------------------------------------------------------------- n2n


N2N_PARAMS = (Param("domain", str, "image", "Where the denoiser works: on OSEM images of the halves or on the projections",
                    choices=("image", "projection")),) + _common_params(300, 25, 4)


def run_n2n(problem, params, events: Events) -> Result:
    import torch

    from .projector import project

    _check_subsets(problem, params)
    device, seed, fraction = problem.device, params["seed"], params["validation_fraction"]
    keep = 1.0 - fraction
    half = keep / 2  # each half holds this share of the counts
    with _reproducible(device, seed):
        counts = problem.projections.to(device)
        scatter = problem.scatter.to(device) if problem.scatter is not None else torch.zeros_like(counts)
        kept, held_out = _split_off_validation(counts, fraction, seed, events)
        first, second = split_counts(kept, 0.5, seed + HALF_SPLIT_SEED_OFFSET)
        system = problem.system_matrix
        if params["domain"] == "image":
            reconstruct = _Reconstructions(events, params, 2, 0.0, RECONSTRUCTION_SHARE, "split-osem")
            halves = torch.stack([reconstruct(system, first, half * scatter, "first half"),
                                  reconstruct(system, second, half * scatter, "second half")])
        else:
            halves = torch.stack([first, second])
        grid = _Grid(tuple(halves.shape[1:]))
        scale = _scale(halves)
        inputs = grid.pad(halves / scale)
        targets = inputs.flip(0)  # first -> second, second -> first: both directions in every step
        network = _denoiser(params["features"]).to(device)
        apply_reconstruct = _Reconstructions(events, params, 3, 1.0 - APPLY_SHARE, APPLY_SHARE, "apply")

        def to_image(prediction):
            """Full-count image (and its two replicates) from the prediction of the two halves."""
            predicted = scale * prediction
            if params["domain"] == "projection":  # OSEM needs non-negative data
                predicted = predicted.clamp_min(0)
            return predicted.sum(0) / keep, predicted / half

        def checkpoint(prediction):
            image, _ = to_image(prediction)
            validation = None
            if held_out is not None:
                expected = image if params["domain"] == "projection" else project(image, system) + scatter
                validation = _held_out_nll(expected, held_out, fraction)
            iterate = None
            if events.wants_iterates:
                if params["domain"] == "projection":
                    image = _osem(system, image, scatter, params)
                iterate = image.cpu().numpy().copy()
            return validation, iterate

        prediction, info = _train(network, inputs, targets, grid, params, events, checkpoint,
                                  RECONSTRUCTION_SHARE if params["domain"] == "image" else 0.0,
                                  1.0 - APPLY_SHARE - (RECONSTRUCTION_SHARE if params["domain"] == "image" else 0.0))
        with torch.no_grad():
            image, replicates = to_image(prediction)
        if params["domain"] == "projection":
            projections = image
            image = apply_reconstruct(system, projections, scatter, "denoised projections")
            replicates = torch.stack([apply_reconstruct(system, replicate, scatter, f"denoised half {k + 1}")
                                      for k, replicate in enumerate(replicates)])
        # two replicates a, b of the full-count image, independent given the denoiser: the mean's SD is |a - b| / 2
        uncertainty = (replicates[0] - replicates[1]).abs() / 2
        events.progress(1.0, f"done: image from step {info['best_step']}, stopped at step {info['stopped_at']}",
                        stage="done", step=info["stopped_at"])
        result_image = image.cpu().numpy()
        result_uncertainty = uncertainty.cpu().numpy()
    info.update({"domain": params["domain"], "validation_fraction": fraction, "seed": seed,
                 "osem": [params["iterations"], min(params["subsets"], counts.shape[0])]}, **_network_info(network, params))
    return Result(result_image, info, result_uncertainty)


def _check_subsets(problem, params):
    views = problem.projections.shape[0]
    if params["subsets"] > views:
        raise SSPECTError(f"{params['subsets']} subsets is more than the {views} views; choose at most {views} subsets.")


# ---------------------------------------------------------------- noise2inverse


N2I_PARAMS = (Param("splits", int, 2, "Number K of interleaved view subsets (view j goes to subset j mod K)", 2, 16),) \
    + _common_params(300, 25, 4)


def run_noise2inverse(problem, params, events: Events) -> Result:
    import torch

    from .projector import project

    _check_subsets(problem, params)
    splits, views = params["splits"], problem.projections.shape[0]
    if views < 2 * splits:
        raise SSPECTError(f"{splits} splits of {views} views leave fewer than 2 views a subset; choose at most {views // 2} splits.")
    device, seed, fraction = problem.device, params["seed"], params["validation_fraction"]
    keep = 1.0 - fraction
    with _reproducible(device, seed):
        counts = problem.projections.to(device)
        scatter = problem.scatter.to(device) if problem.scatter is not None else torch.zeros_like(counts)
        kept, held_out = _split_off_validation(counts, fraction, seed, events)
        reconstruct = _Reconstructions(events, params, 2 * splits, 0.0, RECONSTRUCTION_SHARE, "split-osem")
        subset_images, complement_images = [], []
        for k in range(splits):
            subset = np.arange(k, views, splits)
            complement = np.setdiff1d(np.arange(views), subset)
            # a reconstruction from some views of the acquisition is on the full scale (counts per view are
            # the same), so only the held-out share (keep) scales these images
            subset_images.append(reconstruct(_view_system(problem, subset), kept[subset], keep * scatter[subset],
                                             f"views {k}::{splits}"))
            complement_images.append(reconstruct(_view_system(problem, complement), kept[complement],
                                                 keep * scatter[complement], f"views without {k}::{splits}"))
        complements, subsets = torch.stack(complement_images), torch.stack(subset_images)
        grid = _Grid(tuple(complements.shape[1:]))
        scale = _scale(complements)
        inputs, targets = grid.pad(complements / scale), grid.pad(subsets / scale)
        network = _denoiser(params["features"]).to(device)

        def to_image(prediction):
            predicted = scale * prediction / keep  # K full-scale predictions f(R(y without J_k))
            return predicted.mean(0), predicted

        def checkpoint(prediction):
            image, _ = to_image(prediction)
            validation = None
            if held_out is not None:
                validation = _held_out_nll(project(image, problem.system_matrix) + scatter, held_out, fraction)
            return validation, image.cpu().numpy().copy() if events.wants_iterates else None

        prediction, info = _train(network, inputs, targets, grid, params, events, checkpoint,
                                  RECONSTRUCTION_SHARE, 1.0 - RECONSTRUCTION_SHARE)
        with torch.no_grad():
            image, predictions = to_image(prediction)
        # predictions P_k = mean over the other subsets' noise u_m: Var(mean_k P_k) = s^2 (K - 1)^2 / K
        uncertainty = predictions.std(0) * (splits - 1) / splits**0.5
        events.progress(1.0, f"done: image from step {info['best_step']}, stopped at step {info['stopped_at']}",
                        stage="done", step=info["stopped_at"])
        result_image, result_uncertainty = image.cpu().numpy(), uncertainty.cpu().numpy()
    info.update({"splits": splits, "validation_fraction": fraction, "seed": seed,
                 "osem": [params["iterations"], params["subsets"]]}, **_network_info(network, params))
    return Result(result_image, info, result_uncertainty)


register(Method("n2n", "Count-splitting Noise2Noise", "self-supervised", N2N_PARAMS, run_n2n))
register(Method("noise2inverse", "Noise2Inverse (view splitting)", "self-supervised", N2I_PARAMS, run_noise2inverse))
