"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data, straight from the archive.

Instances stream from the blob store in chunks (bounded memory for any study size); metadata
comes from the DICOM JSON stored in the index, never from the files, its Pixel Data element
from what the index row knows (``pixeldata``); frames are read by byte range using the frame
offsets recorded at ingest.

Transfer syntaxes (PS3.18 8.7.3.4): without one asked for, an instance goes in Explicit VR
Little Endian, except pixel data the server has only lossy compressed, which goes as stored;
each part names its own. A conversion reads the stored file by byte range and sends it as it
is made (``transcode.convert_stored``), holding one frame; the few kinds that need the whole
file in memory hold a slot of ``WHOLE_INSTANCE_SLOTS`` from reading it until the converted
bytes are sent or dropped, so all requests together hold at most that many.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom

from dicomweb import pixeldata, transcode
from dicomweb.byteorder import (
    BULK_PATH_SPEC,
    BULK_RANGE_SPEC,
    EXPLICIT_BIG_ENDIAN,
    little_endian_bulk,
)
from dicomweb.media import (
    DICOM,
    EXPLICIT_LE,
    FRAME_MEDIA_TYPES,
    Accepted,
    NotAcceptable,
    range_matches,
)
from dicomweb.multipart import Part
from dicomweb.slots import (
    DECODE_SLOTS,
    SMALL_INSTANCE,
    Held,
    whole_instance_slot,
)
from pacs.http_input import whole_number
from storage.archive import Archive, InstanceLocation
from storage.attributes import Level
from storage.errors import NotFound, StorageUnavailable
from storage.parsing import require_uid
from storage.query import Query, find, image_instances

log = logging.getLogger("pacs.dicomweb")

_BULK_URI = re.compile(r'"BulkDataURI":"bulk:(?:(\d+):(\d+)|path:([0-9A-Fa-f/]+))"')
_METADATA_FORMAT = b"2;"  # changed when the metadata of the same instances changes
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "OW or OB"})
_NATIVE = transcode.UNCOMPRESSED  # frames of these are the same native pixel bytes
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
        header = _BULK_URI.sub(bulk_url, header) if "bulk:" in header else header
        parts.append(pixeldata.with_pixel_data(header, row, url))
    return ("[" + ",".join(parts) + "]").encode("utf-8")


def metadata_etag(rows: list[dict[str, Any]]) -> str:
    """A validator that changes whenever any instance, or a patient/study update, does (or
    what the metadata holds: caches kept answers without Pixel Data before)."""
    digest = hashlib.sha1(_METADATA_FORMAT, usedforsecurity=False)
    for row in rows:
        digest.update(f"{row['_instances_pk']}:{row['_stored_at']}:"
                      f"{row.get('_studies_updated_at')}:{row.get('_patients_updated_at')};"
                      .encode())
    return f'"{digest.hexdigest()}"'


# ---------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class InstanceMedia:
    """How instances are sent: one multipart/related part each, or (one instance) a single
    Part 10 body; in transfer syntax ``syntax``: ``*`` as stored, ``None`` each in its own
    (the default, PS3.18 8.7.3.4, when it differs between the instances: each part names it)."""

    syntax: str | None
    single_part: bool


def choose_instance_media(accept: list[Accepted], level: Level,
                          rows: list[dict[str, Any]]) -> InstanceMedia:
    """The representation of the instances ``rows`` (at ``level``) that ``accept`` prefers
    and this server can produce (PS3.18 10.4.4, 8.7.3).

    ``multipart/related; type="application/dicom"`` is the default, for any level; a single
    part ``application/dicom`` is only for one instance, so for a study or series it is passed
    over, and 406 if nothing else is acceptable (Table 10.4.4-1, note 3). An entry in a
    transfer syntax the instances cannot be converted to is passed over for the next one:
    decided here for every instance, before any byte is sent."""
    passed_over = False
    unproducible: NotAcceptable | None = None
    for entry in accept:  # media ranges (application/*, multipart/*) as RFC 9110 12.5.1
        if entry.is_wildcard or (entry.is_multipart and entry.part_matches(DICOM)):
            single_part = False
        elif entry.matches(DICOM) and level is Level.INSTANCE:
            single_part = True
        else:
            passed_over = passed_over or entry.matches(DICOM)
            continue
        try:
            check_transcodable(rows, entry.transfer_syntax)
        except NotAcceptable as exc:
            unproducible = unproducible or exc
            continue
        syntax = entry.transfer_syntax
        return InstanceMedia(syntax if syntax is not None else common_syntax(rows, None),
                             single_part)
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


def check_transcodable(rows: list[dict[str, Any]], syntax: str | None) -> None:
    """``NotAcceptable`` unless every instance of ``rows`` can be sent in ``syntax`` (``*``: as
    stored; ``None``: the default, see ``part_syntax``)."""
    for row in rows:
        stored, planned = row["_transfer_syntax_uid"], part_syntax(row, syntax)
        if planned == stored:
            continue
        target = planned or EXPLICIT_LE
        if _without_pixel_data(row) and target in _NATIVE | transcode.ENCODABLE:
            continue  # only the header to write again
        if transcode.can_produce(stored, target) and not _too_large(row, target):
            continue
        if syntax is None:
            raise NotAcceptable(
                f"instance {row['SOPInstanceUID']} is stored as {stored}, which cannot be "
                f"decoded here to {EXPLICIT_LE} (the default); ask for transfer-syntax=* to get "
                "it as stored")
        raise NotAcceptable(f"instance {row['SOPInstanceUID']} is stored as {stored} and cannot "
                            f"be converted to {syntax}; ask for transfer-syntax=* to get it as "
                            "stored")


def part_syntax(row: dict[str, Any], syntax: str | None) -> str | None:
    """The transfer syntax the instance ``row`` is sent in when ``syntax`` is asked for; None
    when its header decides (its Lossy Image Compression, see ``converted_part``).

    Without a syntax asked for (``None``): Explicit VR Little Endian, unless the pixel data
    are stored lossy compressed, then as stored (PS3.18 8.7.3.4: the server has them only in
    that form). An instance without pixel data asked for in a compressed syntax: Explicit VR
    Little Endian (PS3.5 A.4: those syntaxes are for Pixel Data)."""
    stored = row["_transfer_syntax_uid"]
    if syntax in ("*", stored):
        return stored
    if syntax is None:
        if transcode.is_lossy(stored) or _too_large(row, EXPLICIT_LE):
            return stored  # (too large decoded for a DICOM value: 8.7.3.4 note 2)
        if stored in transcode.LOSSLESS_OR_LOSSY:
            return None if transcode.can_decode(stored) else stored
        syntax = EXPLICIT_LE
    if syntax in transcode.ENCODABLE and _without_pixel_data(row):
        return EXPLICIT_LE
    return syntax


def common_syntax(rows: list[dict[str, Any]], syntax: str | None) -> str | None:
    """The transfer syntax every part has when ``syntax`` is asked for, to name in the
    multipart answer's Content-Type; None when they differ (or an instance's header decides)."""
    planned = {part_syntax(row, syntax) for row in rows}
    return planned.pop() if len(planned) == 1 else None


def _without_pixel_data(row: dict[str, Any]) -> bool:
    # Rows is required with pixel data; frame offsets are recorded for any pixel data.
    return not row.get("Rows") and row.get("_frames") is None


def _too_large(row: dict[str, Any], target: str) -> bool:
    """Whether decoded, the pixel data would pass what a DICOM value can hold (at the least,
    one sample a pixel; the conversion itself finds colour images that do)."""
    if target not in _NATIVE or not transcode.is_compressed(row["_transfer_syntax_uid"]):
        return False
    size = (int(row.get("Rows") or 0) * int(row.get("Columns") or 0)
            * int(row.get("NumberOfFrames") or 1) * int(row.get("BitsAllocated") or 8) // 8)
    return size >= 0xFFFFFFFE


def instance_parts(archive: Archive, rows: list[dict[str, Any]], syntax: str | None, *,
                   fall_back: bool = False) -> Iterator[Part]:
    """One multipart part per instance, in ``syntax`` (``*``: as stored; ``None``: the default
    of PS3.18 8.7.3.4, see ``part_syntax``), each labelled with its own.

    With ``fall_back`` (a study or series, whose answer has started before most instances are
    converted), an instance whose pixel data cannot be decoded goes as stored, labelled so,
    with a warning in the log: the stream went on, where it was cut there and every instance
    after it lost. (One that fails after its first frame is still cut: its length is sent.)

    Instances sent as stored are read lazily, as the writer reaches them, in chunks. From a
    remote blob store (S3), where every instance is a request, those up to ``READ_AHEAD_LIMIT``
    bytes are read whole a few ahead instead (``Archive.read_ahead``), so the requests overlap
    with sending: a 300-slice CT series from S3 on loopback 0.92–1.05 s → 0.77–0.85 s; from
    local files it was no faster. A converted instance is read and converted when the writer
    reaches it (``converted_part``)."""
    def read_whole(row: dict[str, Any]) -> bool:  # sent as stored and read ahead
        return (archive.blobs.remote and part_syntax(row, syntax) == row["_transfer_syntax_uid"]
                and (row["_size"] or 0) <= READ_AHEAD_LIMIT)

    ahead = _ReadAhead(archive, [row for row in rows if read_whole(row)])
    for row in rows:
        if read_whole(row):
            yield _stored_part(row, ahead.blob(row["_blob_key"]))
        elif part_syntax(row, syntax) == row["_transfer_syntax_uid"]:
            yield _stored_part(row, _chunks(archive, row["_blob_key"]))
        elif fall_back:
            yield _converted_or_stored(archive, row, syntax)
        else:
            yield converted_part(archive, row, syntax)


def _converted_or_stored(archive: Archive, row: dict[str, Any], syntax: str | None) -> Part:
    try:
        return converted_part(archive, row, syntax)
    except transcode.NotTranscodable as exc:
        log.warning("WADO-RS: instance %s sent as stored (%s): %s", row["SOPInstanceUID"],
                    row["_transfer_syntax_uid"], exc)
        return _stored_part(row, _chunks(archive, row["_blob_key"]))


def _stored_part(row: dict[str, Any], chunks: Iterable[bytes]) -> Part:
    return Part(f"application/dicom; transfer-syntax={row['_transfer_syntax_uid']}", chunks,
                {"Content-Length": str(row["_size"])})


def converted_part(archive: Archive, row: dict[str, Any], syntax: str | None) -> Part:
    """The part of the instance ``row`` converted for ``syntax`` (not as stored).

    Read by byte range as the chunks are taken when ``transcode.convert_stored`` can; else
    whole, holding a ``WHOLE_INSTANCE_SLOTS`` slot until the chunks are all taken or dropped.
    Without a syntax asked for, an instance in a lossless-or-lossy syntax whose header says
    lossy, or whose pixel data decoded would be too large for a DICOM value, goes as stored
    (PS3.18 8.7.3.4)."""
    stored = _stored_instance(archive, row)
    target = part_syntax(row, syntax)
    if target is None:
        if transcode.declares_lossy(stored.header):
            return _stored_part(row, _chunks(archive, row["_blob_key"]))
        target = EXPLICIT_LE
    try:
        converted = transcode.convert_stored(stored, target, slot=lambda: DECODE_SLOTS)
        if converted is None:
            del stored  # what it read of the file: the whole one is read next
            converted = _converted_whole(archive, row, target)
    except transcode.PixelDataTooLarge:
        if syntax is not None:
            raise
        return _stored_part(row, _chunks(archive, row["_blob_key"]))
    return Part(f"application/dicom; transfer-syntax={converted.syntax}", converted.chunks,
                {"Content-Length": str(converted.length)})


def _converted_whole(archive: Archive, row: dict[str, Any], target: str
                     ) -> transcode.Converted:
    release = whole_instance_slot()
    try:
        converted = transcode.convert(read_blob(archive, row["_blob_key"]), target,
                                      slot=lambda: DECODE_SLOTS)
    except BaseException:
        release()
        raise
    return dataclasses.replace(converted, chunks=Held(converted.chunks, release))


def _stored_instance(archive: Archive, row: dict[str, Any]) -> transcode.StoredInstance:
    """The stored file of ``row`` to read by byte range (a small one read at once)."""
    key = row["_blob_key"]
    size = row["_size"] or archive.blobs.size(key) or 0
    if size <= SMALL_INSTANCE:
        data = read_blob(archive, key)
        read = lambda offset, length: data[offset:offset + length]  # noqa: E731
    else:
        read = _range_reader(archive, key)
    frames = json.loads(row["_frames"]) if row.get("_frames") else None
    return transcode.StoredInstance(read, size, row["_transfer_syntax_uid"], frames)


def _range_reader(archive: Archive, key: str) -> Callable[[int, int], bytes]:
    """``read(offset, length)`` of the blob ``key``, by byte range."""
    def read(offset: int, length: int) -> bytes:
        try:
            return archive.blobs.get_range(key, offset, length)
        except KeyError:
            raise StorageUnavailable(f"the blob {key} is missing; run `pacs check`") from None
    return read


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
    for entry in accept:  # a single part entry is taken for the type of the parts
        part_type = entry.part_type if entry.is_multipart else entry.media_type
        if part_type is None or range_matches(part_type, "application/octet-stream"):
            syntax = entry.transfer_syntax or EXPLICIT_LE
            if syntax == "*" or syntax == stored or (native_stored and syntax in _NATIVE):
                return "application/octet-stream", stored if syntax == "*" else syntax
            if syntax in _NATIVE:  # decoded here: the same bytes in either
                return "application/octet-stream", syntax
            continue
        stored_media = FRAME_MEDIA_TYPES.get(stored)
        if stored_media and range_matches(part_type, stored_media) and entry.transfer_syntax in (
                None, "*", stored):
            return stored_media, stored
    raise NotAcceptable(
        f"the frames are stored as {stored}; available as multipart/related; "
        "type=application/octet-stream with transfer-syntax=* (as stored) or "
        f"{EXPLICIT_LE} (uncompressed)"
        + (f", or type={FRAME_MEDIA_TYPES[stored]}" if stored in FRAME_MEDIA_TYPES else ""))


def check_frames_exist(row: dict[str, Any], numbers: list[int]) -> int:
    """The instance's number of frames; ``NotFound`` for a frame number past it."""
    count = int(row.get("NumberOfFrames") or 1)
    for number in numbers:
        if number > count:
            raise NotFound(f"frame {number} does not exist: the instance has {count} frame(s)")
    return count


def frame_bytes(archive: Archive, row: dict[str, Any], numbers: list[int],
                syntax: str) -> Iterator[bytes]:
    """The bytes of frames ``numbers`` of one instance, in ``syntax``, one frame at a time as
    they are taken (errors come with the first).

    Read by byte range with the frame offsets recorded at ingest; frames to decompress are
    decoded one at a time from their own fragments, the header parsed once. Without usable
    offsets (a deflated file, say) the file is read whole, once a decode slot is free."""
    stored = row["_transfer_syntax_uid"]
    count = check_frames_exist(row, numbers)
    ranges = json.loads(row["_frames"]) if row.get("_frames") else None
    usable = ranges is not None and len(ranges) >= count
    same = syntax == stored or (syntax in _NATIVE and stored in _NATIVE)
    if same and usable:
        for n in numbers:
            yield _read_ranges(archive, row["_blob_key"], ranges[n - 1])
        return
    if not usable and not row.get("Rows"):
        raise NotFound(_NO_PIXELS)
    if usable and transcode.is_compressed(stored):
        instance = _stored_instance(archive, row)
        if instance.pixel is None:
            raise NotFound(_NO_PIXELS)
        decode = transcode.frame_decoder(instance.header)
        for number in numbers:
            fragments = instance.frame(number - 1)
            with DECODE_SLOTS:
                try:
                    frame = transcode.little_endian(decode(fragments)[0])
                except Exception as exc:  # the codec's: corrupt data, unsupported...
                    raise transcode.NotTranscodable(
                        f"cannot decode frame {number} ({stored}): {exc}") from exc
            yield frame
        return
    with DECODE_SLOTS:  # before reading: the slots bound what is held whole, not only decoded
        ds = pydicom.dcmread(BytesIO(read_blob(archive, row["_blob_key"])))
        if not any(keyword in ds for keyword in
                   ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise NotFound(_NO_PIXELS)
        if same and transcode.is_compressed(stored):
            frames = _encapsulated_frames(ds, numbers)  # no usable offsets: pydicom finds them
        else:
            frames = [transcode.native_frame(ds, n - 1) for n in numbers]
    yield from frames


_NO_PIXELS = "the instance has no pixel data, so no frames"


def _read_ranges(archive: Archive, key: str, ranges: list[int]) -> bytes:
    pieces = [archive.blobs.get_range(key, ranges[i], ranges[i + 1])
              for i in range(0, len(ranges), 2)]
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _encapsulated_frames(ds: pydicom.Dataset, numbers: list[int]) -> list[bytes]:
    from pydicom.encaps import generate_frames

    wanted, found = {n - 1 for n in numbers}, {}
    count = int(ds.get("NumberOfFrames") or 1)
    for position, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=count)):
        if position in wanted:
            found[position] = frame
    for number in numbers:
        if number - 1 not in found:
            raise NotFound(f"frame {number} is not in the pixel data")
    return [found[n - 1] for n in numbers]


# ---------------------------------------------------------------------------- bulk data


def bulk_span(archive: Archive, row: dict[str, Any], spec: str) -> tuple[int, int] | None:
    """Where the value of the bulk data ``spec`` lies in the stored file, (offset, length),
    when that is known without parsing the file: a range the instance's metadata names, or
    its top-level pixel data found by the frame offsets. None otherwise (``bulk_bytes`` reads
    the value); ``NotFound`` for a range the metadata does not name."""
    match = BULK_RANGE_SPEC.fullmatch(spec)
    if match:
        # Only a range the metadata names: "0-<size>" would be the whole stored file, a
        # download by another name.
        if f'"BulkDataURI":"bulk:{match.group(1)}:{match.group(2)}"' not in row["_header"]:
            raise NotFound(f"no bulk data {spec!r} in the instance")
        return int(match.group(1)), int(match.group(2))
    match = BULK_PATH_SPEC.fullmatch(spec)
    if match and match.group(1).upper() in pixeldata.PIXEL_DATA_TAGS:  # top level only
        return pixeldata.value_span(_range_reader(archive, row["_blob_key"]), row,
                                    match.group(1).upper())
    return None


def blob_chunks(archive: Archive, key: str, offset: int, length: int,
                size: int = 4 << 20) -> Iterator[bytes]:
    """``length`` bytes of a blob from ``offset``, read ``size`` at a time as they are taken."""
    end = offset + length
    for at in range(offset, end, size):
        yield archive.blobs.get_range(key, at, min(size, end - at))


def little_endian_bulk_bytes(archive: Archive, row: dict[str, Any], spec: str) -> bytes:
    """``bulk_bytes`` in little endian byte order (PS3.18 8.7.3.3), from any stored syntax."""
    data = bulk_bytes(archive, row, spec)
    pixel_vr = None
    match = BULK_PATH_SPEC.fullmatch(spec)
    if row["_transfer_syntax_uid"] == EXPLICIT_BIG_ENDIAN and match \
            and match.group(1).upper() in pixeldata.PIXEL_DATA_TAGS:
        pixel_vr = pixeldata.stored_vr(_range_reader(archive, row["_blob_key"]), row,
                                       match.group(1).upper())
    return little_endian_bulk(data, spec, row["_header"], row["_transfer_syntax_uid"],
                              pixel_vr)


def bulk_bytes(archive: Archive, row: dict[str, Any], spec: str) -> bytes:
    """The value of one bulk data element of an instance, named as in its metadata URLs.

    Read by byte range where ``bulk_span`` finds the value (``row`` must carry the header);
    else an element path is served when the element is binary, the file parsed."""
    span = bulk_span(archive, row, spec)
    if span is not None:
        return archive.blobs.get_range(row["_blob_key"], *span)
    match = BULK_PATH_SPEC.fullmatch(spec)
    if not match:
        raise NotFound(f"no bulk data {spec!r}")
    with DECODE_SLOTS:  # before reading: the slots bound what is held whole
        ds: Any = pydicom.dcmread(BytesIO(read_blob(archive, row["_blob_key"])))
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
