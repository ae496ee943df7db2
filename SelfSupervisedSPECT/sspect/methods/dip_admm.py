"""Deep image prior, ADMM form (Gong et al., IEEE TMI 38(7) 2019), on PyTomography's ``DIPRecon``.

The image is constrained to the output of a 3D U-Net whose input is the attenuation map,
``x = f_theta(z)``, and the constrained maximum-likelihood problem is split by ADMM with the
augmented Lagrangian ``-L(y | x) + rho/2 ||x - f_theta(z) + mu||^2`` (Gong's Algorithm 1):

- image update (SubIt1 OSEM iterations): ``x_EM = x / S_k * A_k^T (y_k / (A_k x + s_k))``, then the
  per-voxel minimiser of ``S (x - x_EM log x) + rho/2 (x - v)^2`` with ``v = f - mu``, ``S = A^T 1``:
  ``x = (v - S/rho)/2 + sqrt((v - S/rho)^2 + 4 x_EM S/rho)/2``;
- network update (SubIt2): ``theta = argmin ||f_theta(z) - (x + mu)||^2`` (``fit_steps`` Adam steps,
  :class:`PriorNetwork`, the ``prior_network`` object DIPRecon expects: ``fit(target)``, ``predict()``);
  ``best_step`` and ``stopped_at`` count these steps (outer iteration k ends at step k x ``fit_steps``);
- dual update: ``mu <- mu + x - f_theta(z)``. The image returned is the network output.

PyTomography's ``DIPRecon`` runs the loop; this module supplies the network (the small MONAI
U-Net of the toolkit, pretrained on a 2-iteration OSEM image like ``dip``), the scale
of ``rho``, early stopping and progress. A ``Cancelled`` raised in our ``fit`` or in the
outer-iteration callback passes through DIPRecon (it catches nothing). DIPRecon keeps ``x`` and
``mu`` as local variables, so it cannot be resumed: early stopping raises a private exception from
the callback and keeps the best network output seen.

Early stopping, as in ``dip``: binomial thinning holds out ``y_val ~ Binomial(y, p)``. DIPRecon
sees only ``y_train`` with the scatter ``(1 - p) s``, whose mean is ``A x' + (1 - p) s`` with
``x' = (1 - p) x``: its images are on the training scale and are divided by ``1 - p`` (the total
then matches OSEM of all counts for any ``p``: a test). After every outer iteration the validation
NLL ``sum(mu - y + y log(y/mu))`` of ``y_val`` under ``p (A x + s)`` is computed (one forward
projection); the best image is kept and the run stops ``patience`` outer iterations after it.

``rho`` is dimensionless here. The likelihood's curvature at a voxel is about ``S_j / x_j``, so an
absolute penalty is meaningful only against the image's scale (counts per voxel, which change with
the acquisition time) and the sensitivity (views, attenuation). The absolute penalty handed to
DIPRecon is ``rho * mean(S) / mean(x0)`` (``x0``: the 2-iteration OSEM of the training counts),
``info["rho_absolute"]``; ``rho = 1`` weighs the penalty like the likelihood at the mean voxel.
Measurements behind the defaults: ``docs/methods/dip-admm.md``.

PyTomography trap (worked around, a test shows it): without subsets its likelihood recomputes
``A^T 1`` (a full back projection) on every image update; :func:`sensitivity_caching_likelihood`
reuses the one computed once.

Reproducibility: the seed fixes the count split and the network's initial weights; the caller's
random state is left as it was; on the CPU the same seed gives the same image bit for bit.
"""
from __future__ import annotations

import math

from . import Events, Method, Param, Result, register
from .toolkit import parameters
from .toolkit.counts import check_subsets, hold_out
from .toolkit.fitting import EarlyStopping, Step, fit, reproducible
from .toolkit.inputs import prior_input, short_osem
from .toolkit.losses import held_out_nll, mean_squared_error
from .toolkit.networks import Padding, describe, image_scale, unet

PARAMS = (
    Param("iterations", int, 100, "Maximum number of ADMM (outer) iterations", 1, 10000),
    Param("osem_iterations", int, 1, "OSEM iterations of the image update per outer iteration (SubIt1)", 1, 100),
    Param("subsets", int, 1, "Ordered subsets of the image update (views per subset = views / subsets)", 1, 64),
    Param("rho", float, 0.003,
          "ADMM penalty relative to the likelihood's curvature at the mean voxel (larger: the network weighs more)",
          1e-6, 1e6),
    Param("fit_steps", int, 20, "Adam steps fitting the network to x + mu per outer iteration (SubIt2)", 1, 10000),
    parameters.learning_rate(0.01),
    parameters.pretrain_steps(100),
    parameters.VALIDATION_FRACTION,
    parameters.patience(10, "Outer iterations"),
    parameters.features(16),
    parameters.UPSAMPLING,
    parameters.SEED,
    parameters.ENSEMBLE,
)


def sensitivity_caching_likelihood(system_matrix, counts, additive_term, sensitivity):
    """PyTomography's Poisson likelihood that reuses ``sensitivity`` (``A^T 1``) instead of recomputing it.

    Without subsets, ``Likelihood._set_n_subsets(1)`` back-projects a ones sinogram on every call,
    and DIPRecon calls it for every image update: one extra back projection per outer iteration.
    """
    from pytomography.likelihoods import PoissonLogLikelihood

    class SensitivityCachingLikelihood(PoissonLogLikelihood):
        def _set_n_subsets(self, n_subsets: int) -> None:
            if n_subsets < 2:
                self.n_subsets, self.norm_BP, self.n_subsets_previous = n_subsets, sensitivity, n_subsets
            else:
                super()._set_n_subsets(n_subsets)

    return SensitivityCachingLikelihood(system_matrix, counts, additive_term)


class _Stop(Exception):
    """Raised by the outer-iteration callback when the validation likelihood stopped improving."""


class PriorNetwork:
    """The ``prior_network`` DIPRecon expects: ``predict()`` gives ``f_theta(z)``, ``fit(target)`` trains it.

    ``f_theta(z) = c * softplus(UNet(z))`` on the training-count scale; ``fit`` takes ``steps``
    Adam steps (one optimiser for the whole run) on ``mean((f - target)^2) / c^2``, with progress
    over ``progress(step) = (start, share)`` of the run.
    """

    def __init__(self, network, network_input, padding: Padding, scale: float, learning_rate: float, events: Events):
        import torch

        self.network, self.network_input, self.padding, self.scale = network, network_input, padding, scale
        self.optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
        self.events = events
        # set by the caller before each fit: steps, share of the run's progress, stage and words of its events
        self.steps, self.progress, self.stage, self.label = 0, (0.0, 1.0), "fit", "network fit: step"
        self.last_loss = math.nan

    def image(self):
        import torch.nn.functional as F

        return self.scale * F.softplus(self.padding.crop(self.network(self.network_input))[0, 0])

    def predict(self):
        import torch

        with torch.no_grad():
            return self.image()

    def fit(self, target, steps: int | None = None):
        import torch

        target = target.detach() / self.scale

        def objective(step):
            loss = mean_squared_error(self.image() / self.scale, target)
            self.last_loss = loss.detach().item()
            return Step(loss, fields={"stage": self.stage}, label=self.label)

        with torch.enable_grad():
            fit(None, objective, steps=steps or self.steps, events=self.events, optimiser=self.optimiser,
                progress=self.progress, name="The network fit of the ADMM deep image prior")


def run_dip_admm(problem, params, events: Events) -> Result:
    from pytomography.algorithms import DIPRecon
    from pytomography.callbacks import Callback

    check_subsets(problem, params["subsets"])
    device, system_matrix = problem.device, problem.system_matrix
    n_outer, fit_steps, pretrain = params["iterations"], params["fit_steps"], params["pretrain_steps"]
    total = pretrain + n_outer * fit_steps
    with reproducible(device, params["seed"]):
        counts = hold_out(problem, params["validation_fraction"], params["seed"], events)
        keep, fraction = counts.keep, counts.fraction
        prior, input_name = prior_input(problem, events)
        padding = Padding(prior.shape)

        # DIPRecon works on the training counts: y_train ~ Poisson((1 - p)(A x + s)) = Poisson(A x' + (1 - p) s)
        # with x' = (1 - p) x, so its images are (1 - p) times the full-count image, divided back at the end.
        sensitivity = system_matrix.compute_normalization_factor()
        likelihood = sensitivity_caching_likelihood(system_matrix, counts.train, keep * counts.scatter, sensitivity)
        start = short_osem(system_matrix, counts.train, keep * counts.scatter)
        scale = image_scale(start)
        rho = params["rho"] * float(sensitivity.mean()) / max(float(start.mean()), 1e-12)

        network = unet(params["features"], head="positive", start_value=float(start.mean()) / scale,
                       upsampling=params["upsampling"]).to(device)
        prior_network = PriorNetwork(network, padding.pad(prior[None, None]), padding, scale, params["learning_rate"], events)
        prior_network.progress, prior_network.stage, prior_network.label = (0.0, pretrain / total), "pretrain", "pretraining on OSEM: step"
        if pretrain:
            prior_network.fit(start, pretrain)
        prior_network.steps, prior_network.stage = fit_steps, "fit"
        stopping = EarlyStopping(params["patience"])
        done = {"outer": 0}

        class OuterIteration(Callback):
            """After each outer iteration: validation NLL, iterate, progress, early stop; then set up the next fit."""

            def run(self, object, n_iter, n_subset):
                done["outer"] = iteration = n_iter + 1
                step = iteration * fit_steps
                image = object.detach() / keep  # full-count scale
                validation = None
                if counts.validation is not None:
                    validation = held_out_nll(system_matrix.forward(image) + counts.scatter, counts.validation, fraction)
                stopping.update(step, validation, image.clone())
                message = f"iteration {iteration}/{n_outer}, network fit mse {prior_network.last_loss:.4g}"
                fields = {"stage": "admm", "iteration": iteration, "step": step, "loss": prior_network.last_loss}
                if validation is not None:
                    message, fields["validation"] = message + f", validation {validation:.6g}", validation
                if events.wants_iterates:
                    events.iterate(step, image.cpu().numpy().copy())
                events.progress((pretrain + step) / total, message, **fields)
                if stopping.should_stop:
                    raise _Stop()
                prior_network.progress = ((pretrain + step) / total, fit_steps / total)
                prior_network.label = f"iteration {iteration + 1}/{n_outer}, network fit: step"
                return object

        prior_network.progress, prior_network.label = (pretrain / total, fit_steps / total), f"iteration 1/{n_outer}, network fit: step"
        try:
            DIPRecon(likelihood, prior_network, rho)(n_outer, params["osem_iterations"], params["subsets"],
                                                     callback=OuterIteration())
        except _Stop:
            pass
        stopped_at = done["outer"] * fit_steps
        stopped_early = done["outer"] < n_outer
        summary = (f"stopped at iteration {done['outer']}" + (" (validation stopped improving)" if stopped_early else "")
                   + f"; image from iteration {stopping.best_step // fit_steps}")
        events.progress(1.0, summary, stage="done", step=stopped_at)
        image_array = stopping.kept.cpu().numpy()
    info = {"best_step": stopping.best_step, "stopped_at": stopped_at, "stopped_early": stopped_early,
            "validation_nll": stopping.history, "iterations_done": done["outer"], "validation_fraction": fraction,
            "rho_absolute": rho, "pretrain_steps": pretrain, **describe(network, params["features"]),
            "input": input_name, "seed": params["seed"]}
    return Result(image_array, info)


register(Method("dip-admm", "Deep image prior, ADMM form (CT input)", "self-supervised", PARAMS, run_dip_admm))
