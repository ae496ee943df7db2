"""The `sspect` command: info, reconstruct, run-job, methods, demo.

Every failure a user can cause ends in one sentence on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from .errors import TERMINATED_EXIT_CODE, SSPECTError, Terminated, sigterm_as_interrupt
from .eval.harness import GRIDS
from .methods.toolkit.networks import UPSAMPLING


def _settings(args, method_params: dict):
    from .pipeline import Settings

    number, name = _calibration(getattr(args, "calibration", None))
    return Settings(method=args.method, params=method_params, peak_window=args.peak_window,
                    lower_window=args.lower_window, upper_window=args.upper_window, collimator=args.collimator,
                    isotope=args.isotope, photopeaks=args.photopeaks, calibration_cps_per_MBq=number, calibration_name=name, device=args.device, seed=args.seed,
                    formats=tuple(args.formats.split(",")), name=args.name, detector_binning=args.binning,
                    projector=args.projector, overwrite=args.overwrite, acquisition_datetime=args.acquisition_datetime,
                    injection_datetime=args.injection_datetime, injected_activity_MBq=args.injected_activity,
                    decay_correction=getattr(args, "decay_correction", "none"), scatter_smoothing_cm=args.scatter_smoothing)


def _calibration(text: str | None) -> tuple[float | None, str | None]:
    """--calibration is a sensitivity in cps/MBq or the name of a stored calibration."""
    if text is None:
        return None, None
    try:
        return float(text), None
    except ValueError:
        return None, text


def _method_params(args) -> dict:
    params = {}
    for key in ("iterations", "subsets"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    for item in args.param or []:
        if "=" not in item:
            raise SSPECTError(f"The parameter '{item}' must be written name=value.")
        key, value = item.split("=", 1)
        params[key.strip().replace("-", "_")] = value.strip()
    return params


def command_info(args) -> int:
    from .io.inventory import scan
    from .pipeline import Settings, describe_study, load_study

    if Path(args.path).is_file():
        from .io.nm import read_projections
        read_projections(args.path)  # a file that is not projections gets its own one-sentence reason
    inventory = scan(args.path)
    if not inventory.projection_files:
        raise SSPECTError(f"No NM TOMO projection file was found in {args.path}; give a SPECT projection file or a folder holding one.")
    for file, frame_of_reference_uid in inventory.projection_files.items():
        ct_source = args.ct
        if ct_source is None:
            matches = inventory.ct_for(frame_of_reference_uid)
            ct_source = [str(f) for f in matches[0]["files"]] if matches else None
        study = load_study([file], ct_source, Settings(peak_window=args.peak_window, lower_window=args.lower_window,
                                                       upper_window=args.upper_window, collimator=args.collimator,
                                                       isotope=args.isotope, photopeaks=args.photopeaks))
        print(f"{file}")
        print(describe_study(study))
        print("- matching CT: " + ("given" if args.ct else "same Frame of Reference, found beside it" if study.ct else "none found"))
        print("- energy windows in the file:")
        for window in study.beds[0].windows:
            role = {}
            for windows in study.peaks:
                role[windows.peak.index] = f"{windows.photopeak_keV:g} keV photopeak"
                if windows.lower:
                    role[windows.lower.index] = f"{windows.photopeak_keV:g} keV lower scatter"
                if windows.upper:
                    role[windows.upper.index] = f"{windows.photopeak_keV:g} keV upper scatter"
            counts = float(study.beds[0].projections[window.index].sum())
            print(f"    {window.describe():40s} {counts:12.4g} counts  {role.get(window.index, '')}")
        for warning in study.warnings:
            print(f"- warning: {warning}")
    return 0


@contextlib.contextmanager
def _progress_bar():
    """Events that drive a tqdm bar on stderr, created on the first progress event so that an
    early error prints only its sentence."""
    from tqdm import tqdm

    from .methods import Events

    bars = []

    def on_event(event):
        if event["event"] == "progress":
            if not bars:
                bars.append(tqdm(total=1.0, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", file=sys.stderr))
            bars[0].n = event["fraction"]
            bars[0].set_postfix_str(event.get("message", ""))
            bars[0].refresh()
        elif event["event"] == "warning":
            print(f"warning: {event['message']}", file=sys.stderr)

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield Events(on_event)
    finally:
        for bar in bars:
            bar.close()


def command_reconstruct(args) -> int:
    from .pipeline import run

    with _progress_bar() as events:
        result = run(args.nm, args.ct, _settings(args, _method_params(args)), args.out, events)
    _print_files(result["files"], result["unit"])
    return 0


def _print_files(files: dict, unit: str) -> None:
    print(f"Wrote ({unit}):")
    for kind, path in files.items():
        print(f"  {kind:10s} {path}")


def command_calibrate(args) -> int:
    from dataclasses import replace

    from .calibrate import calibrate

    settings = replace(_settings(args, _method_params(args)), name=None)  # --name names the calibration, not the image
    with _progress_bar() as events:
        result = calibrate(args.nm, args.ct, settings, args.out, args.name,
                           args.activity, args.activity_datetime, events)
    record = result["calibration"]
    print(f"Sensitivity {record['cps_per_MBq']:.4g} cps/MBq ({record['isotope']}, {record['collimator']}, "
          f"{record['method']}), stored as '{record['name']}' in {result['store']}; use it with --calibration '{record['name']}'.")
    _print_files(result["files"], result["unit"])
    return 0


def command_calibrations(args) -> int:
    from .io.calibrations import store_path, stored_calibrations

    records = stored_calibrations()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"Calibrations in {store_path()}:" if records else f"No calibration is stored yet ({store_path()}).")
    for name, record in sorted(records.items()):
        print(f"  {name}: {record['cps_per_MBq']:.4g} cps/MBq, {record.get('isotope')} {record.get('collimator')}, "
              f"{record.get('method')}, measured {record.get('created')}")
    return 0


def command_run_job(args) -> int:
    from .jobs import run_job

    return run_job(args.job)


def command_methods(args) -> int:
    from .methods import all_methods

    print(json.dumps({name: m.describe() for name, m in all_methods().items()}, indent=2, default=str))
    return 0


def command_demo(args) -> int:
    from .demo import run_demo

    with _progress_bar() as events:
        files = run_demo(Path(args.out), events, quick=args.quick)
    _print_files(files, "Bq/mL")
    print(f"Demo finished: read {files['report']} (OSEM), {files['supervised_report']} (supervised post-unet) "
          f"and {files['self_supervised_report']} (self-supervised dip-admm)")
    return 0


def command_benchmark(args) -> int:
    from .eval.benchmark import run_benchmark

    command = "sspect " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else "sspect benchmark"
    if args.merge:
        from .eval.benchmark import merge_reports

        print(f"Reports merged: read {merge_reports(args.merge.split(','), args.out, command)}")
        return 0
    if args.from_csv:
        from .eval.benchmark import rebuild_report

        print(f"Report rebuilt: read {rebuild_report(args.out, command)}")
        return 0
    from .eval.harness import grid_config
    from .pipeline import check_scatter_smoothing

    check_scatter_smoothing(args.scatter_smoothing)
    config = dataclasses.replace(grid_config(args.grid), scatter_smoothing_cm=args.scatter_smoothing)
    report = run_benchmark(args.phantoms, args.seconds, args.methods, args.realisations, args.out,
                           args.workers, args.scheduler, command, config)
    print(f"Benchmark finished: read {report}")
    return 0


def command_dataset(args) -> int:
    from .training.dataset import run_dataset

    from .eval.harness import grid_config

    levels = [float(s) for s in args.seconds.split(",")]
    tracers = tuple(t.strip().upper() for t in args.tracers.split(","))
    manifest = run_dataset(args.n, args.out, args.first_seed, levels, args.workers, args.scheduler, config=grid_config(args.grid),
                           tracers=tracers)
    print(f"Dataset written: {manifest}")
    return 0


def command_pretrain(args) -> int:
    from .training.dl_bpf import pretrain_dl_bpf
    from .eval.harness import grid_config

    command = "sspect " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["pretrain"] else "sspect pretrain"
    metadata = pretrain_dl_bpf(args.phantoms, args.seconds, args.out, args.steps, args.pretrain_steps, args.features,
                               args.seed, grid_config(args.grid), command, args.upsampling)
    print(f"Network written: {args.out} (voxel {metadata['voxel_mm']} mm, sha256 {metadata['sha256'][:12]}...)")
    return 0


def command_train(args) -> int:
    import os

    from .methods import Events
    from .training.supervised import TrainSettings, train

    command = "sspect " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else "sspect train"
    settings = TrainSettings(kind=args.kind, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             seed=args.seed, features=args.features, iterations=args.iterations, ct_input=not args.no_ct,
                             start_iterations=args.start_iterations, start_subsets=args.start_subsets,
                             lesion_weight=args.lesion_weight, upsampling=args.upsampling,
                             validation_cases=args.validation_cases, validation_interval=args.validation_interval,
                             checkpoint_interval=args.checkpoint_interval, device=args.device)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only process 0 talks
        train(args.data, args.out, settings, None, args.resume, command)
        return 0
    from tqdm import tqdm

    bar = tqdm(total=settings.steps, unit="step", file=sys.stderr)

    def on_event(event):
        if event.get("event") == "progress" and event.get("stage") == "train":
            bar.n = event["step"]
            bar.set_postfix_str(f"loss {event['loss']:.4g}")
            bar.refresh()
        elif event.get("event") == "log":
            bar.write(event["message"])

    try:
        path = train(args.data, args.out, settings, Events(on_event), args.resume, command)
    finally:
        bar.close()
    print(f"Network written: {path} (description in {path.with_suffix('.json')})")
    return 0


def _add_distribution_options(parser):
    parser.add_argument("--workers", type=int, default=2, help="local Dask workers (0: run in this process)")
    parser.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")


def _add_study_options(parser):
    from .physics.collimators import COLLIMATORS
    from .physics.isotopes import ISOTOPES

    parser.add_argument("--isotope", help=f"{', '.join(ISOTOPES)}; from the file (radionuclide code, else its windows) unless given")
    parser.add_argument("--photopeaks", metavar="KEV,KEV",
                        help="photopeaks reconstructed together, e.g. 113,208 for 177Lu (default: the isotope's main one(s))")
    windows = parser.add_argument_group("energy windows (automatic for the photopeak unless given: index or keV range like 187-229; 'none' for no scatter window)")
    windows.add_argument("--peak-window")
    windows.add_argument("--lower-window")
    windows.add_argument("--upper-window")
    parser.add_argument("--collimator", help=f"collimator ({', '.join(COLLIMATORS)}); detected from the file unless given")


def _add_scatter_smoothing(parser) -> None:
    from .pipeline import Settings

    parser.add_argument("--scatter-smoothing", type=float, default=Settings.scatter_smoothing_cm, metavar="CM",
                        help=f"Gaussian sigma of the scatter-window estimate in each view, cm (default {Settings.scatter_smoothing_cm:g}; "
                             "0: unsmoothed, which leaves totals high at low counts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sspect", description="Quantitative SPECT reconstruction (177Lu, 99mTc, 111In, 131I).")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="summarise a SPECT study: windows, views, orbit, detectors, matching CT")
    info.add_argument("path", help="NM projection file or a folder of DICOM files")
    info.add_argument("--ct", help="CT folder (default: a CT with the same Frame of Reference found under PATH)")
    _add_study_options(info)
    info.set_defaults(func=command_info)

    recon = sub.add_parser("reconstruct", help="reconstruct a study and write image, DICOM, preview, provenance, report")
    recon.add_argument("--nm", required=True, nargs="+", help="NM TOMO projection file(s), one per bed")
    recon.add_argument("--ct", help="CT series folder (for attenuation correction)")
    recon.add_argument("--method", default="osem", help="a method name from `sspect methods` (osem, bsrem, dip, ...)")
    recon.add_argument("--iterations", type=int)
    recon.add_argument("--subsets", type=int)
    recon.add_argument("--param", action="append", metavar="NAME=VALUE", help="other method parameters, e.g. beta=0.3")
    recon.add_argument("--calibration", metavar="CPS_PER_MBQ|NAME",
                       help="sensitivity for an image in Bq/mL: a number of cps/MBq or a name stored by `sspect calibrate`")
    recon.add_argument("--device", default="auto", help="auto, cpu or cuda")
    recon.add_argument("--seed", type=int, default=0)
    recon.add_argument("--binning", type=int, default=1,
                       help="sum BxB detector pixels first: a B times coarser grid, networks ~B^3 times faster (one bed)")
    recon.add_argument("--projector", default="fast",
                       help="the SPECT system model: fast (default) or PyTomography's own, the reference")
    recon.add_argument("--formats", default="nrrd,dicom", help="comma-separated: nrrd, nifti, dicom")
    recon.add_argument("--name", help="name of the result folder and its files (default: from the method; a taken default gets _2, _3 ...)")
    recon.add_argument("--overwrite", action="store_true", help="replace a result of the same --name (refused otherwise)")
    dosimetry = recon.add_argument_group("dosimetry inputs written into the DICOM image (from the NM file unless given)")
    dosimetry.add_argument("--acquisition-datetime", metavar="ISO", help="e.g. 2024-03-01T10:30:00, for a file that lacks it")
    dosimetry.add_argument("--injection-datetime", metavar="ISO", help="e.g. 2024-02-28T09:00:00")
    dosimetry.add_argument("--injected-activity", type=float, metavar="MBQ", help="injected activity in MBq")
    dosimetry.add_argument("--decay-correction", default="none", metavar="WHEN",
                           help="none (default: the mean over the acquisition), start (at the acquisition start) or injection")
    recon.add_argument("--out", required=True, help="output folder")
    _add_scatter_smoothing(recon)
    _add_study_options(recon)
    recon.set_defaults(func=command_reconstruct)

    cal = sub.add_parser("calibrate", help="measure the sensitivity (cps/MBq) on a phantom of known activity and store it by name")
    cal.add_argument("--nm", required=True, help="the phantom's NM TOMO projection file")
    cal.add_argument("--ct", help="the phantom's CT series folder (attenuation correction, as for patients)")
    cal.add_argument("--activity", required=True, type=float, metavar="MBQ", help="the phantom's activity in MBq (dose calibrator)")
    cal.add_argument("--activity-datetime", metavar="ISO", help="when it was measured (default: at the acquisition start)")
    cal.add_argument("--acquisition-datetime", metavar="ISO", help="for a file that lacks it")
    cal.add_argument("--name", required=True, help="the name the sensitivity is stored under, e.g. 'GE670 MEGP 177Lu'")
    cal.add_argument("--overwrite", action="store_true", help="replace a calibration of the same name")
    cal.add_argument("--method", default="osem", help="reconstruct as the patient studies will be (default osem)")
    cal.add_argument("--iterations", type=int)
    cal.add_argument("--subsets", type=int)
    cal.add_argument("--param", action="append", metavar="NAME=VALUE")
    cal.add_argument("--device", default="auto")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--projector", default="fast")
    cal.add_argument("--out", required=True, help="folder for the phantom's reconstructed image, to check it")
    cal.set_defaults(func=command_calibrate, binning=1, formats="nrrd",
                     injection_datetime=None, injected_activity=None)
    _add_scatter_smoothing(cal)
    _add_study_options(cal)

    stored = sub.add_parser("calibrations", help="list the calibrations stored by `sspect calibrate`")
    stored.add_argument("--json", action="store_true")
    stored.set_defaults(func=command_calibrations)

    job = sub.add_parser("run-job", help="run a job file, printing one JSON event per line (the Slicer module's door)")
    job.add_argument("job")
    job.set_defaults(func=command_run_job)

    methods = sub.add_parser("methods", help="list the methods and their parameters as JSON")
    methods.set_defaults(func=command_methods)

    bench = sub.add_parser("benchmark", help="phantoms x count levels x methods x noise realisations -> CSV, report, plots")
    bench.add_argument("--phantoms", default="nema8,nema4,torso0", help="nema<ratio>, torso<seed>, comma-separated")
    bench.add_argument("--seconds", default="5,20,80", help="count levels as seconds per view (60 views), comma-separated")
    bench.add_argument("--methods", default="osem:iterations=6:subsets=6,bsrem:iterations=6:subsets=6:beta=0.3",
                       help="name:param=value:..., comma-separated")
    bench.add_argument("--realisations", type=int, default=5, help="noise realisations per case")
    bench.add_argument("--grid", default="standard", choices=tuple(GRIDS),
                       help="standard: the real study's 4.4 mm voxels, 60 views (GE-like); siemens120: the same voxels, "
                            "120 views on a two-head Siemens-like orbit; coarse: 8.8 mm, 30 views (networks ~16x faster)")
    bench.add_argument("--out", default="benchmark-output")
    bench.add_argument("--from-csv", action="store_true", help="only rebuild report.md and plots from the CSVs in --out")
    bench.add_argument("--merge", metavar="DIR,DIR", help="one report in --out from benchmark folders run on the same grid")
    _add_scatter_smoothing(bench)
    _add_distribution_options(bench)
    bench.set_defaults(func=command_benchmark)

    dataset = sub.add_parser("dataset", help="write N torso cases (truth, labels, DICOM study, OSEM image) with a manifest")
    dataset.add_argument("--n", type=int, required=True)
    dataset.add_argument("--first-seed", type=int, default=0)
    dataset.add_argument("--seconds", default="20", help="seconds per view; several (comma-separated) are used in turn over the cases")
    dataset.add_argument("--grid", default="standard", choices=tuple(GRIDS), help="as for `sspect benchmark`")
    dataset.add_argument("--tracers", default="PSMA", help="PSMA, DOTATATE; several (comma-separated) are used in turn over the cases")
    dataset.add_argument("--out", required=True)
    _add_distribution_options(dataset)
    dataset.set_defaults(func=command_dataset)

    pre = sub.add_parser("pretrain", help="pretrain a DL-BPF network on simulated scans (self-supervised) -> .safetensors")
    pre.add_argument("--phantoms", default="torso100,torso101,torso102,torso103", help="torso<seed>, nema<ratio>, comma-separated")
    pre.add_argument("--seconds", default="10,40,160", help="count levels (s/view), used in turn over the phantoms")
    pre.add_argument("--grid", default="coarse", choices=tuple(GRIDS), help="as for `sspect benchmark`")
    pre.add_argument("--steps", type=int, default=1200, help="likelihood steps (one scan a step)")
    pre.add_argument("--pretrain-steps", type=int, default=800, help="steps fitting each scan's short OSEM first")
    pre.add_argument("--features", type=int, default=16)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--upsampling", default="transposed", choices=UPSAMPLING,
                     help="the U-Net's upsampling: transposed convolutions, or resize (interpolation and a convolution: no checkerboard)")
    pre.add_argument("--out", required=True, help="the .safetensors file to write")
    pre.set_defaults(func=command_pretrain)

    tr = sub.add_parser("train", help="train a supervised network (post-unet, unrolled-mapem) on a `sspect dataset` folder")
    tr.add_argument("--data", required=True, help="the dataset folder (or its manifest.json)")
    tr.add_argument("--kind", default="post-unet", choices=("post-unet", "unrolled-mapem"))
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=2, help="cases per step (over all processes under torchrun)")
    tr.add_argument("--learning-rate", type=float, default=1e-3)
    tr.add_argument("--features", type=int, default=16, help="channels of the network's first level")
    tr.add_argument("--iterations", type=int, default=3, help="unrolled MAP-EM iterations")
    tr.add_argument("--no-ct", action="store_true", help="do not give the network the CT as a second channel")
    tr.add_argument("--upsampling", default="resize", choices=UPSAMPLING,
                    help="the U-Net's upsampling: resize (interpolation and a convolution: no checkerboard), or transposed convolutions")
    tr.add_argument("--start-iterations", type=int, default=4, help="OSEM iterations of the start image")
    tr.add_argument("--start-subsets", type=int, default=6, help="OSEM subsets of the start image")
    tr.add_argument("--lesion-weight", type=float, default=1.0,
                    help="weight of the lesions' mean-activity error beside the NRMSE^2 in the loss (0: NRMSE alone)")
    tr.add_argument("--validation-cases", type=int, default=2, help="the dataset's last cases, held out")
    tr.add_argument("--validation-interval", type=int, default=50)
    tr.add_argument("--checkpoint-interval", type=int, default=50)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    tr.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    tr.add_argument("--out", required=True, help="folder for model.safetensors, model.json and checkpoint.safetensors")
    tr.set_defaults(func=command_train)

    demo = sub.add_parser("demo", help="simulate a small 177Lu SPECT/CT, reconstruct it and write a report")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--quick", action="store_true", help="fewer views and iterations (for tests)")
    demo.set_defaults(func=command_demo)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 refused (one sentence), 130 Ctrl-C, 143 SIGTERM; run-job adds 3 for an engine bug."""
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except SSPECTError as error:
        print(f"sspect: {error}", file=sys.stderr)
        return 2
    except Terminated:
        print("sspect: stopped by SIGTERM; files already complete were kept, nothing half-written was left.", file=sys.stderr)
        return TERMINATED_EXIT_CODE
    except KeyboardInterrupt:
        print("sspect: cancelled; files already complete were kept, nothing half-written was left.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
