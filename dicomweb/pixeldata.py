"""Pixel data in WADO-RS metadata (PS3.18 10.4.3.3.2), from the index, and its value by range.

The stored header stops before the pixel data (``storage.parsing``), yet the metadata of an
instance has every attribute, bulk data by a BulkDataURI. What the index row knows says, without
opening the file, whether there is pixel data (frame offsets are recorded for any; a deflated
data set, or frames that do not start on a byte, have none, and then Rows tells), which
element it is and its VR:

* Float Pixel Data (7FE0,0008, OF) and Double Float Pixel Data (7FE0,0009, OD): a Parametric
  Map with Bits Allocated 32 or 64 (PS3.3 C.8.32.2: 16 for Pixel Data, 32 for Float, 64 for
  Double Float Pixel Data);
* otherwise Pixel Data (7FE0,0010): OB when encapsulated; OW in Implicit VR Little Endian or
  when Bits Allocated passes 8; else OB (PS3.5 8.2: at 8 bits or fewer the writer may have
  chosen OW; the bytes are the same, there being no order to swap).

The BulkDataURI is ``…/bulkdata/path/<tag>``. ``value_span`` finds it reading the element's
value alone, found by the frame offsets: the element header just before the first frame, or,
encapsulated, before the Basic Offset Table item that precedes the first fragment. The value is
as stored: for encapsulated data the items, without the sequence delimiter, as pydicom gives.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from dicomweb import transcode

PIXEL_DATA_TAGS = frozenset({"7FE00010", "7FE00008", "7FE00009"})
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_ITEM = b"\xfe\xff\x00\xe0"
_UNDEFINED = b"\xff\xff\xff\xff"


def pixel_data_element(row: dict[str, Any]) -> tuple[str, str] | None:
    """(tag, VR) of the pixel data of the instance ``row`` (an index row); None without."""
    if not _has_pixel_data(row):
        return None
    bits = int(row.get("BitsAllocated") or 0)
    syntax = row["_transfer_syntax_uid"]
    if row.get("SOPClassUID") == PARAMETRIC_MAP and bits in (32, 64):
        return ("7FE00008", "OF") if bits == 32 else ("7FE00009", "OD")
    if transcode.is_compressed(syntax):
        return "7FE00010", "OB"
    return "7FE00010", "OW" if syntax == IMPLICIT_LE or bits > 8 else "OB"


def with_pixel_data(header: str, row: dict[str, Any], instance_url: str) -> str:
    """The DICOM JSON text ``header`` of ``row`` with its pixel data element added (last: its
    tag is the highest the header can hold), a BulkDataURI under ``instance_url``."""
    element = pixel_data_element(row)
    if element is None:
        return header
    tag, vr = element
    value = json.dumps({"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/path/{tag}"},
                       separators=(",", ":"))
    return f'{header[:-1]}{"," if header != "{}" else ""}"{tag}":{value}}}'


def value_span(read: Callable[[int, int], bytes], row: dict[str, Any], tag: str
               ) -> tuple[int, int] | None:
    """(offset, length) in the stored file of the value of the top-level pixel data element
    ``tag`` of the instance ``row``, found where its frame offsets say, reading only the
    element's header with ``read(offset, length)``; None when it cannot be found so (no
    offsets, or no such element there): then the file must be parsed."""
    frames = json.loads(row["_frames"]) if row.get("_frames") else None
    if not frames or not frames[0]:
        return None
    if transcode.is_compressed(row["_transfer_syntax_uid"]):
        start = _encapsulated_start(read, frames, tag)
        if start is None:
            return None
        end = max(frame[i] + frame[i + 1] for frame in frames for i in range(0, len(frame), 2))
        return start, end - start
    found = _native_element(read, row, tag)
    return found[:2] if found else None


def stored_vr(read: Callable[[int, int], bytes], row: dict[str, Any], tag: str) -> str | None:
    """The VR the stored file gives the native top-level pixel data element ``tag`` (at 8 bits
    OB or OW, which ``pixel_data_element`` cannot tell: in Big Endian it decides the byte
    order); None when the file does not say (Implicit VR) or it cannot be found so."""
    found = _native_element(read, row, tag)
    return found[2] if found else None


def _native_element(read: Callable[[int, int], bytes], row: dict[str, Any], tag: str
                    ) -> tuple[int, int, str | None] | None:
    """(value offset, length, VR or None in Implicit VR) of native pixel data ``tag``, by the
    element header just before the first frame."""
    frames = json.loads(row["_frames"]) if row.get("_frames") else None
    syntax = row["_transfer_syntax_uid"]
    if not frames or not frames[0] or transcode.is_compressed(syntax):
        return None
    first = frames[0][0]
    size = 8 if syntax == IMPLICIT_LE else 12  # tag, (VR, reserved,) 4-byte length
    if first < size:
        return None
    head = read(first - size, size)
    endian = ">" if syntax == BIG_ENDIAN else "<"
    group, element, length = struct.unpack(f"{endian}HH{size - 8}xI", head)
    if f"{group:04X}{element:04X}" != tag or length == 0xFFFFFFFF or (
            size == 12 and head[4:6] not in (b"OB", b"OW", b"OF", b"OD", b"UN")):
        return None
    return first, length, head[4:6].decode() if size == 12 else None


def _encapsulated_start(read: Callable[[int, int], bytes], frames: list[list[int]], tag: str
                        ) -> int | None:
    """Offset of the value of encapsulated pixel data (its Basic Offset Table item), found by
    the element header before that item; the table holds at most one offset a fragment."""
    fragments = sum(len(frame) // 2 for frame in frames)
    table_item = frames[0][0] - 8  # the first fragment's item header, right after the table
    lowest = max(0, table_item - 4 * fragments - 8 - 12)
    window = read(lowest, table_item - lowest)
    code = bytes.fromhex(tag)
    tag_bytes = code[1::-1] + code[:1:-1]  # group and element, little endian
    at = window.rfind(tag_bytes)
    while at >= 0:
        # OB as PS3.5 A.4 says; some writers put OW (or UN) there, the bytes are the same.
        item = window[at + 12:at + 20]
        if window[at + 4:at + 6] in (b"OB", b"OW", b"UN") and \
                window[at + 6:at + 12] == b"\x00\x00" + _UNDEFINED and item[:4] == _ITEM and \
                at + 20 + int.from_bytes(item[4:], "little") == len(window):
            return lowest + at + 12
        at = window.rfind(tag_bytes, 0, at)
    return None


def _has_pixel_data(row: dict[str, Any]) -> bool:
    if row.get("_frames") is not None:
        return True  # offsets are recorded for pixel data only
    if not row.get("Rows"):
        return False  # Rows is required with pixel data
    if row["_transfer_syntax_uid"] == DEFLATED:
        return True
    pixels = int(row.get("Rows") or 0) * int(row.get("Columns") or 0)
    return int(row.get("BitsAllocated") or 0) == 1 and pixels % 8 != 0  # bit-packed frames
