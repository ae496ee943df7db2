"""NEMA IEC and anthropomorphic torso phantoms, and clinical count levels."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sspect.errors import SSPECTError
from sspect.sim.acquisition import ACQUISITION_177LU, REAL_GE_STUDY_PHOTOPEAK_COUNTS, realistic_counts_scale
from sspect.sim.phantoms.geometry import sphere_occupancy
from sspect.sim.phantoms.nema import NEMA_SPHERE_DIAMETERS_MM, nema_iec_phantom
from sspect.sim.phantoms.torso import TORSO_GROUPS, TORSO_REGION_NAMES, TORSO_UPTAKE, torso_phantom

VOXEL = 4.4196  # the real study's pixel
COARSE = 2 * VOXEL


@pytest.fixture(scope="module")
def nema8():
    return nema_iec_phantom(voxel_mm=VOXEL, sphere_to_background=8.0, background_MBq_per_mL=0.1)


def _box(phantom, centre, radius_mm, margin_voxels=1):
    """Index box around a sphere, ``margin_voxels`` beyond its surface."""
    spacing = phantom.spacing[0]
    lo = np.floor((np.asarray(centre) - radius_mm - np.asarray(phantom.origin)) / spacing).astype(int) - margin_voxels
    hi = np.ceil((np.asarray(centre) + radius_mm - np.asarray(phantom.origin)) / spacing).astype(int) + margin_voxels + 1
    return tuple(slice(a, b) for a, b in zip(lo, hi))


# ---------------------------------------------------------------------------------------------
# NEMA IEC body phantom
# ---------------------------------------------------------------------------------------------

def test_nema_default_grid_and_labels(nema8):
    assert nema8.activity.shape == (72, 72, 48)  # square axial planes for the projector
    assert nema8.spacing == (VOXEL,) * 3
    expected = ["background", "lung_insert"] + [f"sphere_{d:g}" for d in NEMA_SPHERE_DIAMETERS_MM]
    assert list(nema8.label_names) == expected
    for name, label in nema8.label_names.items():
        assert np.any(nema8.labels == label), name
    assert nema8.labels.dtype == np.uint8 and nema8.activity.dtype == np.float32
    centre = np.asarray(nema8.origin) + (np.asarray(nema8.activity.shape) - 1) / 2 * VOXEL
    np.testing.assert_allclose(centre, (0.0, 0.0, -200.0), atol=1e-9)  # grid centred on the phantom
    # About 9.7 L of water inside, less the lung insert and the spheres.
    assert 9.1e3 < nema8.regions["background"]["voxelised_volume_ml"] < 9.5e3


@pytest.mark.parametrize("diameter", NEMA_SPHERE_DIAMETERS_MM)
def test_nema_sphere_volume_and_activity_are_partial_volume_correct(nema8, diameter):
    name = f"sphere_{diameter:g}"
    info = nema8.regions[name]
    exact_ml = math.pi / 6 * diameter ** 3 / 1000
    assert info["diameter_mm"] == diameter and abs(info["volume_ml"] - exact_ml) < 1e-12
    tolerance = 0.10 if diameter < 12 else 0.05
    occupancy = sphere_occupancy(nema8, name)
    assert abs(occupancy.sum() * nema8.voxel_volume_ml / exact_ml - 1) < tolerance
    # The activity array itself: everything above background around the sphere is the sphere's
    # excess, (C_sphere - C_bkg) x V, however the surface cuts the voxels.
    box = _box(nema8, info["centre_lps_mm"], diameter / 2)
    excess_mbq = (nema8.activity[box] - 0.1).sum(dtype=np.float64) * nema8.voxel_volume_ml
    assert abs(excess_mbq / ((0.8 - 0.1) * exact_ml) - 1) < tolerance
    # The activity's centroid is the sphere's centre.
    excess = nema8.activity[box] - 0.1
    index = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), axis=-1)
    centroid = np.asarray(nema8.origin) + VOXEL * (index * excess[..., None]).sum((0, 1, 2)) / excess.sum()
    np.testing.assert_allclose(centroid, info["centre_lps_mm"], atol=0.3)


@pytest.mark.parametrize("ratio", [4.0, 8.0])
def test_nema_sphere_to_background_ratio(ratio):
    phantom = nema_iec_phantom(voxel_mm=VOXEL, sphere_to_background=ratio, background_MBq_per_mL=0.05)
    inside = sphere_occupancy(phantom, "sphere_37") == 1.0
    assert inside.sum() >= 100
    from scipy.ndimage import binary_erosion

    background = binary_erosion(phantom.labels == phantom.label_names["background"], iterations=2)
    measured = phantom.activity[inside].mean() / phantom.activity[background].mean()
    assert abs(measured - ratio) < 1e-4
    assert abs(phantom.activity[background].mean() - 0.05) < 1e-6
    for diameter in NEMA_SPHERE_DIAMETERS_MM:
        assert phantom.regions[f"sphere_{diameter:g}"]["concentration_MBq_per_mL"] == pytest.approx(0.05 * ratio)


def test_nema_sphere_layout_and_body(nema8):
    axis_x, axis_y, centre_z = 0.0, 0.0, -200.0
    plane_z = centre_z + 90.0 - 70.0  # 70 mm from the inside of the lid (+z), interior 180 mm long
    angles = []
    for diameter in NEMA_SPHERE_DIAMETERS_MM:
        x, y, z = nema8.regions[f"sphere_{diameter:g}"]["centre_lps_mm"]
        assert math.hypot(x - axis_x, y - axis_y) == pytest.approx(114.4 / 2, abs=1e-6)
        assert z == pytest.approx(plane_z)
        angles.append(math.degrees(math.atan2(y, x)) % 360)
    np.testing.assert_allclose(np.diff(angles), 60.0, atol=1e-6)
    # The D-shaped section: 294 mm wide and 224 mm deep inside, flat on the posterior side.
    water = nema8.labels > 0
    k = int(round((plane_z - nema8.origin[2]) / VOXEL))
    columns = np.nonzero(water[:, :, k].any(axis=1))[0]
    rows = np.nonzero(water[:, :, k].any(axis=0))[0]
    assert abs((columns[-1] - columns[0] + 1) * VOXEL - 294) <= VOXEL
    assert abs((rows[-1] - rows[0] + 1) * VOXEL - 224) <= VOXEL
    anterior_width = water[:, rows[0], k].sum() * VOXEL
    posterior_width = water[:, rows[-1], k].sum() * VOXEL
    assert posterior_width > 100 and anterior_width < posterior_width  # flat base at +y (posterior)
    slices = np.nonzero(water.any(axis=(0, 1)))[0]
    assert abs((slices[-1] - slices[0] + 1) * VOXEL - 180) <= VOXEL
    assert nema8.hu[0, 0, 0] == -1000
    assert nema8.hu.max() > 0  # the acrylic wall shows in the edge voxels
    assert np.all(nema8.activity[nema8.hu <= -999.9] == 0)


def test_nema_lung_insert_is_cold_and_light(nema8):
    lung = nema8.labels == nema8.label_names["lung_insert"]
    assert np.all(nema8.activity[lung] <= 0.1 * 0.5)  # edge voxels share at most half with water
    from scipy.ndimage import binary_erosion

    core = binary_erosion(lung)
    assert core.sum() > 100
    assert np.all(nema8.activity[core] == 0)
    np.testing.assert_allclose(nema8.hu[core], -700.0, atol=1e-3)
    info = nema8.regions["lung_insert"]
    assert info["cylinder_diameter_mm"] == 50.0 and info["concentration_MBq_per_mL"] == 0.0
    assert abs(info["voxelised_volume_ml"] / (math.pi * 2.5 ** 2 * 18.0) - 1) < 0.02


def test_nema_refuses_what_it_cannot_draw():
    with pytest.raises(SSPECTError, match="too small"):
        nema_iec_phantom(voxel_mm=VOXEL, shape=(48, 48, 48))
    with pytest.raises(SSPECTError, match="square"):
        nema_iec_phantom(voxel_mm=VOXEL, shape=(72, 80, 48))
    with pytest.raises(SSPECTError, match="fit"):
        nema_iec_phantom(spheres_mm=(10, 13, 17, 22, 28, 80))


# ---------------------------------------------------------------------------------------------
# Torso
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torso0():
    return torso_phantom(seed=0, voxel_mm=COARSE)  # whole modelled body, bladder to vertex


@pytest.fixture(scope="module")
def reference_torso():
    """The reference patient (no random variation) at the real study's voxel size."""
    return torso_phantom(seed=0, voxel_mm=VOXEL, variability=0.0)


def _lesion_names(phantom):
    return [n for n in phantom.label_names if n.startswith("lesion_")]


def test_torso_is_deterministic_per_seed(torso0):
    again = torso_phantom(seed=0, voxel_mm=COARSE)
    other = torso_phantom(seed=1, voxel_mm=COARSE)
    for array in ("activity", "hu", "labels"):
        np.testing.assert_array_equal(getattr(torso0, array), getattr(again, array))
    assert torso0.regions == again.regions and torso0.label_names == again.label_names
    assert not np.array_equal(torso0.labels, other.labels)
    assert not np.allclose(torso0.activity, other.activity)
    assert [torso0.regions[n]["centre_lps_mm"] for n in _lesion_names(torso0)] != \
        [other.regions[n]["centre_lps_mm"] for n in _lesion_names(other)]


def test_torso_has_every_organ_and_lesion(torso0):
    assert torso0.activity.shape == (48, 48, 116)
    assert list(torso0.label_names)[:len(TORSO_REGION_NAMES)] == list(TORSO_REGION_NAMES)
    for name, label in torso0.label_names.items():
        assert np.count_nonzero(torso0.labels == label) > 0, name
    assert 2 <= len(_lesion_names(torso0)) <= 6
    assert set(torso0.regions) == set(torso0.label_names)
    # Anatomy the right way round: liver on the patient's right (-x), spleen left, glands on top.
    def centroid(name):
        return np.argwhere(torso0.labels == torso0.label_names[name]).mean(axis=0)
    assert centroid("liver")[0] < 24 < centroid("spleen")[0]
    assert centroid("kidney_left_cortex")[0] > 24 > centroid("kidney_right_cortex")[0]
    assert centroid("bladder")[2] < centroid("kidney_left_cortex")[2] < centroid("lung_left")[2] \
        < centroid("submandibular_left")[2] < centroid("parotid_left")[2] < centroid("lacrimal_left")[2]
    assert centroid("spine")[1] > centroid("liver")[1]  # spine posterior
    assert centroid("lacrimal_left")[1] < centroid("parotid_left")[1]  # eyes anterior
    hu = torso0.hu
    assert np.median(hu[torso0.labels == torso0.label_names["spine"]]) == pytest.approx(700, abs=1)
    assert np.median(hu[torso0.labels == torso0.label_names["lung_left"]]) == pytest.approx(-750, abs=1)
    assert hu[0, 0, 0] == -1000 and torso0.activity[0, 0, 0] == 0


def test_torso_organ_totals_are_the_documented_uptakes(reference_torso):
    uptake = TORSO_UPTAKE["PSMA"]["fraction_of_injected"]
    for group, fraction in uptake.items():
        members = TORSO_GROUPS[group]
        nominal = fraction * 7400.0
        truth = sum(reference_torso.regions[m]["activity_MBq"] for m in members)
        assert reference_torso.regions[members[0]]["group_activity_MBq"] == pytest.approx(nominal)
        assert abs(truth / nominal - 1) < 0.03, group  # whole organs inside the body and the field
        if group != "lacrimal_glands":  # 0.7 mL glands: labels at 4.4 mm catch about half
            by_label = sum(reference_torso.total_activity_mbq(m) for m in members)
            assert abs(by_label / nominal - 1) < (0.2 if group == "salivary_glands" else 0.12), group
    suv_unit = 7400.0 * 2 ** (-24 / (6.647 * 24)) / 80000.0
    assert reference_torso.regions["body"]["concentration_MBq_per_mL"] == pytest.approx(0.3 * suv_unit)
    assert reference_torso.regions["liver"]["volume_ml"] == pytest.approx(1705, rel=0.01)


def test_torso_uptakes_vary_within_their_documented_spread():
    for seed in range(3):
        phantom = torso_phantom(seed=seed, voxel_mm=COARSE, shape=(40, 40, 48))  # abdomen bed
        for group in ("kidneys", "liver", "spleen", "bladder"):
            members = [m for m in TORSO_GROUPS[group] if m in phantom.regions]
            nominal = TORSO_UPTAKE["PSMA"]["fraction_of_injected"][group] * 7400.0
            whole = phantom.regions[members[0]]["group_activity_MBq"]
            assert 0.6 < whole / nominal < 1.6, (seed, group)
            held = sum(phantom.regions[m]["activity_MBq"] for m in members)
            assert 0.85 < held / whole < 1.05, (seed, group)  # lesions may take a little


def test_torso_kidney_cortex_is_hotter_than_medulla(reference_torso):
    for side in ("left", "right"):
        cortex = reference_torso.activity[reference_torso.labels == reference_torso.label_names[f"kidney_{side}_cortex"]]
        medulla = reference_torso.activity[reference_torso.labels == reference_torso.label_names[f"kidney_{side}_medulla"]]
        assert cortex.mean() > 1.5 * medulla.mean()
        regions = reference_torso.regions
        assert regions[f"kidney_{side}_cortex"]["concentration_MBq_per_mL"] == pytest.approx(
            3.0 * regions[f"kidney_{side}_medulla"]["concentration_MBq_per_mL"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_torso_lesions_lie_inside_the_body(seed):
    phantom = torso_phantom(seed=seed, voxel_mm=COARSE)
    names = _lesion_names(phantom)
    assert 2 <= len(names) <= 6
    low = np.asarray(phantom.origin) - COARSE / 2
    high = low + np.asarray(phantom.activity.shape) * COARSE
    body_concentration = phantom.regions["body"]["concentration_MBq_per_mL"]
    for name in names:
        info = phantom.regions[name]
        assert 8.0 <= info["diameter_mm"] <= 40.0
        assert info["volume_ml"] == pytest.approx(math.pi / 6 * info["diameter_mm"] ** 3 / 1000)
        assert info["site"] in ("liver", "spine", "pelvis", "node")
        centre, radius = np.asarray(info["centre_lps_mm"]), info["diameter_mm"] / 2
        assert np.all(centre - radius > low) and np.all(centre + radius < high)
        occupancy = sphere_occupancy(phantom, name)
        assert occupancy.sum() * phantom.voxel_volume_ml == pytest.approx(info["volume_ml"], rel=0.1)
        assert np.all(phantom.hu[occupancy > 0] > -900)  # no part of a lesion in the air
        assert info["concentration_MBq_per_mL"] > 5 * body_concentration
        index = tuple(np.round((centre - np.asarray(phantom.origin)) / COARSE).astype(int))
        assert phantom.activity[index] > 2 * body_concentration


def test_torso_is_the_same_phantom_at_two_voxel_sizes():
    """The harness draws the phantom 2x finer for projection and compares with the coarse truth."""
    coarse = torso_phantom(seed=3, voxel_mm=COARSE, shape=(40, 40, 48))
    fine = torso_phantom(seed=3, voxel_mm=VOXEL, shape=(80, 80, 96))
    assert list(coarse.label_names) == list(fine.label_names)
    for name, info in coarse.regions.items():
        for key in ("centre_lps_mm", "diameter_mm", "concentration_MBq_per_mL", "volume_ml"):
            if key in info:
                assert fine.regions[name][key] == pytest.approx(info[key]), (name, key)
    assert fine.total_activity_mbq() == pytest.approx(coarse.total_activity_mbq(), rel=0.01)
    binned = fine.activity.reshape(40, 2, 40, 2, 48, 2).mean(axis=(1, 3, 5))
    assert np.abs(binned - coarse.activity).sum() < 0.02 * coarse.activity.sum()


def test_torso_beds_and_tracers():
    abdomen = torso_phantom(seed=0, voxel_mm=COARSE, shape=(40, 40, 48))  # one 42 cm bed: the abdomen
    assert {"liver", "spleen", "kidney_left_cortex", "kidney_right_medulla", "bladder"} <= set(abdomen.label_names)
    assert not {"parotid_left", "lacrimal_left", "brain"} & set(abdomen.label_names)
    assert 2 <= len(_lesion_names(abdomen)) <= 6
    head = torso_phantom(seed=0, voxel_mm=COARSE, shape=(48, 48, 46), bed="head_thorax")
    assert {"parotid_left", "submandibular_right", "lacrimal_left", "lacrimal_right", "lung_left"} <= set(head.label_names)
    assert "kidney_left_cortex" not in head.label_names
    dotatate = torso_phantom(seed=0, voxel_mm=COARSE, shape=(40, 40, 48), tracer="DOTATATE", variability=0.0)
    psma = torso_phantom(seed=0, voxel_mm=COARSE, shape=(40, 40, 48), tracer="PSMA", variability=0.0)
    assert dotatate.regions["spleen"]["activity_MBq"] > 3 * psma.regions["spleen"]["activity_MBq"]
    with pytest.raises(SSPECTError, match="tracer"):
        torso_phantom(tracer="FDG")
    with pytest.raises(SSPECTError, match="bed"):
        torso_phantom(voxel_mm=COARSE, bed="legs")
    with pytest.raises(SSPECTError, match="280 mm"):
        torso_phantom(voxel_mm=COARSE, shape=(24, 24, 48))


# ---------------------------------------------------------------------------------------------
# Count levels
# ---------------------------------------------------------------------------------------------

def _simulate(phantom, frame_duration_s, n_views, noise=False, seed=0):
    from sspect.sim.acquisition import simulate_projections
    from sspect.sim.dicom_writer import hu_to_mu

    scale = realistic_counts_scale(phantom.voxel_volume_ml, frame_duration_s=frame_duration_s)
    return simulate_projections(phantom.activity, hu_to_mu(phantom.hu, 208.0), phantom.spacing, n_views=n_views,
                                radius_mm=ACQUISITION_177LU.radius_mm, collimator=ACQUISITION_177LU.collimator,
                                counts_scale=scale, noise=noise, seed=seed)


@pytest.fixture(scope="module")
def head_bed():
    """Head, neck and upper thorax in a 407 mm field, like bed 1 of the real GE study."""
    return torso_phantom(seed=0, voxel_mm=COARSE, shape=(48, 48, 46), bed="head_thorax")


def test_realistic_settings_give_the_real_study_count_level(head_bed, one_torch_thread):
    """Photopeak counts per 60 views within a factor 3 of the real bed (1.39e6 in 60 x 25 s).

    32 views on 8.8 mm voxels keep it fast: the expected counts of a view do not depend on how
    many views there are, so the 60-view total is the 32-view total x 60/32 (the same phantom on
    4.4 mm voxels with 60 views gave 2.28e6, against 2.29e6 here).
    """
    assert realistic_counts_scale(0.5) == pytest.approx(9.0 * 25.0 * 0.5)
    assert ACQUISITION_177LU.counts_scale(0.5) == pytest.approx(realistic_counts_scale(0.5))
    sim = _simulate(head_bed, ACQUISITION_177LU.frame_duration_s, 32)
    per_60_views = sim.peak.sum() * ACQUISITION_177LU.n_views / 32
    assert REAL_GE_STUDY_PHOTOPEAK_COUNTS / 3 < per_60_views < 3 * REAL_GE_STUDY_PHOTOPEAK_COUNTS


def test_counts_scale_linearly_with_frame_duration(head_bed, one_torch_thread):
    short, long = _simulate(head_bed, 10.0, 8), _simulate(head_bed, 25.0, 8)
    np.testing.assert_allclose(long.peak, 2.5 * short.peak, rtol=1e-5)
    np.testing.assert_allclose(long.lower, 2.5 * short.lower, rtol=1e-5)
    noisy = _simulate(head_bed, 25.0, 8, noise=True, seed=3)
    expected = long.peak.sum()
    assert abs(noisy.peak.sum() - expected) < 5 * math.sqrt(expected)


@pytest.mark.real_data
def test_real_study_count_constant(real_study):
    import pydicom

    ds = pydicom.dcmread(real_study["nm"])
    frames = ds.pixel_array.reshape(6, 60, 128, 128)
    assert frames[1].sum() == pytest.approx(REAL_GE_STUDY_PHOTOPEAK_COUNTS, rel=0.005)  # window 1: 208 keV
    assert float(ds.PixelSpacing[0]) == pytest.approx(ACQUISITION_177LU.pixel_mm)
