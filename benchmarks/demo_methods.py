"""Which self-supervised method serves the demo phantom best: every method at its defaults on the demo study.

The demo study (``sspect demo``: 48^3 voxels of 8 mm, 64 views, GE layout, seed 0) is simulated
once; OSEM 4 x 8 (the demo's) and every self-supervised method at its defaults reconstruct it in
Bq/mL with the fast operator. The table gives the run time, the voxel NRMSE against the truth,
the total activity error and the mean-concentration recovery of the lesions and kidneys; the PNG
shows NRMSE and run time. The demo runs the method with the lowest NRMSE.

    .venv/bin/python benchmarks/demo_methods.py                 # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/demo_methods.py --methods osem,dip-admm
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "output"
REGIONS = ("lesion_liver", "lesion_node", "kidney_left", "liver")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="", help="comma-separated; default: osem and every self-supervised method")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    import numpy as np

    from sspect.pipeline import Settings, load_study, reconstruct_study
    from sspect.sim.dicom_writer import write_demo_study

    folder = Path(tempfile.mkdtemp())
    with contextlib.redirect_stdout(io.StringIO()):
        simulated = write_demo_study(folder, seed=0, n_views=64)
    phantom = simulated["phantom"]
    truth = phantom.activity.astype(np.float64) * 1e6  # Bq/mL
    rows = []
    if not args.methods:
        from sspect.methods import all_methods

        args.methods = ",".join(["osem"] + sorted(n for n, m in all_methods().items() if m.family == "self-supervised"))
    for method in args.methods.split(","):
        params = {"iterations": 4, "subsets": 8} if method == "osem" else {}
        settings = Settings(method=method, params=params, calibration_cps_per_MBq=simulated["sensitivity_cps_per_mbq"])
        with contextlib.redirect_stdout(io.StringIO()):
            study = load_study(simulated["nm"], simulated["ct"], settings)
            started = time.perf_counter()
            image, _ = reconstruct_study(study, settings)
        seconds = time.perf_counter() - started
        array = image.array.astype(np.float64)
        recovery = {name: float(array[phantom.labels == phantom.label_names[name]].mean()
                                / truth[phantom.labels == phantom.label_names[name]].mean()) for name in REGIONS}
        rows.append({"method": method, "seconds": seconds,
                     "nrmse": float(np.linalg.norm(array - truth) / np.linalg.norm(truth)),
                     "total_error": float(array.sum() / truth.sum() - 1), **recovery})
        print(f"  {method}: {seconds:.0f} s, NRMSE {rows[-1]['nrmse']:.4f}", file=sys.stderr, flush=True)
    lines = ["| method | run time s | voxel NRMSE | total activity | " + " | ".join(f"{r} recovery" for r in REGIONS) + " |",
             "|---|---|---|---|" + "---|" * len(REGIONS)]
    for row in rows:
        lines.append(f"| {row['method']} | {row['seconds']:.0f} | {row['nrmse']:.4f} | {100 * row['total_error']:+.1f} % | "
                     + " | ".join(f"{row[r]:.2f}" for r in REGIONS) + " |")
    learned = [row for row in rows if row["method"] != "osem"]
    if learned:
        best = min(learned, key=lambda row: row["nrmse"])
        lines += ["", f"Lowest NRMSE of the self-supervised methods: {best['method']}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_methods.md").write_text(text)
    plot(rows, args.out / "demo_methods.png")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [row["method"] for row in rows]
    left.bar(names, [row["nrmse"] for row in rows], color="tab:blue")
    left.set_ylabel("voxel NRMSE vs truth")
    left.set_ylim(min(row["nrmse"] for row in rows) * 0.9, max(row["nrmse"] for row in rows) * 1.05)
    right.bar(names, [row["seconds"] for row in rows], color="tab:orange")
    right.set_ylabel("run time (s, 2-core CPU)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    figure.suptitle("Demo phantom (48^3, 8 mm, 64 views), every method at its defaults")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
