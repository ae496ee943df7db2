"""Every method on the real 177Lu bed with its counts thinned: noise and bias without ground truth.

The way methods are checked on patients: the measured projections (every energy window) are
thinned binomially to a fraction of their counts (each count kept with that probability, so the
thinned scan is a true shorter scan of the same patient), each thinned scan is reconstructed by
every method at full resolution (128^3 of 4.42 mm, 60 views) through the same door as a user's job,
and each image, divided by the fraction, is compared with OSEM of all counts:

- the voxel CoV in a liver VOI (a 22 mm sphere in the liver dome, the only part of the liver in
  this bed; placed by hand on the CT and fixed here in LPS millimetres), noise and structure alike,
  so it is read against OSEM's CoV at the same fraction;
- the mean in the hottest uptakes (the five hottest connected regions above 30 % of full-count
  OSEM's maximum with at least 20 voxels: salivary glands and lesions), against full-count OSEM;
- the total.

The bed holds no kidneys (it runs from the skull to the liver dome), so no kidney figure is
possible here. Each draw is seeded (fraction, draw) and so the same for every method.

    .venv/bin/python benchmarks/real_bed_thinning.py --out docs/clinical-grid-report/real-bed-thinning
    .venv/bin/python benchmarks/real_bed_thinning.py --out ... --from-json   # table and figures only

Writes results.json (one row per method, fraction and draw; kept current, and a rerun skips the
rows it has), results.md (medians over draws and their spread) and two PNGs: the fused coronal
slice of every method at the lowest fraction (draw 0) beside full-count OSEM, and liver CoV
against the hot-uptake error.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

from real_bed_methods import STUDY, file_name, study_present  # the sibling benchmark's study and result names

REFERENCE = "osem:iterations=4:subsets=6"
DEFAULT_METHODS = REFERENCE + ",bsrem:iterations=6:subsets=6:beta=0.1,kem,n2n:domain=image,noise2inverse"
LIVER_CENTRE_LPS_MM = (-72.6, 48.4, 2.4)
LIVER_RADIUS_MM = 11.0


def thinned_study(fraction: float, draw: int, folder: Path) -> Path:
    """The NM file with every frame's counts thinned binomially to ``fraction`` (seeded by fraction and draw)."""
    import numpy as np
    import pydicom

    path = folder / f"thinned_{fraction:g}_draw{draw}.dcm"
    if path.exists():
        return path
    dataset = pydicom.dcmread(STUDY / "NM" / "bed1_projections.dcm")
    counts = dataset.pixel_array
    generator = np.random.default_rng([int(round(fraction * 1000)), draw])
    dataset.PixelData = generator.binomial(counts, fraction).astype(counts.dtype).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path.with_suffix(".part"))
    path.with_suffix(".part").replace(path)
    return path


def reconstruct(spec: str, nm: Path, name: str, out: Path):
    """(image array in counts, its affine, seconds) of one method through the engine's door."""
    import torch

    from sspect.eval.benchmark import parse_methods
    from sspect.io.volume_files import read_image
    from sspect.pipeline import Settings, run

    torch.set_num_threads(1)
    (method, params), = parse_methods(spec)
    settings = Settings(method=method, params=params, device="cpu", formats=("nrrd",), name=name, overwrite=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = run(str(nm), str(STUDY / "CT"), settings, out / "images")
    image = read_image(result["files"]["nrrd"])
    return image.array, image.affine, time.perf_counter() - started


def regions(reference, affine) -> dict:
    """The liver VOI and the hot uptakes, as boolean masks on the image grid, from full-count OSEM."""
    import numpy as np
    from scipy import ndimage

    index = np.stack(np.meshgrid(*[np.arange(n) for n in reference.shape], indexing="ij"), -1)
    lps = index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    masks = {"liver": np.linalg.norm(lps - np.asarray(LIVER_CENTRE_LPS_MM), axis=-1) <= LIVER_RADIUS_MM}
    labels, count = ndimage.label(reference > 0.3 * reference.max())
    numbers = range(1, count + 1)
    sizes = ndimage.sum(np.ones_like(reference), labels, numbers)
    means = ndimage.mean(reference, labels, numbers)
    hottest = [n for n, size, _ in sorted(zip(numbers, sizes, means), key=lambda t: -t[2]) if size >= 20][:5]
    for rank, number in enumerate(hottest, 1):
        masks[f"hot_{rank}"] = labels == number
    return masks


def measure(image, fraction: float, reference, masks) -> dict:
    scaled = image / fraction
    liver = scaled[masks["liver"]]
    row = {"liver_cov": float(liver.std() / liver.mean()),
           "liver_mean_error_pct": 100 * float(liver.mean() / reference[masks["liver"]].mean() - 1),
           "total_error_pct": 100 * float(scaled.sum() / reference.sum() - 1)}
    for name, mask in masks.items():
        if name.startswith("hot_"):
            row[f"{name}_error_pct"] = 100 * float(scaled[mask].mean() / reference[mask].mean() - 1)
    return row


def run_all(methods, fractions, draws, out: Path) -> list[dict]:
    import numpy as np

    rows_path = out / "results.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    (out / "images").mkdir(parents=True, exist_ok=True)
    reference_file = out / "images" / "full_osem.npy"
    if not reference_file.exists():
        print("full-count OSEM ...", file=sys.stderr, flush=True)
        image, affine, seconds = reconstruct(REFERENCE, STUDY / "NM" / "bed1_projections.dcm", "full_osem", out)
        np.save(reference_file, image)
        np.save(out / "images" / "affine.npy", affine)
    reference = np.load(reference_file)
    masks = regions(reference, np.load(out / "images" / "affine.npy"))
    done = {(r["method"], r["fraction"], r["draw"]) for r in rows}
    for fraction in fractions:
        for draw in range(draws):
            nm = thinned_study(fraction, draw, out / "images" / "studies")
            for spec in methods:
                label = spec.replace(":", " ")
                if (label, fraction, draw) in done:
                    continue
                print(f"{label}, {fraction:g} of the counts, draw {draw} ...", file=sys.stderr, flush=True)
                name = file_name(f"{label}_{fraction:g}_{draw}")
                image, _, seconds = reconstruct(spec, nm, name, out)
                if draw == 0:
                    np.save(out / "images" / f"{name}.npy", image)
                rows.append({"method": label, "fraction": fraction, "draw": draw, "seconds": round(seconds, 1),
                             **measure(image, fraction, reference, masks)})
                rows_path.write_text(json.dumps(rows, indent=2))  # kept current: a stopped run keeps what finished
    return rows


def write_outputs(rows: list[dict], out: Path) -> None:
    import numpy as np

    hot = sorted({k for r in rows for k in r if k.startswith("hot_")})
    reference_label = REFERENCE.replace(":", " ")
    lines = ["Real GE 670 bed (177Lu), full resolution (128^3 of 4.42 mm, 60 views), CPU, one thread. Medians over draws "
             "(spread: smallest..largest). Errors against OSEM 4x6 of all counts; CoV in the liver VOI.", "",
             "| fraction | method | draws | liver CoV | vs OSEM at this fraction | liver mean % | hot uptakes mean % (median of "
             f"{len(hot)}) | worst hot uptake % | total % | run time s |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for fraction in sorted({r["fraction"] for r in rows}, reverse=True):
        osem = [r["liver_cov"] for r in rows if r["fraction"] == fraction and r["method"] == reference_label]
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["fraction"] == fraction and r["method"] == method]
            if not group:
                continue
            cov = [r["liver_cov"] for r in group]
            hot_errors = [float(np.median([r[k] for k in hot])) for r in group]
            worst = [max((r[k] for k in hot), key=abs) for r in group]
            ratio = np.median(cov) / np.median(osem) if osem else float("nan")
            summary.append({"fraction": fraction, "method": method, "liver_cov": float(np.median(cov)), "cov_vs_osem": float(ratio),
                            "hot_error_pct": float(np.median(hot_errors)), "worst_hot_error_pct": float(np.median(worst))})
            lines.append(f"| {fraction:g} | {method} | {len(group)} | {np.median(cov):.3f} ({min(cov):.3f}..{max(cov):.3f}) | "
                         f"{ratio:.2f} | {np.median([r['liver_mean_error_pct'] for r in group]):+.1f} | "
                         f"{np.median(hot_errors):+.1f} ({min(hot_errors):+.1f}..{max(hot_errors):+.1f}) | {np.median(worst):+.1f} | "
                         f"{np.median([r['total_error_pct'] for r in group]):+.1f} | {np.median([r['seconds'] for r in group]):.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    _plot_tradeoff(summary, out / "thinning_cov_vs_bias.png")
    _plot_panels(rows, out)


def _plot_tradeoff(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for method in dict.fromkeys(s["method"] for s in summary):
        points = [s for s in summary if s["method"] == method]
        axis.plot([p["liver_cov"] for p in points], [p["hot_error_pct"] for p in points], "o-", label=method)
        for p in points:
            axis.annotate(f"{p['fraction']:g}", (p["liver_cov"], p["hot_error_pct"]), fontsize=7)
    axis.axhline(0, color="grey", lw=0.5)
    axis.set_xlabel("liver VOI CoV (thinned scan)")
    axis.set_ylabel("hot uptakes mean vs full-count OSEM, %")
    axis.set_title("real bed, binomially thinned counts (labels: fraction kept)", fontsize=9)
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_panels(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sspect.io.ct import read_ct_series, resample

    fraction = min(r["fraction"] for r in rows)
    reference = np.load(out / "images" / "full_osem.npy")
    affine = np.load(out / "images" / "affine.npy")
    images = {"osem, all counts": reference}
    for method in dict.fromkeys(r["method"] for r in rows):
        file = out / "images" / (file_name(f"{method}_{fraction:g}_0") + ".npy")
        if file.exists():
            images[f"{method}, {fraction:g} of the counts"] = np.load(file) / fraction
    ct = read_ct_series(str(STUDY / "CT"))
    ct_on_grid = resample(ct.volume, affine, reference.shape, cval=-1000.0)
    top = float(np.percentile(reference, 99.8))
    y = int(np.unravel_index(np.argmax(reference), reference.shape)[1])
    figure, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 3.8), facecolor="black", layout="constrained")
    for axis, (label, volume) in zip(np.atleast_1d(axes), images.items()):
        axis.imshow(ct_on_grid[:, y, :].T, cmap="gray", vmin=-400, vmax=600, origin="lower")
        shown = volume[:, y, :].T
        axis.imshow(np.ma.masked_less(shown, 0.03 * top), cmap="hot", vmin=0, vmax=top, alpha=0.75, origin="lower")
        axis.set_title(label.replace(" ", "\n", 1), color="white", fontsize=7)
        axis.axis("off")
    figure.suptitle("real 177Lu bed, coronal slice fused with CT, one colour scale (full-count OSEM's 99.8th percentile)",
                    color="white", fontsize=9)
    figure.savefig(out / "thinning_panels.png", dpi=110, facecolor="black")
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="name:param=value:..., comma-separated (the first is the reference)")
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", default="real-bed-thinning-output")
    parser.add_argument("--from-json", action="store_true", help="only redraw the table and figures from results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not study_present():
        return 2
    if args.from_json:
        rows = json.loads((out / "results.json").read_text())
    else:
        rows = run_all([m for m in args.methods.split(",") if m], [float(f) for f in args.fractions.split(",")], args.draws, out)
    write_outputs(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
