"""Losses of the learned methods, each a function of tensors (no state)."""
from __future__ import annotations


def poisson_nll(mean, counts):
    """``sum(mu - y + y log(y / mu))``: the Poisson NLL up to a constant, 0 for a perfect fit (only differences matter)."""
    import torch

    mean = mean.clamp_min(1e-10)
    return (mean - counts + torch.xlogy(counts, counts) - counts * torch.log(mean)).sum()


def held_out_nll(expected_full, held_out, fraction: float) -> float:
    """Poisson NLL of the held-out counts under ``fraction`` x the expected counts of the full acquisition."""
    return float(poisson_nll(fraction * expected_full, held_out))


def mean_squared_error(prediction, target):
    import torch

    return torch.mean((prediction - target) ** 2)


def nrmse_squared(image, truth):
    """``||x - t||^2 / ||t||^2``: every case weighs the same whatever its counts."""
    return ((image - truth) ** 2).sum() / (truth ** 2).sum().clamp_min(1e-12)


def lesion_mean_error_squared(image, truth, lesions):
    """Mean over the lesions of ``(mean_k(x) / mean_k(t) - 1)^2``; 0 without lesions.

    ``lesions`` is one boolean mask per lesion. A lesion's activity is what lesion dosimetry reads, and a
    few voxels weigh nothing in the whole image's NRMSE: a network trained by NRMSE alone learns to
    smooth lesions into their background.
    """
    terms = [((image[mask].sum() / truth[mask].sum().clamp_min(1e-12)) - 1.0) ** 2 for mask in lesions]
    return sum(terms) / len(terms) if terms else image.sum() * 0.0


def mirrored_pair_loss(network, inputs, targets, padding):
    """MSE of ``f(inputs)`` against ``targets`` under one random mirror of the pair; returns (loss, prediction).

    The Noise2Noise-type losses (count halves, view splits): one scan is little data, and without the
    mirror a per-scan denoiser memorises the other half's noise.
    """
    import torch

    flips = [dim for dim in (2, 3, 4) if bool(torch.rand(()) < 0.5)]
    prediction = network(inputs.flip(flips)).flip(flips)
    return mean_squared_error(padding.crop(prediction), padding.crop(targets)), prediction
