"""Every method on the real 177Lu bed: run time, peak memory, total activity and checkerboard against OSEM, fused images.

Each method runs in a fresh process (so its peak resident memory is its own) through the same
door as a user's job (`sspect.pipeline.run`), on the real GE Discovery 670 bed in ../shared with
2x2 detector binning: a 64 x 64 x 64 grid of 8.8 mm, the "64^3 on CPU" size. One torch thread per
process, the methods one after another: their times are comparable with each other on this machine.

    .venv/bin/python benchmarks/real_bed_methods.py --out docs/real-bed
    .venv/bin/python benchmarks/real_bed_methods.py --out docs/real-bed --from-json   # redraw only

Writes results.json, a Markdown table (results.md) and real_bed_methods.png: each method's
coronal slice fused with the CT beside OSEM, on one colour scale. Two columns measure a
checkerboard without ground truth, each over OSEM's value: the share of spectral power near the
Nyquist frequency (``near_nyquist_power_fraction``: pattern and noise alike) and the power at the
Nyquist frequency over the power just below it (``checkerboard_index``: noise has a smooth
spectrum there, a period-two pattern a peak).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO.parent / "shared" / "data" / "lu177_ge670"
DEFAULT_METHODS = ("osem:iterations=4:subsets=6,bsrem:iterations=6:subsets=6:beta=0.3,n2n:domain=image,noise2inverse,"
                   "n2n:domain=projection,dl-bpf:weights=shipped,dip,dip-admm,dl-bpf,post-unet,unrolled-mapem")


def study_present() -> bool:
    """True when the real bed is in ../shared; otherwise says so in one sentence."""
    if (STUDY / "NM" / "bed1_projections.dcm").exists():
        return True
    print(f"The real study is not at {STUDY}; this benchmark needs ../shared beside the repository.", file=sys.stderr)
    return False


def file_name(label: str) -> str:
    """A result name the engine accepts: a weights path's folders dropped, other characters made dashes."""
    words = [word.split("=", 1)[0] + "=" + Path(word.split("=", 1)[1]).stem if "/" in word else word for word in label.split()]
    return re.sub(r"[^A-Za-z0-9_.+()-]", "-", "_".join(words))[:80]


def run_one(spec: str, binning: int, out: Path) -> dict:
    """One method in this process (the child): reconstruct and report time, memory and totals."""
    import numpy as np
    import torch

    from sspect.eval.benchmark import parse_methods
    from sspect.eval.metrics import checkerboard_index, near_nyquist_power_fraction
    from sspect.io.volume_files import read_image
    from sspect.pipeline import Settings, run

    torch.set_num_threads(1)
    (name, params), = parse_methods(spec)
    label = spec.replace(":", " ")
    settings = Settings(method=name, params=params, device="cpu", formats=("nrrd",), detector_binning=binning,
                        name=file_name(label), overwrite=True)
    started = time.perf_counter()
    result = run(str(STUDY / "NM" / "bed1_projections.dcm"), str(STUDY / "CT"), settings, out / "images")
    seconds = time.perf_counter() - started
    image = read_image(result["files"]["nrrd"]).array
    per_bed = result["provenance"]["per_bed"][0]
    return {"method": label, "seconds": round(seconds, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "total_counts": float(image.sum()), "near_nyquist": near_nyquist_power_fraction(image),
            "checkerboard": checkerboard_index(image),
            "shape": list(image.shape), "files": result["files"],
            "stopped": {k: per_bed[k] for k in ("best_step", "stopped_at") if k in per_bed},
            "uncertainty": "uncertainty" in result["files"], "finite": bool(np.isfinite(image).all())}


def run_all(methods: list[str], binning: int, out: Path, rows: list[dict] | None = None) -> list[dict]:
    """Run ``methods`` one after another; with earlier ``rows``, a method run again replaces its row."""
    rows = list(rows or [])
    for spec in methods:
        rows = [row for row in rows if row["method"] != spec.replace(":", " ")]
        print(f"running {spec} ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, "--one", spec, "--binning", str(binning), "--out", str(out)],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if child.returncode != 0:
            rows.append({"method": spec.replace(":", " "), "error": child.stderr.strip().splitlines()[-1:]})
            print(child.stderr[-2000:], file=sys.stderr)
        else:
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]['seconds']} s, {rows[-1]['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))  # kept current: a stopped run keeps what finished
    return rows


def write_outputs(rows: list[dict], out: Path, binning: int) -> None:
    reference = next((r for r in rows if r["method"].startswith("osem") and "total_counts" in r), None)
    lines = [f"Real GE 670 bed, 177Lu, {binning}x{binning} detector binning (grid {rows[0].get('shape')}), CPU, one thread per method.",
             "", "| method | run time s | peak memory MiB | total vs OSEM % | near-Nyquist power vs OSEM | checkerboard index vs OSEM "
             "| stopped | uncertainty map |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {' '.join(row['error'])} | | | | | | |")
            continue
        difference = 100 * (row["total_counts"] / reference["total_counts"] - 1) if reference else float("nan")
        near = row["near_nyquist"] / reference["near_nyquist"] if reference and "near_nyquist" in row else float("nan")
        checkerboard = row["checkerboard"] / reference["checkerboard"] if reference and "checkerboard" in row else float("nan")
        stopped = ", ".join(f"{k} {v}" for k, v in row["stopped"].items())
        lines.append(f"| {row['method']} | {row['seconds']:.0f} | {row['peak_rss_mib']} | {difference:+.2f} | {near:.2f} | {checkerboard:.2f} | {stopped} | "
                     f"{'yes' if row['uncertainty'] else 'no'} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot([r for r in rows if "error" not in r], out / "real_bed_methods.png", reference)


def _plot(rows: list[dict], path: Path, reference) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sspect.io.ct import read_ct_series, resample
    from sspect.io.volume_files import read_image

    images = {row["method"]: read_image(row["files"]["nrrd"]) for row in rows}
    grid = next(iter(images.values()))
    ct = read_ct_series(str(STUDY / "CT"))
    ct_on_grid = resample(ct.volume, grid.affine, grid.array.shape, cval=-1000.0)
    top = float(np.percentile(images[reference["method"]].array, 99.8)) if reference else None
    hottest = np.unravel_index(np.argmax(images[reference["method"]].array if reference else grid.array), grid.array.shape)
    y = int(hottest[1])  # coronal slice through OSEM's hottest voxel
    columns = len(images)
    figure, axes = plt.subplots(1, columns, figsize=(max(2.6 * columns, 7.0), 3.6), facecolor="black", layout="constrained")
    for axis, (label, volume) in zip(np.atleast_1d(axes), images.items()):
        axis.imshow(ct_on_grid[:, y, :].T, cmap="gray", vmin=-400, vmax=600, origin="lower")
        shown = volume.array[:, y, :].T
        axis.imshow(np.ma.masked_less(shown, 0.03 * (top or shown.max())), cmap="hot", vmin=0, vmax=top, alpha=0.75, origin="lower")
        axis.set_title(label.replace(" ", "\n", 1), color="white", fontsize=8)
        axis.axis("off")
    figure.suptitle("real 177Lu bed, coronal slice fused with CT (one colour scale: OSEM's 99.8th percentile)", color="white", fontsize=9)
    figure.savefig(path, dpi=110, facecolor="black")
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="name:param=value:..., comma-separated")
    parser.add_argument("--binning", type=int, default=2)
    parser.add_argument("--out", default="real-bed-output")
    parser.add_argument("--from-json", action="store_true", help="only redraw the table and figure from results.json")
    parser.add_argument("--append", action="store_true", help="keep results.json's other methods (rerun or add some)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this (child) process
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(args.one, args.binning, out)))
        return 0
    if not study_present():
        return 2
    if args.from_json:
        rows = json.loads((out / "results.json").read_text())
    else:
        earlier = json.loads((out / "results.json").read_text()) if args.append and (out / "results.json").exists() else []
        rows = run_all([m for m in args.methods.split(",") if m], args.binning, out, earlier)
    write_outputs(rows, out, args.binning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
