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
``f(x_full h) / h``, feeds it a noise level it never saw and measured worse (``docs/methods/splitting.md``).
``domain="projection"``: the denoiser works on the projections as a volume [Ltheta, Lr, Lz]
(y1 -> y2, y2 -> y1, MSE), ``(f(y1) + f(y2)) / keep`` estimates ``A x + s``, and OSEM (with ``s``)
of those denoised projections is the image.

``noise2inverse``: Hendriksen et al., IEEE TCI 6 2020. The views split into K interleaved
subsets ``J_k = {j : j mod K = k}``; OSEM of each subset ``R(y_Jk)`` and of its complement
``R(y without J_k)`` (a system matrix on those views, :func:`sspect.physics.views.view_system`);
one denoiser trained on ``sum_k ||f(R(y without J_k)) - R(y_Jk)||^2``; the image is
``mean_k f(R(y without J_k))``. A reconstruction from some of the views is already on the
full-count scale (counts per view are unchanged): measured, the subset and complement OSEM
totals are within 1 % of OSEM of all views.

Common design. The denoiser is the toolkit's U-Net with the residual head, so it starts as the identity. Inputs are divided by their 99.9th percentile. Every step mirrors the
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

Measurements behind the defaults (image domain, K = 2, 20 OSEM iterations): ``docs/methods/splitting.md``.

Reproducibility: the seed fixes the held-out split, the halves (another random stream), the
network's initial weights and the mirrors; the caller's random state is left as it was.
"""
from __future__ import annotations

import numpy as np

from ..errors import SSPECTError
from ..physics.views import view_system
from . import Events, Method, Param, Result, register
from .toolkit import parameters
from .toolkit.counts import SECOND_SPLIT_SEED_OFFSET, check_subsets, hold_out, split_counts
from .toolkit.fitting import Check, EarlyStopping, Step, fit, reproducible
from .toolkit.inputs import osem
from .toolkit.losses import held_out_nll, mirrored_pair_loss
from .toolkit.networks import Padding, describe, image_scale, unet

RECONSTRUCTION_SHARE = 0.3  # progress fraction given to the reconstructions before training
APPLY_SHARE = 0.05  # and to the reconstructions after it


class Reconstructions:
    """Runs a known number of OSEM reconstructions, reporting progress over ``[start, start + share]``."""

    def __init__(self, events: Events, params, count: int, start: float, share: float, stage: str):
        self.events, self.params, self.count, self.start, self.share, self.stage = events, params, count, start, share, stage
        self.done = 0

    def __call__(self, system_matrix, counts, scatter, label: str):
        def report(done, total):
            fraction = self.start + self.share * (self.done + done / total) / self.count
            self.events.progress(fraction, f"{label}: OSEM subiteration {done}/{total}", stage=self.stage,
                                 step=self.done * total + done)

        image = osem(system_matrix, counts, scatter, self.params["iterations"], self.params["subsets"], report)
        self.done += 1
        return image


def train_denoiser(network, inputs, targets, padding: Padding, params, events: Events, checkpoint, progress: tuple):
    """The denoiser fitted on ``inputs -> targets`` (mirrored pairs), stopped on held-out counts; returns the fit.

    ``checkpoint(prediction)`` gets the cropped prediction of the inputs and returns a
    :class:`~.toolkit.fitting.Check` whose candidate is what the fit keeps.
    """
    def objective(step):
        loss, prediction = mirrored_pair_loss(network, inputs, targets, padding)
        return Step(loss, lambda: checkpoint(padding.crop(prediction.detach())), fields={"stage": "train"},
                    label="training the denoiser, step")

    return fit(network.parameters(), objective, steps=params["steps"], events=events,
               learning_rate=params["learning_rate"], check_every=params["validation_interval"],
               stopping=EarlyStopping(params["patience"]), progress=progress, name="The denoiser")


# ---------------------------------------------------------------- n2n


N2N_PARAMS = (Param("domain", str, "image", "Where the denoiser works: on OSEM images of the halves or on the projections",
                    choices=("image", "projection")),) + parameters.denoiser_params()


def run_n2n(problem, params, events: Events) -> Result:
    import torch

    from ..physics.differentiable import project

    check_subsets(problem, params["subsets"])
    seed, image_domain = params["seed"], params["domain"] == "image"
    with reproducible(problem.device, seed):
        counts = hold_out(problem, params["validation_fraction"], seed, events)
        keep, fraction, scatter = counts.keep, counts.fraction, counts.scatter
        half = keep / 2  # each half holds this share of the counts
        first, second = split_counts(counts.train, 0.5, seed + SECOND_SPLIT_SEED_OFFSET)
        system = problem.system_matrix
        if image_domain:
            reconstruct = Reconstructions(events, params, 2, 0.0, RECONSTRUCTION_SHARE, "split-osem")
            halves = torch.stack([reconstruct(system, first, half * scatter, "first half"),
                                  reconstruct(system, second, half * scatter, "second half")])
        else:
            halves = torch.stack([first, second])
        padding = Padding(tuple(halves.shape[1:]))
        scale = image_scale(halves)
        inputs = padding.pad((halves / scale)[:, None])
        targets = inputs.flip(0)  # first -> second, second -> first: both directions in every step
        network = unet(params["features"], head="residual", upsampling=params["upsampling"]).to(problem.device)
        apply_reconstruct = Reconstructions(events, params, 3, 1.0 - APPLY_SHARE, APPLY_SHARE, "apply")

        def to_image(prediction):
            """Full-count image (and its two replicates) from the prediction of the two halves."""
            predicted = scale * prediction[:, 0]
            if not image_domain:  # OSEM needs non-negative data
                predicted = predicted.clamp_min(0)
            return predicted.sum(0) / keep, predicted / half

        def checkpoint(prediction):
            image, _ = to_image(prediction)
            validation = None
            if counts.validation is not None:
                expected = project(image, system) + scatter if image_domain else image
                validation = held_out_nll(expected, counts.validation, fraction)
            iterate = None
            if events.wants_iterates:
                shown = image if image_domain else osem(system, image, scatter, params["iterations"], params["subsets"])
                iterate = shown.cpu().numpy().copy()
            return Check(validation, prediction.clone(), iterate)

        before = RECONSTRUCTION_SHARE if image_domain else 0.0
        trained = train_denoiser(network, inputs, targets, padding, params, events, checkpoint,
                                 (before, 1.0 - APPLY_SHARE - before))
        with torch.no_grad():
            image, replicates = to_image(trained.kept)
        if not image_domain:
            projections = image
            image = apply_reconstruct(system, projections, scatter, "denoised projections")
            replicates = torch.stack([apply_reconstruct(system, replicate, scatter, f"denoised half {k + 1}")
                                      for k, replicate in enumerate(replicates)])
        # two replicates a, b of the full-count image, independent given the denoiser: the mean's SD is |a - b| / 2
        uncertainty = (replicates[0] - replicates[1]).abs() / 2
        events.progress(1.0, f"done: {trained.summary()}", stage="done", step=trained.stopped_at)
        result_image, result_uncertainty = image.cpu().numpy(), uncertainty.cpu().numpy()
    info = {**trained.info(), "domain": params["domain"], "validation_fraction": fraction, "seed": seed,
            "osem": [params["iterations"], min(params["subsets"], counts.train.shape[0])],
            **describe(network, params["features"], what="MONAI UNet + residual skip,")}
    return Result(result_image, info, result_uncertainty)


# ---------------------------------------------------------------- noise2inverse


N2I_PARAMS = (Param("splits", int, 2, "Number K of interleaved view subsets (view j goes to subset j mod K)", 2, 16),) \
    + parameters.denoiser_params()


def run_noise2inverse(problem, params, events: Events) -> Result:
    import torch

    from ..physics.differentiable import project

    check_subsets(problem, params["subsets"])
    splits, views = params["splits"], problem.projections.shape[0]
    if views < 2 * splits:
        raise SSPECTError(f"{splits} splits of {views} views leave fewer than 2 views a subset; choose at most {views // 2} splits.")
    seed = params["seed"]
    with reproducible(problem.device, seed):
        counts = hold_out(problem, params["validation_fraction"], seed, events)
        keep, kept, scatter = counts.keep, counts.train, counts.scatter
        reconstruct = Reconstructions(events, params, 2 * splits, 0.0, RECONSTRUCTION_SHARE, "split-osem")
        subset_images, complement_images = [], []
        for k in range(splits):
            subset = np.arange(k, views, splits)
            complement = np.setdiff1d(np.arange(views), subset)
            # a reconstruction from some views of the acquisition is on the full scale (counts per view are
            # the same), so only the held-out share (keep) scales these images
            subset_images.append(reconstruct(view_system(problem.system_matrix, subset), kept[subset],
                                             keep * scatter[subset], f"views {k}::{splits}"))
            complement_images.append(reconstruct(view_system(problem.system_matrix, complement), kept[complement],
                                                 keep * scatter[complement], f"views without {k}::{splits}"))
        complements, subsets = torch.stack(complement_images), torch.stack(subset_images)
        padding = Padding(tuple(complements.shape[1:]))
        scale = image_scale(complements)
        inputs, targets = padding.pad((complements / scale)[:, None]), padding.pad((subsets / scale)[:, None])
        network = unet(params["features"], head="residual", upsampling=params["upsampling"]).to(problem.device)

        def to_image(prediction):
            predicted = scale * prediction[:, 0] / keep  # K full-scale predictions f(R(y without J_k))
            return predicted.mean(0), predicted

        def checkpoint(prediction):
            image, _ = to_image(prediction)
            validation = None
            if counts.validation is not None:
                validation = held_out_nll(project(image, problem.system_matrix) + scatter, counts.validation, counts.fraction)
            return Check(validation, prediction.clone(), image.cpu().numpy().copy() if events.wants_iterates else None)

        trained = train_denoiser(network, inputs, targets, padding, params, events, checkpoint,
                                 (RECONSTRUCTION_SHARE, 1.0 - RECONSTRUCTION_SHARE))
        with torch.no_grad():
            image, predictions = to_image(trained.kept)
        # predictions P_k = mean over the other subsets' noise u_m: Var(mean_k P_k) = s^2 (K - 1)^2 / K
        uncertainty = predictions.std(0) * (splits - 1) / splits**0.5
        events.progress(1.0, f"done: {trained.summary()}", stage="done", step=trained.stopped_at)
        result_image, result_uncertainty = image.cpu().numpy(), uncertainty.cpu().numpy()
    info = {**trained.info(), "splits": splits, "validation_fraction": counts.fraction, "seed": seed,
            "osem": [params["iterations"], params["subsets"]],
            **describe(network, params["features"], what="MONAI UNet + residual skip,")}
    return Result(result_image, info, result_uncertainty)


register(Method("n2n", "Count-splitting Noise2Noise", "self-supervised", N2N_PARAMS, run_n2n))
register(Method("noise2inverse", "Noise2Inverse (view splitting)", "self-supervised", N2I_PARAMS, run_noise2inverse))
