"""A point source at a known patient position is found there after reconstruction and export,
for both rotation directions and both vendor layouts."""
import contextlib
import io

import numpy as np
import pytest
from pydicom.uid import generate_uid

from sspect.io.volume_files import read_image
from sspect.pipeline import Settings, load_study, reconstruct_study, write_results
from sspect.physics.isotopes import LUTETIUM_177
from sspect.sim.acquisition import simulate_projections
from sspect.sim.dicom_writer import write_ct_series, write_nm_tomo
from sspect.sim.phantoms.point_source import point_source_phantom

LU208 = LUTETIUM_177.photopeak(208.0)

VOXEL_MM = 8.0
POINT_LPS = (37.0, -52.0, -171.0)  # off-centre in x and y, off the voxel grid


def _write_point_study(folder, layout, rotation):
    phantom = point_source_phantom((32, 32, 32), VOXEL_MM, POINT_LPS, activity_mbq=50.0)
    study_uid, frame_uid = generate_uid(), generate_uid()
    ct_files = write_ct_series(folder / "CT", phantom.hu_volume, study_uid, frame_uid)
    mu = np.where(phantom.hu > -500, 0.14, 0.0).astype(np.float32)
    # upsample=2: simulated on a twice finer grid, so the reconstruction is not an inverse crime
    simulated = simulate_projections(phantom.activity, mu, phantom.spacing, n_views=32, radius_mm=200.0,
                                     counts_scale=200.0, seed=3, upsample=2, noise=False)
    nm = write_nm_tomo(folder / "NM" / "point.dcm", [simulated.peak, simulated.lower, simulated.upper],
                       [LU208.window, LU208.lower_scatter, LU208.upper_scatter], simulated.angles_deg,
                       simulated.radii_cm, VOXEL_MM, phantom.origin, layout=layout, rotation=rotation,
                       study_uid=study_uid, frame_of_reference_uid=frame_uid)
    return nm, ct_files


@pytest.mark.parametrize("layout,rotation", [("GE", "CC"), ("GE", "CW"), ("Siemens", "CC"), ("Siemens", "CW")])
def test_point_source_is_found_at_its_patient_position(tmp_path, layout, rotation):
    nm, ct_files = _write_point_study(tmp_path, layout, rotation)
    settings = Settings(method="osem", params={"iterations": 3, "subsets": 4}, device="cpu", formats=("nrrd",))
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(nm, ct_files, settings)
        image, provenance = reconstruct_study(study, settings)
        files = write_results(image, provenance, study, settings, tmp_path / "out")
    exported = read_image(files["nrrd"])  # the geometry a viewer reads from the file
    peak = np.unravel_index(np.argmax(exported.array), exported.array.shape)
    around = tuple(slice(max(p - 2, 0), p + 3) for p in peak)
    weights = exported.array[around]
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in around], indexing="ij"), -1)
    centroid_index = (grid * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()
    found = exported.index_to_lps(centroid_index)
    assert np.all(np.abs(found - POINT_LPS) < VOXEL_MM), f"{layout} {rotation}: found {found}, expected {POINT_LPS}"


def test_detector_binning_keeps_the_counts_and_the_patient_position(tmp_path):
    """2x2 detector binning: half the matrix, all the counts, and the point source still where it is."""
    from sspect.errors import SSPECTError
    from sspect.io.nm import bin_detector, read_projections

    nm, ct_files = _write_point_study(tmp_path, "GE", "CC")
    full = read_projections(str(nm))
    binned = bin_detector(full, 2)
    assert binned.projections.shape == (*full.projections.shape[:2], 16, 16)
    assert binned.projections.sum() == full.projections.sum() and binned.object_spacing_mm == (16.0, 16.0, 16.0)
    # the binned grid spans the same field of view: first and last voxel edges are unchanged
    for axis in range(3):
        assert full.affine[axis, 3] - full.pixel_mm[0 if axis < 2 else 1] / 2 == pytest.approx(
            binned.affine[axis, 3] - binned.pixel_mm[0 if axis < 2 else 1] / 2)
    with pytest.raises(SSPECTError, match="does not divide"):
        bin_detector(full, 3)
    settings = Settings(method="osem", params={"iterations": 3, "subsets": 4}, device="cpu", formats=("nrrd",),
                        detector_binning=2)
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(nm, ct_files, settings)
        image, provenance = reconstruct_study(study, settings)
    assert image.array.shape == (16, 16, 16) and provenance["detector_binning"] == 2
    weights = image.array
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in weights.shape], indexing="ij"), -1)
    hot = weights > 0.2 * weights.max()
    centroid_index = (grid[hot] * weights[hot][:, None]).sum(axis=0) / weights[hot].sum()
    found = image.index_to_lps(centroid_index)
    assert np.all(np.abs(found - POINT_LPS) < VOXEL_MM), f"found {found}, expected {POINT_LPS}"


def test_detector_binning_is_refused_for_several_beds_and_bad_factors(tmp_path):
    from sspect.errors import SSPECTError
    from sspect.pipeline import check_settings

    for factor in (0, 9, 1.5, True):
        with pytest.raises(SSPECTError, match="binning"):
            check_settings(Settings(device="cpu", detector_binning=factor))
    with pytest.raises(SSPECTError, match="one bed at a time"):
        load_study([tmp_path / "a.dcm", tmp_path / "b.dcm"], None, Settings(detector_binning=2))
