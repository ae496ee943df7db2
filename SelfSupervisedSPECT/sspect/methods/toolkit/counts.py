"""The measured counts as learned methods use them: binomial splits, a held-out share, the scatter.

Binomial thinning of Poisson counts, ``y_a ~ Binomial(y, 1 - p)`` and ``y_b = y - y_a``, gives two
independent Poisson data sets with means ``(1 - p)(A x + s)`` and ``p (A x + s)``: the basis of
held-out early stopping and of count-splitting Noise2Noise. Drawn on the CPU with their own
generator, so a split is the same on every device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import SSPECTError

if TYPE_CHECKING:  # torch is imported where it is used
    import torch

SECOND_SPLIT_SEED_OFFSET = 2**32  # a second split of the same scan is drawn from another random stream


def split_counts(projections, fraction: float, seed: int):
    """(y_a, y_b): ``y_a ~ Binomial(y, 1 - fraction)``, ``y_b = y - y_a``; counts are rounded to whole numbers first."""
    import torch

    counts = torch.round(projections.detach().to("cpu", torch.float64)).clamp_min(0)
    generator = torch.Generator().manual_seed(seed)
    kept = torch.binomial(counts, torch.full_like(counts, 1.0 - fraction), generator=generator)
    dtype, device = projections.dtype, projections.device
    return kept.to(device, dtype), (counts - kept).to(device, dtype)


def scatter_or_zeros(problem):
    """The problem's additive scatter on its device, or zeros of the projections' shape without an estimate."""
    import torch

    if problem.scatter is not None:
        return problem.scatter.to(problem.device)
    return torch.zeros_like(problem.projections.to(problem.device))


def check_subsets(problem, subsets: int) -> None:
    views = problem.projections.shape[0]
    if subsets > views:
        raise SSPECTError(f"{subsets} subsets is more than the {views} views; choose at most {views} subsets.")


@dataclass
class HeldOut:
    """The counts a method trains on and the share it holds out to choose when to stop."""

    train: "torch.Tensor"  # y_train ~ Binomial(y, 1 - fraction); all counts (rounded) when fraction is 0
    validation: "torch.Tensor | None"  # y_val = y - y_train, None without a hold-out
    scatter: "torch.Tensor"  # s at the full-count scale (zeros without a scatter estimate)
    fraction: float

    @property
    def keep(self) -> float:
        return 1.0 - self.fraction


def hold_out(problem, fraction: float, seed: int, events) -> HeldOut:
    """The problem's projections split by binomial thinning into training and held-out counts, on its device."""
    import torch

    counts = problem.projections.to(problem.device)
    if not bool(torch.all(counts == torch.round(counts))):
        events.log("The projections are not whole counts; they are rounded for the count split.")
    if fraction > 0:
        train, validation = split_counts(counts, fraction, seed)
    else:
        train, validation = torch.round(counts).clamp_min(0), None
    return HeldOut(train, validation, scatter_or_zeros(problem), fraction)
