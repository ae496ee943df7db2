"""The SPECT system model as a differentiable layer: ``A x`` forward, ``A^T g`` for the gradient.

With the fast operator (:class:`.operator.SPECTOperator`, the default), or any system matrix with
an exact ``transpose``, this module only hands batches to the operator's autograd functions and
picks its ``transpose`` (exact) or ``backward`` (PyTomography's matched back projection).
The rest of this module serves PyTomography's ``SPECTSystemMatrix``, the reference projector.

PyTomography's projections run under ``torch.no_grad()``, so autograd cannot flow through them.
:class:`SPECTProjection` is a ``torch.autograd.Function`` whose forward is the system matrix's
forward projection and whose backward is the transpose of that same forward projection, so that
a network ``x = f_theta(z)`` can be trained by a likelihood on the projections (Gong et al. 2019,
Reader 2024).

Why not simply ``system_matrix.backward``: PyTomography's back projection is *matched* but not the
exact transpose. Its forward rotates the object with bilinear interpolation by an angle and its back
projection rotates back by the opposite angle, and bilinear rotation by -a is not the transpose of
bilinear rotation by a (they agree only at multiples of 90 degrees); on a small object the two
differ by a few per cent (``docs/operator/README.md``). The attenuation (diagonal) and collimator-
response (symmetric Gaussian, zero padding) transforms are exact adjoints of themselves, so
:func:`back_project` reuses PyTomography's padding and transforms and replaces only the back-
rotation by the vector-Jacobian product of the forward rotation. With it, the gradient of any loss
of ``A x`` is the true gradient of the model that ``system_matrix.forward`` computes.
``adjoint="pytomography"`` keeps PyTomography's back projection instead (the one OSEM uses; then the
optimum matches OSEM's fixed point).
"""
from __future__ import annotations

import torch

ADJOINTS = ("exact", "pytomography")


def _is_fast(system_matrix) -> bool:
    """True for a system with its own exact ``transpose`` (:class:`.operator.SPECTOperator` and systems built of it)."""
    return callable(getattr(system_matrix, "transpose", None))


def _is_rotate_and_sum(system_matrix) -> bool:
    """True for the rotate + sum SPECT system matrix whose back projection :func:`back_project` rebuilds."""
    from pytomography.projectors.SPECT import SPECTSystemMatrix

    return type(system_matrix) is SPECTSystemMatrix


def _rotation_transpose(image: torch.Tensor, angle, mode: str) -> torch.Tensor:
    """Transpose of ``RotationTransform.backward(., angle)`` (kornia rotate by -angle), applied to ``image``.

    The rotation is linear in its input, so its vector-Jacobian product at any point (zeros here)
    is the transpose applied to ``image``.
    """
    from kornia.geometry.transform import rotate

    angle = torch.as_tensor(angle, dtype=image.dtype, device=image.device).reshape(1)
    with torch.enable_grad():
        point = torch.zeros_like(image, requires_grad=True)
        rotated = rotate(point.permute(2, 0, 1).unsqueeze(0), -angle, mode=mode).squeeze().permute(1, 2, 0)
        (transposed,) = torch.autograd.grad(rotated, point, grad_outputs=image)
    return transposed


@torch.no_grad()
def back_project(projections: torch.Tensor, system_matrix, adjoint: str = "exact") -> torch.Tensor:
    """``A^T g`` for projections ``g`` [Ltheta, Lr, Lz] -> object [Lx, Ly, Lz].

    ``adjoint="exact"`` is the transpose of ``system_matrix.forward`` (see the module docstring);
    ``"pytomography"`` is ``system_matrix.backward``. System matrices other than PyTomography's
    rotate + sum ``SPECTSystemMatrix`` always use their own ``backward``.
    """
    if adjoint not in ADJOINTS:
        raise ValueError(f"adjoint must be one of {ADJOINTS}, not {adjoint!r}")
    if _is_fast(system_matrix):
        return system_matrix.transpose(projections) if adjoint == "exact" else system_matrix.backward(projections)
    if adjoint == "pytomography" or not _is_rotate_and_sum(system_matrix):
        return system_matrix.backward(projections)
    import pytomography
    from pytomography.utils import pad_object, pad_proj, unpad_object

    matrix = system_matrix
    device = pytomography.device
    # the forward's last steps were: sum over x of the padded object, proj2proj transforms, unpad along r
    proj = pad_proj(projections.to(device))
    for transform in matrix.proj2proj_transforms[::-1]:
        proj = transform.backward(proj)
    box = pad_object(torch.ones(matrix.object_meta.shape, device=device), mode="back_project")
    image = torch.zeros(matrix.object_meta.padded_shape, device=device)
    mode = matrix.rotation_transform.mode
    for index in range(matrix.proj_meta.num_projections):
        angle_index = torch.tensor(index, device=device)
        spread = proj[index].unsqueeze(0) * box  # transpose of the sum over x
        for transform in matrix.obj2obj_transforms[::-1]:
            spread = transform.backward(spread, angle_index)
        image += _rotation_transpose(spread, 270 - matrix.proj_meta.angles[index], mode)
    return unpad_object(image)  # transpose of the zero padding


class SPECTProjection(torch.autograd.Function):
    """``y = A x`` with ``dL/dx = A^T dL/dy``; ``x`` is one object [Lx, Ly, Lz].

    Call as ``SPECTProjection.apply(x, system_matrix, adjoint)``; prefer :func:`project`, which
    also takes batches.
    """

    @staticmethod
    def forward(ctx, image, system_matrix, adjoint="exact"):
        ctx.system_matrix, ctx.adjoint = system_matrix, adjoint
        with torch.no_grad():
            return system_matrix.forward(image.detach())

    @staticmethod
    def backward(ctx, grad_projections):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return back_project(grad_projections.detach(), ctx.system_matrix, ctx.adjoint), None, None


def project(image: torch.Tensor, system_matrix, adjoint: str = "exact") -> torch.Tensor:
    """Forward-project ``image`` through ``system_matrix``, differentiably.

    ``image`` is [Lx, Ly, Lz] (-> [Ltheta, Lr, Lz]) or has leading dimensions, e.g. a network's
    [B, C, Lx, Ly, Lz] (-> [B, C, Ltheta, Lr, Lz]); each object is projected in turn.
    """
    if adjoint not in ADJOINTS:
        raise ValueError(f"adjoint must be one of {ADJOINTS}, not {adjoint!r}")
    if image.dim() < 3:
        raise ValueError(f"An object needs three dimensions [Lx, Ly, Lz]; got shape {tuple(image.shape)}.")
    if _is_fast(system_matrix):
        from .operator import Projection

        return Projection.apply(image, system_matrix, adjoint == "exact")
    if image.dim() == 3:
        return SPECTProjection.apply(image, system_matrix, adjoint)
    lead = image.shape[:-3]
    flat = image.reshape(-1, *image.shape[-3:])
    projected = torch.stack([SPECTProjection.apply(one, system_matrix, adjoint) for one in flat.unbind(0)])
    return projected.reshape(*lead, *projected.shape[1:])


class SPECTBackProjection(torch.autograd.Function):
    """``x = A^T g`` with ``dL/dg = A dL/dx``: the exact back projection's transpose is the forward projection.

    Unrolled EM networks need it: their EM step back-projects ``y / (A x + s)``, which depends on
    the image being learned. Call through :func:`back_project_differentiable`.
    """

    @staticmethod
    def forward(ctx, projections, system_matrix):
        ctx.system_matrix = system_matrix
        return back_project(projections.detach(), system_matrix)

    @staticmethod
    def backward(ctx, grad_image):
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.no_grad():
            return ctx.system_matrix.forward(grad_image.detach()), None


def back_project_differentiable(projections: torch.Tensor, system_matrix) -> torch.Tensor:
    """``A^T g`` for one set of projections [Ltheta, Lr, Lz], differentiable in ``g`` (exact adjoint only)."""
    if _is_fast(system_matrix):
        from .operator import BackProjection

        return BackProjection.apply(projections, system_matrix)
    if not _is_rotate_and_sum(system_matrix):
        raise ValueError("The differentiable back projection needs the fast SPECTOperator or PyTomography's SPECTSystemMatrix.")
    return SPECTBackProjection.apply(projections, system_matrix)
