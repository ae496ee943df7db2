"""Transposed against resize upsampling, on the small simulated study with known truth: NRMSE, run time, checkerboard.

The tests' small study (32^3 voxels of 12 mm, 24 views, PyTomography's projector), each method at
its defaults but for ``upsampling``, one process, side by side on identical data:

    .venv/bin/python benchmarks/upsampling_phantom.py --out docs/clinical-grid-report/upsampling

Writes results.json, results.md and upsampling_phantom.png (NRMSE and run time per variant).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dip,n2n", help="name:param=value:..., comma-separated")
    parser.add_argument("--upsampling", default="transposed,resize", help="the upsamplings each method runs with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="upsampling-output")
    args = parser.parse_args()
    import numpy as np
    import torch

    from sspect.eval.benchmark import parse_methods
    from sspect.eval.metrics import checkerboard_index, nrmse
    from sspect.methods import get_method
    from sspect.pipeline import Settings, bed_problem, bq_per_ml_factor, load_study
    from sspect.sim.dicom_writer import write_demo_study

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        study_files = write_demo_study(folder, seed=1, n_views=24, shape=(32, 32, 32), voxel_mm=12.0)
        study = load_study(study_files["nm"], study_files["ct"], Settings(device="cpu"))
        problem = bed_problem(study, device="cpu")
    bed = study.beds[0]
    to_mbq_per_ml = bq_per_ml_factor(study_files["sensitivity_cps_per_mbq"], bed.frame_duration_s,
                                     float(np.prod(bed.object_spacing_mm)) / 1000) / 1e6
    truth = study_files["phantom"].activity
    rows = []
    started = time.perf_counter()
    osem = get_method("osem").reconstruct(problem, {"iterations": 10, "subsets": 4}).image
    rows.append({"method": "osem 10x4", "nrmse": nrmse(osem * to_mbq_per_ml, truth), "seconds": time.perf_counter() - started,
                 "checkerboard": checkerboard_index(osem)})
    for spec, (method, params) in zip(args.methods.split(","), parse_methods(args.methods)):
        for upsampling in args.upsampling.split(","):
            started = time.perf_counter()
            result = get_method(method).reconstruct(problem, {**params, "upsampling": upsampling})
            rows.append({"method": f"{spec.replace(':', ' ')} {upsampling}", "nrmse": nrmse(result.image * to_mbq_per_ml, truth),
                         "seconds": time.perf_counter() - started, "checkerboard": checkerboard_index(result.image),
                         "best_step": result.info.get("best_step")})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Small simulated 177Lu study (32^3 x 12 mm, 24 views), defaults but for upsampling, {args.threads} threads.", "",
             "| method | NRMSE | run time s | checkerboard index | best step |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['nrmse']:.3f} | {r['seconds']:.0f} | {r['checkerboard']:.2f} | {r.get('best_step') or ''} |"
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    names = [r["method"] for r in rows]
    left.barh(names, [r["nrmse"] for r in rows], color="tab:blue")
    left.set_xlabel("NRMSE against the truth")
    right.barh(names, [r["seconds"] for r in rows], color="tab:orange")
    right.set_xlabel(f"run time, s ({args.threads} CPU threads)")
    right.set_yticks([])
    figure.savefig(out / "upsampling_phantom.png", dpi=110)
    plt.close(figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
