"""The deep image prior (``dip``) on small problems; its contract with every method is in test_method_contract.py.

One PyTorch thread, as in test_methods.py (two threads on a busy 2-core machine crawl). The
whole file takes about 40 s on 2 cores; the default-parameter DIP run (about 20 s) is shared by
the early-stopping and the image-quality tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest

from sspect.eval.metrics import nrmse
from sspect.methods import Events, all_methods, get_method
from sspect.pipeline import Settings, bed_problem, reconstruct_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a small DIP that runs in a second or two on 32^3
TINY = {"features": 4, "pretrain_steps": 10, "steps": 12, "validation_interval": 3}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def default_run(run_with_defaults):
    return run_with_defaults("dip")


# ---------------------------------------------------------------- dip


def test_dip_is_registered_as_a_self_supervised_method():
    method = all_methods()["dip"]
    assert method.family == "self-supervised" and method.title == "Deep image prior (CT input)"
    assert {p.name for p in method.params} == {"steps", "learning_rate", "validation_fraction", "validation_interval",
                                               "patience", "pretrain_steps", "features", "upsampling", "seed", "ensemble"}
    assert method.validate({"steps": "40", "seed": "7"})["steps"] == 40
    json.dumps(method.describe())


def test_dip_runs_end_to_end_with_progress_and_iterates(problem):
    events, iterates = [], []
    params = {"features": 4, "pretrain_steps": 20, "steps": 60, "patience": 0}
    listener = Events(events.append, on_iterate=lambda step, image: iterates.append((step, image)))
    result = get_method("dip").reconstruct(problem, params, listener)
    image = result.image
    assert image.shape == (32, 32, 32) and image.dtype == np.float32
    assert np.all(np.isfinite(image)) and image.min() > 0
    info = result.info
    assert info["stopped_at"] == 60 and not info["stopped_early"] and info["input"] == "attenuation map"
    assert [step for step, _ in info["validation_nll"]] == list(range(5, 61, 5))
    assert info["best_step"] == min(info["validation_nll"], key=lambda row: row[1])[0]
    json.dumps(info)
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(progress) == 20 + 60 + 1
    training = [e for e in progress if e.get("stage") == "train"]
    assert all(np.isfinite(e["loss"]) for e in training) and sum("validation" in e for e in training) == 12
    assert [k for k, _ in iterates] == list(range(5, 61, 5)) and iterates[0][1].shape == (32, 32, 32)
    # the image the method returns is the iterate it chose
    assert np.array_equal(dict(iterates)[info["best_step"]], image)
    # the likelihood training fits the data: the training NLL fell
    assert training[-1]["loss"] < training[0]["loss"]


def test_default_dip_stops_on_validation_and_reports_where(default_run):
    info = default_run["result"].info
    history = dict((step, value) for step, value in info["validation_nll"])
    assert info["stopped_early"] and info["best_step"] < info["stopped_at"] < 300
    assert history[info["best_step"]] == min(history.values())
    assert info["stopped_at"] == info["best_step"] + 10 * 5  # patience 10 checks, one every 5 steps
    last = [e for e in default_run["events"] if e["event"] == "progress"][-1]
    assert last["fraction"] == 1.0 and f"step {info['stopped_at']}" in last["message"]


def test_dip_beats_noisy_osem_against_the_truth(problem, default_run, small_study, to_mbq_per_ml):
    """The phantom's truth is used only here, to score: DIP (defaults, validation-stopped) against
    OSEM 10 iterations x 4 subsets, both calibrated the same way. Measured: DIP 0.287 (stopped at
    step 225, image from step 175, ~20 s), OSEM 10x4 0.325 (the best OSEM, 12x4, is 0.321)."""
    truth = small_study["phantom"].activity
    osem = get_method("osem").reconstruct(problem, {"iterations": 10, "subsets": 4}).image
    dip = default_run["result"].image
    nrmse_dip, nrmse_osem = nrmse(dip * to_mbq_per_ml, truth), nrmse(osem * to_mbq_per_ml, truth)
    print(f"NRMSE DIP {nrmse_dip:.3f} (best step {default_run['result'].info['best_step']}, stopped at "
          f"{default_run['result'].info['stopped_at']}, {default_run['seconds']:.1f} s), OSEM 10x4 {nrmse_osem:.3f}")
    assert nrmse_dip < 0.95 * nrmse_osem
    # same scale as OSEM: x is the full-count image although the network trained on 90 % of the counts
    assert abs(dip.sum() / osem.sum() - 1) < 0.05


def test_dip_without_ct_takes_noise_as_input(study):
    problem_without_ct = bed_problem(dataclasses.replace(study, ct=None), device="cpu")
    events = []
    result = get_method("dip").reconstruct(problem_without_ct, TINY, Events(events.append))
    assert result.info["input"] == "noise" and np.all(np.isfinite(result.image))
    assert any(e["event"] == "log" and "No CT" in e["message"] for e in events)


def test_dip_without_a_hold_out_runs_every_step(problem):
    info = get_method("dip").reconstruct(problem, {**TINY, "validation_fraction": 0, "patience": 1}).info
    assert info["validation_nll"] == [] and info["best_step"] == info["stopped_at"] == TINY["steps"]
    assert not info["stopped_early"]


def test_dip_through_the_pipeline_gives_a_calibrated_image(study, small_study, problem, to_mbq_per_ml):
    settings = Settings(method="dip", params=TINY, device="cpu", seed=0,
                        calibration_cps_per_MBq=small_study["sensitivity_cps_per_mbq"])
    with contextlib.redirect_stdout(io.StringIO()):
        volume, provenance = reconstruct_study(study, settings)
    assert volume.unit == "Bq/mL" and volume.array.shape == (32, 32, 32)
    assert provenance["method"] == "dip" and provenance["per_bed"][0]["input"] == "attenuation map"
    json.dumps(provenance, default=str)
    direct = get_method("dip").reconstruct(problem, TINY).image  # the seed is a parameter: the same image
    np.testing.assert_allclose(volume.array, direct * to_mbq_per_ml * 1e6, rtol=1e-6)
