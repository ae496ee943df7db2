"""One registry, one interface: ``reconstruct(problem, params, events) -> Result``.

A method declares its parameters (type, default, bounds, help) so that the CLI, the job file
and the Slicer panel all validate and present them from the same declaration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SSPECTError


class Cancelled(Exception):
    """Raised inside a method when the caller asked it to stop."""


class Events:
    """Where a method reports progress; ``on_event`` receives one dict per event."""

    def __init__(self, on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 on_iterate: Callable[[int, Any], None] | None = None):
        self._on_event = on_event or (lambda event: None)
        self._should_stop = should_stop or (lambda: False)
        self._on_iterate = on_iterate

    @property
    def wants_iterates(self) -> bool:
        """True when someone (the harness's bias-variance curves) wants every iterate."""
        return self._on_iterate is not None

    def iterate(self, iteration: int, image) -> None:
        """Hand the image after a full iteration (or epoch) to the listener, as numpy."""
        if self._on_iterate is not None:
            self._on_iterate(iteration, image)

    def emit(self, event: str, **fields) -> None:
        self._on_event({"event": event, **fields})

    def should_stop(self) -> bool:
        return bool(self._should_stop())

    def progress(self, fraction: float, message: str = "", **fields) -> None:
        self.emit("progress", fraction=round(float(fraction), 4), message=message, **fields)
        if self.should_stop():
            raise Cancelled()

    def log(self, message: str) -> None:
        self.emit("log", message=message)


def _member_events(events: Events, member: int, members: int) -> Events:
    """Progress of one ensemble run as its share of the whole; cancellation as the caller's; iterates only of the first."""
    def on_event(event):
        if event.get("event") == "progress":
            event = {**event, "fraction": round((member + event["fraction"]) / members, 4),
                     "message": f"run {member + 1}/{members}: {event.get('message', '')}"}
        events.emit(**event)

    return Events(on_event, events.should_stop, events.iterate if member == 0 and events.wants_iterates else None)


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
KIND_WORDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "text"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None

    def validate(self, value):
        try:
            value = self._coerce(value)
        except (TypeError, ValueError, OverflowError):
            raise SSPECTError(f"The parameter {self.name} must be {KIND_WORDS[self.kind]}, not '{value}'.") from None
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise SSPECTError(f"The parameter {self.name} = {value} is outside {self.minimum}..{self.maximum}; {self.help.lower()}.")
        if self.choices is not None and value not in self.choices:
            raise SSPECTError(f"The parameter {self.name} = {value} is not one of {', '.join(map(str, self.choices))}.")
        return value

    def _coerce(self, value):
        """Text (as the CLI passes it) or JSON values -> the declared type; nothing silently changed."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(value)
            return text in TRUE_WORDS
        if isinstance(value, bool):
            raise TypeError(value)
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)  # 2.5 iterations is a mistake, not 2
            return int(value)
        value = self.kind(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(value)  # NaN passes every bound check
        return value

    def describe(self) -> dict:
        return {"name": self.name, "type": self.kind.__name__, "default": self.default, "help": self.help,
                "minimum": self.minimum, "maximum": self.maximum, "choices": list(self.choices) if self.choices else None}


@dataclass
class Result:
    image: Any  # numpy [Lx, Ly, Lz], counts per voxel
    info: dict = field(default_factory=dict)
    uncertainty: Any = None  # numpy [Lx, Ly, Lz]: voxel standard deviation (same unit), from a method's replicates


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    family: str  # classical | supervised | self-supervised
    params: tuple[Param, ...]
    run: Callable  # (problem, params: dict, events: Events) -> Result

    def validate(self, given: dict | None) -> dict:
        given = dict(given or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise SSPECTError(f"The method {self.name} has no parameter {', '.join(unknown)}; its parameters are {', '.join(sorted(known))}.")
        return {p.name: p.validate(given.get(p.name, p.default)) for p in self.params}

    def reconstruct(self, problem, params: dict | None = None, events: Events | None = None) -> Result:
        params, events = self.validate(params), events or Events()
        if params.get("ensemble", 1) > 1:
            return self._ensemble(problem, params, events)
        return self.run(problem, params, events)

    def _ensemble(self, problem, params: dict, events: Events) -> Result:
        """The mean of ``ensemble`` runs with seeds seed, seed + 1, ...; uncertainty: the SD of that mean.

        The runs differ in their splits of the counts and their initial weights, not in the measured
        data, so their spread is the method's own variability: the part of the noise the average
        removes. The data's noise, which every run shares, is not in it; a run's own map (n2n's
        two halves) is, so where the runs have one the returned map is the larger of the two."""
        import numpy as np

        members, seed = params["ensemble"], params["seed"]
        images, own_variances, infos = [], [], []
        for member in range(members):
            result = self.run(problem, {**params, "seed": seed + member}, _member_events(events, member, members))
            images.append(result.image)
            infos.append(result.info)
            if result.uncertainty is not None:
                own_variances.append(np.square(result.uncertainty))
        stack = np.stack(images)
        spread = stack.std(0, ddof=1) / np.sqrt(members)
        uncertainty = spread if len(own_variances) < members else np.maximum(spread, np.sqrt(np.mean(own_variances, 0)))
        info = {**infos[0], "ensemble": members, "seeds": [seed + m for m in range(members)],
                "members": [{k: v for k, v in i.items() if k in ("best_step", "stopped_at", "seed")} for i in infos]}
        return Result(stack.mean(0), info, uncertainty)

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "family": self.family, "advice": ADVICE.get(self.name, ""),
                "params": [p.describe() for p in self.params]}


# The order `sspect methods` and the Slicer panel list the methods in, best first for 177Lu dosimetry
# at the clinical grid, and what each is for: the evidence is docs/clinical-grid-report/findings.md.
ADVICE = {
    "osem": "The reference for organ dosimetry: no self-supervised method beat its torso NRMSE at 4.4 mm; on low-count scans "
            "give it fewer iterations or use bsrem.",
    "bsrem": "For low-count scans (beta 0.1) and hot spheres; on organs at clinical counts a little behind OSEM.",
    "n2n": "The best self-supervised method at 4.4 mm: beats OSEM on hot spheres (NEMA), ties it on torsos; "
           "ensemble=3 helps a little; minutes on a CPU.",
    "noise2inverse": "Like n2n (view splitting instead of count splitting), with the same strengths and costs.",
    "kem": "CT-guided smoothing of organs; it loses lesions the CT does not show, so not for lesion dosimetry.",
    "dip-admm": "Deep image prior with the CT (ADMM): best large-sphere recovery on the coarse grid; slow.",
    "dip": "Deep image prior with the CT: worse than OSEM at 4.4 mm at its defaults, and paints a checkerboard.",
    "neighbor2neighbor": "Projection-domain denoiser: no better than OSEM at 4.4 mm.",
    "dl-bpf": "Reader's DL-BPF: per scan it fits the noise at low counts; the shipped (8.8 mm) network smooths "
              "small spheres away and paints a checkerboard.",
    "osl-map": "MAP by one-step-late EM: BSREM converges to the same images more safely.",
    "unrolled-mapem": "Supervised unrolled MAP-EM (4.4 mm and 8.8 mm networks): the best organ errors and most 13-26 mm "
                      "lesions on simulated torsos at 4.4 mm, but a worse NRMSE than OSEM on NEMA and hot uptakes 10 % "
                      "too high on a real low-count scan; check against OSEM.",
    "post-unet": "Supervised correction of OSEM (4.4 mm and 8.8 mm networks): near unrolled-mapem on simulated "
                 "torsos, but it fails on anything unlike them (NEMA, real low-count scans) and recovers lesions less; "
                 "check against OSEM.",
}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in REGISTRY:
        raise SSPECTError(f"Unknown method '{name}'; choose one of {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]


def all_methods() -> dict[str, Method]:
    """Every method, in the order of :data:`ADVICE` (the evidence), then any others by name."""
    _load_builtin_methods()
    order = list(ADVICE) + sorted(set(REGISTRY) - set(ADVICE))
    return {name: REGISTRY[name] for name in order if name in REGISTRY}


def _load_builtin_methods() -> None:
    """Import every method module of this package (each registers its methods): a new method is one new file."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")
