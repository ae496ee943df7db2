"""Deep image prior, ADMM form (Gong et al., IEEE TMI 38(7) 2019), on PyTomography's ``DIPRecon``.

The image is constrained to the output of a 3D U-Net whose input is the attenuation map,
``x = f_theta(z)``, and the constrained maximum-likelihood problem is split by ADMM with the
augmented Lagrangian ``-L(y | x) + rho/2 ||x - f_theta(z) + mu||^2`` (Gong's Algorithm 1):

- image update (SubIt1 OSEM iterations): ``x_EM = x / S_k * A_k^T (y_k / (A_k x + s_k))``, then the
  per-voxel minimiser of ``S (x - x_EM log x) + rho/2 (x - v)^2`` with ``v = f - mu``, ``S = A^T 1``:
  ``x = (v - S/rho)/2 + sqrt((v - S/rho)^2 + 4 x_EM S/rho)/2``;
- network update (SubIt2): ``theta = argmin ||f_theta(z) - (x + mu)||^2`` (``fit_steps`` Adam steps,
  :class:`PriorNetwork`, the ``prior_network`` object DIPRecon expects: ``fit(target)``, ``predict()``);
- dual update: ``mu <- mu + x - f_theta(z)``. The image returned is the network output.

PyTomography's ``DIPRecon`` runs the loop; this module supplies the network (the small MONAI
U-Net of :mod:`.self_supervised`, pretrained on a 2-iteration OSEM image like ``dip``), the scale
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
Measured on the 32^3, 24-view study (NRMSE against the truth at the validation-chosen iteration,
4 subsets unless said; OSEM 10x4 0.324, its best 12x4 0.321): rho 1 0.397, 0.3 0.409 (150
iterations: a large rho moves the network by only a small image-space gradient step per iteration
and it had not converged), 0.1 0.380, 0.03 0.381, 0.01 0.344, 0.003 0.324 (no subsets 0.321),
0.001 0.341 (no subsets 0.318). Subsets hurt: 4 subset updates per outer iteration push ``x`` along
OSEM's noisy path faster than 20-50 fit steps let the network follow, and the fit learns the noise
in ``x + mu``. Defaults: rho 0.003, no subsets, 1 OSEM iteration and 20 Adam steps (lr 0.01) per
outer iteration, up to 100 outer iterations, patience 10.

Measured with the defaults (32^3, 24 views, 2 shared cores, one thread): stops at outer iteration
47, image from 37, 26 s, NRMSE 0.320 against 0.324 for OSEM 10x4 and 0.287 for ``dip`` (direct
form, defaults, ~20-40 s). With a small rho the ADMM form behaves like MLEM whose iterates a
network tracks and smooths: it is about as good as the best-stopped OSEM here and clearly behind
the direct form, whose Adam steps through the network's Jacobian filter the likelihood gradient
before it reaches the image. At 128^3 an outer iteration costs one forward and one back projection
(~47 s on the CPU) plus the fit steps: use a GPU.

PyTomography trap (worked around, a test shows it): without subsets its likelihood recomputes
``A^T 1`` (a full back projection) on every image update; :func:`sensitivity_caching_likelihood`
reuses the one computed once.

Reproducibility: the seed fixes the count split and the network's initial weights; the caller's
random state is left as it was; on the CPU the same seed gives the same image bit for bit.
"""
from __future__ import annotations

import math

from ..errors import SSPECTError
from . import Events, Method, Param, Result, register
from .self_supervised import _network, _network_features, _reproducible, _short_osem, poisson_nll, prior_input, split_counts


PARAMS = (
    Param("iterations", int, 100, "Maximum number of ADMM (outer) iterations", 1, 10000),
    Param("osem_iterations", int, 1, "OSEM iterations of the image update per outer iteration (SubIt1)", 1, 100),
    Param("subsets", int, 1, "Ordered subsets of the image update (views per subset = views / subsets)", 1, 64),
    Param("rho", float, 0.003,
          "ADMM penalty relative to the likelihood's curvature at the mean voxel (larger: the network weighs more)",
          1e-6, 1e6),
    Param("fit_steps", int, 20, "Adam steps fitting the network to x + mu per outer iteration (SubIt2)", 1, 10000),
    Param("learning_rate", float, 0.01, "Adam learning rate of the network fit", 1e-6, 1.0),
    Param("pretrain_steps", int, 100, "Steps fitting the network to a 2-iteration OSEM image first (0: none)", 0, 100000),
    Param("validation_fraction", float, 0.1,
          "Share of the counts held out by binomial thinning to choose when to stop (0: no hold-out, run all iterations)",
          0.0, 0.5),
    Param("patience", int, 10, "Outer iterations without a better validation likelihood before stopping (0: never stop early)",
          0, 10000),
    Param("features", int, 16, "Channels of the U-Net's first level (doubling at each of its four levels)", 2, 64),
    Param("seed", int, 0, "Seed of the network weights and of the count split (same seed, same image on the same CPU)",
          0, 2**31 - 1),
)


def sensitivity_caching_likelihood(system_matrix, counts, additive_term, sensitivity):
    """PyTomography's Poisson likelihood that reuses ``sensitivity`` (``A^T 1``) instead of recomputing it.

    Without subsets, ``Likelihood._set_n_subsets(1)`` back-projects a ones sinogram on every call,
    and DIPRecon calls it for every image update: one extra back projection per outer iteration
    (25 s at 128^3 on the CPU). ``test_dip_admm.py`` shows the trap.
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

    ``f_theta(z) = c * softplus(UNet(z))[crop]`` on the training-count scale; ``fit`` takes
    ``fit_steps`` Adam steps on the mean squared error ``mean((f - target)^2) / c^2`` and reports
    every step through ``on_step(step, loss)`` (which may raise ``Cancelled``).
    """

    def __init__(self, network, network_input, crop, scale: float, learning_rate: float, on_step):
        import torch

        self.network, self.network_input, self.crop, self.scale = network, network_input, crop, scale
        self.optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
        self.on_step = on_step
        self.steps = 0  # set by the caller before each fit
        self.last_loss = math.nan

    def _image(self):
        import torch.nn.functional as F

        return self.scale * F.softplus(self.network(self.network_input)[0, 0][self.crop])

    def predict(self):
        import torch

        with torch.no_grad():
            return self._image()

    def fit(self, target, steps: int | None = None):
        import torch

        target = target.detach() / self.scale
        for step in range(1, (steps or self.steps) + 1):
            with torch.enable_grad():
                loss = torch.mean((self._image() / self.scale - target) ** 2)
                self.optimiser.zero_grad()
                loss.backward()
            self.optimiser.step()
            self.last_loss = loss.detach().item()
            if not math.isfinite(self.last_loss):
                raise SSPECTError("The network fit of the ADMM deep image prior diverged; lower the learning rate.")
            self.on_step(step, self.last_loss)


def run_dip_admm(problem, params, events: Events) -> Result:
    import torch
    from pytomography.algorithms import DIPRecon
    from pytomography.callbacks import Callback

    views = problem.projections.shape[0]
    if params["subsets"] > views:
        raise SSPECTError(f"{params['subsets']} subsets is more than the {views} views; choose at most {views} subsets.")
    device = problem.device
    fraction = params["validation_fraction"]
    keep = 1.0 - fraction
    n_outer, fit_steps, pretrain_steps = params["iterations"], params["fit_steps"], params["pretrain_steps"]
    total_steps = pretrain_steps + n_outer * fit_steps
    with _reproducible(device, params["seed"]):
        counts = problem.projections.to(device)
        if not bool(torch.all(counts == torch.round(counts))):
            events.log("The projections are not whole counts; they are rounded for the count split.")
        y_train, y_val = split_counts(counts, fraction, params["seed"]) if fraction > 0 else (counts, None)
        scatter = problem.scatter.to(device) if problem.scatter is not None else torch.zeros_like(counts)
        system_matrix = problem.system_matrix

        network_input, input_name, crop = prior_input(problem, events)

        # DIPRecon works on the training counts: y_train ~ Poisson((1 - p)(A x + s)) = Poisson(A x' + (1 - p) s)
        # with x' = (1 - p) x, so its images are (1 - p) times the full-count image, divided back at the end.
        sensitivity = system_matrix.compute_normalization_factor()
        likelihood = sensitivity_caching_likelihood(system_matrix, y_train, keep * scatter, sensitivity)
        start = _short_osem(problem, y_train, keep * scatter)
        sample = start.flatten().float()[:: max(1, start.numel() // 1_000_000)]  # torch.quantile's size limit
        scale = max(float(torch.quantile(sample, 0.999)), 1e-12)
        rho = params["rho"] * float(sensitivity.mean()) / max(float(start.mean()), 1e-12)

        state = {"outer": 0, "stage": "pretrain", "best": None, "since_best": 0, "history": [], "fit_loss": math.nan}

        def on_step(step, loss):
            done = pretrain_steps + state["outer"] * fit_steps + step if state["stage"] == "fit" else step
            if state["stage"] == "fit":
                message = f"iteration {state['outer'] + 1}/{n_outer}, network fit step {step}/{fit_steps}, mse {loss:.4g}"
                fields = {"iteration": state["outer"] + 1}
            else:
                message, fields = f"pretraining on OSEM, step {step}/{pretrain_steps}, mse {loss:.4g}", {}
            events.progress(done / total_steps, message, stage=state["stage"], step=step, loss=loss, **fields)

        network = _network(params["features"], float(start.mean()) / scale).to(device)
        prior_network = PriorNetwork(network, network_input, crop, scale, params["learning_rate"], on_step)
        if pretrain_steps:
            prior_network.fit(start, pretrain_steps)
        state["stage"] = "fit"
        prior_network.steps = fit_steps

        class OuterIteration(Callback):
            """After each outer iteration: validation NLL, iterate, progress, early stop."""

            def run(self, object, n_iter, n_subset):
                state["outer"] = iteration = n_iter + 1
                image = object.detach() / keep  # full-count scale
                message = f"iteration {iteration}/{n_outer}, network fit mse {prior_network.last_loss:.4g}"
                fields = {"stage": "admm", "iteration": iteration, "loss": prior_network.last_loss}
                if y_val is not None:
                    with torch.no_grad():
                        validation = float(poisson_nll(fraction * (system_matrix.forward(image) + scatter), y_val))
                    state["history"].append([iteration, validation])
                    fields["validation"] = validation
                    message += f", validation {validation:.6g}"
                    if state["best"] is None or validation < state["best"]["validation"]:
                        state["best"] = {"validation": validation, "iteration": iteration, "image": image.clone()}
                        state["since_best"] = 0
                    else:
                        state["since_best"] += 1
                if events.wants_iterates:
                    events.iterate(iteration, image.cpu().numpy().copy())
                events.progress((pretrain_steps + iteration * fit_steps) / total_steps, message, **fields)
                if params["patience"] and state["since_best"] >= params["patience"]:
                    raise _Stop()
                return object

        algorithm = DIPRecon(likelihood, prior_network, rho)
        try:
            final = algorithm(n_outer, params["osem_iterations"], params["subsets"], callback=OuterIteration()).detach() / keep
        except _Stop:
            final = None
        stopped_at = state["outer"]
        if state["best"] is None:
            best_iteration = stopped_at
        else:
            final, best_iteration = state["best"]["image"], state["best"]["iteration"]
        stopped_early = stopped_at < n_outer
        events.progress(1.0, f"stopped at iteration {stopped_at}" + (" (validation stopped improving)" if stopped_early else "")
                        + f"; image from iteration {best_iteration}", stage="done", iteration=stopped_at)
        image_array = final.cpu().numpy()
    info = {
        "best_iteration": best_iteration, "stopped_at": stopped_at, "stopped_early": stopped_early,
        "validation_nll": state["history"], "validation_fraction": fraction, "rho_absolute": rho,
        "pretrain_steps": pretrain_steps,
        "network": f"MONAI UNet channels {list(_network_features(params['features']))}",
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "input": input_name, "seed": params["seed"],
    }
    return Result(image_array, info)


register(Method("dip-admm", "Deep image prior, ADMM form (CT input)", "self-supervised", PARAMS, run_dip_admm))
