"""Isotopes as data: photopeaks with their default and TEW scatter windows, half-life, DICOM code.

Windows are keV ranges as scanners define them; the 177Lu 208 keV windows are those of the GE
Discovery 670 study in shared/data. Radionuclide codes are SNOMED CT, DICOM CID 18, as in
pydicom's code dictionary (``codes.SCT._177Lutetium`` ...). Half-lives: NNDC/DDEP values.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import SSPECTError

SCATTER_WINDOW_NAMES = ("lower", "upper")


@dataclass(frozen=True)
class EnergyRange:
    """A window as a scanner writes it: a name and a keV range."""

    name: str
    lower_keV: float
    upper_keV: float

    @property
    def width_keV(self) -> float:
        return self.upper_keV - self.lower_keV

    def holds(self, energy_keV: float) -> bool:
        return self.lower_keV <= energy_keV <= self.upper_keV


@dataclass(frozen=True)
class Photopeak:
    energy_keV: float  # where the mu table and the collimator response are read
    window: EnergyRange  # default photopeak window
    lower_scatter: EnergyRange  # TEW windows touching it
    upper_scatter: EnergyRange
    abundance: float  # photons per decay (NNDC): the simulator's counts relative to the main photopeak
    upper_to_lower_per_keV: float  # simulation: scatter counts per keV above the peak relative to below
    scatter_to_primary: float  # simulation: photopeak scatter / primary in a torso

    @property
    def mu_water_per_cm(self) -> float:
        return water_mu_per_cm(self.energy_keV)


@dataclass(frozen=True)
class Isotope:
    name: str  # as written in reports: "177Lu"
    aliases: tuple[str, ...]
    photopeaks: tuple[Photopeak, ...]
    default_photopeaks_keV: tuple[float, ...]  # reconstructed unless --photopeaks says otherwise
    half_life_s: float
    code_value: str  # RadionuclideCodeSequence: SNOMED CT (CID 18)
    coding_scheme: str
    code_meaning: str
    fixed_mu_water_per_cm: float | None = None  # see LUTETIUM_177

    def photopeak(self, energy_keV: float) -> Photopeak:
        """The photopeak nearest ``energy_keV`` within 5 %, or a refusal naming the isotope's peaks."""
        nearest = min(self.photopeaks, key=lambda p: abs(p.energy_keV - energy_keV))
        if abs(nearest.energy_keV - energy_keV) > 0.05 * nearest.energy_keV:
            raise SSPECTError(f"{self.name} has no photopeak at {energy_keV:g} keV; its photopeaks are "
                              f"{', '.join(f'{p.energy_keV:g}' for p in self.photopeaks)} keV.")
        return nearest

    @property
    def default_photopeaks(self) -> tuple[Photopeak, ...]:
        return tuple(self.photopeak(e) for e in self.default_photopeaks_keV)

    def radionuclide_metadata(self) -> dict:
        """What the DICOM export writes: RadionuclideCodeSequence and half-life."""
        return {"name": self.name, "code_value": self.code_value, "coding_scheme": self.coding_scheme,
                "code_meaning": self.code_meaning, "half_life_s": self.half_life_s}

    @property
    def mu_water_per_cm(self) -> float:
        """Water's mu at the main photopeak: the fixed scale of networks' CT channel."""
        if self.fixed_mu_water_per_cm is not None:
            return self.fixed_mu_water_per_cm
        return self.default_photopeaks[0].mu_water_per_cm


def _peak(energy, name, window, lower, upper, abundance, upper_to_lower, scatter_to_primary):
    return Photopeak(energy, EnergyRange(name, *window), EnergyRange(f"{name}_LSC", *lower),
                     EnergyRange(f"{name}_USC", *upper), abundance, upper_to_lower, scatter_to_primary)


# 177Lu: the GE study's windows (names too); at 208 keV 0.08 upper/lower counts per keV measured
# in it (177Lu has little above 208 keV).
# PyTomography's table gives water 0.1352 /cm at 208 keV; the shipped networks were trained
# with 0.136 /cm as their CT channel's scale, so 177Lu keeps that number.
LUTETIUM_177 = Isotope(
    "177Lu", ("Lu177", "Lu-177", "177-Lu", "Lutetium-177", "Lutetium177"),
    (Photopeak(208.0, EnergyRange("Lu177_EM", 187.2, 228.8), EnergyRange("sc3_SC", 166.89, 186.31),
               EnergyRange("sc4_SC", 229.63, 251.16), 0.1036, 0.08, 0.3),
     Photopeak(113.0, EnergyRange("Lu177_EM", 101.7, 124.3), EnergyRange("96.0_SC", 91.2, 100.8),
               EnergyRange("sc2_SC", 124.32, 134.68), 0.0620, 0.6, 0.6)),
    (208.0,), 6.647 * 24 * 3600, "447553000", "SCT", "^177^Lutetium", fixed_mu_water_per_cm=0.136)
TECHNETIUM_99M = Isotope(
    "99mTc", ("Tc99m", "Tc-99m", "99m-Tc", "Technetium-99m"),
    (_peak(140.5, "Tc99m_EM", (126.45, 154.55), (119.4, 126.45), (154.55, 161.6), 0.885, 0.3, 0.35),),
    (140.5,), 6.0067 * 3600, "72454006", "SCT", "^99m^Technetium")
INDIUM_111 = Isotope(
    "111In", ("In111", "In-111", "111-In", "Indium-111"),
    (_peak(171.3, "In111_EM171", (154.2, 188.4), (145.6, 154.2), (188.4, 197.0), 0.9066, 0.8, 0.4),
     _peak(245.4, "In111_EM245", (220.9, 269.9), (208.6, 220.9), (269.9, 282.2), 0.9409, 0.3, 0.3)),
    (171.3, 245.4), 2.8047 * 24 * 3600, "56609000", "SCT", "^111^Indium")
IODINE_131 = Isotope(
    "131I", ("I131", "I-131", "131-I", "Iodine-131"),
    (_peak(364.5, "I131_EM", (328.0, 401.0), (306.1, 328.0), (401.0, 422.9), 0.8159, 0.3, 0.3),),
    (364.5,), 8.0252 * 24 * 3600, "1368003", "SCT", "^131^Iodine")

ISOTOPES = {isotope.name: isotope for isotope in (LUTETIUM_177, TECHNETIUM_99M, INDIUM_111, IODINE_131)}
_BY_ALIAS = {alias.lower(): isotope for isotope in ISOTOPES.values() for alias in (isotope.name, *isotope.aliases)}


def get_isotope(name: str) -> Isotope:
    """The registry entry for a name or alias ("177Lu", "Lu-177", "lu177"), or a one-sentence refusal."""
    isotope = _BY_ALIAS.get(str(name).strip().lower())
    if isotope is None:
        raise SSPECTError(f"Unknown isotope '{name}'; choose one of {', '.join(ISOTOPES)}.")
    return isotope


CENTRED_WITHIN = 0.01  # a photopeak window is centred on its peak within 1 % (scatter windows are not)


def detect_isotope(code_value: str, window_centres_keV) -> Isotope | None:
    """The isotope of a study: its RadionuclideCodeSequence code, else the one with the most
    photopeaks that a window is centred on (None when neither says, or two isotopes tie)."""
    for isotope in ISOTOPES.values():
        if code_value and code_value == isotope.code_value:
            return isotope
    centred = {isotope: sum(any(abs(c - p.energy_keV) <= CENTRED_WITHIN * p.energy_keV for c in window_centres_keV)
                            for p in isotope.photopeaks) for isotope in ISOTOPES.values()}
    best = max(centred.values())
    found = [isotope for isotope, count in centred.items() if count == best]
    return found[0] if best and len(found) == 1 else None


def parse_photopeaks(isotope: Isotope, spec) -> tuple[Photopeak, ...]:
    """Photopeaks from "208", "113,208" or a list of keV values; None gives the isotope's default."""
    if spec is None or spec == "" or spec == []:
        return isotope.default_photopeaks
    values = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        energies = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SSPECTError(f"The photopeaks {spec!r} must be keV values such as 208 or 113,208.") from None
    chosen = {isotope.photopeak(e) for e in energies}
    return tuple(p for p in isotope.photopeaks if p in chosen)  # the registry's order: the main peak first


def _pytomography_data() -> Path:
    """PyTomography's package data folder, found without importing it (and torch)."""
    spec = importlib.util.find_spec("pytomography")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=None)
def water_mu_per_cm(energy_keV: float) -> float:
    """mu of water (HU 0) at ``energy_keV`` from PyTomography's HU -> mu table, the one the
    engine's attenuation maps use (its nearest tabulated SPECT energy; water is the same for
    every CT model and kVp there)."""
    with open(_pytomography_data() / "ct_table.csv", newline="") as table:
        rows = [(float(row["Energy"]), float(row["Lower Constant"])) for row in csv.DictReader(table)]
    return min(rows, key=lambda row: abs(row[0] - energy_keV))[1]
