"""The embedded demo's phantom: a small torso of plain ellipsoids, each voxel in one organ (no
partial volume, unlike the NEMA and torso phantoms), so it is quick to draw on any grid."""
from __future__ import annotations

import numpy as np

from .geometry import (DEFAULT_CENTRE_LPS_MM, HU_AIR, HU_BONE, HU_LUNG, Phantom, centred_origin,
                       voxel_centres_mm)

# Reference anatomy is laid out for a 384 mm field of view (48 voxels of 8 mm); smaller grids
# get the same anatomy scaled down so that the body always fits inside the field of view.
_REFERENCE_FOV_MM = 384.0

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
    x, y, z = voxel_centres_mm(shape, voxel_mm, origin)
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

