"""The validation history of `sspect train` runs, side by side: a Markdown table and one figure.

Reads the description (``model.json``, or the ``.json`` beside a shipped network) each run wrote:
every validation check's median NRMSE and median lesion activity error on the held-out cases,
beside those of the OSEM start image the network corrects.

    .venv/bin/python benchmarks/training_history.py docs/clinical-grid-report/supervised-standard/training_*.json \\
        --out docs/clinical-grid-report/supervised-standard
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def label(description: dict) -> str:
    settings = description["training"]["settings"]
    return f"{description['kind']}, lesion weight {settings.get('lesion_weight', 0.0):g}"


def table(descriptions: list[dict]) -> list[str]:
    lines = ["| run | step | train loss | validation loss | NRMSE (start OSEM) | |lesion| % (start OSEM) |",
             "|---|---|---|---|---|---|"]
    for description in descriptions:
        best = description["training"]["best_step"]
        start = description["validation"]
        for check in description["training"]["history"]:
            mark = " (kept)" if check["step"] == best else ""
            lines.append(f"| {label(description)} | {check['step']}{mark} | {check['train_loss']:.3f} | {check['loss']:.3f} | "
                         f"{check['nrmse_median']:.3f} ({start['start_osem_nrmse_median']:.3f}) | "
                         f"{check['lesion_abs_error_pct_median']:.1f} ({start['start_osem_lesion_abs_error_pct_median']:.1f}) |")
    return lines


def plot(descriptions: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for description in descriptions:
        history = description["training"]["history"]
        steps = [h["step"] for h in history]
        left.plot(steps, [h["nrmse_median"] for h in history], "o-", ms=3, label=label(description))
        right.plot(steps, [h["lesion_abs_error_pct_median"] for h in history], "o-", ms=3, label=label(description))
    start = descriptions[0]["validation"]
    left.axhline(start["start_osem_nrmse_median"], color="k", lw=0.8, ls="--", label="OSEM 4 x 6 (the start)")
    right.axhline(start["start_osem_lesion_abs_error_pct_median"], color="k", lw=0.8, ls="--", label="OSEM 4 x 6 (the start)")
    left.set_ylabel("median NRMSE, held-out cases")
    right.set_ylabel("median |lesion activity error| %")
    for axis in (left, right):
        axis.set_xlabel("training step")
    left.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("descriptions", nargs="+", help="model.json files written by `sspect train`")
    parser.add_argument("--out", required=True, help="folder for training_history.md and training_history.png")
    args = parser.parse_args()
    descriptions = []
    for path in args.descriptions:
        try:
            descriptions.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            parser.error(f"{path} is not a readable model.json ({error}); give the files `sspect train` wrote.")
    lines = table(descriptions)
    out = Path(args.out)
    (out / "training_history.md").write_text("\n".join(lines) + "\n")
    plot(descriptions, out / "training_history.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
