"""`sspect train`: a supervised network from a harness dataset, with validation, checkpoints, resume and DDP.

The data are the cases of a ``sspect dataset`` folder (``manifest.json``): each case's simulated
NM and CT DICOM go through the engine's own door (``load_study``, ``bed_problem``), exactly as a
patient study would, and its truth (MBq/mL) is converted to the reconstruction's unit (counts per
voxel in one view) with the manifest's sensitivity and the study's frame duration. The last
``validation_cases`` cases are held out; every ``validation_interval`` steps the network is
measured on them and the best network so far is written as the result (``model.safetensors``
with its description, see :mod:`sspect.methods.supervised`).

Reproducible: the network is initialised from ``seed`` and the cases of step ``n`` are a function
of ``seed`` and ``n`` only (a permutation per epoch), so a run resumed from its checkpoint
(``checkpoint.safetensors``: weights, Adam's state, the best network and the history; tensors
and JSON only, never pickle) ends with the same weights as one that was never stopped.

Several processes: launched by ``torchrun --nproc_per_node N -m sspect train ...``, each process
takes ``batch_size / N`` of every step's cases and PyTorch's DistributedDataParallel averages the
gradients (gloo on CPUs, NCCL on GPUs); process 0 validates and writes the files. The result is
the single-process run's, to float rounding.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import file_sha256
from ..errors import SSPECTError
from ..methods import Events
from ..methods.supervised import KINDS, Scan, build_model, save_model
from ..methods.toolkit.fitting import EarlyStopping, Step, fit
from ..methods.toolkit.losses import lesion_mean_error_squared, nrmse_squared
from ..methods.toolkit.networks import UPSAMPLING, upsampling_of
from ..methods.toolkit.weights import read_weights, save_weights

CHECKPOINT_FORMAT = "sspect-train-checkpoint/1"


@dataclass(frozen=True)
class TrainSettings:
    kind: str = "post-unet"
    steps: int = 1000
    batch_size: int = 2
    learning_rate: float = 1e-3
    seed: int = 0
    features: int = 16
    iterations: int = 3  # unrolled MAP-EM iterations
    ct_input: bool = True
    upsampling: str = "resize"  # interpolation and a convolution (no checkerboard), or "transposed"
    start_iterations: int = 4  # the OSEM image both networks start from
    start_subsets: int = 6
    lesion_weight: float = 1.0  # the lesions' mean-activity term beside the NRMSE^2 (see training_loss)
    validation_cases: int = 2
    validation_interval: int = 50
    checkpoint_interval: int = 50
    device: str = "cpu"


@dataclass
class Example:
    """One case: what the network sees (a :class:`~sspect.methods.supervised.Scan`), the truth in counts per voxel, its lesions' masks."""

    name: str
    scan: object
    target: object
    lesions: list


def training_loss(image, example: Example, lesion_weight: float):
    """``NRMSE^2 + w mean_k (mean_k(x) / mean_k(t) - 1)^2``: the whole image, and each lesion's activity.

    NRMSE alone let the network smooth lesions into their background (post-unet: -44 % on a
    23 mm liver lesion at 8.8 mm); the second term gives every lesion the same weight whatever its size.
    """
    loss = nrmse_squared(image, example.target)
    return loss + lesion_weight * lesion_mean_error_squared(image, example.target, example.lesions) if lesion_weight else loss


def read_manifest(path) -> tuple[dict, str, Path]:
    """(manifest, its sha256, its folder); refused in one sentence if it is not a dataset manifest."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise SSPECTError(f"{path} does not exist; give the manifest.json that `sspect dataset` wrote.")
    try:
        manifest = json.loads(path.read_text())
        manifest["cases"], manifest["config"]["sensitivity_cps_per_MBq"]
    except (ValueError, KeyError, TypeError):
        raise SSPECTError(f"{path} is not a dataset manifest; give the manifest.json that `sspect dataset` wrote.") from None
    return manifest, file_sha256(path), path.parent


def load_example(entry: dict, folder: Path, sensitivity_cps_per_MBq: float, settings: TrainSettings) -> Example:
    """Read one dataset case through the engine's door; refuse it if its files changed since the manifest."""
    import contextlib
    import io

    import numpy as np
    import torch

    from ..io.volume_files import read_image
    from ..pipeline import Settings, bed_problem, bq_per_ml_factor, load_study

    files = {key: folder / value for key, value in entry["files"].items()}
    for key in ("nm", "truth"):
        if file_sha256(files[key]) != entry["sha256"][key]:
            raise SSPECTError(f"The file {files[key]} of case {entry['case']} changed since the manifest was written; "
                              "write the dataset again.")
    with contextlib.redirect_stdout(io.StringIO()):
        study = load_study(files["nm"], files["ct"], Settings(device=settings.device))
        problem = bed_problem(study, device=settings.device)
    truth = read_image(files["truth"])
    shape = tuple(problem.object_meta.shape)
    if truth.array.shape != shape:
        raise SSPECTError(f"The truth of case {entry['case']} is {truth.array.shape} voxels but its study reconstructs "
                          f"to {shape}; write the dataset again.")
    bed = study.beds[0]
    voxel_ml = float(np.prod(bed.object_spacing_mm)) / 1000.0
    to_counts = 1e6 / bq_per_ml_factor(sensitivity_cps_per_MBq, bed.frame_duration_s, voxel_ml)  # MBq/mL -> counts/voxel
    target = torch.from_numpy(np.ascontiguousarray(truth.array, dtype=np.float32) * to_counts).to(problem.device)
    scan = Scan(problem, settings.start_iterations, settings.start_subsets,
                settings.ct_input and problem.attenuation_map is not None)
    labels = torch.from_numpy(np.ascontiguousarray(read_image(files["labels"]).array).astype(np.int64)).to(problem.device)
    masks = [labels == value for name, value in entry["label_names"].items() if name.startswith("lesion_")]
    lesions = [mask for mask in masks if bool(mask.any())]
    return Example(entry["case"], scan, target, lesions)


def batch_indices(n_cases: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The cases of step ``step`` (1-based): consecutive draws from one seeded permutation per epoch."""
    import numpy as np

    chosen = []
    for position in range((step - 1) * batch_size, step * batch_size):
        epoch, index = divmod(position, n_cases)
        chosen.append(int(np.random.default_rng([seed, epoch]).permutation(n_cases)[index]))
    return chosen


def code_version() -> str:
    """The engine's version and, in a git checkout, its commit."""
    import subprocess

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"sspect {__version__}" + (f" (git {commit})" if commit else "")


class _Distributed:
    """This process's place among ``torchrun``'s (rank 0 of 1 without it)."""

    def __init__(self, device: str):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            cuda = device.startswith("cuda")
            if cuda:
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = f"cuda:{local}"
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[int(self.device.split(":")[1])] if self.device.startswith("cuda") else None)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (for the reported loss)."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _state(model) -> dict:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def _write_checkpoint(path: Path, model, optimiser, best_state, record: dict) -> None:
    """Weights, Adam's moments and the best network as tensors; step, settings and history as JSON text."""
    tensors = {f"model/{name}": tensor for name, tensor in _state(model).items()}
    tensors.update({f"best/{name}": tensor for name, tensor in (best_state or {}).items()})
    optimiser_state = optimiser.state_dict()
    for index, moments in optimiser_state["state"].items():
        for key, value in moments.items():
            tensors[f"optimiser/{index}/{key}"] = value.detach().cpu().clone().reshape(-1) if value.dim() == 0 else value.detach().cpu().clone()
    save_weights(tensors, path, {"format": CHECKPOINT_FORMAT, "record": record, "param_groups": optimiser_state["param_groups"]})


def _read_checkpoint(path: Path, model, optimiser, expected: dict) -> tuple[dict, dict | None]:
    """Restore weights and Adam's state from ``path``; returns (record, best network) after checking it is this run's."""
    tensors, description = read_weights(path, "sspect train", CHECKPOINT_FORMAT, "a training checkpoint")
    record = description["record"]
    for key in ("settings", "manifest_sha256"):
        if record[key] != expected[key]:
            raise SSPECTError(f"The checkpoint in {path.parent} was written by a run with other {key.replace('_', ' ')}; "
                              "resume with the same dataset and settings, or train into a new folder.")
    model.load_state_dict({name[6:]: t for name, t in tensors.items() if name.startswith("model/")}, strict=True)
    best = {name[5:]: t for name, t in tensors.items() if name.startswith("best/")} or None
    state = {}
    for name, tensor in tensors.items():
        if name.startswith("optimiser/"):
            _, index, key = name.split("/")
            state.setdefault(int(index), {})[key] = tensor.reshape(()) if key == "step" else tensor
    optimiser.load_state_dict({"state": state, "param_groups": description["param_groups"]})
    return record, best


def _validate(model, examples, lesion_weight: float) -> dict:
    """The network on the held-out cases: loss, and median NRMSE, total and lesion activity errors beside its OSEM start."""
    import numpy as np
    import torch

    losses, nrmse, start_nrmse, totals, lesions, start_lesions = [], [], [], [], [], []
    with torch.no_grad():
        for example in examples:
            image = model(example.scan)
            losses.append(float(training_loss(image, example, lesion_weight)))
            nrmse.append(float(nrmse_squared(image, example.target)) ** 0.5)
            start_nrmse.append(float(nrmse_squared(example.scan.start, example.target)) ** 0.5)
            totals.append(100.0 * (float(image.sum()) / float(example.target.sum()) - 1.0))
            for mask in example.lesions:
                true_sum = float(example.target[mask].sum())
                lesions.append(100.0 * abs(float(image[mask].sum()) / true_sum - 1.0))
                start_lesions.append(100.0 * abs(float(example.scan.start[mask].sum()) / true_sum - 1.0))
    median = (lambda values: float(np.median(values)) if values else None)
    return {"loss": float(np.mean(losses)), "nrmse_median": float(np.median(nrmse)),
            "start_osem_nrmse_median": float(np.median(start_nrmse)),
            "total_activity_error_pct_median": float(np.median(totals)),
            "lesion_abs_error_pct_median": median(lesions), "start_osem_lesion_abs_error_pct_median": median(start_lesions),
            "cases": [e.name for e in examples]}


def train(manifest_path, out_dir, settings: TrainSettings, events=None, resume: bool = False,
          command: str = "sspect train") -> Path:
    """Train ``settings.kind`` on the dataset; returns the path of the best network (``out_dir/model.safetensors``)."""
    import torch

    events = events or Events()
    if settings.kind not in KINDS:
        raise SSPECTError(f"Unknown supervised network '{settings.kind}'; choose {' or '.join(KINDS)}.")
    manifest, manifest_sha, folder = read_manifest(manifest_path)
    cases = manifest["cases"]
    if len(cases) < settings.validation_cases + 1 or settings.validation_cases < 1:
        raise SSPECTError(f"The dataset has {len(cases)} cases; training needs at least one more than the "
                          f"{settings.validation_cases} validation case(s), and at least one validation case.")
    if settings.steps < 1 or settings.batch_size < 1:
        raise SSPECTError("Training needs at least one step and a batch of at least one case.")
    if settings.upsampling not in UPSAMPLING:
        raise SSPECTError(f"Unknown upsampling '{settings.upsampling}'; choose {' or '.join(UPSAMPLING)}.")
    if settings.lesion_weight < 0:
        raise SSPECTError(f"The lesion weight is {settings.lesion_weight:g}; give 0 (the NRMSE alone) or a positive weight.")
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint.safetensors"
    if resume and not checkpoint.is_file():
        raise SSPECTError(f"There is no checkpoint in {out_dir} to resume from; train without --resume first.")
    if not resume and checkpoint.is_file():
        raise SSPECTError(f"{out_dir} already holds a training run; resume it with --resume or train into a new folder.")
    place = _Distributed(settings.device)
    try:
        if settings.batch_size % place.world:
            raise SSPECTError(f"The batch of {settings.batch_size} cases cannot be shared by {place.world} processes; "
                              "choose a batch size that is a multiple of the number of processes.")
        run_settings = TrainSettings(**{**asdict(settings), "device": place.device})
        training, held_out = cases[:-settings.validation_cases], cases[-settings.validation_cases:]
        sensitivity = manifest["config"]["sensitivity_cps_per_MBq"]
        loaded: dict[int, Example] = {}

        def example(index: int) -> Example:
            if index not in loaded:
                loaded[index] = load_example(training[index], folder, sensitivity, run_settings)
            return loaded[index]

        events.progress(0.0, f"reading {len(held_out)} validation case(s)", stage="read")
        validation = [load_example(entry, folder, sensitivity, run_settings) for entry in held_out]
        first = validation[0].scan
        in_channels = 2 if first.ct is not None else 1
        torch.manual_seed(settings.seed)
        model = build_model(settings.kind, settings.features, in_channels, settings.iterations,
                            settings.upsampling).to(place.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        # what a resumed run must share with the run it continues (more steps and another device are fine)
        identity = {"settings": {**asdict(settings), "device": "any", "steps": "any"}, "manifest_sha256": manifest_sha}
        record = {**identity, "step": 0, "history": [], "best": None, "seconds": 0.0}
        best_state = None
        if resume:
            record, best_state = _read_checkpoint(checkpoint, model, optimiser, identity)
            events.log(f"resumed at step {record['step']} from {checkpoint}")
        stopping = EarlyStopping(0)  # keeps the best validation; a resumed run starts from the one it had
        if record["best"] is not None:
            stopping.update(record["best"]["step"], record["best"]["loss"], record["best"])
        network = place.wrap(model)
        started = time.perf_counter() - record["seconds"]

        def write_model(state):
            matrices = sorted({tuple(example(i).scan.start.shape) for i in loaded} | {tuple(first.start.shape)})
            trained = build_model(settings.kind, settings.features, in_channels, settings.iterations, settings.upsampling)
            trained.load_state_dict(state)
            data = {"manifest": str(Path(manifest_path)), "manifest_sha256": manifest_sha,
                    "training_cases": [e["case"] for e in training], "validation_cases": [e["case"] for e in held_out],
                    "phantom_seeds": sorted({e.get("phantom_seed") for e in cases}),
                    "seconds_per_view": sorted({e.get("seconds_per_view") for e in cases}), "grid": manifest["config"]}
            save_model(trained, out_dir / "model.safetensors", kind=settings.kind,
                       architecture={"features": settings.features, "in_channels": in_channels, "upsampling": upsampling_of(trained),
                                     **({"iterations": settings.iterations} if settings.kind == "unrolled-mapem" else {})},
                       start_osem=(settings.start_iterations, settings.start_subsets), problem=first.problem,
                       matrices=[list(m) for m in matrices],
                       training={"data": data, "settings": asdict(settings), "steps_done": record["step"],
                                 "best_step": record["best"]["step"], "seconds": round(record["seconds"], 1),
                                 "device": place.device, "processes": place.world, "command": command,
                                 "history": record["history"]},
                       validation=record["best"], code_version=code_version())

        def objective(step):
            mine = batch_indices(len(training), settings.batch_size, settings.seed, step)[place.rank::place.world]
            network.train()
            loss = sum(training_loss(network(example(i).scan), example(i), settings.lesion_weight) for i in mine) / len(mine)
            return Step(loss, fields={"stage": "train"}, reported=place.mean(float(loss.detach())))

        def after_step(step, value):
            nonlocal best_state
            record["step"], record["seconds"] = step, time.perf_counter() - started
            if step % settings.validation_interval == 0 or step == settings.steps:
                if place.main:
                    network.eval()
                    measured = {"step": step, "train_loss": value, **_validate(model, validation, settings.lesion_weight)}
                    record["history"].append({k: v for k, v in measured.items() if k != "cases"})
                    stopping.update(step, measured["loss"], measured)
                    if stopping.best_step == step:
                        record["best"], best_state = measured, _state(model)
                        write_model(best_state)
                    events.log(f"step {step}: validation NRMSE {measured['nrmse_median']:.4f} "
                               f"(start OSEM {measured['start_osem_nrmse_median']:.4f})")
                place.barrier()
            if place.main and (step % settings.checkpoint_interval == 0 or step == settings.steps):
                _write_checkpoint(checkpoint, model, optimiser, best_state, record)

        fit(None, objective, steps=settings.steps, events=events, optimiser=optimiser, first_step=record["step"] + 1,
            after_step=after_step, name="Training")
        return out_dir / "model.safetensors"
    finally:
        place.close()
