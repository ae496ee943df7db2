"""The goals of the clinical-grid comparison, each with its measured figure, from a merged harness report.

Reads ``results.csv`` and ``curves.csv`` of a `sspect benchmark` folder on the standard grid and,
when given, the ``summary.json`` of `benchmarks/real_bed_thinning.py`; prints a Markdown table
(goal, figure, met or not) and writes it to ``goals.md`` beside the report, plus the per-method
table it rests on (``methods_at_clinical_counts.md``; the same table for every other count level
in the report, ``methods_at_<s>s_per_view.md``) and one figure: NRMSE along each method's path
(OSEM iterations, BSREM and KEM iterations, a network's validation checks) on each phantom.

    .venv/bin/python benchmarks/clinical_grid_goals.py docs/clinical-grid-report \\
        --thinning docs/clinical-grid-report/real-bed-thinning/summary.json

Definitions (medians over noise realisations, the same draws for every method):
- OSEM's best iteration: the iteration whose median NRMSE is lowest along OSEM's path (curves);
- kidney cortex: the mean of the left and right cortex errors; lesions: the median of the
  lesions' absolute activity errors; "no worse" compares absolute errors;
- matched background CoV (NEMA): OSEM's recovery of a sphere interpolated along its iterations at
  the method's final background CoV (recovery = VOI mean over the true mean, both realisation-wise).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

CLINICAL = 20.0
OSEM = "osem"


def read(path: Path) -> list[dict]:
    """Rows of a CSV; a row repeated by merged runs (the same method on the same draw in two runs) counts once,
    the first kept (merge the runs that record each iterate's NRMSE first)."""
    with open(path, newline="") as handle:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    key = lambda r: (r["phantom"], r["seconds_per_view"], r["realisation"], r["method"], r.get("iteration"))
    kept = {}
    for row in rows:
        kept.setdefault(key(row), row)
    return list(kept.values())


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def family(method: str) -> str:
    from sspect.methods import get_method

    return get_method(method.split()[0]).family


def short(method: str) -> str:
    """A harness label without the parameters left at their defaults: 'dip upsampling=resize'."""
    from sspect.methods import get_method

    name, *items = method.split()
    defaults = get_method(name).validate({})
    kept = [item for item in items if str(defaults.get(item.split("=")[0])) != item.split("=", 1)[1]]
    return " ".join([name] + kept)


def median(values) -> float:
    values = [v for v in values if isinstance(v, float) and np.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def best_along_path(curves, phantom, method, seconds=CLINICAL) -> tuple[float, float]:
    """(the step with the lowest median NRMSE, that NRMSE) along a method's path."""
    path = [c for c in curves if c["phantom"] == phantom and c["method"] == method and c["seconds_per_view"] == seconds
            and isinstance(c.get("nrmse"), float)]
    steps = sorted({c["iteration"] for c in path})
    if not steps:
        return float("nan"), float("nan")
    medians = [median(c["nrmse"] for c in path if c["iteration"] == s) for s in steps]
    k = int(np.nanargmin(medians))
    return steps[k], medians[k]


def organ_errors(rows) -> dict:
    """Median over realisations of |kidney cortex error|, median |lesion error|, total error."""
    cortex = [np.mean([abs(r[k]) for k in ("activity_error_pct_kidney_left_cortex", "activity_error_pct_kidney_right_cortex")
                       if isinstance(r.get(k), float)]) for r in rows]
    lesions = [np.median([abs(v) for k, v in r.items() if k.startswith("activity_error_pct_lesion_") and isinstance(v, float)])
               for r in rows]
    return {"cortex": median([float(c) for c in cortex]), "lesions": median([float(x) for x in lesions]),
            "total": median(r["total_activity_error_pct"] for r in rows)}


def torso_table(rows, curves, phantoms, seconds=CLINICAL) -> tuple[list[str], list[dict]]:
    lines = ["| phantom | method | family | NRMSE | best point along its path (step: NRMSE) | |kidney cortex| % | |lesions| % "
             "| total % | run time s |", "|---|---|---|---|---|---|---|---|---|"]
    table = []
    for phantom in phantoms:
        at = [r for r in rows if r["phantom"] == phantom and r["seconds_per_view"] == seconds]
        for method in dict.fromkeys(r["method"] for r in at):
            group = [r for r in at if r["method"] == method]
            step, best = best_along_path(curves, phantom, method, seconds)
            errors = organ_errors(group)
            entry = {"phantom": phantom, "method": method, "family": family(method), "nrmse": median(r["nrmse"] for r in group),
                     "best_step": step, "best_nrmse": best, **errors, "seconds": median(r["run_time_s"] for r in group),
                     "realisations": len(group)}
            table.append(entry)
            lines.append(f"| {phantom} | {short(method)} | {entry['family']} | {entry['nrmse']:.3f} | "
                         f"{'' if np.isnan(step) else f'{step:g}: {best:.3f}'} | {errors['cortex']:.1f} | {errors['lesions']:.1f} | "
                         f"{errors['total']:+.1f} | {entry['seconds']:.0f} |")
    return lines, table


def nema_recovery(rows, curves, phantom="nema8to1", spheres=(13, 17, 22)) -> list[dict]:
    """Each method's final recovery of the spheres against OSEM's at the method's background CoV."""
    at = [r for r in rows if r["phantom"] == phantom and r["seconds_per_view"] == CLINICAL]
    osem_label = next((m for m in dict.fromkeys(r["method"] for r in at) if m.split()[0] == OSEM), None)
    if osem_label is None:
        return []
    out = []
    for method in dict.fromkeys(r["method"] for r in at):
        group = [r for r in at if r["method"] == method]
        for realisation in sorted({r["realisation"] for r in group}):
            row = next(r for r in group if r["realisation"] == realisation)
            osem_row = next((r for r in at if r["method"] == osem_label and r["realisation"] == realisation), None)
            path = sorted((c for c in curves if c["phantom"] == phantom and c["method"] == osem_label
                           and c["seconds_per_view"] == CLINICAL and c["realisation"] == realisation), key=lambda c: c["iteration"])
            if osem_row is None or not path:
                continue
            cov = row["background_cov"]
            for size in spheres:
                true_mean = path[-1][f"mean_sphere_{size}"] / osem_row[f"rc_mean_sphere_{size}"]
                osem_covs = [c["background_cov"] for c in path]
                osem_rcs = [c[f"mean_sphere_{size}"] / true_mean for c in path]
                order = np.argsort(osem_covs)
                matched = float(np.interp(cov, np.asarray(osem_covs)[order], np.asarray(osem_rcs)[order]))
                out.append({"method": method, "realisation": realisation, "sphere": size, "rc": row[f"rc_mean_sphere_{size}"],
                            "osem_rc_at_cov": matched, "cov": cov, "beyond_osem_path": not min(osem_covs) <= cov <= max(osem_covs)})
    return out


def plot_paths(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phantoms = list(dict.fromkeys(c["phantom"] for c in curves if c["seconds_per_view"] == CLINICAL))
    if not phantoms:
        return
    figure, axes = plt.subplots(1, len(phantoms), figsize=(4.2 * len(phantoms), 3.8), layout="constrained", squeeze=False)
    for axis, phantom in zip(axes[0], phantoms):
        at = [c for c in curves if c["phantom"] == phantom and c["seconds_per_view"] == CLINICAL and isinstance(c.get("nrmse"), float)]
        for method in dict.fromkeys(c["method"] for c in at):
            steps = sorted({c["iteration"] for c in at if c["method"] == method})
            medians = [median(c["nrmse"] for c in at if c["method"] == method and c["iteration"] == s) for s in steps]
            axis.plot(np.arange(1, len(steps) + 1), medians, "o-", ms=2.5, label=short(method))
        axis.set_title(f"{phantom}, {CLINICAL:g} s/view", fontsize=9)
        axis.set_xlabel("point along the path (iteration or check)")
        axis.set_ylabel("median NRMSE")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def supervised_goals(table) -> list[str]:
    """The best self-supervised NRMSE against the supervised network's: within 10 % on the torsos, below it on NEMA."""
    lines = []
    for phantom in dict.fromkeys(t["phantom"] for t in table):
        entries = [t for t in table if t["phantom"] == phantom]
        selfsup = [t for t in entries if t["family"] == "self-supervised"]
        supervised = [t for t in entries if t["family"] == "supervised"]
        if not selfsup or not supervised:
            continue
        ours, theirs = min(selfsup, key=lambda t: t["nrmse"]), min(supervised, key=lambda t: t["nrmse"])
        nema = phantom.startswith("nema")
        met = ours["nrmse"] < theirs["nrmse"] if nema else ours["nrmse"] <= 1.1 * theirs["nrmse"]
        goal = "below the supervised network's NRMSE" if nema else "within 10 % of the supervised network's NRMSE"
        lines.append(f"| {phantom}: the best self-supervised method {goal} | {short(ours['method'])} {ours['nrmse']:.3f} vs "
                     f"{short(theirs['method'])} {theirs['nrmse']:.3f} ({100 * (ours['nrmse'] / theirs['nrmse'] - 1):+.1f} %) "
                     f"| {'yes' if met else 'no'} |")
    return lines or ["| within 10 % of the supervised network's NRMSE on the torsos, better on NEMA | no supervised network "
                     "in the report | not measured |"]


def goals(table, recovery, thinning) -> list[str]:
    lines = ["| goal | measured | met |", "|---|---|---|"]
    torsos = sorted({t["phantom"] for t in table if not t["phantom"].startswith("nema")})
    for phantom in torsos:
        entries = [t for t in table if t["phantom"] == phantom]
        osem = [t for t in entries if t["method"].split()[0] == OSEM]
        selfsup = [t for t in entries if t["family"] == "self-supervised"]
        if not osem or not selfsup:
            continue
        osem_best = min(t["best_nrmse"] if np.isfinite(t["best_nrmse"]) else t["nrmse"] for t in osem)
        best = min(selfsup, key=lambda t: t["nrmse"])
        target = 0.9 * osem_best
        met = best["nrmse"] <= target
        lines.append(f"| {phantom}, {CLINICAL:g} s/view: a self-supervised NRMSE >= 10 % below OSEM's best iteration "
                     f"({osem_best:.3f}, so <= {target:.3f}) | {short(best['method'])}: {best['nrmse']:.3f} "
                     f"({100 * (best['nrmse'] / osem_best - 1):+.1f} %) | {'yes' if met else 'no'} |")
        o = min(osem, key=lambda t: t["nrmse"])  # the OSEM run whose final image is best (its organ errors)
        organs_met = best["cortex"] <= o["cortex"] and best["lesions"] <= o["lesions"] and abs(best["total"]) <= 2
        lines.append(f"| {phantom}: that method's kidney cortex and lesion errors no worse than {short(o['method'])}'s, total within 2 % | "
                     f"cortex {best['cortex']:.1f} % vs {o['cortex']:.1f} %, lesions {best['lesions']:.1f} % vs "
                     f"{o['lesions']:.1f} %, total {best['total']:+.1f} % | {'yes' if organs_met else 'no'} |")
    for method in dict.fromkeys(r["method"] for r in recovery):
        if method.split()[0] == OSEM:
            continue
        ours = [r for r in recovery if r["method"] == method]
        gains = {size: median(r["rc"] - r["osem_rc_at_cov"] for r in ours if r["sphere"] == size) for size in (13, 17, 22)}
        met = all(g >= 0 for g in gains.values())
        lines.append(f"| NEMA 8:1, {short(method)}: recovery of the 13-22 mm spheres >= OSEM's at matched background CoV | "
                     + ", ".join(f"{s} mm {g:+.3f}" for s, g in gains.items()) + f" (RC difference) | {'yes' if met else 'no'} |")
    lines += supervised_goals(table)
    if thinning:
        reference = next((s for s in thinning if s["method"].split()[0] == OSEM and s["fraction"] == 0.25), None)
        for entry in (s for s in thinning if s["fraction"] == 0.25 and s["method"].split()[0] != OSEM):
            if reference is None:
                break
            cov_drop = 1 - entry["liver_cov"] / reference["liver_cov"]
            met = cov_drop >= 0.3 and abs(entry["hot_error_pct"]) <= 5
            lines.append(f"| real bed, 25 % counts, {short(entry['method'])}: liver CoV >= 30 % below OSEM's at 25 %, hot uptakes "
                         f"within 5 % of full-count OSEM (no kidneys in this bed) | CoV {entry['liver_cov']:.3f} vs "
                         f"{reference['liver_cov']:.3f} ({100 * abs(cov_drop):.0f} % {'lower' if cov_drop >= 0 else 'higher'}), hot uptakes {entry['hot_error_pct']:+.1f} % "
                         f"(worst {entry['worst_hot_error_pct']:+.1f} %) | {'yes' if met else 'no'} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a `sspect benchmark` folder (results.csv, curves.csv)")
    parser.add_argument("--thinning", help="summary.json of benchmarks/real_bed_thinning.py")
    args = parser.parse_args()
    folder = Path(args.report)
    rows, curves = read(folder / "results.csv"), read(folder / "curves.csv")
    phantoms = list(dict.fromkeys(r["phantom"] for r in rows))
    lines, table = torso_table(rows, curves, phantoms)
    recovery = nema_recovery(rows, curves)
    thinning = json.loads(Path(args.thinning).read_text()) if args.thinning else None
    (folder / "methods_at_clinical_counts.md").write_text("\n".join(lines) + "\n")
    goal_lines = goals(table, recovery, thinning)
    (folder / "goals.md").write_text("\n".join(goal_lines) + "\n")
    plot_paths(curves, folder / "nrmse_along_paths.png")
    for seconds in sorted({r["seconds_per_view"] for r in rows} - {CLINICAL}):
        other, _ = torso_table(rows, curves, phantoms, seconds)
        (folder / f"methods_at_{seconds:g}s_per_view.md").write_text("\n".join(other) + "\n")
    print("\n".join(lines + [""] + goal_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
