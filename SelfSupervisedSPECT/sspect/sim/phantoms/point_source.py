"""A point source at an exact, off-grid LPS position: the fixture for geometry and centroid checks."""
from __future__ import annotations

import numpy as np

from .geometry import DEFAULT_CENTRE_LPS_MM, HU_AIR, Phantom, centred_origin, voxel_centres_mm


def point_source_phantom(shape=(32, 32, 32), voxel_mm: float = 8.0, point_lps_mm=(20.0, -30.0, -180.0),
                         activity_mbq: float = 10.0, cylinder_radius_mm: float | None = None,
                         centre_lps_mm=DEFAULT_CENTRE_LPS_MM) -> Phantom:
    """A point source at an exact LPS position inside a water cylinder along z.

    The activity is shared trilinearly among the 8 voxels around the point, so the activity
    centroid is exactly ``point_lps_mm`` even when the point is off the voxel grid: a
    reconstruction's centroid can then be compared with it to sub-voxel precision.
    """
    if shape[0] != shape[1]:
        raise ValueError(f"point_source_phantom needs a square axial grid, got {shape}.")
    origin = centred_origin(shape, voxel_mm, centre_lps_mm)
    index = (np.asarray(point_lps_mm, float) - origin) / voxel_mm
    lower = np.floor(index).astype(int)
    if np.any(lower < 0) or np.any(lower + 1 > np.asarray(shape) - 1):
        raise ValueError(f"Point {tuple(point_lps_mm)} mm lies outside the interior of the {shape} grid.")
    fraction = index - lower

    voxel_ml = voxel_mm ** 3 / 1000.0
    activity = np.zeros(shape, np.float32)
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([fraction[a] if corner[a] else 1.0 - fraction[a] for a in range(3)])
        activity[tuple(lower + corner)] += activity_mbq * weight / voxel_ml

    radius = cylinder_radius_mm if cylinder_radius_mm is not None else 0.4 * shape[0] * voxel_mm
    x, y, _ = voxel_centres_mm(shape, voxel_mm, origin)
    in_cylinder = np.broadcast_to((x - centre_lps_mm[0]) ** 2 + (y - centre_lps_mm[1]) ** 2 <= radius ** 2, shape)
    labels = np.where(in_cylinder, 1, 0).astype(np.uint8)
    labels[activity > 0] = 2
    hu = np.where(in_cylinder, 0.0, HU_AIR).astype(np.float32)
    return Phantom(activity, hu, labels, {"cylinder": 1, "source": 2}, (voxel_mm,) * 3, origin)

