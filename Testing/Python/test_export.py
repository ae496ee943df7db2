"""Export (NRRD, NIfTI, DICOM PT series) keeps values, geometry, units and the dosimetry tags;
result files and folders are written atomically."""
import datetime as dt
import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, NuclearMedicineImageStorage, generate_uid
from scipy.spatial.transform import Rotation

from sspect.atomic import atomic_directory, atomic_path, write_json_atomic, write_text_atomic
from sspect.errors import SSPECTError
from sspect.io.dicom_export import read_dicom_series, write_dicom_series
from sspect.io.volume_files import read_image, write_nifti, write_nrrd
from sspect.physics.isotopes import LUTETIUM_177
from sspect.volume import Volume

OBLIQUE = Rotation.from_euler("xyz", [10, -20, 35], degrees=True).as_matrix()
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ramp_volume(direction=np.eye(3), unit="Bq/mL") -> Volume:
    """16 x 12 x 10 ramp; in-plane spacings differ so a row/column swap cannot pass unseen."""
    i, j, k = np.meshgrid(np.arange(16), np.arange(12), np.arange(10), indexing="ij")
    array = (1.5 * i + 10.0 * j + 100.0 * k + 0.25).astype(np.float32)
    return Volume(array, spacing=(4.0, 3.0, 5.0), origin=(-30.0, 12.5, 100.0), direction=direction, unit=unit)


def assert_same_geometry(actual: Volume, expected: Volume):
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=1e-6)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=1e-6)


def reference_nm(path: Path, *, dated: bool) -> Path:
    """An NM projection header like a scanner's; ``dated=False`` is de-identified like the real study."""
    ds = Dataset()
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "NM"
    ds.PatientName = "Doe^Jane" if dated else ""
    ds.PatientID = "P123" if dated else ""
    ds.PatientBirthDate = "19600102" if dated else ""
    ds.PatientSex = "F" if dated else ""
    ds.PatientWeight = "70" if dated else None
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyID = ""
    for name, date, time in (("Study", "20240301", "101500"), ("Series", "20240301", "103000"),
                             ("Acquisition", "20240301", "103012"), ("Content", "20240301", "110000")):
        setattr(ds, f"{name}Date", date if dated else "")
        setattr(ds, f"{name}Time", time if dated else "")
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    rotation = Dataset()
    rotation.ActualFrameDuration = 25000
    rotation.NumberOfFramesInRotation = 60
    ds.RotationInformationSequence = [rotation]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def read_slices(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- NRRD / NIfTI


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["identity", "oblique"])
def test_nrrd_keeps_values_geometry_and_unit(tmp_path, direction):
    volume = ramp_volume(direction)
    path = write_nrrd(volume, tmp_path / "recon.nrrd")
    image = sitk.ReadImage(str(path))
    assert image.GetMetaData("NRRD_space") == "left-posterior-superior"
    assert image.GetMetaData("sspect_unit") == "Bq/mL"
    assert image.GetPixelID() == sitk.sitkFloat32
    back = read_image(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert_same_geometry(back, volume)
    assert back.unit == "Bq/mL"
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["identity", "oblique"])
def test_nifti_is_ras_for_nibabel_and_lps_for_simpleitk(tmp_path, direction):
    volume = ramp_volume(direction, unit="counts")
    path = write_nifti(volume, tmp_path / "recon.nii.gz")
    nifti = nibabel.load(path)
    np.testing.assert_allclose(nifti.affine, LPS_TO_RAS @ volume.affine, atol=1e-4)
    assert nifti.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), volume.array)
    assert nifti.header["descrip"].tobytes().decode().rstrip("\0") == "sspect unit=counts"
    back = read_image(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert_same_geometry(back, volume)
    assert back.unit == "counts"


# ---------------------------------------------------------------- DICOM


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["identity", "oblique"])
def test_dicom_round_trip_keeps_values_and_geometry(tmp_path, direction):
    volume = ramp_volume(direction)
    volume.array[:, :, 0] = 0.0  # an empty slice
    volume.array[:, :, 1] *= 1e-3  # a cold slice keeps its own precision
    volume.array[3, 4, 5] = -7.5  # negative values survive (signed pixels)
    folder = write_dicom_series(volume, tmp_path / "dicom")
    back = read_dicom_series(folder)
    assert back.unit == "Bq/mL"
    assert_same_geometry(back, volume)
    peak = np.abs(volume.array).max()
    assert np.abs(back.array - volume.array).max() < 1e-3 * peak
    cold = volume.array[:, :, 1]
    assert np.abs(back.array[:, :, 1] - cold).max() < 1e-3 * np.abs(cold).max()

    # ITK (what Slicer's DICOM scalar volume plugin uses) agrees on values and geometry
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    itk_array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert np.abs(itk_array - volume.array).max() < 1e-3 * peak
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction, atol=1e-6)


def test_dicom_slices_carry_plane_geometry(tmp_path):
    volume = ramp_volume()
    slices = read_slices(write_dicom_series(volume, tmp_path / "dicom"))
    assert len(slices) == 10
    first, last = slices[0], slices[-1]
    assert [first.Rows, first.Columns] == [12, 16]
    assert [float(v) for v in first.PixelSpacing] == [3.0, 4.0]  # row spacing (along j) first
    assert float(first.SliceThickness) == 5.0 and float(first.SpacingBetweenSlices) == 5.0
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.ImagePositionPatient] == [-30.0, 12.5, 100.0]
    assert [float(v) for v in last.ImagePositionPatient] == [-30.0, 12.5, 145.0]
    assert [s.ImageIndex for s in slices] == list(range(1, 11))
    assert {s.NumberOfSlices for s in slices} == {10}
    assert len({s.SOPInstanceUID for s in slices}) == 10
    assert len({s.SeriesInstanceUID for s in slices}) == 1
    # pixel (row r, column c) of slice k is voxel (i=c, j=r, k)
    assert first.pixel_array[2, 7] * float(first.RescaleSlope) == pytest.approx(volume.array[7, 2, 0], rel=1e-4)


def test_dicom_takes_study_patient_and_dates_from_the_reference_nm(tmp_path):
    nm_path = reference_nm(tmp_path / "nm.dcm", dated=True)
    nm = pydicom.dcmread(nm_path)
    metadata = {
        "reconstruction_method": "OSEM 4 it x 8 subsets",
        "corrections": ["attenuation", "scatter", "collimator_detector_response"],
        "acquisition_datetime": "2030-01-01T00:00:00",  # the NM's own dates win
        "injected_activity_MBq": 7400,
        "injection_datetime": "2024-02-28T09:00:00",
        "radiopharmaceutical": "177Lu-PSMA-617",
        "radionuclide": LUTETIUM_177.radionuclide_metadata(),
        "software": ["PyTomography 3.4.0"],
    }
    folder = write_dicom_series(ramp_volume(), tmp_path / "dicom", reference_nm_path=nm_path, metadata=metadata)
    for ds in read_slices(folder):
        assert ds.SOPClassUID == pydicom.uid.PositronEmissionTomographyImageStorage and ds.Modality == "PT"
        assert ds.Units == "BQML"
        assert ds.StudyInstanceUID == nm.StudyInstanceUID
        assert ds.FrameOfReferenceUID == nm.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != nm.SeriesInstanceUID
        assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == ("Doe^Jane", "P123", "19600102", "F")
        assert float(ds.PatientWeight) == 70
        for name in ("Study", "Series", "Acquisition"):
            assert ds[f"{name}Date"].value == nm[f"{name}Date"].value
            assert ds[f"{name}Time"].value == nm[f"{name}Time"].value
        assert (ds.ContentDate, ds.ContentTime) == (ds.InstanceCreationDate, ds.InstanceCreationTime)  # made now
        assert ds.ContentDate != nm.ContentDate
        assert ds.Manufacturer == "SelfSupervisedSPECT" and "DeviceSerialNumber" not in ds  # this image is ours
        assert "PatientOrientationCodeSequence" in ds and "PatientGantryRelationshipCodeSequence" in ds
        assert list(ds.SoftwareVersions) == ["sspect 0.1.0", "PyTomography 3.4.0"]
        assert "OSEM 4 it x 8 subsets" in ds.SeriesDescription
        assert ds.ReconstructionMethod == "OSEM 4 it x 8 subsets"
        assert list(ds.CorrectedImage) == ["ATTN", "SCAT"]  # no defined term for the collimator response
        assert ds.DecayCorrection == "NONE"
        assert ds.ActualFrameDuration == 60 * 25000  # 60 views of 25 s
        drug = ds.RadiopharmaceuticalInformationSequence[0]
        code = drug.RadionuclideCodeSequence[0]
        lutetium = codes.SCT._177Lutetium
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (lutetium.value, "SCT", lutetium.meaning)
        assert float(drug.RadionuclideHalfLife) == pytest.approx(574300, abs=1)
        assert float(drug.RadionuclideTotalDose) == pytest.approx(7.4e9)
        assert drug.RadiopharmaceuticalStartDateTime == "20240228090000"
        assert drug.Radiopharmaceutical == "177Lu-PSMA-617"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == nm.SOPInstanceUID


def test_dicom_from_deidentified_nm_leaves_unknown_dates_empty(tmp_path):
    nm_path = reference_nm(tmp_path / "nm.dcm", dated=False)
    folder = write_dicom_series(ramp_volume(unit="counts"), tmp_path / "dicom", reference_nm_path=nm_path)
    ds = read_slices(folder)[0]
    assert ds.Units == "CNTS"
    for keyword in ("StudyDate", "StudyTime", "AcquisitionDate", "AcquisitionTime",
                    "PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert keyword in ds and ds[keyword].value in ("", None)
    assert (ds.SeriesDate, ds.SeriesTime) == (ds.InstanceCreationDate, ds.InstanceCreationTime)  # Type 1: never empty
    assert "RadionuclideTotalDose" not in ds.RadiopharmaceuticalInformationSequence[0]


def test_dicom_dates_come_from_metadata_when_the_nm_has_none(tmp_path):
    nm_path = reference_nm(tmp_path / "nm.dcm", dated=False)
    metadata = {"acquisition_datetime": "2024-03-01T10:30:12", "acquisition_duration_s": 1500,
                "decay_correction": "START", "decay_factor": 1.02, "corrections": ["attenuation"]}
    ds = read_slices(write_dicom_series(ramp_volume(), tmp_path / "dicom", reference_nm_path=nm_path, metadata=metadata))[0]
    for name in ("Study", "Series", "Acquisition"):
        assert (ds[f"{name}Date"].value, ds[f"{name}Time"].value) == ("20240301", "103012")
    assert ds.ActualFrameDuration == 1500000
    assert list(ds.CorrectedImage) == ["ATTN", "DECY"]
    assert ds.DecayCorrection == "START" and float(ds.DecayFactor) == 1.02


def test_dicom_from_the_real_deidentified_study(tmp_path, real_study):
    nm = pydicom.dcmread(real_study["nm"], stop_before_pixels=True)
    assert nm.StudyDate == "" and nm.AcquisitionDate == ""
    volume = ramp_volume()
    folder = write_dicom_series(volume, tmp_path / "dicom", reference_nm_path=real_study["nm"],
                                metadata={"acquisition_datetime": "2020-12-14T07:46:09"})
    ds = read_slices(folder)[0]
    assert ds.StudyInstanceUID == nm.StudyInstanceUID and ds.FrameOfReferenceUID == nm.FrameOfReferenceUID
    assert (ds.AcquisitionDate, ds.AcquisitionTime) == ("20201214", "074609")
    assert ds.PatientName == "" and ds.Manufacturer == "SelfSupervisedSPECT"
    assert ds.ActualFrameDuration == 60 * 25000
    assert np.abs(read_dicom_series(folder).array - volume.array).max() < 1e-3 * volume.array.max()


def test_dicom_series_number_follows_the_creation_time(tmp_path):
    """Several reconstructions of one study get their own numbers, in the order they were made."""
    ds = read_slices(write_dicom_series(ramp_volume(), tmp_path / "dicom"))[0]
    created = dt.datetime.strptime(ds.InstanceCreationDate + ds.InstanceCreationTime, "%Y%m%d%H%M%S")
    assert ds.SeriesNumber == int(created.strftime("%j%H%M%S"))
    given = read_slices(write_dicom_series(ramp_volume(), tmp_path / "given", series_number=7))[0]
    assert given.SeriesNumber == 7


def test_dicom_states_the_nms_dose_in_becquerel(tmp_path):
    """The NM module states RadionuclideTotalDose in MBq, the PET Isotope module in Bq."""
    nm_path = reference_nm(tmp_path / "nm.dcm", dated=True)
    nm = pydicom.dcmread(nm_path)
    drug = Dataset()
    drug.RadionuclideTotalDose = "7400"
    nm.RadiopharmaceuticalInformationSequence = [drug]
    nm.save_as(nm_path, enforce_file_format=True)
    ds = read_slices(write_dicom_series(ramp_volume(), tmp_path / "dicom", reference_nm_path=nm_path))[0]
    assert float(ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose) == pytest.approx(7.4e9)


def test_dicom_lies_in_the_frame_it_is_given(tmp_path):
    """The image is on the CT's grid: it takes the CT's Frame of Reference when the NM has none."""
    nm_path = reference_nm(tmp_path / "nm.dcm", dated=False)
    nm = pydicom.dcmread(nm_path)
    del nm.FrameOfReferenceUID
    nm.save_as(nm_path, enforce_file_format=True)
    ct_frame = generate_uid()
    ds = read_slices(write_dicom_series(ramp_volume(), tmp_path / "dicom", reference_nm_path=nm_path,
                                        metadata={"frame_of_reference_uid": ct_frame}))[0]
    assert ds.FrameOfReferenceUID == ct_frame


def test_dicom_without_reference_invents_nothing(tmp_path):
    ds = read_slices(write_dicom_series(ramp_volume(), tmp_path / "dicom"))[0]
    assert ds.StudyDate == "" and ds.AcquisitionTime == "" and ds.PatientID == ""
    assert ds.ActualFrameDuration is None
    assert ds.StudyInstanceUID and ds.FrameOfReferenceUID


@pytest.mark.parametrize(
    "volume_unit, metadata",
    [("MBq", {}), ("Bq/mL", {"injected_dose": 1}), ("Bq/mL", {"corrections": ["psf"]}),
     ("Bq/mL", {"radionuclide": "Tc99m"}), ("Bq/mL", {"decay_correction": "ADMIN"})],
)
def test_dicom_rejects_bad_input_before_writing(tmp_path, volume_unit, metadata):
    with pytest.raises(SSPECTError):
        write_dicom_series(ramp_volume(unit=volume_unit), tmp_path / "dicom", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_dicom_rejects_non_finite_values(tmp_path):
    volume = ramp_volume()
    volume.array[0, 0, 0] = np.nan
    with pytest.raises(SSPECTError, match="NaN"):
        write_dicom_series(volume, tmp_path / "dicom")
    assert list(tmp_path.iterdir()) == []


def test_dicom_refuses_an_existing_folder_unless_overwrite(tmp_path):
    folder = write_dicom_series(ramp_volume(), tmp_path / "dicom")
    before = sorted(p.read_bytes() for p in folder.iterdir())
    with pytest.raises(SSPECTError, match="already exists"):
        write_dicom_series(ramp_volume(), folder)
    assert sorted(p.read_bytes() for p in folder.iterdir()) == before
    write_dicom_series(ramp_volume(unit="counts"), folder, overwrite=True)
    assert {ds.Units for ds in read_slices(folder)} == {"CNTS"}
    assert hidden_leftovers(tmp_path) == []


def test_dicom_failure_midway_leaves_no_folder(tmp_path, monkeypatch):
    original_save = pydicom.Dataset.save_as
    written = []

    def save_then_fail(self, filename, **kwargs):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(filename)
        original_save(self, filename, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(ramp_volume(), tmp_path / "dicom")
    assert len(written) == 3
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic writes


def test_atomic_path_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "result.json"
    write_json_atomic(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text('{"version": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_path_keeps_extensions_and_hides_the_partial_file(tmp_path):
    with atomic_path(tmp_path / "recon.nii.gz") as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".recon.nii.gz.partial-") and temporary.name.endswith(".nii.gz")
        temporary.write_text("done")
    assert (tmp_path / "recon.nii.gz").read_text() == "done"


def test_json_that_cannot_be_serialised_touches_nothing(tmp_path):
    target = write_text_atomic(tmp_path / "events.json", "old\n")
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["events.json"]


def test_nrrd_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    target = write_nrrd(ramp_volume(), tmp_path / "recon.nrrd")
    before = target.read_bytes()

    def fail(self, image):
        Path(self.GetFileName()).write_bytes(b"NRRD0004\ntruncated")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", fail)
    with pytest.raises(SSPECTError, match="killed mid-write"):
        write_nrrd(ramp_volume(unit="counts"), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["recon.nrrd"]


def test_atomic_directory_failure_keeps_the_previous_folder(tmp_path):
    folder = tmp_path / "out"
    with atomic_directory(folder) as temporary:
        (temporary / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(folder, overwrite=True) as temporary:
            (temporary / "a.txt").write_text("new")
            raise RuntimeError("killed mid-write")
    assert (folder / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_accepts_an_existing_empty_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with atomic_directory(folder) as temporary:
        (temporary / "a.txt").write_text("new")
    assert (folder / "a.txt").read_text() == "new"


def test_atomic_directory_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SSPECTError, match="is a file"):
        with atomic_directory(tmp_path / "out", overwrite=True):
            pass
