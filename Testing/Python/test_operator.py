"""The fast SPECT operator against PyTomography's SPECTSystemMatrix, the reference it replaces.

PyTomography is the independent check: the same metadata, mu map and PSF metadata go into both,
and the fast operator must give the same projections (within 1 % NRMSE), an exact transpose, the
same subsets and batches, and PyTomography's algorithms must run on it unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import pytest
import torch

from sspect.physics.operator import BackProjection, Projection, SPECTOperator
from sspect.pipeline import Settings, bed_problem, load_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nrmse(estimate, reference) -> float:
    return float((estimate.double() - reference.double()).norm() / reference.double().norm())


def _inner(a, b) -> float:
    return float((a.double() * b.double()).sum())


def _reference(object_meta, proj_meta, mu, psf_meta):
    import pytomography
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform

    pytomography.device = torch.device("cpu")
    transforms = ([] if mu is None else [SPECTAttenuationTransform(mu)]) + ([] if psf_meta is None else [SPECTPSFTransform(psf_meta)])
    return SPECTSystemMatrix(transforms, [], object_meta, proj_meta)


@pytest.fixture(scope="module")
def geometry():
    """A 40^3 object of 4.42 mm (the clinical voxel), 18 views over a non-circular orbit, MEGP at 208 keV."""
    from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params
    from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta

    n, z, views, dx = 40, 24, 18, 0.442
    object_meta = SPECTObjectMeta((dx, dx, dx), (n, n, z))
    angles = np.linspace(0, 360, views, endpoint=False) + 7.0
    radii = 18.0 + 4.0 * np.abs(np.cos(np.radians(angles)))  # a body-contour orbit: one radius per view
    proj_meta = SPECTProjMeta((n, z), (dx, dx), angles, radii)
    psf = get_psfmeta_from_scanner_params("GI-MEGP", energy_keV=208, intrinsic_resolution_140keV=0.38)
    x, y = np.meshgrid(np.arange(n) - n / 2 + 0.5, np.arange(n) - n / 2 + 0.5, indexing="ij")
    body = torch.from_numpy(((x / 17) ** 2 + (y / 13) ** 2 < 1).astype(np.float32))[..., None].repeat(1, 1, z)
    mu = 0.15 * body
    mu[12:20, 15:24, :] = 0.25  # a denser block (bone-like) off centre
    generator = torch.Generator().manual_seed(0)
    activity = body * (1 + torch.rand(n, n, z, generator=generator))
    activity[25:30, 8:13, 8:14] += 20.0  # a hot lesion near the edge
    return {"object_meta": object_meta, "proj_meta": proj_meta, "psf": psf, "mu": mu, "activity": activity,
            "generator": generator}


@pytest.fixture(scope="module")
def operators(geometry):
    g = geometry
    return {"fast": SPECTOperator(g["object_meta"], g["proj_meta"], g["mu"], g["psf"]),
            "reference": _reference(g["object_meta"], g["proj_meta"], g["mu"], g["psf"])}


# ---------------------------------------------------------------- the same model as PyTomography


def test_forward_projection_matches_pytomography(geometry, operators):
    fast, reference = operators["fast"].forward(geometry["activity"]), operators["reference"].forward(geometry["activity"])
    assert fast.shape == reference.shape == (18, 40, 24)
    assert _nrmse(fast, reference) < 0.01


def test_rotation_and_attenuation_alone_match_pytomography_to_float_precision(geometry):
    """Without the PSF the model is rotation (kornia's bilinear taps) + attenuation: nothing is approximated."""
    g = geometry
    fast = SPECTOperator(g["object_meta"], g["proj_meta"], g["mu"], None)
    reference = _reference(g["object_meta"], g["proj_meta"], g["mu"], None)
    assert _nrmse(fast.forward(g["activity"]), reference.forward(g["activity"])) < 1e-5


def test_collimator_blur_of_a_point_has_the_reference_position_and_width(geometry):
    """The blur is built from each plane's PyTomography kernel variance: a point's projection has the
    reference centroid and second moment, whatever the higher moments."""
    g = geometry
    fast = SPECTOperator(g["object_meta"], g["proj_meta"], None, g["psf"])
    reference = _reference(g["object_meta"], g["proj_meta"], None, g["psf"])
    point = torch.zeros(40, 40, 24)
    point[9, 27, 11] = 1.0
    a, b = fast.forward(point).double(), reference.forward(point).double()
    r = torch.arange(40, dtype=torch.float64).reshape(1, 40, 1)
    for view in range(18):
        mean_a, mean_b = (a[view] * r[0]).sum() / a[view].sum(), (b[view] * r[0]).sum() / b[view].sum()
        var_a = (a[view] * (r[0] - mean_a) ** 2).sum() / a[view].sum()
        var_b = (b[view] * (r[0] - mean_b) ** 2).sum() / b[view].sum()
        assert abs(float(mean_a - mean_b)) < 1e-3
        assert abs(float(var_a / var_b) - 1) < 2e-3
    assert float(a.sum() / b.sum()) == pytest.approx(1.0, abs=1e-4)


def test_transpose_is_exact_and_backward_is_pytomographys_matched_back_projection(geometry, operators):
    """PyTomography's back projection rotates back by bilinear interpolation at the opposite angle,
    which is not the transpose (see methods/projector.py). ``backward`` keeps it, so that OSEM
    converges where it does with PyTomography; ``transpose`` is exact, for gradients."""
    operator = operators["fast"]
    x = torch.rand(40, 40, 24, generator=geometry["generator"])
    y = torch.rand(18, 40, 24, generator=geometry["generator"])
    forward = _inner(operator.forward(x), y)
    assert abs(forward - _inner(x, operator.transpose(y))) / abs(forward) < 1e-5
    assert abs(forward - _inner(x, operator.backward(y))) / abs(forward) > 1e-5  # matched, not the transpose
    measured = operators["reference"].forward(geometry["activity"])
    reference = operators["reference"].backward(measured)
    assert _nrmse(operators["fast"].backward(measured), reference) < 0.01
    assert _nrmse(operators["fast"].transpose(measured), reference) > 2 * _nrmse(operators["fast"].backward(measured), reference)
    g = geometry
    exact = SPECTOperator(g["object_meta"], g["proj_meta"], g["mu"], g["psf"], back_projection="exact")
    torch.testing.assert_close(exact.backward(y), operator.transpose(y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="back_projection must be one of"):
        SPECTOperator(g["object_meta"], g["proj_meta"], g["mu"], g["psf"], back_projection="transposed")


def test_subsets_are_the_views_of_the_full_projection(geometry, operators):
    operator = operators["fast"]
    operator.set_n_subsets(4)
    full = operator.forward(geometry["activity"])
    y = torch.rand(18, 40, 24, generator=geometry["generator"])
    for subset in range(4):
        views = operator.subset_indices_array[subset]
        torch.testing.assert_close(operator.forward(geometry["activity"], subset), full[views], rtol=1e-5, atol=1e-5)
        part = operator.get_projection_subset(y, subset)
        assert abs(_inner(operator.forward(geometry["activity"], subset), part)
                   - _inner(geometry["activity"], operator.transpose(part, subset))) < 1e-5 * abs(_inner(full[views], part))
    total = sum(operator.compute_normalization_factor(s) for s in range(4))
    torch.testing.assert_close(total, operator.compute_normalization_factor(), rtol=1e-4, atol=1e-4)
    operator.set_n_subsets(1)


def test_batches_project_each_object(geometry, operators):
    operator = operators["fast"]
    batch = torch.rand(2, 3, 40, 40, 24, generator=geometry["generator"])
    projected = operator.forward(batch)
    assert projected.shape == (2, 3, 18, 40, 24)
    torch.testing.assert_close(projected[1, 2], operator.forward(batch[1, 2]), rtol=1e-5, atol=1e-5)
    back = operator.backward(projected)
    assert back.shape == (2, 3, 40, 40, 24)
    torch.testing.assert_close(back[0, 1], operator.backward(projected[0, 1]), rtol=1e-5, atol=1e-4)


def test_attenuation_recomputed_per_group_when_memory_is_short(geometry, operators):
    g = geometry
    short = SPECTOperator(g["object_meta"], g["proj_meta"], g["mu"], g["psf"], precompute_limit_bytes=0, group_bytes=1)
    assert short.detection is None and operators["fast"].detection is not None
    assert short.precomputed_bytes < operators["fast"].precomputed_bytes
    torch.testing.assert_close(short.forward(g["activity"]), operators["fast"].forward(g["activity"]), rtol=1e-5, atol=1e-5)
    y = operators["fast"].forward(g["activity"])
    torch.testing.assert_close(short.backward(y), operators["fast"].backward(y), rtol=1e-4, atol=1e-3)


def test_selected_views_are_an_operator_of_those_views(geometry, operators):
    chosen = operators["fast"].select_views([1, 5, 6, 17])
    torch.testing.assert_close(chosen.forward(geometry["activity"]), operators["fast"].forward(geometry["activity"])[[1, 5, 6, 17]],
                               rtol=1e-5, atol=1e-5)
    assert chosen.proj_meta.num_projections == 4


# ---------------------------------------------------------------- gradients


def test_projection_gradient_is_the_derivative_of_a_poisson_likelihood(geometry, operators):
    """Finite differences of the likelihood against autograd through Projection (an independent check of A^T)."""
    operator = operators["fast"]
    counts = torch.poisson(operator.forward(geometry["activity"]), generator=geometry["generator"])

    def loss(image):
        expected = Projection.apply(image, operator) + 0.5
        return (expected - counts * torch.log(expected)).sum(dtype=torch.float64)

    image = (geometry["activity"] + 0.5).requires_grad_(True)
    loss(image).backward()
    direction = torch.rand(40, 40, 24, generator=geometry["generator"])
    step = 1e-2
    with torch.no_grad():
        numeric = (loss(image + step * direction) - loss(image - step * direction)) / (2 * step)
    assert float(numeric) == pytest.approx(_inner(image.grad, direction), rel=1e-3)


def test_back_projection_layer_has_the_forward_projection_as_its_gradient(geometry, operators):
    operator = operators["fast"]
    g = torch.rand(18, 40, 24, generator=geometry["generator"], requires_grad=True)
    v = torch.rand(40, 40, 24, generator=geometry["generator"])
    (BackProjection.apply(g, operator) * v).sum().backward()
    torch.testing.assert_close(g.grad, operator.forward(v), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- PyTomography's algorithms and the engine


def test_pytomography_osem_and_bsrem_run_on_it_and_agree_with_the_reference(geometry, operators):
    from pytomography.algorithms import BSREM, OSEM
    from pytomography.likelihoods import PoissonLogLikelihood
    from pytomography.priors import RelativeDifferencePrior

    counts = torch.poisson(operators["reference"].forward(geometry["activity"]), generator=geometry["generator"])
    images = {name: OSEM(PoissonLogLikelihood(system, counts))(4, 6) for name, system in operators.items()}
    assert _nrmse(images["fast"], images["reference"]) < 0.01
    bsrem = BSREM(PoissonLogLikelihood(operators["fast"], counts), prior=RelativeDifferencePrior(beta=0.3))(2, 6)
    assert torch.isfinite(bsrem).all() and float(bsrem.sum()) > 0


@pytest.mark.parametrize("rotation", ["CC", "CW"])
def test_siemens_two_head_study_projects_like_pytomography(tmp_path, rotation):
    """A simulated Siemens two-head study read through the engine's door, both rotation directions."""
    from sspect.sim.dicom_writer import write_demo_study

    with contextlib.redirect_stdout(io.StringIO()):
        written = write_demo_study(tmp_path, seed=2, layout="Siemens", rotation=rotation, n_views=24,
                                   shape=(32, 32, 32), voxel_mm=8.0, noise=False)
        study = load_study(written["nm"], written["ct"], Settings(device="cpu"))
        problems = {name: bed_problem(study, device="cpu", projector=name) for name in ("fast", "pytomography")}
    assert study.beds[0].n_detectors == 2
    image = torch.from_numpy(np.ascontiguousarray(written["truth"].array, dtype=np.float32))  # any object on the grid
    fast, reference = (problems[name].system_matrix.forward(image) for name in ("fast", "pytomography"))
    assert fast.shape == reference.shape == problems["fast"].projections.shape
    assert _nrmse(fast, reference) < 0.01


def test_unknown_projector_is_refused_in_one_sentence(study):
    from sspect.errors import SSPECTError

    with pytest.raises(SSPECTError, match="Unknown projector 'fastest'; choose fast or pytomography"):
        bed_problem(dataclasses.replace(study, ct=None), device="cpu", projector="fastest")
