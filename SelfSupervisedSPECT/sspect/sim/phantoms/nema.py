"""The NEMA IEC body phantom (spheres of 10-37 mm, lung insert) for recovery-coefficient studies.

Drawn with fractional voxel occupancy (:mod:`.geometry`) so that the small spheres hold the
right activity and their exact size is recorded for :func:`.geometry.sphere_occupancy`.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from sspect.errors import SSPECTError

from .geometry import (DEFAULT_CENTRE_LPS_MM, Grid, Phantom, Solid, centred_origin, check_square_grid,
                       elliptic_prism, even_ceil, paint, region_weights, render, sphere)

NEMA_SPHERE_DIAMETERS_MM = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)  # internal diameters
NEMA_SPHERE_CIRCLE_DIAMETER_MM = 114.4  # sphere centres lie on this circle around the axis
NEMA_SPHERE_PLANE_FROM_LID_MM = 70.0  # sphere centres' transverse plane, from the inside of the lid
NEMA_INTERIOR_LENGTH_MM = 180.0
NEMA_WALL_MM = 3.0
NEMA_UPPER_RADIUS_MM = 147.0  # interior: half-circle of this radius (anterior) ...
NEMA_CORNER_RADIUS_MM = 77.0  # ... on a 294 x 77 mm lower part whose two corners have this radius
NEMA_LUNG_INSERT_DIAMETER_MM = 50.0
HU_ACRYLIC = 120.0
HU_LUNG_INSERT = -700.0
HU_WATER = 0.0


def _nema_outline(axis_xy, radius: float, corner_radius: float, z_lo: float, z_hi: float) -> Solid:
    """The D-shaped cross-section: a half-circle towards anterior (-y), a flat posterior base
    (+y, the side the phantom lies on) whose two corners are quarter circles."""
    ax, ay = (float(c) for c in axis_xy)
    flat_half = radius - corner_radius

    def inside(x, y, z):
        dx, dy = x - ax, y - ay
        upper = (dy <= 0) & (dx * dx + dy * dy <= radius ** 2)
        lower = (dy > 0) & (dy <= corner_radius) & (
            np.abs(dx) <= flat_half + np.sqrt(np.clip(corner_radius ** 2 - dy * dy, 0.0, None)))
        return (upper | lower) & (z >= z_lo) & (z <= z_hi)

    return Solid(inside, (ax - radius, ay - radius, z_lo), (ax + radius, ay + corner_radius, z_hi),
                 (ax, ay, (z_lo + z_hi) / 2))


def nema_iec_phantom(voxel_mm: float = 4.4196, shape=None, sphere_to_background: float = 8.0,
                     background_MBq_per_mL: float = 0.1, centre_lps_mm=DEFAULT_CENTRE_LPS_MM,
                     spheres_mm=NEMA_SPHERE_DIAMETERS_MM, supersample: int = 8) -> Phantom:
    """NEMA IEC body phantom (NEMA NU 2 / IEC 61675-1) filled for a 177Lu study.

    Geometry (interior unless said; what is approximated is said):

    * Body: the D-shaped section, 294 x 224 mm inside (300 x 230 mm outside with a 3 mm acrylic
      wall): a half-circle of radius 147 mm towards anterior (-y) on a lower part 77 mm deep
      whose two posterior corners are quarter circles of radius 77 mm (flat base 140 mm wide,
      on +y, the table side). Interior length 180 mm along z, closed by 3 mm end walls (the real
      lid is thicker; ignored), about 9.7 L of water. The lid is at +z (superior).
    * Phantom axis: the centre of the half-circle; ``centre_lps_mm`` is the point on the axis
      halfway along the interior. The grid is centred on it.
    * Lung insert: a 50 mm diameter cylinder on the axis through the whole interior length,
      HU -700, no activity (its thin wall is ignored).
    * Spheres: internal diameters ``spheres_mm`` (10, 13, 17, 22, 28, 37 mm), centres on a
      circle of 114.4 mm diameter around the axis in the transverse plane 70 mm from the inside
      of the lid (z = centre + 20 mm), evenly spaced in angle, the first at +x (patient left)
      and the next ones turning towards +y. The standard's exact angular order is not
      reproduced; the 1 mm cold glass/acrylic sphere walls and the filling stems are ignored.
    * Activity: water ``background_MBq_per_mL`` (default 0.1 MBq/mL, about 1 GBq in the
      background, the order used in 177Lu phantom studies), spheres ``sphere_to_background``
      times that (4:1 or 8:1 in the standard protocols). HU: water 0, acrylic wall 120 (its
      3 mm enter the edge voxels by partial volume), air -1000.

    Every solid is voxelised with its fractional occupancy (``supersample``^3 points in each
    voxel near a surface), so a small sphere holds the right activity: the activity of a voxel
    cut by a sphere's surface is f * sphere + (1 - f) * background. Labels: ``background``,
    ``lung_insert``, ``sphere_10`` ... ``sphere_37`` (the voxel goes to the region with the
    largest share; wall voxels are 0, like outside). ``regions`` records each sphere's exact
    ``centre_lps_mm``, ``diameter_mm``, ``volume_ml`` (4/3 pi r^3) and concentration, the lung
    insert's axis and size, and the background concentration; :func:`.geometry.sphere_occupancy`
    gives a sphere's exact fractional mask. Default grid: square axial planes just holding the
    body (72 x 72 x 48 at 4.4196 mm).
    """
    voxel_mm = float(voxel_mm)
    if shape is None:
        shape = (even_ceil((150.0 + 5.0) * 2 / voxel_mm),) * 2 + (even_ceil((93.0 + 10.0) * 2 / voxel_mm),)
    shape = tuple(int(n) for n in shape)
    check_square_grid(shape, "nema_iec_phantom")
    if sphere_to_background < 0 or background_MBq_per_mL < 0:
        raise SSPECTError("Activity concentrations and the sphere-to-background ratio must not be negative.")
    cx, cy, cz = (float(c) for c in centre_lps_mm)
    origin = centred_origin(shape, voxel_mm, (cx, cy, cz))
    grid = Grid(shape, voxel_mm, origin)

    half_length = NEMA_INTERIOR_LENGTH_MM / 2
    outer_radius = NEMA_UPPER_RADIUS_MM + NEMA_WALL_MM
    exterior = _nema_outline((cx, cy), outer_radius, NEMA_CORNER_RADIUS_MM + NEMA_WALL_MM,
                             cz - half_length - NEMA_WALL_MM, cz + half_length + NEMA_WALL_MM)
    for axis in range(3):
        low, high = grid.bounds_mm(axis)
        if exterior.lo[axis] < low or exterior.hi[axis] > high:
            raise SSPECTError(f"The {shape} grid of {voxel_mm} mm voxels is too small for the NEMA IEC phantom "
                              f"(300 x 230 x 186 mm); leave shape out for a grid that holds it.")
    interior = _nema_outline((cx, cy), NEMA_UPPER_RADIUS_MM, NEMA_CORNER_RADIUS_MM, cz - half_length, cz + half_length)
    lung = elliptic_prism((cx, cy), (NEMA_LUNG_INSERT_DIAMETER_MM / 2,) * 2, cz - half_length, cz + half_length)

    plane_z = cz + half_length - NEMA_SPHERE_PLANE_FROM_LID_MM
    ring = NEMA_SPHERE_CIRCLE_DIAMETER_MM / 2
    spheres = []
    for k, diameter in enumerate(spheres_mm):
        angle = 2 * math.pi * k / len(spheres_mm)
        centre = (round(cx + ring * math.cos(angle), 9), round(cy + ring * math.sin(angle), 9), plane_z)
        spheres.append((f"sphere_{float(diameter):g}", float(diameter), centre))
    _check_spheres_fit(spheres, interior)

    solids = [(None, exterior, HU_ACRYLIC, supersample), ("background", interior, HU_WATER, supersample),
              ("lung_insert", lung, HU_LUNG_INSERT, supersample)]
    solids += [(name, sphere(centre, diameter), HU_WATER, supersample) for name, diameter, centre in spheres]
    layers = paint(grid, solids)
    weights = region_weights(grid, layers)
    sphere_concentration = sphere_to_background * background_MBq_per_mL
    concentration = {"background": background_MBq_per_mL, "lung_insert": 0.0}
    concentration.update({name: sphere_concentration for name, _, _ in spheres})
    label_ids = {name: i + 1 for i, name in enumerate(["background", "lung_insert"] + [s[0] for s in spheres])}
    activity, hu, labels, present = render(grid, layers, weights, concentration, label_ids)

    def voxelised_ml(name):
        return float(weights[name][1].sum(dtype=np.float64) * grid.voxel_ml) if name in weights else 0.0

    regions = {
        "background": {"concentration_MBq_per_mL": background_MBq_per_mL, "voxelised_volume_ml": voxelised_ml("background"),
                       "activity_MBq": background_MBq_per_mL * voxelised_ml("background")},
        # A cylinder on the axis (centre: where the axis crosses the sphere plane).
        "lung_insert": {"centre_lps_mm": (cx, cy, plane_z), "cylinder_diameter_mm": NEMA_LUNG_INSERT_DIAMETER_MM,
                        "length_mm": NEMA_INTERIOR_LENGTH_MM, "concentration_MBq_per_mL": 0.0,
                        "voxelised_volume_ml": voxelised_ml("lung_insert"), "activity_MBq": 0.0},
    }
    for name, info in regions.items():
        info["label"] = label_ids[name]
    for name, diameter, centre in spheres:
        regions[name] = {"label": label_ids[name], "centre_lps_mm": centre, "diameter_mm": diameter,
                         "volume_ml": math.pi / 6 * diameter ** 3 / 1000.0,
                         "voxelised_volume_ml": voxelised_ml(name),
                         "concentration_MBq_per_mL": sphere_concentration,
                         "activity_MBq": sphere_concentration * voxelised_ml(name)}
    return Phantom(activity, hu, labels, present, (voxel_mm,) * 3, origin, regions=regions)


def _check_spheres_fit(spheres, interior: Solid):
    """Spheres must lie in the water, apart from each other and from the lung insert."""
    golden = math.pi * (3 - math.sqrt(5))
    n = 400
    k = np.arange(n)
    zs = 1 - 2 * (k + 0.5) / n
    rs = np.sqrt(1 - zs ** 2)
    directions = np.stack([rs * np.cos(golden * k), rs * np.sin(golden * k), zs], axis=1)
    for name, diameter, centre in spheres:
        points = np.asarray(centre) + diameter / 2 * directions
        axis_distance = math.hypot(centre[0] - interior.point[0], centre[1] - interior.point[1])
        if not interior.inside(points[:, 0], points[:, 1], points[:, 2]).all() or \
                axis_distance - diameter / 2 < NEMA_LUNG_INSERT_DIAMETER_MM / 2:
            raise SSPECTError(f"{name} does not fit in the phantom's water beside the lung insert; use diameters up to 37 mm.")
    for (n1, d1, c1), (n2, d2, c2) in itertools.combinations(spheres, 2):
        if math.dist(c1, c2) < (d1 + d2) / 2:
            raise SSPECTError(f"{n1} and {n2} overlap; use fewer or smaller spheres.")

