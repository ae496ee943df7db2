"""Digital phantoms with known truth for simulated 177Lu SPECT/CT studies.

Arrays are indexed [i, j, k] = [x, y, z] in DICOM LPS (x -> patient left, y -> posterior,
z -> superior) with identity direction, the same layout as PyTomography's object arrays, so a
phantom projects without any reordering and its truth lines up with a reconstruction voxel
for voxel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
