"""A fast reader for the common case: File Meta and Explicit VR Little Endian data sets.

Every received instance goes through here, and pydicom's general reader (with a FileMetaDataset
that validates each value, and a generator built for every case) took about half of the CPU of
storing a small image. This reader handles group 0002 and Explicit VR Little Endian (which also
covers all compressed transfer syntaxes); ``storage.parsing`` uses pydicom for everything else
(Implicit VR, Big Endian, deflated data sets) and whenever this reader finds something odd.
The elements it returns are pydicom ``RawDataElement`` tuples; sequence values are lists of
items, each a list of elements.
"""

from __future__ import annotations

import struct

from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_short = struct.Struct("<HH2sH").unpack_from
_long_length = struct.Struct("<I").unpack_from
_tag_length = struct.Struct("<HHI").unpack_from


class UnusualEncoding(Exception):
    """Something this reader does not handle: use pydicom's reader instead."""


class Truncated(Exception):
    """The data set ends inside an element: it was cut short (no other reader does better)."""


def read_file_meta(data: bytes, start: int) -> tuple[dict[str, str], int]:
    """Group 0002 elements from ``start`` (just after 'DICM'): keyword-ish dict and end offset."""
    wanted = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID",
              0x0010: "TransferSyntaxUID", 0x0016: "SourceApplicationEntityTitle"}
    meta: dict[str, str] = {}
    pos, end = start, len(data)
    while pos + 8 <= end:
        group, element, vr, length = _short(data, pos)
        if group != 0x0002:
            break
        if not (vr.isalpha() and vr.isupper()):
            raise UnusualEncoding("File Meta not in Explicit VR")
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise UnusualEncoding("File Meta ends inside an element's header")
            (length,) = _long_length(data, pos + 8)
            value_start = pos + 12
        else:
            value_start = pos + 8
        if length == _UNDEFINED or value_start + length > end:
            raise UnusualEncoding("File Meta element of undefined or impossible length")
        if element in wanted:
            meta[wanted[element]] = data[value_start:value_start + length].decode(
                "ascii", "replace").strip("\x00 ")
        pos = value_start + length
    return meta, pos


def read_dataset(data: bytes, start: int, stop_tags: frozenset[int]
                 ) -> tuple[list[RawDataElement], int | None]:
    """Top-level elements of an Explicit VR Little Endian data set from ``start``.

    Stops before the first top-level element whose tag is in ``stop_tags`` and returns its
    offset (None when the data set ends first).
    """
    elements, pos, stopped = _elements(data, start, len(data), stop_tags, delimited=False)
    return elements, pos if stopped else None


def _elements(data: bytes, pos: int, end: int, stop_tags: frozenset[int], *,
              delimited: bool) -> tuple[list[RawDataElement], int, bool]:
    """Elements from ``pos``: up to ``end`` exactly, or (``delimited``) up to an item
    delimiter. Returns them, the offset after them, and whether a stop tag ended the run."""
    elements: list[RawDataElement] = []
    top_level = end == len(data) and not delimited
    while pos + 8 <= end:
        group, element, vr, length = _short(data, pos)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if not delimited:
                raise UnusualEncoding("item delimiter where none belongs")
            return elements, pos + 8, False
        if tag in stop_tags:
            return elements, pos, True
        if not (vr.isalpha() and vr.isupper()):
            raise UnusualEncoding(f"no explicit VR at offset {pos}")
        if vr in _LONG_VRS:
            if pos + 12 > end:
                if top_level:
                    raise Truncated(f"the data ends inside the header of ({group:04X},"
                                    f"{element:04X})")
                raise UnusualEncoding("element header cut short")
            (length,) = _long_length(data, pos + 8)
            value_start = pos + 12
        else:
            value_start = pos + 8
        if length == _UNDEFINED:
            if vr == b"SQ":
                items, pos = _sequence(data, value_start, end, delimited=True)
                elements.append(RawDataElement(BaseTag(tag), "SQ", _UNDEFINED, items,
                                               value_start, False, True))
                continue
            if vr == b"UN":
                raise UnusualEncoding("undefined-length UN (an implicit VR sequence)")
            value_end = _skip_encapsulated(data, value_start, end)
            elements.append(RawDataElement(BaseTag(tag), vr.decode("ascii"), _UNDEFINED,
                                           data[value_start:value_end - 8], value_start,
                                           False, True))
            pos = value_end
            continue
        value_end = value_start + length
        if value_end > end:
            if top_level:
                raise Truncated(f"({group:04X},{element:04X}) has {length} bytes, the data "
                                f"only {end - value_start} more")
            raise UnusualEncoding("value runs past the end of the data")
        if vr == b"SQ":
            items, _ = _sequence(data, value_start, value_end, delimited=False)
            elements.append(RawDataElement(BaseTag(tag), "SQ", length, items, value_start,
                                           False, True))
        else:
            elements.append(RawDataElement(BaseTag(tag), vr.decode("ascii"), length,
                                           data[value_start:value_end], value_start,
                                           False, True))
        pos = value_end
    if delimited:
        raise UnusualEncoding("item without its delimiter")
    if pos != end:
        if top_level:
            raise Truncated(f"the data ends inside an element's header at offset {pos}")
        raise UnusualEncoding("trailing bytes after the last element")
    return elements, pos, False


def _sequence(data: bytes, pos: int, end: int, *, delimited: bool
              ) -> tuple[list[list[RawDataElement]], int]:
    """Items of a sequence value from ``pos``, and the offset after the value: ``end`` for a
    defined length, or the end of the sequence delimitation item."""
    items: list[list[RawDataElement]] = []
    while pos + 8 <= end:
        group, element, length = _tag_length(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END and delimited:
            return items, pos + 8
        if tag != _ITEM:
            raise UnusualEncoding(f"expected an item at offset {pos}")
        if length == _UNDEFINED:
            elements, pos, _ = _elements(data, pos + 8, end, frozenset(), delimited=True)
        else:
            if pos + 8 + length > end:
                raise UnusualEncoding("item runs past its sequence")
            elements, pos, _ = _elements(data, pos + 8, pos + 8 + length, frozenset(),
                                         delimited=False)
        items.append(elements)
    if delimited or pos != end:
        raise UnusualEncoding("sequence without its end")
    return items, pos


def _skip_encapsulated(data: bytes, pos: int, end: int) -> int:
    """Offset just after the sequence delimiter of an undefined-length (encapsulated) value."""
    while pos + 8 <= end:
        group, element, length = _tag_length(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > end:
            raise UnusualEncoding("malformed encapsulated value")
        pos += 8 + length
    raise UnusualEncoding("encapsulated value without its delimiter")
