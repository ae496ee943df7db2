"""The system model as a differentiable layer (sspect.physics.differentiable): exact transpose, batches, refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sspect.physics.differentiable import SPECTProjection, back_project, project


@pytest.fixture(scope="module")
def small_system():
    """A PyTomography system built directly: 16^3 object of 1.2 cm, 12 views, attenuation + PSF."""
    import pytomography
    from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params
    from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform

    pytomography.device = torch.device("cpu")
    n, views = 16, 12
    generator = torch.Generator().manual_seed(0)
    mu = 0.15 * torch.rand((n, n, n), generator=generator)
    object_meta = SPECTObjectMeta((1.2, 1.2, 1.2), (n, n, n))
    proj_meta = SPECTProjMeta((n, n), (1.2, 1.2), np.linspace(0, 360, views, endpoint=False), np.full(views, 25.0))
    psf = get_psfmeta_from_scanner_params("GI-MEGP", energy_keV=208)
    system = SPECTSystemMatrix([SPECTAttenuationTransform(mu), SPECTPSFTransform(psf)], [], object_meta, proj_meta)
    return {"system": system, "object": (n, n, n), "projections": (views, n, n), "generator": generator}


def _inner(a, b) -> float:
    return float((a.double() * b.double()).sum())


# ---------------------------------------------------------------- projector


def test_back_projection_is_the_exact_transpose_of_the_forward_projection(small_system):
    system, generator = small_system["system"], small_system["generator"]
    for _ in range(3):
        x = torch.randn(small_system["object"], generator=generator)
        y = torch.randn(small_system["projections"], generator=generator)
        forward, backward = _inner(system.forward(x), y), _inner(x, back_project(y, system))
        assert abs(forward - backward) <= 1e-5 * abs(forward), (forward, backward)


def test_pytomographys_own_back_projection_is_only_approximately_the_transpose(small_system):
    """Why the projector has its own transpose: bilinear rotation by -a is not the transpose of rotation
    by a. If this starts failing, PyTomography made its back projection exact and adjoint="pytomography"
    is as good as "exact"."""
    system, generator = small_system["system"], small_system["generator"]
    x = torch.randn(small_system["object"], generator=generator)
    y = torch.randn(small_system["projections"], generator=generator)
    forward, backward = _inner(system.forward(x), y), _inner(x, system.backward(y))
    assert abs(forward - backward) > 1e-3 * abs(forward), (forward, backward)
    assert torch.equal(back_project(y, system, adjoint="pytomography"), system.backward(y))


def test_gradient_of_a_linear_loss_is_the_back_projection(small_system):
    system, generator = small_system["system"], small_system["generator"]
    x = torch.rand(small_system["object"], generator=generator).requires_grad_()
    w = torch.rand(small_system["projections"], generator=generator)
    projected = project(x, system)
    assert torch.equal(projected.detach(), system.forward(x.detach()))
    (w * projected).sum().backward()
    assert torch.equal(x.grad, back_project(w, system))
    x.grad = None
    (w * project(x, system, adjoint="pytomography")).sum().backward()
    assert torch.equal(x.grad, system.backward(w))


def test_project_takes_a_batch_and_channel_dimension(small_system):
    system, generator = small_system["system"], small_system["generator"]
    batch = torch.rand((2, 1, *small_system["object"]), generator=generator).requires_grad_()
    projected = project(batch, system)
    assert projected.shape == (2, 1, *small_system["projections"])
    for i in range(2):
        assert torch.equal(projected[i, 0], SPECTProjection.apply(batch[i, 0].detach(), system))
    projected.sum().backward()
    ones = torch.ones(small_system["projections"])
    assert torch.equal(batch.grad[1, 0], back_project(ones, system))


def test_project_refuses_a_flat_array_and_an_unknown_adjoint(small_system):
    with pytest.raises(ValueError, match="three dimensions"):
        project(torch.ones(16, 16), small_system["system"])
    with pytest.raises(ValueError, match="adjoint"):
        project(torch.ones(small_system["object"]), small_system["system"], adjoint="approximate")
