"""Digital phantoms with known truth for simulated 177Lu SPECT/CT studies.

Arrays are indexed [i, j, k] = [x, y, z] in DICOM LPS (x -> patient left, y -> posterior,
z -> superior) with identity direction, the same layout as PyTomography's object arrays, so a
phantom projects without any reordering and its truth lines up with a reconstruction voxel
for voxel.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sspect.errors import SSPECTError
from sspect.volume import Volume

# Where the grid centre sits in LPS (mm). Non-zero z so that a reader that drops the origin
# (or flips an axis) puts the truth visibly elsewhere.
DEFAULT_CENTRE_LPS_MM = (0.0, 0.0, -200.0)

# Reference anatomy is laid out for a 384 mm field of view (48 voxels of 8 mm); smaller grids
# get the same anatomy scaled down so that the body always fits inside the field of view.
_REFERENCE_FOV_MM = 384.0

HU_AIR = -1000.0
HU_LUNG = -750.0
HU_BONE = 700.0
HU_SOFT_TISSUE = {"body": 20.0, "liver": 40.0, "spleen": 40.0, "kidney": 30.0, "lesion": 35.0}

# 177Lu-PSMA about a day after ~7.4 GBq, in MBq/mL: plausible, not from a specific patient.
DEMO_CONCENTRATION_MBQ_PER_ML = {
    "body": 0.010,
    "lungs": 0.003,
    "liver": 0.060,
    "spleen": 0.050,
    "kidney_left": 0.250,
    "kidney_right": 0.250,
    "spine": 0.015,
    "lesion_liver": 0.600,
    "lesion_node": 1.000,
}


@dataclass
class Phantom:
    """Ground truth on one grid: activity concentration, CT and organ labels."""

    activity: np.ndarray  # float32 [x, y, z], MBq/mL
    hu: np.ndarray  # float32 [x, y, z], Hounsfield units
    labels: np.ndarray  # uint8 [x, y, z], 0 = outside the body
    label_names: dict[str, int]
    spacing: tuple[float, float, float]  # mm
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    activity_unit: str = "MBq/mL"
    # Exact description of named regions, e.g. {'sphere_10': {'centre_lps_mm': ..., 'diameter_mm':
    # ..., 'volume_ml': ..., 'concentration_MBq_per_mL': ..., 'activity_MBq': ...}}; see the
    # phantom functions for what each one records. Empty for the simple phantoms.
    regions: dict = field(default_factory=dict)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def activity_volume(self) -> Volume:
        return Volume(self.activity, self.spacing, self.origin, unit=self.activity_unit)

    @property
    def hu_volume(self) -> Volume:
        return Volume(self.hu, self.spacing, self.origin, unit="HU")

    def total_activity_mbq(self, label: str | None = None) -> float:
        """Activity in the whole phantom or in one labelled region."""
        mask = np.ones(self.labels.shape, bool) if label is None else self.labels == self.label_names[label]
        return float(self.activity[mask].sum(dtype=np.float64) * self.voxel_volume_ml)


def centred_origin(shape, voxel_mm: float, centre_lps_mm=DEFAULT_CENTRE_LPS_MM) -> tuple[float, float, float]:
    """Origin (LPS of voxel 0) that puts the grid centre at ``centre_lps_mm``."""
    return tuple(float(c - (n - 1) / 2 * voxel_mm) for c, n in zip(centre_lps_mm, shape))


def _voxel_centres_mm(shape, voxel_mm: float, origin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [origin[a] + voxel_mm * np.arange(shape[a]) for a in range(3)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def demo_phantom(shape=(48, 48, 48), voxel_mm: float = 8.0, seed: int = 0,
                 centre_lps_mm=DEFAULT_CENTRE_LPS_MM) -> Phantom:
    """A small torso: body, lungs, spine, liver, spleen, two kidneys and two hot lesions.

    Organs are asymmetric on purpose (liver on the patient's right, spleen on the left,
    lesions at different heights) so that a flipped or swapped axis shows up in any test.
    ``seed`` varies the organ concentrations by a few percent and nothing else.
    """
    if shape[0] != shape[1]:
        raise ValueError(f"demo_phantom needs a square axial grid (PyTomography rotates it), got {shape}.")
    origin = centred_origin(shape, voxel_mm, centre_lps_mm)
    x, y, z = _voxel_centres_mm(shape, voxel_mm, origin)
    # Coordinates relative to the grid centre, in reference-anatomy millimetres.
    scale = min(1.0, min(n * voxel_mm for n in shape) / _REFERENCE_FOV_MM)
    x = (x - centre_lps_mm[0]) / scale
    y = (y - centre_lps_mm[1]) / scale
    z = (z - centre_lps_mm[2]) / scale

    def ellipsoid(centre, semi_axes):
        return ((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2 \
            + ((z - centre[2]) / semi_axes[2]) ** 2 <= 1.0

    def sphere(centre, radius):
        return ellipsoid(centre, (radius, radius, radius))

    full = np.ones(shape, bool)
    regions = {  # later entries overwrite earlier ones
        "body": full & (((x / 160.0) ** 2 + (y / 110.0) ** 2) <= 1.0),
        "lungs": ellipsoid((-75, -5, 120), (55, 65, 90)) | ellipsoid((75, -5, 120), (55, 65, 90)),
        "liver": ellipsoid((-70, -10, 10), (75, 65, 60)),
        "spleen": ellipsoid((85, 35, 20), (30, 35, 45)),
        "kidney_left": ellipsoid((60, 55, -60), (25, 22, 50)),
        "kidney_right": ellipsoid((-60, 55, -75), (25, 22, 50)),
        "spine": full & (((x / 18.0) ** 2 + ((y - 70.0) / 18.0) ** 2) <= 1.0),
        "lesion_liver": sphere((-90, -25, 25), 18.0),
        "lesion_node": sphere((25, 30, -110), 12.0),
    }
    label_names = {name: index + 1 for index, name in enumerate(regions)}
    labels = np.zeros(shape, np.uint8)
    for name, mask in regions.items():
        labels[mask & regions["body"]] = label_names[name]

    hu_by_region = {
        "body": HU_SOFT_TISSUE["body"], "lungs": HU_LUNG,
        "liver": HU_SOFT_TISSUE["liver"], "spleen": HU_SOFT_TISSUE["spleen"],
        "kidney_left": HU_SOFT_TISSUE["kidney"], "kidney_right": HU_SOFT_TISSUE["kidney"],
        "spine": HU_BONE,
        "lesion_liver": HU_SOFT_TISSUE["lesion"], "lesion_node": HU_SOFT_TISSUE["lesion"],
    }
    rng = np.random.default_rng(seed)
    hu = np.full(shape, HU_AIR, np.float32)
    activity = np.zeros(shape, np.float32)
    for name, label in label_names.items():
        inside = labels == label
        hu[inside] = hu_by_region[name]
        activity[inside] = DEMO_CONCENTRATION_MBQ_PER_ML[name] * (1.0 + 0.05 * rng.standard_normal())
    return Phantom(activity, hu, labels, label_names, (voxel_mm,) * 3, origin)


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
    x, y, _ = _voxel_centres_mm(shape, voxel_mm, origin)
    in_cylinder = np.broadcast_to((x - centre_lps_mm[0]) ** 2 + (y - centre_lps_mm[1]) ** 2 <= radius ** 2, shape)
    labels = np.where(in_cylinder, 1, 0).astype(np.uint8)
    labels[activity > 0] = 2
    hu = np.where(in_cylinder, 0.0, HU_AIR).astype(np.float32)
    return Phantom(activity, hu, labels, {"cylinder": 1, "source": 2}, (voxel_mm,) * 3, origin)


# ==============================================================================================
# Partial-volume voxelisation shared by the NEMA and torso phantoms
# ==============================================================================================
#
# A solid is a predicate inside(x, y, z) on LPS millimetres (numpy broadcasting) with a bounding
# box. Its fractional occupancy of each voxel is exact (1) where all 8 voxel corners are inside
# (every solid used here is convex, or nearly so), and otherwise counted on n^3 sub-voxel points
# in the voxels near its surface. Solids are then painted in order: a later solid replaces the
# fraction it occupies of whatever was there (weights w_i *= 1 - f_later), so a voxel can hold
# a mixture (activity and HU are weight-averaged; the rest of the voxel is air), and the label of
# a voxel is the region with the largest weight in it (air wins ties).

_Predicate = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Solid:
    inside: _Predicate
    lo: tuple  # bounding box, LPS mm
    hi: tuple
    point: tuple  # a point inside (keeps solids smaller than a voxel from being missed)

    def __and__(self, other: "_Solid") -> "_Solid":
        return _Solid(lambda x, y, z: self.inside(x, y, z) & other.inside(x, y, z),
                      tuple(max(a, b) for a, b in zip(self.lo, other.lo)),
                      tuple(min(a, b) for a, b in zip(self.hi, other.hi)), self.point)

    def __or__(self, other: "_Solid") -> "_Solid":
        return _Solid(lambda x, y, z: self.inside(x, y, z) | other.inside(x, y, z),
                      tuple(min(a, b) for a, b in zip(self.lo, other.lo)),
                      tuple(max(a, b) for a, b in zip(self.hi, other.hi)), self.point)


def _ellipsoid(centre, semi_axes, angle_deg: float = 0.0) -> _Solid:
    """Ellipsoid with semi-axes along x, y, z, turned by ``angle_deg`` about z."""
    cx, cy, cz = (float(c) for c in centre)
    a, b, c = (float(s) for s in semi_axes)
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))

    def inside(x, y, z):
        dx, dy = x - cx, y - cy
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        return (u / a) ** 2 + (v / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0

    r = max(a, b) if angle_deg else None
    half = (r, r, c) if r else (a, b, c)
    return _Solid(inside, (cx - half[0], cy - half[1], cz - half[2]), (cx + half[0], cy + half[1], cz + half[2]),
                  (cx, cy, cz))


def _sphere(centre, diameter_mm: float) -> _Solid:
    r = diameter_mm / 2.0
    return _ellipsoid(centre, (r, r, r))


def _elliptic_prism(centre_xy, semi_xy, z_lo: float, z_hi: float) -> _Solid:
    """Elliptic cylinder along z between two transverse planes."""
    cx, cy = (float(c) for c in centre_xy)
    a, b = (float(s) for s in semi_xy)

    def inside(x, y, z):
        return (((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0) & (z >= z_lo) & (z <= z_hi)

    return _Solid(inside, (cx - a, cy - b, z_lo), (cx + a, cy + b, z_hi), (cx, cy, (z_lo + z_hi) / 2))


@dataclass(frozen=True)
class _Grid:
    shape: tuple
    voxel_mm: float
    origin: tuple

    @property
    def voxel_ml(self) -> float:
        return self.voxel_mm ** 3 / 1000.0

    def bounds_mm(self, axis: int) -> tuple[float, float]:
        """Outer faces of the first and last voxel along ``axis``."""
        return (self.origin[axis] - self.voxel_mm / 2, self.origin[axis] + (self.shape[axis] - 0.5) * self.voxel_mm)


def _occupancy(solid: _Solid, grid: _Grid, n_sub: int):
    """(index ranges, fraction of each voxel inside ``solid``) over its bounding box, or None."""
    v = grid.voxel_mm
    ranges = []
    for a in range(3):
        i0 = max(0, math.floor((solid.lo[a] - grid.origin[a]) / v - 0.5))
        i1 = min(grid.shape[a], math.ceil((solid.hi[a] - grid.origin[a]) / v + 0.5) + 1)
        if i1 <= i0:
            return None
        ranges.append((i0, i1))
    size = tuple(i1 - i0 for i0, i1 in ranges)
    corners = [grid.origin[a] + v * (np.arange(ranges[a][0], ranges[a][1] + 1) - 0.5) for a in range(3)]
    inside = np.broadcast_to(solid.inside(corners[0][:, None, None], corners[1][None, :, None],
                                          corners[2][None, None, :]), tuple(n + 1 for n in size))
    all_in = np.ones(size, bool)
    any_in = np.zeros(size, bool)
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        corner = inside[dx:dx + size[0], dy:dy + size[1], dz:dz + size[2]]
        all_in &= corner
        any_in |= corner
    seed = np.zeros(size, bool)
    point = [round((solid.point[a] - grid.origin[a]) / v) - ranges[a][0] for a in range(3)]
    if all(0 <= point[a] < size[a] for a in range(3)):
        seed[tuple(point)] = True
    from scipy.ndimage import binary_dilation

    candidates = binary_dilation(any_in | seed, structure=np.ones((3, 3, 3), bool)) & ~all_in
    fraction = all_in.astype(np.float32)
    index = np.nonzero(candidates)
    if index[0].size:
        centres = [grid.origin[a] + v * (index[a] + ranges[a][0]) for a in range(3)]
        offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * v
        count = np.zeros(index[0].size)
        z = centres[2][:, None] + offsets[None, :]
        for ox in offsets:
            for oy in offsets:
                hits = solid.inside((centres[0] + ox)[:, None], (centres[1] + oy)[:, None], z)
                count += np.broadcast_to(hits, z.shape).sum(axis=1)
        fraction[index] = count / n_sub ** 3
    if not fraction.any():
        return None
    return tuple(ranges), fraction


@dataclass
class _Layer:
    name: str | None  # region name; None: material without a label (e.g. a phantom wall)
    ranges: tuple
    fraction: np.ndarray
    hu: float
    weight: np.ndarray | None = None


def _local(ranges, outer) -> tuple:
    return tuple(slice(r[0] - o[0], r[1] - o[0]) for r, o in zip(ranges, outer))


def _intersection(a, b):
    ranges = tuple((max(p[0], q[0]), min(p[1], q[1])) for p, q in zip(a, b))
    return None if any(hi <= lo for lo, hi in ranges) else ranges


def _paint(grid: _Grid, solids) -> list[_Layer]:
    """Voxelise (name, solid, HU, n_sub) in order; later solids replace what they cover."""
    layers = []
    for name, solid, hu, n_sub in solids:
        occupied = _occupancy(solid, grid, n_sub)
        if occupied is not None:
            layers.append(_Layer(name, occupied[0], occupied[1], hu))
    for j, later in enumerate(layers):
        later.weight = later.fraction.copy()
        keep = 1.0 - later.fraction
        for earlier in layers[:j]:
            overlap = _intersection(earlier.ranges, later.ranges)
            if overlap is not None:
                earlier.weight[_local(overlap, earlier.ranges)] *= keep[_local(overlap, later.ranges)]
    return layers


def _region_weights(grid: _Grid, layers) -> dict[str, tuple]:
    """name -> (index ranges, summed weight) over the union of its layers' boxes."""
    by_name: dict[str, list[_Layer]] = {}
    for layer in layers:
        if layer.name is not None:
            by_name.setdefault(layer.name, []).append(layer)
    weights = {}
    for name, group in by_name.items():
        ranges = tuple((min(l.ranges[a][0] for l in group), max(l.ranges[a][1] for l in group)) for a in range(3))
        total = np.zeros(tuple(hi - lo for lo, hi in ranges), np.float32)
        for layer in group:
            total[_local(layer.ranges, ranges)] += layer.weight
        weights[name] = (ranges, total)
    return weights


def _render(grid: _Grid, layers, region_weights, concentration: dict, label_ids: dict):
    """Activity (MBq/mL), HU and labels from painted layers and per-region concentrations."""
    activity = np.zeros(grid.shape, np.float32)
    hu_above_air = np.zeros(grid.shape, np.float32)
    matter = np.zeros(grid.shape, np.float32)
    unlabelled = np.zeros(grid.shape, np.float32)
    for layer in layers:
        box = _local(layer.ranges, ((0, 0), (0, 0), (0, 0)))
        hu_above_air[box] += (layer.hu - HU_AIR) * layer.weight
        matter[box] += layer.weight
        if layer.name is None:
            unlabelled[box] += layer.weight
    hu = (HU_AIR + hu_above_air).astype(np.float32)
    labels = np.zeros(grid.shape, np.uint8)
    best = np.maximum(1.0 - matter, unlabelled)  # air or unlabelled material (a wall) keep label 0
    present = {}
    for name, (ranges, weight) in region_weights.items():
        box = _local(ranges, ((0, 0), (0, 0), (0, 0)))
        activity[box] += concentration.get(name, 0.0) * weight
        wins = weight > best[box]
        if not wins.any() and weight.max() > 0:  # smaller than half a voxel: its fullest voxel
            wins = weight == weight.max()
        if wins.any():
            labels[box][wins] = label_ids[name]
            best[box][wins] = weight[wins]
    for name in region_weights:
        if np.any(labels == label_ids[name]):
            present[name] = label_ids[name]
    return activity, hu, labels, present


def _check_square_grid(shape, who: str):
    if len(shape) != 3 or shape[0] != shape[1]:
        raise SSPECTError(f"{who} needs a square axial grid [L, L, Lz] (PyTomography rotates it); got {tuple(shape)}.")


def _even_ceil(value: float) -> int:
    return 2 * math.ceil(value / 2.0)


def sphere_occupancy(phantom: Phantom, region: str, supersample: int = 8) -> np.ndarray:
    """Fraction (0..1) of each voxel inside a spherical region (NEMA sphere or torso lesion).

    Uses the exact centre and diameter recorded in ``phantom.regions``, not the voxel labels,
    so that recovery coefficients can be taken over the true sphere volume.
    """
    info = phantom.regions.get(region)
    if not info or "diameter_mm" not in info:
        raise SSPECTError(f"'{region}' is not a spherical region of this phantom; spherical ones: "
                          f"{[n for n, r in phantom.regions.items() if 'diameter_mm' in r]}.")
    if len(set(phantom.spacing)) != 1:
        raise SSPECTError("sphere_occupancy needs isotropic voxels.")
    grid = _Grid(phantom.labels.shape, float(phantom.spacing[0]), tuple(phantom.origin))
    out = np.zeros(grid.shape, np.float32)
    occupied = _occupancy(_sphere(info["centre_lps_mm"], info["diameter_mm"]), grid, supersample)
    if occupied is not None:
        out[_local(occupied[0], ((0, 0), (0, 0), (0, 0)))] = occupied[1]
    return out


# ==============================================================================================
# NEMA IEC body phantom
# ==============================================================================================

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


def _nema_outline(axis_xy, radius: float, corner_radius: float, z_lo: float, z_hi: float) -> _Solid:
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

    return _Solid(inside, (ax - radius, ay - radius, z_lo), (ax + radius, ay + corner_radius, z_hi),
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
    insert's axis and size, and the background concentration; :func:`sphere_occupancy` gives a
    sphere's exact fractional mask. Default grid: square axial planes just holding the body
    (72 x 72 x 48 at 4.4196 mm).
    """
    voxel_mm = float(voxel_mm)
    if shape is None:
        shape = (_even_ceil((150.0 + 5.0) * 2 / voxel_mm),) * 2 + (_even_ceil((93.0 + 10.0) * 2 / voxel_mm),)
    shape = tuple(int(n) for n in shape)
    _check_square_grid(shape, "nema_iec_phantom")
    if sphere_to_background < 0 or background_MBq_per_mL < 0:
        raise SSPECTError("Activity concentrations and the sphere-to-background ratio must not be negative.")
    cx, cy, cz = (float(c) for c in centre_lps_mm)
    origin = centred_origin(shape, voxel_mm, (cx, cy, cz))
    grid = _Grid(shape, voxel_mm, origin)

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
    lung = _elliptic_prism((cx, cy), (NEMA_LUNG_INSERT_DIAMETER_MM / 2,) * 2, cz - half_length, cz + half_length)

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
    solids += [(name, _sphere(centre, diameter), HU_WATER, supersample) for name, diameter, centre in spheres]
    layers = _paint(grid, solids)
    weights = _region_weights(grid, layers)
    sphere_concentration = sphere_to_background * background_MBq_per_mL
    concentration = {"background": background_MBq_per_mL, "lung_insert": 0.0}
    concentration.update({name: sphere_concentration for name, _, _ in spheres})
    label_ids = {name: i + 1 for i, name in enumerate(["background", "lung_insert"] + [s[0] for s in spheres])}
    activity, hu, labels, present = _render(grid, layers, weights, concentration, label_ids)

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


def _check_spheres_fit(spheres, interior: _Solid):
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


# ==============================================================================================
# Anthropomorphic 177Lu torso
# ==============================================================================================

LU177_HALF_LIFE_H = 6.647 * 24.0
TORSO_HOURS_POST_INJECTION = 24.0
TORSO_REFERENCE_MASS_G = 80_000.0  # for SUV-defined concentrations (1 g/mL)

# Height of the field's centre in mm above the reference patient's pubic symphysis. The modelled
# body runs from below the bladder (h ~ 0) to the vertex (h ~ 890 mm).
TORSO_BEDS_MM = {
    "whole_body": 450.0,  # bladder to vertex: needs a field about 1020 mm tall (the default grid)
    "head_thorax": 680.0,  # lacrimal and salivary glands, neck, upper lungs: like bed 1 of the real GE study
    "abdomen": 200.0,  # bladder, pelvis, kidneys, spleen, liver, lung bases: the usual 177Lu dosimetry bed
}
_TORSO_WHOLE_FIELD_MM = (424.0, 1020.0)  # default field: in-plane side, height (h -60 ... 960 mm)

# Uptake about 24 h after the injection. ``fraction_of_injected``: activity physically present in
# the whole organ at the scan (decay included) per injected activity; ``suv``: concentration as
# SUV = C / (injected x decay / 80 kg). See torso_phantom's docstring for sources and derivation.
TORSO_UPTAKE = {
    "PSMA": {
        "fraction_of_injected": {"kidneys": 0.025, "liver": 0.025, "spleen": 0.0025, "salivary_glands": 0.008,
                                 "lacrimal_glands": 0.0003, "bladder": 0.005},
        "suv": {"body": 0.3, "lungs": 0.1, "bone": 0.3, "brain": 0.03},
        "kidney_cortex_to_medulla": 3.0,
        "lesion_suv": (6.0, 40.0),
        "lesion_sites": {"liver": 0.15, "spine": 0.30, "pelvis": 0.15, "node": 0.40},
    },
    "DOTATATE": {
        "fraction_of_injected": {"kidneys": 0.022, "liver": 0.03, "spleen": 0.012, "salivary_glands": 0.0008,
                                 "lacrimal_glands": 0.00003, "bladder": 0.005},
        "suv": {"body": 0.3, "lungs": 0.1, "bone": 0.4, "brain": 0.03},
        "kidney_cortex_to_medulla": 3.0,
        "lesion_suv": (8.0, 60.0),
        "lesion_sites": {"liver": 0.50, "spine": 0.12, "pelvis": 0.08, "node": 0.30},
    },
}

TORSO_GROUPS = {  # uptake group -> labelled regions
    "body": ("body",),
    "lungs": ("lung_left", "lung_right"),
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidneys": ("kidney_left_cortex", "kidney_left_medulla", "kidney_right_cortex", "kidney_right_medulla"),
    "bladder": ("bladder",),
    "bone": ("spine", "pelvis", "skull"),
    "brain": ("brain",),
    "salivary_glands": ("parotid_left", "parotid_right", "submandibular_left", "submandibular_right"),
    "lacrimal_glands": ("lacrimal_left", "lacrimal_right"),
}
TORSO_REGION_NAMES = ("body", "lung_left", "lung_right", "liver", "spleen", "kidney_left_cortex", "kidney_left_medulla",
                      "kidney_right_cortex", "kidney_right_medulla", "bladder", "spine", "pelvis", "skull", "brain",
                      "parotid_left", "parotid_right", "submandibular_left", "submandibular_right",
                      "lacrimal_left", "lacrimal_right")  # label = index + 1; lesion_k follow

TORSO_HU = {"body": 20.0, "lung": HU_LUNG, "liver": 55.0, "spleen": 45.0, "kidney_cortex": 35.0,
            "kidney_medulla": 30.0, "bladder": 5.0, "bone": HU_BONE, "brain": 35.0, "parotid": 10.0,
            "submandibular": 40.0, "lacrimal": 40.0, "lesion_liver": 45.0, "lesion_node": 40.0, "lesion_bone": HU_BONE}

# Lymph-node stations in the reference body frame: (|u| or u range, v range, h range) in mm;
# bilateral stations are mirrored at random.
_NODE_STATIONS = {
    "para_aortic": ((-18.0, 18.0), (10.0, 28.0), (190.0, 320.0), False),
    "common_iliac": ((40.0, 55.0), (10.0, 30.0), (100.0, 160.0), True),
    "mediastinal": ((-12.0, 12.0), (-25.0, 15.0), (400.0, 500.0), False),
    "supraclavicular": ((35.0, 55.0), (-5.0, 15.0), (575.0, 610.0), True),
}
_LESION_MAX_DIAMETER_MM = {"liver": 40.0, "spine": 26.0, "pelvis": 28.0, "node": 30.0}
_LESION_MIN_DIAMETER_MM = 8.0


def _ellipsoid_ml(semi) -> float:
    return 4.0 / 3.0 * math.pi * float(np.prod(semi)) / 1000.0


def torso_phantom(seed: int = 0, voxel_mm: float = 4.4196, shape=None, tracer: str = "PSMA",
                  injected_MBq: float = 7400.0, bed: str | float | None = None,
                  centre_lps_mm=DEFAULT_CENTRE_LPS_MM, variability: float = 1.0, supersample: int = 4) -> Phantom:
    """Anthropomorphic 177Lu patient about 24 h after ``injected_MBq`` of 177Lu-PSMA-617 or -DOTATATE.

    Anatomy (analytic solids in a body frame: u = x to the patient's left, v = y posterior,
    h = height above the pubic symphysis; z = centre_z + h - field centre): elliptical trunk
    (semi-axes 160 x 112 mm, from below the field to the shoulders at h 560 mm, with a rounded
    top), neck, a face/jaw block and head (vertex h ~ 890 mm); lungs, liver (right), spleen
    (left), kidneys (cortex shell 8 mm over a medulla, turned 30 degrees about z), bladder,
    spine (HU 700, thoraco-lumbar and cervical), iliac wings, skull (cranium, HU 700) over the
    brain, parotid and submandibular glands beside and below the jaw, and lacrimal glands in
    the upper outer orbits. Every organ is clipped to the body outline. Then 2 to 6 spherical
    lesions of 8-40 mm in the liver, spine, iliac bone or lymph-node stations (para-aortic,
    common iliac, mediastinal, supraclavicular), only where they fit in the field; a lesion
    replaces the tissue it covers (bone lesions take bone HU: sclerotic).

    Field: the grid is centred on ``centre_lps_mm`` and on height ``bed`` (a name in
    ``TORSO_BEDS_MM`` or a height in mm). With ``shape=None`` the grid holds the whole modelled
    body: (96, 96, 232) at 4.4196 mm (424 x 424 x 1025 mm). A shorter field shows one bed:
    ``bed=None`` then means ``'abdomen'``; organs outside the field are simply absent from
    ``label_names`` and ``regions`` (the salivary and lacrimal glands lie about 450 mm above the
    kidneys, so no 40 cm bed holds both; ``'head_thorax'`` holds the glands). The body is shrunk
    when needed to fit in-plane (the field must be at least 280 mm wide).

    Randomness: ``seed`` fixes everything (separate streams for anatomy, uptake and lesions).
    For one field of view the phantom is the same at every voxel size (so a phantom drawn 2x
    finer for projection matches its truth on the reconstruction grid); in another field the
    anatomy and uptakes stay those of the seed (unless the body had to shrink to fit), while the
    lesions are drawn where that field can hold them. Body width/depth vary by +-12/13%, height
    by +-6%, head size by +-5%, organ sizes by +-12%, organ positions by +-8 mm (head +-3 mm),
    bladder filling 0.5-1.6x, uptakes by a log-normal factor (sigma 0.2, clipped at 2 sigma), the
    cortex:medulla ratio by +-20%. ``variability``
    scales all of these (0: the reference patient, with lesions still drawn from ``seed``).

    Uptake, 24 h p.i. (``TORSO_UPTAKE``). Whole organs hold ``fraction_of_injected`` x
    ``injected_MBq`` (physical activity at the scan); the concentration is that over the organ's
    analytic volume, so a cut organ keeps its true concentration. Other tissue is set by SUV
    (C = SUV x injected x 2^(-24 h / 159.5 h) / 80 kg; SUV 1 = 0.0834 MBq/mL for 7.4 GBq).

    ========================  =======================  =========================  =========================
    region                    PSMA-617                 DOTATATE                   volume (reference)
    ========================  =======================  =========================  =========================
    kidneys (both)            2.5 %IA  (185 MBq)       2.2 %IA  (163 MBq)         2 x 152 mL (cortex 60%)
    - cortex : medulla        3 : 1 (concentration)    3 : 1                      -> PSMA 0.83 / 0.28 MBq/mL
    liver                     2.5 %IA  (185 MBq)       3.0 %IA  (222 MBq)         1.7 L -> 0.11 / 0.13 MBq/mL
    spleen                    0.25 %IA (18.5 MBq)      1.2 %IA  (89 MBq)          205 mL
    salivary (2 par + 2 sub)  0.8 %IA  (59 MBq)        0.08 %IA (5.9 MBq)         2 x 29 + 2 x 7 mL -> 0.82 MBq/mL PSMA
    lacrimal (2)              0.03 %IA (2.2 MBq)       0.003 %IA                  2 x 0.67 mL -> 1.7 MBq/mL PSMA
    bladder content           0.5 %IA  (37 MBq)        0.5 %IA                    240 mL x filling
    soft tissue (body)        SUV 0.3  (0.025 MBq/mL)  SUV 0.3                    rest of the body
    lungs                     SUV 0.1                  SUV 0.1
    bone (marrow) / brain     SUV 0.3 / 0.03           SUV 0.4 / 0.03
    lesions                   SUV 6-40 (0.5-3.3 MBq/mL) SUV 8-60 (0.7-5 MBq/mL) log-uniform; 8-40 mm
    ========================  =======================  =========================  =========================

    Sources and assumptions: organ fractions are derived from published absorbed doses per
    injected activity with a mono-exponential retention, fraction(24 h) = D/A0 x m / E x
    lambda_eff x exp(-lambda_eff 24 h), E = 147.9 keV of electrons per 177Lu decay. PSMA-617:
    kidneys 0.4-0.8 Gy/GBq, salivary glands 0.6-1.9 Gy/GBq, liver ~0.1 Gy/GBq, red marrow
    ~0.03 Gy/GBq, lacrimal glands 0.4-2.8 Gy/GBq (Kratochwil et al. J Nucl Med 2016; Delker et
    al. EJNMMI 2016; Violet et al. J Nucl Med 2019; Demirkol et al. Mol Imaging Radionucl Ther
    2017, which also gives 56 % urinary excretion by 24 h), effective half-lives 35-50 h; e.g.
    kidneys 0.6 Gy/GBq x 0.3 kg, T_eff 35 h -> 2.6 %IA at 24 h. DOTATATE (Lutathera label;
    Sandstrom et al. J Nucl Med 2013): kidneys ~0.65, spleen ~0.85 Gy/GBq, T_eff 50-70 h;
    negligible salivary uptake. The SUVs of soft tissue, lungs, marrow and lesions are typical
    24 h values, not from one study. The dose ranges are quoted from memory of those papers,
    not re-checked here: the numbers are plausible for a study design, not a patient model; the
    bladder content at 24 h depends on voiding and is a pure assumption. Head-and-neck bed of
    seed 0 with ``ACQUISITION_177LU`` gives about 2.3e6 photopeak counts in 60 views of 25 s,
    1.6x the real GE study's bed 1 (1.39e6; its activity and time are not known).

    Labels: ``TORSO_REGION_NAMES`` in that order (1, 2, ...) and ``lesion_1`` ... after them.
    ``regions[name]``: ``label``, ``group`` (key of ``TORSO_GROUPS`` or 'lesions'),
    ``concentration_MBq_per_mL``, ``voxelised_volume_ml`` and ``activity_MBq`` (what the field
    holds); whole organs also ``volume_ml`` (analytic) and ``group_activity_MBq`` (the uptake
    group's whole activity); lesions ``centre_lps_mm``, ``diameter_mm``, ``volume_ml``, ``site``.
    """
    if tracer not in TORSO_UPTAKE:
        raise SSPECTError(f"Unknown tracer '{tracer}'; choose one of {', '.join(TORSO_UPTAKE)}.")
    if injected_MBq <= 0 or voxel_mm <= 0:
        raise SSPECTError("The injected activity and the voxel size must be positive.")
    voxel_mm = float(voxel_mm)
    if shape is None:
        shape = (_even_ceil(_TORSO_WHOLE_FIELD_MM[0] / voxel_mm),) * 2 + (_even_ceil(_TORSO_WHOLE_FIELD_MM[1] / voxel_mm),)
        bed = "whole_body" if bed is None else bed
    shape = tuple(int(n) for n in shape)
    _check_square_grid(shape, "torso_phantom")
    field_xy, field_h = shape[0] * voxel_mm, shape[2] * voxel_mm
    if bed is None:
        bed = "whole_body" if field_h >= _TORSO_WHOLE_FIELD_MM[1] - 20 else "abdomen"
    if isinstance(bed, str):
        if bed not in TORSO_BEDS_MM:
            raise SSPECTError(f"Unknown bed '{bed}'; choose one of {', '.join(TORSO_BEDS_MM)} or give a height in mm.")
        h_centre = TORSO_BEDS_MM[bed]
    else:
        h_centre = float(bed)
    if field_xy < 280.0:
        raise SSPECTError(f"The field is {field_xy:.0f} mm wide; the torso needs at least 280 mm (more voxels or larger ones).")

    cx, cy, cz = (float(c) for c in centre_lps_mm)
    origin = centred_origin(shape, voxel_mm, (cx, cy, cz))
    grid = _Grid(shape, voxel_mm, origin)
    h_lo, h_hi = h_centre - field_h / 2, h_centre + field_h / 2

    def lps(u, v, h):
        return (cx + u, cy + v, cz + h - h_centre)

    rng = np.random.default_rng([int(seed), 1])  # anatomy

    def factor(spread):
        return 1.0 + variability * rng.uniform(-spread, spread)

    def jitter(mm):
        return variability * rng.uniform(-mm, mm)

    sa, sb, sh, hs = factor(0.12), factor(0.13), factor(0.06), factor(0.05)
    sa = min(sa, 0.46 * field_xy / 160.0)
    sb = min(sb, 0.46 * field_xy / 112.0)
    a_body, b_body = 160.0 * sa, 112.0 * sb

    def trunk_organ(u, v, h, semi, spread=0.12, shift=8.0, scale_with_body=False):
        s = factor(spread)
        centre = (u * sa + jitter(shift), v * sb + jitter(shift), h * sh + jitter(shift))
        body = (sa, sb, sh) if scale_with_body else (math.sqrt(sa), math.sqrt(sb), sh)
        return centre, tuple(semi[a] * s * body[a] for a in range(3))

    head_h = 790.0 * sh

    def head_organ(u, v, h, semi, spread=0.12, shift=3.0):
        s = factor(spread)
        centre = (u * hs + jitter(shift), v * hs + jitter(shift), head_h + (h - 790.0) * hs + jitter(shift))
        return centre, tuple(x * s * hs for x in semi)

    def ellipsoid(centre, semi, angle=0.0):
        return _ellipsoid(lps(*centre), semi, angle)

    def prism(u, v, semi, h0, h1):
        return _elliptic_prism(lps(u, v, 0.0)[:2], semi, lps(0, 0, h0)[2], lps(0, 0, h1)[2])

    # Body outline: trunk with a rounded top, neck, face/jaw block, head.
    shoulder_h, neck_top_h = 560.0 * sh, 680.0 * sh
    body = prism(0, 0, (a_body, b_body), -400.0, shoulder_h) \
        | ellipsoid((0, 0, shoulder_h), (a_body, b_body, 60.0 * sh)) \
        | prism(0, 10.0 * hs, (56.0 * hs, 60.0 * hs), 520.0 * sh, neck_top_h) \
        | prism(0, 0, (70.0 * hs, 84.0 * hs), head_h - 150.0 * hs, head_h - 30.0 * hs) \
        | ellipsoid((0, 3.0 * hs, head_h), (80.0 * hs, 104.0 * hs, 100.0 * hs))

    anatomy = {}
    anatomy["lung_left"] = trunk_organ(78, 5, 465, (52, 72, 120), scale_with_body=True)
    anatomy["lung_right"] = trunk_organ(-78, 5, 465, (52, 72, 120), scale_with_body=True)
    anatomy["liver"] = trunk_organ(-62, -5, 300, (88, 68, 68))
    anatomy["spleen"] = trunk_organ(82, 35, 320, (28, 38, 46))
    anatomy["kidney_left"] = trunk_organ(58, 52, 235, (30, 22, 55))
    anatomy["kidney_right"] = trunk_organ(-58, 52, 215, (30, 22, 55))
    filling = math.exp(variability * rng.uniform(math.log(0.5), math.log(1.6)))
    bladder_centre, bladder_semi = trunk_organ(0, -25, 45, (42, 36, 38), spread=0.0)
    bladder_semi = tuple(x * filling ** (1 / 3) for x in bladder_semi)
    spine_u, spine_v = jitter(3.0), 62.0 * sb + jitter(4.0)
    spine_h = (110.0 * sh, shoulder_h)
    wing_left = trunk_organ(88, 25, 130, (20, 40, 50))
    wing_right = trunk_organ(-88, 25, 130, (20, 40, 50))
    cranium = head_organ(0, 12, 805, (70, 88, 82), spread=0.03)
    parotid_left = head_organ(46, 15, 700, (13, 22, 24))
    parotid_right = head_organ(-46, 15, 700, (13, 22, 24))
    submandibular_left = head_organ(34, -25, 655, (11, 14, 11))
    submandibular_right = head_organ(-34, -25, 655, (11, 14, 11))
    lacrimal_left = head_organ(33, -72, 770, (8, 5, 4), shift=1.5)
    lacrimal_right = head_organ(-33, -72, 770, (8, 5, 4), shift=1.5)

    hu = TORSO_HU
    solids = [("body", body, hu["body"])]
    for side in ("left", "right"):
        solids.append((f"lung_{side}", ellipsoid(*anatomy[f"lung_{side}"]) & body, hu["lung"]))
    solids.append(("liver", ellipsoid(*anatomy["liver"]) & body, hu["liver"]))
    solids.append(("spleen", ellipsoid(*anatomy["spleen"]) & body, hu["spleen"]))
    medulla_semi = {}
    for side, angle in (("left", -30.0), ("right", 30.0)):
        centre, semi = anatomy[f"kidney_{side}"]
        medulla_semi[side] = tuple(max(x - 8.0, 0.4 * x) for x in semi)
        solids.append((f"kidney_{side}_cortex", ellipsoid(centre, semi, angle) & body, hu["kidney_cortex"]))
        solids.append((f"kidney_{side}_medulla", ellipsoid(centre, medulla_semi[side], angle) & body, hu["kidney_medulla"]))
    solids.append(("bladder", ellipsoid(bladder_centre, bladder_semi) & body, hu["bladder"]))
    solids.append(("spine", (prism(spine_u, spine_v, (17.0, 15.0), *spine_h)
                             | prism(spine_u, 32.0 * hs, (13.0, 12.0), shoulder_h - 20.0, head_h - 55.0 * hs)) & body,
                   hu["bone"]))
    solids.append(("pelvis", (ellipsoid(*wing_left, angle=-20.0) | ellipsoid(*wing_right, angle=20.0)) & body, hu["bone"]))
    brain_semi = tuple(x - 7.0 for x in cranium[1])
    solids.append(("skull", ellipsoid(*cranium) & body, hu["bone"]))
    solids.append(("brain", ellipsoid(cranium[0], brain_semi) & body, hu["brain"]))
    for name, organ, tissue in (("parotid_left", parotid_left, "parotid"), ("parotid_right", parotid_right, "parotid"),
                                ("submandibular_left", submandibular_left, "submandibular"),
                                ("submandibular_right", submandibular_right, "submandibular"),
                                ("lacrimal_left", lacrimal_left, "lacrimal"), ("lacrimal_right", lacrimal_right, "lacrimal")):
        solids.append((name, ellipsoid(*organ) & body, hu[tissue]))

    analytic_ml = {
        "liver": _ellipsoid_ml(anatomy["liver"][1]), "spleen": _ellipsoid_ml(anatomy["spleen"][1]),
        "bladder": _ellipsoid_ml(bladder_semi),
        "parotid_left": _ellipsoid_ml(parotid_left[1]), "parotid_right": _ellipsoid_ml(parotid_right[1]),
        "submandibular_left": _ellipsoid_ml(submandibular_left[1]),
        "submandibular_right": _ellipsoid_ml(submandibular_right[1]),
        "lacrimal_left": _ellipsoid_ml(lacrimal_left[1]), "lacrimal_right": _ellipsoid_ml(lacrimal_right[1]),
    }
    for side in ("left", "right"):
        outer, inner = _ellipsoid_ml(anatomy[f"kidney_{side}"][1]), _ellipsoid_ml(medulla_semi[side])
        analytic_ml[f"kidney_{side}_cortex"], analytic_ml[f"kidney_{side}_medulla"] = outer - inner, inner

    # Lesions, drawn where the field can hold them.
    uptake = TORSO_UPTAKE[tracer]
    suv_unit = injected_MBq * 2.0 ** (-TORSO_HOURS_POST_INJECTION / LU177_HALF_LIFE_H) / TORSO_REFERENCE_MASS_G
    lesion_rng = np.random.default_rng([int(seed), 3])
    lesions = _draw_lesions(lesion_rng, uptake, anatomy, wing_left, wing_right, (spine_u, spine_v, spine_h),
                            (sa, sb, sh), (h_lo, h_hi))
    for k, lesion in enumerate(lesions, start=1):
        lesion["name"] = f"lesion_{k}"
        lesion["concentration"] = lesion["suv"] * suv_unit
        solids.append((lesion["name"], _sphere(lps(*lesion["centre"]), lesion["diameter"]) & body,
                       hu["lesion_bone" if lesion["site"] in ("spine", "pelvis") else f"lesion_{lesion['site']}"]))

    # Concentrations: whole-organ activity over the analytic volume, SUV for the rest.
    uptake_rng = np.random.default_rng([int(seed), 2])
    spread = {group: math.exp(variability * 0.2 * float(np.clip(uptake_rng.standard_normal(), -2, 2)))
              for group in TORSO_GROUPS}
    cortex_ratio = uptake["kidney_cortex_to_medulla"] * (1.0 + variability * uptake_rng.uniform(-0.2, 0.2))
    concentration, group_activity = {}, {}
    for group, fraction in uptake["fraction_of_injected"].items():
        members = TORSO_GROUPS[group]
        relative = {m: cortex_ratio if m.endswith("_cortex") else 1.0 for m in members}
        total = fraction * injected_MBq * spread[group]
        per_relative = total / sum(relative[m] * analytic_ml[m] for m in members)
        for m in members:
            concentration[m] = relative[m] * per_relative
        group_activity[group] = total
    for group, suv in uptake["suv"].items():
        for m in TORSO_GROUPS[group]:
            concentration[m] = suv * spread[group] * suv_unit
    for lesion in lesions:
        concentration[lesion["name"]] = lesion["concentration"]

    # Lesions are small: their sub-voxel points are counted twice as finely.
    layers = _paint(grid, [(name, solid, tissue_hu, 2 * supersample if name.startswith("lesion_") else supersample)
                           for name, solid, tissue_hu in solids])
    weights = _region_weights(grid, layers)
    label_ids = {name: i + 1 for i, name in enumerate(TORSO_REGION_NAMES)}
    label_ids.update({lesion["name"]: len(TORSO_REGION_NAMES) + k for k, lesion in enumerate(lesions, start=1)})
    activity, hu_array, labels, present = _render(grid, layers, weights, concentration, label_ids)

    group_of = {m: g for g, members in TORSO_GROUPS.items() for m in members}
    regions = {}
    for name in present:
        voxelised = float(weights[name][1].sum(dtype=np.float64) * grid.voxel_ml)
        info = {"label": label_ids[name], "group": group_of.get(name, "lesions"),
                "concentration_MBq_per_mL": float(concentration.get(name, 0.0)),
                "voxelised_volume_ml": voxelised,
                "activity_MBq": float(concentration.get(name, 0.0)) * voxelised}
        if name in analytic_ml:
            info["volume_ml"] = analytic_ml[name]
        if info["group"] in group_activity:
            info["group_activity_MBq"] = group_activity[info["group"]]
        regions[name] = info
    for lesion in lesions:
        if lesion["name"] in regions:
            regions[lesion["name"]].update({
                "centre_lps_mm": tuple(round(c, 9) for c in lps(*lesion["centre"])), "diameter_mm": lesion["diameter"],
                "volume_ml": math.pi / 6 * lesion["diameter"] ** 3 / 1000.0, "site": lesion["site"],
                "suv": lesion["suv"]})
    return Phantom(activity, hu_array, labels, present, (voxel_mm,) * 3, origin, regions=regions)


def _draw_lesions(rng, uptake, anatomy, wing_left, wing_right, spine, body_scale, field_h) -> list[dict]:
    """2-6 non-overlapping spherical lesions at sites that fit inside the field's height."""
    sa, sb, sh = body_scale
    spine_u, spine_v, (spine_h0, spine_h1) = spine
    h_lo, h_hi = field_h
    margin = 2.0

    def unit_ball_point(scale):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        return direction * scale * rng.uniform() ** (1 / 3)

    def in_organ(organ, scale):
        centre, semi = organ
        return tuple(np.asarray(centre) + np.asarray(semi) * unit_ball_point(scale))

    def h_span(site):
        """Height range of lesion centres at this site (body frame, mm)."""
        if site == "liver":
            c, s = anatomy["liver"]
            return c[2] - 0.6 * s[2], c[2] + 0.6 * s[2]
        if site == "spine":
            return spine_h0, spine_h1
        if site == "pelvis":
            return min(w[0][2] - 0.45 * w[1][2] for w in (wing_left, wing_right)), \
                max(w[0][2] + 0.45 * w[1][2] for w in (wing_left, wing_right))
        spans = [(h[0] * sh, h[1] * sh) for _, _, h, _ in _NODE_STATIONS.values()]
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def fits_height(h, radius):
        return h_lo + radius + margin <= h <= h_hi - radius - margin

    n_lesions = int(rng.integers(2, 7))
    sites = [s for s in uptake["lesion_sites"]
             if h_span(s)[1] >= h_lo + _LESION_MIN_DIAMETER_MM / 2 + margin
             and h_span(s)[0] <= h_hi - _LESION_MIN_DIAMETER_MM / 2 - margin]
    lesions: list[dict] = []
    if not sites:
        return lesions
    p = np.asarray([uptake["lesion_sites"][s] for s in sites], float)
    p /= p.sum()
    suv_lo, suv_hi = uptake["lesion_suv"]
    for _ in range(n_lesions):
        for _attempt in range(100):
            site = sites[int(rng.choice(len(sites), p=p))]
            diameter = float(math.exp(rng.uniform(math.log(_LESION_MIN_DIAMETER_MM),
                                                  math.log(_LESION_MAX_DIAMETER_MM[site]))))
            radius = diameter / 2
            if site == "liver":
                centre = in_organ(anatomy["liver"], 0.6)
            elif site == "pelvis":
                centre = in_organ(wing_left if rng.uniform() < 0.5 else wing_right, 0.45)
            elif site == "spine":
                centre = (spine_u + rng.uniform(-3, 3), spine_v + rng.uniform(-3, 3),
                          rng.uniform(spine_h0 + radius, spine_h1 - radius))
            else:
                stations = list(_NODE_STATIONS.values())
                u_range, v_range, h_range, bilateral = stations[int(rng.integers(len(stations)))]
                u = rng.uniform(*u_range) * (rng.choice((-1.0, 1.0)) if bilateral else 1.0)
                centre = (u * sa, rng.uniform(*v_range) * sb, rng.uniform(*h_range) * sh)
            centre = tuple(float(c) for c in centre)
            if not fits_height(centre[2], radius):
                continue
            if any(math.dist(centre, other["centre"]) < radius + other["diameter"] / 2 + margin for other in lesions):
                continue
            suv = float(math.exp(rng.uniform(math.log(suv_lo), math.log(suv_hi))))
            lesions.append({"site": site, "centre": centre, "diameter": diameter, "suv": suv})
            break
    return lesions


# ==============================================================================================
# Count levels like a clinical 177Lu acquisition
# ==============================================================================================

@dataclass(frozen=True)
class AcquisitionSettings:
    """A clinical 177Lu SPECT acquisition, for simulating realistic count levels.

    ``sensitivity_cps_per_mbq``: photopeak (208 keV +-10%) counts per second per MBq seen by one
    detector head with a medium-energy (GE MEGP / Siemens ME) collimator, for a source in air
    (planar sensitivity): 9 cps/MBq, an assumption in the 8-11 cps/MBq range of published 177Lu
    ME/MEGP calibrations (the same value as the demo study). Each view is one head's frame, so
    expected counts per view = sensitivity x frame duration x attenuated activity.
    Frame duration and view count are those of the real GE study in shared/data (60 views of
    25 s, 128 x 128 pixels of 4.4196 mm, orbit radius 253.7 mm): 1.39e6 photopeak counts.
    """

    sensitivity_cps_per_mbq: float = 9.0
    frame_duration_s: float = 25.0
    n_views: int = 60
    pixel_mm: float = 4.4196
    matrix: int = 128
    radius_mm: float = 253.7
    collimator: str = "GI-MEGP"

    def counts_scale(self, voxel_volume_ml: float) -> float:
        """``simulate_projections``' counts_scale for an activity image in MBq/mL."""
        return realistic_counts_scale(voxel_volume_ml, self.sensitivity_cps_per_mbq, self.frame_duration_s)


ACQUISITION_177LU = AcquisitionSettings()
REAL_GE_STUDY_PHOTOPEAK_COUNTS = 1.39e6  # shared/data/lu177_ge670, bed 1, 60 views x 25 s


def realistic_counts_scale(voxel_volume_ml: float, sensitivity_cps_per_mbq: float = ACQUISITION_177LU.sensitivity_cps_per_mbq,
                           frame_duration_s: float = ACQUISITION_177LU.frame_duration_s) -> float:
    """Expected primary counts per view per (MBq/mL) of voxel value, before attenuation.

    = sensitivity (cps/MBq) x frame duration (s) x voxel volume (mL): pass it as
    ``simulate_projections(..., counts_scale=...)`` for an activity image in MBq/mL.
    """
    if voxel_volume_ml <= 0 or sensitivity_cps_per_mbq <= 0 or frame_duration_s <= 0:
        raise SSPECTError("Voxel volume, sensitivity and frame duration must be positive.")
    return float(sensitivity_cps_per_mbq) * float(frame_duration_s) * float(voxel_volume_ml)
