"""`sspect dataset`: simulated torso cases (truth, labels, DICOM study, OSEM image) and a manifest for training.

The cases are the harness's (phantoms drawn twice finer, projected with attenuation, collimator
response and scatter, Poisson counts written as scanner DICOM); every file's sha256 is in the
manifest, so training refuses a case that changed since.
"""
from __future__ import annotations

from pathlib import Path

from ..atomic import file_sha256, write_json_atomic
from ..errors import SSPECTError
from ..eval.benchmark import parse_methods, progress_bar, simulate_truth
from ..eval.harness import CLINICAL_SECONDS_PER_VIEW, HarnessConfig, PhantomSpec, build_cases, config_dict, run_cases
from ..io.volume_files import write_nrrd
from ..sim.phantoms.torso import TORSO_UPTAKE
from ..volume import Volume


def run_dataset(n: int, out, first_seed: int = 0, seconds_per_view=CLINICAL_SECONDS_PER_VIEW,
                workers: int = 2, scheduler: str | None = None, osem: str = "iterations=4:subsets=6",
                config: HarnessConfig | None = None, tracers=("PSMA",)) -> Path:
    """N torso cases (truth, labels, CT, simulated NM DICOM, OSEM image) and a manifest for training.

    ``seconds_per_view``: one count level, or several used in turn over the cases (seed k gets
    level k mod L), so that a network trained on the dataset sees every count level; ``tracers``
    likewise (case k gets tracer k mod T), so that it sees PSMA's and DOTATATE's uptake."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or HarnessConfig()
    unknown = [t for t in tracers if t not in TORSO_UPTAKE]
    if unknown:
        raise SSPECTError(f"Unknown tracer '{unknown[0]}'; choose {' or '.join(TORSO_UPTAKE)}.")
    methods = parse_methods(f"osem:{osem}" if osem else "osem")
    levels = list(seconds_per_view) if isinstance(seconds_per_view, (list, tuple)) else [seconds_per_view]
    cases = [case for k, seed in enumerate(range(first_seed, first_seed + n))
             for case in build_cases([PhantomSpec("torso", seed=seed, tracer=tracers[k % len(tracers)])],
                                     [levels[k % len(levels)]], methods, 1,
                                     keep_images_at=levels[k % len(levels)])]
    bar, on_done = progress_bar(len(cases))
    try:
        results = run_cases(cases, config, out / "studies", workers, scheduler, on_done)
    finally:
        bar.close()
    entries = []
    for result in results:
        truth = simulate_truth(result.case.phantom, config)
        folder = out / "studies" / result.case.name
        files = {"nm": folder / "NM" / "projections.dcm", "ct": folder / "CT",
                 "truth": folder / "truth_MBq_per_mL.nrrd", "labels": folder / "labels.nrrd", "osem": folder / "osem_MBq_per_mL.nrrd"}
        write_nrrd(truth.activity_volume, files["truth"])
        write_nrrd(Volume(truth.labels.astype("float32"), truth.spacing, truth.origin, unit="label"), files["labels"])
        (label, image), = result.images.items()
        write_nrrd(Volume(image, truth.spacing, truth.origin, unit="MBq/mL"), files["osem"])
        entries.append({"case": result.case.name, "phantom_seed": result.case.phantom.seed,
                        "tracer": result.case.phantom.tracer,
                        "seconds_per_view": result.case.seconds_per_view, "noise_seed": result.case.realisation,
                        "reconstruction": label, "label_names": truth.label_names,
                        "files": {k: str(v.relative_to(out)) for k, v in files.items()},
                        "sha256": {k: file_sha256(v) for k, v in files.items() if v.is_file()},
                        "metrics_osem": result.rows[0]})
    manifest = {"config": config_dict(config), "n": len(entries), "cases": entries}
    write_json_atomic(out / "manifest.json", manifest)
    return out / "manifest.json"
