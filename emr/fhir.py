"""FHIR R4 (4.0.1) resources out of the EMR model (ImagingStudy, Patient, Endpoint, Bundle,
OperationOutcome), and what FHIR in and out share: identifier systems, profiles, errors.
ServiceRequests coming in are read in ``emr.fhir_in``.

What goes out is built as plain dicts, validated with the ``fhir.resources.R4B`` models
(R4-compatible) and returned as JSON-able dicts without empty elements.

Identifiers and profiles follow the draft VN Core IG of HL7 Vietnam (canonical base
``http://fhir.hl7.org.vn/core``, versions 0.1-0.6 "Draft for Community Review"): NamingSystems
``vn-cccd-ns`` (``.../sid/cccd``) and ``vn-bhyt-ns`` (``.../sid/bhyt``), profiles
``vn-core-patient``, ``vn-core-service-request`` and ``vn-core-imaging-study``. The IG is a
draft; check the constants below against the version the EMR was built for.

Times: DICOM dates and times are local wall-clock time without a zone; FHIR ``dateTime`` with a
time must carry one. The server's local time is Vietnam's, ``+07:00`` all year (no DST), so
times coming in are converted to it and times going out are labelled with it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import date as Date
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

import pydantic
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

from emr.coding import fhir_system
from emr.errors import InvalidResource, error_locations
from emr.model import (
    LOCAL_TIMEZONE,
    Order,
    PatientInfo,
    ResultSeries,
    StudyResult,
)

log = logging.getLogger("pacs.emr.fhir")

FHIR_VERSION = "4.0.1"

# VN Core (draft) — found in the IG: NamingSystem vn-cccd-ns and vn-bhyt-ns, profiles below.
VN_CORE_BASE = "http://fhir.hl7.org.vn/core"
CCCD_SYSTEM = f"{VN_CORE_BASE}/sid/cccd"
BHYT_SYSTEM = f"{VN_CORE_BASE}/sid/bhyt"
VN_CORE_PATIENT_PROFILE = f"{VN_CORE_BASE}/StructureDefinition/vn-core-patient"
VN_CORE_SERVICE_REQUEST_PROFILE = f"{VN_CORE_BASE}/StructureDefinition/vn-core-service-request"
VN_CORE_IMAGING_STUDY_PROFILE = f"{VN_CORE_BASE}/StructureDefinition/vn-core-imaging-study"
# The Ministry of Health's older IG (canonical http://fhir.ehealth.gov.vn/core) named the
# insurance number differently; accepted on input so EMRs built on it are understood.
LEGACY_BHYT_SYSTEM = "http://fhir.ehealth.gov.vn/core/sid/insurance_number"

DICOM_UID_SYSTEM = "urn:dicom:uid"
DICOM_AE_SYSTEM = "urn:dicom:ae"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
URI_SYSTEM = "urn:ietf:rfc:3986"
V2_0203_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
ENDPOINT_CONNECTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"

REQUEST_STATUSES = {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error",
                    "unknown"}
REQUEST_INTENTS = {"proposal", "plan", "directive", "order", "original-order", "reflex-order",
                   "filler-order", "instance-order", "option"}
PRIORITIES = {"routine": "ROUTINE", "urgent": "HIGH", "asap": "HIGH", "stat": "STAT"}
GENDERS = {"male": "M", "female": "F", "other": "O", "unknown": ""}
BUNDLE_TYPES = {"transaction", "batch", "collection"}

# The DICOM CID 4031 mapping (the SNOMED concepts behind the old SRT codes) for common parts.
BODY_PARTS_SNOMED = {
    "ABDOMEN": ("113345001", "Abdomen"),
    "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("51185008", "Chest"),
    "CSPINE": ("122494005", "Cervical spine"),
    "FOOT": ("56459004", "Foot"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEART": ("80891009", "Heart"),
    "KNEE": ("72696002", "Knee"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "NECK": ("45048000", "Neck"),
    "PELVIS": ("12921003", "Pelvis"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"),
    "TSPINE": ("122495006", "Thoracic spine"),
}
BODY_PARTS_BY_SNOMED = {code: part for part, (code, _) in BODY_PARTS_SNOMED.items()}
CONTAINED_PATIENT_ID = "patient"  # the id of the Patient an ImagingStudy result contains
MODALITY_CODE = re.compile(r"^[A-Z][A-Z0-9]{1,15}$")  # DCM modality codes, not numeric concepts


class FhirError(ValueError):
    """A request the FHIR front end refuses, with what the OperationOutcome should say.

    ``status`` is the HTTP status (400 unreadable or invalid FHIR, 422 valid FHIR the server
    cannot act on), ``code`` the OperationOutcome issue type, ``expression`` the FHIRPath of
    the element at fault when known."""

    def __init__(self, status: int, code: str, diagnostics: str,
                 expression: str | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression

    def outcome(self) -> dict:
        """The OperationOutcome to send back."""
        return operation_outcome("error", self.code, self.diagnostics, self.expression)


def operation_outcome(severity: str, code: str, diagnostics: str,
                      expression: str | None = None) -> dict:
    """An OperationOutcome with one issue."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return _validated(OperationOutcome, {"resourceType": "OperationOutcome", "issue": [issue]})


def mrn_system(issuer: str, default: str) -> str:
    """The identifier system for MRNs of ``issuer`` (IssuerOfPatientID); ``default`` if none.

    A URI is used as is, an OID becomes ``urn:oid:``, a plain name (an HL7 namespace such as
    ``BVCR``) is appended to ``default`` so MRNs of different hospitals never collide."""
    issuer = issuer.strip()
    if not issuer:
        return default
    if ":" in issuer:
        return issuer
    if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        return f"urn:oid:{issuer}"
    return f"{default.rstrip('/')}/{quote(issuer, safe='')}"


def mrn_issuer(system: str, default: str) -> str:
    """The issuer that :func:`mrn_system` turned into ``system`` (its inverse)."""
    if not system or system == default:
        return ""
    prefix = default.rstrip("/") + "/"
    if system.startswith(prefix):
        return unquote(system[len(prefix):])
    if system.startswith("urn:oid:"):
        return system[len("urn:oid:"):]
    return system


def mrn_matches(system: str | None, issuer: str, default: str) -> bool:
    """Whether a token search with ``system`` (None: none given) names an MRN of ``issuer``.

    No system names every issuer (``BN001``); an empty one (``|BN001``, identifiers without a
    system) the MRNs the EMR sent without an issuer; any other the MRNs whose identifier
    :func:`mrn_system` writes with that system, and ``default`` also those it writes under
    ``default`` (``…/mrn/BVDK``: the hospital's own namespaces). So an MRN is never found
    with the system of another issuer."""
    if system is None:
        return True
    if not system:
        return not issuer
    written = mrn_system(issuer, default)
    return written == system or (system == default
                                 and written.startswith(default.rstrip("/") + "/"))


def readable_name(pn: str) -> str:
    """A PN as people write it: ``Nguyễn^Văn An`` is ``Nguyễn Văn An`` (family name first)."""
    for group in pn.split("="):  # alphabetic, else ideographic, else phonetic
        if text := " ".join(" ".join(group.split("^")[:3]).split()):
            return text
    return ""


def _human_name(pn: str) -> dict:
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (" ".join(p.split()) for p in parts)
    name: dict[str, Any] = {"use": "official", "text": readable_name(pn)}
    if family:
        name["family"] = family
    if given_names := (given.split() + middle.split()):
        name["given"] = given_names
    if prefix:
        name["prefix"] = prefix.split()
    if suffix:
        name["suffix"] = suffix.split()
    return name


# ------------------------------------------------------------------ resources out


def _validated(model: type, data: dict) -> dict:
    """``data`` without empty elements, checked by the R4B ``model``, as a JSON-able dict.

    FHIR has no empty strings: an element whose value is empty (a PN of only ``^``, a blank
    description) is left out rather than sent. A failure here is a bug in this module, not
    the client's: :class:`InvalidResource` names the elements; pydantic's own text quotes
    the values (patient names), so it goes to DEBUG only."""
    try:
        return model.model_validate(_pruned(data)).model_dump(mode="json", exclude_none=True)
    except pydantic.ValidationError as exc:
        log.debug("%s not valid: %s", model.__name__, exc)
        raise InvalidResource(model.__name__, error_locations(exc)) from None


def _pruned(value: Any) -> Any:
    """``value`` without empty or blank strings, and without the lists and objects that held
    nothing else (None if nothing is left)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, dict):
        kept = {k: v for k, v in ((k, _pruned(v)) for k, v in value.items()) if v is not None}
        return kept if set(kept) - {"resourceType"} else None
    if isinstance(value, list | tuple):
        items = [v for v in (_pruned(v) for v in value) if v is not None]
        return items or None
    return value


def _code(value: str) -> str:
    """A value as a FHIR ``code`` (no leading, trailing or repeated white space)."""
    return " ".join(value.split())


def _unsigned(number: int | None) -> int | None:
    """A DICOM IS (which may be negative or huge) as a FHIR ``unsignedInt``, if it fits."""
    return number if isinstance(number, int) and 0 <= number <= 2**31 - 1 else None


def _mrn_identifier(patient: PatientInfo, default_system: str) -> dict:
    return {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203_SYSTEM, "code": "MR",
                             "display": "Medical record number"}]},
        "system": mrn_system(patient.issuer, default_system),
        "value": patient.patient_id,
    }


def _accession_identifier(accession: str, system: str | None) -> dict:
    ident: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203_SYSTEM, "code": "ACSN",
                             "display": "Accession ID"}]},
        "value": accession,
    }
    if system:
        ident["system"] = system
    return ident


def patient_resource(patient: PatientInfo, resource_id: str, *, mrn_system: str) -> dict:
    """The patient as a VN Core Patient: MRN, CCCD and BHYT identifiers, name, gender, birth."""
    identifiers = [_mrn_identifier(patient, mrn_system)]
    if patient.cccd:
        identifiers.append({"use": "official", "system": CCCD_SYSTEM, "value": patient.cccd})
    if patient.bhyt:
        identifiers.append({"use": "secondary", "system": BHYT_SYSTEM, "value": patient.bhyt})
    data: dict[str, Any] = {
        "resourceType": "Patient",
        "id": resource_id,
        "meta": {"profile": [VN_CORE_PATIENT_PROFILE]},
        "identifier": identifiers,
    }
    if readable_name(patient.name):
        data["name"] = [_human_name(patient.name)]
    gender = {"M": "male", "F": "female", "O": "other"}.get(patient.sex.upper())
    if gender:
        data["gender"] = gender
    if birth := fhir_date(patient.birth_date):
        data["birthDate"] = birth
    if patient.phone:
        data["telecom"] = [{"system": "phone", "value": patient.phone}]
    if patient.address:
        data["address"] = [{"text": patient.address}]
    return _validated(Patient, data)


# Our order status as ServiceRequest.status.
_REQUEST_STATUS = {"SCHEDULED": "active", "IN PROGRESS": "active", "COMPLETED": "completed",
                   "DISCONTINUED": "revoked", "CANCELLED": "revoked"}
_REQUEST_PRIORITY = {"STAT": "stat", "HIGH": "urgent", "ROUTINE": "routine",
                     "MEDIUM": "routine", "LOW": "routine"}


def service_request_resource(order: Order, resource_id: str, *, mrn_system: str,
                             patient_id: str | None = None,
                             last_updated: str | None = None) -> dict:
    """An order as a VN Core ServiceRequest (what ``POST /fhir/ServiceRequest`` made of it,
    with its current status)."""
    identifiers = [_accession_identifier(order.accession_number, None)]
    if order.placer_order_number:
        identifiers.append({"type": {"coding": [{"system": V2_0203_SYSTEM, "code": "PLAC"}]},
                            "value": order.placer_order_number})
    if order.study_instance_uid:
        identifiers.append({"system": DICOM_UID_SYSTEM,
                            "value": f"urn:oid:{order.study_instance_uid}"})
    subject: dict[str, Any] = {"reference": f"Patient/{patient_id}"} if patient_id else {
        "identifier": _mrn_identifier(order.patient, mrn_system)}
    if order.patient.name:
        subject["display"] = readable_name(order.patient.name)
    data: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": resource_id,
        "meta": {"profile": [VN_CORE_SERVICE_REQUEST_PROFILE]},
        "identifier": identifiers,
        "status": _REQUEST_STATUS.get(order.status.value, "unknown"),
        "intent": "order",
        "subject": subject,
    }
    if last_updated:
        data["meta"]["lastUpdated"] = last_updated
    if order.priority in _REQUEST_PRIORITY:
        data["priority"] = _REQUEST_PRIORITY[order.priority]
    coding = [_procedure_coding(order)] if _code(order.procedure_code) else []
    if coding or order.procedure_description:
        data["code"] = {**({"coding": coding} if coding else {}),
                        **({"text": order.procedure_description}
                           if order.procedure_description else {})}
    if _code(order.modality):
        data["category"] = [{"coding": [{"system": DCM_SYSTEM, "code": _code(order.modality)}]}]
    started = fhir_date_time(order.scheduled_date, order.scheduled_time)
    if started:
        data["occurrenceDateTime"] = started
    if order.reason:
        data["reasonCode"] = [{"text": order.reason}]
    return _validated(ServiceRequest, data)


def fhir_date(date: str) -> str:
    """A DICOM DA as a FHIR date; "" if it is not a real day (``20201345``, ``00000101``)."""
    date = date.strip()
    if not re.fullmatch(r"\d{8}", date):
        return ""
    try:
        return Date(int(date[:4]), int(date[4:6]), int(date[6:])).isoformat()
    except ValueError:
        return ""


def fhir_date_time(date: str, time: str = "") -> str:
    """DICOM DA and TM (local time) as a FHIR dateTime with the local offset; "" if no date,
    the date alone if the time is not a real time of day."""
    day = fhir_date(date)
    if not day:
        return ""
    digits = time.split(".")[0].strip()
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2})?)?", digits):
        return day
    try:
        moment = datetime.strptime(day + digits.ljust(6, "0"), "%Y-%m-%d%H%M%S")
    except ValueError:  # 25:99
        return day
    return moment.replace(tzinfo=LOCAL_TIMEZONE).isoformat()


def endpoint_id(resource_id: str, kind: str) -> str:
    """The id of a separate Endpoint of an ImagingStudy (``kind`` is ``wado`` or ``iid``).

    FHIR ids stop at 64 characters and a study UID may use all of them: long ids are hashed."""
    candidate = f"{resource_id}-{kind}"
    if len(candidate) <= 64:
        return candidate
    return f"{hashlib.sha256(resource_id.encode()).hexdigest()[:40]}-{kind}"


def endpoint_resources(result: StudyResult, *, resource_id: str = "") -> list[dict]:
    """The study's DICOMweb (WADO-RS) and viewer (IHE IID) endpoints, those that have a URL.

    Without ``resource_id`` the ids are ``wado`` and ``iid`` (to be contained); with it, the
    ids of :func:`endpoint_id` (separate resources)."""
    endpoints = []
    viewer = result.iid_url or result.viewer_url
    for kind, address, code, payload, mime in (
        ("wado", result.wado_rs_url, "dicom-wado-rs", "DICOM WADO-RS", "application/dicom"),
        ("iid", viewer, "ihe-iid", "IHE Invoke Image Display", "text/html"),
    ):
        if not address:
            continue
        data = {
            "resourceType": "Endpoint",
            "id": endpoint_id(resource_id, kind) if resource_id else kind,
            "status": "active",
            "connectionType": {"system": ENDPOINT_CONNECTION_SYSTEM, "code": code},
            "name": payload,
            "payloadType": [{"text": payload}],
            "payloadMimeType": [mime],
            "address": address,
        }
        endpoints.append(_validated(Endpoint, data))
    return endpoints


def _body_site(body_part: str) -> dict:
    part = body_part.strip().upper()
    if part in BODY_PARTS_SNOMED:
        code, display = BODY_PARTS_SNOMED[part]
        return {"system": SNOMED_SYSTEM, "code": code, "display": display}
    return {"display": body_part.strip()}


def _series(series: ResultSeries) -> dict:
    data: dict[str, Any] = {
        "uid": series.series_instance_uid,
        "modality": {"system": DCM_SYSTEM, "code": _code(series.modality) or "OT"},
        "number": _unsigned(series.number),
    }
    if series.description:
        data["description"] = series.description
    if series.instances:
        data["numberOfInstances"] = len(series.instances)
    if series.body_part.strip():
        data["bodySite"] = _body_site(series.body_part)
    instances = []
    for instance in series.instances:
        item: dict[str, Any] = {
            "uid": instance.sop_instance_uid,
            "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{instance.sop_class_uid}"},
        }
        if (number := _unsigned(instance.number)) is not None:
            item["number"] = number
        instances.append(item)
    if instances:
        data["instance"] = instances
    return data


def imaging_study(result: StudyResult, *, resource_id: str, mrn_system: str,
                  subject: dict | None = None, based_on: list[dict] | None = None,
                  endpoints: str = "contained", last_updated: str | None = None,
                  accession_system: str | None = None, contain_patient: bool = False) -> dict:
    """The study as a VN Core ImagingStudy.

    ``subject`` defaults to a logical reference (MRN identifier and the readable name); with
    ``contain_patient`` it also points to the patient contained as a VN Core Patient
    (``#patient``: MRN, CCCD and BHYT identifiers, name, gender, birth date), as the results
    sent to an EMR do: the reference can carry one identifier, the EMR wants all three.
    ``based_on`` defaults to a logical reference to the ServiceRequest by accession number.
    ``endpoints``: ``"contained"`` (Endpoints ``#wado`` and ``#iid`` inside), ``"separate"``
    (references to ``Endpoint/<endpoint_id(...)>``, see :func:`endpoint_resources`) or
    ``"none"``."""
    if endpoints not in ("contained", "separate", "none"):
        raise ValueError(f"endpoints must be contained, separate or none, not {endpoints!r}")
    identifiers = [{
        "use": "official",
        "type": {"coding": [{"system": DCM_SYSTEM, "code": "110180",
                             "display": "Study Instance UID"}]},
        "system": DICOM_UID_SYSTEM,
        "value": f"urn:oid:{result.study_instance_uid}",
    }]
    if result.accession_number:
        identifiers.append(_accession_identifier(result.accession_number, accession_system))
    modalities = tuple(dict.fromkeys(
        _code(m) for m in result.modalities or [s.modality for s in result.series] if _code(m)))
    meta: dict[str, Any] = {"profile": [VN_CORE_IMAGING_STUDY_PROFILE]}
    if last_updated:
        meta["lastUpdated"] = last_updated
    data: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": resource_id,
        "meta": meta,
        "identifier": identifiers,
        "status": result.status or "available",
        "modality": [{"system": DCM_SYSTEM, "code": m} for m in modalities],
    }
    contained: list[dict] = []
    if subject is None:
        subject = _patient_reference(result.patient, mrn_system)
        if contain_patient:
            contained.append(patient_resource(result.patient, CONTAINED_PATIENT_ID,
                                              mrn_system=mrn_system))
            subject = {"reference": f"#{CONTAINED_PATIENT_ID}", **subject}
    data["subject"] = subject
    if based_on is not None:
        data["basedOn"] = based_on
    elif result.accession_number:
        data["basedOn"] = [{
            "type": "ServiceRequest",
            "identifier": _accession_identifier(result.accession_number, accession_system),
        }]
    if started := fhir_date_time(result.study_date, result.study_time):
        data["started"] = started
    if referrer := readable_name(result.referring_physician):
        data["referrer"] = {"display": referrer}
    if endpoints == "contained":
        inside = endpoint_resources(result)
        contained.extend(inside)
        if inside:
            data["endpoint"] = [{"reference": f"#{e['id']}"} for e in inside]
    elif endpoints == "separate":
        data["endpoint"] = [{"reference": f"Endpoint/{e['id']}"}
                            for e in endpoint_resources(result, resource_id=resource_id)]
    series_count = result.number_of_series or len(result.series)
    instance_count = result.number_of_instances or sum(len(s.instances) for s in result.series)
    if series_count:
        data["numberOfSeries"] = series_count
    if instance_count:
        data["numberOfInstances"] = instance_count
    order = result.order
    if order and _code(order.procedure_code):
        data["procedureCode"] = [{"coding": [_procedure_coding(order)]}]
    if order and order.reason:
        data["reasonCode"] = [{"text": order.reason}]
    if result.description:
        data["description"] = result.description
    if result.series:
        data["series"] = [_series(s) for s in result.series]
    if contained:
        data["contained"] = contained
    return _validated(ImagingStudy, data)


def _procedure_coding(order: Order) -> dict:
    """The order's procedure as a Coding: ``system`` only when it is (or maps to) a URI, as
    FHIR requires; an HL7 mnemonic such as ``LN`` becomes ``http://loinc.org``."""
    coding = {"code": _code(order.procedure_code)}
    if system := fhir_system(order.procedure_code_system):
        coding["system"] = system
    if order.procedure_description:
        coding["display"] = order.procedure_description
    return coding


def _patient_reference(patient: PatientInfo, default_system: str) -> dict:
    reference: dict[str, Any] = {
        "type": "Patient",
        "identifier": _mrn_identifier(patient, default_system),
    }
    if display := readable_name(patient.name):
        reference["display"] = display
    return reference


def searchset(entries: list[dict], *, self_url: str, total: int | None,
              base_url: str, next_url: str | None = None) -> dict:
    """A searchset Bundle of ``entries`` (resources with ids), each with its fullUrl; a
    ``next`` link when there are more pages. ``total``: the matches on all pages, None when
    not known (left out: Bundle.total is optional)."""
    base = base_url.rstrip("/")
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    data = {
        "resourceType": "Bundle",
        "type": "searchset",
        **({"total": total} if total is not None else {}),
        "link": links,
        "entry": [{
            "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
            "resource": resource,
            "search": {"mode": "match"},
        } for resource in entries],
    }
    return _validated(Bundle, data)


def transaction_response(request: dict, *, status: str, locations: dict[str, str],
                         last_modified: str) -> dict:
    """The transaction-response (or batch-response) Bundle of the transaction ``request``:
    for each entry, in order, ``status`` and where its resource now is (``locations`` by
    resource type)."""
    entries = []
    for entry in request.get("entry") or []:
        kind = entry["resource"]["resourceType"]
        entries.append({"response": {
            "status": status if kind == "ServiceRequest" else "200 OK",
            "location": locations[kind], "lastModified": last_modified}})
    data = {"resourceType": "Bundle", "type": f"{request['type']}-response", "entry": entries}
    return _validated(Bundle, data)


def capability_statement(base_url: str, *, date: str | None = None) -> dict:
    """What this server's FHIR front end does: ImagingStudy and Patient read and search,
    ServiceRequest create."""
    def param(name: str, kind: str, definition: str, documentation: str = "") -> dict:
        p = {"name": name, "type": kind, "definition": definition}
        if documentation:
            p["documentation"] = documentation
        return p

    last_updated = param("_lastUpdated", "date",
                         "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated")
    data = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date or datetime.now(LOCAL_TIMEZONE).replace(microsecond=0).isoformat(),
        "kind": "instance",
        "implementation": {"description": "PACS FHIR front end", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
            {
                "type": "ImagingStudy",
                "supportedProfile": [VN_CORE_IMAGING_STUDY_PROFILE],
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    param("identifier", "token",
                          "http://hl7.org/fhir/SearchParameter/ImagingStudy-identifier",
                          "Study Instance UID (urn:dicom:uid|urn:oid:...) or accession number"),
                    param("patient", "reference",
                          "http://hl7.org/fhir/SearchParameter/ImagingStudy-patient",
                          "Chained as patient.identifier=system|value only"),
                    last_updated,
                ],
            },
            {
                "type": "Patient",
                "supportedProfile": [VN_CORE_PATIENT_PROFILE],
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [param(
                    "identifier", "token",
                    "http://hl7.org/fhir/SearchParameter/Patient-identifier",
                    f"MRN, CCCD ({CCCD_SYSTEM}) or BHYT ({BHYT_SYSTEM})")],
            },
            {
                "type": "ServiceRequest",
                "supportedProfile": [VN_CORE_SERVICE_REQUEST_PROFILE],
                "interaction": [{"code": "create"}, {"code": "read"}],
            },
        ]}],
    }
    return _validated(CapabilityStatement, data)
