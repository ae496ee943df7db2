"""Decay correction: the activity of a calibrated image at a stated moment.

A reconstruction gives the mean activity while its bed was acquired. A dosimetry tool that
integrates a time-activity curve wants it at a known moment: the acquisition's start (DICOM
DecayCorrection START; for several beds, the first bed's start) or the injection (ADMIN).
NONE keeps the mean over the acquisition, which is what the counts measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from .errors import SSPECTError
from .io.nm import ProjectionStudy, acquisition_start, injection_start

DICOM_TERMS = {"none": "NONE", "start": "START", "injection": "ADMIN"}
MAX_HALF_LIVES = 30  # a correction of more than 2^30 (10^9) is a wrong date, not a measurement


@dataclass(frozen=True)
class DecayCorrection:
    mode: str  # a key of DICOM_TERMS
    reference: datetime | None  # the moment the activity is given at; None when no date is known
    factors: tuple[float, ...]  # per bed: its reconstructed mean activity is multiplied by this

    @property
    def dicom_term(self) -> str:
        return DICOM_TERMS[self.mode]

    def provenance(self) -> dict:
        return {"mode": self.mode, "dicom": self.dicom_term,
                "reference_datetime": self.reference.isoformat() if self.reference else None,
                "factors_per_bed": [round(f, 8) for f in self.factors]}


def check_mode(mode) -> None:
    if mode not in DICOM_TERMS:
        raise SSPECTError(f"The decay correction {mode!r} is not one of {', '.join(DICOM_TERMS)}; choose one.")


def acquisition_duration_s(bed: ProjectionStudy) -> float:
    """The whole acquisition of one bed: every view's frame, the detectors acquiring side by side."""
    return bed.frame_duration_s * bed.n_views / max(bed.n_detectors, 1)


def mean_to_start(half_life_s: float, duration_s: float) -> float:
    """Activity at the start of an acquisition over its mean during it: lambda T / (1 - exp(-lambda T))."""
    decayed = math.log(2) * duration_s / half_life_s
    return decayed / -math.expm1(-decayed) if decayed > 0 else 1.0


def seconds_between(later: datetime, earlier: datetime) -> float:
    """Elapsed seconds; a time with a zone and one without are both read as local clock times."""
    if (later.tzinfo is None) != (earlier.tzinfo is None):
        later, earlier = later.replace(tzinfo=None), earlier.replace(tzinfo=None)
    return (later - earlier).total_seconds()


def acquisition_starts(beds: list[ProjectionStudy], acquisition_datetime: str | None = None) -> list[datetime | None]:
    """Each bed's acquisition start from its file, else (one bed) the checked ISO ``acquisition_datetime``."""
    starts = [acquisition_start(bed.header) for bed in beds]
    if len(beds) == 1 and starts[0] is None and acquisition_datetime:
        starts = [datetime.fromisoformat(str(acquisition_datetime))]
    return starts


def decay_correction(mode: str, beds: list[ProjectionStudy], half_life_s: float,
                     acquisition_datetime: str | None = None, injection_datetime: str | None = None) -> DecayCorrection:
    """The factor of every bed for ``mode``; refused in one sentence when a date it needs is unknown.

    Each bed's start comes from its file, else (one bed) from ``acquisition_datetime``; the
    injection from ``injection_datetime``, else the file's Radiopharmaceutical Start DateTime.
    """
    check_mode(mode)
    if mode == "none":
        return DecayCorrection(mode, None, tuple(1.0 for _ in beds))
    starts = acquisition_starts(beds, acquisition_datetime)
    within = [mean_to_start(half_life_s, acquisition_duration_s(bed)) for bed in beds]
    known = all(start is not None for start in starts)
    if len(beds) > 1 and not known:
        raise SSPECTError("Decay correction of several beds needs each bed's acquisition date and time, which the "
                          "projection files do not all give; reconstruct the beds one by one or choose no decay correction.")
    if mode == "start":
        reference = min(starts) if known else None
        delays = [seconds_between(start, reference) for start in starts] if known else [0.0]
    else:
        if not known:
            raise SSPECTError("Decay correction to the injection needs the acquisition date and time, which the projection "
                              "file does not give; give it (--acquisition-datetime) or choose another decay correction.")
        reference = datetime.fromisoformat(str(injection_datetime)) if injection_datetime else injection_start(beds[0].header)
        if reference is None:
            raise SSPECTError("Decay correction to the injection needs the injection date and time, which the projection "
                              "file does not give; give it (--injection-datetime) or choose another decay correction.")
        delays = [seconds_between(start, reference) for start in starts]
        if min(delays) < 0:
            raise SSPECTError(f"The injection ({reference.isoformat()}) is after the acquisition start "
                              f"({min(starts).isoformat()}); check the injection and acquisition dates.")
    if max(delays) > MAX_HALF_LIVES * half_life_s:
        raise SSPECTError(f"The acquisition is {max(delays) / 86400:.1f} days after the {'injection' if mode == 'injection' else 'first bed'}, "
                          f"more than {MAX_HALF_LIVES} half-lives of the isotope; check the dates.")
    factors = tuple(w * 2.0 ** (delay / half_life_s) for w, delay in zip(within, delays))
    return DecayCorrection(mode, reference, factors)
