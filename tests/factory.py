"""Small synthetic DICOM instances for tests (Vietnamese names, UTF-8)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

TEST_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root
KEY_OBJECT_SELECTION_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Spec:
    """What a generated instance should contain; defaults make a valid 8x8 CT slice."""

    patient_name: str = "Nguyễn^Văn An"
    patient_id: str = "BN0001"
    birth_date: str = "19800101"
    sex: str = "M"
    study_uid: str = field(default_factory=lambda: generate_uid(TEST_ROOT))
    series_uid: str = field(default_factory=lambda: generate_uid(TEST_ROOT))
    sop_uid: str = field(default_factory=lambda: generate_uid(TEST_ROOT))
    sop_class: str = CTImageStorage
    modality: str = "CT"
    study_date: str = "20240315"
    study_time: str = "101530"
    accession: str = "ACC0001"
    study_description: str = "CT bụng có cản quang"
    series_description: str = "Bụng 5mm"
    series_number: int = 1
    instance_number: int = 1
    referring: str = "Trần^Thị Bình"
    rows: int = 8
    columns: int = 8
    frames: int = 1
    charset: str = "ISO_IR 192"
    extra: dict = field(default_factory=dict)


def dataset(spec: Spec | None = None) -> Dataset:
    spec = spec or Spec()
    ds = Dataset()
    ds.SpecificCharacterSet = spec.charset
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = spec.sop_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.Modality = spec.modality
    ds.ReferringPhysicianName = spec.referring
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = spec.instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if spec.frames > 1:
        ds.NumberOfFrames = spec.frames
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    pixels = (np.arange(spec.rows * spec.columns * spec.frames, dtype=np.uint16) % 4096)
    ds.PixelData = pixels.tobytes()
    return ds


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds = ds.copy()
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def instance(spec: Spec | None = None, **overrides) -> bytes:
    """A Part 10 CT instance; keyword arguments override ``Spec`` fields."""
    spec = spec or Spec(**overrides)
    return part10(dataset(spec))


def ct_series(spec: Spec, slices: int, size: int = 128) -> list[bytes]:
    """A CT series whose slices differ (a disc growing from slice to slice), stackable:
    positions, orientation, spacing, window and rescale set like a scanner's."""
    series = []
    frame_of_reference = generate_uid(TEST_ROOT)
    yy, xx = np.mgrid[0:size, 0:size]
    for n in range(slices):
        ds = dataset(Spec(**{**spec.__dict__, "sop_uid": generate_uid(TEST_ROOT),
                             "instance_number": n + 1, "rows": size, "columns": size}))
        disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 12 + 2 * n) ** 2
        pixels = np.where(disc, 1024 + 60, 24).astype(np.uint16)  # 60 HU inside, air outside
        ds.PixelData = pixels.tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.ImagePositionPatient = [-size / 2, -size / 2, -2.5 * n]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.SliceThickness = 2.5
        ds.FrameOfReferenceUID = frame_of_reference
        series.append(part10(ds))
    return series


def key_object_selection(study: Spec, content: list[Dataset], evidence: list[Dataset],
                         frames: list[int] | None = None) -> bytes:
    """A minimal KOS: ``content`` as its IMAGE items (in that order), ``evidence`` as its
    Current Requested Procedure Evidence (which may name images the study does not hold);
    ``frames``: the frames of each image that are meant."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KEY_OBJECT_SELECTION_STORAGE
    ds.SOPInstanceUID = Spec().sop_uid
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = Spec().series_uid
    ds.Modality = "KO"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.ContentDate, ds.ContentTime = "20240315", "110000"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "113000", "DCM"
    title.CodeMeaning = "Of Interest"
    ds.ConceptNameCodeSequence = [title]

    def sop_reference(image: Dataset) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        if frames:
            item.ReferencedFrameNumber = frames
        return item

    items = []
    for image in content:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = [sop_reference(image)]
        items.append(item)
    ds.ContentSequence = items
    series: dict[str, list[Dataset]] = {}
    for image in evidence:
        series.setdefault(image.SeriesInstanceUID, []).append(sop_reference(image))
    referenced = []
    for series_uid, references in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = references
        referenced.append(item)
    study_item = Dataset()
    study_item.StudyInstanceUID = study.study_uid
    study_item.ReferencedSeriesSequence = referenced
    ds.CurrentRequestedProcedureEvidenceSequence = [study_item]
    return part10(ds)
