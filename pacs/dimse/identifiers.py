"""Translation between C-FIND/C-MOVE/C-GET identifiers and ``storage.query``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from storage.attributes import BY_KEYWORD, Level
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


def parse_identifier(identifier: Dataset) -> tuple[Level, list[RequestedKey]]:
    """Level and keys of an identifier. Values are decoded with its Specific Character Set,
    or as UTF-8 when it has none (ASCII is a subset, and some modalities send UTF-8 unlabelled).
    """
    if "SpecificCharacterSet" not in identifier:
        identifier.SpecificCharacterSet = "ISO_IR 192"
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


def build_response(level: Level, keys: Iterable[RequestedKey], row: dict[str, Any],
                   ae_title: str) -> Dataset:
    """The C-FIND response identifier for one matching row: every requested key, in order."""
    response = Dataset()
    response.QueryRetrieveLevel = level.dicom
    non_ascii = False
    extra = row.get("_extra", {})
    for key in keys:
        tag_hex = f"{key.tag:08X}"
        if key.tag == RETRIEVE_AE_TITLE:
            value: Any = ae_title
        elif key.tag == INSTANCE_AVAILABILITY:
            value = "ONLINE"
        elif key.keyword in BY_KEYWORD and key.vr != "SQ":
            value = _element_value(key.vr, row.get(key.keyword))
        elif tag_hex in extra:
            element = _from_json(tag_hex, extra[tag_hex])
            if element is not None:
                response.add(element)
                non_ascii = non_ascii or _has_non_ascii(element.value)
            else:
                response.add_new(key.tag, key.vr, None)
            continue
        else:
            value = None
        response.add_new(key.tag, key.vr, value)
        non_ascii = non_ascii or _has_non_ascii(value)
    if non_ascii:
        response.SpecificCharacterSet = "ISO_IR 192"
    return response


def _element_value(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str) and "\\" in value and vr not in _SINGLE_VALUED_TEXT:
        return value.split("\\")
    return value


def _from_json(tag_hex: str, obj: dict[str, Any]) -> DataElement | None:
    if "BulkDataURI" in obj:
        return None
    try:
        dataset = Dataset.from_json({tag_hex: obj})
    except Exception:
        return None
    return dataset[int(tag_hex, 16)]


def _has_non_ascii(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, list | tuple | MultiValue):
        return any(_has_non_ascii(v) for v in value)
    if isinstance(value, Sequence):
        return any(_has_non_ascii(e.value) for item in value for e in item)
    return not str(value).isascii()


def retrieve_keys(identifier: Dataset) -> tuple[Level, dict[str, str]]:
    """Level and unique keys of a C-MOVE/C-GET identifier (at least one must be given)."""
    level, keys = parse_identifier(identifier)
    unique = {k.keyword: k.value for k in keys
              if k.keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                               "SOPInstanceUID") and k.value}
    if not unique:
        raise IdentifierError("the identifier names no patient, study, series or instance "
                              "(PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)")
    return level, unique


def vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
