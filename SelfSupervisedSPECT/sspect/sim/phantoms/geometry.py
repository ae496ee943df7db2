"""What every digital phantom shares: the truth container (:class:`Phantom`), where a grid sits
(:func:`centred_origin`) and the partial-volume voxelisation of analytic solids, so that each
phantom module beside this one (demo, point_source, nema, torso) only describes its anatomy.

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

HU_AIR = -1000.0
HU_LUNG = -750.0
HU_BONE = 700.0


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


def voxel_centres_mm(shape, voxel_mm: float, origin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS x, y, z of the voxel centres, as sparse broadcastable axes."""
    axes = [origin[a] + voxel_mm * np.arange(shape[a]) for a in range(3)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


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
class Solid:
    """A region of space: its membership test, bounding box and one inside point; & and | combine solids."""

    inside: _Predicate
    lo: tuple  # bounding box, LPS mm
    hi: tuple
    point: tuple  # a point inside (keeps solids smaller than a voxel from being missed)

    def __and__(self, other: "Solid") -> "Solid":
        return Solid(lambda x, y, z: self.inside(x, y, z) & other.inside(x, y, z),
                     tuple(max(a, b) for a, b in zip(self.lo, other.lo)),
                     tuple(min(a, b) for a, b in zip(self.hi, other.hi)), self.point)

    def __or__(self, other: "Solid") -> "Solid":
        return Solid(lambda x, y, z: self.inside(x, y, z) | other.inside(x, y, z),
                     tuple(min(a, b) for a, b in zip(self.lo, other.lo)),
                     tuple(max(a, b) for a, b in zip(self.hi, other.hi)), self.point)


def ellipsoid(centre, semi_axes, angle_deg: float = 0.0) -> Solid:
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
    return Solid(inside, (cx - half[0], cy - half[1], cz - half[2]), (cx + half[0], cy + half[1], cz + half[2]),
                 (cx, cy, cz))


def sphere(centre, diameter_mm: float) -> Solid:
    r = diameter_mm / 2.0
    return ellipsoid(centre, (r, r, r))


def elliptic_prism(centre_xy, semi_xy, z_lo: float, z_hi: float) -> Solid:
    """Elliptic cylinder along z between two transverse planes."""
    cx, cy = (float(c) for c in centre_xy)
    a, b = (float(s) for s in semi_xy)

    def inside(x, y, z):
        return (((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0) & (z >= z_lo) & (z <= z_hi)

    return Solid(inside, (cx - a, cy - b, z_lo), (cx + a, cy + b, z_hi), (cx, cy, (z_lo + z_hi) / 2))


@dataclass(frozen=True)
class Grid:
    """Where a phantom's voxels lie: shape, isotropic voxel size and the LPS centre of voxel 0."""

    shape: tuple
    voxel_mm: float
    origin: tuple

    @property
    def voxel_ml(self) -> float:
        return self.voxel_mm ** 3 / 1000.0

    def bounds_mm(self, axis: int) -> tuple[float, float]:
        """Outer faces of the first and last voxel along ``axis``."""
        return (self.origin[axis] - self.voxel_mm / 2, self.origin[axis] + (self.shape[axis] - 0.5) * self.voxel_mm)


def _occupancy(solid: Solid, grid: Grid, n_sub: int):
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


def paint(grid: Grid, solids) -> list[_Layer]:
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


def region_weights(grid: Grid, layers) -> dict[str, tuple]:
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


def render(grid: Grid, layers, weights, concentration: dict, label_ids: dict):
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
    for name, (ranges, weight) in weights.items():
        box = _local(ranges, ((0, 0), (0, 0), (0, 0)))
        activity[box] += concentration.get(name, 0.0) * weight
        wins = weight > best[box]
        if not wins.any() and weight.max() > 0:  # smaller than half a voxel: its fullest voxel
            wins = weight == weight.max()
        if wins.any():
            labels[box][wins] = label_ids[name]
            best[box][wins] = weight[wins]
    for name in weights:
        if np.any(labels == label_ids[name]):
            present[name] = label_ids[name]
    return activity, hu, labels, present


def check_square_grid(shape, who: str):
    if len(shape) != 3 or shape[0] != shape[1]:
        raise SSPECTError(f"{who} needs a square axial grid [L, L, Lz] (PyTomography rotates it); got {tuple(shape)}.")


def even_ceil(value: float) -> int:
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
    grid = Grid(phantom.labels.shape, float(phantom.spacing[0]), tuple(phantom.origin))
    out = np.zeros(grid.shape, np.float32)
    occupied = _occupancy(sphere(info["centre_lps_mm"], info["diameter_mm"]), grid, supersample)
    if occupied is not None:
        out[_local(occupied[0], ((0, 0), (0, 0), (0, 0)))] = occupied[1]
    return out

