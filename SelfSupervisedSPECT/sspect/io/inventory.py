"""What a folder of DICOM files holds: NM TOMO projection files and CT series, by frame of reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import SSPECTError
from .ct import CT_IMAGE_STORAGE
from .nm import NM_IMAGE_STORAGE


@dataclass
class Inventory:
    projection_files: dict = field(default_factory=dict)  # path -> frame of reference UID
    ct_series: dict = field(default_factory=dict)  # series UID -> {"files", "frame_of_reference_uid", "description"}
    other: int = 0

    def ct_for(self, frame_of_reference_uid: str) -> list[dict]:
        return [s for s in self.ct_series.values() if s["frame_of_reference_uid"] == frame_of_reference_uid]


def scan(path) -> Inventory:
    """Classify every DICOM file under ``path`` (a file or a folder, recursively) by its header."""
    root = Path(path)
    if not root.exists():
        raise SSPECTError(f"{path} does not exist; give a DICOM file or a folder of DICOM files.")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    inventory = Inventory()
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            inventory.other += 1
            continue
        sop = ds.get("SOPClassUID")
        if sop == NM_IMAGE_STORAGE and "TOMO" in list(ds.get("ImageType", [])) and "RECON TOMO" not in list(ds.get("ImageType", [])):
            inventory.projection_files[file] = str(ds.get("FrameOfReferenceUID", ""))
        elif sop == CT_IMAGE_STORAGE:
            series = inventory.ct_series.setdefault(str(ds.get("SeriesInstanceUID", "")), {
                "files": [], "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
                "description": str(ds.get("SeriesDescription", ""))})
            series["files"].append(file)
        else:
            inventory.other += 1
    return inventory
