"""Choice of the photopeak and scatter windows: automatic TEW/DEW/none for 177Lu, and overrides."""
from __future__ import annotations

import contextlib
import io

import pytest

from sspect.errors import SSPECTError
from sspect.io.nm import EnergyWindow
from sspect.io.windows import choose_windows
from sspect.pipeline import Settings, load_study, reconstruct_study

# The 177Lu windows of the GE Discovery 670 study, in the GE file order (peak, upper, lower).
PEAK = (187.2, 228.8, "Lu177_EM")
UPPER = (229.63, 251.16, "sc4_SC")
LOWER = (166.89, 186.31, "sc3_SC")
FAR_LOW = (100.0, 120.0, "Lu113_EM")  # the 113 keV line: touches nothing near 208 keV
FAR_HIGH = (300.0, 320.0, "high")


def windows(*limits) -> list[EnergyWindow]:
    return [EnergyWindow(index, low, high, name) for index, (low, high, name) in enumerate(limits)]


GE = windows(PEAK, UPPER, LOWER)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_refused_with_listing(error: pytest.ExceptionInfo, study_windows, *words):
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    for window in study_windows:  # the message lists what the study has, so the user can choose
        assert window.describe() in message, message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- automatic choice


def test_automatic_tew_when_both_neighbours_touch_the_peak():
    choice = choose_windows(GE, 208.0)
    assert (choice.peak.index, choice.lower.index, choice.upper.index) == (0, 2, 1)
    assert choice.scatter_method == "TEW"
    assert "TEW" in choice.describe()


def test_automatic_choice_does_not_depend_on_file_order():
    shuffled = windows(LOWER, FAR_LOW, UPPER, PEAK)
    choice = choose_windows(shuffled, 208.0)
    assert (choice.peak.name, choice.lower.name, choice.upper.name) == ("Lu177_EM", "sc3_SC", "sc4_SC")


def test_dew_when_only_the_lower_window_touches_the_peak():
    choice = choose_windows(windows(PEAK, FAR_HIGH, LOWER), 208.0)
    assert choice.lower.name == "sc3_SC" and choice.upper is None
    assert choice.scatter_method == "DEW"


def test_dew_when_only_the_upper_window_touches_the_peak():
    choice = choose_windows(windows(FAR_LOW, PEAK, UPPER), 208.0)
    assert choice.peak.index == 1 and choice.upper.name == "sc4_SC" and choice.lower is None
    assert choice.scatter_method == "DEW"


def test_no_scatter_window_when_none_touches_the_peak():
    choice = choose_windows(windows(FAR_LOW, PEAK, FAR_HIGH), 208.0)
    assert choice.peak.index == 1 and choice.lower is None and choice.upper is None
    assert choice.scatter_method == "none"


def test_a_gap_wider_than_three_keV_is_not_a_neighbour():
    choice = choose_windows(windows(PEAK, (150.0, 183.0, "gap"), (232.5, 250.0, "gap2")), 208.0)
    assert choice.scatter_method == "none"


def test_the_narrowest_touching_window_is_the_scatter_window():
    choice = choose_windows(windows(PEAK, (140.0, 186.5, "wide"), LOWER), 208.0)
    assert choice.lower.name == "sc3_SC"


def test_no_window_at_208_keV_is_refused_with_the_listing():
    study = windows(FAR_LOW, FAR_HIGH)
    with pytest.raises(SSPECTError) as error:
        choose_windows(study, 208.0)
    assert_refused_with_listing(error, study, "208 keV")


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("spec", [2, "2", " 2 ", "166-186", "166.89-186.31", "186-166", "170-180 keV"])
def test_lower_window_by_index_or_kev_range(spec):
    choice = choose_windows(GE, 208.0, lower=spec)
    assert choice.lower.index == 2 and choice.upper.index == 1 and choice.scatter_method == "TEW"


@pytest.mark.parametrize("spec", [1, "1", "229-251", "235-240"])
def test_upper_window_by_index_or_kev_range(spec):
    assert choose_windows(GE, 208.0, upper=spec).upper.index == 1


@pytest.mark.parametrize("spec", [0, "0", "190-225"])
def test_photopeak_by_index_or_kev_range(spec):
    choice = choose_windows(GE, 208.0, peak=spec)
    assert choice.peak.index == 0 and choice.scatter_method == "TEW"


def test_a_scatter_window_that_does_not_touch_the_peak_can_be_given():
    choice = choose_windows(windows(PEAK, FAR_LOW), 208.0, lower="100-120")
    assert choice.lower.name == "Lu113_EM" and choice.scatter_method == "DEW"


@pytest.mark.parametrize("word", ["none", "None", "off", "no", ""])
def test_none_switches_a_scatter_window_off(word):
    assert choose_windows(GE, 208.0, upper=word).scatter_method == "DEW"
    assert choose_windows(GE, 208.0, upper=word).lower.index == 2
    assert choose_windows(GE, 208.0, lower=word).upper.index == 1
    both = choose_windows(GE, 208.0, lower=word, upper=word)
    assert both.lower is None and both.upper is None and both.scatter_method == "none"


@pytest.mark.parametrize("role", ["lower", "upper"])
@pytest.mark.parametrize("spec", [0, "0", "190-225"])
def test_the_photopeak_is_refused_as_a_scatter_window(role, spec):
    with pytest.raises(SSPECTError, match="photopeak window itself"):
        choose_windows(GE, 208.0, **{role: spec})


@pytest.mark.parametrize("role", ["peak", "lower", "upper"])
@pytest.mark.parametrize("spec", [3, "7", "-1"])
def test_an_index_out_of_range_is_refused_with_the_listing(role, spec):
    with pytest.raises(SSPECTError) as error:
        choose_windows(GE, 208.0, **{role: spec})
    assert_refused_with_listing(error, GE, f"#{int(spec)}")


@pytest.mark.parametrize("role", ["peak", "lower", "upper"])
def test_a_range_overlapping_nothing_is_refused_with_the_listing(role):
    with pytest.raises(SSPECTError) as error:
        choose_windows(GE, 208.0, **{role: "300-320"})
    assert_refused_with_listing(error, GE, "300-320 keV")


@pytest.mark.parametrize("spec", ["lower", "166-", "a-b", "166-176-186"])
def test_a_spec_that_is_neither_index_nor_range_is_refused_with_the_listing(spec):
    with pytest.raises(SSPECTError) as error:
        choose_windows(GE, 208.0, lower=spec)
    assert_refused_with_listing(error, GE, "neither an index nor a keV range")


# ---------------------------------------------------------------- end to end


def test_dew_reconstruction_records_dew_in_the_provenance(small_study):
    settings = Settings(method="osem", params={"iterations": 1, "subsets": 4}, upper_window="none", device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(small_study["nm"], small_study["ct"], settings)
        image, provenance = reconstruct_study(study, settings)
    (windows_used,) = provenance["windows"]
    assert windows_used["scatter_method"] == "DEW"
    assert windows_used["upper"] is None
    assert windows_used["lower"]["index"] == small_study["index_lower"]
    assert windows_used["peak"]["index"] == small_study["index_peak"]
    assert "scatter" in provenance["corrections"]
    assert image.array.min() >= 0 and image.array.max() > 0


def test_no_scatter_window_is_a_warning_and_no_scatter_correction(small_study):
    settings = Settings(lower_window="none", upper_window="off")
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(small_study["nm"], small_study["ct"], settings)
    assert study.peaks[0].scatter_method == "none"
    assert any("not scatter corrected" in warning for warning in study.warnings), study.warnings
