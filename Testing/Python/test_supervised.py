"""Supervised networks (post-unet, unrolled-mapem): training, checkpoints and resume, DDP, weights files.

A tiny dataset of three simulated torso scans (24 x 24 x 32 voxels of 13.3 mm, 24 views; two
to train on, one held out), tiny networks and a few steps on one thread.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sspect.errors import SSPECTError
from sspect.eval.harness import HarnessConfig
from sspect.methods import Cancelled, Events, get_method
from sspect.physics.differentiable import back_project, back_project_differentiable
from sspect.methods.supervised import KINDS, build_model
from sspect.pipeline import Settings, bed_problem, load_study
from sspect.training.supervised import TrainSettings, batch_indices, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = HarnessConfig(voxel_mm=13.2588, n_views=24, radius_mm=260.0, nema_shape=(24, 24, 16), torso_shape=(24, 24, 32))
NRMSE_BOUND_4MM = 0.9  # of the OSEM start's NRMSE
CHECKERBOARD_BOUND_4MM = 4.0  # of the OSEM start's checkerboard index
TINY = dict(steps=8, batch_size=2, features=4, validation_cases=1, validation_interval=4, checkpoint_interval=4,
            start_subsets=4, learning_rate=3e-3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from sspect.training.dataset import run_dataset

    folder = tmp_path_factory.mktemp("dataset")
    run_dataset(3, folder, first_seed=5, seconds_per_view=[20.0, 80.0], workers=0, osem="iterations=2:subsets=4",
                config=SMALL, tracers=("PSMA", "DOTATATE"))
    return folder


@pytest.fixture(scope="module")
def held_out_problem(dataset):
    """The held-out case's problem, read through the engine's door."""
    case = json.loads((dataset / "manifest.json").read_text())["cases"][-1]
    with contextlib.redirect_stdout(io.StringIO()):
        return bed_problem(load_study(dataset / case["files"]["nm"], dataset / case["files"]["ct"], Settings(device="cpu")),
                           device="cpu")


def _train(dataset, folder, kind, **changes):
    events = []
    path = train(dataset, folder, TrainSettings(kind=kind, **{**TINY, **changes}), Events(events.append))
    return path, events


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """Both networks trained TINY on the dataset, by kind."""
    trained = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        path, events = _train(dataset, folder, kind)
        trained[kind] = {"kind": kind, "path": path, "folder": folder, "events": events}
    return trained


def _checkpoint_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint.safetensors"))


# ---------------------------------------------------------------- the projector layer the unrolled network needs


def test_back_projection_layer_is_differentiable_with_the_forward_projection_as_its_transpose(held_out_problem):
    system_matrix = held_out_problem.system_matrix
    generator = torch.Generator().manual_seed(0)
    g = torch.rand(held_out_problem.projections.shape, generator=generator, dtype=torch.float32).requires_grad_(True)
    v = torch.rand(tuple(held_out_problem.object_meta.shape), generator=generator, dtype=torch.float32)
    image = back_project_differentiable(g, system_matrix)
    assert torch.equal(image.detach(), back_project(g.detach(), system_matrix))
    (image * v).sum().backward()  # d<A^T g, v>/dg = A v
    expected = system_matrix.forward(v)
    assert torch.allclose(g.grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_records_validation(runs, kind):
    trained = runs[kind]
    losses = [e["loss"] for e in trained["events"] if e.get("stage") == "train"]
    assert len(losses) == TINY["steps"]
    assert losses[-1] < 0.97 * losses[0]  # the same two cases every step: the loss must fall
    description = json.loads(trained["path"].with_suffix(".json").read_text())
    history = description["training"]["history"]
    assert [h["step"] for h in history] == [4, 8]
    best = min(history, key=lambda h: h["loss"])
    assert description["validation"]["step"] == best["step"] == description["training"]["best_step"]
    assert description["validation"]["cases"] == ["torso7_20s_r0"]  # the held-out (last) case, never trained on
    assert set(description["training"]["data"]["training_cases"]) == {"torso5_20s_r0", "dotatate6_80s_r0"}
    validation = description["validation"]
    assert description["training"]["settings"]["lesion_weight"] == 1.0  # the default loss weighs the lesions
    assert validation["lesion_abs_error_pct_median"] >= 0 and validation["start_osem_lesion_abs_error_pct_median"] > 0


def test_a_network_trained_with_resize_upsampling_says_so_and_reloads_as_one(dataset, held_out_problem, tmp_path):
    """Resize upsampling (no transposed convolutions: no checkerboard) travels in the file's architecture."""
    path, _ = _train(dataset, tmp_path, "post-unet", steps=2, validation_interval=2, upsampling="resize")
    description = json.loads(path.with_suffix(".json").read_text())
    assert description["architecture"]["upsampling"] == "resize"
    result = get_method("post-unet").reconstruct(held_out_problem, {"weights": str(path)})
    assert np.all(np.isfinite(result.image)) and result.image.min() >= 0


def test_the_dataset_takes_tracers_and_count_levels_in_turn(dataset):
    from sspect.training.dataset import run_dataset

    cases = json.loads((dataset / "manifest.json").read_text())["cases"]
    assert [(c["tracer"], c["seconds_per_view"]) for c in cases] == [("PSMA", 20.0), ("DOTATATE", 80.0), ("PSMA", 20.0)]
    with pytest.raises(SSPECTError, match="Unknown tracer 'FDG'"):
        run_dataset(1, dataset.parent / "fdg", tracers=("FDG",), workers=0, config=SMALL)


def test_the_lesion_term_is_each_lesions_relative_activity_error_squared():
    """Two lesions, one at half its activity and one right: (0.5^2 + 0) / 2, whatever the rest of the image."""
    from sspect.methods.toolkit.losses import lesion_mean_error_squared

    truth = torch.ones(6, 6, 6)
    first, second = torch.zeros(6, 6, 6, dtype=torch.bool), torch.zeros(6, 6, 6, dtype=torch.bool)
    first[1:3, 1:3, 1:3], second[4:6, 4:6, 4:6] = True, True
    image = truth.clone()
    image[first] = 0.5
    image[0] = 7.0  # outside both lesions: not this term's business
    assert float(lesion_mean_error_squared(image, truth, [first, second])) == pytest.approx(0.125)
    assert float(lesion_mean_error_squared(image, truth, [])) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_weights_file_describes_the_network_and_its_data(runs, kind, dataset):
    trained = runs[kind]
    import hashlib

    from safetensors import safe_open

    description = json.loads(trained["path"].with_suffix(".json").read_text())
    with safe_open(str(trained["path"]), framework="pt") as handle:
        header = handle.metadata()
    assert json.loads(header["voxel_mm"]) == description["voxel_mm"] == pytest.approx([13.2588] * 3)
    assert description["kind"] == trained["kind"] and description["isotope"] == "177Lu"
    assert description["collimator"] == "GI-MEGP" and description["energy_window_keV"][0] < 208 < description["energy_window_keV"][1]
    assert description["matrices"] == [[24, 24, 32]]
    manifest_sha = hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()
    assert description["training"]["data"]["manifest_sha256"] == manifest_sha
    assert description["code_version"].startswith("sspect ")
    assert description["start_osem"] == {"iterations": 4, "subsets": 4}


@pytest.mark.parametrize("kind", KINDS)
def test_saved_network_reloads_to_identical_outputs(runs, kind, held_out_problem):
    trained = runs[kind]
    from safetensors.torch import load_file

    method = get_method(trained["kind"])
    first = method.reconstruct(held_out_problem, {"weights": str(trained["path"])})
    second = method.reconstruct(held_out_problem, {"weights": str(trained["path"])})
    assert np.array_equal(first.image, second.image)
    # the same weights put into a new network by hand give the same image
    from sspect.methods.supervised import Scan

    architecture = json.loads(trained["path"].with_suffix(".json").read_text())["architecture"]
    assert architecture["upsampling"] == "resize"  # sspect train's default: no checkerboard
    model = build_model(trained["kind"], TINY["features"], 2, upsampling="resize")
    model.load_state_dict(load_file(str(trained["path"])))
    with torch.no_grad():
        by_hand = model.eval()(Scan(held_out_problem, 4, 4, True)).numpy()
    assert np.array_equal(first.image, by_hand)
    assert first.info["weights_sha256"] == json.loads(trained["path"].with_suffix(".json").read_text())["sha256"]
    assert abs(first.image.sum() / held_out_problem.projections.sum().item() - 1) < 10  # a finite, positive image
    assert first.image.min() >= 0


def test_a_stopped_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(dataset, runs, tmp_path):
    trained = runs["post-unet"]
    steps = []

    def stop_after_six(event):
        steps.append(event.get("step"))
        return event.get("stage") == "train" and event.get("step") == 6

    stopped = {"now": False}

    def on_event(event):
        stopped["now"] = stop_after_six(event)

    with pytest.raises(Cancelled):
        train(dataset, tmp_path, TrainSettings(kind="post-unet", **TINY), Events(on_event, lambda: stopped["now"]))
    assert json.loads(_read_record(tmp_path))["step"] == 4  # the last checkpoint before the stop
    train(dataset, tmp_path, TrainSettings(kind="post-unet", **TINY), resume=True)
    resumed, uninterrupted = _checkpoint_tensors(tmp_path), _checkpoint_tensors(trained["folder"])
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    # a finished run can be extended: more steps continue from the checkpoint
    train(dataset, tmp_path, TrainSettings(kind="post-unet", **{**TINY, "steps": 9}), resume=True)
    assert json.loads(_read_record(tmp_path))["step"] == 9


def _read_record(folder: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(folder / "checkpoint.safetensors"), framework="pt") as handle:
        return handle.metadata()["record"]


def test_batches_are_a_function_of_seed_and_step():
    first_epoch = batch_indices(5, 5, seed=3, step=1)
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]  # an epoch sees every case once
    assert batch_indices(5, 2, seed=3, step=2) == batch_indices(5, 2, seed=3, step=2)
    assert batch_indices(5, 5, seed=4, step=1) != first_epoch


def test_two_processes_under_torchrun_give_the_single_process_network(dataset, held_out_problem, tmp_path):
    """DistributedDataParallel (gloo): each process takes one case of the batch of two; averaged gradients.

    Compared by what the networks compute: a convolution's bias just before an instance norm has a
    gradient of zero in exact arithmetic, so Adam turns its rounding noise into steps of the
    learning rate's size, which move no output."""
    single = tmp_path / "single"
    train(dataset, single, TrainSettings(kind="post-unet", **{**TINY, "steps": 3, "validation_interval": 3}))
    double = tmp_path / "double"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "sspect",
         "train", "--data", str(dataset), "--kind", "post-unet", "--steps", "3", "--batch-size", "2", "--features", "4",
         "--validation-cases", "1", "--validation-interval", "3", "--checkpoint-interval", "4",
         "--learning-rate", "3e-3", "--start-subsets", "4", "--out", str(double)],
        capture_output=True, text=True, env=environment, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Network written" in completed.stdout
    one, two = (get_method("post-unet").reconstruct(held_out_problem, {"weights": str(run / "model.safetensors")}).image
                for run in (single, double))
    assert np.allclose(one, two, rtol=1e-5, atol=1e-6 * float(np.abs(one).max()))
    description = json.loads((double / "model.json").read_text())
    assert description["training"]["processes"] == 2


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", KINDS)
def test_a_study_that_does_not_match_the_training_data_is_refused(runs, kind, held_out_problem, tmp_path):
    trained = runs[kind]
    method = get_method(trained["kind"])
    weights = {"weights": str(trained["path"])}
    finer = copy.copy(held_out_problem.object_meta)
    finer.dr = tuple(d / 2 for d in held_out_problem.object_meta.dr)
    other_kind = "unrolled-mapem" if trained["kind"] == "post-unet" else "post-unet"
    cases = [
        (dataclasses.replace(held_out_problem, collimator_code="SY-ME"), "GI-MEGP collimator.*acquired with SY-ME"),
        (dataclasses.replace(held_out_problem, object_meta=finer), r"13.2588.*mm voxels.*6.6294.*more than 10%"),
        (dataclasses.replace(held_out_problem, peak_window_keV=(126.0, 154.0)), "177Lu.*126-154 keV"),
        (dataclasses.replace(held_out_problem, attenuation_map=None), "needs the CT"),
    ]
    for problem, message in cases:
        with pytest.raises(SSPECTError, match=message) as caught:
            method.reconstruct(problem, weights)
        assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")
    with pytest.raises(SSPECTError, match=f"is a {trained['kind']} network, not {other_kind}"):
        get_method(other_kind).reconstruct(held_out_problem, weights)
    damaged = bytearray(trained["path"].read_bytes())
    damaged[-1] ^= 0xFF
    (tmp_path / "damaged.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(SSPECTError, match="sha256"):
        method.reconstruct(held_out_problem, {"weights": str(tmp_path / "damaged.safetensors")})


def test_training_refuses_bad_requests_in_one_sentence(dataset, runs, tmp_path):
    trained = runs["post-unet"]
    requests = [
        (dict(folder=tmp_path / "absent", data=tmp_path / "nothing"), "does not exist"),
        (dict(folder=trained["folder"], data=dataset), "already holds a training run.*--resume"),
        (dict(folder=tmp_path / "new", data=dataset, resume=True), "no checkpoint"),
        (dict(folder=tmp_path / "few", data=dataset, validation_cases=3), "3 validation case"),
        (dict(folder=tmp_path / "odd", data=dataset, kind="gan"), "Unknown supervised network"),
        (dict(folder=tmp_path / "negative", data=dataset, lesion_weight=-1.0), "lesion weight is -1"),
        (dict(folder=tmp_path / "bilinear", data=dataset, upsampling="bilinear"), "Unknown upsampling 'bilinear'"),
    ]
    for request, message in requests:
        changes = {k: v for k, v in request.items() if k not in ("folder", "data", "resume", "kind")}
        with pytest.raises(SSPECTError, match=message) as caught:
            train(request["data"], request["folder"], TrainSettings(kind=request.get("kind", "post-unet"), **{**TINY, **changes}),
                  resume=request.get("resume", False))
        assert str(caught.value).endswith(".")
    other = TrainSettings(kind="post-unet", **{**TINY, "learning_rate": 1e-2})
    with pytest.raises(SSPECTError, match="other settings"):
        train(dataset, trained["folder"], other, resume=True)
    # a truth file changed after the manifest was written: refused, not trained on
    import shutil

    copied = shutil.copytree(dataset, tmp_path / "copied")
    case = json.loads((copied / "manifest.json").read_text())["cases"][-1]
    truth = copied / case["files"]["truth"]
    truth.write_bytes(truth.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(SSPECTError, match=f"{case['case']} changed since the manifest"):
        train(copied, tmp_path / "changed", TrainSettings(kind="post-unet", **TINY))


# ---------------------------------------------------------------- the shipped networks


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_network_is_small_described_and_verified(kind):
    from sspect.methods.supervised import SHIPPED
    from sspect.methods.toolkit.weights import shipped_networks

    networks = shipped_networks(SHIPPED[kind])
    assert 8.8392 in networks  # the coarse one, for --binning 2, is kept
    for voxel, path in networks.items():
        _assert_described(kind, voxel, path)


def _assert_described(kind, voxel, path):
    assert path.stat().st_size < 5e6
    description = json.loads(path.with_suffix(".json").read_text())
    assert description["kind"] == kind and description["isotope"] == "177Lu" and description["collimator"] == "GI-MEGP"
    assert description["voxel_mm"] == pytest.approx([voxel] * 3) and f"{voxel:.1f}mm" in path.name
    data = description["training"]["data"]
    assert len(data["training_cases"]) >= 16 and len(data["validation_cases"]) >= 2
    assert len(data["manifest_sha256"]) == 64 and "sspect train" in description["training"]["command"]
    assert min(data["phantom_seeds"]) >= 1000  # none of the harness's torso phantoms (seeds 0-9)
    validation = description["validation"]
    assert validation["nrmse_median"] < validation["start_osem_nrmse_median"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_clinical_grid_network_is_taken_at_4_4_mm_and_beats_its_osem_start(kind, standard_torso):
    """'shipped' on a 4.42 mm study takes the network trained at 4.4 mm (the lesion-weighted loss, resize upsampling)
    and, on a torso it never saw at clinical counts, its NRMSE is well below that of its OSEM start (0.68-0.76 of it on
    the harness torsos, docs/clinical-grid-report/supervised-standard), it erases lesions no more than that start does,
    and it paints no checkerboard: its Nyquist peak is near the truth's own (about 2.5 and 2 times OSEM's start; the
    transposed-convolution networks shipped before were 5.7 and 9.6 times)."""
    from sspect.eval.metrics import checkerboard_index, nrmse, region_masks
    from sspect.eval.harness import GRIDS, PhantomSpec
    from sspect.methods.supervised import SHIPPED

    problem, truth, scale = standard_torso["problem"], standard_torso["truth"], standard_torso["to_mbq_per_ml"]
    result = get_method(kind).reconstruct(problem, {})
    start = get_method("osem").reconstruct(problem, {"iterations": 4, "subsets": 6}).image
    assert Path(result.info["weights"]).name == f"{SHIPPED[kind]}_4.4mm.safetensors"
    assert nrmse(result.image * scale, truth) < NRMSE_BOUND_4MM * nrmse(start * scale, truth)
    lesions = {k: m for k, m in region_masks(PhantomSpec("torso", seed=8).build(GRIDS["standard"]), skip_empty=True).items()
               if k.startswith("lesion_")}
    error = lambda image: np.median([abs(image[m].sum() * scale / truth[m].sum() - 1) for m in lesions.values()])
    assert lesions and error(result.image) < error(start) + 0.05
    assert checkerboard_index(result.image) < CHECKERBOARD_BOUND_4MM * checkerboard_index(start)
    assert abs(result.image.sum() / start.sum() - 1) < 1e-4  # the total is OSEM's (float rounding)


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_network_beats_its_osem_start_on_a_torso_it_never_saw(kind, coarse_torso):
    from sspect.eval.metrics import nrmse

    problem, truth, scale = coarse_torso["problem"], coarse_torso["truth"], coarse_torso["to_mbq_per_ml"]
    result = get_method(kind).reconstruct(problem, {})
    start = get_method("osem").reconstruct(problem, {"iterations": 4, "subsets": 6}).image
    assert result.info["matrix_seen_in_training"] and result.info["start_osem"] == {"iterations": 4, "subsets": 6}
    assert Path(result.info["weights"]).name.endswith("_8.8mm.safetensors")  # 'shipped' took the one at this voxel size
    network_error, osem_error = nrmse(result.image * scale, truth), nrmse(start * scale, truth)
    assert network_error < 0.95 * osem_error, (network_error, osem_error)
    assert abs(result.image.sum() / start.sum() - 1) < 1e-4  # the total is OSEM's (float rounding)
