"""The attributes the index keeps as columns, per level: what C-FIND and QIDO-RS match on.

One table drives three things: the index columns (``storage.index``), the values extracted at
ingest (``index_values``), and matching and return values (``storage.query``). To match on a
new attribute, add it here and write a migration for its column.

Sources: PS3.18 Table 10.6.1-5 (QIDO-RS matching attributes), PS3.4 C.6 (C-FIND keys of the
Patient Root and Study Root information models), and what study lists usually show.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from storage.names import casefold_person_name, fold_person_name


class Level(enum.Enum):
    """Query/retrieve levels, top to bottom (C-FIND's IMAGE is INSTANCE here)."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    INSTANCE = 3

    @classmethod
    def from_dicom(cls, value: str) -> Level:
        """From a QueryRetrieveLevel value (``IMAGE`` means ``INSTANCE``)."""
        text = (value or "").strip().upper()
        if text == "IMAGE":
            return cls.INSTANCE
        try:
            return cls[text]
        except KeyError:
            raise ValueError(f"query/retrieve level {value!r} is not one of PATIENT, STUDY, "
                             "SERIES, IMAGE") from None

    @property
    def dicom(self) -> str:
        return "IMAGE" if self is Level.INSTANCE else self.name


_RAS = "RequestAttributesSequence"


@dataclass(frozen=True)
class IndexedAttribute:
    """A DICOM attribute stored as a column of the table of its level."""

    keyword: str
    level: Level
    column: str
    tag: int
    vr: str
    # Filled by the index from instance counts, not read from the instance.
    aggregate: bool = False
    # For items of a sequence flattened into a column: "RequestAttributesSequence".
    sequence: str | None = None

    @property
    def tag_hex(self) -> str:
        return f"{self.tag:08X}"


def _snake(keyword: str) -> str:
    keyword = keyword.replace("IDs", "Ids")
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", keyword)
    return words.lower()


def _attr(keyword: str, level: Level, column: str | None = None, *, aggregate: bool = False,
          sequence: str | None = None) -> IndexedAttribute:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    vr = dictionary_VR(tag)
    prefix = "request_" if sequence == _RAS else ""
    return IndexedAttribute(keyword, level, column or prefix + _snake(keyword), tag, vr,
                            aggregate, sequence)


P, ST, SE, IN = Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE

ATTRIBUTES: tuple[IndexedAttribute, ...] = (
    # Patient (Patient Root PATIENT level; shown at every lower level too)
    _attr("PatientName", P),
    _attr("PatientID", P),
    _attr("IssuerOfPatientID", P),
    _attr("PatientBirthDate", P),
    _attr("PatientBirthTime", P),
    _attr("PatientSex", P),
    _attr("OtherPatientIDs", P),
    _attr("NumberOfPatientRelatedStudies", P, "num_studies", aggregate=True),
    _attr("NumberOfPatientRelatedSeries", P, "num_series", aggregate=True),
    _attr("NumberOfPatientRelatedInstances", P, "num_instances", aggregate=True),
    # Study
    _attr("StudyInstanceUID", ST),
    _attr("StudyDate", ST),
    _attr("StudyTime", ST),
    _attr("AccessionNumber", ST),
    _attr("StudyID", ST),
    _attr("StudyDescription", ST),
    _attr("ReferringPhysicianName", ST),
    _attr("PatientAge", ST),
    _attr("ModalitiesInStudy", ST, aggregate=True),
    _attr("NumberOfStudyRelatedSeries", ST, "num_series", aggregate=True),
    _attr("NumberOfStudyRelatedInstances", ST, "num_instances", aggregate=True),
    # Series
    _attr("SeriesInstanceUID", SE),
    _attr("Modality", SE),
    _attr("SeriesNumber", SE),
    _attr("SeriesDescription", SE),
    _attr("SeriesDate", SE),
    _attr("SeriesTime", SE),
    _attr("BodyPartExamined", SE),
    _attr("Laterality", SE),
    _attr("ProtocolName", SE),
    _attr("StationName", SE),
    _attr("Manufacturer", SE),
    _attr("InstitutionName", SE),
    _attr("PerformedProcedureStepStartDate", SE),
    _attr("PerformedProcedureStepStartTime", SE),
    _attr("ScheduledProcedureStepID", SE, sequence=_RAS),
    _attr("RequestedProcedureID", SE, sequence=_RAS),
    _attr("NumberOfSeriesRelatedInstances", SE, "num_instances", aggregate=True),
    # Instance
    _attr("SOPInstanceUID", IN),
    _attr("SOPClassUID", IN),
    _attr("InstanceNumber", IN),
    _attr("ContentDate", IN),
    _attr("ContentTime", IN),
    _attr("Rows", IN, "pixel_rows"),
    _attr("Columns", IN, "pixel_columns"),
    _attr("BitsAllocated", IN),
    _attr("NumberOfFrames", IN),
)

BY_KEYWORD: dict[str, IndexedAttribute] = {
    (f"{a.sequence}.{a.keyword}" if a.sequence else a.keyword): a for a in ATTRIBUTES
}
INTEGER_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})


def level_attributes(level: Level) -> tuple[IndexedAttribute, ...]:
    return tuple(a for a in ATTRIBUTES if a.level is level)


def json_values(header: dict[str, Any], tag_hex: str) -> list[Any]:
    """The Value list of an element in a DICOM JSON dict (empty when absent)."""
    return (header.get(tag_hex) or {}).get("Value") or []


def pn_to_text(value: dict[str, str] | str | None) -> str:
    """DICOM string form of a JSON PN value: ``Alphabetic=Ideographic=Phonetic``."""
    if not value:
        return ""
    if isinstance(value, str):
        return value
    groups = [value.get("Alphabetic", ""), value.get("Ideographic", ""), value.get("Phonetic", "")]
    return "=".join(groups).rstrip("=")


def normalise_date(value: str) -> str:
    """``YYYYMMDD`` from DA, also from the old ``YYYY.MM.DD`` form."""
    return value.replace(".", "").strip()


def normalise_time(value: str) -> str:
    """``HHMMSS[.FFFFFF]`` from TM, also from the old ``HH:MM:SS`` form; ``HHMM`` -> ``HHMM00``.

    Padding to whole seconds makes stored times compare correctly as text in range matching.
    """
    text = value.replace(":", "").strip()
    whole = text.split(".", 1)[0]
    if whole.isdigit() and len(whole) in (2, 4):
        text = whole.ljust(6, "0") + text[len(whole):]
    return text


def column_value(attribute: IndexedAttribute, header: dict[str, Any]) -> Any:
    """The value to store in the attribute's column, read from an instance's DICOM JSON."""
    if attribute.sequence:
        items = json_values(header, f"{tag_for_keyword(attribute.sequence):08X}")
        item = items[0] if items and isinstance(items[0], dict) else {}
        values = json_values(item, attribute.tag_hex)
    else:
        values = json_values(header, attribute.tag_hex)
    if not values:
        return None
    if attribute.vr in INTEGER_VRS:
        first = values[0]
        # Beyond the database's 64-bit integers the value stays in the header JSON only (an
        # InstanceNumber of 10^20 made the index write fail, and the store with it).
        return first if isinstance(first, int) and -(2**63) <= first < 2**63 else None
    if attribute.vr == "PN":
        text = "\\".join(pn_to_text(v) for v in values)
    else:
        text = "\\".join("" if v is None else str(v) for v in values)
    if attribute.vr == "DA":
        text = normalise_date(text)
    elif attribute.vr == "TM":
        text = normalise_time(text)
    return text or None


def index_values(level: Level, header: dict[str, Any]) -> dict[str, Any]:
    """Column values of ``level`` for one instance (aggregates excluded)."""
    values: dict[str, Any] = {}
    for attribute in level_attributes(level):
        if attribute.aggregate:
            continue
        value = column_value(attribute, header)
        values[attribute.column] = value
        if attribute.vr == "PN":
            values[attribute.column + "_ci"] = casefold_person_name(value) if value else None
            values[attribute.column + "_fold"] = fold_person_name(value) if value else None
    return values
