"""DICOM JSON (PS3.18 Annex F) straight from pydicom's raw elements.

pydicom's ``Dataset.to_json_dict`` converts every element to a ``DataElement`` first and costs
about 20 us per element; a CT header with private tags took 5 ms, more than the rest of ingest
together. This module decodes the raw value bytes directly (struct for binary numbers, one
``bytes.decode`` for text in single-byte or UTF-8 character sets) and falls back to pydicom only
for what it alone does well (ISO 2022 escape sequences). The result is checked against
``to_json_dict`` over the whole public corpus in the tests.

Binary values longer than ``BULK_THRESHOLD`` are not inlined: they get a ``BulkDataURI`` of the
internal form ``bulk:<offset>:<length>`` (byte range in the stored file) or, when offsets do not
refer to the stored bytes (deflated transfer syntax), ``bulk:path:<tag>[/<item>/<tag>...]``.
The DICOMweb layer turns these into real URLs.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from io import BytesIO
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_sequence

BULK_THRESHOLD = 1024
# Text of a data set without Specific Character Set: the default repertoire is ASCII (PS3.5
# 6.1.2.2), yet modalities here send Vietnamese in UTF-8 unlabelled, and older ones Latin-1.
# Read as UTF-8 when it is valid UTF-8 (Latin-1 text seldom is), else as Latin-1, as pydicom
# reads it; so an unlabelled "Trần^Thị Bình" is indexed as written, not as "Tráº§n^Thá»...".
UNLABELLED = "utf-8, else latin-1"
DEFAULT_ENCODINGS = [UNLABELLED]

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Text VRs decoded with the Specific Character Set; the others are ASCII by definition.
CHARSET_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})
SINGLE_VALUED_TEXT = frozenset({"LT", "ST", "UT", "UR"})
# Leading spaces are significant only in these (PS3.5 Table 6.2-1).
KEEP_LEADING_SPACE = frozenset({"LT", "ST", "UT", "UC", "UR"})
NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                  "UV": "Q", "SV": "q"}
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}
_TEXT_DELIMITERS = {0x5C}
_SPECIFIC_CHARACTER_SET = 0x00080005
_PIXEL_REPRESENTATION = 0x00280103


class HeaderJSON:
    """Converts the elements of one instance's header into a DICOM JSON dict."""

    def __init__(
        self, *, offsets_valid: bool, buffer: bytes = b"", bulk_threshold: int = BULK_THRESHOLD
    ) -> None:
        # ``buffer`` is what the elements were read from: deferred values are sliced from it.
        self.offsets_valid = offsets_valid
        self.buffer = buffer
        self.bulk_threshold = bulk_threshold
        self.pixel_representation = 0

    def dataset(
        self,
        elements: Iterable[RawDataElement | DataElement],
        encodings: list[str] | None = None,
        path: str = "",
        base: int = 0,
    ) -> dict[str, Any]:
        """JSON dict of a dataset (top level or sequence item), in tag order.

        ``base`` is added to the elements' ``value_tell``: items of a defined-length sequence
        are parsed from a copy of its value, so their positions are relative to it.
        """
        encodings = list(encodings or DEFAULT_ENCODINGS)
        result: dict[str, Any] = {}
        creators: dict[int, str] = {}  # private block (group << 8 | xx) -> creator
        for elem in elements:
            tag = int(elem.tag)
            if tag & 0xFFFF == 0 or tag >> 16 == 0x0002:
                continue  # group lengths are not part of DICOM JSON; file meta is not data
            if tag == _SPECIFIC_CHARACTER_SET:
                encodings = _encodings_of(elem)
            key = f"{tag:08X}"
            creator = creators.get((tag >> 16) << 8 | (tag >> 8 & 0xFF)) if tag >> 16 & 1 else None
            obj = result[key] = self.element(elem, encodings, f"{path}{key}", creator, base)
            if tag == _PIXEL_REPRESENTATION and obj.get("Value"):
                self.pixel_representation = obj["Value"][0]
            elif tag >> 16 & 1 and 0x10 <= tag & 0xFFFF <= 0xFF and obj.get("Value"):
                creators[(tag >> 16) << 8 | (tag & 0xFF)] = str(obj["Value"][0])
        return result

    def element(
        self,
        elem: RawDataElement | DataElement,
        encodings: list[str],
        path: str,
        creator: str | None = None,
        base: int = 0,
    ) -> dict[str, Any]:
        """JSON object of one element (``creator``: its private creator, if private)."""
        tag = int(elem.tag)
        vr = self._vr(tag, elem.VR, creator)
        value = elem.value
        if isinstance(elem, DataElement):  # pydicom already parsed it: an undefined-length SQ
            if vr == "SQ":
                return self._sequence(list(value), encodings, path, base)
            return elem.to_json_dict(self.bulk_threshold, None)
        offset = base + elem.value_tell
        if value is None and elem.length and elem.length != 0xFFFFFFFF:
            if vr in BINARY_VRS and elem.length > self.bulk_threshold:
                return self._bulk(vr, offset, elem.length, path)
            value = self.buffer[offset : offset + elem.length]
        little = elem.is_little_endian
        implicit = elem.is_implicit_VR
        if elem.VR == "UN" and vr != "UN":
            implicit, little = True, True  # PS3.5 6.2.2: a known tag sent as UN is implicit LE
        if vr == "SQ" and isinstance(value, list):  # items already read (storage.rawread)
            return self._sequence(value, encodings, path, base)
        if vr == "SQ":
            items = read_sequence(
                BytesIO(value or b""), implicit, little, elem.length, encodings)
            return self._sequence(list(items), encodings, path, offset)
        if not value:
            return {"vr": vr}
        if vr in BINARY_VRS:
            return self._binary(vr, value, offset, elem.length, path)
        if vr in NUMBER_FORMATS:
            fmt = NUMBER_FORMATS[vr]
            count = len(value) // struct.calcsize(fmt)
            numbers = struct.unpack(f"{'<' if little else '>'}{count}{fmt}", value[: count *
                                    struct.calcsize(fmt)])
            return {"vr": vr, "Value": list(numbers)}
        if vr == "AT":
            count = len(value) // 4
            pairs = struct.unpack(f"{'<' if little else '>'}{count * 2}H", value[: count * 4])
            tags = [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]
            return {"vr": vr, "Value": tags}
        text = self._text(vr, value, encodings)
        if vr == "PN":
            names = [_person_name(v) for v in text.split("\\")]
            return {"vr": vr, "Value": names} if any(names) else {"vr": vr}
        values = [text] if vr in SINGLE_VALUED_TEXT else text.split("\\")
        values = [_strip(v, vr) for v in values]
        if vr in ("IS", "DS"):
            values = [_number(v, vr) for v in values]
        if all(v is None or v == "" for v in values):
            return {"vr": vr}
        return {"vr": vr, "Value": [None if v == "" else v for v in values]}

    def _sequence(
        self, items: list, encodings: list[str], path: str, base: int
    ) -> dict[str, Any]:
        if not items:
            return {"vr": "SQ", "Value": []}
        values = [
            self.dataset(item.elements() if isinstance(item, Dataset) else item, encodings,
                         f"{path}/{index}/", base)
            for index, item in enumerate(items)
        ]
        return {"vr": "SQ", "Value": values}

    def _binary(self, vr: str, value: bytes, offset: int, length: int, path: str) -> dict:
        if len(value) <= self.bulk_threshold:
            return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
        return self._bulk(vr, offset, length, path)

    def _bulk(self, vr: str, offset: int, length: int, path: str) -> dict:
        if self.offsets_valid and length != 0xFFFFFFFF:
            return {"vr": vr, "BulkDataURI": f"bulk:{offset}:{length}"}
        return {"vr": vr, "BulkDataURI": f"bulk:path:{path}"}

    def _vr(self, tag: int, vr: str | None, creator: str | None) -> str:
        if vr and vr != "UN":
            return str(vr)
        try:
            if tag >> 16 & 1:  # private group
                if 0x0010 <= tag & 0xFFFF <= 0x00FF:
                    return "LO"  # private creator
                if creator is None:
                    return "UN"
                known = private_dictionary_VR(tag, creator)
            else:
                known = dictionary_VR(tag)
        except KeyError:
            return vr or "UN"
        if " or " not in known:
            return known
        if "OW" in known:
            return "OW"
        return "SS" if self.pixel_representation == 1 and "SS" in known else "US"

    @staticmethod
    def _text(vr: str, value: bytes, encodings: list[str]) -> str:
        if vr not in CHARSET_VRS:
            return value.decode("ascii", errors="replace")
        if encodings[0] == UNLABELLED:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return value.decode("latin-1")
        if len(encodings) == 1 or b"\x1b" not in value:
            return value.decode(encodings[0], errors="replace")
        delimiters = _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS
        return decode_bytes(value, encodings, delimiters)


def _encodings_of(elem: RawDataElement | DataElement) -> list[str]:
    """Python codec names for a Specific Character Set element (unknown terms: pydicom warns).
    The default repertoire named (``ISO_IR 6``), or a term pydicom does not know
    (``ISO_IR 999``: it reads the default), says no more than no element: ``UNLABELLED``."""
    raw = elem.value or b""
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else raw
    terms = list(text) if isinstance(text, list) else str(text).split("\\")
    encodings = list(convert_encodings([t.strip() for t in terms]))
    return list(DEFAULT_ENCODINGS) if encodings in ([], ["iso8859"]) else encodings


def _strip(value: str, vr: str) -> str:
    value = value.rstrip("\x00 ")
    return value if vr in KEEP_LEADING_SPACE else value.lstrip(" ")


def _number(value: str | None, vr: str) -> Any:
    if not value:
        return value
    try:
        return int(value) if vr == "IS" else float(value)
    except ValueError:
        if vr == "IS":
            try:  # some writers put "12.0" in IS
                number = float(value)
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
        return value  # invalid number: keep the text rather than lose it


def _person_name(value: str) -> dict[str, str] | None:
    groups = value.rstrip("\x00 ").split("=")
    name = {key: group.rstrip(" ") for key, group in zip(
        ("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False) if group.rstrip(" ")}
    return name or None


