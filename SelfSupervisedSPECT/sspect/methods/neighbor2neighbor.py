"""Neighbor2Neighbor on the projections (Huang et al., CVPR 2021), then OSEM of the denoised projections.

Two sub-sinograms are drawn from one noisy acquisition: every 2 x 2 cell of detector pixels (in
each view) gives one pixel to ``g1(y)`` and another, chosen at random, to ``g2(y)``. Poisson noise
is independent from pixel to pixel, so the two have independent noise and nearly the same signal
(neighbours 4.4 mm apart under a collimator blur of 10 mm and more), and a denoiser trained on
``g1(y) -> g2(y)`` learns the mean without ever seeing a clean projection. The regulariser of the
paper corrects for the small signal difference between neighbours:

``L = ||f(g1(y)) - g2(y)||^2 + gamma ||f(g1(y)) - g2(y) - (g1(f(y)) - g2(f(y)))||^2``, with ``f(y)``
taken without gradient. The projections are where the premise holds: in an OSEM image the noise of
neighbouring voxels is correlated, in the measured counts it is not.

The denoised projections ``f(y) / keep`` estimate ``A x + s`` of the full acquisition; the image is
OSEM of them with the scatter estimate. Stopped on held-out counts like every learned method (the
Poisson NLL of the held-out share under ``fraction * f(y) / keep``: no projection needed).
"""
from __future__ import annotations

from . import Events, Method, Param, Result, register
from .toolkit import parameters
from .toolkit.counts import check_subsets, hold_out
from .toolkit.fitting import Check, EarlyStopping, Step, fit, reproducible
from .toolkit.inputs import osem
from .toolkit.losses import held_out_nll, mean_squared_error
from .toolkit.networks import Padding, describe, image_scale, unet

PARAMS = parameters.denoiser_params() + (
    Param("gamma", float, 2.0, "Weight of the regulariser for the signal difference between neighbouring pixels", 0.0, 100.0),
)
TRAINING_SHARE = 0.9  # of the progress; the OSEM of the denoised projections takes the rest


def neighbour_cells(shape, device):
    """Two different pixel positions (0-3) in every 2 x 2 cell of the last two dimensions of ``shape`` [N, C, T, R, Z]."""
    import torch

    t, r, z = shape[-3:]
    first = torch.randint(0, 4, (t, r // 2, z // 2), device=device)
    return first, (first + torch.randint(1, 4, first.shape, device=device)) % 4  # never the same pixel


def subsample(volume, position):
    """[N, C, T, R, Z] -> [N, C, T, R // 2, Z // 2]: from every 2 x 2 cell the pixel at ``position``."""
    import torch

    n, c, t, r, z = volume.shape
    cells = volume[..., : r - r % 2, : z - z % 2].reshape(n, c, t, r // 2, 2, z // 2, 2)
    cells = cells.permute(0, 1, 2, 3, 5, 4, 6).reshape(n, c, t, r // 2, z // 2, 4)
    return torch.gather(cells, -1, position.expand(n, c, -1, -1, -1)[..., None])[..., 0]


def run_neighbor2neighbor(problem, params, events: Events) -> Result:
    import torch

    check_subsets(problem, params["subsets"])
    with reproducible(problem.device, params["seed"]):
        counts = hold_out(problem, params["validation_fraction"], params["seed"], events)
        scale = image_scale(counts.train)
        noisy = (counts.train / scale)[None, None]
        full = Padding(noisy.shape[2:])
        views, rows, columns = noisy.shape[2:]
        halves = Padding((views, rows // 2, columns // 2))
        network = unet(params["features"], head="residual", upsampling=params["upsampling"]).to(problem.device)

        def denoise(volume, padding):
            return padding.crop(network(padding.pad(volume)))

        def estimate(denoised):
            """The full acquisition's expected counts ``A x + s`` (non-negative: OSEM's data)."""
            return (scale * denoised[0, 0] / counts.keep).clamp_min(0)

        def objective(step):
            first, second = neighbour_cells(noisy.shape, noisy.device)
            target = subsample(noisy, second)
            prediction = denoise(subsample(noisy, first), halves)
            with torch.no_grad():
                denoised = denoise(noisy, full)
            difference = subsample(denoised, first) - subsample(denoised, second)
            loss = mean_squared_error(prediction, target) + params["gamma"] * mean_squared_error(prediction - target, difference)

            def checkpoint():
                expected = estimate(denoised)
                validation = None if counts.validation is None else held_out_nll(expected, counts.validation, counts.fraction)
                iterate = None
                if events.wants_iterates:
                    iterate = osem(problem.system_matrix, expected, counts.scatter, params["iterations"],
                                   params["subsets"]).cpu().numpy().copy()
                return Check(validation, expected.clone(), iterate)

            return Step(loss, checkpoint, fields={"stage": "train"}, label="training the denoiser, step")

        trained = fit(network.parameters(), objective, steps=params["steps"], events=events,
                      learning_rate=params["learning_rate"], check_every=params["validation_interval"],
                      stopping=EarlyStopping(params["patience"]), progress=(0.0, TRAINING_SHARE), name="The denoiser")

        def report(done, total):
            events.progress(TRAINING_SHARE + (1 - TRAINING_SHARE) * done / total,
                            f"denoised projections: OSEM subiteration {done}/{total}", stage="apply", step=done)

        image = osem(problem.system_matrix, trained.kept, counts.scatter, params["iterations"], params["subsets"], report)
        events.progress(1.0, f"done: {trained.summary()}", stage="done", step=trained.stopped_at)
        result_image = image.cpu().numpy()
    info = {**trained.info(), "validation_fraction": counts.fraction, "seed": params["seed"],
            "osem": [params["iterations"], min(params["subsets"], counts.train.shape[0])],
            **describe(network, params["features"], what="MONAI UNet + residual skip,")}
    return Result(result_image, info)


register(Method("neighbor2neighbor", "Neighbor2Neighbor (projection-domain denoiser)", "self-supervised", PARAMS,
                run_neighbor2neighbor))
