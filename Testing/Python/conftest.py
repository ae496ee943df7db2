"""Shared fixtures: the real study in ../shared (skipped when absent) and small simulated studies."""
import os
from pathlib import Path

import pytest

# The suite runs as two pytest-xdist workers on a 2-core machine: one OpenMP thread each, set before torch loads,
# because two workers of two threads each make small problems crawl (see one_torch_thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[2]
REAL_STUDY = REPO.parent / "shared" / "data" / "lu177_ge670"


@pytest.fixture(scope="session")
def real_study():
    if not (REAL_STUDY / "NM" / "bed1_projections.dcm").exists():
        pytest.skip("the real 177Lu study is not beside the repository (../shared/data/lu177_ge670)")
    return {"nm": str(REAL_STUDY / "NM" / "bed1_projections.dcm"), "ct": str(REAL_STUDY / "CT")}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small problems on one thread: two OpenMP threads on a busy 2-core machine make them crawl
    (measured here: 0.24 s on one thread, 27 s on two while another process used the CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """A small simulated GE-layout 177Lu SPECT/CT written as DICOM (32^3 voxels of 12 mm, 24 views)."""
    import contextlib
    import io

    from sspect.sim.dicom_writer import write_demo_study

    folder = tmp_path_factory.mktemp("small_study")
    with contextlib.redirect_stdout(io.StringIO()):
        return write_demo_study(folder, seed=1, n_views=24, shape=(32, 32, 32), voxel_mm=12.0)


@pytest.fixture(scope="module")
def study(small_study):
    """The small study read through the engine's door, as the methods' tests start from it."""
    import contextlib
    import io

    from sspect.pipeline import Settings, load_study

    with contextlib.redirect_stdout(io.StringIO()):
        return load_study(small_study["nm"], small_study["ct"], Settings(device="cpu"))


@pytest.fixture(scope="module")
def problem(study):
    """Its reconstruction problem (attenuation + PSF + TEW scatter) on the CPU."""
    import contextlib
    import io

    from sspect.pipeline import bed_problem

    with contextlib.redirect_stdout(io.StringIO()):
        return bed_problem(study, device="cpu")


@pytest.fixture(scope="module")
def run_with_defaults(problem):
    """Runs a method at its default parameters on the small study (the run a user gets): result, events, seconds."""
    import time

    from sspect.methods import Events, get_method

    def run(name: str) -> dict:
        events = []
        started = time.perf_counter()
        result = get_method(name).reconstruct(problem, {}, Events(events.append))
        return {"result": result, "events": events, "seconds": time.perf_counter() - started}

    return run


@pytest.fixture
def stop_after():
    """A factory of Events that ask a method to stop after n progress events (and the events seen)."""
    from sspect.methods import Events

    def make(n_progress: int):
        seen = []

        def on_event(event):
            if event["event"] == "progress":
                seen.append(event)

        return Events(on_event, should_stop=lambda: len(seen) >= n_progress), seen

    return make


@pytest.fixture(scope="module")
def to_mbq_per_ml(small_study, study):
    """Counts per voxel of the small study -> MBq/mL, the truth's unit (the engine's calibration)."""
    import numpy as np

    from sspect.pipeline import bq_per_ml_factor

    bed = study.beds[0]
    voxel_ml = float(np.prod(bed.object_spacing_mm)) / 1000.0
    return bq_per_ml_factor(small_study["sensitivity_cps_per_mbq"], bed.frame_duration_s, voxel_ml) / 1e6


NOISY_SHARE = 0.1


@pytest.fixture(scope="module")
def noisy_problem(problem):
    """The small study with a tenth of its counts, binomially thinned (still Poisson), where noise
    dominates; images of it are on a scale 1/NOISY_SHARE smaller (``noisy_to_mbq_per_ml``)."""
    import dataclasses

    from sspect.methods.toolkit.counts import split_counts

    kept, _ = split_counts(problem.projections, 1 - NOISY_SHARE, seed=7)
    return dataclasses.replace(problem, projections=kept, scatter=problem.scatter * NOISY_SHARE)


@pytest.fixture(scope="module")
def noisy_to_mbq_per_ml(to_mbq_per_ml):
    return to_mbq_per_ml / NOISY_SHARE


def _harness_torso(tmp_path_factory, grid: str, seed: int, seconds: float) -> dict:
    """A harness torso on ``grid``: its problem, truth (MBq/mL) and the factor from counts per voxel to MBq/mL."""
    import contextlib
    import io

    from sspect.eval.harness import GRIDS, PhantomSpec, training_problems
    from sspect.pipeline import bq_per_ml_factor

    config, spec = GRIDS[grid], PhantomSpec("torso", seed=seed)
    with contextlib.redirect_stdout(io.StringIO()):
        (problem,) = training_problems([spec], config, seconds, tmp_path_factory.mktemp(f"{grid}_torso"))
    voxel_ml = (config.voxel_mm / 10) ** 3
    to_mbq_per_ml = bq_per_ml_factor(config.sensitivity_cps_per_MBq, seconds, voxel_ml) / 1e6
    return {"problem": problem, "truth": spec.build(config).activity, "to_mbq_per_ml": to_mbq_per_ml}


@pytest.fixture(scope="session")
def coarse_torso(tmp_path_factory):
    """A torso on the coarse harness grid (8.8 mm) that the 8.8 mm networks never saw (seed 7; trained on seeds
    1000-1151), 40 s/view."""
    return _harness_torso(tmp_path_factory, "coarse", 7, 40.0)


@pytest.fixture(scope="session")
def standard_torso(tmp_path_factory):
    """A torso on the standard harness grid (4.42 mm, 60 views) that the 4.4 mm network never saw (seed 8; trained on
    seeds 2000-2029), 20 s/view."""
    return _harness_torso(tmp_path_factory, "standard", 8, 20.0)
