"""A system matrix of the same object and physics that sees only some of the views.

Noise2Inverse reconstructs subsets of the views on their own; a system's own subsets
(``set_n_subsets``) serve OSEM's ordered subsets of *one* reconstruction and cannot describe the
complement of a subset.
"""
from __future__ import annotations

import copy

import numpy as np

from ..errors import SSPECTError


def view_system(system_matrix, views):
    """``system_matrix`` restricted to ``views`` (indices into its projections).

    The fast operator cuts its own tables (``select_views``). For PyTomography's ``SPECTSystemMatrix``
    a new one is built on those views' angles and radii, with copies of the transforms: building a
    system matrix configures its transforms for its geometry, and copies leave the original untouched
    (the attenuation map tensor is shared, read only; the PSF layers are rebuilt).
    """
    from pytomography.metadata.SPECT import SPECTProjMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix

    if callable(getattr(system_matrix, "select_views", None)):
        return system_matrix.select_views(views)
    if type(system_matrix) is not SPECTSystemMatrix:
        raise SSPECTError(f"This method needs a SPECT system matrix that can select views, not {type(system_matrix).__name__}; "
                          "use n2n or a classical method.")
    meta = system_matrix.proj_meta
    index = np.asarray(views, dtype=np.int64)
    angles = meta.angles.detach().cpu().numpy()[index]
    radii = None if meta.radii is None else np.asarray(meta.radii)[index]
    view_meta = SPECTProjMeta(meta.shape[1:], meta.dr, angles, radii)
    return SPECTSystemMatrix([copy.copy(t) for t in system_matrix.obj2obj_transforms],
                             [copy.copy(t) for t in system_matrix.proj2proj_transforms], system_matrix.object_meta,
                             view_meta, system_matrix.object_initial_based_on_camera_path)
