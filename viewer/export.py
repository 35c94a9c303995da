"""Study exports people take away: a DICOM media ZIP with a DICOMDIR, or a ZIP of JPEGs.

* ``dicom_zip_chunks`` / ``write_dicom_zip``: the study's instances exactly as stored (bytes
  unchanged), laid out as PS3.10/PS3.11 General Purpose media (files under
  ``DICOM/PT000000/ST000000/SE000000/IM000000``, ``DICOMDIR`` at the root) plus a bilingual
  ``README.txt``. Unzipped, it can be burnt to a CD or opened by any DICOM viewer. The
  DICOMDIR records come from each instance's header (pydicom's record makers); they carry its
  Specific Character Set, so Vietnamese names read correctly. An instance no record can be
  made for stays in the ZIP and the README lists it.
* ``jpeg_zip_chunks`` / ``write_jpeg_zip``: every frame of every image instance as a JPEG with
  the file's default window, in display order: ``S001 Bụng 5mm/IM0001.jpg`` (series number
  and description, instance number), for patients who have no DICOM viewer.

Both are made as they are sent: the ZIP is written to a stream that cannot seek (entries with
data descriptors), instance by instance, and handed on in pieces, so the first byte leaves at
once, memory stays bounded whatever the study's size (about one chunk of a blob, the
directory records, and instances up to ``SPOOL_IN_MEMORY``; bigger ones pass through one
temporary file at a time), and a client that leaves stops the work at the next piece. The
DICOMDIR needs every record, so it comes last, after the files and the README: readers find
entries through the ZIP's central directory, wherever they are. Entry names never come from
patient data unchecked, so a crafted series description cannot write outside the ZIP's
folders. Auditing the export is the caller's job.

``render_frames`` renders frames of one instance from one reading of it, a frame at a time,
each in a ``DECODE_SLOTS`` slot: the JPEG export and the film sheets use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileSet, RecordNode
from pydicom.pixels import iter_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomweb import render
from dicomweb.render import CannotRender, RenderOptions
from dicomweb.slots import DECODE_SLOTS
from dicomweb.transcode import UNCOMPRESSED
from storage.archive import Archive
from storage.attributes import Level
from storage.errors import NotFound, StorageUnavailable
from storage.names import display_date, display_person_name
from storage.parsing import is_valid_uid
from storage.query import Query, find

log = logging.getLogger(__name__)

MEDIA_FOLDER = "DICOM"  # File IDs are DICOM\PT000000\ST000000\SE000000\IM000000
# An instance up to this size is held in memory while it is exported; a bigger one goes
# through a temporary file (its header is read from it, or its frames decoded one by one).
SPOOL_IN_MEMORY = 16 * 1024 * 1024
# Bytes gathered before a piece of the ZIP is handed on (fewer, larger writes to the client).
_PIECE = 256 * 1024
_NAME_LIMIT = 60  # characters of a series description kept in a folder name
_NOT_IN_NAMES = re.compile(r'[\\/:*?"<>|]')  # forbidden on Windows, or path separators
# Invented values for directory-record keys the instance leaves empty (the DICOMDIR needs them
# and real data often lacks them), as DCMTK's ``dcmmkdir --invent`` does. Only the DICOMDIR
# gets them; the stored files are never changed.
_INVENTED = {"PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000",
             "StudyID": "1", "Modality": "OT"}
# Keys of the document records (SR, key objects, presentation states) an instance may lack:
# an unknown completion is not a complete report, an unknown verification not a verified one.
_INVENTED_DOCUMENT = {"CompletionFlag": "PARTIAL", "VerificationFlag": "UNVERIFIED",
                      "ContentLabel": "UNNAMED"}

Output = BinaryIO | str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class SkippedInstance:
    """An instance left out of an export (or of its DICOMDIR), and why (safe to log: no
    patient data)."""

    sop_instance_uid: str
    reason: str
    file_id: str = ""  # where it is in the ZIP, when it is there


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    study_instance_uid: str
    files: int  # DICOM instances, or JPEG images (one per frame)
    bytes: int  # total size of those files before ZIP compression
    skipped: tuple[SkippedInstance, ...] = ()  # left out of the ZIP
    unlisted: tuple[SkippedInstance, ...] = ()  # in the ZIP, but without a DICOMDIR record


# ---------------------------------------------------------------------------- DICOM media


def write_dicom_zip(archive: Archive, study_uid: str, out: Output) -> ExportSummary:
    """Write the study as a ZIP of DICOM media (stored files unchanged, README, DICOMDIR).

    Raises ``NotFound`` for an unknown study (a file at ``out`` is then removed) and
    ``StorageUnavailable`` when a blob cannot be read."""
    return _write(dicom_zip_chunks(archive, study_uid), out)


def dicom_zip_chunks(archive: Archive, study_uid: str,
                     rows: list[dict[str, Any]] | None = None
                     ) -> Generator[bytes, None, ExportSummary]:
    """The DICOM media ZIP of a study, piece by piece, as it is made (see the module).

    ``rows``: the study's instances (``study_instances``), when the caller has them already.
    Raises ``NotFound`` for an unknown study before the first piece."""
    rows = study_instances(archive, study_uid) if rows is None else rows
    sink = _Sink()
    directory = _Directory()
    unlisted: list[SkippedInstance] = []
    total = 0
    with zipfile.ZipFile(sink, "w", allowZip64=True) as zf:
        for file_id, row in _media_layout(rows):
            header = yield from _stream_instance(archive, row, zf, file_id, sink)
            total += row["_size"] or 0
            reason = directory.add(header, file_id)
            if reason:
                log.warning("export of study %s: instance %s has no DICOMDIR record: %s",
                            study_uid, row["SOPInstanceUID"], reason)
                unlisted.append(SkippedInstance(row["SOPInstanceUID"], reason, file_id))
        zf.writestr("README.txt", _readme(rows[0], len(rows), unlisted), zipfile.ZIP_DEFLATED)
        if directory.records:
            zf.writestr("DICOMDIR", directory.encode(), zipfile.ZIP_DEFLATED, 6)
    yield from sink.pieces(0)  # the central directory
    return ExportSummary(study_uid, len(rows), total, (), tuple(unlisted))


def _media_layout(rows: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(File ID with "/", row) of each instance: series by series in display order, as
    pydicom would number them (one patient and one study)."""
    series_index = -1
    image_index = 0
    previous = None
    for row in rows:
        if row["SeriesInstanceUID"] != previous:
            previous, series_index, image_index = row["SeriesInstanceUID"], series_index + 1, 0
        yield (f"{MEDIA_FOLDER}/PT000000/ST000000/SE{series_index:06d}/IM{image_index:06d}",
               row)
        image_index += 1


def _stream_instance(archive: Archive, row: dict[str, Any], zf: zipfile.ZipFile, name: str,
                     sink: _Sink) -> Generator[bytes, None, Dataset | Exception]:
    """Copy one stored instance into the ZIP entry ``name`` as it is read; its header (or why
    it could not be read) for the DICOMDIR."""
    native = (row["_transfer_syntax_uid"] or "") in UNCOMPRESSED
    # Pixel data already compressed gains nothing from deflate; native pixels do.
    info = _entry(name, zipfile.ZIP_DEFLATED if native else zipfile.ZIP_STORED, row["_size"])
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as copy:
        with zf.open(info, "w") as entry:
            for chunk in blob_chunks(archive, row["_blob_key"]):
                entry.write(chunk)
                copy.write(chunk)
                yield from sink.pieces(_PIECE)
        copy.seek(0)
        try:
            return dcmread(copy, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable header: the file stays
            return exc


def _entry(name: str, compression: int, size: int | None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, time.localtime()[:6])
    info.compress_type = compression
    info.file_size = size or 0  # so that zipfile knows whether the entry needs ZIP64
    if compression == zipfile.ZIP_DEFLATED:
        # Level 1: nearly all of deflate's gain on pixel data, several times faster. (The
        # attribute is ``compress_level`` from Python 3.13.)
        setattr(info, "compress_level" if hasattr(info, "compress_level") else
                "_compresslevel", 1)
    return info


class _Directory:
    """The DICOMDIR of an export: pydicom's record tree, written without pydicom's staging.

    ``FileSet.add`` compares a new instance with every instance already added, and its record
    tree compares it with every image of its series: O(n²) over a study (80 s for 3,000
    instances, pydicom 3.0), and it stages a copy of each header on disk. ``add`` makes the
    records with pydicom's own record makers, hangs each image record under its series'
    record, remembered by Series Instance UID, and sets its File ID to where the export put
    the file; ``encode`` is pydicom's DICOMDIR writer, which computes the record offsets. Uses
    pydicom internals (``_recordify``, ``_tree``, ``_write_dicomdir``, pydicom 3.0);
    tests/test_export.py reads the result back with pydicom and DCMTK.
    """

    def __init__(self) -> None:
        self.file_set = FileSet()
        self.records = 0
        self._series: dict[str, RecordNode] = {}

    def add(self, header: Dataset | Exception, file_id: str) -> str:
        """Give one instance (by its header) a record pointing at ``file_id``; "" when done,
        else why it has none."""
        if isinstance(header, Exception):
            return f"the header cannot be read: {header}"[:300]
        _invent_record_keys(header)
        try:
            records = list(self.file_set._recordify(header))  # highest level first
            nodes = [RecordNode(record) for record in records]
        except Exception as exc:  # noqa: BLE001 - no record type fits: the file stays
            return str(exc)[:300]
        leaf = nodes[-1]
        leaf._record.ReferencedFileID = file_id.split("/")
        series_uid = str(header.get("SeriesInstanceUID", ""))
        series = self._series.get(series_uid) if len(nodes) == 4 else None
        if series is not None:
            leaf._parent = series
            series.children.append(leaf)
        else:
            for parent, child in zip(nodes, nodes[1:], strict=False):
                child.parent = parent
            self.file_set._tree.add(leaf)  # under the existing patient and study, if any
            if len(nodes) == 4 and records[2].DirectoryRecordType == "SERIES":
                self._series[series_uid] = leaf.parent
        self.records += 1
        return ""

    def encode(self) -> bytes:
        """The DICOMDIR file (small: a few hundred bytes per instance)."""
        out = io.BytesIO()
        self.file_set._write_dicomdir(DicomFileLike(out))
        return out.getvalue()


def _invent_record_keys(header: Any) -> None:
    """Fill the directory-record keys ``header`` leaves empty (see ``_INVENTED``)."""
    for keyword, value in _INVENTED.items():
        if not header.get(keyword):
            setattr(header, keyword, value)
    # A made-up position could be mistaken for the modality's numbering; 0 reads as unknown.
    for keyword in ("SeriesNumber", "InstanceNumber"):
        if header.get(keyword) in (None, ""):
            setattr(header, keyword, 0)
    if "Rows" in header:  # an image: its record needs nothing more
        return
    for keyword, value in _INVENTED_DOCUMENT.items():
        if not header.get(keyword):
            setattr(header, keyword, value)
    # A document without its own dates is dated by its creation, else by the study.
    for prefix in ("Content", "PresentationCreation"):
        for part, invented in (("Date", "19000101"), ("Time", "000000")):
            if not header.get(prefix + part):
                setattr(header, prefix + part, header.get("InstanceCreation" + part)
                        or header.get("Study" + part) or invented)


def _readme(row: dict[str, Any], count: int, unlisted: Sequence[SkippedInstance] = ()) -> str:
    patient = display_person_name(row.get("PatientName"))
    date = display_date(row.get("StudyDate"))
    description = row.get("StudyDescription") or ""
    lines = [
        "ẢNH CHỤP DICOM / DICOM IMAGES",
        "",
        f"Bệnh nhân / Patient: {patient}",
        f"Ngày chụp / Study date: {date}",
        f"Mô tả / Description: {description}",
        f"Số ảnh / Images: {count}",
        "",
        "Tiếng Việt",
        "Thư mục này chứa ảnh chụp của bạn ở định dạng DICOM, đúng như bệnh viện lưu trữ.",
        "Giải nén toàn bộ, rồi mở tệp DICOMDIR bằng một phần mềm xem ảnh DICOM",
        "(ví dụ: RadiAnt, MicroDicom, Weasis, Horos/OsiriX). Có thể ghi nguyên thư mục",
        "đã giải nén ra đĩa CD/DVD để mang đến bệnh viện khác.",
        "",
        "English",
        "This folder holds your images in DICOM format, exactly as the hospital stores them.",
        "Unzip everything, then open the DICOMDIR file with a DICOM viewer",
        "(for example RadiAnt, MicroDicom, Weasis, Horos/OsiriX). The unzipped folder can be",
        "burnt as it is to a CD/DVD for another hospital.",
        "",
    ]
    if unlisted:
        lines += [
            "Không có trong DICOMDIR / Not listed in the DICOMDIR",
            "Các tệp sau có trong thư mục DICOM nhưng không có trong DICOMDIR; phần mềm xem ảnh",
            "mở được chúng khi mở trực tiếp từng tệp.",
            "These files are in the DICOM folder but not in the DICOMDIR; DICOM viewers open",
            "them when each file is opened directly.",
            *(f"- {item.file_id} (SOP Instance UID {item.sop_instance_uid}): {item.reason}"
              for item in unlisted),
            "",
        ]
    # A BOM and CRLF so that Notepad on older Windows shows the Vietnamese text correctly.
    return "\ufeff" + "\r\n".join(lines)


# ---------------------------------------------------------------------------- JPEG pictures


def write_jpeg_zip(archive: Archive, study_uid: str, out: Output, *,
                   quality: int = 90) -> ExportSummary:
    """Write every frame of the study's images as JPEGs, one folder per series, in display
    order (``S001 Bụng 5mm/IM0001.jpg``; frames of a multi-frame instance
    ``IM0001-F0001.jpg``).

    Instances without pixels (reports, presentation states...) and images that cannot be
    decoded are left out and listed in the summary. Raises ``NotFound`` for an unknown study.
    """
    return _write(jpeg_zip_chunks(archive, study_uid, quality=quality), out)


def jpeg_zip_chunks(archive: Archive, study_uid: str, rows: list[dict[str, Any]] | None = None,
                    *, quality: int = 90) -> Generator[bytes, None, ExportSummary]:
    """The JPEG ZIP of a study, piece by piece, as it is made (see ``write_jpeg_zip``)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality: {quality} is not between 1 and 100")
    rows = study_instances(archive, study_uid) if rows is None else rows
    options = RenderOptions(media_type="image/jpeg", quality=quality)
    sink = _Sink()
    skipped: list[SkippedInstance] = []
    files = total = 0
    with zipfile.ZipFile(sink, "w", allowZip64=True) as zf:
        for folder, named in _jpeg_layout(rows, skipped):
            for name, row in named:
                frames = row.get("NumberOfFrames") or 1
                wanted = [(index, options) for index in range(frames)]
                try:
                    for index, picture in render_frames(archive, row["_blob_key"], wanted):
                        entry = f"{name}.jpg" if frames == 1 else f"{name}-F{index + 1:04d}.jpg"
                        # JPEG does not deflate: stored entries are as small and much faster.
                        zf.writestr(f"{folder}/{entry}", picture, zipfile.ZIP_STORED)
                        files += 1
                        total += len(picture)
                        yield from sink.pieces(_PIECE)
                except CannotRender as exc:
                    skipped.append(SkippedInstance(row["SOPInstanceUID"], str(exc)))
    yield from sink.pieces(0)
    return ExportSummary(study_uid, files, total, tuple(skipped))


def _jpeg_layout(rows: list[dict[str, Any]], skipped: list[SkippedInstance]
                 ) -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """(folder, [(file name without extension, row)]) per series that has images."""
    folders: set[str] = set()
    for series_rows in _by_series(rows):
        images = []
        for row in series_rows:
            if row.get("Rows"):
                images.append(row)
            else:
                skipped.append(SkippedInstance(row["SOPInstanceUID"], "not an image"))
        if not images:
            continue
        first = images[0]
        label = safe_name(first.get("SeriesDescription") or first.get("Modality") or "")
        folder = f"S{first.get('SeriesNumber') or 0:03d} {label}".strip()
        unique, n = folder, 2
        while unique.casefold() in folders:  # two series with the same number and name
            unique, n = f"{folder} ({n})", n + 1
        folders.add(unique.casefold())
        numbers = [row.get("InstanceNumber") for row in images]
        # Instance numbers are what reports cite ("image 23"); positions stand in when the
        # numbers are missing or repeat, so that no file overwrites another.
        if not all(isinstance(n, int) and n > 0 for n in numbers) \
                or len(set(numbers)) != len(numbers):
            numbers = list(range(1, len(images) + 1))
        yield unique, [(f"IM{number:04d}", row) for number, row in zip(numbers, images,
                                                                        strict=True)]


def safe_name(text: str, limit: int = _NAME_LIMIT) -> str:
    """``text`` as one file or folder name any system accepts: no path separators, no
    characters Windows forbids, no control or format characters, no leading or trailing dots
    and spaces; Unicode NFC (Vietnamese letters kept precomposed)."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    text = " ".join(_NOT_IN_NAMES.sub(" ", text).split())
    return text[:limit].strip(" .")


# ---------------------------------------------------------------------------- frames


def render_frames(archive: Archive, blob_key: str,
                  wanted: Sequence[tuple[int, RenderOptions]]) -> Iterator[tuple[int, bytes]]:
    """(frame index, encoded picture) for each (0-based frame index, options) of ``wanted``,
    in that order, from one reading of the stored instance.

    The instance is read once (in memory up to ``SPOOL_IN_MEMORY``, else through a temporary
    file) and its frames decoded one at a time, each in a ``DECODE_SLOTS`` slot: rendering
    each frame with ``render.render_frame`` parsed the whole instance again per frame (a
    300-frame instance: 300 parses of 157 MB) outside the slots. ``CannotRender`` when the
    instance or a frame cannot be shown (the frames before it have been yielded)."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as copy:
        for chunk in blob_chunks(archive, blob_key):
            copy.write(chunk)
        copy.seek(0)
        try:
            header = dcmread(copy, stop_before_pixels=True)
            frames = int(header.get("NumberOfFrames") or 1)
        except Exception as exc:
            raise CannotRender(f"the instance cannot be read: {exc}") from exc
        for index, _ in wanted:
            if not 0 <= index < frames:
                raise CannotRender(f"frame {index + 1} does not exist ({frames} frames)")
        indices = [index for index, _ in wanted]
        everything = indices == list(range(frames))  # (compressed: decoded in one pass)
        copy.seek(0)
        if header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            source: Any = dcmread(copy)  # pydicom reads frames from a file only if inflated
        else:
            source = copy
        pixels = iter_pixels(source, indices=None if everything else indices)
        with contextlib.closing(pixels):  # (it seeks its source back when closed)
            for index, options in wanted:
                yield index, _frame_picture(header, pixels, options)


def _frame_picture(header: Dataset, pixels: Iterator[Any], options: RenderOptions) -> bytes:
    """The next frame of ``pixels`` rendered as ``render.render_frame`` renders one."""
    with DECODE_SLOTS:
        try:
            frame = next(pixels)
        except Exception as exc:  # a codec's own errors, a missing pixel data element...
            raise CannotRender(f"the pixel data cannot be decoded: {exc}") from exc
        return render.picture_of(header, frame, options)


# ---------------------------------------------------------------------------- shared


def study_instances(archive: Archive, study_uid: str) -> list[dict[str, Any]]:
    """The study's instance rows in display order; ``NotFound`` when there are none."""
    # A wildcard or a list of UIDs would match other studies: only a plain UID is looked up.
    if not is_valid_uid(study_uid):
        raise NotFound(f"no study {study_uid!r}: not a valid Study Instance UID")
    rows = find(archive.index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid}))
    if not rows:
        raise NotFound(f"no study {study_uid}")
    return [row for series_rows in _by_series(rows) for row in series_rows]


def _by_series(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by series; series by Series Number, instances by Instance Number
    (missing numbers last, then in order of arrival)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["SeriesInstanceUID"], []).append(row)

    def series_order(group: list[dict[str, Any]]) -> tuple:
        return _number_order(group[0].get("SeriesNumber"), group[0]["_series_pk"])

    ordered = sorted(groups.values(), key=series_order)
    return [sorted(group, key=lambda r: _number_order(r.get("InstanceNumber"), r["_instances_pk"]))
            for group in ordered]


def _number_order(number: int | None, pk: int) -> tuple:
    return (number is None, number or 0, pk)


def blob_chunks(archive: Archive, key: str) -> Iterator[bytes]:
    """A stored instance in chunks; ``StorageUnavailable`` when its blob is missing."""
    try:
        yield from archive.blobs.open_chunks(key)
    except KeyError:
        raise StorageUnavailable(f"the blob {key} is missing; run `pacs check`") from None


class _Sink(io.RawIOBase):
    """Where ``zipfile`` writes a ZIP that is sent as it is made: it cannot seek (so the
    entries get data descriptors), and what was written is taken out in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._size += len(data)
        return len(data)

    def pieces(self, at_least: int) -> Iterator[bytes]:
        """What was written since the last piece, once there is ``at_least`` bytes of it."""
        if self._size and self._size >= at_least:
            piece = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            yield piece


def _write(chunks: Generator[bytes, None, ExportSummary], out: Output) -> ExportSummary:
    """Drain an export's pieces into ``out``; its summary."""
    with _opened(out) as target:
        while True:
            try:
                target.write(next(chunks))
            except StopIteration as done:
                return done.value


@contextlib.contextmanager
def _opened(out: Output) -> Iterator[BinaryIO]:
    """``out`` itself, or the file at that path (removed again if the export fails)."""
    if not isinstance(out, str | os.PathLike):
        yield out
        return
    path = Path(out)
    try:
        with path.open("wb") as f:
            yield f
    except BaseException:
        path.unlink(missing_ok=True)
        raise
