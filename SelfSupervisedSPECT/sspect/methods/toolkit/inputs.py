"""Images a network starts from or sees: a short OSEM, the back-projected data, the CT, fixed noise."""
from __future__ import annotations


def osem(system_matrix, counts, scatter, iterations: int, subsets: int, report=None):
    """PyTomography's OSEM (subsets capped at the views); ``report(done, total)`` after every subiteration."""
    from pytomography.algorithms import OSEM
    from pytomography.callbacks import Callback
    from pytomography.likelihoods import PoissonLogLikelihood

    subsets = min(subsets, counts.shape[0])

    class Report(Callback):
        def __init__(self):
            pass

        def run(self, object, n_iter, n_subset):
            report(n_iter * subsets + n_subset + 1, iterations * subsets)
            return object

    algorithm = OSEM(PoissonLogLikelihood(system_matrix, counts, scatter))
    return algorithm(iterations, subsets, callback=Report() if report else None).detach()


def short_osem(system_matrix, counts, scatter):
    """Two OSEM iterations (the most subsets up to 8 that divide the views): a start a network is first fitted to."""
    views = counts.shape[0]
    subsets = max(d for d in range(1, min(views, 8) + 1) if views % d == 0)
    return osem(system_matrix, counts, scatter, 2, subsets)


def has_ct(problem) -> bool:
    return problem.attenuation_map is not None and float(problem.attenuation_map.max()) > 0


def ct_channel(problem):
    """``mu / mu_water`` at the isotope's photopeak: the same anatomy gives the same channel on every scan
    (a fixed physical scale, not the densest bone)."""
    import torch

    return problem.attenuation_map.to(problem.device, torch.float32) / problem.isotope.mu_water_per_cm


def prior_input(problem, events):
    """The deep image prior's fixed input: the attenuation map scaled to 1, or uniform noise without a CT; (image, its name)."""
    import torch

    if has_ct(problem):
        mu = problem.attenuation_map.to(problem.device, torch.float32)
        return mu / mu.max(), "attenuation map"
    events.log("No CT: the network input is fixed random noise (the original deep image prior).")
    return torch.rand(tuple(problem.object_meta.shape), device=problem.device), "noise"


def backprojection_image(problem, counts, scatter):
    """(``x_BP = u A^T(y / (A u + s)) / A^T 1``, ``A^T 1``): one MLEM update from the uniform image ``u`` with the measured total.

    Dividing by ``A u + s`` removes the ray-length and attenuation weighting of a plain back projection
    and the scatter, so ``x_BP`` is an image of counts per voxel on OSEM's scale.
    """
    import torch

    from ...physics.differentiable import back_project

    system_matrix = problem.system_matrix
    ones = torch.ones(tuple(problem.object_meta.shape), device=counts.device)
    sensitivity = back_project(torch.ones_like(counts), system_matrix)
    ray_sums = system_matrix.forward(ones)
    uniform = max(float(counts.sum() - scatter.sum()), 1e-3 * float(counts.sum())) / float(ray_sums.sum())
    expected = uniform * ray_sums + scatter
    ratio = torch.where(expected > 0, counts / expected.clamp_min(1e-12), torch.zeros_like(counts))
    seen = sensitivity > 1e-6 * float(sensitivity.max())
    x_bp = torch.where(seen, uniform * back_project(ratio, system_matrix) / sensitivity.clamp_min(1e-12),
                       torch.zeros_like(sensitivity))
    return x_bp, sensitivity
