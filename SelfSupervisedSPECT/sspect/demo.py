"""The embedded default job: simulate a small 177Lu SPECT/CT, write it as scanner DICOM, read it
back like any study, reconstruct it in Bq/mL (OSEM, the shipped supervised network and the
self-supervised deep image prior) and report each against the known truth."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np

from .methods import Events
from .pipeline import Settings, load_study, reconstruct_study, write_results

# dip-admm serves the demo phantom best of the self-supervised methods: the lowest voxel NRMSE and the
# best lesion recovery (benchmarks/demo_methods.py, docs/operator/demo_methods.md)
SELF_SUPERVISED = "dip-admm"
QUICK_SELF_SUPERVISED = {"features": 4, "pretrain_steps": 60, "iterations": 30, "fit_steps": 10}  # dip-admm: 30 outer iterations


def truth_comparison(image, phantom) -> dict:
    """Mean concentration recovered per organ and total activity, against the phantom."""
    found = {}
    truth_mbq = phantom.total_activity_mbq()
    image_mbq = float(image.array.sum(dtype=np.float64)) * image.voxel_volume_ml / 1e6
    found["total activity (truth -> image)"] = f"{truth_mbq:.1f} MBq -> {image_mbq:.1f} MBq ({100 * (image_mbq / truth_mbq - 1):+.1f}%)"
    for name, label in phantom.label_names.items():
        mask = phantom.labels == label
        true_mean = float(phantom.activity[mask].mean()) * 1e6
        if mask.sum() < 8 or true_mean <= 0:
            continue
        found[f"{name} mean (truth -> image)"] = (
            f"{true_mean / 1e3:.1f} -> {float(image.array[mask].mean()) / 1e3:.1f} kBq/mL "
            f"(recovery {float(image.array[mask].mean()) / true_mean:.2f})")
    return found


def run_demo(out: Path, events: Events | None = None, quick: bool = False, seed: int = 0) -> dict:
    """Returns the written files (image, DICOM, preview, provenance, report)."""
    from .sim.dicom_writer import write_demo_study

    out = Path(out)
    print(f"Simulating a 177Lu SPECT/CT study (scanner-like DICOM) in {out / 'study'} ...", file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()):
        simulated = write_demo_study(out / "study", seed=seed, n_views=32 if quick else 64)
    settings = Settings(method="osem", params={"iterations": 2 if quick else 4, "subsets": 4 if quick else 8},
                        calibration_cps_per_MBq=simulated["sensitivity_cps_per_mbq"], seed=seed,
                        formats=("nrrd", "dicom"), name="demo_osem", overwrite=True)
    study = load_study(simulated["nm"], simulated["ct"], settings)
    image, provenance = reconstruct_study(study, settings, events)
    phantom = simulated["phantom"]
    if not np.allclose(image.affine, phantom.activity_volume.affine) or image.array.shape != phantom.activity.shape:
        raise RuntimeError("The demo's truth and image grids differ; the simulator and the reader disagree on geometry.")
    files = write_results(image, provenance, study, settings, out, truth=truth_comparison(image, phantom))
    # the same study through the shipped supervised network (trained on other, simulated torso scans)
    supervised = Settings(method="post-unet", calibration_cps_per_MBq=simulated["sensitivity_cps_per_mbq"], seed=seed,
                          formats=("nrrd",), name="demo_post_unet", overwrite=True)
    image, provenance = reconstruct_study(study, supervised, events)
    supervised_files = write_results(image, provenance, study, supervised, out, truth=truth_comparison(image, phantom))
    # and through a self-supervised method, which learns from this scan alone
    self_supervised = Settings(method=SELF_SUPERVISED, params=QUICK_SELF_SUPERVISED if quick else {},
                               calibration_cps_per_MBq=simulated["sensitivity_cps_per_mbq"], seed=seed,
                               formats=("nrrd",), name="demo_" + SELF_SUPERVISED.replace("-", "_"), overwrite=True)
    image, provenance = reconstruct_study(study, self_supervised, events)
    learned_files = write_results(image, provenance, study, self_supervised, out, truth=truth_comparison(image, phantom))
    return {**files, "supervised_report": supervised_files["report"], "supervised_nrrd": supervised_files["nrrd"],
            "self_supervised_report": learned_files["report"], "self_supervised_nrrd": learned_files["nrrd"]}
