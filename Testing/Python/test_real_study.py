"""The real GE Discovery 670 177Lu bed: reading, geometry, and parity with PyTomography."""
import contextlib
import io

import numpy as np
import pytest

from sspect.io.ct import read_ct_series, resample
from sspect.io.nm import read_projections
from sspect.pipeline import Settings, load_study, reconstruct_study

pytestmark = pytest.mark.real_data


def test_reads_windows_orbit_and_geometry_like_pytomography(real_study):
    from pytomography.io.SPECT import dicom

    bed = read_projections(real_study["nm"])
    assert [round(w.lower_keV, 1) for w in bed.windows] == [101.7, 187.2, 229.6, 166.9, 124.3, 91.2]
    assert bed.projections.shape == (6, 60, 128, 128)
    assert bed.rotation_directions == ["CC"] and bed.n_detectors == 1
    assert bed.frame_duration_s == 25.0 and bed.collimator == "MEGP"
    object_meta, proj_meta = dicom.get_metadata(real_study["nm"], index_peak=1)
    np.testing.assert_allclose(bed.angles_deg, proj_meta.angles.cpu().numpy(), atol=1e-4)
    np.testing.assert_allclose(bed.radii_cm, np.asarray(proj_meta.radii), atol=1e-5)
    np.testing.assert_allclose(bed.affine, object_meta.affine_matrix)
    direct = dicom.get_projections(real_study["nm"], index_peak=1).cpu().numpy()
    np.testing.assert_array_equal(bed.projections[1], direct)


def test_automatic_windows_pick_photopeak_and_tew(real_study):
    study = load_study(real_study["nm"], None)
    (windows,) = study.peaks
    assert (windows.peak.index, windows.lower.index, windows.upper.index) == (1, 3, 2)
    assert windows.scatter_method == "TEW" and study.collimator.name == "GE-MEGP" and study.isotope.name == "177Lu"


def test_ct_is_read_sorted_in_patient_coordinates(real_study):
    ct = read_ct_series(real_study["ct"])
    assert ct.volume.array.shape == (256, 256, 303)
    np.testing.assert_allclose(ct.volume.spacing, (1.953124, 1.953124, 2.5), atol=1e-5)
    zs = [float(__import__("pydicom").dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in ct.files]
    assert zs == sorted(zs) and ct.volume.origin[2] == zs[0]


@pytest.fixture(scope="module")
def parity_pair(real_study):
    """The engine's OSEM (fast operator) and a direct PyTomography OSEM with the same settings, and the direct
    script's system matrix. One iteration of 6 subsets: every factor of the model enters each update."""
    from pytomography.algorithms import OSEM
    from pytomography.io.SPECT import dicom
    from pytomography.likelihoods import PoissonLogLikelihood
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform
    import pytomography

    settings = Settings(method="osem", params={"iterations": 1, "subsets": 6}, device="cpu")
    study = load_study(real_study["nm"], real_study["ct"], settings)
    engine, provenance = reconstruct_study(study, settings)

    pytomography.device = __import__("torch").device("cpu")
    nm, ct_files = real_study["nm"], study.ct.files
    with contextlib.redirect_stdout(io.StringIO()):
        object_meta, proj_meta = dicom.get_metadata(nm, index_peak=1)
        projections = dicom.get_projections(nm, index_peak=1)
        sigma = settings.scatter_smoothing_cm  # the engine's default smoothing, done here by PyTomography's DICOM reader
        scatter = dicom.get_energy_window_scatter_estimate(nm, index_peak=1, index_lower=3, index_upper=2,
                                                           proj_meta=proj_meta, sigma_r=sigma, sigma_z=sigma)
        mu = dicom.get_attenuation_map_from_CT_slices(ct_files, nm, index_peak=1)
    psf = dicom.get_psfmeta_from_scanner_params("GI-MEGP", energy_keV=208, intrinsic_resolution_140keV=0.38)
    system = SPECTSystemMatrix(obj2obj_transforms=[SPECTAttenuationTransform(mu), SPECTPSFTransform(psf)],
                               proj2proj_transforms=[], object_meta=object_meta, proj_meta=proj_meta)
    direct = OSEM(PoissonLogLikelihood(system, projections, scatter))(1, 6).cpu().numpy()
    assert provenance["projector"] == "fast"
    return engine, direct, study, mu.cpu().numpy(), system


@pytest.mark.slow
def test_engine_osem_equals_direct_pytomography(parity_pair):
    engine, direct, _, _, _ = parity_pair
    nrmse = np.sqrt(np.mean((engine.array - direct) ** 2)) / np.sqrt(np.mean(direct ** 2))
    assert nrmse < 0.01, f"NRMSE {nrmse:.4f}"
    assert engine.unit == "counts"
    np.testing.assert_allclose(engine.affine[:3, 3], [-280.3446, -287.5446, -103.6446], atol=1e-3)


@pytest.mark.slow
def test_fast_forward_projection_equals_direct_pytomography(parity_pair):
    """The fast operator projects the direct script's OSEM image as PyTomography's system matrix does."""
    import torch

    from sspect.pipeline import bed_problem

    _, direct, study, _, system = parity_pair
    with contextlib.redirect_stdout(io.StringIO()):
        fast = bed_problem(study, device="cpu").system_matrix
    image = torch.from_numpy(direct)
    reference = system.forward(image).double()
    nrmse = float((fast.forward(image).double() - reference).norm() / reference.norm())
    assert nrmse < 0.01, f"NRMSE {nrmse:.4f}"


@pytest.mark.slow
def test_attenuation_map_equals_pytomography(parity_pair):
    from sspect.io.ct import attenuation_map

    _, _, study, direct_mu, _ = parity_pair
    with contextlib.redirect_stdout(io.StringIO()):
        mu = attenuation_map(study.ct, study.beds[0], 208.0)
    np.testing.assert_allclose(mu, direct_mu, atol=1e-5)


@pytest.mark.slow
def test_activity_lies_inside_the_patient_on_ct(parity_pair):
    """Independent alignment check on real data: the uptake falls inside the CT body outline,
    better than it would if the image were mirrored or moved 4 voxels (18 mm) sideways."""
    engine, _, study, _, _ = parity_pair
    hu = resample(study.ct.volume, engine.affine, engine.array.shape, cval=-1001.0)
    covered = (hu > -1001).any(axis=(0, 1))  # slices the CT reaches
    image, body = engine.array[:, :, covered], hu[:, :, covered] > -500

    def inside(array):
        return array[body].sum() / array.sum()

    assert inside(image) > 0.8, f"only {inside(image):.1%} of the counts lie inside the body"
    for axis in range(3):
        assert inside(image) > inside(np.flip(image, axis)) + 0.1
    for axis in (0, 1):
        for shift in (-4, 4):
            assert inside(image) > inside(np.roll(image, shift, axis))
