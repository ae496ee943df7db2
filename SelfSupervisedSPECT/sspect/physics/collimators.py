"""Collimators as data: PyTomography code, intrinsic resolution, scanner labels, isotopes served.

PyTomography matches collimator codes as substrings of its SIMIND table (``data/collim.col``)
and raises an UnboundLocalError for an unknown one, so names are validated here against this
list. Intrinsic resolutions are FWHM at 140 keV of a 3/8" NaI crystal (vendor data sheets).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SSPECTError
from .isotopes import Isotope


@dataclass(frozen=True)
class Collimator:
    name: str  # what users type and provenance records: "GE-MEGP"
    code: str  # PyTomography / SIMIND collimator code
    description: str
    intrinsic_resolution_140keV_cm: float
    scanner_labels: tuple[tuple[str, str], ...]  # (vendor, CollimatorGridName) as scanners write them
    isotopes: tuple[str, ...]  # the isotopes it is made for

    def serves(self, isotope: Isotope) -> bool:
        return isotope.name in self.isotopes


COLLIMATORS = {c.name: c for c in (
    Collimator("GE-LEHR", "GI-LEHR", "GE low energy high resolution (Infinia/Discovery/NM-CT 670)", 0.38,
               (("GE", "LEHR"), ("GE", "LEHR-PARA")), ("99mTc",)),
    Collimator("GE-MEGP", "GI-MEGP", "GE medium energy general purpose (Infinia/Discovery/NM-CT 670)", 0.38,
               (("GE", "MEGP"), ("GE", "MEGP-PARA")), ("177Lu", "111In")),
    Collimator("GE-HEGP", "GI-HEGP", "GE high energy general purpose (Infinia/Discovery/NM-CT 670)", 0.38,
               (("GE", "HEGP"), ("GE", "HEGP-PARA")), ("131I",)),
    Collimator("SIEMENS-LEHR", "SY-LEHR", "Siemens low energy high resolution (Symbia/Intevo)", 0.38,
               (("SIEMENS", "LEHR"), ("SIEMENS", "LO.HI.RES")), ("99mTc",)),
    Collimator("SIEMENS-ME", "SY-ME", "Siemens medium energy low penetration (Symbia/Intevo)", 0.38,
               (("SIEMENS", "ME"), ("SIEMENS", "MELP"), ("SIEMENS", "ME-LP")), ("177Lu", "111In")),
    Collimator("SIEMENS-HE", "SY-HE", "Siemens high energy (Symbia/Intevo)", 0.38,
               (("SIEMENS", "HE"), ("SIEMENS", "HE-PARA")), ("131I",)),
)}
_BY_NAME = {key.upper(): c for c in COLLIMATORS.values() for key in (c.name, c.code)}
_BY_LABEL = {label: c for c in COLLIMATORS.values() for label in c.scanner_labels}


def get_collimator(name: str) -> Collimator:
    """The entry for a name ("GE-MEGP") or its PyTomography code ("GI-MEGP"), or a one-sentence refusal."""
    collimator = _BY_NAME.get(str(name).strip().upper())
    if collimator is None:
        raise SSPECTError(f"Unknown collimator '{name}'; choose one of {', '.join(COLLIMATORS)}.")
    return collimator


def detect_collimator(manufacturer: str, collimator_label: str) -> Collimator:
    """The entry for the scanner's own collimator label, or a clear refusal."""
    upper = manufacturer.upper()
    vendor = "GE" if "GE" in upper else "SIEMENS" if "SIEMENS" in upper else upper
    collimator = _BY_LABEL.get((vendor, collimator_label.strip().upper()))
    if collimator is None:
        raise SSPECTError(f"The collimator '{collimator_label}' of this {manufacturer or 'unknown'} scanner has no "
                          f"entry; give one with --collimator ({', '.join(COLLIMATORS)}).")
    return collimator


def default_collimator(vendor: str, isotope: Isotope) -> Collimator:
    """The vendor's collimator for ``isotope`` (the simulator's default)."""
    return next(c for c in COLLIMATORS.values() if c.scanner_labels[0][0] == vendor.upper() and c.serves(isotope))


def serving_warning(collimator: Collimator, isotope: Isotope) -> str | None:
    if collimator.serves(isotope):
        return None
    others = [c.name for c in COLLIMATORS.values() if c.serves(isotope)]
    return (f"The {collimator.name} collimator is not made for {isotope.name} (use {' or '.join(others)}); "
            "septal penetration is not modelled, so expect a blurred and biased image.")
