"""One file format for every network the engine ships or writes: safetensors with a description and a checksum.

safetensors holds tensors only (nothing is executed on load). The description travels in the
file's header as text, so a file cannot lose it, and a JSON copy may sit beside it for people;
the sha256 covers the tensors' names, shapes, dtypes and bytes, so a damaged or edited file is
refused before it is used. A convolutional network learns the blur and noise texture of one
isotope, collimator and voxel size, so loading refuses a study that differs in any of them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import SSPECTError

WEIGHTS_FOLDER = Path(__file__).resolve().parents[2] / "weights"
VOXEL_TOLERANCE = 0.10  # refused on voxels more than 10 % larger or smaller than trained on
TEXT_KEYS = {"format", "kind", "isotope", "collimator", "sha256", "torch", "monai", "code_version", "input"}


def shipped_networks(stem: str) -> dict[float, Path]:
    """``{voxel size in mm: file}`` of the networks named ``stem_*.safetensors`` that ship with the engine."""
    from safetensors import safe_open

    found = {}
    for path in sorted(WEIGHTS_FOLDER.glob(f"{stem}_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found[float(json.loads((handle.metadata() or {})["voxel_mm"])[0])] = path
    return found


def resolve_weights(value: str, shipped_stem: str, problem) -> Path:
    """'shipped' -> the engine's network trained at the voxel size nearest the study's; anything else is a path.

    A convolutional network fits one voxel size, so the engine ships one per grid (4.4 mm, the
    clinical one, and 8.8 mm for 2x2-binned detectors); a study matching neither gets the nearest,
    which :func:`check_study` then refuses in one sentence.
    """
    if value.strip().lower() != "shipped":
        return Path(value).expanduser()
    networks = shipped_networks(shipped_stem)
    if not networks:
        raise SSPECTError(f"No shipped network named {shipped_stem} is installed in {WEIGHTS_FOLDER}; reinstall the "
                          "extension or give a .safetensors file.")
    scan_mm = voxel_mm(problem)[0]
    return networks[min(networks, key=lambda trained: abs(trained - scan_mm))]


def weights_sha256(state: dict) -> str:
    """sha256 over the tensors' names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def tensors_of(module) -> dict:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}


def save_weights(state: dict, path, description: dict, *, json_copy: bool = False, checksum: bool = True) -> dict:
    """Write ``state`` with ``description`` in the header (atomically); returns the description with its sha256."""
    from safetensors.torch import save_file

    from ...atomic import atomic_path, write_json_atomic

    description = {**description, **({"sha256": weights_sha256(state)} if checksum else {})}
    header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in description.items()}
    path = Path(path)
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata=header)
    if json_copy:
        write_json_atomic(path.with_suffix(".json"), description)
    return description


def read_weights(path, made_by: str, expected_format: str, what: str) -> tuple[dict, dict]:
    """(tensors, description) of a file :func:`save_weights` wrote, refused in one sentence if unreadable, damaged or another kind.

    ``made_by`` names what writes such files and ``what`` what they are, for the sentence.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SSPECTError(f"The network file {path} does not exist; give the .safetensors file that {made_by} wrote.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise SSPECTError(f"The file {path} is not a readable safetensors file ({error}); give a network written by {made_by}.") from None
    if "sha256" in header and header["sha256"] != weights_sha256(state):
        raise SSPECTError(f"The weights in {path} do not match their recorded sha256; the file is damaged, copy or train it again.")
    if header.get("format") != expected_format:
        raise SSPECTError(f"The file {path} is not {what} (format '{header.get('format')}', expected {expected_format}); "
                          f"give a network written by {made_by}.")
    return state, {key: value if key in TEXT_KEYS else _decoded(value) for key, value in header.items()}


def _decoded(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_state(network, state: dict, path, made_by: str):
    """``network`` with ``state`` loaded strictly, refused in one sentence when they do not fit."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError:
        raise SSPECTError(f"The weights in {path} do not fit the network its header describes; {made_by} it again.") from None
    return network


def voxel_mm(problem) -> list[float]:
    """The problem's voxel size in mm (PyTomography keeps cm)."""
    return [round(10.0 * float(d), 6) for d in problem.object_meta.dr]


def voxel_size_differs(scan_mm, trained_mm) -> bool:
    return any(abs(v - t) > VOXEL_TOLERANCE * t for v, t in zip(scan_mm, trained_mm))


def check_study(path, description: dict, problem, remedy: str) -> None:
    """Refuse, in one sentence, a study whose isotope, collimator or voxel size differs from the network's training data.

    ``remedy`` ends the voxel-size sentence: what else the user can do (train or pretrain at this voxel size).
    """
    trained_isotope, trained_keV = description.get("isotope"), float(description.get("photopeak_keV", 208.0))
    window = tuple(problem.peak_window_keV)
    if problem.isotope.name != trained_isotope or (window and not window[0] <= trained_keV <= window[1]):
        shown = f"{window[0]:g}-{window[1]:g} keV" if window else "unknown"
        raise SSPECTError(f"The network {path} was trained on {trained_isotope} ({trained_keV:g} keV) but this study is "
                          f"{problem.isotope.name} with the photopeak window {shown}; choose the {trained_keV:g} keV window of a "
                          f"{trained_isotope} study or a method without training.")
    if len(problem.photopeaks_keV) > 1:
        raise SSPECTError(f"The network {path} was trained on the {trained_keV:g} keV photopeak alone but this study "
                          f"reconstructs {len(problem.photopeaks_keV)} photopeaks; reconstruct with --photopeaks {trained_keV:g}.")
    trained_collimator = description.get("collimator", "")
    if problem.collimator_code and trained_collimator and problem.collimator_code != trained_collimator:
        raise SSPECTError(f"The network {path} was trained for the {trained_collimator} collimator but this study was "
                          f"acquired with {problem.collimator_code}; use a network trained for that collimator or a method without training.")
    scan_mm, trained_mm = voxel_mm(problem), description["voxel_mm"]
    if voxel_size_differs(scan_mm, trained_mm):
        hint = ""
        ratio = trained_mm[0] / scan_mm[0]
        if round(ratio) in (2, 4) and abs(ratio - round(ratio)) < VOXEL_TOLERANCE:
            hint = f" (detector binning {round(ratio)} gives it: --binning {round(ratio)}, or Grid {round(ratio)}x{round(ratio)} in Slicer)"
        raise SSPECTError(f"The network {path} was trained on {trained_mm} mm voxels but this study has {scan_mm} mm "
                          f"(more than {VOXEL_TOLERANCE:.0%} apart); reconstruct at the trained voxel size{hint} or {remedy}.")
