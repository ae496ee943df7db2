"""Networks on disk: safetensors (tensors only, nothing executed on load) with a checksum and a description.

Shared by the pretrained DL-BPF network and the supervised networks. The description travels in
the safetensors header (text), so a file cannot lose it; the sha256 covers the tensors' names,
shapes, dtypes and bytes, so a damaged or edited file is refused before it is used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import SSPECTError

VOXEL_TOLERANCE = 0.10  # a network is refused on voxels more than 10 % larger or smaller than it was trained on
ISOTOPE = "177Lu"  # what every network here is trained for, recorded in its file
MU_WATER_PER_CM = 0.136  # narrow-beam attenuation of water at 208 keV: the fixed scale of a network's CT channel


def weights_sha256(state: dict) -> str:
    """sha256 over the tensors' names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def read_network_file(path, made_by: str) -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file, refused in one sentence if unreadable or damaged.

    ``made_by`` names what writes such files, for the sentence ("give a network written by ...").
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SSPECTError(f"The network file {path} does not exist; give the .safetensors file that {made_by} wrote.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise SSPECTError(f"The file {path} is not a readable safetensors file ({error}); give a network written by {made_by}.") from None
    if "sha256" in metadata and metadata["sha256"] != weights_sha256(state):
        raise SSPECTError(f"The weights in {path} do not match their recorded sha256; the file is damaged, copy or train it again.")
    return state, metadata


def voxel_mm(problem) -> list[float]:
    """The problem's voxel size in mm (PyTomography keeps cm)."""
    return [round(10.0 * float(d), 6) for d in problem.object_meta.dr]


def voxel_size_differs(scan_mm, trained_mm) -> bool:
    return any(abs(v - t) > VOXEL_TOLERANCE * t for v, t in zip(scan_mm, trained_mm))
