"""Translation between C-FIND/C-MOVE/C-GET identifiers and ``storage.query``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from storage.attributes import BY_KEYWORD, Level
from storage.parsing import is_valid_uid
from storage.query import NameMatching, Query

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
_CONTROL_TAGS = {QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET}
_SINGLE_VALUED_TEXT = {"LT", "ST", "UT", "UR"}


class IdentifierError(ValueError):
    """The identifier cannot be answered (bad level, missing unique key...)."""


@dataclass(frozen=True)
class RequestedKey:
    """One element of a C-FIND identifier: a return key, and a matching key if it has a value."""

    tag: int
    keyword: str
    vr: str
    value: str
    item_keys: tuple[RequestedKey, ...] = ()


def read_unlabelled_as_utf8(identifier: Dataset) -> None:
    """Have an identifier without Specific Character Set read as UTF-8 (ASCII is a subset, and
    some modalities send UTF-8 unlabelled), items of its sequences too. pydicom decodes a value
    with the character set the data set was read with: giving the identifier the attribute
    alone, after reading, left its values read as Latin-1 (``Nguyễn`` became ``Nguyá»\x85n``,
    and found the patients whose names had been stored so)."""
    if "SpecificCharacterSet" not in identifier:
        identifier.set_original_encoding(*identifier.original_encoding, "utf_8")
        identifier.SpecificCharacterSet = "ISO_IR 192"


def parse_identifier(identifier: Dataset) -> tuple[Level, list[RequestedKey]]:
    """Level and keys of an identifier. Values are decoded with its Specific Character Set,
    or as UTF-8 when it has none (``read_unlabelled_as_utf8``)."""
    read_unlabelled_as_utf8(identifier)
    try:
        level = Level.from_dicom(str(identifier.get("QueryRetrieveLevel", "")))
    except ValueError as exc:
        raise IdentifierError(str(exc)) from None
    keys = [key for elem in identifier if (key := _requested_key(elem)) is not None]
    return level, keys


def _requested_key(elem: DataElement) -> RequestedKey | None:
    tag = int(elem.tag)
    if tag in _CONTROL_TAGS or elem.tag.is_private or elem.tag.element == 0:
        return None
    keyword = keyword_for_tag(tag) or f"{tag:08X}"
    if elem.VR == "SQ":
        items = elem.value or []
        item_keys = tuple(
            key for key in (_requested_key(e) for e in items[0]) if key is not None
        ) if len(items) else ()
        return RequestedKey(tag, keyword, "SQ", "", item_keys)
    return RequestedKey(tag, keyword, str(elem.VR), _match_text(elem.value))


def _match_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_match_text(v) for v in value)
    if isinstance(value, bytes):
        return ""
    return str(value).strip()


def build_query(level: Level, keys: Iterable[RequestedKey], name_matching: NameMatching,
                limit: int | None = None) -> Query:
    """The archive query for an identifier: its matching keys, and JSON for other return keys."""
    matching: dict[str, str] = {}
    extra: set[str] = set()
    for key in keys:
        if key.vr == "SQ":
            for item_key in key.item_keys:
                name = f"{key.keyword}.{item_key.keyword}"
                if name in BY_KEYWORD and item_key.value:
                    matching[name] = item_key.value
            extra.add(f"{key.tag:08X}")
        elif key.keyword in BY_KEYWORD:
            if key.value:
                matching[key.keyword] = key.value
        elif key.tag not in (RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY):
            extra.add(f"{key.tag:08X}")
    return Query(level, matching, name_matching, limit=limit, extra_tags=frozenset(extra))


def unmatched_keys(level: Level, keys: Iterable[RequestedKey]) -> list[str]:
    """Keys given a value that the archive does not match on at ``level`` (not indexed, of a
    lower level, or counts), which C-FIND answers with pending status 0xFF01 (PS3.4 C.4.1.1.4:
    optional keys not supported for matching), so the requester knows its filter was not
    applied."""
    unmatched = []
    for key in keys:
        if key.tag in (RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY):
            continue
        items = [(f"{key.keyword}.{item.keyword}", item.value) for item in key.item_keys] \
            if key.vr == "SQ" else [(key.keyword, key.value)]
        for name, value in items:
            attribute = BY_KEYWORD.get(name)
            if value and (attribute is None or attribute.level.value > level.value
                          or attribute.aggregate and name != "ModalitiesInStudy"
                          or name == "ModalitiesInStudy" and level is Level.PATIENT):
                unmatched.append(name)
    return unmatched


@dataclass(frozen=True)
class Response:
    """One C-FIND answer: (tag, VR, value) elements, plain values or DICOM JSON objects."""

    elements: list[tuple[int, str, Any]]
    utf8: bool


def build_response(level: Level, keys: Iterable[RequestedKey], row: dict[str, Any],
                   ae_title: str) -> Response:
    """The C-FIND response identifier for one matching row: every requested key.

    Indexed values are plain (str, int, None); values from the stored header are kept as their
    DICOM JSON object (a dict) and turned into plain values when they are simple.
    """
    elements: list[tuple[int, str, Any]] = [(QUERY_RETRIEVE_LEVEL, "CS", level.dicom)]
    non_ascii = False
    extra = row.get("_extra", {})
    for key in keys:
        if key.tag == RETRIEVE_AE_TITLE:
            value: Any = ae_title
        elif key.tag == INSTANCE_AVAILABILITY:
            value = "ONLINE"
        elif key.keyword in BY_KEYWORD and key.vr != "SQ":
            value = row.get(key.keyword)
        elif (obj := extra.get(f"{key.tag:08X}")) is not None:
            value = _plain(obj)
            elements.append((key.tag, obj.get("vr", key.vr), value))
            non_ascii = non_ascii or not _is_ascii(value)
            continue
        else:
            value = None
        elements.append((key.tag, key.vr, value))
        non_ascii = non_ascii or not _is_ascii(value)
    if non_ascii:
        elements.append((SPECIFIC_CHARACTER_SET, "CS", "ISO_IR 192"))
    return Response(elements, non_ascii)


def _plain(obj: dict[str, Any]) -> Any:
    """A DICOM JSON element as a plain value when it is text or numbers, else the object."""
    if obj.get("vr") == "SQ" or "InlineBinary" in obj or "BulkDataURI" in obj:
        return obj
    values = obj.get("Value")
    if not values:
        return None
    if obj.get("vr") == "PN":
        return "\\".join("=".join((v or {}).get(k, "") for k in
                                   ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
                          for v in values)
    if any(isinstance(v, dict | list) for v in values):
        return obj
    return "\\".join("" if v is None else str(v) for v in values)


def _is_ascii(value: Any) -> bool:
    if value is None or isinstance(value, int):
        return True
    if isinstance(value, dict):
        return value.get("vr") != "SQ" and str(value).isascii()
    return str(value).isascii()


def response_dataset(response: Response) -> Dataset:
    """The response as a pydicom Dataset, for pynetdicom to encode (the general path)."""
    ds = Dataset()
    for tag, vr, value in response.elements:
        if isinstance(value, dict):
            try:
                ds.add(Dataset.from_json({f"{tag:08X}": value})[tag])
                continue
            except Exception:
                value = None
        if isinstance(value, str) and "\\" in value and vr not in _SINGLE_VALUED_TEXT:
            value = value.split("\\")
        ds.add_new(tag, vr, None if value == "" else value)
    return ds


# The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1).
_UNIQUE_KEYS = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID",
                Level.SERIES: "SeriesInstanceUID", Level.INSTANCE: "SOPInstanceUID"}


def retrieve_keys(identifier: Dataset, *, patient_root: bool) -> tuple[Level, dict[str, str]]:
    """Level and unique keys of a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1, hierarchical).

    The level must belong to the model (the Study Root has no PATIENT level) and its unique key
    must be given: the instances are those it names. Unique keys of the levels above narrow it
    when given (many requesters leave them out). A unique key of a level below is refused:
    ignored, it would send more than was asked for (a whole series for one instance). The
    messages fit an Error Comment (64 characters)."""
    level, keys = parse_identifier(identifier)
    if level is Level.PATIENT and not patient_root:
        raise IdentifierError("PATIENT level is not in the Study Root model; use STUDY")
    given = {k.keyword: k.value for k in keys if k.keyword in _UNIQUE_KEYS.values() and k.value}
    own = _UNIQUE_KEYS[level]
    if own not in given:
        raise IdentifierError(f"{own} is missing or empty ({level.dicom} level)")
    for below, keyword in _UNIQUE_KEYS.items():
        if below.value > level.value and keyword in given:
            raise IdentifierError(f"{keyword} is below the {level.dicom} level; retrieve at "
                                  f"{below.dicom}")
    # PS3.4 C.4.2.2.1: a retrieve's unique keys hold a single value or a list of UIDs, never
    # wildcards; matched as C-FIND keys, "*" would name the whole archive.
    for keyword, value in given.items():
        if keyword == "PatientID":
            if any(c in value for c in "*?\\"):
                raise IdentifierError(f"PatientID {value[:32]!r}: one value, without wildcards")
        elif not all(is_valid_uid(uid.strip()) for uid in value.split("\\")):
            raise IdentifierError(f"{keyword}: not a UID or a list of UIDs (no wildcards)")
    return level, given

