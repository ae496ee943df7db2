"""The validation harness: cases through the DICOM door, Dask equals serial, physics sanity."""
import pytest

from sspect.eval.benchmark import parse_methods, parse_phantoms, run_benchmark
from sspect.eval.harness import HarnessConfig, PhantomSpec, build_cases, run_cases, simulate_expected

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 13.3 mm voxels (3x the real pixel): coarse, but the same physics and door, in seconds
SMALL = HarnessConfig(voxel_mm=13.2588, n_views=24, radius_mm=260.0, nema_shape=(24, 24, 16), torso_shape=(24, 24, 32))
OSEM = parse_methods("osem:iterations=3:subsets=4")


def _rows(results):
    return [row for result in results for row in result.rows]


def test_dask_on_two_loopback_workers_equals_a_serial_run(tmp_path):
    cases = build_cases([PhantomSpec("nema", ratio=8)], [20.0], OSEM, realisations=2)
    serial = _rows(run_cases(cases, SMALL, tmp_path / "serial", workers=0))
    done = []
    distributed = _rows(run_cases(cases, SMALL, tmp_path / "dask", workers=2, on_done=done.append))
    assert len(done) == len(cases)
    assert [r["realisation"] for r in distributed] == [r["realisation"] for r in serial]
    for a, b in zip(serial, distributed):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float) and key != "run_time_s":
                # float32 images agree to rounding (summation order may differ between processes)
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-4, nan_ok=True), key


def test_counts_scale_with_acquisition_time(tmp_path):
    cases = build_cases([PhantomSpec("nema", ratio=4)], [5.0, 20.0], OSEM, realisations=1)
    short, long = _rows(run_cases(cases, SMALL, tmp_path, workers=0))
    assert long["photopeak_counts"] / short["photopeak_counts"] == pytest.approx(4.0, rel=0.02)


def test_noiseless_simulation_with_many_iterations_recovers_large_regions(tmp_path):
    """No noise, 2x finer simulation grid, many OSEM iterations: big uniform regions come back."""
    from sspect.eval.metrics import region_masks
    from sspect.methods import Events
    from sspect.pipeline import Settings, load_study, reconstruct_study
    from sspect.sim.dicom_writer import write_ct_series, write_nm_tomo

    spec = PhantomSpec("torso", seed=3)
    simulated = simulate_expected(spec, SMALL)
    truth, expected = simulated["truth"], simulated["expected"]
    scale = SMALL.sensitivity_cps_per_MBq * 20.0
    ct = write_ct_series(tmp_path / "CT", truth.hu_volume, "1.2.3.4", "1.2.3.5")
    peak, lower, upper = expected.windows
    nm = write_nm_tomo(tmp_path / "NM" / "p.dcm", [scale * expected.peak, scale * expected.upper, scale * expected.lower],
                       [peak, upper, lower], expected.angles_deg, expected.radii_cm, SMALL.voxel_mm, truth.origin,
                       frame_duration_s=20.0, study_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5")
    settings = Settings(method="osem", params={"iterations": 30, "subsets": 4}, device="cpu",
                        calibration_cps_per_MBq=SMALL.sensitivity_cps_per_MBq)
    image, _ = reconstruct_study(load_study(nm, ct, settings), settings, Events())
    activity = image.array / 1e6
    masks = region_masks(truth)
    total_error = activity.sum() / truth.activity.sum() - 1
    assert abs(total_error) < 0.05, f"total activity off by {total_error:+.1%}"
    liver = masks["liver"]
    from scipy.ndimage import binary_erosion
    core = binary_erosion(liver, iterations=1)
    assert core.sum() > 5
    assert activity[core].mean() / truth.activity[core].mean() == pytest.approx(1.0, abs=0.1)


def test_benchmark_command_writes_csv_report_and_figures(tmp_path):
    report = run_benchmark("nema8,torso1", "5,20", "osem:iterations=3:subsets=4", realisations=2,
                           out=tmp_path, workers=0, config=SMALL)
    text = report.read_text()
    assert "| s/view | method |" in text and "RC 37 mm" in text and "bias %" in text
    for name in ("results.csv", "curves.csv", "recovery_vs_sphere_size.png", "panels_nema8to1.png", "panels_torso1.png"):
        assert (tmp_path / name).exists(), name
    import csv
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 * 2 * 2  # phantoms x count levels x realisations
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert {int(r["iteration"]) for r in curves} == {1, 2, 3}
    # each iterate's NRMSE (a method's path, for its best point): the last one is the final image's
    key = lambda r: (r["phantom"], r["seconds_per_view"], r["realisation"])
    last = {key(r): float(r["nrmse"]) for r in curves if r["iteration"] == "3"}
    assert all(float(r["nrmse"]) == pytest.approx(last[key(r)], rel=1e-5) for r in rows)


def test_phantom_and_method_specs_are_parsed_and_refused_clearly():
    from sspect.errors import SSPECTError

    assert [s.name for s in parse_phantoms("nema4,torso7")] == ["nema4to1", "torso7"]
    assert parse_methods("bsrem:beta=0.5")[0][1]["beta"] == 0.5
    with pytest.raises(SSPECTError, match="Unknown phantom"):
        parse_phantoms("cardiac")
    with pytest.raises(SSPECTError, match="name=value"):
        parse_methods("osem:iterations")
    with pytest.raises(SSPECTError, match="Unknown phantom"):
        parse_phantoms("torso1.5")


def test_a_dotatate_torso_is_the_same_patient_with_the_other_tracer():
    import numpy as np

    psma, dotatate = parse_phantoms("torso3,dotatate3")
    assert (psma.name, dotatate.name) == ("torso3", "dotatate3")
    psma, dotatate = psma.build(SMALL), dotatate.build(SMALL)
    spleen, kidney = (psma.labels == psma.label_names[name] for name in ("spleen", "kidney_left_cortex"))
    # the same body and organs (the lesions are drawn at each tracer's own sites)
    assert np.array_equal(psma.labels > 0, dotatate.labels > 0)
    assert np.array_equal(spleen, dotatate.labels == dotatate.label_names["spleen"])
    # DOTATATE (somatostatin receptors) takes up in the spleen far more than PSMA, relative to the kidneys
    assert dotatate.activity[spleen].mean() / dotatate.activity[kidney].mean() > \
        2 * psma.activity[spleen].mean() / psma.activity[kidney].mean()


def test_dataset_command_writes_cases_and_a_manifest(tmp_path):
    import hashlib
    import json

    from sspect.training.dataset import run_dataset
    from sspect.io.volume_files import read_image

    manifest_path = run_dataset(2, tmp_path, first_seed=5, workers=0, osem="iterations=2:subsets=4", config=SMALL)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["n"] == 2 and [c["phantom_seed"] for c in manifest["cases"]] == [5, 6]
    for case in manifest["cases"]:
        truth = read_image(tmp_path / case["files"]["truth"])
        osem = read_image(tmp_path / case["files"]["osem"])
        assert truth.unit == "MBq/mL" and osem.array.shape == truth.array.shape
        total_error = abs(osem.array.sum() / truth.array.sum() - 1)
        assert total_error < 0.25  # 2 OSEM iterations of a noisy study: the totals agree roughly
        for kind, digest in case["sha256"].items():
            assert hashlib.sha256((tmp_path / case["files"][kind]).read_bytes()).hexdigest() == digest
        assert (tmp_path / case["files"]["nm"]).exists() and "liver" in case["label_names"]


def test_report_is_rebuilt_from_the_csv_files(tmp_path):
    from sspect.eval.benchmark import rebuild_report

    first = run_benchmark("nema4", "20", "osem:iterations=2:subsets=4", realisations=2, out=tmp_path, workers=0,
                          config=SMALL).read_text()
    (tmp_path / "recovery_vs_sphere_size.png").unlink()
    rebuilt = rebuild_report(tmp_path, "sspect benchmark --from-csv").read_text()
    assert (tmp_path / "recovery_vs_sphere_size.png").exists()
    table = lambda text: text[text.index("## Medians"):text.index("## Figures")]
    assert table(rebuilt) == table(first)
    assert "report rebuilt with `sspect benchmark --from-csv`" in rebuilt
    # the grid is read back from config.json: a report of a non-default grid is redrawn on that grid
    import json
    assert json.loads((tmp_path / "config.json").read_text())["voxel_mm"] == SMALL.voxel_mm


def test_runs_of_two_method_groups_merge_into_one_report_on_identical_draws(tmp_path):
    import csv

    from sspect.errors import SSPECTError
    from sspect.eval.benchmark import merge_reports

    run_benchmark("nema4", "20", "osem:iterations=2:subsets=4", realisations=2, out=tmp_path / "a", workers=0, config=SMALL)
    run_benchmark("nema4", "20", "bsrem:iterations=2:subsets=4:beta=0.3", realisations=2, out=tmp_path / "b", workers=0,
                  config=SMALL)
    text = merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", "sspect benchmark --merge a,b").read_text()
    assert "osem 2x4" in text and "bsrem 2x4 beta=0.3" in text and "a: Made with" in text and "b: Made with" in text
    rows = list(csv.DictReader(open(tmp_path / "merged" / "results.csv")))
    assert len(rows) == 4
    counts = {(r["method"].split()[0], r["realisation"]): r["photopeak_counts"] for r in rows}
    assert counts["osem", "0"] == counts["bsrem", "0"] and counts["osem", "1"] == counts["bsrem", "1"]  # same Poisson draws
    assert (tmp_path / "merged" / "panels_nema4to1_a.png").exists() and (tmp_path / "merged" / "panels_nema4to1_b.png").exists()
    run_benchmark("nema4", "20", "osem:iterations=2:subsets=4", realisations=1, out=tmp_path / "c", workers=0,
                  config=HarnessConfig(voxel_mm=SMALL.voxel_mm, n_views=12, nema_shape=SMALL.nema_shape))
    with pytest.raises(SSPECTError, match="different grids"):
        merge_reports([tmp_path / "a", tmp_path / "c"], tmp_path / "bad", "sspect benchmark --merge a,c")


def test_short_labels_name_what_differs_between_methods():
    from sspect.eval.report import short_label

    assert short_label("bsrem beta=0.3 iterations=6 subsets=6") == "bsrem 6x6 beta=0.3"
    assert short_label("dip features=16 steps=300 seed=0") == "dip"
    assert short_label("n2n domain=projection seed=0") == "n2n projection"
    assert short_label("dl-bpf weights=/w.safetensors") == "dl-bpf pretrained"


def test_pretrain_command_trains_on_simulated_scans_and_records_them(tmp_path):
    """`sspect pretrain`'s work: harness scans (no truth) -> a DL-BPF network whose header names its data."""
    from sspect.training.dl_bpf import pretrain_dl_bpf
    from sspect.eval.harness import training_problems

    problems = training_problems(parse_phantoms("torso1,torso2"), SMALL, [5.0, 20.0], tmp_path / "scans")
    totals = [float(p.projections.sum()) for p in problems]
    assert all(p.object_meta.dr[0] * 10 == pytest.approx(SMALL.voxel_mm) for p in problems) and totals[1] > 2 * totals[0]
    metadata = pretrain_dl_bpf("torso1,torso2", "5,20", tmp_path / "net.safetensors", steps=2, pretrain_steps=2,
                               features=4, config=SMALL, command="sspect pretrain --test")
    data = metadata["training"]["data"]
    assert data["phantoms"] == ["torso1", "torso2"] and data["seconds_per_view"] == [5.0, 20.0]
    assert data["command"] == "sspect pretrain --test" and (tmp_path / "net.safetensors").stat().st_size > 0
