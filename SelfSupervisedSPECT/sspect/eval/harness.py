"""The validation harness: phantoms x count levels x methods x noise realisations -> metric rows.

Every case goes through the same door as a real study: the phantom is drawn on a grid
``oversample`` times finer than the reconstruction, projected once with PyTomography's model
(attenuation, collimator response, a scatter component consistent with the TEW windows), a
Poisson realisation is drawn at the case's count level, written as scanner-like NM DICOM with
a CT series, read back, reconstructed and compared with the truth drawn on the reconstruction
grid. Cases are independent, so they are distributed over Dask (a local cluster by default, or
an existing scheduler); ``workers=0`` runs them in this process.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SSPECTError
from ..physics.system import SCATTER_SMOOTHING_CM

CLINICAL_SECONDS_PER_VIEW = 20.0


@dataclass(frozen=True)
class PhantomSpec:
    """Which phantom: 'nema' (sphere:background ``ratio``) or 'torso' (random anatomy by ``seed``, uptake of ``tracer``)."""

    kind: str
    seed: int = 0
    ratio: float = 8.0
    tracer: str = "PSMA"

    @property
    def name(self) -> str:
        if self.kind == "nema":
            return f"nema{self.ratio:g}to1"
        return f"torso{self.seed}" if self.tracer == "PSMA" else f"{self.tracer.lower()}{self.seed}"

    def build(self, config: "HarnessConfig", oversample: int = 1):
        """The phantom on the reconstruction grid, or ``oversample`` times finer (same field of view)."""
        from ..sim.phantoms.nema import nema_iec_phantom
        from ..sim.phantoms.torso import torso_phantom

        voxel_mm = config.voxel_mm / oversample
        if self.kind == "nema":
            return nema_iec_phantom(voxel_mm=voxel_mm, sphere_to_background=self.ratio,
                                    shape=tuple(n * oversample for n in config.nema_shape))
        if self.kind == "torso":
            return torso_phantom(seed=self.seed, voxel_mm=voxel_mm, tracer=self.tracer,
                                 shape=tuple(n * oversample for n in config.torso_shape))
        raise SSPECTError(f"Unknown phantom '{self.kind}'; choose nema or torso.")


@dataclass(frozen=True)
class HarnessConfig:
    voxel_mm: float = 4.4196  # the real study's pixel
    oversample: int = 2  # phantom drawn and projected this many times finer, then binned
    n_views: int = 60
    radius_mm: float = 260.0
    sensitivity_cps_per_MBq: float = 9.0
    layout: str = "GE"
    collimator_code: str = "GI-MEGP"
    nema_shape: tuple = (72, 72, 48)  # 318 x 318 x 212 mm: the 300 x 230 mm body with margin
    torso_shape: tuple = (80, 80, 96)
    scatter_smoothing_cm: float = SCATTER_SMOOTHING_CM  # the reconstructions' (the engine's default)


@dataclass(frozen=True)
class Case:
    phantom: PhantomSpec
    seconds_per_view: float
    realisation: int
    methods: tuple  # ((name, params as a tuple of items), ...)
    keep_images: bool = False

    @property
    def name(self) -> str:
        return f"{self.phantom.name}_{self.seconds_per_view:g}s_r{self.realisation}"


@dataclass
class CaseResult:
    case: Case
    rows: list = field(default_factory=list)  # one per method: final metrics
    curves: list = field(default_factory=list)  # one per method and iteration
    images: dict = field(default_factory=dict)  # method -> final image (MBq/mL), when kept


def simulate_expected(spec: PhantomSpec, config: HarnessConfig) -> dict:
    """Noiseless projections of one phantom (counts_scale 1) plus its truth on the reconstruction grid."""
    from ..sim.acquisition import simulate_projections
    from ..sim.dicom_writer import hu_to_mu

    fine = spec.build(config, config.oversample)
    coarse = spec.build(config)
    expected = simulate_projections(fine.activity, lambda energy_keV: hu_to_mu(fine.hu, energy_keV), fine.spacing, n_views=config.n_views,
                                    radius_mm=config.radius_mm, collimator=config.collimator_code,
                                    counts_scale=fine.voxel_volume_ml, noise=False,
                                    detector_binning=config.oversample)
    return {"expected": expected, "truth": coarse}


def counts_scale(config: HarnessConfig, seconds_per_view: float) -> float:
    """Projections simulated with counts_scale = (fine) voxel mL are per MBq/mL; this makes them counts."""
    return config.sensitivity_cps_per_MBq * seconds_per_view


def run_case(simulated: dict, case: Case, config: HarnessConfig, work_dir) -> CaseResult:
    """Draw the counts, write the study as DICOM, reconstruct with every method, measure."""
    import torch

    from ..methods import Events
    from ..pipeline import Settings, load_study, reconstruct_study
    from .metrics import evaluate, nrmse, region_masks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # cases run side by side; one thread each is fastest and reproducible
    try:
        truth = simulated["truth"]
        nm, ct_files, counts = write_case_study(simulated, case, config, Path(work_dir) / case.name)
        regions = region_masks(truth)
        result = CaseResult(case)
        for method, params in case.methods:
            params = dict(params)
            settings = Settings(method=method, params=params, device="cpu", seed=case.realisation,
                                calibration_cps_per_MBq=config.sensitivity_cps_per_MBq,
                                scatter_smoothing_cm=config.scatter_smoothing_cm)
            iterates = []
            with contextlib.redirect_stdout(io.StringIO()):
                study = load_study(nm, ct_files, settings)
                image, provenance = reconstruct_study(
                    study, settings, Events(on_iterate=lambda n, x: iterates.append((n, x / 1e6))))
            activity = image.array / 1e6  # Bq/mL -> MBq/mL, the phantom's unit
            label = _method_label(method, params)
            common = {"phantom": case.phantom.name, "seconds_per_view": case.seconds_per_view,
                      "realisation": case.realisation, "method": label,
                      "photopeak_counts": float(counts.peak.sum()), "run_time_s": provenance["run_time_s"]}
            result.rows.append({**common, **evaluate(activity, truth, regions=regions), **_background_cov(activity, regions)})
            for iteration, iterate in iterates:
                result.curves.append({**common, "iteration": iteration, "nrmse": nrmse(iterate, truth.activity),
                                      **{f"mean_{name}": float(iterate[mask].mean()) for name, mask in regions.items()},
                                      **_background_cov(iterate, regions)})
            if case.keep_images:
                result.images[label] = activity
        return result
    finally:
        torch.set_num_threads(threads)


def write_case_study(simulated: dict, case: Case, config: HarnessConfig, folder: Path):
    """Draw the case's counts and write them as NM DICOM with the phantom's CT; returns (nm, ct_files, counts).

    The draw is seeded by the realisation number only, so every method and every run sees the
    same counts for the same phantom, count level and realisation.
    """
    from ..sim.acquisition import draw_counts
    from ..sim.dicom_writer import write_ct_series, write_nm_tomo

    truth = simulated["truth"]
    counts = draw_counts(simulated["expected"], counts_scale(config, case.seconds_per_view),
                         seed=10_000 * case.realisation + 17)
    with contextlib.redirect_stdout(io.StringIO()):
        ct_files = write_ct_series(folder / "CT", truth.hu_volume, *_uids(case))
        windows, window_counts = counts.windows_in_order()
        nm = write_nm_tomo(folder / "NM" / "projections.dcm", window_counts, windows, counts.angles_deg, counts.radii_cm, config.voxel_mm,
                           truth.origin, layout=config.layout, frame_duration_s=case.seconds_per_view,
                           study_uid=_uids(case)[0], frame_of_reference_uid=_uids(case)[1])
    return nm, ct_files, counts


def training_problems(specs, config: HarnessConfig, seconds_per_view, work_dir, realisation: int = 0) -> list:
    """Reconstruction problems of simulated scans (for pretraining networks; no truth is returned).

    ``seconds_per_view``: one count level for all, or one per phantom."""
    from ..pipeline import Settings, bed_problem, load_study

    levels = list(seconds_per_view) if isinstance(seconds_per_view, (list, tuple)) else [seconds_per_view] * len(specs)
    if len(levels) != len(specs):
        raise SSPECTError(f"Give one count level for all scans or one per scan ({len(specs)}), not {len(levels)}.")
    problems = []
    for spec, seconds in zip(specs, levels):
        case = Case(spec, seconds, realisation, ())
        nm, ct_files, _ = write_case_study(simulate_expected(spec, config), case, config, Path(work_dir) / case.name)
        with contextlib.redirect_stdout(io.StringIO()):
            study = load_study(nm, ct_files, Settings(device="cpu", scatter_smoothing_cm=config.scatter_smoothing_cm))
            problems.append(bed_problem(study, device="cpu"))
    return problems


def _background_cov(image, regions) -> dict:
    background = next((n for n in ("background", "liver") if n in regions), None)
    if background is None:
        return {}
    values = image[regions[background]]
    return {"background_cov": float(values.std() / values.mean())}


def _uids(case: Case) -> tuple[str, str]:
    """Deterministic UIDs per case, so reruns write identical studies."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[case.name, "study"]), generate_uid(entropy_srcs=[case.name, "frame"])



def _method_label(method: str, params: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in sorted(params.items()))


def build_cases(phantoms, seconds_per_view, methods, realisations: int, keep_images_at: float | None = None):
    """The grid of cases; images of realisation 0 at ``keep_images_at`` s/view are kept for panels."""
    method_items = tuple((name, tuple(sorted(params.items()))) for name, params in methods)
    return [Case(spec, seconds, r, method_items, keep_images=(r == 0 and seconds == keep_images_at))
            for spec in phantoms for seconds in seconds_per_view for r in range(realisations)]


def run_cases(cases, config: HarnessConfig, work_dir, workers: int = 2, scheduler: str | None = None,
              on_done=None) -> list[CaseResult]:
    """Run cases serially (``workers=0``), on a local Dask cluster, or on ``scheduler``.

    Each phantom is projected once (one task) and every case that uses it depends on that task.
    Results come back in the order of ``cases`` whatever order they completed in.
    """
    specs = sorted({case.phantom for case in cases}, key=lambda s: s.name)
    work_dir = str(work_dir)
    on_done = on_done or (lambda result: None)
    if workers == 0 and scheduler is None:
        simulated = {spec: simulate_expected(spec, config) for spec in specs}
        results = []
        for case in cases:
            results.append(run_case(simulated[case.phantom], case, config, work_dir))
            on_done(results[-1])
        return results

    from distributed import Client, LocalCluster, as_completed

    with contextlib.ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler))
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        simulated = {spec: client.submit(simulate_expected, spec, config, pure=False) for spec in specs}
        futures = [client.submit(run_case, simulated[case.phantom], case, config, work_dir, pure=False)
                   for case in cases]
        index = {future.key: number for number, future in enumerate(futures)}
        results = [None] * len(futures)
        for future in as_completed(futures):
            results[index[future.key]] = future.result()
            on_done(results[index[future.key]])
        return results


def config_dict(config: HarnessConfig) -> dict:
    return asdict(config)


def config_from_dict(values: dict) -> HarnessConfig:
    """Inverse of :func:`config_dict` (JSON turns tuples into lists). A report written before the
    scatter estimate was smoothed lacks the key: its reconstructions were unsmoothed."""
    values = {"scatter_smoothing_cm": 0.0, **values}
    return HarnessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# "siemens120": the standard grid on a two-head Siemens-like orbit of 120 views (60 per head), the other
# clinical protocol; the same total time is half the seconds per view of the 60-view grid.
# "coarse": voxels and detector pixels twice the real study's (8.8 mm), 30 views: the networks of the
# self-supervised methods cost ~16 times less per step than on the standard grid, which is what makes
# five realisations of every method affordable on a 2-core CPU. Phantoms are still drawn 2x finer.
GRIDS = {
    "standard": HarnessConfig(),
    "siemens120": HarnessConfig(n_views=120, layout="Siemens", collimator_code="SY-ME"),
    "coarse": HarnessConfig(voxel_mm=2 * 4.4196, n_views=30, nema_shape=(36, 36, 24), torso_shape=(40, 40, 48)),
}


def grid_config(name: str) -> HarnessConfig:
    if name not in GRIDS:
        raise SSPECTError(f"Unknown harness grid '{name}'; choose {' or '.join(GRIDS)}.")
    return GRIDS[name]
