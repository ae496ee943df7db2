"""The one optimisation loop of the engine's networks, its early stopping and its seeding.

Every learned method (and ``sspect train``, and DL-BPF pretraining) describes one step as a loss
(:class:`Step`) and hands it to :func:`fit`: Adam, a divergence check, progress events, and every
``check_every`` steps a checkpoint whose validation loss :class:`EarlyStopping` uses to keep the
best candidate and to stop ``patience`` checks after it. Why early stopping: a network fitted to
one noisy scan fits its noise when run long enough (the deep image prior's known failure), and
held-out counts show when that starts.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import SSPECTError


@contextlib.contextmanager
def reproducible(device, seed: int):
    """Seed torch inside; leave the caller's random state and cuDNN flags as they were."""
    import torch

    cuda = [device] if getattr(device, "type", str(device)) == "cuda" else []
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@dataclass
class Check:
    """What a checkpoint measured: the validation loss (None without a hold-out), the candidate to keep, an iterate."""

    validation: float | None
    candidate: Any
    iterate: Any = None  # numpy image for a listener of iterates (None: nothing to hand)


class EarlyStopping:
    """Keeps the candidate with the lowest validation loss; stops after ``patience`` checks without a better one.

    Without a validation loss (no hold-out) it keeps the latest candidate and never stops. ``patience`` 0: never stop.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.history: list[list] = []  # [step, validation] at every check
        self.best_value: float | None = None
        self.best_step = 0
        self.kept = None
        self.since_best = 0

    def update(self, step: int, validation: float | None, candidate) -> None:
        if validation is None:
            self.best_step, self.kept = step, candidate
            return
        self.history.append([step, validation])
        if self.best_value is None or validation < self.best_value:
            self.best_value, self.best_step, self.kept, self.since_best = validation, step, candidate, 0
        else:
            self.since_best += 1

    @property
    def should_stop(self) -> bool:
        return bool(self.best_value is not None and self.patience and self.since_best >= self.patience)


@dataclass
class Step:
    """One step as a method defines it: the loss to minimise, and what to measure on a check step."""

    loss: Any  # scalar tensor
    checkpoint: Callable[[], Check] | None = None  # evaluated (without gradients) before the update on check steps
    fields: dict = field(default_factory=dict)  # extra fields of the progress event (e.g. the stage)
    label: str = "step"  # the progress message's word for it
    reported: float | None = None  # the loss to report, when not this process's (the mean over processes)


@dataclass
class Fit:
    """Where a fit stopped and what it kept."""

    kept: Any
    best_step: int
    stopped_at: int
    stopped_early: bool
    validation_nll: list

    def info(self) -> dict:
        return {"best_step": self.best_step, "stopped_at": self.stopped_at, "stopped_early": self.stopped_early,
                "validation_nll": self.validation_nll}

    def summary(self, word: str = "step") -> str:
        return (f"stopped at {word} {self.stopped_at}" + (" (validation stopped improving)" if self.stopped_early else "")
                + f"; image from {word} {self.best_step}")


def fit(parameters, objective: Callable[[int], Step], *, steps: int, events, learning_rate: float | None = None,
        optimiser=None, check_every: int = 0, stopping: EarlyStopping | None = None, progress: tuple = (0.0, 1.0),
        name: str = "The network", first_step: int = 1, after_step: Callable[[int, float], None] | None = None) -> Fit:
    """Adam (or ``optimiser``) on ``objective(step).loss`` for steps ``first_step..steps``.

    Every ``check_every`` steps and at the last (0: never) the step's checkpoint goes to
    ``stopping``; the loop ends when it says stop. Progress fractions run over
    ``progress = (start, share)`` of the method's whole run. ``after_step(step, loss)`` runs after
    each update (``sspect train`` validates and writes checkpoints there).
    """
    import torch

    if optimiser is None:
        optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    stopping = stopping or EarlyStopping(0)
    start, share = progress
    step = first_step - 1
    for step in range(first_step, steps + 1):
        outcome = objective(step)
        value = outcome.loss.detach().item()
        if not math.isfinite(value):
            raise SSPECTError(f"{name} diverged at step {step}; lower the learning rate.")
        reported = value if outcome.reported is None else outcome.reported
        fields = {"step": step, "loss": reported, **outcome.fields}
        message = f"{outcome.label} {step}/{steps}, loss {reported:.6g}"
        if outcome.checkpoint is not None and check_every and (step % check_every == 0 or step == steps):
            with torch.no_grad():
                check = outcome.checkpoint()
            stopping.update(step, check.validation, check.candidate)
            if check.validation is not None:
                fields["validation"] = check.validation
                message += f", validation {check.validation:.6g}"
            if check.iterate is not None:
                events.iterate(step, check.iterate)
        optimiser.zero_grad()
        outcome.loss.backward()
        optimiser.step()
        if after_step is not None:
            after_step(step, reported)
        events.progress(start + share * step / steps, message, **fields)
        if stopping.should_stop:
            break
    return Fit(stopping.kept, stopping.best_step, step, step < steps, stopping.history)
