"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data, straight from the archive.

Instances stream from the blob store in chunks (bounded memory for any study size); metadata
comes from the DICOM JSON stored in the index, never from the files; frames are read by byte
range using the frame offsets recorded at ingest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom

from dicomweb import transcode
from dicomweb.media import (
    DICOM,
    EXPLICIT_LE,
    FRAME_MEDIA_TYPES,
    Accepted,
    NotAcceptable,
)
from dicomweb.multipart import Part
from pacs.http_input import whole_number
from storage.archive import Archive, InstanceLocation
from storage.attributes import Level
from storage.errors import NotFound, StorageUnavailable
from storage.parsing import require_uid
from storage.query import Query, find, image_instances

_BULK_URI = re.compile(r'"BulkDataURI":"bulk:(?:(\d+):(\d+)|path:([0-9A-Fa-f/]+))"')
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "OW or OB"})
_NATIVE = transcode.UNCOMPRESSED  # frames of these are the same native pixel bytes
# Decoding at once: a frame of an instance being decompressed, or an instance converted,
# rendered, searched for frames or nested bulk data by pydicom, which holds it decoded (a
# deflated one inflated, up to 256 MiB, which pydicom then copies), so a few at once could take
# gigabytes. On more, requests wait; the work is CPU-bound, so more at once than cores would not
# be faster anyway.
DECODE_SLOTS = threading.BoundedSemaphore(max(2, len(os.sched_getaffinity(0))))
# Instances up to this size are read whole, a few ahead of the one being sent; bigger ones are
# streamed in chunks (bounded memory whatever the instance).
READ_AHEAD_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """The study, series or instance a WADO-RS URL names."""

    study: str
    series: str | None = None
    instance: str | None = None

    @property
    def level(self) -> Level:
        if self.instance:
            return Level.INSTANCE
        return Level.SERIES if self.series else Level.STUDY

    def __post_init__(self) -> None:
        # One UID each: anything else would reach the matching of C-FIND and QIDO-RS, where an
        # empty value or "*" matches every study and "\\" separates a list.
        for what, uid in (("study", self.study), ("series", self.series),
                          ("instance", self.instance)):
            if uid is not None:
                require_uid(uid, f"{what} UID")

    def keys(self) -> dict[str, str]:
        keys = {"StudyInstanceUID": self.study}
        if self.series:
            keys["SeriesInstanceUID"] = self.series
        if self.instance:
            keys["SOPInstanceUID"] = self.instance
        return keys

    def describe(self) -> str:
        if self.instance:
            return f"instance {self.instance} in series {self.series} of study {self.study}"
        if self.series:
            return f"series {self.series} in study {self.study}"
        return f"study {self.study}"


def instance_rows(archive: Archive, target: Target, *, with_header: bool = False
                  ) -> list[dict[str, Any]]:
    """The index rows of every instance under ``target`` (``NotFound`` if there are none)."""
    rows = find(archive.index, Query(Level.INSTANCE, target.keys(), with_header=with_header))
    if not rows:
        raise NotFound(f"no {target.describe()}")
    return rows


def instance_url(base: str, row: dict[str, Any]) -> str:
    return (f"{base}/studies/{row['StudyInstanceUID']}/series/{row['SeriesInstanceUID']}"
            f"/instances/{row['SOPInstanceUID']}")


# ---------------------------------------------------------------------------- metadata


def metadata_json(rows: list[dict[str, Any]], base: str) -> bytes:
    """The metadata of ``rows`` as a DICOM JSON array, bulk data as URLs under ``base``."""
    parts = []
    for row in rows:
        url = instance_url(base, row)

        def bulk_url(match: re.Match, url: str = url) -> str:
            if match.group(3):
                return f'"BulkDataURI":"{url}/bulkdata/path/{match.group(3)}"'
            return f'"BulkDataURI":"{url}/bulkdata/{match.group(1)}-{match.group(2)}"'

        header = row["_header"]
        parts.append(_BULK_URI.sub(bulk_url, header) if "bulk:" in header else header)
    return ("[" + ",".join(parts) + "]").encode("utf-8")


def metadata_etag(rows: list[dict[str, Any]]) -> str:
    """A validator that changes whenever any instance, or a patient/study update, does."""
    digest = hashlib.sha1(usedforsecurity=False)
    for row in rows:
        digest.update(f"{row['_instances_pk']}:{row['_stored_at']}:"
                      f"{row.get('_studies_updated_at')}:{row.get('_patients_updated_at')};"
                      .encode())
    return f'"{digest.hexdigest()}"'


# ---------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class InstanceMedia:
    """How instances are sent: one multipart/related part each, or (one instance) a single
    Part 10 body; in transfer syntax ``syntax`` (``*``: as stored)."""

    syntax: str
    single_part: bool


def choose_instance_media(accept: list[Accepted], level: Level,
                          rows: list[dict[str, Any]]) -> InstanceMedia:
    """The representation of the instances ``rows`` (at ``level``) that ``accept`` prefers
    and this server can produce (PS3.18 10.4.4, 8.7.3).

    ``multipart/related; type="application/dicom"`` is the default, for any level; a single
    part ``application/dicom`` is only for one instance, so for a study or series it is passed
    over, and 406 if nothing else is acceptable (Table 10.4.4-1, note 3). An entry in a
    transfer syntax the instances cannot be converted to is passed over for the next one."""
    passed_over = False
    unproducible: NotAcceptable | None = None
    for entry in accept:
        if entry.media_type in ("*/*", "*") or (
                entry.is_multipart and entry.part_type in (None, DICOM, "*/*")):
            media = InstanceMedia(entry.transfer_syntax or EXPLICIT_LE, single_part=False)
        elif entry.media_type == DICOM and level is Level.INSTANCE:
            media = InstanceMedia(entry.transfer_syntax or EXPLICIT_LE, single_part=True)
        else:
            passed_over = passed_over or entry.media_type == DICOM
            continue
        try:
            check_transcodable(rows, media.syntax)
        except NotAcceptable as exc:
            unproducible = unproducible or exc
            continue
        return media
    if unproducible is not None:
        raise unproducible
    if passed_over:
        raise NotAcceptable(
            f"application/dicom is one DICOM file, for an instance only; for a "
            f'{level.name.lower()} ask for multipart/related; type="application/dicom" '
            "(optionally with transfer-syntax=UID or transfer-syntax=*)")
    raise NotAcceptable('instances are available as multipart/related; type="application/dicom"'
                        " (optionally with transfer-syntax=UID or transfer-syntax=*), and one "
                        "instance also as application/dicom")


def check_transcodable(rows: list[dict[str, Any]], syntax: str) -> None:
    if syntax == "*":
        return
    for row in rows:
        if not transcode.can_produce(row["_transfer_syntax_uid"], syntax):
            raise NotAcceptable(f"instance {row['SOPInstanceUID']} is stored as "
                                f"{row['_transfer_syntax_uid']} and cannot be converted to "
                                f"{syntax}; ask for transfer-syntax=* to get it as stored")


def instance_parts(archive: Archive, rows: list[dict[str, Any]], syntax: str
                   ) -> Iterator[Part]:
    """One multipart part per instance, converted to ``syntax`` unless it is ``*``.

    Instances sent as stored are read lazily, as the writer reaches them, in chunks. From a
    remote blob store (S3), where every instance is a request, those up to ``READ_AHEAD_LIMIT``
    bytes are read whole a few ahead instead (``Archive.read_ahead``), so the requests overlap
    with sending: a 300-slice CT series from S3 on loopback 0.92–1.05 s → 0.77–0.85 s; from
    local files it was no faster."""
    def read_whole(row: dict[str, Any]) -> bool:  # sent as stored and read ahead
        return (archive.blobs.remote and syntax in ("*", row["_transfer_syntax_uid"])
                and (row["_size"] or 0) <= READ_AHEAD_LIMIT)

    ahead = _ReadAhead(archive, [row for row in rows if read_whole(row)])
    for row in rows:
        stored = row["_transfer_syntax_uid"]
        if syntax in ("*", stored):
            chunks = (ahead.blob(row["_blob_key"]) if read_whole(row)
                      else _chunks(archive, row["_blob_key"]))
            yield Part(f"application/dicom; transfer-syntax={stored}", chunks,
                       {"Content-Length": str(row["_size"])})
            continue
        converted = transcode.convert(read_blob(archive, row["_blob_key"]), syntax,
                                      slot=lambda: DECODE_SLOTS)
        yield Part(f"application/dicom; transfer-syntax={syntax}", converted.chunks,
                   {"Content-Length": str(converted.length)})


class _ReadAhead:
    """The blobs of ``rows``, read ahead of a writer that takes them in order: ``blob(key)`` is
    a lazy chunk iterator, which starts that read (and the ones after it) only when the writer
    gets to it."""

    def __init__(self, archive: Archive, rows: list[dict[str, Any]]) -> None:
        self._reads = archive.read_ahead(
            InstanceLocation(row["SOPInstanceUID"], row["SOPClassUID"],
                             row["_transfer_syntax_uid"], row["_blob_key"], row["_size"])
            for row in rows)

    def blob(self, key: str) -> Iterator[bytes]:
        """The blob ``key`` (one of the rows, asked for in their order) as one chunk."""
        for location, read in self._reads:
            if location.blob_key == key:  # rows whose part was never sent are passed over
                yield read.result()
                return
        raise StorageUnavailable(f"the blob {key} was not read ahead")  # asked out of order


def _chunks(archive: Archive, key: str) -> Iterator[bytes]:
    try:
        yield from archive.blobs.open_chunks(key)
    except KeyError:
        raise StorageUnavailable(f"the blob {key} is missing; run `pacs check`") from None


def read_blob(archive: Archive, key: str) -> bytes:
    try:
        return archive.blobs.get(key)
    except KeyError:
        raise StorageUnavailable(f"the blob {key} is missing; run `pacs check`") from None


# ---------------------------------------------------------------------------- frames


def parse_frame_list(text: str) -> list[int]:
    """Frame numbers of a frame list (``1``, ``1,3,5``; 1-based, in the order asked).

    Each frame once: a list repeating one frame would make the answer any size a URL can ask
    for (the frames are gathered in memory), so it is refused rather than served.
    """
    numbers = [whole_number(item) for item in text.split(",")]
    if None in numbers:
        raise ValueError(f"frame list {text!r} is not comma-separated frame numbers")
    if any(n < 1 for n in numbers):
        raise ValueError(f"frame list {text!r}: frame numbers start at 1")
    seen: set[int] = set()
    for number in numbers:
        if number in seen:
            raise ValueError(f"frame {number} is listed more than once")
        seen.add(number)
    return numbers


def choose_frame_syntax(accept: list[Accepted], stored: str) -> tuple[str, str]:
    """(media type of each part, transfer syntax) for frames stored in ``stored``."""
    native_stored = stored in _NATIVE
    for entry in accept:
        part_type = entry.part_type if entry.is_multipart else entry.media_type
        if part_type in (None, "*/*", "*", "application/octet-stream"):
            syntax = entry.transfer_syntax or EXPLICIT_LE
            if syntax == "*" or syntax == stored or (native_stored and syntax in _NATIVE):
                return "application/octet-stream", stored if syntax == "*" else syntax
            if syntax in _NATIVE:
                return "application/octet-stream", EXPLICIT_LE  # decoded here
            continue
        stored_media = FRAME_MEDIA_TYPES.get(stored)
        if stored_media and _same(part_type, stored_media) and entry.transfer_syntax in (
                None, "*", stored):
            return stored_media, stored
    raise NotAcceptable(
        f"the frames are stored as {stored}; available as multipart/related; "
        "type=application/octet-stream with transfer-syntax=* (as stored) or "
        f"{EXPLICIT_LE} (uncompressed)"
        + (f", or type={FRAME_MEDIA_TYPES[stored]}" if stored in FRAME_MEDIA_TYPES else ""))


def _same(pattern: str, media_type: str) -> bool:
    kind, _, sub = pattern.partition("/")
    return pattern == media_type or (sub == "*" and media_type.startswith(kind + "/"))


def check_frames_exist(row: dict[str, Any], numbers: list[int]) -> int:
    """The instance's number of frames; ``NotFound`` for a frame number past it."""
    count = int(row.get("NumberOfFrames") or 1)
    for number in numbers:
        if number > count:
            raise NotFound(f"frame {number} does not exist: the instance has {count} frame(s)")
    return count


def frame_bytes(archive: Archive, row: dict[str, Any], numbers: list[int],
                syntax: str) -> list[bytes]:
    """The bytes of frames ``numbers`` of one instance, in ``syntax``."""
    stored = row["_transfer_syntax_uid"]
    count = check_frames_exist(row, numbers)
    ranges = json.loads(row["_frames"]) if row.get("_frames") else None
    same = syntax == stored or (syntax in _NATIVE and stored in _NATIVE)
    if same and ranges is not None and len(ranges) >= count:
        return [_read_ranges(archive, row["_blob_key"], ranges[n - 1]) for n in numbers]
    data = read_blob(archive, row["_blob_key"])
    with DECODE_SLOTS:
        if same:  # no usable offsets (e.g. deflated): let pydicom find the frames
            return [_frame_from_dataset(data, n - 1) for n in numbers]
        return [transcode.native_frame(data, n - 1) for n in numbers]


def _read_ranges(archive: Archive, key: str, ranges: list[int]) -> bytes:
    pieces = [archive.blobs.get_range(key, ranges[i], ranges[i + 1])
              for i in range(0, len(ranges), 2)]
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _frame_from_dataset(data: bytes, index: int) -> bytes:
    ds = pydicom.dcmread(BytesIO(data))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        from pydicom.encaps import generate_frames

        frames = int(ds.get("NumberOfFrames") or 1)
        for position, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            if position == index:
                return frame
        raise NotFound(f"frame {index + 1} is not in the pixel data")
    return transcode.native_frame(data, index)


# ---------------------------------------------------------------------------- bulk data


def bulk_bytes(archive: Archive, row: dict[str, Any], spec: str) -> bytes:
    """The value of one bulk data element of an instance, named as in its metadata URLs.

    A byte range is served only if the instance's metadata names it (``row`` must carry the
    header): ``0-<size>`` would otherwise be the whole stored file, a download by another
    name. An element path is served when the element is binary (pixel data included)."""
    match = re.fullmatch(r"(\d+)-(\d+)", spec)
    if match:
        offset, length = int(match.group(1)), int(match.group(2))
        if f'"BulkDataURI":"bulk:{offset}:{length}"' not in row["_header"]:
            raise NotFound(f"no bulk data {spec!r} in the instance")
        return archive.blobs.get_range(row["_blob_key"], offset, length)
    match = re.fullmatch(r"path/([0-9A-Fa-f]{8}(?:/\d+/[0-9A-Fa-f]{8})*)", spec)
    if not match:
        raise NotFound(f"no bulk data {spec!r}")
    data = read_blob(archive, row["_blob_key"])
    with DECODE_SLOTS:
        ds: Any = pydicom.dcmread(BytesIO(data))
    steps = match.group(1).split("/")
    try:
        for position in range(0, len(steps) - 1, 2):
            ds = ds[int(steps[position], 16)].value[int(steps[position + 1])]
        element = ds[int(steps[-1], 16)]
    except (KeyError, IndexError, TypeError):
        raise NotFound(f"no bulk data {spec!r} in the instance") from None
    if element.VR not in _BINARY_VRS or not isinstance(element.value, bytes):
        # A number or a name has no bytes to give (and bytes(n) would be n zero bytes).
        raise NotFound(f"{spec!r} is not bulk data (VR {element.VR})")
    return element.value


# ---------------------------------------------------------------------------- rendering


def image_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that are images (they have Rows), in series then instance order."""
    images = [row for row in rows if row.get("Rows")]
    return sorted(images, key=lambda r: (r.get("SeriesNumber") or 0, r["_series_pk"],
                                         r.get("InstanceNumber") or 0, r["_instances_pk"]))


def representative(archive: Archive, target: Target) -> tuple[str, int]:
    """(blob key, 0-based frame) of the image that stands for a study or series: the middle
    slice of its (first) series, the middle frame of a multi-frame instance."""
    images = image_instances(archive.index, target.study, target.series)
    if not images:
        if not find(archive.index, Query(Level.SERIES if target.series else Level.STUDY,
                                         target.keys(), limit=1)):
            raise NotFound(f"no {target.describe()}")
        raise NotFound(f"{target.describe()} holds no image")
    chosen = images[len(images) // 2]
    return chosen.blob_key, chosen.number_of_frames // 2
