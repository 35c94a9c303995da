"""Read what the archive needs from a DICOM instance without decoding its pixels.

``parse_instance`` takes the bytes a modality sent (Part 10 with or without preamble, or a bare
dataset), checks them, and returns the bytes to store (a Part 10 file whose File Meta matches the
dataset), the header as DICOM JSON, and where each frame's bytes are in that file.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from storage import rawread
from storage.dicomjson import BULK_THRESHOLD, HeaderJSON
from storage.errors import InvalidInstance, InvalidQuery

# Derived from pydicom's UID root (for organisations without their own), fixed for this server.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.97216283310727712364705057509198736575"
IMPLEMENTATION_VERSION_NAME = "PACS_0_1"

# Standard transfer syntaxes newer than pydicom's registry. All encode the data set in Explicit
# VR Little Endian with encapsulated pixel data, so they can be indexed and stored as received.
NEWER_ENCAPSULATED_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.8.1",    # Deflated Image Frame Compression
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
})

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# A deflated data set is refused when it inflates past this: a few kilobytes of zlib can
# stand for gigabytes, which the parser (and later pydicom, to serve it) would hold in memory.
MAX_INFLATED_BYTES = 256 * 1024**2
_INFLATE_STEP = 16 * 1024**2
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})


@dataclass(frozen=True)
class ParsedInstance:
    """A checked instance: the Part 10 bytes to store and what the index needs."""

    data: bytes
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    header: dict[str, Any]
    # Byte ranges in ``data`` of each frame: one [offset, length, offset, length, ...] list per
    # frame (several pairs when a frame spans fragments). None when ranges cannot serve frames
    # (deflated data set, bit-packed frames): frames are then decoded from the whole file.
    frames: list[list[int]] | None
    meta_rewritten: bool


def is_known_transfer_syntax(uid: str) -> bool:
    """True for every standard transfer syntax we can read the data set of."""
    return UID(uid).is_transfer_syntax or uid in NEWER_ENCAPSULATED_TRANSFER_SYNTAXES


def require_uid(value: str, what: str) -> str:
    """``value`` if it is one UID, else ``InvalidQuery`` naming ``what``.

    For a path or parameter that names one study, series or instance: passed to the query path
    unchecked it would be matched as a C-FIND key, where an empty value or ``*`` matches
    everything and ``\\`` separates a list.
    """
    if not is_valid_uid(value):
        raise InvalidQuery(what, f"{value!r} is not a UID")
    return value


def is_valid_uid(value: Any) -> bool:
    """PS3.5 9.1 UID syntax, leniently: digits and dots, at most 64 characters.

    Components with a leading zero are not valid UIDs, but modalities send them and rejecting
    their images would lose data, so they are accepted.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def parse_instance(data: bytes, *, transfer_syntax: str | None = None) -> ParsedInstance:
    """Check ``data`` and return what to store and index.

    ``transfer_syntax`` is the negotiated syntax when ``data`` comes from the network; files give
    their own in the File Meta. Raises ``InvalidInstance`` with a reason a person can act on.
    """
    if not data:
        raise InvalidInstance("the data set is empty")
    preamble, meta, dataset_start = _read_meta(data)
    if meta.get("MediaStorageSOPClassUID", "") == MEDIA_STORAGE_DIRECTORY:
        raise InvalidInstance("this is a DICOMDIR (an index of a CD/DVD), not an instance: "
                              "import the files it lists instead")
    syntax = (meta.get("TransferSyntaxUID") or transfer_syntax or "").strip("\x00 ")
    if not syntax:
        try:
            syntax = _guess_transfer_syntax(data[dataset_start : dataset_start + 8])
        except InvalidInstance:
            if not (preamble or meta):
                raise
            raise InvalidInstance("the File Meta has no Transfer Syntax UID (0002,0010), and "
                                  "the data set's encoding cannot be told from its first "
                                  "element") from None
    if not is_known_transfer_syntax(syntax):
        # Only a UID is quoted: a damaged File Meta gives hundreds of raw bytes here, patient
        # names and IDs among them, and the reason goes to logs and to the sender.
        shown = repr(syntax) if _UID.fullmatch(syntax) else \
            f"of {len(syntax)} characters that are not a UID"
        raise InvalidInstance(f"transfer syntax {shown} is unknown")
    parsed = _parse_dataset(data, dataset_start, syntax)
    needs_meta = (
        not preamble
        or "TransferSyntaxUID" not in meta
        or meta.get("MediaStorageSOPInstanceUID") != parsed["sop_instance"]
        or meta.get("MediaStorageSOPClassUID") != parsed["sop_class"]
    )
    if needs_meta:
        rewritten = parse_instance(_with_new_meta(data, dataset_start, meta, syntax, parsed))
        return dataclasses.replace(rewritten, meta_rewritten=True)
    return ParsedInstance(
        data=data,
        transfer_syntax=syntax,
        sop_class_uid=parsed["sop_class"],
        sop_instance_uid=parsed["sop_instance"],
        study_instance_uid=parsed["study"],
        series_instance_uid=parsed["series"],
        header=parsed["header"],
        frames=parsed["frames"],
        meta_rewritten=False,
    )


_OTHER_FORMATS = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "ZIP", b"\x89PNG": "PNG",
                  b"\xff\xd8\xff": "JPEG", b"%PDF": "PDF", b"<?xml": "XML", b"{": "JSON"}


def announced_sop_instance_uid(data: bytes) -> str | None:
    """The SOP Instance UID a Part 10 file's File Meta announces (read without parsing the data
    set), or None when it has no readable File Meta."""
    try:
        _, meta, _ = _read_meta(data)
    except Exception:  # whatever is wrong with it, parse_instance will say
        return None
    return meta.get("MediaStorageSOPInstanceUID") or None


def _read_meta(data: bytes) -> tuple[bool, dict[str, str], int]:
    """Whether there is a preamble, the File Meta values we use, and where the data set starts."""
    preamble = len(data) >= 132 and data[128:132] == b"DICM"
    start = 132 if preamble else 0
    if data[start:start + 2] != b"\x02\x00":
        return preamble, {}, start  # no File Meta at all
    try:
        meta, end = rawread.read_file_meta(data, start)
        return preamble, meta, end
    except rawread.UnusualEncoding:
        pass
    fp = BytesIO(data)
    try:
        read_preamble(fp, force=True)
        file_meta = _read_file_meta_info(fp)
        meta = {key: str(file_meta.get(key, "") or "").strip("\x00 ")
                for key in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                            "TransferSyntaxUID", "SourceApplicationEntityTitle")
                if key in file_meta}
    except (InvalidDicomError, BytesLengthException, struct.error, ValueError, EOFError) as exc:
        raise InvalidInstance(f"the File Meta Information cannot be read: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises other kinds too (NotImplementedError
        # for an unknown VR, once the values are read): each is a File Meta it cannot read.
        raise InvalidInstance("the File Meta Information cannot be read "
                              f"({type(exc).__name__})") from None
    return preamble, meta, fp.tell()


def _guess_transfer_syntax(head: bytes) -> str:
    """Transfer syntax of a bare data set (no File Meta), from its first element."""
    for magic, name in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise InvalidInstance(f"this is a {name} file, not DICOM")
    if len(head) < 8:
        raise InvalidInstance("the data is too short to be a DICOM data set")
    big_endian = head[0] == 0 and head[1] != 0
    group = int.from_bytes(head[0:2], "big" if big_endian else "little")
    # A bare data set starts with a low group (0008 usually); anything else is not DICOM.
    if group % 2 or not 0x0002 <= group <= 0x0020:
        raise InvalidInstance("this is not a DICOM file: no 'DICM' marker and no DICOM "
                              "element at the start")
    explicit = head[4:6].isalpha() and head[4:6].isupper()
    if big_endian:
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian


def _parse_dataset(data: bytes, start: int, syntax: str) -> dict[str, Any]:
    uid = UID(syntax)
    deflated = uid == DeflatedExplicitVRLittleEndian
    if deflated:
        buffer, start = _inflate(memoryview(data)[start:]), 0
    else:
        buffer = data
    implicit = uid == ImplicitVRLittleEndian
    little = uid != ExplicitVRBigEndian
    try:
        elements, pixel_start = _read_elements(buffer, start, implicit, little)
        converter = HeaderJSON(offsets_valid=not deflated, buffer=buffer)
        header = converter.dataset(elements)
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt data
        raise InvalidInstance(f"the data set cannot be parsed: {exc}") from None
    found = {
        "sop_class": _uid(header, "00080016", "SOP Class UID"),
        "sop_instance": _uid(header, "00080018", "SOP Instance UID"),
        "study": _uid(header, "0020000D", "Study Instance UID"),
        "series": _uid(header, "0020000E", "Series Instance UID"),
        "header": header,
        "frames": None,
    }
    if pixel_start is not None:
        encapsulated = uid in NEWER_ENCAPSULATED_TRANSFER_SYNTAXES or uid.is_encapsulated
        frames = _frame_ranges(buffer, pixel_start, implicit, little, header, elements,
                               encapsulated=encapsulated, syntax_name=uid.name)
        found["frames"] = None if deflated else frames
    return found


def _inflate(compressed: memoryview) -> bytes:
    """The inflated data set, in steps so that a bomb is refused before it fills memory."""
    limit = MAX_INFLATED_BYTES
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    # BytesIO, not a list joined at the end: its value is handed over without a copy, so the
    # peak is the data set once, not twice.
    out, pending = BytesIO(), compressed
    try:
        while not inflater.eof:
            part = inflater.decompress(pending, _INFLATE_STEP)
            if not part and not inflater.unconsumed_tail:
                break  # all input used and nothing more to come: the stream stops short
            if out.tell() + len(part) > limit:
                raise InvalidInstance(f"the deflated data set inflates to more than "
                                      f"{limit // 1024**2} MiB, the most this server accepts")
            out.write(part)
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InvalidInstance(f"the deflated data set cannot be inflated: {exc}") from None
    if not inflater.eof:
        raise InvalidInstance("the deflated data set is truncated (its zlib stream does not end)")
    return out.getvalue()


def _read_elements(buffer: bytes, start: int, implicit: bool, little: bool
                   ) -> tuple[list, int | None]:
    """Top-level elements up to the pixel data, and the pixel data element's offset."""
    if little and not implicit:
        try:
            return rawread.read_dataset(buffer, start, PIXEL_DATA_TAGS)
        except rawread.Truncated as exc:
            raise InvalidInstance(f"the data set is truncated: {exc}") from None
        except rawread.UnusualEncoding:
            pass  # pydicom copes with more (or says precisely what is wrong)
    fp = BytesIO(buffer)
    fp.seek(start)
    elements = list(data_element_generator(
        fp, implicit, little,
        stop_when=lambda tag, vr, length: tag in PIXEL_DATA_TAGS,
        defer_size=BULK_THRESHOLD,
    ))
    stopped = fp.tell() < len(buffer)
    if not stopped:
        _check_not_truncated(elements, start, len(buffer))
    return elements, (fp.tell() if stopped else None)


def _check_not_truncated(elements: list, start: int, size: int) -> None:
    """pydicom's reader takes a value cut short by the end of the data as a shorter value, and
    stops silently inside a last element's header: refuse both."""
    if not elements:
        return
    last = elements[-1]
    if getattr(last, "value_tell", None) is None or last.length == 0xFFFFFFFF:
        # A sequence pydicom read whole, or an undefined length, which ends with its
        # delimiter (pydicom checks that one).
        return
    value = last.value
    got = len(value) if isinstance(value, bytes | bytearray) else size - last.value_tell
    if got < last.length:
        raise InvalidInstance(f"the data set is truncated: ({last.tag.group:04X},"
                              f"{last.tag.element:04X}) has {last.length} bytes, the data only "
                              f"{got}")
    if last.value_tell + last.length < size:
        raise InvalidInstance("the data set is truncated: the data ends inside an element's "
                              f"header at offset {last.value_tell + last.length}")


def _uid(header: dict[str, Any], tag: str, name: str) -> str:
    values = header.get(tag, {}).get("Value") or []
    if not values or values[0] is None:
        raise InvalidInstance(f"{name} ({tag[:4]},{tag[4:]}) is missing")
    value = values[0]
    if not is_valid_uid(value):
        raise InvalidInstance(f"{name} ({tag[:4]},{tag[4:]}) {value!r} is not a valid UID")
    return value


def _int_value(header: dict[str, Any], tag: str, name: str, default: int | None) -> int:
    values = header.get(tag, {}).get("Value") or []
    if not values or values[0] is None:
        if default is None:
            raise InvalidInstance(f"{name} ({tag[:4]},{tag[4:]}) is missing but Pixel Data is "
                                  "present")
        return default
    value = values[0]
    if not isinstance(value, int) or value < 0:
        raise InvalidInstance(f"{name} ({tag[:4]},{tag[4:]}) has the invalid value {value!r}")
    return value


def _frame_ranges(
    buffer: bytes, pos: int, implicit: bool, little: bool, header: dict[str, Any],
    elements: list, *, encapsulated: bool, syntax_name: str,
) -> list[list[int]] | None:
    """Byte ranges of each frame in the pixel data element that starts at ``pos``.

    Pixel data that disagrees with the transfer syntax (compressed fragments under an
    uncompressed syntax, or the reverse) is refused: stored, it could never be displayed; so is
    float pixel data in fragments, which no syntax allows.
    """
    endian = "<" if little else ">"
    if len(buffer) < pos + 8:
        raise InvalidInstance("the file ends inside the Pixel Data element header")
    tag = (struct.unpack_from(f"{endian}H", buffer, pos)[0] << 16) | struct.unpack_from(
        f"{endian}H", buffer, pos + 2)[0]
    if implicit:
        (length,), value_start = struct.unpack_from("<I", buffer, pos + 4), pos + 8
    elif not buffer[pos + 4 : pos + 6].isupper():
        raise InvalidInstance(f"the transfer syntax is {syntax_name}, with explicit VRs, but "
                              "the Pixel Data element has none: the data set is implicit VR")
    elif buffer[pos + 4 : pos + 6] in _LONG_VRS:
        if len(buffer) < pos + 12:
            raise InvalidInstance("the file ends inside the Pixel Data element header")
        (length,), value_start = struct.unpack_from(f"{endian}I", buffer, pos + 8), pos + 12
    else:
        (length,), value_start = struct.unpack_from(f"{endian}H", buffer, pos + 6), pos + 8
    frame_count = _int_value(header, "00280008", "Number of Frames", 1)
    if tag != 0x7FE00010 and length == 0xFFFFFFFF:
        name = "Float Pixel Data (7FE0,0008)" if tag == 0x7FE00008 else \
            "Double Float Pixel Data (7FE0,0009)"
        raise InvalidInstance(f"{name} has an undefined length (compressed fragments): it is "
                              "never encapsulated (PS3.5 A.4), only Pixel Data (7FE0,0010) is")
    if tag == 0x7FE00010 and (length == 0xFFFFFFFF) != encapsulated:
        if encapsulated:
            raise InvalidInstance(f"the transfer syntax is {syntax_name}, whose Pixel Data is "
                                  "encapsulated (compressed fragments), but this Pixel Data is "
                                  "uncompressed (it has a defined length)")
        raise InvalidInstance(f"the transfer syntax is {syntax_name}, whose Pixel Data is "
                              "uncompressed, but this Pixel Data is encapsulated (compressed "
                              "fragments of undefined length): the sender declared the wrong "
                              "transfer syntax")
    if length == 0xFFFFFFFF:
        return _encapsulated_frames(buffer, value_start, frame_count, elements)
    if value_start + length > len(buffer):
        raise InvalidInstance(
            f"the file is truncated: Pixel Data declares {length} bytes but only "
            f"{len(buffer) - value_start} follow"
        )
    rows = _int_value(header, "00280010", "Rows", None)
    columns = _int_value(header, "00280011", "Columns", None)
    samples = _int_value(header, "00280002", "Samples per Pixel", 1)
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(
        tag, _int_value(header, "00280100", "Bits Allocated", None))
    frame_bits = rows * columns * samples * bits
    photometric = (header.get("00280004", {}).get("Value") or [""])[0]
    if photometric == "YBR_FULL_422":  # two chroma samples per pair of pixels: 2/3 of the size
        frame_bits = frame_bits * 2 // 3
    if frame_bits == 0 or frame_count == 0:
        return []
    if frame_count * frame_bits > length * 8:
        raise InvalidInstance(
            f"Pixel Data has {length} bytes, fewer than the {frame_count * frame_bits // 8} that "
            f"{frame_count} frame(s) of {rows}x{columns}x{samples} at {bits} bits need"
        )
    if frame_bits % 8:
        return None  # bit-packed frames that do not start on a byte
    size = frame_bits // 8
    return [[value_start + i * size, size] for i in range(frame_count)]


def _encapsulated_frames(
    buffer: bytes, pos: int, frame_count: int, elements: list
) -> list[list[int]] | None:
    """Frame ranges of encapsulated pixel data (PS3.5 A.4), from its items."""
    items: list[tuple[int, int]] = []  # (offset of the value, length) of each item
    end = len(buffer)
    while True:
        if pos + 8 > end:
            raise InvalidInstance("the file is truncated inside the encapsulated Pixel Data "
                                  "(no sequence delimiter)")
        group, element, length = struct.unpack_from("<HHI", buffer, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise InvalidInstance(f"encapsulated Pixel Data has an unexpected element "
                                  f"({group:04X},{element:04X}) where an item should be")
        if length == 0xFFFFFFFF or pos + 8 + length > end:
            raise InvalidInstance("the file is truncated inside an encapsulated Pixel Data "
                                  "fragment")
        items.append((pos + 8, length))
        pos += 8 + length
    if not items:
        raise InvalidInstance("encapsulated Pixel Data has no Basic Offset Table item")
    (table_start, table_length), fragments = items[0], items[1:]
    if frame_count == 0 or not fragments:
        return []
    if len(fragments) == frame_count:
        return [[offset, length] for offset, length in fragments]
    if frame_count == 1:
        return [[value for fragment in fragments for value in fragment]]
    starts = _frame_starts(buffer, table_start, table_length, frame_count, elements)
    if starts is None:
        starts = _starts_by_marker(buffer, fragments)
    if starts is None or len(starts) != frame_count:
        return None
    # Offsets in the tables are from the first byte of the first fragment's item tag.
    first_item = fragments[0][0] - 8
    frames: list[list[int]] = []
    for offset, length in fragments:
        relative = offset - 8 - first_item
        if relative in starts or not frames:
            frames.append([])
        frames[-1].extend((offset, length))
    return frames if len(frames) == frame_count else None


def _frame_starts(
    buffer: bytes, table_start: int, table_length: int, frame_count: int, elements: list
) -> set[int] | None:
    """Frame start offsets from the Basic or the Extended Offset Table, if either is usable."""
    if table_length == 4 * frame_count:
        return set(struct.unpack_from(f"<{frame_count}I", buffer, table_start))
    for elem in elements:
        if int(elem.tag) == 0x7FE00001 and elem.length == 8 * frame_count:
            raw = elem.value if elem.value is not None else buffer[
                elem.value_tell : elem.value_tell + elem.length]
            return set(struct.unpack(f"<{frame_count}Q", raw))
    return None


def _starts_by_marker(buffer: bytes, fragments: list[tuple[int, int]]) -> set[int] | None:
    """Frame starts found by codestream start markers (JPEG SOI, J2K SOC) at fragment starts."""
    first_item = fragments[0][0] - 8
    starts = {
        offset - 8 - first_item
        for offset, _ in fragments
        if buffer[offset : offset + 2] in (b"\xff\xd8", b"\xff\x4f")
        or buffer[offset + 4 : offset + 8] == b"jP  "
    }
    return starts or None


def _with_new_meta(
    data: bytes, dataset_start: int, meta: dict[str, str], syntax: str, parsed: dict[str, Any]
) -> bytes:
    """``data`` with a preamble and a File Meta that matches its data set."""
    source = meta.get("SourceApplicationEntityTitle") or None
    return part10(data[dataset_start:], parsed["sop_class"], parsed["sop_instance"], syntax,
                  source_ae_title=source)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10(
    dataset: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    *,
    source_ae_title: str | None = None,
) -> bytes:
    """A Part 10 file: preamble, File Meta Information (PS3.10 7.1), then ``dataset`` as is.

    Encoded by hand because it runs for every received instance and pydicom's general writer
    (with value validation) costs more than the rest of the header handling.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if source_ae_title:
        elements.append(_meta_element(0x0016, b"AE", _padded(source_ae_title.strip(), b" ")))
    body = b"".join(elements)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"".join((b"\x00" * 128, b"DICM", group_length, body, dataset))


__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "ParsedInstance",
    "is_known_transfer_syntax",
    "is_valid_uid",
    "require_uid",
    "parse_instance",
    "part10",
]
