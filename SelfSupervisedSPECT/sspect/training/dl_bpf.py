"""`sspect pretrain`: one DL-BPF network trained over many simulated scans by the self-supervised likelihood.

No ground truth is used: each step takes the next scan in turn. The first ``pretrain_steps`` fit
the network to each scan's 2-iteration OSEM image (as a per-scan run does), then ``steps`` steps
minimise the scan's Poisson NLL divided by its counts (so that every scan weighs the same whatever
its count level), EM-preconditioned. All counts are used and every step is run: fine-tuning on the
target scan stops on its own held-out counts.
"""
from __future__ import annotations

import tempfile

from ..errors import SSPECTError
from ..eval.benchmark import parse_phantoms, progress_bar
from ..eval.harness import HarnessConfig, config_dict, training_problems
from ..methods import Events
from ..methods.dl_bpf import Inputs, save_network, uses_ct
from ..methods.toolkit.counts import scatter_or_zeros
from ..methods.toolkit.fitting import Step, fit, reproducible
from ..methods.toolkit.inputs import short_osem
from ..methods.toolkit.losses import mean_squared_error, poisson_nll
from ..methods.toolkit.objectives import em_preconditioned
from ..methods.toolkit.networks import unet
from ..methods.toolkit.weights import voxel_mm, voxel_size_differs

LEARNING_RATE = 0.003


def pretrain(problems, out_path, steps: int, seed: int = 0, features: int = 16, *, pretrain_steps: int = 200,
             learning_rate: float = LEARNING_RATE, ct_input: bool = True, upsampling: str = "transposed",
             events: Events | None = None, training_data: dict | None = None) -> dict:
    """Train one DL-BPF network over ``problems`` and save it to ``out_path``; returns the file's description.

    ``training_data`` (what the scans were, how to make them again) is recorded in the file for the user.
    """
    from ..physics.differentiable import project

    problems = list(problems)
    events = events or Events()
    if not problems:
        raise SSPECTError("Pretraining needs at least one scan; give a list of problems.")
    if steps < 1 or pretrain_steps < 0:
        raise SSPECTError(f"Pretraining needs at least one likelihood step and no negative pretraining, not {steps} and {pretrain_steps}.")
    grid_mm = voxel_mm(problems[0])
    for problem in problems[1:]:
        if voxel_size_differs(voxel_mm(problem), grid_mm):
            raise SSPECTError(f"The scans have different voxel sizes ({grid_mm} and {voxel_mm(problem)} mm); pretrain one network per voxel size.")
    kinds = {(p.isotope.name, p.photopeaks_keV, p.collimator_code) for p in problems}
    if len(kinds) > 1:
        raise SSPECTError(f"The scans differ in isotope, photopeaks or collimator ({sorted(kinds)}); pretrain one network per kind of scan.")
    with_ct = [uses_ct(problem, ct_input) for problem in problems]
    if len(set(with_ct)) > 1:
        raise SSPECTError("Some scans have a CT and some do not; pretrain with ct_input false or give every scan its CT.")
    in_channels = 2 if with_ct[0] else 1
    total = pretrain_steps + steps
    with reproducible(problems[0].device, seed):
        scans = []
        for problem in problems:
            counts = problem.projections.to(problem.device)
            scatter = scatter_or_zeros(problem)
            start = short_osem(problem.system_matrix, counts, scatter) if pretrain_steps else None
            scans.append((problem, counts, scatter, Inputs(problem, counts, scatter, with_ct[0]), start))
        network = unet(features, in_channels, head="positive", upsampling=upsampling).to(problems[0].device)

        def objective(step):
            index = (step - 1) % len(scans)
            problem, counts, scatter, inputs, start = scans[index]
            if step <= pretrain_steps:
                loss, stage = mean_squared_error(inputs.image(network), start) / inputs.scale ** 2, "pretrain"
            else:
                x = em_preconditioned(inputs.image(network), inputs.sensitivity)
                loss = poisson_nll(project(x, problem.system_matrix) + scatter, counts) / counts.sum().clamp_min(1.0)
                stage = "likelihood"
            return Step(loss, fields={"stage": stage, "scan": index}, label=f"{stage} on scan {index + 1}/{len(scans)}, step")

        fit(network.parameters(), objective, steps=total, events=events, learning_rate=learning_rate, name="Pretraining")
    training = {"scans": len(problems), "pretrain_steps": pretrain_steps, "steps": steps, "seed": seed,
                "learning_rate": learning_rate,
                "loss": "MSE to each scan's 2-iteration OSEM, then EM-preconditioned Poisson NLL of all counts per count, "
                        "one scan a step", **({"data": training_data} if training_data else {})}
    return save_network(network, out_path, problems[0], features=features, in_channels=in_channels, training=training)


def pretrain_dl_bpf(phantoms: str, seconds: str, out, steps: int, pretrain_steps: int, features: int = 16,
                    seed: int = 0, config: HarnessConfig | None = None, command: str = "sspect pretrain",
                    upsampling: str = "transposed") -> dict:
    """Pretrain a DL-BPF network on the harness's simulated scans (written as DICOM and read back) and save it."""
    config = config or HarnessConfig()
    specs = parse_phantoms(phantoms)
    levels = [float(s) for s in seconds.split(",")]
    levels = [levels[i % len(levels)] for i in range(len(specs))]  # count levels in turn over the phantoms
    bar, _ = progress_bar(pretrain_steps + steps, unit="step")
    with tempfile.TemporaryDirectory() as work:
        problems = training_problems(specs, config, levels, work)

        def on_event(event):
            if event.get("event") == "progress":
                bar.n = event.get("step", bar.n)
                bar.set_postfix_str(f"{event.get('stage')} loss {event.get('loss', 0):.4g}")
                bar.refresh()

        try:
            data = {"phantoms": [spec.name for spec in specs], "seconds_per_view": levels, "grid": config_dict(config),
                    "command": command}
            return pretrain(problems, out, steps, seed, features, pretrain_steps=pretrain_steps, upsampling=upsampling,
                            events=Events(on_event), training_data=data)
        finally:
            bar.close()
