"""Choice of the photopeak and scatter windows: automatic for a photopeak energy, or given by the user.

A window is named either by its 0-based index in the file or by a keV range such as
"187-229"; the range picks the window that overlaps it most. Scatter windows: the windows that
touch the photopeak from below and above (within ``ADJACENT_KEV``) give TEW; one of them gives
DEW; none gives no scatter correction, with a warning.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SSPECTError
from .nm import EnergyWindow

ADJACENT_KEV = 3.0
NONE_WORDS = {"none", "off", "no", ""}


@dataclass
class WindowChoice:
    photopeak_keV: float  # the photopeak these windows serve
    peak: EnergyWindow
    lower: EnergyWindow | None
    upper: EnergyWindow | None

    @property
    def scatter_method(self) -> str:
        if self.lower and self.upper:
            return "TEW"
        if self.lower or self.upper:
            return "DEW"
        return "none"

    def describe(self) -> str:
        parts = [f"{self.photopeak_keV:g} keV photopeak {self.peak.describe()}"]
        if self.lower:
            parts.append(f"lower scatter {self.lower.describe()}")
        if self.upper:
            parts.append(f"upper scatter {self.upper.describe()}")
        return ", ".join(parts) + f" ({self.scatter_method})"


def _overlap(window: EnergyWindow, low: float, high: float) -> float:
    return max(0.0, min(window.upper_keV, high) - max(window.lower_keV, low))


def resolve_window(windows: list[EnergyWindow], spec, role: str) -> EnergyWindow:
    """A window from an index (int or digits) or a 'low-high' keV range."""
    listing = "; ".join(w.describe() for w in windows)
    text = str(spec).strip()
    if re.fullmatch(r"-?[0-9]+", text):
        index = int(text)
        if not 0 <= index < len(windows):
            raise SSPECTError(f"There is no {role} window #{index}; this study has {listing}.")
        return windows[index]
    try:
        low, high = sorted(float(v) for v in text.replace("keV", "").split("-"))
    except ValueError:
        raise SSPECTError(f"The {role} window '{spec}' is neither an index nor a keV range like 187-229; use one of {listing}.") from None
    best = max(windows, key=lambda w: _overlap(w, low, high))
    if _overlap(best, low, high) <= 0:
        raise SSPECTError(f"No energy window overlaps {low:g}-{high:g} keV for the {role}; this study has {listing}.")
    return best


def choose_windows(windows: list[EnergyWindow], photopeak_keV: float, peak=None, lower=None, upper=None) -> WindowChoice:
    """Photopeak and scatter windows; ``None`` means automatic, 'none' means no such window."""
    if peak is None:
        containing = [w for w in windows if w.lower_keV <= photopeak_keV <= w.upper_keV]
        if not containing:
            listing = "; ".join(w.describe() for w in windows)
            raise SSPECTError(
                f"No energy window contains the {photopeak_keV:g} keV photopeak ({listing}); choose the photopeak window by index or keV range.")
        peak_window = min(containing, key=lambda w: abs(w.centre_keV - photopeak_keV))
    else:
        peak_window = resolve_window(windows, peak, "photopeak")

    def pick(spec, role, touching):
        if spec is not None and str(spec).strip().lower() in NONE_WORDS:
            return None
        if spec is not None:
            window = resolve_window(windows, spec, role)
            if window.index == peak_window.index:
                raise SSPECTError(f"The {role} scatter window is the photopeak window itself; choose another window.")
            return window
        candidates = [w for w in windows if w.index != peak_window.index and touching(w)]
        return min(candidates, key=lambda w: w.width_keV) if candidates else None

    lower_window = pick(lower, "lower", lambda w: abs(w.upper_keV - peak_window.lower_keV) <= ADJACENT_KEV)
    upper_window = pick(upper, "upper", lambda w: abs(w.lower_keV - peak_window.upper_keV) <= ADJACENT_KEV)
    return WindowChoice(photopeak_keV, peak_window, lower_window, upper_window)
