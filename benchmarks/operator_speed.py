"""The fast SPECT operator against PyTomography 3.4's SPECTSystemMatrix, side by side in one run.

Every measurement runs in a fresh child process (so that its peak memory, ``ru_maxrss``, is its
own), on the real 177Lu bed of ../shared/data/lu177_ge670 (128^3 voxels of 4.42 mm, 60 views)
and on the same bed's object with a 120-view orbit (3 degree steps, the bed's radius), with the
fast operator as built (``fast``), with its memory-short fallback (``fast-recompute``: the
attenuation factors not kept but recomputed for every group of views; 60 views) and PyTomography's:

- ``project``: building the system model, one forward, one back, and forward + back (medians of
  ``--repeats``; PyTomography ``--reference-repeats``), and the NRMSE of the fast forward
  projection of a test object against PyTomography's;
- ``osem``: OSEM 4 x 6 of the real bed through the engine (``load_study`` + ``reconstruct_study``),
  load apart and included, and the NRMSE of the images against PyTomography's; ``fast-exact`` is
  PyTomography's OSEM on the fast operator with its exact transpose as the back projection (load
  and build included in its time), which shows why ``backward`` is the matched one;
- ``method``: self-supervised methods on the full bed (fast only), ``--methods`` as
  ``name:param=value`` specs separated by ``;`` (default: ``n2n`` at its defaults and a 10-step
  ``dip`` whose time per step bounds its default run's time), ``--methods none`` skips them.

It prints Markdown tables (also written to ``benchmarks/output/operator_speed.md``), a bound on
the forward + back projection from flop and memory-traffic counts against this machine's
measured matmul and copy rates, and a PNG of the times (``operator_speed.png``).

    .venv/bin/python benchmarks/operator_speed.py                      # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/operator_speed.py --methods none --reference-repeats 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lu177_ge670"
OUTPUT = Path(__file__).resolve().parent / "output"
PROJECTORS = ("fast", "pytomography")
VARIANTS = ("fast", "fast-recompute", "pytomography")  # fast-recompute: attenuation not kept (the memory-short fallback)
OSEM_VARIANTS = ("fast", "fast-exact", "pytomography")  # fast-exact: the exact transpose as OSEM's back projection
GOALS = {"forward + back speed-up (CPU)": ">= 10x", "real-bed OSEM 4 x 6, load included (CPU)": "< 30 s",
         "n2n on the full real bed (CPU)": "< 5 min", "forward, 128^3 x 120 views (GPU)": "<= 50 ms",
         "dip on the full real bed (GPU)": "< 2 min"}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _study(device):
    from sspect.pipeline import Settings, load_study

    with contextlib.redirect_stdout(io.StringIO()):
        return load_study(DATA / "NM" / "bed1_projections.dcm", DATA / "CT", Settings(device=device))


def _test_object(problem):
    """The body (mu > 0.05 /cm) with a smooth random texture and two hot spheres: a patient-like object."""
    import torch

    generator = torch.Generator().manual_seed(0)
    body = (problem.attenuation_map.cpu() > 0.05).float()
    texture = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 128, 128, 128, generator=generator), 9, 1, 4)[0, 0]
    image = body * (0.5 + texture)
    grid = torch.stack(torch.meshgrid(*[torch.arange(128.0)] * 3, indexing="ij"))
    for centre, radius, value in (((70, 60, 64), 6, 8.0), ((50, 80, 40), 3, 20.0)):
        inside = ((grid - torch.tensor(centre).reshape(3, 1, 1, 1)) ** 2).sum(0) < radius**2
        image[inside] = value
    return image


# ---------------------------------------------------------------- children: one measurement each


def child_project(projector: str, views: int, repeats: int, device: str, arrays: Path) -> dict:
    import numpy as np
    import torch

    from sspect.pipeline import bed_problem

    study = _study(device)
    if views != 60:  # the same bed and radius on a finer orbit
        bed = study.beds[0]
        bed.angles_deg = np.arange(views) * (360.0 / views) + float(bed.angles_deg[0])
        bed.radii_cm = np.full(views, float(np.asarray(bed.radii_cm).reshape(-1)[0]))
        bed.projections = np.zeros((bed.projections.shape[0], views, *bed.projections.shape[2:]), dtype=np.float32)
        bed.projections[:, :, 60:68, 60:68] = 1.0  # any nonzero counts: only the geometry is used
    started = time.perf_counter()
    if projector == "fast-recompute":
        from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params

        from sspect.physics.operator import SPECTOperator

        psf = get_psfmeta_from_scanner_params(study.collimator.code, energy_keV=study.peaks[0].photopeak_keV,
                                              intrinsic_resolution_140keV=study.collimator.intrinsic_resolution_140keV_cm)
        problem = bed_problem(study, device=device, projector="pytomography")  # its metadata and mu map
        problem.system_matrix = SPECTOperator(problem.object_meta, problem.proj_meta, problem.attenuation_map, psf,
                                              device=problem.device, precompute_limit_bytes=0)
    else:
        problem = bed_problem(study, device=device, projector=projector)
    build = time.perf_counter() - started
    system = problem.system_matrix
    image = _test_object(problem).to(problem.device)
    projections = system.forward(image)
    sync = torch.cuda.synchronize if problem.device.type == "cuda" else (lambda: None)

    def forward():
        system.forward(image)
        sync()

    def back():
        system.backward(projections)
        sync()

    def both():
        system.backward(system.forward(image))
        sync()

    result = {"build_s": build, "forward_s": median_time(forward, repeats), "back_s": median_time(back, repeats),
              "forward_back_s": median_time(both, repeats),
              "precomputed_mib": getattr(system, "precomputed_bytes", 0) / 2**20}
    if projector == "fast":  # the loop structure the bound counts
        result["structure"] = {"views": views, "padded": system.padded, "width": system.width, "depth": system.depth,
                               "z_padded": system.depth + 2 * system.z_pad, "steps": int(system.steps.sum()),
                               "groups": int(system.group_last.sum()), "kernel_y": int(system.base_y.shape[3]),
                               "kernel_z": int(system.base_z.shape[4])}
    np.save(arrays / f"forward_{projector}_{views}.npy", projections.cpu().numpy())
    return result


def child_osem(projector: str, device: str, arrays: Path) -> dict:
    import numpy as np

    from sspect.pipeline import Settings, load_study, reconstruct_study

    if projector == "fast-exact":  # OSEM with the exact transpose as its back projection: the fixed point moves
        from pytomography.algorithms import OSEM
        from pytomography.likelihoods import PoissonLogLikelihood

        from sspect.pipeline import bed_problem

        started = time.perf_counter()
        problem = bed_problem(_study(device), device=device)
        problem.system_matrix.back_projection = "exact"
        image = OSEM(PoissonLogLikelihood(problem.system_matrix, problem.projections, problem.scatter))(4, 6)
        np.save(arrays / f"osem_{projector}.npy", image.cpu().numpy())
        seconds = time.perf_counter() - started
        return {"load_s": float("nan"), "reconstruct_s": seconds, "total_s": seconds, "method_run_time_s": float("nan")}
    settings = Settings(method="osem", params={"iterations": 4, "subsets": 6}, device=device, projector=projector)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(DATA / "NM" / "bed1_projections.dcm", DATA / "CT", settings)
        loaded = time.perf_counter()
        volume, provenance = reconstruct_study(study, settings)
    finished = time.perf_counter()
    np.save(arrays / f"osem_{projector}.npy", volume.array)
    return {"load_s": loaded - started, "reconstruct_s": finished - loaded, "total_s": finished - started,
            "method_run_time_s": provenance["method_run_time_s"]}


def child_method(spec: str, device: str) -> dict:
    from sspect.eval.benchmark import parse_methods
    from sspect.pipeline import Settings, load_study, reconstruct_study

    [(method, params)] = parse_methods(spec)
    settings = Settings(method=method, params=params, device=device)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(DATA / "NM" / "bed1_projections.dcm", DATA / "CT", settings)
        volume, provenance = reconstruct_study(study, settings)
    info = provenance["per_bed"][0]
    steps = info.get("stopped_at") or params.get("steps")
    return {"total_s": time.perf_counter() - started, "method_run_time_s": provenance["method_run_time_s"],
            "steps_run": steps,
            "best_step": info.get("best_step"), "stopped_at": info.get("stopped_at"),
            "total_counts": float(volume.array.sum())}


def machine_rates() -> dict:
    """Float32 matmul rate and copy bandwidth of this machine now (the bound's denominators)."""
    import torch

    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    matmul = median_time(lambda: a @ b, 5)
    big = torch.rand(64 * 2**20)  # 256 MiB
    out = torch.empty_like(big)
    copy = median_time(lambda: out.copy_(big), 5)
    return {"gflops": 2 * 2048**3 / matmul / 1e9, "copy_gb_s": 2 * big.numel() * 4 / copy / 1e9}


# ---------------------------------------------------------------- parent


def run_child(args, kind: str, *spec) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        target = Path(handle.name)
    command = [sys.executable, __file__, "--child", kind, *map(str, spec), "--json", str(target),
               "--device", args.device, "--repeats", str(args.repeats), "--arrays", str(args.arrays)]
    subprocess.run(command, check=True)
    result = json.loads(target.read_text())
    target.unlink()
    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    print(f"  {kind} {' '.join(map(str, spec))}: {json.dumps(shown)}", flush=True)
    return result


def nrmse(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bound(structure: dict) -> dict:
    """Flop and byte counts of the fast forward + back (the operator's own loop structure, from the child)."""
    s = structure
    planes = s["views"] * s["padded"] * s["width"] * s["depth"]  # rotated voxels of one projection
    canvas = s["views"] * s["width"] * s["z_padded"]  # one detector plane stack
    flops_one = 2 * planes * (4 + 1) + 2 * 9 * canvas * s["steps"] + 2 * canvas * s["groups"] * (s["kernel_y"] + s["kernel_z"])
    traffic_one = planes * 4 * 3  # detection factors read; the back projection's plane buffer written and read
    return {"gflop": 2 * flops_one / 1e9, "gbyte": 2 * traffic_one / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each fast projection")
    parser.add_argument("--reference-repeats", type=int, default=2, help="repeats of each PyTomography projection")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="n2n;dip:pretrain_steps=0:steps=10:validation_fraction=0",
                        help="method specs separated by ';', or none")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--arrays", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        kind, *spec = args.child
        if kind == "project":
            result = child_project(spec[0], int(spec[1]), args.repeats, args.device, args.arrays)
        elif kind == "osem":
            result = child_osem(spec[0], args.device, args.arrays)
        else:
            result = child_method(spec[0], args.device)
        result["peak_mib"] = peak_mib()
        args.json.write_text(json.dumps(result))
        return 0
    if not (DATA / "NM" / "bed1_projections.dcm").exists():
        print(f"The real bed is not at {DATA}; this benchmark needs ../shared/data/lu177_ge670.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    arrays = Path(tempfile.mkdtemp())
    print(f"# Fast operator vs PyTomography 3.4, {platform.processor() or platform.machine()}, device {args.device}", flush=True)
    rows = {}
    for views in (60, 120):
        for projector in VARIANTS if views == 60 else PROJECTORS:
            repeats = args.reference_repeats if projector == "pytomography" else args.repeats
            rows[("project", projector, views)] = run_child(argparse.Namespace(**{**vars(args), "repeats": repeats,
                                                                                  "arrays": arrays}), "project", projector, views)
    for projector in OSEM_VARIANTS:
        rows[("osem", projector)] = run_child(argparse.Namespace(**{**vars(args), "arrays": arrays}), "osem", projector)
    methods = [] if args.methods == "none" else args.methods.split(";")
    for method in methods:
        rows[("method", method)] = run_child(argparse.Namespace(**{**vars(args), "arrays": arrays}), "method", method)
    import numpy as np

    lines = ["## Projections (median seconds; peak memory of the process)", "",
             "| views | projector | build s | forward s | back s | forward + back s | speed-up (f + b) | precomputed MiB | peak MiB | forward NRMSE vs PyTomography |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for views in (60, 120):
        reference = rows[("project", "pytomography", views)]
        for projector in VARIANTS if views == 60 else PROJECTORS:
            r = rows[("project", projector, views)]
            own = 0.0 if projector == "pytomography" else nrmse(np.load(arrays / f"forward_{projector}_{views}.npy"),
                                                                np.load(arrays / f"forward_pytomography_{views}.npy"))
            lines.append(f"| {views} | {projector} | {r['build_s']:.1f} | {r['forward_s']:.2f} | {r['back_s']:.2f} | "
                         f"{r['forward_back_s']:.2f} | {reference['forward_back_s'] / r['forward_back_s']:.1f}x | "
                         f"{r['precomputed_mib']:.0f} | {r['peak_mib']:.0f} | {own:.4f} |")
    lines += ["", "## OSEM 4 x 6 of the real bed (engine: load_study + reconstruct_study)", "",
              "| projector | load s | build + OSEM s | OSEM alone s | total s | peak MiB | image NRMSE vs PyTomography |",
              "|---|---|---|---|---|---|---|"]
    for projector in OSEM_VARIANTS:
        r = rows[("osem", projector)]
        error = nrmse(np.load(arrays / f"osem_{projector}.npy"), np.load(arrays / "osem_pytomography.npy"))
        lines.append(f"| {projector} | {r['load_s']:.1f} | {r['reconstruct_s']:.1f} | {r['method_run_time_s']:.1f} | "
                     f"{r['total_s']:.1f} | {r['peak_mib']:.0f} | {error:.4f} |")
    if methods:
        lines += ["", "## Self-supervised methods, full real bed (128^3, no binning), fast operator", "",
                  "| method | total s | method alone s | steps run | best step | stopped at | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for method in methods:
            r = rows[("method", method)]
            lines.append(f"| {method} | {r['total_s']:.0f} | {r['method_run_time_s']:.0f} | {r['steps_run']} | "
                         f"{r['best_step']} | {r['stopped_at']} | {r['peak_mib']:.0f} |")
    rates = machine_rates()
    lines += ["", "## Bound (fast forward + back, 128^3)", "",
              "| views | Gflop | GB moved | at matmul rate s | at copy bandwidth s | measured s |", "|---|---|---|---|---|---|"]
    for views in (60, 120):
        b = bound(rows[("project", "fast", views)]["structure"])
        lines.append(f"| {views} | {b['gflop']:.1f} | {b['gbyte']:.1f} | {b['gflop'] / rates['gflops']:.2f} | "
                     f"{b['gbyte'] / rates['copy_gb_s']:.2f} | {rows[('project', 'fast', views)]['forward_back_s']:.2f} |")
    lines += ["", f"Machine now: float32 matmul {rates['gflops']:.0f} Gflop/s, copy {rates['copy_gb_s']:.1f} GB/s."]
    speedup = rows[("project", "pytomography", 60)]["forward_back_s"] / rows[("project", "fast", 60)]["forward_back_s"]
    lines += ["", "## Goals", "", "| goal | target | measured |", "|---|---|---|",
              f"| forward + back speed-up (CPU) | >= 10x | {speedup:.1f}x (60 views), "
              f"{rows[('project', 'pytomography', 120)]['forward_back_s'] / rows[('project', 'fast', 120)]['forward_back_s']:.1f}x (120 views) |",
              f"| real-bed OSEM 4 x 6, load included | < 30 s | {rows[('osem', 'fast')]['total_s']:.1f} s |"]
    for method in methods:
        r = rows[("method", method)]
        if method == "n2n":
            lines.append(f"| n2n on the full real bed | < 5 min | {r['total_s'] / 60:.1f} min |")
        elif method.startswith("dip:"):
            per_step = r["method_run_time_s"] / int(r["steps_run"])  # likelihood steps (and the OSEM start)
            lines.append(f"| dip on the full real bed (goal on a GPU: < 2 min) | - | {per_step:.1f} s a likelihood step on "
                         f"{args.device}: at most {per_step * 500 / 60:.0f} min for its default 200 + 300 steps "
                         "(pretraining steps have no projection) |")
    if args.device == "cuda":
        lines.append(f"| forward, 128^3 x 120 views (GPU) | <= 50 ms | {rows[('project', 'fast', 120)]['forward_s'] * 1000:.0f} ms |")
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "operator_speed.md").write_text(text)
    plot(rows, methods, args.out / "operator_speed.png")
    return 0


def plot(rows, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, fast, reference = [], [], []
    for views in (60, 120):
        for key in ("forward_s", "back_s", "forward_back_s"):
            labels.append(f"{key[:-2].replace('_', ' + ')}\n{views} views")
            fast.append(rows[("project", "fast", views)][key])
            reference.append(rows[("project", "pytomography", views)][key])
    labels.append("OSEM 4x6\nload incl.")
    fast.append(rows[("osem", "fast")]["total_s"])
    reference.append(rows[("osem", "pytomography")]["total_s"])
    figure, axis = plt.subplots(figsize=(10, 4.5))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], reference, 0.4, label="PyTomography 3.4")
    axis.bar([p + 0.2 for p in positions], fast, 0.4, label="fast operator")
    for p, (r, f) in enumerate(zip(reference, fast)):
        axis.text(p, max(r, f) * 1.1, f"{r / f:.0f}x", ha="center", fontsize=8)
    axis.set_yscale("log")
    axis.set_xticks(list(positions), labels, fontsize=8)
    axis.set_ylabel("seconds (median)")
    axis.set_title("Real 177Lu bed, 128^3 voxels of 4.42 mm, 2-core CPU")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
