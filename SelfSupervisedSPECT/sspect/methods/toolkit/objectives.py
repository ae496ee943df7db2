"""The two objectives several methods share: regression to an image, and the Poisson likelihood of held-out counts.

``image()`` is a method's current full-count image, differentiable in its network's weights.
"""
from __future__ import annotations

from typing import Callable

from .counts import HeldOut
from .fitting import Check, EarlyStopping, Fit, Step, fit
from .losses import held_out_nll, mean_squared_error, poisson_nll

PRETRAIN_LEARNING_RATE = 0.01  # the regression on an OSEM image tolerates a larger step than the likelihood


def em_preconditioned(image, sensitivity):
    """``image``, with the gradient that reaches it multiplied by ``image / sensitivity`` (EM's diagonal preconditioner).

    The NLL gradient ``A^T 1 - A^T(y / ybar)`` times ``x / A^T 1`` is ``x - x_EM``, the MLEM step:
    a descent direction of the same NLL with the same stationary points, which weighs voxels as EM
    does instead of by their sensitivity (Adam scales per weight, not per voxel).
    """
    if image.requires_grad:
        weight = image.detach() / sensitivity.clamp_min(1e-12)
        image.register_hook(lambda gradient: gradient * weight)
    return image


def fit_to_image(image: Callable, parameters, target, scale: float, events, *, steps: int, progress: tuple,
                 stage: str = "pretrain", learning_rate: float = PRETRAIN_LEARNING_RATE) -> None:
    """``steps`` Adam steps on ``mean((image() - target)^2) / scale^2``: a network put near ``target`` before its real loss."""
    if not steps:
        return
    target = target / scale

    def objective(step):
        return Step(mean_squared_error(image() / scale, target), fields={"stage": stage}, label=f"{stage}: step")

    fit(parameters, objective, steps=steps, events=events, learning_rate=learning_rate, progress=progress,
        name=f"The {stage}")


def fit_likelihood(image: Callable, parameters, system_matrix, counts: HeldOut, events, *, steps: int,
                   learning_rate: float, validation_interval: int, patience: int, progress: tuple,
                   name: str, sensitivity=None) -> Fit:
    """Adam on the Poisson NLL of ``counts.train`` under ``keep (A image() + s)``, stopped on the held-out counts.

    The validation NLL of ``counts.validation`` under ``fraction (A x + s)`` reuses the step's forward
    projection; ``fit.kept`` is the image with the lowest one. With ``sensitivity`` (``A^T 1``) the
    gradient reaching the image is EM-preconditioned (:func:`em_preconditioned`).
    """
    from ...physics.differentiable import project

    fraction, keep = counts.fraction, counts.keep

    def objective(step):
        x = image() if sensitivity is None else em_preconditioned(image(), keep * sensitivity)
        expected = project(x, system_matrix) + counts.scatter  # A x + s at the full-count scale

        def checkpoint():
            validation = None if counts.validation is None else held_out_nll(expected, counts.validation, fraction)
            return Check(validation, x.detach().clone(), x.detach().cpu().numpy().copy() if events.wants_iterates else None)

        return Step(poisson_nll(keep * expected, counts.train), checkpoint, fields={"stage": "train"})

    return fit(parameters, objective, steps=steps, events=events, learning_rate=learning_rate,
               check_every=validation_interval, stopping=EarlyStopping(patience), progress=progress, name=name)
