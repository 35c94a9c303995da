"""QIDO-RS (PS3.18 10.6): query parameters to ``storage.query.Query``, index rows to DICOM JSON.

Matching goes through the archive's one query path; answers come from the index only (indexed
columns, plus the stored DICOM JSON of a representative instance for other included fields).
A study search returns no series or instance attribute, even when asked for (10.6.3.3.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from pacs.http_input import whole_number
from storage.attributes import BY_KEYWORD, INTEGER_VRS, Level, level_attributes
from storage.query import NameMatching, Query

DEFAULT_LIMIT = 1000  # answers per request when the client asks for no limit
MAX_LIMIT = 5000  # ... and the most it may ask for

SPECIFIC_CHARACTER_SET = "00080005"
RETRIEVE_URL = "00081190"
INSTANCE_AVAILABILITY = "00080056"
_RAS = "RequestAttributesSequence"
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")

# PS3.18 Table 10.6.3-3 (study), -4 (series), -5 (instance): attributes every answer carries.
# The levels above are added when the query is not scoped to one study (e.g. /series).
DEFAULT_FIELDS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                  "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
                  "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                   "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                   "PerformedProcedureStepStartTime", "BodyPartExamined",
                   f"{_RAS}.ScheduledProcedureStepID", f"{_RAS}.RequestedProcedureID"),
    Level.INSTANCE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                     "BitsAllocated", "NumberOfFrames"),
}

# Attributes of the Patient and Study IEs the index has no column for, which a study search
# returns from a representative instance (the same in every instance of a study): those of the
# PS3.3 modules named below, and Timezone Offset From UTC (Table 10.6.3-3). A study search takes
# any other attribute for a series or instance one, which it does not return (10.6.3.3.1).
STUDY_IE_ATTRIBUTES = (
    # C.7.1.1 Patient
    "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "QualityControlSubject", "ReferencedPatientPhotoSequence",
    "ReferencedPatientSequence", "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup",
    "EthnicGroupCodeSequence", "PatientComments", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence",
    # C.2.3 Patient Demographic (those that instances carry)
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank",
    "BranchOfService", "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference",
    # C.7.1.3 Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # C.7.2.1 General Study
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "IssuerOfAccessionNumberSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "RequestingServiceCodeSequence", "ReferencedStudySequence", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence", "OtherStudyNumbers",
    # C.7.2.2 Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientSize",
    "PatientWeight", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientSizeCodeSequence", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus",
    "LastMenstrualDate", "PatientState", "Occupation", "AdditionalPatientHistory", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription", "PatientSexNeutered", "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    # C.7.2.3 Clinical Trial Study; Table 10.6.3-3
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType",
    "ConsentForClinicalTrialUseSequence", "TimezoneOffsetFromUTC",
)
_STUDY_IE_TAGS = frozenset(f"{tag_for_keyword(k):08X}" for k in STUDY_IE_ATTRIBUTES)


class BadQueryParameter(ValueError):
    """A query parameter QIDO-RS cannot answer; the message names the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass
class QidoRequest:
    """A parsed QIDO-RS request."""

    query: Query
    fields: list[str]  # index keywords to return, in order
    extra_tags: set[str]  # tags (8 hex) returned from the stored JSON
    warnings: list[str] = field(default_factory=list)


def parse_qido(level: Level, params: Iterable[tuple[str, str]], *, scope: dict[str, str],
               default_matching: NameMatching) -> QidoRequest:
    """The archive query for a QIDO-RS request at ``level`` (``scope``: UIDs from the path)."""
    matching: dict[str, list[str]] = {}
    fields: list[str] = []
    extra: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = default_matching
    warnings: list[str] = []
    for name, value in params:
        lowered = name.lower()
        if lowered == "limit":
            limit = _integer(name, value, minimum=0)
        elif lowered == "offset":
            offset = _integer(name, value, minimum=0)
        elif lowered == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise BadQueryParameter(name, f"{value!r} is not true or false")
            fuzzy = NameMatching.FUZZY if value.lower() == "true" else default_matching
        elif lowered == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item.lower() == "all":
                    include_all = True
                elif item:
                    keyword, tag = _attribute(name, item)
                    if keyword in BY_KEYWORD:
                        fields.append(keyword)
                    else:
                        extra.add(tag)
        elif lowered in ("orderby", "_", "callback"):
            continue  # cache busters and the like: ignored
        elif lowered == "accept":
            continue  # the media type asked for (PS3.18 8.3.3.1), negotiated by the app
        else:
            keyword, tag = _attribute(name, name)
            if value == "":
                (fields.append if keyword in BY_KEYWORD else extra.add)(
                    keyword if keyword in BY_KEYWORD else tag)
                continue
            if keyword not in BY_KEYWORD:
                warnings.append(f"{name}: matching on this attribute is not supported; " + (
                    "it was returned but not matched" if returned_at(level, tag) else
                    "it was neither matched nor returned: a study search returns no series or "
                    "instance attribute (PS3.18 10.6.3.3.1)"))
                extra.add(tag)
                continue
            if BY_KEYWORD[keyword].level.value > level.value:
                hint = "; use ModalitiesInStudy" if keyword == "Modality" else ""
                raise BadQueryParameter(name, f"{keyword} is below the {level.name.lower()} "
                                              f"level and cannot be matched here{hint}")
            if BY_KEYWORD[keyword].aggregate and keyword != "ModalitiesInStudy":
                warnings.append(f"{name}: matching on a count is not supported; it was "
                                "returned but not matched")
                fields.append(keyword)
                continue
            matching.setdefault(keyword, []).append(value)
    keys = {keyword: "\\".join(values) for keyword, values in matching.items()}
    for keyword, uid in scope.items():
        keys[keyword] = uid
    limit = DEFAULT_LIMIT if limit is None or limit == 0 else limit
    if limit > MAX_LIMIT:
        warnings.append(f"limit: {limit} is more than the maximum of {MAX_LIMIT}; "
                        f"answered {MAX_LIMIT}")
        limit = MAX_LIMIT
    selected = _default_fields(level, scoped="StudyInstanceUID" in scope)
    if include_all:
        selected += [_name(a) for lv in Level if lv.value <= level.value
                     for a in level_attributes(lv)]
    selected += fields + list(keys)
    selected = [name for name in selected if returned_at(level, name)]
    extra = {tag for tag in extra if returned_at(level, tag)}
    query = Query(level, keys, fuzzy, limit=limit + 1, offset=offset,
                  extra_tags=frozenset(extra))
    return QidoRequest(query, list(dict.fromkeys(selected)), extra, warnings)


def returned_at(level: Level, name: str) -> bool:
    """Whether the attribute ``name`` asked for (included, or a return key) is returned at
    ``level``: an index keyword, or the tag (8 hex digits) of one the index has no column for.

    A study search returns no series or instance attribute (PS3.18 10.6.3.3.1): those the
    index holds have their level; of the others, those of ``STUDY_IE_ATTRIBUTES`` are returned,
    and private ones (their level is the creator's to say; from a representative instance)."""
    if level is not Level.STUDY:
        return True
    if name in BY_KEYWORD:
        return BY_KEYWORD[name].level.value <= Level.STUDY.value
    return name in _STUDY_IE_TAGS or int(name[:4], 16) % 2 == 1


def _default_fields(level: Level, *, scoped: bool) -> list[str]:
    levels = [level] if scoped or level is Level.STUDY else \
        [lv for lv in (Level.STUDY, Level.SERIES, Level.INSTANCE) if lv.value <= level.value]
    if level is Level.INSTANCE and scoped:
        levels = [Level.SERIES, Level.INSTANCE]  # an instance answer names its series
    return [keyword for lv in levels for keyword in DEFAULT_FIELDS[lv]]


def _name(attribute) -> str:
    return f"{attribute.sequence}.{attribute.keyword}" if attribute.sequence \
        else attribute.keyword


# Larger than any index holds, small enough for every database's integers.
_LARGEST = 2**31 - 1


def _integer(name: str, value: str, *, minimum: int) -> int:
    number = whole_number(value.strip())
    if number is None:
        raise BadQueryParameter(name, f"{value!r} is not a whole number")
    if number < minimum:
        raise BadQueryParameter(name, f"{number} is less than {minimum}")
    if number > _LARGEST:
        raise BadQueryParameter(name, f"{number} is more than {_LARGEST}")
    return number


def _attribute(parameter: str, text: str) -> tuple[str, str]:
    """(keyword, tag as 8 hex digits) of an attribute named by keyword or tag.

    A sequence item attribute may be named with a dot (``RequestAttributesSequence.
    RequestedProcedureID`` or ``0040A370.00401001``)."""
    parts = text.split(".")
    keywords, tags = [], []
    for part in parts:
        if _HEX_TAG.match(part):
            tag = int(part, 16)
            keyword = keyword_for_tag(tag) or part.upper()
        else:
            tag = tag_for_keyword(part)
            if tag is None:
                raise BadQueryParameter(parameter, f"{part!r} is not a DICOM keyword or tag")
            keyword = part
        keywords.append(keyword)
        tags.append(f"{tag:08X}")
    return ".".join(keywords), tags[0]


# ---------------------------------------------------------------------------- answers


def answer_json(row: dict[str, Any], request: QidoRequest, retrieve_url: str) -> dict[str, Any]:
    """One QIDO-RS answer (a DICOM JSON object) for an index row."""
    out: dict[str, Any] = {SPECIFIC_CHARACTER_SET: {"vr": "CS", "Value": ["ISO_IR 192"]}}
    sequences: dict[str, dict[str, Any]] = {}
    for name in request.fields:
        attribute = BY_KEYWORD[name]
        element = element_json(attribute.vr, row.get(name))
        if attribute.sequence:
            sequences.setdefault(attribute.sequence, {})[attribute.tag_hex] = element
        else:
            out[attribute.tag_hex] = element
    for sequence, item in sequences.items():
        present = {tag: e for tag, e in item.items() if "Value" in e}
        out[f"{tag_for_keyword(sequence):08X}"] = {"vr": "SQ", "Value": [present]} \
            if present else {"vr": "SQ"}
    withheld = set()
    for tag, element in row.get("_extra", {}).items():
        kept = _without_bulk_data(element)
        if kept is None:
            withheld.add(tag)
        else:
            out.setdefault(tag, kept)
    for tag in request.extra_tags:
        if tag not in out and tag not in withheld:  # absent: returned empty, as C-FIND does
            out[tag] = {"vr": _vr(tag)}
    out[INSTANCE_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
    out[RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url]}
    return dict(sorted(out.items()))


def withheld_bulk_data(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Tags of the included attributes left out of (or out of items of) the answers for
    ``rows`` because their values are bulk data."""
    return sorted({tag for row in rows for tag, element in row.get("_extra", {}).items()
                   if _without_bulk_data(element) != element})


def _without_bulk_data(element: dict[str, Any]) -> dict[str, Any] | None:
    """``element`` without the bulk data values the index holds as references (None if it is
    one). PS3.18 permits a Bulkdata URI in place of a value in metadata (10.4.3.3.2) and makes
    no such provision for search results, which carry the included attributes the server
    supports (10.6.3.3); the index has no value to give, so such an attribute is left out."""
    if "BulkDataURI" in element:
        return None
    if element.get("vr") != "SQ" or not element.get("Value"):
        return element
    items = [{tag: kept for tag, nested in item.items()
              if (kept := _without_bulk_data(nested)) is not None}
             if isinstance(item, dict) else item for item in element["Value"]]
    return {**element, "Value": items}


def element_json(vr: str, value: Any) -> dict[str, Any]:
    """DICOM JSON of an index column value (text with ``\\`` between values, or a number)."""
    if value is None or value == "":
        return {"vr": vr}
    if isinstance(value, int) or vr in INTEGER_VRS:
        return {"vr": vr, "Value": [int(value)]}
    texts = [value] if vr in _SINGLE_VALUED else str(value).split("\\")
    if vr == "PN":
        return {"vr": vr, "Value": [_person_name(t) for t in texts]}
    return {"vr": vr, "Value": texts}


def _person_name(text: str) -> dict[str, str] | None:
    groups = text.split("=")
    named = {kind: group for kind, group in zip(("Alphabetic", "Ideographic", "Phonetic"),
                                                   groups, strict=False) if group}
    return named or None


def _vr(tag: str) -> str:
    try:
        return dictionary_VR(int(tag, 16))
    except KeyError:
        return "UN"

