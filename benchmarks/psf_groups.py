"""The fast operator's depth-dependent blur against PyTomography's, by the kurtosis bound of its plane groups.

The fast operator sums the planes parallel to the detector in groups (``psf_kurtosis``, see
``SPECTOperator._psf_tables``). For each bound this prints the number of groups, the forward
projection NRMSE against PyTomography's SPECTSystemMatrix (same metadata, mu map and PSF
metadata) and the fast forward time, on the real bed (128^3 of 4.42 mm, 60 views, MEGP) and on a
simulated Siemens two-head study (32^3 of 8 mm, 24 views, ME), and writes a PNG.

    .venv/bin/python benchmarks/psf_groups.py --out docs/operator       # about 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lu177_ge670"
OUTPUT = Path(__file__).resolve().parent / "output"
BOUNDS = (1e9, 0.3, 0.1, 0.05, 0.02)


def studies():
    from sspect.pipeline import Settings, load_study
    from sspect.sim.dicom_writer import write_demo_study

    with contextlib.redirect_stdout(io.StringIO()):
        written = write_demo_study(Path(tempfile.mkdtemp()), seed=2, layout="Siemens", n_views=24, shape=(32, 32, 32),
                                   voxel_mm=8.0, noise=False)
        yield "Siemens 32^3, 8 mm", load_study(written["nm"], written["ct"], Settings(device="cpu"))
        if (DATA / "NM" / "bed1_projections.dcm").exists():
            yield "real bed 128^3, 4.42 mm", load_study(DATA / "NM" / "bed1_projections.dcm", DATA / "CT", Settings(device="cpu"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    import torch

    from sspect.physics.operator import SPECTOperator
    from sspect.pipeline import bed_problem

    results = {}
    for name, study in studies():
        reference = bed_problem(study, device="cpu", projector="pytomography")
        psf = reference.system_matrix.obj2obj_transforms[-1].psf_meta
        body = (reference.attenuation_map > 0.05).float()
        image = body * (1 + torch.rand(body.shape, generator=torch.Generator().manual_seed(0)))
        expected = reference.system_matrix.forward(image).double()
        for bound in BOUNDS:
            operator = SPECTOperator(reference.object_meta, reference.proj_meta, reference.attenuation_map, psf,
                                     psf_kurtosis=bound)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                projected = operator.forward(image)
                times.append(time.perf_counter() - started)
            error = float((projected.double() - expected).norm() / expected.norm())
            results[(name, bound)] = (int(operator.group_last.sum()), error, statistics.median(times))
            print(f"  {name}, bound {bound:g}: {results[(name, bound)]}", file=sys.stderr, flush=True)
    names = sorted({name for name, _ in results})
    lines = ["| kurtosis bound | " + " | ".join(f"{n}: groups, NRMSE, forward s" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for bound in BOUNDS:
        cells = [f"{results[(n, bound)][0]}, {100 * results[(n, bound)][1]:.3f} %, {results[(n, bound)][2]:.2f}" for n in names]
        lines.append(f"| {'one group' if bound >= 1e9 else f'{bound:g}'} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "psf_groups.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for n in names:
        axis.plot([results[(n, b)][0] for b in BOUNDS], [100 * results[(n, b)][1] for b in BOUNDS], "o-", label=n)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("groups of depth planes")
    axis.set_ylabel("forward NRMSE vs PyTomography (%)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "psf_groups.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
