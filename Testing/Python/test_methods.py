"""The method registry, parameter validation, and the classical methods on the small simulated study.

Reconstructions here run with one PyTorch thread: on a 2-core machine that is busy with anything
else, two OpenMP threads wait for each other at every operation and a 32^3 reconstruction takes a
hundred times longer (0.2 s against 27 s measured). The numbers do not depend on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from sspect.errors import SSPECTError
from sspect.methods import Cancelled, Events, all_methods, get_method
from sspect.pipeline import Settings, bed_problem, reconstruct_study

PRIOR_PARAMS = {"beta", "gamma", "ct_weights", "ct_neighbours"}
EXPECTED_PARAMS = {
    "osem": {"iterations", "subsets"},
    "osl-map": {"iterations", "subsets"} | PRIOR_PARAMS,
    "bsrem": {"iterations", "subsets", "relaxation_decay"} | PRIOR_PARAMS,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem_without_ct(study):
    return bed_problem(dataclasses.replace(study, ct=None), device="cpu")


@pytest.fixture(scope="module")
def regions(small_study):
    """Uniform regions of the phantom, away from edges: the liver without its lesion, and the body."""
    phantom = small_study["phantom"]
    labels, names = phantom.labels, phantom.label_names
    liver = binary_erosion(labels == names["liver"]) & ~binary_dilation(labels == names["lesion_liver"], iterations=2)
    body = binary_erosion(labels == names["body"], iterations=2)
    assert liver.sum() > 100 and body.sum() > 1000
    return {"liver": liver, "body": body}


def coefficient_of_variation(image, mask) -> float:
    values = image[mask]
    return float(values.std() / values.mean())


# ---------------------------------------------------------------- registry


def test_registry_lists_the_classical_methods_with_their_parameters():
    methods = all_methods()
    assert EXPECTED_PARAMS.keys() <= methods.keys()
    for name, params in EXPECTED_PARAMS.items():
        method = get_method(name)
        assert method.name == name and method.family == "classical" and method.title
        described = method.describe()
        assert {p["name"] for p in described["params"]} == params
        for param in described["params"]:
            assert param["type"] in ("int", "float", "bool") and param["help"]
            assert method.validate({})[param["name"]] == param["default"]  # defaults pass their own checks
    json.dumps({name: m.describe() for name, m in methods.items()})  # what the Slicer panel reads


def test_methods_command_prints_the_registry_as_json(capsys):
    from sspect.cli import main

    assert main(["methods"]) == 0
    listed = json.loads(capsys.readouterr().out)
    for name, params in EXPECTED_PARAMS.items():
        assert {p["name"] for p in listed[name]["params"]} == params


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(SSPECTError, match="Unknown method 'magic'; choose one of .*bsrem.*osem.*osl-map"):
        get_method("magic")


# ---------------------------------------------------------------- parameter validation


def test_strings_from_the_command_line_are_coerced():
    params = get_method("bsrem").validate({"iterations": "3", "subsets": "4", "beta": "0.5", "gamma": "1",
                                           "ct_weights": "true", "ct_neighbours": "6", "relaxation_decay": "0.2"})
    assert params == {"iterations": 3, "subsets": 4, "beta": 0.5, "gamma": 1.0, "ct_weights": True,
                      "ct_neighbours": 6, "relaxation_decay": 0.2}
    assert type(params["iterations"]) is int and type(params["beta"]) is float and type(params["ct_weights"]) is bool


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
                                        ("false", False), ("False", False), ("0", False), ("no", False),
                                        ("off", False), (True, True), (False, False)])
def test_booleans_from_text(text, value):
    assert get_method("osl-map").validate({"ct_weights": text})["ct_weights"] is value


def test_a_misspelt_boolean_is_refused_not_read_as_false():
    with pytest.raises(SSPECTError, match="ct_weights"):
        get_method("osl-map").validate({"ct_weights": "ture"})


def test_every_parameter_not_given_takes_its_default():
    params = get_method("osem").validate({"iterations": 2})
    assert params == {"iterations": 2, "subsets": 6}


@pytest.mark.parametrize("method,given,words", [
    ("osem", {"iterations": "abc"}, ("iterations", "must be")),
    ("osem", {"iterations": "2.5"}, ("iterations", "must be")),
    ("osem", {"iterations": 0}, ("iterations", "outside")),
    ("osem", {"iterations": 201}, ("iterations", "outside")),
    ("osem", {"subsets": -1}, ("subsets", "outside")),
    ("bsrem", {"beta": "-0.1"}, ("beta", "outside")),
    ("bsrem", {"beta": "nan"}, ("beta",)),
    ("bsrem", {"beta": "inf"}, ("beta",)),
    ("bsrem", {"relaxation_decay": 11}, ("relaxation_decay", "outside")),
    ("osl-map", {"ct_neighbours": 27}, ("ct_neighbours", "outside")),
    ("osl-map", {"gamma": None}, ("gamma", "must be")),
])
def test_bad_values_are_refused_in_one_sentence(method, given, words):
    with pytest.raises(SSPECTError) as error:
        get_method(method).validate(given)
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("method", ["osem", "osl-map", "bsrem"])
def test_unknown_parameter_names_are_refused_with_the_known_ones(method):
    with pytest.raises(SSPECTError) as error:
        get_method(method).validate({"iterations": 2, "smoothness": 3, "beta_": 1})
    message = str(error.value)
    assert "beta_" in message and "smoothness" in message
    for name in EXPECTED_PARAMS[method]:
        assert name in message


def test_osem_does_not_take_prior_parameters():
    with pytest.raises(SSPECTError, match="has no parameter beta"):
        get_method("osem").validate({"beta": 0.3})


def test_more_subsets_than_views_is_refused(problem):
    with pytest.raises(SSPECTError, match="more than the 24 views"):
        get_method("osem").reconstruct(problem, {"iterations": 1, "subsets": 25})


# ---------------------------------------------------------------- MAP methods run


@pytest.mark.parametrize("method,extra", [
    ("osl-map", {}),
    ("osl-map", {"ct_weights": True}),
    ("bsrem", {}),
    ("bsrem", {"ct_weights": True, "ct_neighbours": 6}),
])
def test_map_methods_give_finite_non_negative_images(problem, method, extra):
    result = get_method(method).reconstruct(problem, {"iterations": 2, "subsets": 4, **extra})
    image = result.image
    assert image.shape == (32, 32, 32)
    assert np.all(np.isfinite(image)) and image.min() >= 0 and image.max() > 0
    assert result.info["iterations"] == 2 and result.info["subsets"] == 4


@pytest.mark.parametrize("method", ["osl-map", "bsrem"])
def test_ct_weights_without_a_ct_are_refused(problem_without_ct, method):
    with pytest.raises(SSPECTError, match="need a CT"):
        get_method(method).reconstruct(problem_without_ct, {"iterations": 1, "subsets": 4, "ct_weights": True})


def test_bsrem_with_rdp_is_less_noisy_than_osem_at_the_same_iterations(problem, regions):
    schedule = {"iterations": 3, "subsets": 4}
    osem = get_method("osem").reconstruct(problem, schedule).image
    bsrem = get_method("bsrem").reconstruct(problem, {**schedule, "beta": 0.3}).image
    for name, mask in regions.items():
        cov_osem, cov_bsrem = coefficient_of_variation(osem, mask), coefficient_of_variation(bsrem, mask)
        assert cov_bsrem < 0.9 * cov_osem, f"{name}: BSREM CoV {cov_bsrem:.3f}, OSEM CoV {cov_osem:.3f}"
        # smoother, not emptier: the regional mean stays close to OSEM's
        assert abs(bsrem[mask].mean() / osem[mask].mean() - 1) < 0.15, name


# ---------------------------------------------------------------- calibration


def test_calibrated_osem_recovers_the_total_activity(small_study, study):
    phantom = small_study["phantom"]
    settings = Settings(method="osem", params={"iterations": 6, "subsets": 4}, device="cpu",
                        calibration_cps_per_MBq=small_study["sensitivity_cps_per_mbq"])
    with contextlib.redirect_stdout(io.StringIO()):
        image, provenance = reconstruct_study(study, settings)
    assert image.unit == "Bq/mL" and provenance["unit"] == "Bq/mL"
    total_mbq = float(image.array.sum(dtype=np.float64)) * image.voxel_volume_ml / 1e6
    truth_mbq = phantom.total_activity_mbq()
    assert abs(total_mbq / truth_mbq - 1) < 0.05, f"{total_mbq:.1f} MBq reconstructed, {truth_mbq:.1f} MBq true"
    liver = phantom.labels == phantom.label_names["liver"]
    assert abs(image.array[liver].mean() / 1e6 / phantom.activity[liver].mean() - 1) < 0.15


def test_uncalibrated_image_is_in_counts(study):
    settings = Settings(method="osem", params={"iterations": 1, "subsets": 4}, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        image, provenance = reconstruct_study(study, settings)
    assert image.unit == "counts" and provenance["unit"] == "counts"
    assert provenance["calibration_cps_per_MBq"] is None


# ---------------------------------------------------------------- progress and cancellation


@pytest.mark.parametrize("method", ["osem", "osl-map", "bsrem"])
def test_progress_reaches_one(problem, method):
    events = []
    get_method(method).reconstruct(problem, {"iterations": 2, "subsets": 3}, Events(events.append))
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert len(fractions) == 6 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert math.isclose(fractions[0], 1 / 6, abs_tol=1e-4)
    assert [(e["iteration"], e["subset"]) for e in progress] == [(i, s) for i in (1, 2) for s in (1, 2, 3)]


def test_should_stop_cancels_through_the_pipeline(study, stop_after):
    """The caller's should_stop must reach the method when the pipeline wraps the events per bed."""
    events, seen = stop_after(2)
    settings = Settings(method="osem", params={"iterations": 3, "subsets": 4}, device="cpu")
    with pytest.raises(Cancelled), contextlib.redirect_stdout(io.StringIO()):
        reconstruct_study(study, settings, events)
    assert len(seen) == 2
