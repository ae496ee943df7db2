"""Isotope and collimator presets, and the check that a collimator name is one we know.

PyTomography matches collimator codes as substrings of its SIMIND table and raises an
UnboundLocalError for an unknown name, so names are validated here against an explicit list.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SSPECTError


@dataclass(frozen=True)
class CollimatorPreset:
    code: str  # PyTomography / SIMIND collimator code
    description: str
    intrinsic_resolution_140keV_cm: float  # FWHM of the crystal at 140 keV


LU177_PHOTOPEAK_KEV = 208.0
LU177_HALF_LIFE_S = 6.647 * 24 * 3600

# Keys: (manufacturer keyword, collimator name as scanners write it in CollimatorGridName).
COLLIMATORS = {
    "GE-MEGP": CollimatorPreset("GI-MEGP", "GE medium energy general purpose (Infinia/Discovery/NM-CT 670)", 0.38),
    "SIEMENS-ME": CollimatorPreset("SY-ME", "Siemens medium energy low penetration (Symbia/Intevo)", 0.38),
}
SCANNER_ALIASES = {
    ("GE", "MEGP"): "GE-MEGP",
    ("GE", "MEGP-PARA"): "GE-MEGP",
    ("SIEMENS", "ME"): "SIEMENS-ME",
    ("SIEMENS", "MELP"): "SIEMENS-ME",
    ("SIEMENS", "ME-LP"): "SIEMENS-ME",
}


def collimator_preset(name: str) -> CollimatorPreset:
    key = name.strip().upper()
    if key not in COLLIMATORS:
        raise SSPECTError(f"Unknown collimator '{name}'; choose one of {', '.join(sorted(COLLIMATORS))}.")
    return COLLIMATORS[key]


def detect_collimator(manufacturer: str, collimator_name: str) -> str:
    """Preset name for the scanner's own collimator label, or a clear refusal."""
    vendor = "GE" if "GE" in manufacturer.upper() else "SIEMENS" if "SIEMENS" in manufacturer.upper() else manufacturer.upper()
    key = SCANNER_ALIASES.get((vendor, collimator_name.strip().upper()))
    if key is None:
        raise SSPECTError(
            f"The collimator '{collimator_name}' of this {manufacturer or 'unknown'} scanner has no preset; give one with --collimator ({', '.join(sorted(COLLIMATORS))}).")
    return key
