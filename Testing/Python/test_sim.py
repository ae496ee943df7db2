"""Simulation and scanner-like DICOM: PyTomography's readers must give back what was written."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from sspect.errors import SSPECTError
from sspect.physics.isotopes import LUTETIUM_177, EnergyRange
from sspect.sim.acquisition import simulate_projections
from sspect.sim.dicom_writer import write_ct_series, write_demo_study, write_nm_tomo
from sspect.sim.phantoms.demo import demo_phantom
from sspect.sim.phantoms.point_source import point_source_phantom
from sspect.volume import Volume

LU208 = LUTETIUM_177.photopeak(208.0)

pytomography_dicom = pytest.importorskip("pytomography.io.SPECT.dicom")

N_VIEWS, N_R, N_Z = 12, 10, 7  # Lr != Lz so that a transposed frame cannot pass
WINDOWS = [LU208.window, LU208.lower_scatter, EnergyRange("extra", 100.0, 120.0)]


def _random_projections(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, size=(N_VIEWS, N_R, N_Z)).astype(np.float32) for _ in WINDOWS]


@pytest.fixture(scope="module")
def small_study():
    """32^3 demo phantom with a water-like attenuation map (no CT needed for the physics tests)."""
    phantom = demo_phantom((32, 32, 32), voxel_mm=10.0)
    mu = np.where(phantom.hu > -900, 0.135, 0.0).astype(np.float32)
    return phantom, mu


@pytest.mark.parametrize("layout", ["GE", "Siemens"])
@pytest.mark.parametrize("rotation", ["CC", "CW"])
def test_nm_round_trip_through_pytomography(tmp_path, layout, rotation):
    projections = _random_projections()
    angles = 7.5 + np.arange(N_VIEWS) * 30.0  # does not start at 0: the start angle must be right
    radii_cm = 22.0 + 0.5 * np.arange(N_VIEWS)  # non-circular orbit: each view keeps its own radius
    path = write_nm_tomo(tmp_path / "nm.dcm", projections, WINDOWS, angles, radii_cm, 4.5, (-20.25, -22.5, 100.0),
                         layout=layout, rotation=rotation)

    ds = pydicom.dcmread(path)
    read, read_angles, read_radii, _ = pytomography_dicom.parse_projection_dataset(ds)
    read = read.cpu().numpy()
    assert read.shape == (len(WINDOWS), 1, N_VIEWS, N_R, N_Z)
    for window, expected in enumerate(projections):
        np.testing.assert_array_equal(read[window, 0], expected)
    np.testing.assert_allclose(read_angles, angles, atol=1e-9)
    np.testing.assert_allclose(read_radii, radii_cm, atol=1e-9)

    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.20"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    assert ds.NumberOfFrames == len(WINDOWS) * N_VIEWS
    assert len(ds.DetectorInformationSequence) == (1 if layout == "GE" else 2)
    assert ds.RotationInformationSequence[0].RotationDirection == rotation
    dicom_angles = [float(item.StartAngle) for item in ds.DetectorInformationSequence] if layout == "Siemens" \
        else [float(ds.RotationInformationSequence[0].StartAngle)]
    if layout == "Siemens":  # the two heads face each other
        assert abs((dicom_angles[1] - dicom_angles[0]) % 360 - 180) < 1e-9
    # Frames are in acquisition order, not sorted: the first frame is the start angle's view.
    first_view = int(np.argmin(np.abs((angles - (dicom_angles[0] + 180)) % 360)))
    np.testing.assert_array_equal(ds.pixel_array[0], projections[0][first_view].T[::-1])


@pytest.mark.parametrize("layout, n_views", [("GE", 13), ("Siemens", 42)])
def test_view_at_zero_degrees_keeps_its_place(tmp_path, layout, n_views):
    """Steps like 360/13 are inexact in binary: the 0 degree view must not come back as 359.999..."""
    projections = np.random.default_rng(2).integers(0, 100, size=(n_views, 4, 3)).astype(np.float32)
    angles = np.linspace(0.0, 360.0, n_views, endpoint=False)
    path = write_nm_tomo(tmp_path / "nm.dcm", [projections], [LU208.window], angles, np.full(n_views, 25.0), 4.0,
                         (0.0, 1.0, 0.0), layout=layout, rotation="CW")
    read, read_angles, _, _ = pytomography_dicom.parse_projection_dataset(pydicom.dcmread(path))
    np.testing.assert_array_equal(read.cpu().numpy()[0, 0], projections)
    np.testing.assert_allclose(read_angles, angles, atol=1e-9)


@pytest.mark.parametrize("layout", ["GE", "Siemens"])
@pytest.mark.parametrize("origin", [(-20.25, -22.5, 100.0), (13.0, 0.0, -350.5)])
def test_nm_geometry_is_the_requested_origin(tmp_path, layout, origin):
    pixel_mm = 4.5
    path = write_nm_tomo(tmp_path / "nm.dcm", _random_projections(), WINDOWS, np.arange(N_VIEWS) * 30.0,
                         np.full(N_VIEWS, 25.0), pixel_mm, origin, layout=layout)
    expected = np.eye(4)
    expected[:3, :3] = np.diag([pixel_mm] * 3)
    expected[:3, 3] = origin
    np.testing.assert_allclose(pytomography_dicom._get_affine_spect_projections(str(path)), expected, atol=1e-9)
    object_meta, proj_meta = pytomography_dicom.get_metadata(str(path), index_peak=0)
    assert tuple(object_meta.shape) == (N_R, N_R, N_Z)
    assert object_meta.dr == (0.45, 0.45, 0.45)


def test_nm_writer_refuses_what_it_cannot_store(tmp_path):
    projections = _random_projections()
    angles, radii = np.arange(N_VIEWS) * 30.0, np.full(N_VIEWS, 25.0)
    with pytest.raises(SSPECTError, match="uniform step"):
        write_nm_tomo(tmp_path / "a.dcm", projections, WINDOWS, angles[::-1], radii, 4.5, (0, 1, 0))
    with pytest.raises(SSPECTError, match="65535"):
        write_nm_tomo(tmp_path / "b.dcm", [p * 10 for p in projections], WINDOWS, angles, radii, 4.5, (0, 1, 0))
    with pytest.raises(SSPECTError, match="divisible"):
        write_nm_tomo(tmp_path / "c.dcm", [p[:11] for p in projections], WINDOWS, angles[:11], radii[:11], 4.5,
                      (0, 1, 0), layout="Siemens")


@pytest.mark.real_data
def test_real_ge_study_rewritten_reads_back_the_same(tmp_path, real_study):
    """Re-writing the real GE bed gives PyTomography the same data, angles, radii and grid."""
    original = pydicom.dcmread(real_study["nm"])
    projections, angles, radii, _ = pytomography_dicom.parse_projection_dataset(original)
    projections = projections.cpu().numpy()[:, 0]
    windows = [EnergyRange(str(item.EnergyWindowName), float(item.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit),
                          float(item.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit))
               for item in original.EnergyWindowInformationSequence]
    affine = pytomography_dicom._get_affine_spect_projections(real_study["nm"])
    path = write_nm_tomo(tmp_path / "nm.dcm", list(projections), windows, angles, radii, float(original.PixelSpacing[0]),
                         affine[:3, 3], rotation=str(original.RotationInformationSequence[0].RotationDirection),
                         frame_duration_s=25.0)
    rewritten = pydicom.dcmread(path)
    again, again_angles, again_radii, _ = pytomography_dicom.parse_projection_dataset(rewritten)
    np.testing.assert_array_equal(again.cpu().numpy()[:, 0], projections)
    np.testing.assert_allclose(again_angles, angles, atol=1e-9)
    np.testing.assert_allclose(again_radii, radii, atol=1e-9)
    np.testing.assert_allclose(pytomography_dicom._get_affine_spect_projections(str(path)), affine, atol=1e-6)
    np.testing.assert_array_equal(rewritten.pixel_array, original.pixel_array)  # same acquisition order too
    for keyword in ("StartAngle", "AngularStep", "RadialPosition", "RotationDirection", "NumberOfFramesInRotation"):
        assert rewritten.RotationInformationSequence[0][keyword].value == original.RotationInformationSequence[0][keyword].value


def test_ct_series_reads_back_sorted_by_position(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 2000, size=(6, 5, 4)).astype(np.float32)  # x, y, z all different
    volume = Volume(hu, (1.5, 2.0, 3.0), (-4.5, 7.0, -120.0), unit="HU")
    files = write_ct_series(tmp_path / "CT", volume, "1.2.3.4", "1.2.3.5")
    assert len(files) == 4
    assert sorted(p.name for p in files) != [p.name for p in files]  # names do not follow position

    slices = sorted((pydicom.dcmread(f) for f in tmp_path.joinpath("CT").iterdir()),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    array = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], axis=-1)
    np.testing.assert_array_equal(array.transpose(1, 0, 2), hu)  # pixel [row=y, column=x]
    for k, ds in enumerate(slices):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], volume.index_to_lps((0, 0, k)))
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [2.0, 1.5]
        assert ds.StudyInstanceUID == "1.2.3.4" and ds.FrameOfReferenceUID == "1.2.3.5"
        assert ds.ManufacturerModelName == "Optima CT540" and float(ds.KVP) == 120

    from pytomography.io.shared import dicom as shared_dicom  # PyTomography's CT reader agrees
    names = [str(f) for f in files]
    np.testing.assert_array_equal(shared_dicom.open_multifile(names).cpu().numpy(), hu)
    affine = shared_dicom._get_affine_multifile(names)
    # PyTomography takes PixelSpacing as (dx, dy), the reverse of DICOM's (row, column) order, so
    # only its translation and slice spacing are compared here; real CT pixels are square.
    np.testing.assert_allclose(affine[:3, 3], volume.origin, atol=1e-9)
    assert affine[2, 2] == 3.0


def test_tew_reproduces_the_simulated_scatter(small_study):
    from pytomography.utils import compute_EW_scatter
    import torch

    phantom, mu = small_study
    sim = simulate_projections(phantom.activity, mu, phantom.spacing, n_views=16, radius_mm=240.0,
                               counts_scale=50.0, noise=False)
    tew = compute_EW_scatter(torch.from_numpy(sim.lower), torch.from_numpy(sim.upper), LU208.lower_scatter.width_keV,
                             LU208.upper_scatter.width_keV, LU208.window.width_keV).cpu().numpy()
    assert abs(tew.sum() / sim.expected_scatter.sum() - 1) < 0.01
    significant = sim.expected_scatter > 0.01 * sim.expected_scatter.max()
    np.testing.assert_allclose(tew[significant], sim.expected_scatter[significant], rtol=0.02)
    scatter_fraction = sim.expected_scatter.sum() / sim.peak.sum()
    assert 0.15 < scatter_fraction < 0.3
    assert sim.upper.sum() < 0.2 * sim.lower.sum()
    np.testing.assert_allclose(sim.peak, sim.expected_primary + sim.expected_scatter, rtol=1e-5)


def test_poisson_noise_is_seeded_and_counts_scale_linearly(small_study):
    phantom, mu = small_study

    def simulate(**kwargs):
        return simulate_projections(phantom.activity, mu, phantom.spacing, n_views=8, radius_mm=240.0, **kwargs)

    first, again, other = simulate(counts_scale=20.0, seed=5), simulate(counts_scale=20.0, seed=5), simulate(counts_scale=20.0, seed=6)
    for window in ("peak", "lower", "upper"):
        np.testing.assert_array_equal(getattr(first, window), getattr(again, window))
        assert np.all(getattr(first, window) == np.round(getattr(first, window)))
    assert not np.array_equal(first.peak, other.peak)

    single, double = simulate(counts_scale=20.0, noise=False), simulate(counts_scale=40.0, noise=False)
    np.testing.assert_allclose(double.peak, 2 * single.peak, rtol=1e-5)
    assert abs(first.peak.sum() / single.peak.sum() - 1) < 0.01  # noise keeps the expectation


def test_upsampled_simulation_keeps_grid_and_counts(small_study):
    phantom, mu = small_study
    coarse = simulate_projections(phantom.activity, mu, phantom.spacing, n_views=8, radius_mm=240.0, noise=False)
    fine = simulate_projections(phantom.activity, mu, phantom.spacing, n_views=8, radius_mm=240.0, noise=False, upsample=2)
    assert fine.peak.shape == coarse.peak.shape == (8, 32, 32)
    assert abs(fine.expected_primary.sum() / coarse.expected_primary.sum() - 1) < 0.03
    assert not np.allclose(fine.peak, coarse.peak, rtol=1e-3)  # a different discretisation, not the same model


def test_phantoms_are_deterministic_and_point_source_is_exact():
    a, b = demo_phantom((32, 32, 32), 10.0, seed=2), demo_phantom((32, 32, 32), 10.0, seed=2)
    np.testing.assert_array_equal(a.activity, b.activity)
    assert set(a.label_names) >= {"body", "liver", "kidney_left", "kidney_right", "spleen", "lesion_liver", "lesion_node"}
    for name, label in a.label_names.items():
        assert np.any(a.labels == label), name
    assert a.hu[0, 0, 0] == -1000 and a.hu[a.labels == a.label_names["spine"]].min() == 700
    assert a.hu[a.labels == a.label_names["lungs"]].max() == -750
    centre = np.asarray(a.origin) + (np.asarray(a.activity.shape) - 1) / 2 * 10.0
    assert abs(centre[0]) < 1e-9 and abs(centre[1]) < 1e-9
    liver_x = np.argwhere(a.labels == a.label_names["liver"])[:, 0].mean()
    spleen_x = np.argwhere(a.labels == a.label_names["spleen"])[:, 0].mean()
    assert liver_x < 16 < spleen_x  # liver on the patient's right (-x in LPS)

    point = (21.3, -33.7, -185.2)
    source = point_source_phantom((32, 32, 32), 8.0, point, activity_mbq=5.0)
    weights = source.activity
    centroid = np.asarray(source.origin) + 8.0 * (np.argwhere(weights > 0) * weights[weights > 0][:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(centroid, point, atol=1e-4)
    assert abs(source.total_activity_mbq() - 5.0) < 1e-4


@pytest.mark.parametrize("layout, rotation", [("GE", "CC"), ("Siemens", "CW")])
def test_demo_study_reads_back_with_pytomography(tmp_path, layout, rotation):
    study = write_demo_study(tmp_path, layout=layout, rotation=rotation, n_views=16, shape=(32, 32, 32))
    nm = str(study["nm"])
    sim = study["projections"]
    projections = pytomography_dicom.get_projections(nm).cpu().numpy()
    for role in ("peak", "lower", "upper"):
        np.testing.assert_array_equal(projections[study[f"index_{role}"]], getattr(sim, role))
    assert 5e4 < sim.peak.sum() < 5e6

    scatter = pytomography_dicom.get_energy_window_scatter_estimate(
        nm, study["index_peak"], study["index_lower"], study["index_upper"]).cpu().numpy()
    assert abs(scatter.sum() / sim.expected_scatter.sum() - 1) < 0.03  # Poisson noise only

    # The CT lands on the SPECT grid where the phantom was: same mu map as the simulation used.
    ct_files = [str(f) for f in study["ct_files"]]
    mu = pytomography_dicom.get_attenuation_map_from_CT_slices(ct_files, nm, index_peak=study["index_peak"]).cpu().numpy()
    np.testing.assert_allclose(mu, study["mu_map"], atol=1e-5)
    truth = study["truth"]
    object_meta, _ = pytomography_dicom.get_metadata(nm, index_peak=study["index_peak"])
    np.testing.assert_allclose(object_meta.affine_matrix, truth.affine, atol=1e-9)
    assert truth.unit == "MBq/mL"
    nm_ds, ct_ds = pydicom.dcmread(nm, stop_before_pixels=True), pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    assert nm_ds.StudyInstanceUID == ct_ds.StudyInstanceUID
    assert nm_ds.FrameOfReferenceUID == ct_ds.FrameOfReferenceUID
    assert nm_ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0].CodeValue == "447553000"
