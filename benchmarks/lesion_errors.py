"""Each torso lesion's activity error by method, beside its diameter and site, from a harness report.

Whether a network erases lesions is a question about single lesions of a given size, which a
median over lesions hides. Reads ``results.csv`` of a `sspect benchmark` folder (standard grid),
draws each torso phantom again for its lesions' diameters and sites, and prints a Markdown table
(median error over noise realisations, per lesion and method) and writes it, with a plot of the
error against the diameter, as ``lesion_errors.md`` and ``lesion_errors.png`` beside the report.

    .venv/bin/python benchmarks/lesion_errors.py docs/clinical-grid-report \\
        --methods "osem,bsrem,kem,n2n,post-unet"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from clinical_grid_goals import CLINICAL, median, read, short  # the sibling benchmark's reading of the report


def lesions_of(phantom: str, config) -> dict:
    """``{lesion_k: (diameter mm, site)}`` of a torso phantom named as the harness names it."""
    from sspect.eval.benchmark import parse_phantoms

    spec, = parse_phantoms(phantom)
    built = spec.build(config)
    return {name: (region["diameter_mm"], region["site"]) for name, region in built.regions.items() if name.startswith("lesion_")}


def chosen(methods_in_report, wanted: list[str]) -> list[str]:
    """The report's method labels whose short form (parameters at their defaults left out) is one of ``wanted``, in that order."""
    return [label for name in wanted for label in methods_in_report if short(label) == name]


def run(folder: Path, wanted: list[str]) -> list[str]:
    import json

    from sspect.eval.harness import config_from_dict

    config = config_from_dict(json.loads((folder / "config.json").read_text()))
    rows = [r for r in read(folder / "results.csv") if r["seconds_per_view"] == CLINICAL and not r["phantom"].startswith("nema")]
    methods = chosen(list(dict.fromkeys(r["method"] for r in rows)), wanted)
    lines = ["| phantom | lesion | diameter mm | site | " + " | ".join(short(m) for m in methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    points = {m: [] for m in methods}
    for phantom in dict.fromkeys(r["phantom"] for r in rows):
        for lesion, (diameter, site) in lesions_of(phantom, config).items():
            cells = []
            for method in methods:
                values = [r.get(f"activity_error_pct_{lesion}") for r in rows if r["phantom"] == phantom and r["method"] == method]
                error = median(values)
                cells.append("" if np.isnan(error) else f"{error:+.0f}")
                if not np.isnan(error):
                    points[method].append((diameter, error))
            lines.append(f"| {phantom} | {lesion} | {diameter:.0f} | {site} | " + " | ".join(cells) + " |")
    plot(points, folder / "lesion_errors.png")
    (folder / "lesion_errors.md").write_text("\n".join(lines) + "\n")
    return lines


def plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for method, pairs in points.items():
        if pairs:
            diameters, errors = zip(*sorted(pairs))
            axis.plot(diameters, errors, "o", ms=4, alpha=0.8, label=short(method))
    axis.axhline(0, color="k", lw=0.6)
    axis.set_xlabel("lesion diameter (mm)")
    axis.set_ylabel(f"activity error % (median over realisations, {CLINICAL:g} s/view)")
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a `sspect benchmark` folder on the standard grid (results.csv, config.json)")
    parser.add_argument("--methods", default="osem,bsrem,kem,n2n,post-unet",
                        help="the methods to show as the goals table writes them (parameters at their defaults left out), comma-separated")
    args = parser.parse_args()
    if not (Path(args.report) / "config.json").is_file():
        parser.error(f"{args.report} is not a `sspect benchmark` folder (no config.json); give the folder the benchmark wrote.")
    print("\n".join(run(Path(args.report), [m.strip() for m in args.methods.split(",")])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
