"""Harness results -> CSV, a Markdown summary and the plots people look at first."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_text_atomic

NEMA_SPHERE = re.compile(r"rc_mean_sphere_(\d+)")
COLD_REGIONS = ("lung_insert",)  # no activity in truth: a percent error there is meaningless


def short_label(method: str) -> str:
    """'bsrem beta=0.3 ... iterations=6 subsets=6' -> 'bsrem 6x6 beta=0.3' for tables and legends."""
    name, *pairs = method.split()
    params = dict(pair.split("=", 1) for pair in pairs)
    label = name
    if "subsets" in params:  # OSEM-type methods; a network's steps are only a cap
        label += f" {params.get('iterations', '?')}x{params['subsets']}"
    if "beta" in params:
        label += f" beta={params['beta']}"
    if params.get("ct_weights") == "True":
        label += " CT-weighted"
    if "domain" in params:
        label += f" {params['domain']}"
    if params.get("weights") and _family(name) == "self-supervised":  # a supervised network always has weights
        label += " pretrained"
    return label


def _family(method: str) -> str:
    from ..methods import all_methods

    found = all_methods().get(method)
    return found.family if found else ""


def final_background_cov(curves: list[dict]) -> dict:
    """(phantom, seconds, realisation, method) -> background CoV of the last iteration's image."""
    last = {}
    for row in curves:
        key = (row["phantom"], row["seconds_per_view"], row["realisation"], row["method"])
        if "background_cov" in row and (key not in last or row["iteration"] > last[key]["iteration"]):
            last[key] = row
    return {key: row["background_cov"] for key, row in last.items()}


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _groups(rows, keys=("phantom", "seconds_per_view", "method")):
    grouped = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(row)
    return grouped


def _median(rows, key):
    values = [row[key] for row in rows if key in row and np.isfinite(row[key])]
    return float(np.median(values)) if values else float("nan")


def summary_table(rows: list[dict], curves: list[dict] = ()) -> str:
    """Medians over realisations, one line per phantom, count level and method."""
    covs = final_background_cov(curves)
    rows = [{**row, "background_cov": covs.get((row["phantom"], row["seconds_per_view"], row["realisation"], row["method"]),
                                                row.get("background_cov", float("nan")))} for row in rows]
    lines = []
    for phantom in dict.fromkeys(row["phantom"] for row in rows):
        subset = [row for row in rows if row["phantom"] == phantom]
        spheres = sorted({int(m.group(1)) for row in subset for key in row if (m := NEMA_SPHERE.fullmatch(key))})
        organs = [key[len("activity_error_pct_"):] for key in subset[0] if key.startswith("activity_error_pct_")
                  and "sphere" not in key and key[len("activity_error_pct_"):] not in ("body", "background", *COLD_REGIONS)]
        cov_key = "background_cov"
        header = ["s/view", "method", "counts", "time s", "NRMSE", "total err %", "background CoV"]
        header += [f"RC {d} mm" for d in spheres] + [f"{o} err %" for o in organs]
        lines += [f"### {phantom}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (_, seconds, method), group in _groups(subset).items():
            cells = [f"{seconds:g}", short_label(method), f"{_median(group, 'photopeak_counts'):.3g}",
                     f"{_median(group, 'run_time_s'):.3g}",
                     f"{_median(group, 'nrmse'):.3f}", f"{_median(group, 'total_activity_error_pct'):+.1f}",
                     f"{_median(group, cov_key):.3f}"]
            cells += [f"{_median(group, f'rc_mean_sphere_{d}'):.2f}" for d in spheres]
            cells += [f"{_median(group, f'activity_error_pct_{o}'):+.1f}" for o in organs]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def bias_variance_table(rows: list[dict], regions=("liver", "kidney_left_cortex", "spleen", "sphere_37", "sphere_17", "sphere_10")) -> str:
    """Bias (%) and ensemble standard deviation (%) of region means across realisations."""
    lines = ["| phantom | s/view | method | region | bias % | ensemble SD % | realisations |", "|---|---|---|---|---|---|---|"]
    for (phantom, seconds, method), group in _groups(rows).items():
        for region in regions:
            key = f"rc_mean_{region}"
            values = np.array([row[key] for row in group if key in row])
            if len(values) < 2:
                continue
            lines.append(f"| {phantom} | {seconds:g} | {short_label(method)} | {region} | {100 * (values.mean() - 1):+.1f} | "
                         f"{100 * values.std(ddof=1):.1f} | {len(values)} |")
    return "\n".join(lines)


def plot_recovery_vs_size(rows: list[dict], path: Path) -> bool:
    """NEMA: mean recovery coefficient against sphere diameter, per method and count level."""
    nema = [row for row in rows if any(NEMA_SPHERE.fullmatch(k) for k in row)]
    if not nema:
        return False
    plt = _pyplot()
    phantoms = list(dict.fromkeys(row["phantom"] for row in nema))
    figure, axes = plt.subplots(1, len(phantoms), figsize=(5.5 * len(phantoms), 4.2), squeeze=False, layout="constrained")
    for axis, phantom in zip(axes[0], phantoms):
        for (_, seconds, method), group in _groups([r for r in nema if r["phantom"] == phantom]).items():
            sizes = sorted(int(m.group(1)) for k in group[0] if (m := NEMA_SPHERE.fullmatch(k)))
            axis.plot(sizes, [_median(group, f"rc_mean_sphere_{d}") for d in sizes], marker="o",
                      label=f"{short_label(method)}, {seconds:g} s/view")
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.set(title=phantom, xlabel="sphere diameter (mm)", ylabel="recovery coefficient (mean)", ylim=(0, 1.3))
        axis.legend(fontsize=7)
    _save(figure, path)
    return True


def plot_bias_variance(curves: list[dict], truth_means: dict, path: Path, region: str) -> bool:
    """Noise (background CoV) against recovery of ``region`` over iterations (or a network's training
    steps): medians over realisations, one panel per count level."""
    if not curves or f"mean_{region}" not in curves[0]:
        return False
    plt = _pyplot()
    levels = sorted({row["seconds_per_view"] for row in curves})
    figure, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels) + 2.5, 4.6), squeeze=False,
                                layout="constrained", sharey=True)
    for axis, seconds in zip(axes[0], levels):
        for (phantom, _, method), group in _groups([r for r in curves if r["seconds_per_view"] == seconds]).items():
            iterations = sorted({row["iteration"] for row in group})
            recovery = [np.median([r[f"mean_{region}"] for r in group if r["iteration"] == n]) / truth_means[phantom][region]
                        for n in iterations]
            noise = [np.median([r["background_cov"] for r in group if r["iteration"] == n]) for n in iterations]
            axis.plot(noise, recovery, marker=".", label=f"{phantom} {short_label(method)}")
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.set(xlabel="background CoV (noise)", ylabel=f"recovery of {region}", title=f"{seconds:g} s/view")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(f"{region}: recovery against noise over iterations / training steps")
    _save(figure, path)
    return True


def plot_ensemble_bias_variance(rows: list[dict], path: Path,
                                regions=("sphere_37", "sphere_17", "sphere_10", "liver", "kidney_left_cortex", "lesion_1")) -> bool:
    """Each method's final image: bias of a region's mean against its SD across noise realisations.

    One row of panels per phantom (its first three of ``regions``), one point per method and count
    level; the closer to (0, 0) the better.
    """
    phantoms = {}
    for phantom in dict.fromkeys(row["phantom"] for row in rows):
        found = [r for r in regions if any(f"rc_mean_{r}" in row for row in rows if row["phantom"] == phantom)][:3]
        if found:
            phantoms[phantom] = found
    if not phantoms:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(len(phantoms), 3, figsize=(15, 3.8 * len(phantoms)), squeeze=False, layout="constrained")
    methods = list(dict.fromkeys(short_label(row["method"]) for row in rows))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    levels = sorted({row["seconds_per_view"] for row in rows})
    markers = dict(zip(levels, "os^Dv<>"))
    for axes_row, (phantom, found) in zip(axes, phantoms.items()):
        for axis in axes_row[len(found):]:
            axis.axis("off")
        for axis, region in zip(axes_row, found):
            key = f"rc_mean_{region}"
            for (_, seconds, method), group in _groups([r for r in rows if r["phantom"] == phantom and key in r]).items():
                values = np.array([row[key] for row in group])
                if len(values) >= 2:
                    axis.scatter(100 * values.std(ddof=1), 100 * (values.mean() - 1), color=colours[short_label(method)],
                                 marker=markers[seconds], s=36)
            axis.axhline(0.0, color="grey", lw=0.8)
            axis.set(xlabel="ensemble SD of the mean (%)", ylabel="bias of the mean (%)", title=f"{phantom}: {region}")
    handles = [plt.Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="black", marker=markers[s], ls="", label=f"{s:g} s/view") for s in levels]
    figure.legend(handles=handles, fontsize=8, loc="outside right center")
    figure.suptitle("bias against ensemble SD across noise realisations (final images)")
    _save(figure, path)
    return True


def plot_panels(images: dict, truth, path: Path, title: str) -> None:
    """Each method's image fused with the CT, beside the truth, and its error map (image - truth)."""
    plt = _pyplot()
    z = int(np.argmax(truth.activity.sum(axis=(0, 1))))
    top = float(truth.activity.max()) * 1.1
    columns = [("truth", truth.activity)] + list(images.items())
    figure, axes = plt.subplots(2, len(columns), figsize=(3.4 * len(columns), 6.6), squeeze=False, facecolor="black",
                                layout="constrained")
    for column, (name, image) in enumerate(columns):
        axes[0, column].imshow(truth.hu[:, :, z].T, cmap="gray", vmin=-400, vmax=600)
        axes[0, column].imshow(np.ma.masked_less(image[:, :, z].T, 0.05 * top), cmap="hot", vmin=0, vmax=top, alpha=0.75)
        axes[0, column].set_title(name if name == "truth" else short_label(name), color="white", fontsize=9)
        error = image[:, :, z] - truth.activity[:, :, z]
        shown = axes[1, column].imshow(error.T, cmap="coolwarm", vmin=-0.5 * top, vmax=0.5 * top)
        for axis in axes[:, column]:
            axis.axis("off")
    colorbar = figure.colorbar(shown, ax=axes[1, :], fraction=0.03, label="image - truth (MBq/mL)")
    colorbar.ax.yaxis.label.set_color("white")
    colorbar.ax.tick_params(colors="white")
    figure.suptitle(title, color="white")
    _save(figure, path)


def write_markdown(path: Path, made_with: str, config: dict, rows, figures: list[str], curves=(), findings: str = "") -> None:
    text = [
        "# Validation harness report",
        "",
        made_with,
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in config.items()),
        "",
        findings,
        "## Medians over noise realisations",
        "",
        "Background CoV: voxel SD / mean in the NEMA background or the torso liver, final iteration.",
        "",
        summary_table(rows, curves),
        "## Bias and ensemble spread across realisations (region means relative to truth)",
        "",
        bias_variance_table(rows),
        "",
        "## Figures",
        "",
    ] + [f"![{name}]({name})" for name in figures]
    write_text_atomic(path, "\n".join(text) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110, format="png", facecolor=figure.get_facecolor())
    plt.close(figure)
