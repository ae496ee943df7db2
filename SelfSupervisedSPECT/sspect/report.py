"""A preview PNG (activity fused with CT) and a short Markdown report next to every result."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_text_atomic
from .volume import Volume


def write_preview(volume: Volume, ct_hu: np.ndarray | None, path: Path, title: str = "") -> None:
    """Axial, coronal and sagittal slices through the hottest region, SPECT over CT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.ndimage import uniform_filter

    image = volume.array
    centre = np.unravel_index(np.argmax(uniform_filter(image, size=3)), image.shape)
    top = float(image.max()) if image.max() > 0 else 1.0
    dx, dy, dz = volume.spacing
    # (slice, aspect) per view; arrays are [x, y, z], LPS: show patient right on the left, head up
    views = [("axial", lambda a: a[:, :, centre[2]].T, dy / dx),
             ("coronal", lambda a: a[:, centre[1], :].T[::-1], dz / dx),
             ("sagittal", lambda a: a[centre[0], :, :].T[::-1], dz / dy)]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for axis, (name, cut, aspect) in zip(axes, views):
        if ct_hu is not None:
            axis.imshow(cut(ct_hu), cmap="gray", vmin=-400, vmax=600, aspect=aspect, interpolation="bilinear")
        overlay = np.ma.masked_less_equal(cut(image), 0.1 * top)
        shown = axis.imshow(overlay, cmap="hot", vmin=0, vmax=top, alpha=0.6 if ct_hu is not None else 1.0,
                            aspect=aspect, interpolation="bilinear")
        axis.set_title(name, color="white")
        axis.axis("off")
    colorbar = figure.colorbar(shown, ax=axes, fraction=0.02, pad=0.01)
    colorbar.set_label(volume.unit, color="white")
    colorbar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    figure.suptitle(title, color="white")
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110, facecolor="black", format="png")
    plt.close(figure)


def write_report(path: Path, provenance: dict, volume: Volume, files: dict, study_summary: str,
                 truth: dict | None = None) -> None:
    """What was reconstructed, how, and the numbers a physicist checks first."""
    params = ", ".join(f"{k}={v}" for k, v in provenance["params"].items())
    total = float(volume.array.sum())
    lines = [
        f"# Reconstruction report: {provenance['method_title']}",
        "",
        "## Study",
        study_summary,
        "",
        "## Settings",
        f"- method: `{provenance['method']}` ({params})",
        f"- isotope: {provenance['isotope']['name']}; windows: " + "; ".join(
            f"{w['photopeak_keV']:g} keV photopeak {w['peak']['lower_keV']:.1f}-{w['peak']['upper_keV']:.1f} keV "
            f"({w['scatter_method']} scatter correction{_smoothing(provenance, w)})" for w in provenance["windows"]),
        f"- corrections: {', '.join(provenance['corrections'])}; collimator {provenance['collimator']} "
        f"(PyTomography code {provenance['collimator_code']})",
        f"- device {provenance['device']}, seed {provenance['seed']}, run time {provenance['run_time_s']} s",
        "",
        "## Result",
        f"- unit: {volume.unit}; grid {' x '.join(map(str, volume.array.shape))} voxels of "
        f"{' x '.join(f'{s:.2f}' for s in volume.spacing)} mm, origin (LPS) "
        f"{', '.join(f'{o:.1f}' for o in volume.origin)} mm",
    ]
    if volume.unit == "Bq/mL":
        lines.append(f"- total activity in the field of view: {total * volume.voxel_volume_ml / 1e6:.1f} MBq")
    else:
        lines.append(f"- total of the image: {total:.4g} counts (per view); give a calibration factor for Bq/mL")
    lines.append(f"- maximum voxel: {float(volume.array.max()):.4g} {volume.unit}")
    decay = provenance.get("decay_correction") or {"mode": "none"}
    if decay["mode"] == "none":
        lines.append("- decay correction: none (the mean activity over the acquisition)")
    else:
        moment = "the acquisition start" if decay["mode"] == "start" else "the injection"
        lines.append(f"- decay corrected to {moment} ({decay['reference_datetime'] or 'date unknown'}): "
                     f"factor {', '.join(f'{f:.5g}' for f in decay['factors_per_bed'])} (per bed)")
    if truth:
        lines += ["", "## Against the simulated truth"] + [f"- {k}: {v}" for k, v in truth.items()]
    if provenance["warnings"]:
        lines += ["", "## Warnings"] + [f"- {w}" for w in provenance["warnings"]]
    lines += ["", "## Files"] + [f"- {kind}: `{Path(name).name}`" for kind, name in files.items()]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _smoothing(provenance: dict, window: dict) -> str:
    """How the scatter-window estimate was smoothed (provenance written before it was recorded: nothing said)."""
    sigma = provenance.get("scatter_smoothing_cm")
    if window["scatter_method"] == "none" or sigma is None:
        return ""
    return f", its estimate smoothed by a {sigma:g} cm Gaussian in each view" if sigma > 0 else ", its estimate unsmoothed"
