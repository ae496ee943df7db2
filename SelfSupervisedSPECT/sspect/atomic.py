"""Result files written atomically, so a killed or failing run never leaves a half-written one.

Everything is first written under a hidden temporary name in the destination's own folder
(``.<name>.partial-<pid>-<token><extensions>``, same file system, so the final rename is atomic)
and renamed onto the final name only once complete. The extensions are kept at the end of the
temporary name because writers such as SimpleITK choose the format from them. A process killed
with SIGKILL can leave a hidden ``.partial`` entry behind, never a truncated file under the final
name. The guarantee is against the process dying, not against power loss (no fsync). A result
set (several files) is one folder written the same way (``result_set``).
"""
from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SSPECTError


def _hidden_sibling(final: Path, label: str) -> Path:
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return final.with_name(f".{final.name}.{label}-{token}{''.join(final.suffixes)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; on success it replaces ``final_path``.

    The body must create the file at the yielded path. On an exception the temporary file is
    removed and an existing ``final_path`` is left untouched.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _hidden_sibling(final, "partial")
    try:
        yield temporary
        os.replace(temporary, final)
    except BaseException:
        _remove(temporary)
        raise


def _is_non_empty_directory(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_destination_folder(final: Path, overwrite: bool) -> None:
    if final.exists() and not final.is_dir():
        raise SSPECTError(f"{final} exists and is a file, not a folder; choose another output folder.")
    if not overwrite and _is_non_empty_directory(final):
        raise SSPECTError(
            f"Output folder {final} already exists and is not empty; choose a new folder or allow overwriting."
        )


@contextmanager
def atomic_directory(final_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_dir``; on success it becomes ``final_dir``.

    An existing non-empty ``final_dir`` is refused (checked before any work, and again at the
    end) unless ``overwrite`` is true; then the old folder is moved aside only after the new one
    is complete, and deleted after the new one is in place. On an exception the temporary folder
    is removed and the old folder is left as it was.
    """
    final = Path(final_dir)
    _check_destination_folder(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _hidden_sibling(final, "partial")
    try:  # the mkdir inside, so that a signal landing just after it still removes the folder
        temporary.mkdir()
        yield temporary
        _check_destination_folder(final, overwrite)
        if final.is_dir() and not _is_non_empty_directory(final):
            _rename_onto_empty_folder(temporary, final)
        elif final.exists():
            previous = _hidden_sibling(final, "previous")
            os.rename(final, previous)
            try:
                os.rename(temporary, final)
            except BaseException:
                os.rename(previous, final)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(temporary, final)
    except BaseException:
        _remove(temporary)
        raise


def _rename_onto_empty_folder(temporary: Path, final: Path) -> None:
    try:
        os.rename(temporary, final)  # POSIX replaces an empty folder in one step
    except OSError:
        final.rmdir()  # Windows does not
        os.rename(temporary, final)


@dataclass
class ResultSet:
    """A result's files, written under ``temporary`` and appearing together as ``folder`` (named ``name``)."""

    name: str
    folder: Path
    temporary: Path


def check_name_free(out_dir: str | os.PathLike, name: str, *, overwrite: bool) -> None:
    """Refuse a given result name that is taken (unless overwriting) or has a file in its way."""
    final = Path(out_dir) / name
    if final.exists() and not final.is_dir():
        raise SSPECTError(f"A file named {name} is in the way of the result folder in {out_dir}; move it or choose another name.")
    if _is_non_empty_directory(final) and not overwrite:
        raise SSPECTError(f"A result named {name} already exists in {out_dir}; choose another name, or allow overwriting "
                          "(--overwrite, or \"overwrite\": true in a job file).")


@contextmanager
def result_set(out_dir: str | os.PathLike, name: str, *, numbered: bool, overwrite: bool) -> Iterator[ResultSet]:
    """Yield a temporary folder that becomes ``out_dir/name`` in one rename once the body succeeds.

    ``numbered`` (a default name): a taken name becomes ``name_2``, ``name_3`` ...; the name is
    claimed by a hidden ``.name.claim`` folder, which only one process can make, so two runs into
    one output folder never pick the same name. Otherwise a taken name is refused unless
    ``overwrite``; then the old set is removed only once the new one is complete. A rename never
    lands on a folder holding files, so a concurrent run's set is never mixed with ours. On
    failure nothing visible changes.
    """
    out = Path(out_dir)
    claim = None
    try:  # the claim's mkdir inside, so that a signal landing just after it still removes the claim
        if numbered:
            for number in itertools.count(1):
                candidate = name if number == 1 else f"{name}_{number}"
                if (out / candidate).exists():
                    continue
                claim = out / f".{candidate}.claim"  # named before the mkdir, for the same reason
                try:
                    claim.mkdir()
                except FileExistsError:
                    claim = None
                    continue
                break
        else:
            candidate = name
            check_name_free(out, name, overwrite=overwrite)
        final = out / candidate
        with atomic_directory(final, overwrite=overwrite) as temporary:
            yield ResultSet(candidate, final, temporary)
    finally:
        if claim is not None and claim.is_dir():
            claim.rmdir()


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically; serialisation errors happen before any file is touched."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
