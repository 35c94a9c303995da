"""FHIR searches of the EMR API: ImagingStudy by patient identifier (MRN, CCCD, BHYT),
study identifier and ``_lastUpdated``; Patient by identifier; their paging (``_count``,
``_offset`` and the next links). Errors are ``fhir.FhirError`` (400 with an
OperationOutcome)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from starlette.requests import Request

from emr import fhir
from emr.model import LOCAL_TIMEZONE, PatientInfo
from emr.service import EmrService
from pacs.http_input import whole_number
from storage.index import patients, studies

MAX_COUNT = 100
DEFAULT_COUNT = 20  # a search's page when _count is not given
MAX_OFFSET = 1_000_000_000
# Parameters of one search, each a condition all must meet: SQLite parses a query of N of them
# N deep and refused one of 999 identifiers (a 500).
MAX_PARAMETERS = 50
_DATE_PREFIX = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb)?(\d{4}(-\d{2}(-\d{2}(T[0-9:.]+"
                          r"(Z|[+-]\d{2}:\d{2})?)?)?)?)$")


def parse_token(value: str) -> tuple[str | None, str]:
    """A FHIR token search value: (system or None when not given, value)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def _patient_condition(service: EmrService, settings, token: str) -> Any:
    """The index patients a ``patient.identifier`` token names: by CCCD or BHYT through the
    EMR's records; by MRN, of the issuer the system names (studies whose modality sent no
    issuer count when the EMR knows that MRN under that issuer)."""
    system, value = parse_token(token)
    if not value:
        raise fhir.FhirError(400, "value", "patient.identifier needs a value",
                             "patient.identifier")
    if system == fhir.CCCD_SYSTEM:
        ids = [p.patient_id for _, p in service.orders.find_patients(cccd=value)]
        return patients.c.patient_id.in_(ids or [""])
    if system in (fhir.BHYT_SYSTEM, fhir.LEGACY_BHYT_SYSTEM):
        ids = [p.patient_id for _, p in service.orders.find_patients(bhyt=value)]
        return patients.c.patient_id.in_(ids or [""])
    issuer = fhir.mrn_issuer(system, settings.emr_mrn_system) if system else ""
    if not issuer:  # no system, or the hospital's own default: any issuer
        return patients.c.patient_id == value
    issuers = [issuer]
    if service.orders.find_patients(patient_id=value, issuer=issuer):
        issuers.append("")
    return sa.and_(patients.c.patient_id == value,
                   patients.c.issuer_of_patient_id.in_(issuers))


def patients_by_identifier(service: EmrService, settings, token: str, count: int,
                            offset: int) -> tuple[list[tuple[int, PatientInfo]], int | None]:
    """One page of the EMR patients an identifier token (with a value) names, merged-away ones
    (ADT^A40) included, and how many there are: None when more follow this page
    (``find_patients`` neither skips nor counts, so the rows up to the end of the page, and
    one more, are read to know). An MRN matches by ``fhir.mrn_matches``."""
    system, value = parse_token(token)
    if system == fhir.CCCD_SYSTEM:
        found = service.orders.find_patients(cccd=value, merged=True, limit=offset + count + 1)
    elif system in (fhir.BHYT_SYSTEM, fhir.LEGACY_BHYT_SYSTEM):
        found = service.orders.find_patients(bhyt=value, merged=True, limit=offset + count + 1)
    else:  # the records of one MRN are few (one per issuer): all of them, then the system's
        found = [(pk, patient) for pk, patient in service.orders.find_patients(
                     patient_id=value, merged=True, limit=None)
                 if fhir.mrn_matches(system, patient.issuer, settings.emr_mrn_system)]
    return found[offset:offset + count], len(found) if len(found) <= offset + count else None


def conditional_accessions(criteria: str, accession_systems: set[str]) -> set[str]:
    """The accession numbers the ``If-None-Exist`` of a ServiceRequest create names:
    ``identifier=[SYSTEM|]ACCESSION``, values separated by ``,`` for any of them, the parameter
    repeated for all of them. ``FhirError`` 400 for any other parameter, and for a system
    accession numbers are not read from (those of the body's accession identifiers, or one
    that says ``accession``): the criteria would name something this server does not keep."""
    params = parse_qsl(criteria, keep_blank_values=True)
    if not params:
        raise fhir.FhirError(400, "required", "If-None-Exist holds no search; give "
                             "identifier=SYSTEM|ACCESSION", "identifier")
    found: set[str] | None = None
    for name, tokens in params:
        if name != "identifier":
            raise fhir.FhirError(400, "not-supported", f"If-None-Exist: search parameter "
                                 f"{name!r} is not supported; a ServiceRequest is found by "
                                 "identifier=SYSTEM|ACCESSION", name)
        values = set()
        for token in tokens.split(","):
            system, value = parse_token(token)
            if not value:
                raise fhir.FhirError(400, "value", "If-None-Exist: identifier needs a value",
                                     "identifier")
            if system and system not in accession_systems \
                    and "accession" not in system.lower():
                raise fhir.FhirError(400, "not-supported", f"If-None-Exist: {system!r} is "
                                     "not a system of accession numbers (the body's ACSN "
                                     "identifier's, or one naming accession); orders are "
                                     "found by accession number only", "identifier")
            values.add(value)
        found = values if found is None else found & values
    return found or set()


def search_page(params: list[tuple[str, str]]) -> tuple[int, int]:
    """``_count`` and ``_offset`` of a search (the latter is what the next links say, not a
    standard parameter); ``FhirError`` 400 for values out of bounds."""
    count, offset = DEFAULT_COUNT, 0
    for name, value in params:
        if name == "_count":
            number = whole_number(value)
            if number is None or not 0 < number <= MAX_COUNT:
                raise fhir.FhirError(400, "value", f"_count must be 1-{MAX_COUNT}", "_count")
            count = number
        elif name == "_offset":
            number = whole_number(value)
            if number is None or number > MAX_OFFSET:
                raise fhir.FhirError(400, "value", f"_offset must be a number 0-{MAX_OFFSET}",
                                     "_offset")
            offset = number
    return count, offset


def next_page_url(request: Request, params: list[tuple[str, str]], offset: int) -> str:
    """The search ``request`` again, from ``offset`` on."""
    kept = [(name, value) for name, value in params if name != "_offset"]
    return f"{str(request.url).split('?', 1)[0]}?" + urlencode([*kept, ("_offset", str(offset))])


def find_studies(service: EmrService, settings, params: list[tuple[str, str]], count: int,
                  offset: int) -> tuple[list[tuple[str, dt.datetime]], int]:
    """(study UID, last updated) of one page of the studies an ImagingStudy search names, and
    the total."""
    if len(params) > MAX_PARAMETERS:
        raise fhir.FhirError(400, "too-costly", f"{len(params)} search parameters; at most "
                             f"{MAX_PARAMETERS} are taken")
    conditions: list[Any] = []
    for name, value in params:
        if name == "patient.identifier":
            conditions.append(_patient_condition(service, settings, value))
        elif name == "identifier":
            system, code = parse_token(value)
            if not code.strip():  # it matched every study without an accession number
                raise fhir.FhirError(400, "value", "identifier needs a value", "identifier")
            if system == fhir.DICOM_UID_SYSTEM or code.startswith("urn:oid:"):
                conditions.append(studies.c.study_instance_uid == code.removeprefix("urn:oid:"))
            else:
                conditions.append(studies.c.accession_number == code)
        elif name == "_lastUpdated":
            conditions.append(_date_condition(studies.c.updated_at, value))
        elif name not in ("_count", "_offset", "_format"):  # search_page reads the first two
            raise fhir.FhirError(400, "not-supported", f"search parameter {name!r} is not "
                                 "supported (patient.identifier, identifier, _lastUpdated, "
                                 "_count, _offset)", name)
    statement = (sa.select(studies.c.study_instance_uid, studies.c.updated_at)
                 .join(patients, studies.c.patient_pk == patients.c.pk).where(*conditions))
    with service.archive.index.read() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(statement.subquery())
                             ).scalar_one()
        rows = conn.execute(statement.order_by(studies.c.updated_at.desc(), studies.c.pk)
                            .limit(count).offset(offset)).all()
    return [(uid, updated) for uid, updated in rows], total


def _date_condition(column: Any, value: str) -> Any:
    """A FHIR date search (``ge2026-12-01``, ``lt2026-12-04T10:00:00+07:00``...)."""
    match = _DATE_PREFIX.match(value.strip())
    if not match:
        raise fhir.FhirError(400, "value", f"_lastUpdated {value!r} is not [prefix]date",
                             "_lastUpdated")
    prefix, text = match.group(1) or "eq", match.group(2)
    try:
        start, end = _period(text)
    except ValueError:
        raise fhir.FhirError(400, "value", f"_lastUpdated {value!r}: not a real date or time",
                             "_lastUpdated") from None
    if prefix in ("gt", "sa"):
        return column >= end
    if prefix == "ge":
        return column >= start
    if prefix in ("lt", "eb"):
        return column < start
    if prefix == "le":
        return column < end
    if prefix == "ne":
        return sa.or_(column < start, column >= end)
    return sa.and_(column >= start, column < end)


def _period(text: str) -> tuple[dt.datetime, dt.datetime]:
    """The instants a FHIR date or dateTime of any precision covers, in UTC (``ValueError``
    for a day or time that does not exist: ``2020-13-45``, ``T25:00``, year 0)."""
    zone = LOCAL_TIMEZONE
    if "T" in text:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        return _utc(moment), _utc(moment, dt.timedelta(seconds=1))
    parts = [int(p) for p in text.split("-")]
    start = dt.datetime(parts[0], parts[1] if len(parts) > 1 else 1,
                        parts[2] if len(parts) > 2 else 1, tzinfo=zone)
    if len(parts) == 3:
        end = _utc(start, dt.timedelta(days=1))
    elif len(parts) == 2:
        end = _utc(start, dt.timedelta(days=32), to_first_day=True)
    else:
        end = _utc(start, dt.timedelta(days=366), to_first_day=True, to_first_month=True)
    return _utc(start), end


def _utc(moment: dt.datetime, later: dt.timedelta = dt.timedelta(0), *,
         to_first_day: bool = False, to_first_month: bool = False) -> dt.datetime:
    """``moment + later`` in UTC (the start of its month or year if asked), kept within what
    ``datetime`` holds: past either end of the calendar it is that end (``later`` is never
    negative)."""
    try:
        moved = moment + later
    except OverflowError:  # past the end of year 9999
        return dt.datetime.max.replace(tzinfo=dt.UTC)
    if to_first_day:
        moved = moved.replace(day=1, month=1 if to_first_month else moved.month)
    try:
        return moved.astimezone(dt.UTC)
    except OverflowError:  # within a day of an end: east of UTC before year 1, west after 9999
        offset = moved.utcoffset() or dt.timedelta(0)
        edge = dt.datetime.min if offset > dt.timedelta(0) else dt.datetime.max
        return edge.replace(tzinfo=dt.UTC)
