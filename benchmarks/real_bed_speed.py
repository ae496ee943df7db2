"""Speed and memory of the engine against a direct PyTomography script, on the real 177Lu bed.

Both sides reconstruct NM/bed1_projections.dcm + CT/ of ../shared/data/lu177_ge670 with the same
physics (photopeak window 1, TEW scatter from windows 3 and 2, CT attenuation at 208 keV, GE MEGP
collimator-detector response) and OSEM with 6 subsets. For each side it measures

- load time: engine = ``load_study`` + ``bed_problem`` (mu map, scatter, system model); direct =
  ``dicom.get_metadata/get_projections/get_energy_window_scatter_estimate/
  get_attenuation_map_from_CT_slices`` + ``get_psfmeta_from_scanner_params`` + ``SPECTSystemMatrix``
  + ``PoissonLogLikelihood``;
- time per OSEM iteration, from a timestamp at the end of every iteration (engine: its progress
  events; direct: a PyTomography callback). Iteration 1 also holds PyTomography's sensitivity
  images (one back projection of every subset), so it is reported apart from iterations 2..N;
- peak memory: ``ru_maxrss`` of a fresh child process per side and repeat, and its rise over the
  baseline measured after the imports.

Sides run one after the other, alternating engine/direct, ``--repeats`` times; the table gives
medians, the engine/direct ratio and the NRMSE between the two final images (should be < 1%).
It prints a Markdown table and writes benchmarks/output/real_bed_speed.md and .png.

    make benchmark                                    # defaults: 2 iterations, 3 repeats, CPU
    .venv/bin/python benchmarks/real_bed_speed.py --repeats 2 --iterations 2 --device cpu
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBSETS = 6
SIDES = ("engine", "direct")
LABELS = {"engine": "engine", "direct": "direct PyTomography"}
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lu177_ge670"
OUTPUT = Path(__file__).resolve().parent / "output"


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- child: one side, one repeat
def run_side(side: str, data: Path, iterations: int, device: str, result_path: Path) -> None:
    started = time.perf_counter()
    import numpy as np
    import torch
    import pytomography
    from pytomography.io.SPECT import dicom
    if side == "engine":
        from sspect.methods import Events, get_method
        from sspect.pipeline import Settings, bed_problem, load_study
    else:
        from pytomography.algorithms import OSEM
        from pytomography.callbacks import Callback
        from pytomography.likelihoods import PoissonLogLikelihood
        from pytomography.projectors.SPECT import SPECTSystemMatrix
        from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform
    import_s, baseline = time.perf_counter() - started, max_rss_mib()

    def now():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    nm, ct_dir = str(data / "NM" / "bed1_projections.dcm"), data / "CT"
    stamps = []
    quiet = contextlib.redirect_stdout(io.StringIO())  # PyTomography prints table choices etc.
    with quiet:
        if side == "engine":
            t0 = now()
            settings = Settings(method="osem", params={"iterations": iterations, "subsets": SUBSETS}, device=device)
            study = load_study(nm, ct_dir, settings)
            problem = bed_problem(study, device=device)
            load_s, load_peak = now() - t0, max_rss_mib()

            def on_event(event):
                if event.get("event") == "progress" and event.get("subset") == SUBSETS:
                    stamps.append(now())

            t0 = now()
            image = get_method("osem").reconstruct(problem, {"iterations": iterations, "subsets": SUBSETS},
                                                   Events(on_event)).image
        else:
            t0 = now()
            pytomography.device = torch.device(device)
            ct_files = sorted(str(p) for p in ct_dir.glob("*.dcm"))
            object_meta, proj_meta = dicom.get_metadata(nm, index_peak=1)
            projections = dicom.get_projections(nm, index_peak=1)
            scatter = dicom.get_energy_window_scatter_estimate(nm, index_peak=1, index_lower=3, index_upper=2)
            mu = dicom.get_attenuation_map_from_CT_slices(ct_files, nm, index_peak=1)
            psf = dicom.get_psfmeta_from_scanner_params("GI-MEGP", energy_keV=208, intrinsic_resolution_140keV=0.38)
            system = SPECTSystemMatrix(obj2obj_transforms=[SPECTAttenuationTransform(mu), SPECTPSFTransform(psf)],
                                       proj2proj_transforms=[], object_meta=object_meta, proj_meta=proj_meta)
            likelihood = PoissonLogLikelihood(system, projections, scatter)
            load_s, load_peak = now() - t0, max_rss_mib()

            class Stamp(Callback):
                def __init__(self):
                    pass

                def run(self, object, n_iter, n_subset):
                    if n_subset == SUBSETS - 1:
                        stamps.append(now())
                    return object

            t0 = now()
            image = OSEM(likelihood)(iterations, SUBSETS, callback=Stamp()).cpu().numpy()
    iteration_s = [b - a for a, b in zip([t0] + stamps, stamps)]
    np.save(result_path.with_suffix(".npy"), image)
    result = {"side": side, "import_s": import_s, "load_s": load_s, "iteration_s": iteration_s,
              "baseline_mib": baseline, "load_peak_mib": load_peak, "peak_mib": max_rss_mib(), "torch_threads": torch.get_num_threads(),
              "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------- parent: repeats, table, plot
def spawn(side: str, args, result_path: Path) -> dict:
    command = [sys.executable, __file__, "--side", side, "--data", str(args.data), "--iterations",
               str(args.iterations), "--device", args.device, "--result", str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"The {side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(result_path.read_text())


def metrics(run: dict) -> dict:
    later = run["iteration_s"][1:]
    row = {"load time (s)": run["load_s"],
           "OSEM iteration 1, with sensitivity images (s)": run["iteration_s"][0],
           "OSEM time per iteration, iterations 2..N (s)": statistics.mean(later) if later else None,
           "OSEM total (s)": sum(run["iteration_s"]),
           "peak memory, ru_maxrss (MiB)": run["peak_mib"],
           "peak memory over baseline after imports (MiB)": run["peak_mib"] - run["baseline_mib"],
           "peak memory by the end of loading (MiB)": run["load_peak_mib"],
           "baseline after imports (MiB)": run["baseline_mib"],
           "import time (s)": run["import_s"]}
    if run["gpu_peak_mib"] is not None:
        row["GPU peak allocated (MiB)"] = run["gpu_peak_mib"]
    return row


def table(runs: dict) -> str:
    rows = ["| metric | engine | direct PyTomography | ratio |", "| --- | ---: | ---: | ---: |"]
    for name in metrics(runs["engine"][0]):
        values = [[metrics(r)[name] for r in runs[side]] for side in SIDES]
        if None in values[0] + values[1]:
            continue
        engine, direct = (statistics.median(v) for v in values)
        rows.append(f"| {name} | {engine:.2f} | {direct:.2f} | {engine / direct:.2f} |")
    return "\n".join(rows)


def plot(runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("load time (s)", ["load time (s)"], ["load"]),
              ("OSEM iteration time (s)", ["OSEM iteration 1, with sensitivity images (s)",
                                            "OSEM time per iteration, iterations 2..N (s)"], ["iteration 1", "iterations 2..N"]),
              ("peak memory (MiB)", ["peak memory, ru_maxrss (MiB)", "peak memory over baseline after imports (MiB)"],
               ["peak", "over imports"])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (title, names, ticks) in zip(axes, panels):
        for s, (side, color) in enumerate(zip(SIDES, ("tab:blue", "tab:orange"))):
            for g, name in enumerate(names):
                points = [metrics(r)[name] for r in runs[side] if metrics(r)[name] is not None]
                if not points:
                    continue
                x = g + (s - 0.5) * 0.38
                ax.bar(x, statistics.median(points), 0.36, color=color, alpha=0.6, label=LABELS[side] if g == 0 else None)
                ax.plot([x] * len(points), points, "o", color="black", markersize=4)
        ax.set_xticks(range(len(names)), ticks)
        ax.set_xlim(-0.8, len(names) - 0.2)
        ax.set_title(title)
    axes[0].legend(loc="lower right")
    fig.suptitle("Real 177Lu bed (GE Discovery 670, 128^3, 60 views): bars = medians, dots = repeats")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine_facts(runs: dict, command: str, load_average: float) -> list[str]:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    versions = ", ".join(f"{p} {version(p)}" for p in ("sspect", "pytomography", "torch", "numpy", "pydicom"))
    return [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- command: `{command}`",
            f"- machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, torch threads {runs['engine'][0]['torch_threads']}, "
            f"load average at start {load_average:.2f}",
            f"- versions: Python {platform.python_version()}, {versions}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="study folder with NM/ and CT/")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args.side, args.data, args.iterations, args.device, args.result)
    if not (args.data / "NM" / "bed1_projections.dcm").exists():
        sys.exit(f"No real bed at {args.data}; pass --data FOLDER (with NM/bed1_projections.dcm and CT/).")
    import numpy as np

    command, load_average = shlex.join(["python", *sys.argv]), os.getloadavg()[0]
    print(f"# {command}", flush=True)
    runs, nrmse, log = {side: [] for side in SIDES}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            images = {}
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                result_path = Path(tmp) / f"{side}{repeat}.json"
                runs[side].append(spawn(side, args, result_path))
                images[side] = np.load(result_path.with_suffix(".npy"))
                run = runs[side][-1]
                log.append(f"- repeat {repeat + 1} {side}: load {run['load_s']:.1f} s, iterations "
                           + ", ".join(f"{t:.1f}" for t in run["iteration_s"]) + f" s, peak {run['peak_mib']:.0f} MiB")
                print(log[-1], flush=True)
            e, d = images["engine"], images["direct"]
            nrmse.append(float(np.sqrt(np.mean((e - d) ** 2)) / np.sqrt(np.mean(d ** 2))))
    report = (f"{table(runs)}\n\nOSEM {args.iterations} iterations x {SUBSETS} subsets on {args.device}; medians of "
              f"{args.repeats} repeats, each side in its own process. NRMSE engine vs direct (largest over repeats): "
              f"{max(nrmse):.2e}\n\nIn run order:\n" + "\n".join(log))
    print("\n" + report)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "real_bed_speed.md").write_text(
        "# Real bed: engine vs direct PyTomography\n\n" + report + "\n\n" + "\n".join(machine_facts(runs, command, load_average)) + "\n")
    plot(runs, OUTPUT / "real_bed_speed.png")
    print(f"\nwrote {OUTPUT / 'real_bed_speed.md'} and {OUTPUT / 'real_bed_speed.png'}")


if __name__ == "__main__":
    main()
