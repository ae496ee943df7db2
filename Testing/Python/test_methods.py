"""The method registry and parameter validation (sspect.methods); the classical methods are in test_classical.py.

Reconstructions here run with one PyTorch thread: on a 2-core machine that is busy with anything
else, two OpenMP threads wait for each other at every operation and a 32^3 reconstruction takes a
hundred times longer (0.2 s against 27 s measured). The numbers do not depend on it.
"""
from __future__ import annotations

import json

import pytest

from sspect.errors import SSPECTError
from sspect.methods import all_methods, get_method

PRIOR_PARAMS = {"beta", "gamma", "ct_weights", "ct_neighbours"}
EXPECTED_PARAMS = {
    "osem": {"iterations", "subsets"},
    "osl-map": {"iterations", "subsets"} | PRIOR_PARAMS,
    "bsrem": {"iterations", "subsets", "relaxation_decay"} | PRIOR_PARAMS,
    "kem": {"iterations", "subsets", "kernel_size", "ct_sigma", "distance_sigma_mm", "top_n"},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_methods_are_listed_best_first_each_with_what_it_is_for(capsys):
    """The order and the advice the Slicer panel shows come from the clinical-grid report."""
    from sspect.cli import main

    assert main(["methods"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed)[:3] == ["osem", "bsrem", "n2n"]
    assert all(description["advice"].endswith(".") for description in listed.values())
    families = [description["family"] for description in listed.values()]
    # trained on simulated torsos only and failing on anything else (NEMA): after every method that learns from the scan
    assert families.index("supervised") > families.index("self-supervised")


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
