"""Study exports people take away: a DICOM media ZIP with a DICOMDIR, or a ZIP of JPEGs.

* ``write_dicom_zip``: the study's instances exactly as stored (bytes unchanged), laid out as
  PS3.10/PS3.11 General Purpose media (``DICOMDIR`` at the root, files under
  ``DICOM/PT000000/ST000000/SE000000/IM000000``) plus a bilingual ``README.txt``. Unzipped, it
  can be burnt to a CD or opened by any DICOM viewer. The DICOMDIR comes from pydicom's
  ``FileSet``, built from the headers only; its records carry each instance's Specific
  Character Set, so Vietnamese names read correctly.
* ``write_jpeg_zip``: every frame of every image instance as a JPEG with the file's default
  window, in display order: ``S001 Bụng 5mm/IM0001.jpg`` (series number and description,
  instance number), for patients who have no DICOM viewer.

Both run in bounded memory whatever the study size: instances go through one at a time (the
DICOM export spools them to a temporary folder, the JPEG export holds one instance while it
renders its frames). Entry names never come from patient data unchecked, so a crafted series
description cannot write outside the ZIP's folders. Auditing the export is the caller's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileInstance, FileSet, RecordNode

from dicomweb.render import CannotRender, RenderOptions, render_frame
from dicomweb.transcode import UNCOMPRESSED
from dicomweb.wado import read_blob
from storage.archive import Archive
from storage.attributes import Level
from storage.errors import NotFound, StorageUnavailable
from storage.names import display_date, display_person_name
from storage.parsing import is_valid_uid
from storage.query import Query, find

log = logging.getLogger(__name__)

MEDIA_FOLDER = "DICOM"  # File IDs are DICOM\PT000000\ST000000\SE000000\IM000000
_NAME_LIMIT = 60  # characters of a series description kept in a folder name
_NOT_IN_NAMES = re.compile(r'[\\/:*?"<>|]')  # forbidden on Windows, or path separators
# Invented values for directory-record keys the instance leaves empty (the DICOMDIR needs them
# and real data often lacks them), as DCMTK's ``dcmmkdir --invent`` does. Only the DICOMDIR
# gets them; the stored files are never changed.
_INVENTED = {"PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000",
             "StudyID": "1", "Modality": "OT"}

Output = BinaryIO | str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class SkippedInstance:
    """An instance left out of an export, and why (safe to log: no patient data)."""

    sop_instance_uid: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    study_instance_uid: str
    files: int  # DICOM instances, or JPEG images (one per frame)
    bytes: int  # total size of those files before ZIP compression
    skipped: tuple[SkippedInstance, ...] = ()


# ---------------------------------------------------------------------------- DICOM media


def write_dicom_zip(archive: Archive, study_uid: str, out: Output) -> ExportSummary:
    """Write the study as a ZIP of DICOM media (DICOMDIR, stored files unchanged, README).

    Raises ``NotFound`` for an unknown study (before anything is written to ``out``) and
    ``StorageUnavailable`` when a blob cannot be read. Instances that cannot get a directory
    record are left out and listed in the summary.
    """
    rows = _study_instances(archive, study_uid)
    skipped: list[SkippedInstance] = []
    with tempfile.TemporaryDirectory(prefix="pacs-export-") as work:
        spool = Path(work) / "instances"
        spool.mkdir()
        directory = _Directory()
        spooled: dict[str, tuple[Path, str]] = {}  # SOP Instance UID -> (file, transfer syntax)
        for position, row in enumerate(rows):
            uid = row["SOPInstanceUID"]
            path = spool / f"{position:06d}.dcm"
            _spool_blob(archive, row["_blob_key"], path)
            try:
                header = dcmread(path, stop_before_pixels=True)
                _invent_record_keys(header)
                directory.add(header)
            except Exception as exc:  # unreadable header, or no record type fits
                log.warning("export of study %s: instance %s left out of the DICOMDIR: %s",
                            study_uid, uid, exc)
                skipped.append(SkippedInstance(uid, f"no DICOMDIR record: {exc}"))
                path.unlink()
                continue
            spooled[uid] = (path, row["_transfer_syntax_uid"] or "")
        media = Path(work) / "media"
        entries: list[tuple[str, str]] = []  # (File ID with "/", SOP Instance UID)
        if spooled:
            directory.file_set.write(media)
            entries = _put_under_media_folder(directory.file_set, media / "DICOMDIR")
        total = 0
        with _opened(out) as target, zipfile.ZipFile(target, "w", allowZip64=True) as zf:
            if entries:
                zf.write(media / "DICOMDIR", "DICOMDIR", zipfile.ZIP_DEFLATED, 6)
            zf.writestr("README.txt", _readme(rows[0], len(entries)), zipfile.ZIP_DEFLATED)
            for file_id, uid in entries:
                path, syntax = spooled[uid]
                total += path.stat().st_size
                # Pixel data already compressed gains nothing from deflate; native pixels do.
                if syntax in UNCOMPRESSED:
                    zf.write(path, file_id, zipfile.ZIP_DEFLATED, 1)
                else:
                    zf.write(path, file_id, zipfile.ZIP_STORED)
                path.unlink()  # disk use: about one copy of the study, plus the ZIP
    return ExportSummary(study_uid, len(entries), total, tuple(skipped))


class _Directory:
    """The DICOMDIR of an export: pydicom's ``FileSet``, with instances added in linear time.

    ``FileSet.add`` compares a new instance with every instance already added, and its record
    tree compares it with every image of its series: O(n²) over a study, 7 s for 1,000 small
    instances here and about 80 s for 3,000 (pydicom 3.0). An export adds each SOP Instance UID
    once (they come from the index), so ``add`` makes the records with pydicom's own record
    makers and hangs each image record under its series' record, remembered by Series Instance
    UID; File IDs and writing are pydicom's. Uses pydicom internals (``_recordify``, ``_tree``,
    ``_stage``, ``_instances``, pydicom 3.0), like ``_put_under_media_folder``; tests/test_export.py
    reads the result back with pydicom and DCMTK.
    """

    def __init__(self) -> None:
        self.file_set = FileSet()
        self._series: dict[str, RecordNode] = {}

    def add(self, header: Dataset) -> None:
        """Stage one instance (given by its header) not added before."""
        records = list(self.file_set._recordify(header))  # highest level first
        nodes = [RecordNode(record) for record in records]
        leaf = nodes[-1]
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
        instance = FileInstance(leaf)
        leaf.instance = instance
        self.file_set._stage["+"][instance.SOPInstanceUID] = instance
        self.file_set._instances.append(instance)
        instance._apply_stage("+")
        header.save_as(instance.path, enforce_file_format=True)


def _spool_blob(archive: Archive, key: str, path: Path) -> None:
    """Copy one blob to ``path`` in chunks."""
    try:
        chunks = archive.blobs.open_chunks(key)
    except KeyError:
        raise StorageUnavailable(f"the blob {key} is missing; run `pacs check`") from None
    with path.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)


def _invent_record_keys(header: Any) -> None:
    """Fill the directory-record keys ``header`` leaves empty (see ``_INVENTED``)."""
    for keyword, value in _INVENTED.items():
        if not header.get(keyword):
            setattr(header, keyword, value)
    # A made-up position could be mistaken for the modality's numbering; 0 reads as unknown.
    for keyword in ("SeriesNumber", "InstanceNumber"):
        if header.get(keyword) in (None, ""):
            setattr(header, keyword, 0)


def _put_under_media_folder(file_set: FileSet, dicomdir: Path) -> list[tuple[str, str]]:
    """Rewrite ``dicomdir`` so its File IDs start with ``DICOM\\``; the (File ID, SOP Instance
    UID) of each instance, in DICOMDIR order.

    pydicom writes File IDs relative to the root (``PT000000\\...``) and has no option for a
    folder above them, so the records are changed and the DICOMDIR encoded again: that step
    recomputes the record offsets, which a patched copy of the file would get wrong. It uses
    pydicom internals (``RecordNode._record``, ``FileSet._write_dicomdir``, pydicom 3.0);
    tests/test_export.py reads the result back with pydicom and DCMTK.
    """
    entries = []
    for instance in file_set:
        parts = [MEDIA_FOLDER, *Path(instance.FileID).parts]
        instance.node._record.ReferencedFileID = parts
        entries.append(("/".join(parts), instance.SOPInstanceUID))
    with dicomdir.open("wb") as f:
        file_set._write_dicomdir(DicomFileLike(f))
    return entries


def _readme(row: dict[str, Any], count: int) -> str:
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
    if not 1 <= quality <= 100:
        raise ValueError(f"quality: {quality} is not between 1 and 100")
    rows = _study_instances(archive, study_uid)
    options = RenderOptions(media_type="image/jpeg", quality=quality)
    skipped: list[SkippedInstance] = []
    files = total = 0
    with _opened(out) as target, zipfile.ZipFile(target, "w", allowZip64=True) as zf:
        for folder, named in _jpeg_layout(rows, skipped):
            for name, row in named:
                data = read_blob(archive, row["_blob_key"])
                frames = row.get("NumberOfFrames") or 1
                try:
                    for index in range(frames):
                        picture = render_frame(data, index, options)
                        entry = f"{name}.jpg" if frames == 1 else f"{name}-F{index + 1:04d}.jpg"
                        # JPEG does not deflate: stored entries are as small and much faster.
                        zf.writestr(f"{folder}/{entry}", picture, zipfile.ZIP_STORED)
                        files += 1
                        total += len(picture)
                except CannotRender as exc:
                    skipped.append(SkippedInstance(row["SOPInstanceUID"], str(exc)))
                del data  # before the next read: one instance in memory, not two
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


# ---------------------------------------------------------------------------- shared


def _study_instances(archive: Archive, study_uid: str) -> list[dict[str, Any]]:
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
