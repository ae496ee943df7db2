"""`sspect benchmark`: the harness from the command line."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import SSPECTError
from .harness import (CLINICAL_SECONDS_PER_VIEW, HarnessConfig, PhantomSpec, build_cases, config_dict, config_from_dict,
                      run_cases)

def parse_phantoms(text: str) -> list[PhantomSpec]:
    """'nema8,nema4,torso0,dotatate1' -> phantom specs (torso<seed>: 177Lu-PSMA; dotatate<seed>: the same anatomy with 177Lu-DOTATATE)."""
    specs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        match = re.fullmatch(r"(nema)(\d+(?:\.\d+)?)?(?:to1)?|(torso|dotatate)(\d+)?", item)  # a ratio; a whole seed
        if not match:
            raise SSPECTError(f"Unknown phantom '{item}'; write nema<ratio> (e.g. nema8), torso<seed> (e.g. torso0, PSMA) "
                              "or dotatate<seed> (e.g. dotatate1).")
        kind, number = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        if kind == "nema":
            specs.append(PhantomSpec("nema", ratio=float(number or 8)))
        else:
            specs.append(PhantomSpec("torso", seed=int(number or 0), tracer="DOTATATE" if kind == "dotatate" else "PSMA"))
    return specs


def parse_methods(text: str) -> list[tuple[str, dict]]:
    """'osem:iterations=4:subsets=6,bsrem:beta=0.3' -> [(name, params)], validated by the registry."""
    from ..methods import get_method

    methods = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, *pairs = item.split(":")
        params = {}
        for pair in pairs:
            if "=" not in pair:
                raise SSPECTError(f"The method setting '{pair}' must be written name=value.")
            key, value = pair.split("=", 1)
            params[key] = value
        methods.append((name, get_method(name).validate(params)))
    return methods


def progress_bar(total: int, unit: str = "case"):
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, file=sys.stderr)
    return bar, lambda result: (bar.update(1), bar.set_postfix_str(result.case.name))


def run_benchmark(phantoms: str, seconds: str, methods: str, realisations: int, out, workers: int = 2,
                  scheduler: str | None = None, command: str = "sspect benchmark",
                  config: HarnessConfig | None = None) -> Path:
    """Run the grid of cases and write results.csv, curves.csv, the figures and report.md."""
    from . import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or HarnessConfig()
    levels = [float(s) for s in seconds.split(",")]
    keep = CLINICAL_SECONDS_PER_VIEW if CLINICAL_SECONDS_PER_VIEW in levels else levels[len(levels) // 2]
    cases = build_cases(parse_phantoms(phantoms), levels, parse_methods(methods), realisations, keep_images_at=keep)
    write_json_atomic(out / "config.json", config_dict(config))  # so --from-csv redraws with the same grid
    bar, show_progress = progress_bar(len(cases))
    done = []

    def on_done(result):
        """Keep the CSVs current: a run stopped halfway still leaves every finished case (--from-csv)."""
        show_progress(result)
        done.append(result)
        report.write_csv([row for r in done for row in r.rows], out / "results.csv")
        report.write_csv([row for r in done for row in r.curves], out / "curves.csv")

    try:
        results = run_cases(cases, config, out / "studies", workers, scheduler, on_done)
    finally:
        bar.close()
    rows = [row for result in results for row in result.rows]
    curves = [row for result in results for row in result.curves]
    report.write_csv(rows, out / "results.csv")  # in case order, whatever order they finished in
    report.write_csv(curves, out / "curves.csv")
    for result in results:
        if result.images:
            report.plot_panels(result.images, simulate_truth(result.case.phantom, config),
                               out / f"panels_{result.case.phantom.name}.png",
                               f"{result.case.phantom.name}, {result.case.seconds_per_view:g} s/view, realisation 0")
    return write_report(out, rows, curves, config, f"Made with `{command}`.")


def write_report(out: Path, rows: list[dict], curves: list[dict], config: HarnessConfig, made_with: str) -> Path:
    """Figures and report.md from metric rows (also from the CSVs of an earlier run)."""
    from . import report

    figures = []
    if report.plot_recovery_vs_size(rows, out / "recovery_vs_sphere_size.png"):
        figures.append("recovery_vs_sphere_size.png")
    if report.plot_ensemble_bias_variance(rows, out / "ensemble_bias_vs_sd.png"):
        figures.append("ensemble_bias_vs_sd.png")
    specs = parse_phantoms(",".join(dict.fromkeys(row["phantom"] for row in rows)))
    truth_means = {spec.name: _region_means(simulate_truth(spec, config)) for spec in specs}
    for region in ("sphere_37", "sphere_17", "liver", "kidney_left_cortex"):
        relevant = [c for c in curves if f"mean_{region}" in c and c[f"mean_{region}"] == c[f"mean_{region}"]]
        name = f"bias_variance_{region}.png"
        if relevant and report.plot_bias_variance(relevant, truth_means, out / name, region):
            figures.append(name)
    figures += sorted(p.name for p in out.glob("panels_*.png"))
    findings = (out / "findings.md").read_text() + "\n" if (out / "findings.md").exists() else ""
    report.write_markdown(out / "report.md", made_with, config_dict(config), rows, figures, curves, findings)
    return out / "report.md"


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        raise SSPECTError(f"{path} does not exist; run the benchmark first.")
    with open(path, newline="") as handle:
        return [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def _read_config(folder: Path) -> HarnessConfig:
    path = folder / "config.json"
    return config_from_dict(json.loads(path.read_text())) if path.exists() else HarnessConfig()


def _made_with(folder: Path) -> str:
    """The sentence of a folder's report.md that names the command which computed its numbers,
    without a "(report rebuilt with ...)" of its own and without the final full stop."""
    previous = (folder / "report.md").read_text() if (folder / "report.md").exists() else ""
    found = re.search(r"^(?:Made|Merged) with .*$", previous, re.MULTILINE)
    sentence = found.group(0) if found else "Made with an earlier run."
    return sentence.split(" (report rebuilt with")[0].rstrip(".")


def rebuild_report(out, command: str) -> Path:
    """Rewrite report.md and the plots from results.csv and curves.csv, without recomputing."""
    out = Path(out)
    rows, curves = _read_csv(out / "results.csv"), _read_csv(out / "curves.csv")
    return write_report(out, rows, curves, _read_config(out), f"{_made_with(out)} (report rebuilt with `{command}`).")


def merge_reports(sources, out, command: str) -> Path:
    """One report from several benchmark folders run on the same grid (e.g. one per group of methods).

    Noise realisations are seeded by their number, so the same phantom, count level and
    realisation is the same Poisson draw in every folder, and the methods are compared on
    identical data. Image panels are copied with the folder's name appended.
    """
    import shutil

    sources = [Path(s) for s in sources]
    configs = {json.dumps(config_dict(_read_config(s)), sort_keys=True) for s in sources}
    if len(configs) > 1:
        raise SSPECTError("The benchmark folders were run on different grids or acquisitions; merge only runs with the same settings.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for s in sources for row in _read_csv(s / "results.csv")]
    curves = [row for s in sources for row in _read_csv(s / "curves.csv")]
    for source in sources:
        for panel in source.glob("panels_*.png"):
            shutil.copyfile(panel, out / f"{panel.stem}_{source.name}.png")
    from . import report

    report.write_csv(rows, out / "results.csv")
    report.write_csv(curves, out / "curves.csv")
    config = _read_config(sources[0])
    write_json_atomic(out / "config.json", config_dict(config))
    parts = "; ".join(f"{s.name}: {_made_with(s)}" for s in sources)
    return write_report(out, rows, curves, config, f"Merged with `{command}` from {parts}.")


def _number(text: str):
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def simulate_truth(spec: PhantomSpec, config: HarnessConfig):
    return spec.build(config)


def _region_means(phantom) -> dict:
    from .metrics import region_masks

    return {name: float(phantom.activity[mask].mean()) for name, mask in region_masks(phantom).items()}
