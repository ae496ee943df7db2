"""The contract every registered method keeps, checked for each one the registry lists (a new method is picked up).

Registration and validation, a seeded run that is reproducible and leaves the caller's random
state alone, cancellation, progress that only goes forward, the image's unit (counts per voxel of
the full acquisition, the same scale as OSEM's), and held-out early stopping where a method has it.
Method-specific behaviour is tested beside each method (``test_<method file>.py``).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sspect.errors import SSPECTError
from sspect.methods import Cancelled, Events, all_methods, get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {"classical", "supervised", "self-supervised"}
METHODS = sorted(all_methods())


def quick(method) -> dict:
    """A short run of ``method``: a few steps and iterations of every loop, small networks."""
    small = {"iterations": 2, "features": 4, "validation_interval": 2, "subsets": 4}
    params = {}
    for param in method.params:
        if param.name in small:
            params[param.name] = small[param.name]
        elif param.kind is int and param.name.endswith("steps"):
            params[param.name] = max(int(param.minimum or 0), min(param.default, 4))
    return params


@pytest.fixture(scope="module")
def problem_for(problem, coarse_torso):
    """The small study; supervised networks get the coarse torso, the grid they were trained for."""
    return lambda method: coarse_torso["problem"] if method.family == "supervised" else problem


@pytest.fixture(scope="module")
def runs(problem_for):
    """One quick run of every method, with its events, leaving the caller's random state to be checked."""
    results = {}
    for name in METHODS:
        method = get_method(name)
        events = []
        torch.manual_seed(123)
        result = method.reconstruct(problem_for(method), quick(method), Events(events.append))
        after = torch.rand(3)
        torch.manual_seed(123)
        results[name] = {"result": result, "events": events, "random_state_kept": torch.equal(after, torch.rand(3))}
    return results


@pytest.fixture(scope="module")
def osem_totals(problem_for):
    return {family: float(get_method("osem").reconstruct(problem_for(get_method(name)), {}).image.sum())
            for family, name in (("supervised", "post-unet"), ("other", "osem"))}


@pytest.mark.parametrize("name", METHODS)
def test_a_method_is_registered_and_describes_itself(name):
    method = get_method(name)
    assert method.name == name and method.family in FAMILIES and method.title
    names = [p.name for p in method.params]
    assert len(names) == len(set(names))
    json.dumps(method.describe())
    assert method.validate({}) == {p.name: p.default for p in method.params}  # the defaults pass their own bounds


@pytest.mark.parametrize("name", METHODS)
def test_bad_parameters_are_refused_in_one_sentence(name):
    method = get_method(name)
    bad = [{"no_such_parameter": 1}]
    for param in method.params:
        if param.kind in (int, float) and param.maximum is not None:
            bad.append({param.name: param.maximum * 2 + 1})
        if param.kind in (int, float):
            bad.append({param.name: "many"})
    for params in bad:
        with pytest.raises(SSPECTError) as refused:
            method.validate(params)
        message = str(refused.value)
        assert message.endswith(".") and "\n" not in message and message.count(". ") == 0, message


@pytest.mark.parametrize("name", METHODS)
def test_the_image_is_in_counts_per_voxel_of_the_full_acquisition(name, runs, problem_for, osem_totals):
    method = get_method(name)
    image = runs[name]["result"].image
    assert image.shape == tuple(problem_for(method).object_meta.shape) and image.dtype == np.float32
    assert np.all(np.isfinite(image))
    total = osem_totals["supervised" if method.family == "supervised" else "other"]
    # a few steps from a start image: near OSEM's total, and a lost factor (a half, the held-out share squared) would show
    assert 0.6 < float(image.sum()) / total < 1.5
    json.dumps(runs[name]["result"].info)


@pytest.mark.parametrize("name", METHODS)
def test_progress_only_goes_forward_and_ends_at_one(name, runs):
    fractions = [e["fraction"] for e in runs[name]["events"] if e["event"] == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] >= 0


@pytest.mark.parametrize("name", METHODS)
def test_a_seeded_run_is_reproducible_and_leaves_the_callers_random_state(name, runs, problem_for):
    method = get_method(name)
    assert runs[name]["random_state_kept"]
    again = method.reconstruct(problem_for(method), quick(method)).image
    assert np.array_equal(again, runs[name]["result"].image)
    if "seed" in {p.name for p in method.params}:
        other = method.reconstruct(problem_for(method), {**quick(method), "seed": 1}).image
        assert not np.array_equal(other, again)


@pytest.mark.parametrize("name", METHODS)
def test_should_stop_cancels_a_method(name, problem_for, stop_after):
    method = get_method(name)
    events, seen = stop_after(2)
    with pytest.raises(Cancelled):
        method.reconstruct(problem_for(method), quick(method), events)
    assert len(seen) == 2


STOPPING = [name for name in METHODS if "patience" in {p.name for p in get_method(name).params}]


@pytest.mark.parametrize("name", STOPPING)
def test_held_out_early_stopping_keeps_the_best_check_and_stops_patience_checks_later(name, problem_for):
    """Many steps, patience 2, a check every step: the run stops 2 checks after its best, and returns that check."""
    method = get_method(name)
    names = {p.name for p in method.params}
    params = {**quick(method), "patience": 2, "learning_rate": 0.03}
    long = "iterations" if name == "dip-admm" else "steps"  # dip-admm checks once per outer iteration
    params[long] = 300
    if "validation_interval" in names:
        params["validation_interval"] = 1
    info = method.reconstruct(problem_for(method), params).info
    history = info["validation_nll"]
    checks = [step for step, _ in history]
    assert info["best_step"] == min(history, key=lambda row: row[1])[0]
    assert info["stopped_early"] and checks[-1] == info["stopped_at"]
    assert len(checks) - 1 - checks.index(info["best_step"]) == 2
    assert all(math.isfinite(value) for _, value in history)
