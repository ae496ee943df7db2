"""OSEM, MAP (one-step-late and BSREM) with a relative difference prior, and kernel EM with CT-derived kernels, from PyTomography."""
from __future__ import annotations

from . import Events, Method, Param, Result, register
from .toolkit.counts import check_subsets

ITERATIONS = Param("iterations", int, 10, "Number of full passes through the data (10: near the lowest NRMSE at 4.4 mm, 60 views, 6 subsets)", 1, 200)
SUBSETS = Param("subsets", int, 6, "Number of ordered subsets (views per subset = views / subsets)", 1, 64)
BETA = Param("beta", float, 0.03, "Strength of the relative difference prior (0.03: the lower torso NRMSE of 0.03 and 0.1 at 4.4 mm, clinical counts)", 0.0, 100.0)
GAMMA = Param("gamma", float, 2.0, "Edge preservation of the relative difference prior (larger keeps edges)", 0.0, 100.0)
CT_WEIGHTS = Param("ct_weights", bool, False, "Weight prior neighbours by CT similarity (top-N of 26 neighbours)")
CT_NEIGHBOURS = Param("ct_neighbours", int, 8, "Neighbours kept by the CT weights", 1, 26)


def _progress_callback(events: Events, n_iters: int, n_subsets: int):
    from pytomography.callbacks import Callback

    class ProgressCallback(Callback):
        def run(self, object, n_iter, n_subset):
            done = n_iter * n_subsets + n_subset + 1
            if n_subset == n_subsets - 1 and events.wants_iterates:
                events.iterate(n_iter + 1, object.detach().cpu().numpy().copy())
            events.progress(done / (n_iters * n_subsets), f"iteration {n_iter + 1}/{n_iters}, subset {n_subset + 1}/{n_subsets}",
                            iteration=n_iter + 1, subset=n_subset + 1)
            return object

        def finalize(self, object):
            pass

    return ProgressCallback()


def _prior(problem, params):
    from pytomography.priors import RelativeDifferencePrior, TopNAnatomyNeighbourWeight

    weight = None
    if params["ct_weights"]:
        if problem.attenuation_map is None:
            from ..errors import SSPECTError
            raise SSPECTError("CT neighbour weights need a CT; give the CT or switch ct_weights off.")
        weight = TopNAnatomyNeighbourWeight(problem.attenuation_map, params["ct_neighbours"])
    return RelativeDifferencePrior(beta=params["beta"], gamma=params["gamma"], weight=weight)


def _run(algorithm, problem, params, events):
    check_subsets(problem, params["subsets"])
    image = algorithm(params["iterations"], params["subsets"],
                      callback=_progress_callback(events, params["iterations"], params["subsets"]))
    return Result(image.detach().cpu().numpy(), {"iterations": params["iterations"], "subsets": params["subsets"]})


def run_osem(problem, params, events):
    from pytomography.algorithms import OSEM

    return _run(OSEM(problem.likelihood()), problem, params, events)


def run_osl_map(problem, params, events):
    from pytomography.algorithms import OSMAPOSL

    return _run(OSMAPOSL(problem.likelihood(), prior=_prior(problem, params)), problem, params, events)


def run_bsrem(problem, params, events):
    from pytomography.algorithms import BSREM

    decay = params["relaxation_decay"]
    algorithm = BSREM(problem.likelihood(), prior=_prior(problem, params),
                      relaxation_sequence=lambda n: 1.0 / (1.0 + decay * n))
    return _run(algorithm, problem, params, events)


def run_kem(problem, params, events):
    """Kernel EM: the image is K alpha, each voxel a CT-weighted mean of its neighbours' coefficients.

    The support image is the CT channel (mu over water's mu at the photopeak, the networks' CT
    input), so the kernel's width in it is a fraction of water's attenuation on every scan."""
    import torch
    from pytomography.algorithms import KEM
    from pytomography.likelihoods import PoissonLogLikelihood
    from pytomography.projectors.shared import KEMSystemMatrix
    from pytomography.transforms.shared import KEMTransform

    from ..errors import SSPECTError
    from .toolkit.inputs import ct_channel, has_ct

    if not has_ct(problem):
        raise SSPECTError("Kernel EM needs a CT for its kernels; give the CT or choose osem.")
    ct_sigma, distance_sigma_cm = params["ct_sigma"], params["distance_sigma_mm"] / 10
    kernel = KEMTransform([ct_channel(problem).cpu()],
                          support_kernels_params=[[ct_sigma]], distance_kernel_params=[distance_sigma_cm],
                          size=params["kernel_size"], top_N=params["top_n"] or None,
                          kernel_on_gpu=torch.device(problem.device).type != "cpu")
    system_matrix = KEMSystemMatrix(problem.system_matrix, kernel)
    return _run(KEM(PoissonLogLikelihood(system_matrix, problem.projections, problem.scatter)), problem, params, events)


PRIOR_PARAMS = (BETA, GAMMA, CT_WEIGHTS, CT_NEIGHBOURS)
register(Method("osem", "OSEM", "classical", (ITERATIONS, SUBSETS), run_osem))
register(Method("osl-map", "MAP (one-step-late EM, relative difference prior)", "classical",
                (ITERATIONS, SUBSETS) + PRIOR_PARAMS, run_osl_map))
register(Method("bsrem", "MAP (BSREM, relative difference prior)", "classical",
                (ITERATIONS, SUBSETS) + PRIOR_PARAMS
                + (Param("relaxation_decay", float, 0.1, "Relaxation a(n) = 1/(1 + decay*n) that makes BSREM converge", 0.0, 10.0),),
                run_bsrem))
register(Method("kem", "Kernel EM (CT-derived kernels)", "classical",
                (ITERATIONS, SUBSETS,
                 Param("kernel_size", int, 3, "Neighbourhood of each kernel, voxels per side", choices=(3, 5, 7, 9)),
                 Param("ct_sigma", float, 0.1, "Width of the CT kernel, in water's attenuation (0.1: 10 % of water)", 0.001, 10.0),
                 Param("distance_sigma_mm", float, 4.4, "Width of the distance kernel in mm", 0.1, 100.0),
                 Param("top_n", int, 0, "Keep only the N most CT-similar neighbours (0: all)", 0, 729)),
                run_kem))
