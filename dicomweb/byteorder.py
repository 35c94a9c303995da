"""Bulk data in Little Endian byte order (PS3.18 8.7.3.3), whatever the stored transfer syntax.

A bulk data value is served as the bytes stored in the file (``wado.bulk_bytes``); from an
Explicit VR Big Endian instance those are big endian. OW, OL, OF, OD and OV values are swapped
here word by word, the word being their VR's (PS3.5 7.3); Pixel Data by its Bits Allocated.
OB and UN values are bytes, with no order to change.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR

EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# The two forms of a bulk data reference in this server's URLs (``wado.bulk_span``): a byte
# range of the stored file, or the path to an element (tag, then item and tag per sequence).
BULK_RANGE_SPEC = re.compile(r"(\d+)-(\d+)")
BULK_PATH_SPEC = re.compile(r"path/([0-9A-Fa-f]{8}(?:/\d+/[0-9A-Fa-f]{8})*)")
WORD_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = "7FE00010"
_BITS_ALLOCATED = "00280100"


def little_endian_bulk(data: bytes, spec: str, header: str, stored_syntax: str,
                       pixel_vr: str | None = None) -> bytes:
    """``data``, the stored value of the bulk data ``spec`` (as in its URL: ``<offset>-<length>``
    or ``path/<tag>...``) of an instance stored in ``stored_syntax`` whose DICOM JSON header is
    ``header``, in little endian byte order; ``pixel_vr``: the VR the file gives its pixel
    data, when known (the header has no pixel data element)."""
    if stored_syntax != EXPLICIT_BIG_ENDIAN:
        return data
    return swap_words(data, word_size(json.loads(header), spec, pixel_vr))


def swap_words(data: bytes, size: int) -> bytes:
    """Big endian words of ``size`` bytes to little endian (a trailing part word as it is)."""
    if size < 2:
        return data
    whole = len(data) - len(data) % size
    swapped = np.frombuffer(data, f">u{size}", count=whole // size).astype(f"<u{size}")
    return swapped.tobytes() + data[whole:]


def word_size(header: dict[str, Any], spec: str, pixel_vr: str | None = None) -> int:
    """Bytes per word of the element ``spec`` names in the DICOM JSON ``header`` (1: bytes);
    8-bit pixel data by ``pixel_vr`` when given (OW: 16-bit words holding two pixels)."""
    found = (_by_range(header, spec) if BULK_RANGE_SPEC.fullmatch(spec)
             else _by_path(header, spec))
    if found is None:
        return 1  # not in the header: wado.bulk_bytes has refused it already
    tag, element, owner = found
    vr = element.get("vr") if element else None
    if tag == _PIXEL_DATA:
        bits = _first_value(owner.get(_BITS_ALLOCATED)) or 8
        if bits > 16:  # as pydicom reads them: words of the pixel's size
            return bits // 8
        vr = vr or pixel_vr or ("OW" if bits > 8 else "OB")
    if vr is None:
        try:
            vr = dictionary_VR(int(tag, 16))
        except KeyError:
            return 1
    return WORD_SIZES.get(vr, 1)


def _by_range(header: dict[str, Any], spec: str
              ) -> tuple[str, dict[str, Any] | None, dict[str, Any]] | None:
    """(tag, element, the data set holding it) of the element whose value is the byte range
    ``spec``, searched through sequences."""
    offset, length = BULK_RANGE_SPEC.fullmatch(spec).groups()
    uri = f"bulk:{int(offset)}:{int(length)}"

    def search(dataset: dict[str, Any]):
        for tag, element in dataset.items():
            if element.get("BulkDataURI") == uri:
                return tag, element, dataset
            for item in element.get("Value", []) if element.get("vr") == "SQ" else []:
                if isinstance(item, dict) and (found := search(item)) is not None:
                    return found
        return None

    return search(header)


def _by_path(header: dict[str, Any], spec: str
             ) -> tuple[str, dict[str, Any] | None, dict[str, Any]] | None:
    """(tag, element or None when the header leaves it out, the data set holding it) of the
    element at ``path/<tag>[/<item>/<tag>...]``."""
    match = BULK_PATH_SPEC.fullmatch(spec)
    if match is None:
        return None
    steps = match.group(1).upper().split("/")
    dataset = header
    for position in range(0, len(steps) - 1, 2):
        items = (dataset.get(steps[position]) or {}).get("Value") or []
        index = int(steps[position + 1])
        if index >= len(items) or not isinstance(items[index], dict):
            return None
        dataset = items[index]
    return steps[-1], dataset.get(steps[-1]), dataset


def _first_value(element: dict[str, Any] | None) -> int | None:
    values = (element or {}).get("Value") or []
    return int(values[0]) if values and isinstance(values[0], int | float) else None
