"""The deep image prior in its ADMM form (``dip-admm``, PyTomography's DIPRecon) on the small study.

One PyTorch thread. The default-parameter run is shared by the early-stopping and image-quality tests.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sspect.errors import SSPECTError
from sspect.eval.metrics import nrmse
from sspect.methods import Cancelled, Events, all_methods, get_method
from sspect.methods.dip_admm import PriorNetwork

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a small run: a few outer iterations of a thin network
TINY = {"features": 4, "pretrain_steps": 5, "iterations": 4, "fit_steps": 3}


@pytest.fixture(scope="module")
def osem(problem):
    return get_method("osem").reconstruct(problem, {"iterations": 10, "subsets": 4}).image


@pytest.fixture(scope="module")
def default_run(run_with_defaults):
    return run_with_defaults("dip-admm")


def test_dip_admm_is_registered_as_a_self_supervised_method():
    method = all_methods()["dip-admm"]
    assert method.family == "self-supervised"
    assert {p.name for p in method.params} == {
        "iterations", "osem_iterations", "subsets", "rho", "fit_steps", "learning_rate", "pretrain_steps",
        "validation_fraction", "patience", "features", "upsampling", "seed", "ensemble"}
    assert method.validate({"rho": "0.5", "seed": "7"})["rho"] == 0.5
    json.dumps(method.describe())


def test_dip_admm_runs_end_to_end_with_progress_and_iterates(problem):
    events, iterates = [], []
    params = {**TINY, "iterations": 5, "patience": 0}
    listener = Events(events.append, on_iterate=lambda iteration, image: iterates.append((iteration, image)))
    result = get_method("dip-admm").reconstruct(problem, params, listener)
    image, info = result.image, result.info
    assert image.shape == (32, 32, 32) and image.dtype == np.float32 and np.all(np.isfinite(image)) and image.min() >= 0
    # steps count the network's fit steps: outer iteration k ends at step 3 k
    assert info["stopped_at"] == 15 and info["iterations_done"] == 5 and not info["stopped_early"]
    assert info["input"] == "attenuation map"
    assert [step for step, _ in info["validation_nll"]] == [3, 6, 9, 12, 15]
    assert info["best_step"] == min(info["validation_nll"], key=lambda row: row[1])[0]
    json.dumps(info)
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [e["stage"] for e in progress]
    # pretraining steps, then per outer iteration its network-fit steps and one summary, then done
    assert stages == ["pretrain"] * 5 + (["fit"] * 3 + ["admm"]) * 5 + ["done"]
    outer = [e for e in progress if e["stage"] == "admm"]
    assert [e["iteration"] for e in outer] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(e["loss"]) and np.isfinite(e["validation"]) for e in outer)
    assert [k for k, _ in iterates] == [3, 6, 9, 12, 15] and iterates[0][1].shape == (32, 32, 32)
    assert np.array_equal(dict(iterates)[info["best_step"]], image)  # the image returned is the iterate chosen


@pytest.mark.parametrize("n_events,stage", [(3, "pretrain"), (7, "fit"), (9, "admm")])
def test_should_stop_cancels_dip_admm_wherever_it_is(problem, stop_after, n_events, stage):
    """Cancelled raised inside DIPRecon (in our network's fit, in the outer-iteration callback) reaches the caller."""
    events, seen = stop_after(n_events)
    with pytest.raises(Cancelled):
        get_method("dip-admm").reconstruct(problem, {**TINY, "iterations": 50}, events)
    assert len(seen) == n_events and seen[-1]["stage"] == stage


def test_without_a_hold_out_every_outer_iteration_runs(problem):
    info = get_method("dip-admm").reconstruct(problem, {**TINY, "validation_fraction": 0, "patience": 1}).info
    assert info["validation_nll"] == [] and info["best_step"] == info["stopped_at"] == TINY["iterations"] * TINY["fit_steps"]


def test_the_image_is_on_the_full_count_scale_whatever_share_is_held_out(problem, osem):
    """DIPRecon sees only the training counts; the image it returns is (1 - p) times the full-count image,
    which the method divides back: the total matches OSEM of all counts for any hold-out share."""
    # 30 outer iterations: after 10 the total still swings by 10 % with the smallest change of the model
    # (measured at p = 0.4: 1.11 with the fast operator, 0.96 with PyTomography's, whose OSEM images
    # differ by 5e-5 here; after 30: 0.99 and 1.02); 0.6 without the division
    params = {"features": 4, "pretrain_steps": 30, "iterations": 30, "fit_steps": 10, "patience": 0}
    for fraction in (0.0, 0.4):
        image = get_method("dip-admm").reconstruct(problem, {**params, "validation_fraction": fraction}).image
        assert abs(image.sum() / osem.sum() - 1) < 0.05, (fraction, image.sum() / osem.sum())


def test_default_dip_admm_stops_on_validation_and_reports_where(default_run):
    info = default_run["result"].info
    history = dict(info["validation_nll"])
    defaults = get_method("dip-admm").validate({})
    assert info["stopped_early"] and info["best_step"] < info["stopped_at"]
    assert history[info["best_step"]] == min(history.values())
    assert info["stopped_at"] == info["best_step"] + defaults["patience"] * defaults["fit_steps"]
    last = [e for e in default_run["events"] if e["event"] == "progress"][-1]
    assert last["fraction"] == 1.0 and f"iteration {info['iterations_done']}" in last["message"]


def test_dip_admm_beats_noisy_osem_against_the_truth(default_run, osem, small_study, to_mbq_per_ml):
    """The truth scores only: dip-admm (defaults, validation-stopped) against OSEM 10 iterations x 4 subsets."""
    truth = small_study["phantom"].activity
    image = default_run["result"].image
    nrmse_admm, nrmse_osem = nrmse(image * to_mbq_per_ml, truth), nrmse(osem * to_mbq_per_ml, truth)
    info = default_run["result"].info
    print(f"NRMSE dip-admm {nrmse_admm:.3f} (best step {info['best_step']}, stopped at {info['stopped_at']}, "
          f"{default_run['seconds']:.1f} s), OSEM 10x4 {nrmse_osem:.3f}")
    assert nrmse_admm < nrmse_osem
    assert abs(image.sum() / osem.sum() - 1) < 0.05


def test_dip_admm_refuses_more_subsets_than_views_and_bad_values(problem):
    with pytest.raises(SSPECTError, match="more than the 24 views"):
        get_method("dip-admm").reconstruct(problem, {**TINY, "subsets": 25})
    for bad in ({"rho": 0}, {"rho": -1}, {"fit_steps": 0}, {"iterations": 2.5}, {"validation_fraction": 0.9}):
        with pytest.raises(SSPECTError, match=r"^The parameter .*\.$"):
            get_method("dip-admm").validate(bad)


def test_prior_network_fit_reduces_its_loss_and_predict_is_detached(problem):
    """The object DIPRecon drives: predict() is a plain tensor (DIPRecon does arithmetic on it in place), fit() learns."""
    from sspect.methods.toolkit.networks import Padding, unet

    target = torch.rand((32, 32, 32), generator=torch.Generator().manual_seed(0)) * 10
    padding = Padding(target.shape)
    events = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = PriorNetwork(unet(4, head="positive", start_value=0.5), padding.pad(torch.ones((1, 1, 32, 32, 32))),
                             padding, 10.0, 0.01, Events(events.append))
    prediction = prior.predict()
    assert prediction.shape == (32, 32, 32) and not prediction.requires_grad
    prior.fit(target, 20)
    losses = [e["loss"] for e in events if e["event"] == "progress"]
    assert len(losses) == 20 and losses[-1] < losses[0]


def _count_sensitivity_computations(system_matrix):
    """Wraps this system matrix instance's compute_normalization_factor with a call counter."""
    calls = []
    original = system_matrix.compute_normalization_factor

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    system_matrix.compute_normalization_factor = counted
    return calls, lambda: delattr(system_matrix, "compute_normalization_factor")


def test_pytomography_recomputes_the_sensitivity_every_update_without_subsets_and_ours_does_not(problem):
    """The trap: DIPRecon's image update calls OSEM(n_subsets=1), and PyTomography's likelihood then
    back-projects a ones sinogram every time. If the first assertion fails, PyTomography caches it and
    sensitivity_caching_likelihood can go."""
    from pytomography.algorithms import OSEM
    from pytomography.likelihoods import PoissonLogLikelihood

    from sspect.methods.dip_admm import sensitivity_caching_likelihood

    sensitivity = problem.system_matrix.compute_normalization_factor()
    calls, restore = _count_sensitivity_computations(problem.system_matrix)
    try:
        for likelihood, expected_calls in ((PoissonLogLikelihood(problem.system_matrix, problem.projections, problem.scatter), 3),
                                           (sensitivity_caching_likelihood(problem.system_matrix, problem.projections,
                                                                           problem.scatter, sensitivity), 0)):
            calls.clear()
            algorithm = OSEM(likelihood)
            images = [algorithm(1, 1, n_subset_specific=0).clone() for _ in range(3)]
            assert len(calls) == expected_calls
            assert torch.equal(likelihood.norm_BP, sensitivity)
        plain = OSEM(PoissonLogLikelihood(problem.system_matrix, problem.projections, problem.scatter))(3, 1)
        assert torch.equal(images[-1], plain)  # the same EM iterates either way
    finally:
        restore()
