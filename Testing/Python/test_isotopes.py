"""Isotopes and collimators as data: registry, detection from the NM file, other isotopes end to end
through ``sspect reconstruct``, multi-photopeak 177Lu, and the isotope options of CLI and job file."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes
from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params

from sspect.cli import main
from sspect.errors import SSPECTError
from sspect.eval.metrics import nrmse
from sspect.io.dicom_export import read_dicom_series
from sspect.jobs import read_job
from sspect.methods import Events
from sspect.physics.collimators import COLLIMATORS, get_collimator
from sspect.physics.isotopes import (ISOTOPES, LUTETIUM_177, detect_isotope, get_isotope, parse_photopeaks,
                                     water_mu_per_cm)
from sspect.physics.operator import PhotopeakStack
from sspect.pipeline import Settings, bed_problem, load_study, reconstruct_study
from sspect.sim.dicom_writer import write_demo_study

ENGINE = Path(__file__).resolve().parents[2] / "SelfSupervisedSPECT"
SMALL = {"n_views": 24, "shape": (32, 32, 32), "voxel_mm": 12.0}


def _quiet(function, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


# ---------------------------------------------------------------- registry
@pytest.mark.parametrize("alias", ["177Lu", "Lu177", "Lu-177", "lu177", " LUTETIUM-177 "])
def test_isotope_aliases_name_one_entry(alias):
    assert get_isotope(alias) is LUTETIUM_177


def test_unknown_isotope_and_collimator_are_refused_naming_the_choices():
    with pytest.raises(SSPECTError, match=r"Unknown isotope 'Xe133'; choose one of 177Lu, 99mTc, 111In, 131I\."):
        get_isotope("Xe133")
    with pytest.raises(SSPECTError, match="Unknown collimator 'LEHR'; choose one of"):
        get_collimator("LEHR")


def test_collimators_by_name_or_pytomography_code_and_in_pytomographys_table():
    assert get_collimator("gi-lehr") is get_collimator("GE-LEHR")
    table = (Path(get_psfmeta_from_scanner_params.__code__.co_filename).parents[2] / "data" / "collim.col").read_text()
    for collimator in COLLIMATORS.values():
        assert f"*{collimator.code} " in table
        assert all(isotope in ISOTOPES for isotope in collimator.isotopes)
    for isotope in ISOTOPES.values():  # every isotope has a collimator made for it, from both vendors
        assert {c.scanner_labels[0][0] for c in COLLIMATORS.values() if c.serves(isotope)} == {"GE", "SIEMENS"}


@pytest.mark.parametrize("name, pydicom_code", [("177Lu", "_177Lutetium"), ("99mTc", "_99mTechnetium"),
                                                ("111In", "_111Indium"), ("131I", "_131Iodine")])
def test_radionuclide_codes_are_pydicoms_cid_18_codes(name, pydicom_code):
    code = getattr(codes.SCT, pydicom_code)
    isotope = get_isotope(name)
    assert (isotope.code_value, isotope.coding_scheme, isotope.code_meaning) == (code.value, code.scheme_designator, code.meaning)


def test_water_mu_comes_from_the_hu_table_and_177Lu_keeps_the_networks_scale():
    assert water_mu_per_cm(208.0) == pytest.approx(0.136, rel=0.01)  # the table's 0.1352
    assert LUTETIUM_177.mu_water_per_cm == 0.136
    assert get_isotope("99mTc").mu_water_per_cm == water_mu_per_cm(140.5) == pytest.approx(0.1538)
    assert get_isotope("131I").mu_water_per_cm == pytest.approx(0.1102)


def test_photopeaks_are_parsed_main_first_and_refused_when_absent():
    assert [p.energy_keV for p in parse_photopeaks(LUTETIUM_177, None)] == [208.0]
    assert [p.energy_keV for p in parse_photopeaks(LUTETIUM_177, "113,208")] == [208.0, 113.0]
    assert [p.energy_keV for p in parse_photopeaks(get_isotope("111In"), None)] == [171.3, 245.4]
    with pytest.raises(SSPECTError, match="177Lu has no photopeak at 300 keV; its photopeaks are 208, 113 keV."):
        parse_photopeaks(LUTETIUM_177, "300")
    with pytest.raises(SSPECTError, match="must be keV values"):
        parse_photopeaks(LUTETIUM_177, "high")


def test_isotope_detection_from_code_then_from_window_centres():
    real_ge_centres = [113.0, 208.0, 240.4, 176.6, 129.5, 96.0]  # shared/data/lu177_ge670: no code in the file
    assert detect_isotope("", real_ge_centres) is LUTETIUM_177
    assert detect_isotope("72454006", real_ge_centres) is get_isotope("99mTc")
    assert detect_isotope("", [140.5, 123.0]) is get_isotope("99mTc")
    assert detect_isotope("", [60.0]) is None


# ---------------------------------------------------------------- other isotopes, end to end
@pytest.fixture(scope="module", params=["99mTc", "131I"])
def other_isotope_study(request, tmp_path_factory):
    isotope = get_isotope(request.param)
    folder = tmp_path_factory.mktemp(f"study_{isotope.name}")
    return isotope, _quiet(write_demo_study, folder, seed=2, isotope=isotope, **SMALL)


def test_simulated_study_of_another_isotope_names_it_and_is_read_with_its_physics(other_isotope_study):
    isotope, written = other_isotope_study
    drug = pydicom.dcmread(written["nm"], stop_before_pixels=True).RadiopharmaceuticalInformationSequence[0]
    assert drug.RadionuclideCodeSequence[0].CodeValue == isotope.code_value
    assert float(drug.RadionuclideHalfLife) == pytest.approx(isotope.half_life_s, rel=1e-6)
    study = _quiet(load_study, written["nm"], written["ct"], Settings(device="cpu"))
    (windows,) = study.peaks
    photopeak = isotope.default_photopeaks[0]
    assert study.isotope is isotope and windows.photopeak_keV == photopeak.energy_keV
    assert (windows.peak.lower_keV, windows.lower.lower_keV, windows.upper.upper_keV) == pytest.approx(
        (photopeak.window.lower_keV, photopeak.lower_scatter.lower_keV, photopeak.upper_scatter.upper_keV), abs=0.01)
    assert study.collimator.serves(isotope) and not study.warnings
    reference = _quiet(bed_problem, study, device="cpu", projector="pytomography")
    mu = reference.attenuation_map.cpu().numpy()
    assert np.median(mu[mu > 0.05]) == pytest.approx(isotope.mu_water_per_cm, rel=0.05)  # mu at its own energy
    psf = reference.system_matrix.obj2obj_transforms[-1].psf_meta
    expected = get_psfmeta_from_scanner_params(study.collimator.code, energy_keV=photopeak.energy_keV,
                                               intrinsic_resolution_140keV=study.collimator.intrinsic_resolution_140keV_cm)
    assert psf.sigma_fit_params == pytest.approx(expected.sigma_fit_params)


@pytest.mark.parametrize("method, params", [("osem", ["--iterations", "2", "--subsets", "4"]),
                                            ("dip", ["--param", "steps=6", "--param", "pretrain_steps=2",
                                                     "--param", "features=4"])])
def test_sspect_reconstruct_exports_the_studys_own_radionuclide(other_isotope_study, tmp_path, method, params):
    isotope, written = other_isotope_study
    environment = {**os.environ, "PYTHONPATH": str(ENGINE), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, "-m", "sspect", "reconstruct", "--nm", str(written["nm"]), "--ct",
                               str(written["ct"]), "--method", method, *params, "--device", "cpu", "--calibration",
                               "9", "--out", str(tmp_path)], capture_output=True, text=True, env=environment)
    assert finished.returncode == 0, finished.stderr[-2000:]
    provenance = json.loads(next(tmp_path.glob("*/*_provenance.json")).read_text())
    assert provenance["isotope"]["name"] == isotope.name
    assert [w["photopeak_keV"] for w in provenance["windows"]] == [isotope.default_photopeaks[0].energy_keV]
    assert provenance["collimator_code"] == written["collimator"] and provenance["unit"] == "Bq/mL"
    exported = pydicom.dcmread(sorted(next(tmp_path.glob("*/*_dicom")).glob("*.dcm"))[0])
    drug = exported.RadiopharmaceuticalInformationSequence[0]
    assert drug.RadionuclideCodeSequence[0].CodeValue == isotope.code_value
    assert float(drug.RadionuclideHalfLife) == pytest.approx(isotope.half_life_s, rel=1e-6)
    image = read_dicom_series(next(tmp_path.glob("*/*_dicom")))
    assert np.isfinite(image.array).all() and image.array.sum() > 0


def test_a_collimator_not_made_for_the_isotope_is_a_warning(other_isotope_study):
    isotope, written = other_isotope_study
    study = _quiet(load_study, written["nm"], None, Settings(collimator="GE-MEGP"))
    assert any(f"not made for {isotope.name}" in w for w in study.warnings)


def test_isotope_detected_from_the_windows_when_the_file_names_none(other_isotope_study, tmp_path):
    isotope, written = other_isotope_study
    ds = pydicom.dcmread(written["nm"])
    del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence
    ds.save_as(tmp_path / "anonymous.dcm")
    assert _quiet(load_study, tmp_path / "anonymous.dcm", None).isotope is isotope


# ---------------------------------------------------------------- multi-photopeak 177Lu
@pytest.fixture(scope="module")
def two_peak_study(tmp_path_factory):
    written = _quiet(write_demo_study, tmp_path_factory.mktemp("lu_two_peaks"), seed=3, photopeaks_keV=(208, 113), **SMALL)
    return written, _quiet(load_study, written["nm"], written["ct"], Settings(photopeaks="113,208", device="cpu"))


def test_both_photopeaks_get_their_own_windows_scatter_and_attenuation(two_peak_study, one_torch_thread):
    written, study = two_peak_study
    assert [w.photopeak_keV for w in study.peaks] == [208.0, 113.0]
    assert all(w.scatter_method == "TEW" for w in study.peaks)
    assert {w.peak.index for w in study.peaks} | {w.lower.index for w in study.peaks} | {w.upper.index for w in study.peaks} == set(range(6))
    problem = _quiet(bed_problem, study, device="cpu")
    assert isinstance(problem.system_matrix, PhotopeakStack) and problem.projections.shape[0] == 48
    assert problem.photopeaks_keV == (208.0, 113.0) and problem.isotope is LUTETIUM_177
    high, low = problem.system_matrix.parts
    assert float(low.attenuation.max()) > 1.1 * float(high.attenuation.max())  # mu at 113 keV, not at 208
    torch.manual_seed(0)
    image, projections = torch.rand(32, 32, 32), torch.rand(48, 32, 32)
    stack = problem.system_matrix
    assert float((stack.forward(image) * projections).sum()) == pytest.approx(float((image * stack.transpose(projections)).sum()), rel=1e-4)
    stack.set_n_subsets(4)
    assert torch.allclose(stack.forward(image, 1), stack.forward(image)[stack.subset_indices_array[1]], atol=1e-5)
    views = np.arange(1, 48, 3)
    assert torch.allclose(stack.select_views(views).forward(image), stack.forward(image)[views], atol=1e-5)
    stack.set_n_subsets(1)


def test_two_photopeaks_reconstruct_one_image_on_the_same_scale(two_peak_study, one_torch_thread):
    written, two = two_peak_study
    one = _quiet(load_study, written["nm"], written["ct"], Settings(device="cpu"))
    settings = Settings(params={"iterations": 3, "subsets": 4}, device="cpu", calibration_cps_per_MBq=9.0)
    images = {}
    for name, study in (("208", one), ("113+208", two)):
        volume, provenance = _quiet(reconstruct_study, study, settings, Events())
        images[name] = volume.array / 1e6
    truth = written["truth"].array
    assert provenance["windows"][1]["photopeak_keV"] == 113.0
    assert images["113+208"].sum() == pytest.approx(images["208"].sum(), rel=0.05)
    assert nrmse(images["113+208"], truth) < 1.1 * nrmse(images["208"], truth)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("argv, words", [(["--isotope", "Xe133"], ["Unknown isotope 'Xe133'"]),
                                         (["--photopeaks", "300"], ["no photopeak at 300 keV"]),
                                         (["--photopeaks", "113,208", "--peak-window", "0"], ["one photopeak"])])
def test_cli_isotope_options_are_refused_in_one_sentence(small_study, tmp_path, capsys, argv, words):
    code = main(["reconstruct", "--nm", str(small_study["nm"]), "--out", str(tmp_path), *argv])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines()[-1].startswith("sspect: ") and all(w in stderr.splitlines()[-1] for w in words), stderr


@pytest.mark.parametrize("key, value, words", [("isotope", 177, "'isotope' must be a name"),
                                               ("photopeaks", "113,208", "'photopeaks' must be a list of keV values"),
                                               ("photopeaks", [True], "'photopeaks\\[0\\]' must be a number")])
def test_job_isotope_keys_are_type_checked(tmp_path, key, value, words):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"nm": ["x.dcm"], "output_dir": str(tmp_path), key: value}))
    with pytest.raises(SSPECTError, match=words):
        read_job(path)
    path.write_text(json.dumps({"nm": ["x.dcm"], "output_dir": str(tmp_path), "isotope": "99mTc", "photopeaks": [140.5]}))
    assert read_job(path).photopeaks == [140.5]
