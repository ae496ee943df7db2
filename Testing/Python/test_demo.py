"""The README's demo command: simulate, write DICOM, read back, reconstruct in Bq/mL, report."""
import json
import re

import numpy as np
from PIL import Image

from sspect.cli import main
from sspect.io.volume_files import read_image


def test_demo_writes_image_preview_provenance_and_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert "Demo finished" in capsys.readouterr().out
    report = (tmp_path / "demo_osem" / "demo_osem_report.md").read_text()
    error = float(re.search(r"total activity \(truth -> image\): .* \(([-+\d.]+)%\)", report).group(1))
    assert abs(error) < 5, report
    assert "liver mean" in report and "unit: Bq/mL" in report
    provenance = json.loads((tmp_path / "demo_osem" / "demo_osem_provenance.json").read_text())
    assert provenance["unit"] == "Bq/mL" and provenance["windows"][0]["scatter_method"] == "TEW"
    assert set(provenance["corrections"]) == {"attenuation", "scatter", "collimator_detector_response"}
    image = read_image(tmp_path / "demo_osem" / "demo_osem.nrrd")
    assert image.unit == "Bq/mL" and image.array.max() > 0
    preview = np.asarray(Image.open(tmp_path / "demo_osem" / "demo_osem_preview.png").convert("RGB")).astype(int)
    hot = (preview[..., 0] > 150) & (preview[..., 0] > preview[..., 2] + 60)  # red-yellow overlay pixels
    grey = (abs(preview[..., 0] - preview[..., 2]) < 8) & (preview[..., 0] > 60)  # CT underneath
    assert hot.sum() > 200 and grey.sum() > 200
    assert (tmp_path / "study" / "NM" / "projections.dcm").exists()
    # the same study through the shipped supervised network: its own report against the truth, no download
    supervised = (tmp_path / "demo_post_unet" / "demo_post_unet_report.md").read_text()
    error = float(re.search(r"total activity \(truth -> image\): .* \(([-+\d.]+)%\)", supervised).group(1))
    assert abs(error) < 5, supervised
    provenance = json.loads((tmp_path / "demo_post_unet" / "demo_post_unet_provenance.json").read_text())
    assert provenance["method"] == "post-unet" and provenance["per_bed"][0]["weights_sha256"]
    # and through the self-supervised method, learned from this scan alone
    learned = (tmp_path / "demo_dip_admm" / "demo_dip_admm_report.md").read_text()
    error = float(re.search(r"total activity \(truth -> image\): .* \(([-+\d.]+)%\)", learned).group(1))
    assert abs(error) < 5, learned
    provenance = json.loads((tmp_path / "demo_dip_admm" / "demo_dip_admm_provenance.json").read_text())
    assert provenance["method"] == "dip-admm" and provenance["projector"] == "fast"
    assert 0 < provenance["method_run_time_s"] <= provenance["run_time_s"]
