"""Stored sensitivities (cps/MBq), measured once on a phantom by ``sspect calibrate`` and used by name.

One JSON file per user, ``$SSPECT_CALIBRATIONS`` or ``<config dir>/sspect/calibrations.json``,
so that the command line, job files and the Slicer module share the same names. Each record
says what it was measured for (isotope, collimator, photopeaks, method), so that a study of
another isotope or collimator is refused instead of silently mis-scaled.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import SSPECTError

STORE_VARIABLE = "SSPECT_CALIBRATIONS"
NAME_MAX = 80


def store_path() -> Path:
    """The calibrations file: the variable's path, else the platform's per-user configuration folder
    (three fixed rules; platformdirs would be a dependency for them alone)."""
    given = os.environ.get(STORE_VARIABLE)
    if given:
        return Path(given)
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "sspect" / "calibrations.json"


def stored_calibrations() -> dict[str, dict]:
    """Every stored record by name; none when the file does not exist yet."""
    path = store_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SSPECTError(f"The calibrations file {path} cannot be read ({error}); repair or move it and calibrate again.") from None
    if not isinstance(data, dict) or not all(isinstance(r, dict) and _valid_factor(r.get("cps_per_MBq")) for r in data.values()):
        raise SSPECTError(f"The calibrations file {path} is not one written by sspect; repair or move it and calibrate again.")
    return data


def find_calibration(name: str) -> dict:
    records = stored_calibrations()
    if name not in records:
        known = ", ".join(f"'{n}'" for n in sorted(records)) or "none yet"
        raise SSPECTError(f"No calibration is stored as '{name}' (stored: {known}); measure it with `sspect calibrate` "
                          "or give the sensitivity as a number.")
    return records[name]


def check_calibration_name(name) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX or name != name.strip():
        raise SSPECTError(f"A calibration name is 1 to {NAME_MAX} characters without leading or trailing spaces, not {name!r}.")
    try:
        float(name)
    except ValueError:
        return
    raise SSPECTError(f"A calibration name must not be a number ({name!r} reads as a sensitivity); choose a name with letters.")


def check_calibration_free(name: str, overwrite: bool = False) -> dict[str, dict]:
    """The stored records, refused in one sentence when ``name`` is taken and not to be replaced."""
    records = stored_calibrations()
    if name in records and not overwrite:
        raise SSPECTError(f"A calibration named '{name}' is already stored; choose another name or replace it (--overwrite).")
    return records


def save_calibration(record: dict, overwrite: bool = False) -> Path:
    """Add ``record`` under its name, the file replaced as a whole; a taken name is refused unless overwriting."""
    check_calibration_name(record["name"])
    records = check_calibration_free(record["name"], overwrite)
    records[record["name"]] = record
    path = store_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, records)
    except OSError as error:
        raise SSPECTError(f"The calibration could not be stored in {path} ({error.strerror or error}); "
                          f"set {STORE_VARIABLE} to a writable file.") from None
    return path


def _valid_factor(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
