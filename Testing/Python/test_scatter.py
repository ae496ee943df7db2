"""The scatter-window estimate: PyTomography's TEW formula, smoothed in each view by default so that
EM's totals stay right at low counts (EM cannot subtract more scatter than a bin holds counts)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from sspect.cli import main
from sspect.errors import SSPECTError
from sspect.physics.system import Geometry, tew_scatter
from sspect.pipeline import Settings, check_settings, load_study, reconstruct_study
from sspect.sim.dicom_writer import write_demo_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIEWS, PIXELS = 24, (40, 30)
GEOMETRY = Geometry((PIXELS[0], PIXELS[0], PIXELS[1]), (0.5, 0.5), np.arange(VIEWS) * 15.0, np.full(VIEWS, 25.0))


def _windows(seed=0):
    rng = np.random.default_rng(seed)
    lower = rng.poisson(4.0, (VIEWS, *PIXELS)).astype(np.float32)
    upper = rng.poisson(1.5, (VIEWS, *PIXELS)).astype(np.float32)
    return lower, upper


def test_unsmoothed_tew_is_the_trapezoid_of_the_two_windows():
    lower, upper = _windows()
    scatter = tew_scatter(20.8, lower, 19.4, upper, 21.5)
    np.testing.assert_allclose(scatter, (lower / 19.4 + upper / 21.5) * 20.8 / 2, rtol=1e-5)


def test_smoothing_keeps_each_views_counts_and_removes_most_of_the_noise():
    lower, upper = _windows()
    raw = tew_scatter(20.8, lower, 19.4, upper, 21.5)
    smoothed = tew_scatter(20.8, lower, 19.4, upper, 21.5, GEOMETRY, 1.0)
    np.testing.assert_allclose(smoothed.sum(axis=(1, 2)), raw.sum(axis=(1, 2)), rtol=0.01)
    # a Gaussian of 2 pixels' sigma averages some 4 pi sigma^2 = 50 pixels: the noise falls by ~7
    assert smoothed[:, 8:-8, 8:-8].std() < raw.std() / 4
    assert abs(smoothed.mean() - raw.mean()) < 0.01 * raw.mean()


def test_dew_smoothing_works_with_one_window():
    lower, _ = _windows()
    smoothed = tew_scatter(20.8, lower, 19.4, None, None, GEOMETRY, 1.0)
    assert smoothed.shape == lower.shape and smoothed.std() < tew_scatter(20.8, lower, 19.4, None, None).std()


@pytest.mark.parametrize("value", [-1.0, float("nan"), 6.0, True, "1"])
def test_a_bad_scatter_smoothing_is_refused_before_any_file_is_read(value):
    with pytest.raises(SSPECTError, match="scatter smoothing"):
        check_settings(Settings(scatter_smoothing_cm=value))


@pytest.fixture(scope="module")
def low_count_study(tmp_path_factory):
    """The demo phantom at 2 s per view: few counts in each scatter-window pixel."""
    with contextlib.redirect_stdout(io.StringIO()):
        return write_demo_study(tmp_path_factory.mktemp("low_counts"), seed=1, n_views=24, shape=(32, 32, 32),
                                voxel_mm=12.0, frame_duration_s=2.0)


def _total_error_pct(study, smoothing_cm):
    settings = Settings(method="osem", params={"iterations": 4, "subsets": 6}, device="cpu",
                        calibration_cps_per_MBq=study["sensitivity_cps_per_mbq"], scatter_smoothing_cm=smoothing_cm)
    with contextlib.redirect_stdout(io.StringIO()):
        image, provenance = reconstruct_study(load_study(study["nm"], study["ct"], settings), settings)
    assert provenance["scatter_smoothing_cm"] == smoothing_cm
    truth = study["truth"]
    true_MBq = truth.array.sum() * np.prod(truth.spacing) / 1000
    return 100 * (image.array.sum() * np.prod(image.spacing) / 1000 / 1e6 / true_MBq - 1)


def test_at_low_counts_the_default_smoothing_keeps_the_total_that_the_raw_estimate_inflates(low_count_study):
    smoothed = _total_error_pct(low_count_study, Settings().scatter_smoothing_cm)
    raw = _total_error_pct(low_count_study, 0.0)
    assert abs(smoothed) < 2.0, f"total {smoothed:+.2f} % with the default smoothing"
    assert raw > 3 * abs(smoothed), f"unsmoothed {raw:+.2f} % against smoothed {smoothed:+.2f} %"


def test_the_cli_and_the_job_file_take_the_smoothing(low_count_study, tmp_path, capsys):
    job = {"version": 1, "nm": [str(low_count_study["nm"])], "ct": str(low_count_study["ct"]), "output_dir": str(tmp_path / "job"),
           "method": "osem", "params": {"iterations": 1, "subsets": 2}, "device": "cpu", "formats": ["nrrd"],
           "scatter_smoothing_cm": 0.5}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    assert main(["run-job", str(path)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = next(e for e in events if e["event"] == "result")
    assert result["provenance"]["scatter_smoothing_cm"] == 0.5
    report = next(Path(f) for f in result["files"].values() if str(f).endswith("_report.md")).read_text()
    assert "TEW scatter correction, its estimate smoothed by a 0.5 cm Gaussian in each view" in report
    assert main(["reconstruct", "--nm", str(low_count_study["nm"]), "--out", str(tmp_path / "cli"), "--iterations", "1",
                 "--subsets", "2", "--device", "cpu", "--formats", "nrrd", "--scatter-smoothing", "9"]) == 2
    assert "scatter smoothing" in capsys.readouterr().err
