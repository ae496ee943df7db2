"""Two harness reports side by side, case by case: what one engine change did to each method.

Rows are paired on phantom, count level and realisation (the harness draws the same counts for
them), so the difference is the change's, not the noise's. A method is chosen by a selector: its
name and the parameters its label must hold, such as ``osem iterations=4``; ``!ensemble=3``
excludes labels holding that. Prints one table of medians over the paired realisations and writes
it as markdown:

    .venv/bin/python benchmarks/paired_reports.py docs/clinical-grid-report /work/runs/smoothed_20s \\
        --methods "osem iterations=4,bsrem beta=0.1,post-unet weights=shipped" --out paired.md
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

METRICS = {  # column (or columns averaged) -> heading
    "nrmse": ("NRMSE", ("nrmse",)),
    "total": ("total %", ("total_activity_error_pct",)),
    "liver": ("liver %", ("activity_error_pct_liver",)),
    "cortex": ("kidney cortex %", ("activity_error_pct_kidney_left_cortex", "activity_error_pct_kidney_right_cortex")),
    "cov": ("background CoV", ("background_cov",)),
    "rc13-22": ("RC 13-22 mm", ("rc_mean_sphere_13", "rc_mean_sphere_17", "rc_mean_sphere_22")),
}


def _matches(label: str, selector: str) -> bool:
    name, *tokens = selector.split()
    words = label.split()
    return (words[0] == name and all(t[1:] not in words for t in tokens if t.startswith("!"))
            and all(t in words for t in tokens if not t.startswith("!")))


def _value(row: dict, columns) -> float | None:
    values = [float(row[c]) for c in columns if row.get(c) not in (None, "", "nan")]
    return statistics.fmean(values) if values else None


def _read(folder: Path, selector: str, seconds: float) -> dict:
    with open(folder / "results.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if float(r["seconds_per_view"]) == seconds and _matches(r["method"], selector)]
    return {(r["phantom"], r["realisation"]): r for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--methods", required=True, help="selectors, comma-separated; BEFORE -> AFTER when they differ")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"from {', '.join(METRICS)}")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    lines = [f"Medians over the paired realisations at {args.seconds:g} s/view; before / after.", "",
             "| method | phantom | n | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for item in args.methods.split(","):
        before_selector, _, after_selector = item.partition("->") if "->" in item else (item, "", item)
        before, after = _read(args.before, before_selector.strip(), args.seconds), _read(args.after, after_selector.strip(), args.seconds)
        for phantom in sorted({p for p, _ in before.keys() & after.keys()}):
            keys = sorted(k for k in before.keys() & after.keys() if k[0] == phantom)
            cells = []
            for metric in metrics:
                columns = METRICS[metric][1]
                pairs = [(_value(before[k], columns), _value(after[k], columns)) for k in keys]
                pairs = [p for p in pairs if None not in p]
                cells.append("" if not pairs else
                             f"{statistics.median(b for b, _ in pairs):.3g} / {statistics.median(a for _, a in pairs):.3g}")
            lines.append(f"| {after_selector.strip()} | {phantom} | {len(keys)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
