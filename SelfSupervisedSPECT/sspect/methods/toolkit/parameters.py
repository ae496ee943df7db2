"""The learned methods' parameters, declared once: one name, one meaning, one help text.

``steps`` are optimiser steps of a network; ``iterations`` are iterations of an iterative
algorithm (OSEM, ADMM); ``pretrain_steps`` fit a new network to a short OSEM image first. A result
reports ``best_step`` (the step whose image it returns) and ``stopped_at``, in optimiser steps.
"""
from __future__ import annotations

from .. import Param
from .networks import UPSAMPLING as UPSAMPLING_CHOICES

VALIDATION_FRACTION = Param(
    "validation_fraction", float, 0.1,
    "Share of the counts held out by binomial thinning to choose when to stop (0: no hold-out, run all steps)", 0.0, 0.5)
UPSAMPLING = Param(
    "upsampling", str, "transposed", "How the U-Net upsamples: transposed (stride-2 transposed convolutions, which can paint "
    "a checkerboard on smooth images) or resize (interpolation then a convolution: no checkerboard, but slower and, at "
    "the default steps, a worse fit)", choices=UPSAMPLING_CHOICES)
SEED = Param("seed", int, 0, "Seed of the network weights and of the count splits (same seed, same image on the same CPU)",
             0, 2**31 - 1)
ENSEMBLE = Param("ensemble", int, 1, "Runs averaged, each with its own seed (its own splits and weights); their spread "
                 "is the uncertainty map", 1, 32)


def steps(default: int, what: str = "Maximum number of optimiser steps of the network") -> Param:
    return Param("steps", int, default, what, 1, 100000)


def pretrain_steps(default: int) -> Param:
    return Param("pretrain_steps", int, default, "Steps fitting a new network to a 2-iteration OSEM image first (0: none)",
                 0, 100000)


def learning_rate(default: float) -> Param:
    return Param("learning_rate", float, default, "Adam learning rate of the network", 1e-6, 1.0)


def validation_interval(default: int) -> Param:
    return Param("validation_interval", int, default, "Optimiser steps between validation checks (and iterates)", 1, 10000)


def patience(default: int, unit: str = "Validation checks") -> Param:
    return Param("patience", int, default, f"{unit} without improvement before stopping (0: never stop early)", 0, 100000)


def features(default: int) -> Param:
    return Param("features", int, default, "Channels of the U-Net's first level (doubling at each of its four levels)", 2, 64)


def osem_params(iterations: int, subsets: int) -> tuple[Param, ...]:
    """The OSEM reconstructions a denoiser works on."""
    return (Param("iterations", int, iterations, "OSEM iterations of every reconstruction the method makes", 1, 200),
            Param("subsets", int, subsets, "OSEM subsets of every reconstruction (capped at the views it has)", 1, 64))


def stopped_training(steps_default: int, learning_rate_default: float, interval_default: int, patience_default: int,
                     what: str) -> tuple[Param, ...]:
    """A network's optimiser steps, stopped on held-out counts: steps, learning rate, hold-out, checks and patience."""
    return (steps(steps_default, what), learning_rate(learning_rate_default), VALIDATION_FRACTION,
            validation_interval(interval_default), patience(patience_default))


def denoiser_params() -> tuple[Param, ...]:
    """A per-scan denoiser of OSEM images or projections (n2n, noise2inverse, neighbor2neighbor)."""
    return osem_params(20, 4) + stopped_training(300, 0.0003, 25, 4, "Maximum number of optimiser steps of the denoiser") \
        + (features(8), UPSAMPLING, SEED, ENSEMBLE)
