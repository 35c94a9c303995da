"""Study exports: DICOM media ZIP (DICOMDIR, files unchanged) and JPEG ZIP (one per frame)."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import BasicTextSRStorage, generate_uid

from dicomweb.wado import DECODE_SLOTS
from storage.archive import Archive, open_archive
from storage.attributes import Level
from storage.errors import NotFound
from storage.query import Query, find
from tests.factory import TEST_ROOT, Spec, dataset, instance, part10
from viewer import export
from viewer.export import ExportSummary, safe_name, write_dicom_zip, write_jpeg_zip

PATIENT = "Nguyễn^Văn An"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    archive = open_archive(f"sqlite:///{tmp_path}/i.sqlite", f"file://{tmp_path}/blobs")
    yield archive
    archive.close()


def _specs(study_uid: str, **series2) -> list[Spec]:
    """Two series: three single-frame slices (numbers 1-3) and one 3-frame instance."""
    first, second = generate_uid(TEST_ROOT), generate_uid(TEST_ROOT)
    common = {"study_uid": study_uid, "patient_name": PATIENT}
    slices = [Spec(**common, series_uid=first, series_number=1, series_description="Bụng 5mm",
                   instance_number=n) for n in (3, 1, 2)]
    cine = Spec(**common, series_uid=second, series_number=2, frames=3,
                **{"series_description": "Phổi 1mm", **series2})
    return [cine, *slices]  # stored out of display order on purpose


@pytest.fixture
def study(archive: Archive) -> tuple[str, list[Spec]]:
    uid = generate_uid(TEST_ROOT)
    specs = _specs(uid)
    for spec in specs:
        archive.store(instance(spec))
    return uid, specs


def _stored(archive: Archive, study_uid: str) -> dict[str, bytes]:
    rows = find(archive.index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid}))
    return {row["SOPInstanceUID"]: archive.blobs.get(row["_blob_key"]) for row in rows}


def _unzipped(data: bytes, folder: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        zf.extractall(folder)
    return folder


class _WriteOnly(io.RawIOBase):
    def __init__(self) -> None:
        self.data = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.data.write(b)


def _file_id(item) -> str:
    """A DICOMDIR record's Referenced File ID as a ZIP entry name."""
    return "/".join(item.ReferencedFileID)


def _report(study_uid: str, *, leave_out: tuple[str, ...] = ()) -> bytes:
    """A Basic Text SR (no pixels) in the study, without the attributes ``leave_out`` names."""
    ds = dataset(Spec(study_uid=study_uid, sop_class=BasicTextSRStorage, modality="SR",
                      series_number=9, series_description="Kết quả"))
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "PixelData"):
        delattr(ds, keyword)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20240315", "103000"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "18748-4", "LN", "Kết luận"
    ds.ConceptNameCodeSequence = [code]
    for keyword in leave_out:
        delattr(ds, keyword)
    return part10(ds)


class _CountingBlobs:
    """The archive's blob store, counting the blobs opened for reading."""

    def __init__(self, blobs) -> None:
        self._blobs = blobs
        self.opened: list[str] = []

    def open_chunks(self, key: str, *args, **kwargs):
        self.opened.append(key)
        return self._blobs.open_chunks(key, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._blobs, name)


# ---------------------------------------------------------------------------- DICOM media


def test_dicom_zip_has_dicomdir_listing_every_instance_with_vietnamese_name(
        archive, study, tmp_path):
    uid, specs = study
    out = io.BytesIO()

    summary = write_dicom_zip(archive, uid, out)

    assert summary == ExportSummary(uid, 4, summary.bytes, ())
    root = _unzipped(out.getvalue(), tmp_path / "media")
    file_set = FileSet(root / "DICOMDIR")
    assert len(file_set) == 4
    by_uid = {item.SOPInstanceUID: item for item in file_set}
    assert set(by_uid) == {spec.sop_uid for spec in specs}
    for spec in specs:
        item = by_uid[spec.sop_uid]
        assert item.PatientName == PATIENT
        assert item.StudyInstanceUID == uid
        assert item.SeriesInstanceUID == spec.series_uid
        assert _file_id(item).startswith("DICOM/PT")
        assert item.load().SOPInstanceUID == spec.sop_uid
    dicomdir = dcmread(root / "DICOMDIR")
    patients = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert [str(p.PatientName) for p in patients] == [PATIENT]
    assert patients[0].SpecificCharacterSet == "ISO_IR 192"
    # One record per patient, study and series, each image under its own series (the export
    # files later images of a series under the record the first one made).
    kinds = [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence]
    assert (kinds.count("STUDY"), kinds.count("SERIES")) == (1, 2)
    series_of = {node.key: [child.instance.SOPInstanceUID for child in node.children]
                 for node in file_set._tree if node.record_type == "SERIES"}
    assert sorted(map(sorted, series_of.values())) == sorted(
        sorted(spec.sop_uid for spec in specs if spec.series_uid == series_uid)
        for series_uid in {spec.series_uid for spec in specs})


def test_dicom_zip_holds_the_stored_files_byte_for_byte_in_display_order(
        archive, study, tmp_path):
    uid, specs = study
    out = io.BytesIO()

    write_dicom_zip(archive, uid, out)

    stored = _stored(archive, uid)
    file_set = FileSet(_unzipped(out.getvalue(), tmp_path / "media") / "DICOMDIR")
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        # The files first, as they are read; the DICOMDIR, which needs them all, last.
        assert names[-2:] == ["README.txt", "DICOMDIR"]
        files = {item.SOPInstanceUID: zf.read(_file_id(item)) for item in file_set}
        assert files == stored
        assert len(names) == 2 + len(stored)  # nothing else in the ZIP
    assert names[:-2] == [f"DICOM/PT000000/ST000000/SE00000{series}/IM00000{image}"
                          for series, image in ((0, 0), (0, 1), (0, 2), (1, 0))]
    # Series 1 before series 2, its slices by Instance Number, whatever the order of arrival.
    by_file = {_file_id(item): item.SOPInstanceUID for item in file_set}
    slices = sorted(specs[1:], key=lambda s: s.instance_number)
    assert [by_file[name] for name in names[:-2]] == [s.sop_uid for s in [*slices, specs[0]]]


def test_dicom_zip_streams_into_a_write_only_stream(archive, study):
    # An HTTP response body cannot seek back: the ZIP must still be complete.
    uid, _ = study
    sink = _WriteOnly()

    summary = write_dicom_zip(archive, uid, sink)

    with zipfile.ZipFile(io.BytesIO(sink.data.getvalue())) as zf:
        assert zf.testzip() is None
        assert len(zf.namelist()) == 2 + summary.files


def test_dicom_zip_readme_speaks_vietnamese_and_english(archive, study):
    uid, _ = study
    out = io.BytesIO()

    write_dicom_zip(archive, uid, out)

    text = zipfile.ZipFile(out).read("README.txt").decode("utf-8-sig")
    assert "Nguyễn Văn An" in text and "15/03/2024" in text
    assert "DICOMDIR" in text and "Giải nén" in text and "Unzip" in text


def test_dicom_zip_to_a_path_streams_and_survives_empty_type2_attributes(archive, tmp_path):
    # Study ID, Series Number and Instance Number are Type 2: modalities leave them empty,
    # yet the DICOMDIR records need values.
    uid = generate_uid(TEST_ROOT)
    data = instance(Spec(study_uid=uid, extra={"StudyID": "", "SeriesNumber": None,
                                              "InstanceNumber": None}))
    archive.store(data)
    archive.store(_report(uid))
    target = tmp_path / "out.zip"

    summary = write_dicom_zip(archive, uid, target)

    assert summary.files == 2 and not summary.skipped
    file_set = FileSet(_unzipped(target.read_bytes(), tmp_path / "media") / "DICOMDIR")
    assert sorted(item.DirectoryRecordType for item in file_set) == ["IMAGE", "SR DOCUMENT"]
    assert set(_stored(archive, uid).values()) == {
        Path(item.path).read_bytes() for item in file_set}


def test_dicom_zip_is_made_as_it_is_read_and_stops_when_abandoned(archive, study,
                                                                  monkeypatch):
    # The whole ZIP used to be written to /tmp before its first byte was sent, and a client
    # that left did not stop the work.
    uid, _ = study
    monkeypatch.setattr(export, "_PIECE", 1)  # hand on every write, however small
    counting = _CountingBlobs(archive.blobs)
    monkeypatch.setattr(archive, "blobs", counting)

    chunks = export.dicom_zip_chunks(archive, uid)
    first = next(chunks)

    assert first.startswith(b"PK\x03\x04")  # a local file header: a file is on its way
    assert len(counting.opened) == 1  # before the other instances are read
    chunks.close()  # the client left
    assert len(counting.opened) == 1


def test_an_instance_without_a_dicomdir_record_stays_in_the_zip_and_the_readme_says_so(
        archive, tmp_path):
    # A report without Completion Flag (or another record key) was left out of the ZIP,
    # silently: "the instances as stored" were not all there.
    uid = generate_uid(TEST_ROOT)
    archive.store(instance(Spec(study_uid=uid)))
    archive.store(_report(uid, leave_out=("CompletionFlag", "VerificationFlag")))
    archive.store(_report(uid, leave_out=("ConceptNameCodeSequence",)))  # no record possible
    out = io.BytesIO()

    summary = write_dicom_zip(archive, uid, out)

    stored = _stored(archive, uid)
    assert summary.files == 3 and not summary.skipped
    [unlisted] = summary.unlisted
    root = _unzipped(out.getvalue(), tmp_path / "media")
    with zipfile.ZipFile(out) as zf:
        in_zip = {zf.read(n) for n in zf.namelist() if n.startswith("DICOM/")}
        readme = zf.read("README.txt").decode("utf-8-sig")
    assert in_zip == set(stored.values())  # every instance, as stored
    file_set = FileSet(root / "DICOMDIR")
    records = {item.SOPInstanceUID: item for item in file_set}
    assert len(records) == 2 and unlisted.sop_instance_uid not in records
    report = next(item for item in records.values() if item.DirectoryRecordType == "SR DOCUMENT")
    assert report.CompletionFlag == "PARTIAL" and report.VerificationFlag == "UNVERIFIED"
    assert unlisted.file_id in readme and unlisted.sop_instance_uid in readme
    assert "Not listed in the DICOMDIR" in readme
    assert (root / unlisted.file_id).read_bytes() == stored[unlisted.sop_instance_uid]


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="DCMTK's dcmdump is not installed")
def test_dcmtk_reads_the_dicomdir_and_every_file(archive, study, tmp_path):
    uid, _ = study
    out = io.BytesIO()
    write_dicom_zip(archive, uid, out)
    root = _unzipped(out.getvalue(), tmp_path / "media")

    dicomdir = subprocess.run(["dcmdump", "+U8", str(root / "DICOMDIR")],
                              capture_output=True, text=True)
    files = subprocess.run(["dcmdump", "-q", "+sd", "+r", str(root / "DICOM")],
                           capture_output=True, text=True)

    assert dicomdir.returncode == 0, dicomdir.stderr
    assert "E:" not in dicomdir.stderr
    assert "Nguyễn^Văn An" in dicomdir.stdout
    # DCMTK follows the record offsets and names each record's file: all four, in order.
    assert dicomdir.stdout.count('refFileID="DICOM\\PT000000\\ST000000\\SE0000') == 4
    assert files.returncode == 0 and "E:" not in files.stderr, files.stderr


# ---------------------------------------------------------------------------- JPEG pictures


def test_jpeg_zip_has_one_picture_per_frame_named_in_display_order(archive, study):
    uid, _ = study
    archive.store(_report(uid))
    out = io.BytesIO()

    summary = write_jpeg_zip(archive, uid, out, quality=80)

    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        pictures = [Image.open(io.BytesIO(zf.read(name))) for name in names]
    assert names == ["S001 Bụng 5mm/IM0001.jpg", "S001 Bụng 5mm/IM0002.jpg",
                     "S001 Bụng 5mm/IM0003.jpg", "S002 Phổi 1mm/IM0001-F0001.jpg",
                     "S002 Phổi 1mm/IM0001-F0002.jpg", "S002 Phổi 1mm/IM0001-F0003.jpg"]
    assert all(p.format == "JPEG" and p.size == (8, 8) for p in pictures)
    for picture in pictures:
        picture.load()  # decodes the whole image
    assert summary.files == 6
    assert [s.reason for s in summary.skipped] == ["not an image"]  # the report


def test_jpeg_zip_reads_a_multiframe_instance_once_and_decodes_in_the_shared_slots(
        archive, monkeypatch):
    # Each frame used to parse the whole instance again (300 frames of 157 MB: 40 s,
    # +250 MB), outside the decode slots that bound the server's decoding.
    uid = generate_uid(TEST_ROOT)
    archive.store(instance(Spec(study_uid=uid, frames=30, rows=16, columns=16)))
    parses = []
    real_read_partial = pydicom.filereader.read_partial
    monkeypatch.setattr(pydicom.filereader, "read_partial",
                        lambda *a, **k: parses.append(1) or real_read_partial(*a, **k))
    for _ in range(DECODE_SLOTS._initial_value):  # every slot taken by other requests
        DECODE_SLOTS.acquire()
    done = threading.Event()
    out = io.BytesIO()
    worker = threading.Thread(target=lambda: (write_jpeg_zip(archive, uid, out), done.set()))
    try:
        worker.start()
        assert not done.wait(1.0), "the export decoded without a decode slot"
    finally:
        for _ in range(DECODE_SLOTS._initial_value):
            DECODE_SLOTS.release()
    worker.join(30)

    assert done.is_set()
    assert len(zipfile.ZipFile(out).namelist()) == 30
    assert len(parses) == 1  # one reading of the instance for its 30 frames


def test_series_description_cannot_leave_its_folder(archive, tmp_path):
    uid = generate_uid(TEST_ROOT)
    for spec in _specs(uid, series_description="../../..\\x: <Ngực>|*?\x00 .."):
        archive.store(instance(spec))
    out = io.BytesIO()

    write_jpeg_zip(archive, uid, out)

    names = zipfile.ZipFile(out).namelist()
    folders = {PurePosixPath(name).parts[0] for name in names}
    assert folders == {"S001 Bụng 5mm", "S002 x Ngực"}
    assert all(len(PurePosixPath(name).parts) == 2 for name in names)
    assert not any(c in name for name in names for c in '\\:*?"<>|\x00')


def test_safe_name_keeps_vietnamese_and_drops_what_file_systems_refuse():
    assert safe_name("  Bụng / Ngực: CT*?  ") == "Bụng Ngực CT"
    assert safe_name("Pho\u0302\u0309i") == "Phổi"  # decomposed input comes out NFC
    assert safe_name("..") == "" and safe_name("a\u202eb") == "a b"
    assert len(safe_name("x" * 500)) == 60


# ---------------------------------------------------------------------------- unknown study


@pytest.mark.parametrize("export", [write_dicom_zip, write_jpeg_zip])
@pytest.mark.parametrize("study_uid", ["1.2.3.999", "*", ""])
def test_unknown_study_is_not_found_and_writes_nothing(archive, study, tmp_path, export,
                                                       study_uid):
    target = tmp_path / "out.zip"

    with pytest.raises(NotFound):
        export(archive, study_uid, target)

    assert not target.exists()
