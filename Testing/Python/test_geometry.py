"""A point source at a known patient position is found there after reconstruction and export,
for both rotation directions and both vendor layouts."""
import contextlib
import io

import numpy as np
import pytest
from pydicom.uid import generate_uid

from sspect.io.export import read_image
from sspect.pipeline import Settings, load_study, reconstruct_study, write_results
from sspect.sim.acquisition import LU177_LOWER_SCATTER, LU177_PEAK, LU177_UPPER_SCATTER, simulate_projections
from sspect.sim.dicom_writer import write_ct_series, write_nm_tomo
from sspect.sim.phantom import point_source_phantom

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
                       [LU177_PEAK, LU177_LOWER_SCATTER, LU177_UPPER_SCATTER], simulated.angles_deg,
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
