"""Result volumes as NRRD and NIfTI files with exact geometry and their unit, and read back.

Both go through SimpleITK, which writes NRRD in "left-posterior-superior" space and converts LPS
to RAS for NIfTI itself; the unit travels in the NRRD key ``sspect_unit`` and in the NIfTI
``descrip`` field, so that a file read back is the same Volume. DICOM export: :mod:`.dicom_export`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path
from ..errors import SSPECTError
from ..volume import Volume

NRRD_UNIT_KEY = "sspect_unit"
NIFTI_UNIT_PREFIX = "sspect unit="


def three_dimensional_array(volume: Volume) -> np.ndarray:
    """The volume's array, refused unless 3D: every export format (here and DICOM) needs one."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise SSPECTError(f"Only 3D volumes can be exported, this one has shape {array.shape}.")
    return array


def _sitk_image(volume: Volume) -> sitk.Image:
    array = three_dimensional_array(volume)
    # SimpleITK arrays are [k, j, i]; its direction is row-major with axis directions as columns.
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection(np.asarray(volume.direction, dtype=float).ravel().tolist())
    return image


def _write_sitk(image: sitk.Image, path: str | os.PathLike, image_io: str) -> Path:
    writer = sitk.ImageFileWriter()
    writer.SetImageIO(image_io)
    writer.UseCompressionOn()
    with atomic_path(path) as temporary:
        writer.SetFileName(str(temporary))
        try:
            writer.Execute(image)
        except RuntimeError as error:  # SimpleITK reports a full disk or a refused file this way
            raise SSPECTError(f"Writing {Path(path).name} into {Path(path).parent} failed ({str(error).strip().splitlines()[-1]}); "
                              "free space on that disk or choose another output folder.") from None
    return Path(path)


def write_nrrd(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a gzip-compressed float32 NRRD in LPS space, the unit in key ``sspect_unit``."""
    image = _sitk_image(volume)
    image.SetMetaData(NRRD_UNIT_KEY, volume.unit)
    return _write_sitk(image, path, "NrrdImageIO")


def write_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a float32 NIfTI (.nii or .nii.gz, RAS affine), the unit in the ``descrip`` field."""
    image = _sitk_image(volume)
    image.SetMetaData("ITK_FileNotes", f"{NIFTI_UNIT_PREFIX}{volume.unit}")  # becomes descrip
    return _write_sitk(image, path, "NiftiImageIO")


def read_image(path: str | os.PathLike) -> Volume:
    """Read a NRRD or NIfTI written by this module back into a Volume (LPS), unit included."""
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    unit = "counts"
    if image.HasMetaDataKey(NRRD_UNIT_KEY):
        unit = image.GetMetaData(NRRD_UNIT_KEY)
    elif image.HasMetaDataKey("descrip") and image.GetMetaData("descrip").startswith(NIFTI_UNIT_PREFIX):
        unit = image.GetMetaData("descrip")[len(NIFTI_UNIT_PREFIX):]
    return Volume(
        array=sitk.GetArrayFromImage(image).transpose(2, 1, 0),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        unit=unit,
    )


