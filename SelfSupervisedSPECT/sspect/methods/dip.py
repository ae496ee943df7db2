"""Deep image prior with the CT as the network input (Gong et al., IEEE TMI 38(7) 2019, direct form).

The image is the output of a 3D U-Net whose input is the attenuation map,
``x = c * softplus(f_theta(mu))``, and theta minimises the Poisson NLL of the projections through
the system model, ``ybar = A x + s``; no ground truth is used. Run long enough, a deep image prior
fits the noise (Hashimoto et al., PMB 2025), so it is stopped on held-out counts: the network is
trained on ``y_train ~ Binomial(y, 1 - p)`` with the system and scatter scaled by ``1 - p`` (so
``x`` stays the image of the *full* acquisition, in OSEM's counts per voxel) and the image with the
lowest NLL of ``y_val = y - y_train`` is returned.

Pretraining fits the network to a 2-iteration OSEM image of the training counts, which puts it
near the right image before the likelihood takes over; the same image sets the scale ``c`` (its
99.9th percentile), so the network's outputs are of order one. Measurements: ``docs/methods/dip.md``.
"""
from __future__ import annotations

from . import Events, Method, Result, register
from .toolkit import parameters
from .toolkit.counts import hold_out
from .toolkit.fitting import reproducible
from .toolkit.inputs import prior_input, short_osem
from .toolkit.networks import Padding, describe, image_scale, unet
from .toolkit.objectives import fit_likelihood, fit_to_image

PARAMS = parameters.stopped_training(300, 0.003, 5, 10, "Maximum number of optimiser steps on the likelihood") + (
    parameters.pretrain_steps(200),
    parameters.features(16),
    parameters.UPSAMPLING,
    parameters.SEED,
    parameters.ENSEMBLE,
)


def run_dip(problem, params, events: Events) -> Result:
    import torch.nn.functional as F

    steps, pretrain = params["steps"], params["pretrain_steps"]
    with reproducible(problem.device, params["seed"]):
        counts = hold_out(problem, params["validation_fraction"], params["seed"], events)
        prior, input_name = prior_input(problem, events)
        padding = Padding(prior.shape)
        network_input = padding.pad(prior[None, None])
        start = short_osem(problem.system_matrix, counts.train, counts.keep * counts.scatter) / counts.keep
        scale = image_scale(start)
        network = unet(params["features"], head="positive", start_value=float(start.mean()) / scale,
                       upsampling=params["upsampling"]).to(problem.device)

        def image():
            return scale * F.softplus(padding.crop(network(network_input))[0, 0])

        total = pretrain + steps
        fit_to_image(image, network.parameters(), start, scale, events, steps=pretrain, progress=(0.0, pretrain / total))
        fit = fit_likelihood(image, network.parameters(), problem.system_matrix, counts, events, steps=steps,
                             learning_rate=params["learning_rate"], validation_interval=params["validation_interval"],
                             patience=params["patience"], progress=(pretrain / total, steps / total),
                             name="The deep image prior")
        events.progress(1.0, fit.summary(), stage="done", step=fit.stopped_at)
        image_array = fit.kept.cpu().numpy()
    info = {**fit.info(), "validation_fraction": counts.fraction, "pretrain_steps": pretrain,
            **describe(network, params["features"]), "input": input_name, "seed": params["seed"]}
    return Result(image_array, info)


register(Method("dip", "Deep image prior (CT input)", "self-supervised", PARAMS, run_dip))
