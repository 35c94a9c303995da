"""FHIR R4 (4.0.1) resources to and from the EMR model: ServiceRequest in, ImagingStudy out.

Incoming resources are validated with the ``fhir.resources.R4B`` models (R4-compatible) before
they are read; what goes out is built as plain dicts, validated with the same models and
returned as JSON-able dicts without empty elements.

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
import re
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

from emr.model import (
    Order,
    OrderControl,
    OrderStatus,
    PatientInfo,
    ResultSeries,
    StudyResult,
)

FHIR_VERSION = "4.0.1"
LOCAL_TIMEZONE = timezone(timedelta(hours=7), "ICT")  # Asia/Ho_Chi_Minh, no DST

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
_BODY_PARTS_BY_SNOMED = {code: part for part, (code, _) in BODY_PARTS_SNOMED.items()}
_MODALITY_CODE = re.compile(r"^[A-Z][A-Z0-9]{1,15}$")  # DCM modality codes, not numeric concepts


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


# ------------------------------------------------------------------ ServiceRequest in


def parse_service_request(body: Any, *, mrn_system: str) -> Order:
    """The order in a ServiceRequest, or in a Bundle holding one ServiceRequest and its Patient.

    The Patient may be contained (``subject.reference = "#id"``), an entry of the Bundle
    (matched by ``fullUrl`` or ``Patient/<id>``), or only named by ``subject.identifier``.
    ``mrn_system`` is the server's default MRN system (see :func:`mrn_system`). Raises
    :class:`FhirError`: 400 for what is not valid FHIR, 422 for what cannot be scheduled."""
    if not isinstance(body, dict):
        raise FhirError(400, "structure",
                        "The body must be a JSON object: a ServiceRequest or a Bundle.")
    _check_resource_types(body, "")
    kind = body["resourceType"]
    if kind not in ("ServiceRequest", "Bundle"):
        raise FhirError(400, "not-supported",
                        f"Expected a ServiceRequest or a Bundle, got a {kind}.", kind)
    _validate_input(ServiceRequest if kind == "ServiceRequest" else Bundle, body)
    if kind == "ServiceRequest":
        request, entries = body, []
    else:
        request, entries = _request_in_bundle(body)
    patient = _patient_of(request, entries, mrn_system)
    return _order(request, patient)


def _check_resource_types(resource: dict, path: str) -> None:
    """Refuse resources without a known resourceType, which the models would let through."""
    kind = resource.get("resourceType")
    where = path or "resourceType"
    if not isinstance(kind, str) or not kind:
        raise FhirError(400, "structure", f"{path or 'The body'} has no resourceType.", where)
    try:
        get_fhir_model_class(kind)
    except (KeyError, ValueError):
        raise FhirError(400, "structure", f"Unknown resourceType {kind!r}.",
                        f"{path}.resourceType" if path else "resourceType") from None
    path = path or kind
    contained = resource.get("contained")
    if isinstance(contained, list):
        for i, item in enumerate(contained):
            if isinstance(item, dict):
                _check_resource_types(item, f"{path}.contained[{i}]")
    entries = resource.get("entry") if kind == "Bundle" else None
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                _check_resource_types(entry["resource"], f"{path}.entry[{i}].resource")


def _validate_input(model: type, body: dict) -> None:
    """Validate with the R4B model; its errors become a 400 naming the first few elements."""
    try:
        model.model_validate(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        kind = body["resourceType"]
        described = [f"{_fhirpath(kind, e['loc'])}: {_error_message(e)}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        first = errors[0]
        code = {"missing": "required", "value_error": "value"}.get(first["type"], "structure")
        raise FhirError(400, code, f"Invalid {kind}: " + "; ".join(described) + more,
                        _fhirpath(kind, first["loc"])) from None
    except (KeyError, TypeError, ValueError) as exc:  # the models' own checks, not pydantic's
        raise FhirError(400, "structure", f"Invalid {body['resourceType']}: {exc}") from None


def _fhirpath(kind: str, loc: tuple) -> str:
    path = kind
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += "." + ("resourceType" if part == "resource_type" else str(part))
    return path


def _error_message(error: dict) -> str:
    if error["type"] == "json_invalid" and isinstance(error.get("input"), str):
        return "expected a JSON object, got a string"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if error["type"] not in ("missing", "json_invalid") and isinstance(value, str | int | float):
        message += f" (got {value!r})"
    return message


def _request_in_bundle(bundle: dict) -> tuple[dict, list[dict]]:
    if bundle.get("type") not in BUNDLE_TYPES:
        raise FhirError(422, "not-supported",
                        f"Bundle type {bundle.get('type')!r} is not accepted; "
                        "send a transaction, batch or collection.", "Bundle.type")
    entries = [e for e in bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]
    requests = [e["resource"] for e in entries
                if e["resource"]["resourceType"] == "ServiceRequest"]
    if not requests:
        raise FhirError(422, "required", "The Bundle holds no ServiceRequest.", "Bundle.entry")
    if len(requests) > 1:
        raise FhirError(422, "not-supported",
                        f"The Bundle holds {len(requests)} ServiceRequests; send one per Bundle.",
                        "Bundle.entry")
    return requests[0], entries


def _resolve(reference: str, request: dict, entries: list[dict]) -> dict | None:
    """The resource a reference points to, contained or in the Bundle, if it is there."""
    if reference.startswith("#"):
        return next((r for r in request.get("contained") or []
                     if r.get("id") == reference[1:]), None)
    for entry in entries:
        resource, full_url = entry["resource"], entry.get("fullUrl") or ""
        local = f"{resource['resourceType']}/{resource.get('id')}"
        if reference in (full_url, local) or full_url.endswith("/" + reference):
            return resource
    return None


def _patient_of(request: dict, entries: list[dict], default_system: str) -> PatientInfo:
    subject = request.get("subject") or {}
    reference = subject.get("reference")
    resource = _resolve(reference, request, entries) if reference else None
    if resource is not None and resource["resourceType"] != "Patient":
        raise FhirError(422, "not-supported",
                        f"The subject is a {resource['resourceType']}; only a Patient can be "
                        "scheduled.", "ServiceRequest.subject")
    if resource is None and not subject.get("identifier"):
        where = f" ({reference!r} is neither contained nor in the Bundle)" if reference else ""
        raise FhirError(422, "required",
                        "The patient is missing" + where + ": contain the Patient, add it to "
                        "the Bundle, or give subject.identifier with the MRN.",
                        "ServiceRequest.subject")
    patient = resource or {}
    identifiers = list(patient.get("identifier") or [])
    if subject.get("identifier"):
        identifiers.append(subject["identifier"])
    ids = _patient_identifiers(identifiers, default_system)
    if not ids.get("mrn"):
        raise FhirError(422, "required",
                        "The patient has no MRN: give an identifier with type MR "
                        f"({V2_0203_SYSTEM}) or system {default_system}.",
                        "Patient.identifier" if resource else "ServiceRequest.subject.identifier")
    gender = patient.get("gender")
    if gender is not None and gender not in GENDERS:
        raise FhirError(400, "value", f"Unknown Patient.gender {gender!r}.", "Patient.gender")
    name = _pn_from_names(patient.get("name") or [])
    if not name and subject.get("display"):
        name = _pn_from_text(subject["display"])
    return PatientInfo(
        patient_id=ids["mrn"],
        issuer=ids.get("issuer", ""),
        name=name,
        birth_date=_dicom_date(patient.get("birthDate") or ""),
        sex=GENDERS.get(gender or "", ""),
        cccd=ids.get("cccd", ""),
        bhyt=ids.get("bhyt", ""),
        address=_address_text(patient.get("address") or []),
        phone=next((t.get("value", "") for t in patient.get("telecom") or []
                    if t.get("system") == "phone" and t.get("value")), ""),
    )


def _type_codes(identifier: dict) -> set[str]:
    return {str(c.get("code", "")).upper()
            for c in (identifier.get("type") or {}).get("coding") or []}


def _patient_identifiers(identifiers: list[dict], default_system: str) -> dict[str, str]:
    """MRN (and its issuer), CCCD and BHYT among a patient's identifiers; first one wins."""
    found: dict[str, str] = {}
    prefix = default_system.rstrip("/") + "/"
    for ident in identifiers:
        value, system, types = ident.get("value"), ident.get("system") or "", _type_codes(ident)
        if not value:
            continue
        if system == CCCD_SYSTEM or types & {"CCCD", "NI", "NNVNM"}:
            found.setdefault("cccd", value)
        elif system in (BHYT_SYSTEM, LEGACY_BHYT_SYSTEM) or types & {"BHYT", "HC"}:
            found.setdefault("bhyt", value)
        elif "mrn" not in found and (
            "MR" in types or system == default_system or system.startswith(prefix)
        ):
            found["mrn"] = value
            found["issuer"] = mrn_issuer(system, default_system)
    return found


def _order(request: dict, patient: PatientInfo) -> Order:
    status = request.get("status")
    if status not in REQUEST_STATUSES:
        raise FhirError(400, "value", f"Unknown ServiceRequest.status {status!r}.",
                        "ServiceRequest.status")
    if status == "unknown":
        raise FhirError(422, "not-supported", "A ServiceRequest with status 'unknown' cannot "
                        "be scheduled; send its actual status.", "ServiceRequest.status")
    intent = request.get("intent")
    if intent not in REQUEST_INTENTS:  # informational otherwise: any valid intent is accepted
        raise FhirError(400, "value", f"Unknown ServiceRequest.intent {intent!r}.",
                        "ServiceRequest.intent")
    priority = request.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise FhirError(400, "value", f"Unknown ServiceRequest.priority {priority!r}.",
                        "ServiceRequest.priority")
    identifiers = request.get("identifier") or []
    accession = _identifier_value(identifiers, "ACSN", system_part="accession")
    if not accession:
        raise FhirError(422, "required",
                        "The ServiceRequest has no accession number: give an identifier with "
                        f"type ACSN ({V2_0203_SYSTEM}).", "ServiceRequest.identifier")
    control, order_status = {
        "revoked": (OrderControl.CANCEL, OrderStatus.CANCELLED),
        "entered-in-error": (OrderControl.CANCEL, OrderStatus.CANCELLED),
        "completed": (OrderControl.UPDATE, OrderStatus.COMPLETED),
    }.get(status, (OrderControl.NEW, OrderStatus.SCHEDULED))
    code, system, description = _procedure(request.get("code") or {})
    date, time = _scheduled(request)
    station_ae, station_name = _station(request)
    study_uid = next((i["value"].removeprefix("urn:oid:") for i in identifiers
                      if i.get("system") == DICOM_UID_SYSTEM and i.get("value")), "")
    return Order(
        accession_number=accession,
        patient=patient,
        control=control,
        status=order_status,
        placer_order_number=_identifier_value(identifiers, "PLAC"),
        filler_order_number=_identifier_value(identifiers, "FILL") or accession,
        modality=_modality(request),
        station_ae_title=station_ae,
        station_name=station_name,
        scheduled_date=date,
        scheduled_time=time,
        procedure_code=code,
        procedure_code_system=system,
        procedure_description=description,
        reason=_reason(request.get("reasonCode") or []),
        priority=PRIORITIES.get(priority or "", ""),
        referring_physician=_physician(request.get("requester"), request),
        performing_physician=next(
            (pn for p in request.get("performer") or [] if (pn := _physician(p, request))), ""),
        body_part=_body_part(request.get("bodySite") or []),
        study_instance_uid=study_uid,
        source="fhir",
    )


def _identifier_value(identifiers: list[dict], type_code: str, system_part: str = "") -> str:
    for ident in identifiers:
        if ident.get("value") and type_code in _type_codes(ident):
            return ident["value"]
    if system_part:
        for ident in identifiers:
            if ident.get("value") and system_part in (ident.get("system") or "").lower():
                return ident["value"]
    return ""


def _procedure(code: dict) -> tuple[str, str, str]:
    """Code, system and description; the system stays a FHIR URI (the model allows either)."""
    coding = next(iter(code.get("coding") or []), {})
    description = coding.get("display") or code.get("text") or ""
    return coding.get("code", ""), coding.get("system", ""), description


def _modality(request: dict) -> str:
    concepts = [*(request.get("category") or []), request.get("code") or {},
                *(request.get("orderDetail") or [])]
    for concept in concepts:
        for coding in concept.get("coding") or []:
            code = coding.get("code") or ""
            if coding.get("system") == DCM_SYSTEM and _MODALITY_CODE.match(code):
                return code
    return ""


def _scheduled(request: dict) -> tuple[str, str]:
    value = request.get("occurrenceDateTime") or (request.get("occurrencePeriod") or {}).get(
        "start") or ""
    return _dicom_date_time(value)


def _dicom_date_time(value: str) -> tuple[str, str]:
    """A FHIR dateTime as local DICOM date and time; a partial date gives nothing."""
    if len(value) == 10:
        return value.replace("-", ""), ""
    if len(value) < 10:
        return "", ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # the model's regex allows what Python cannot read (24:00:00)
        return "", ""
    if moment.tzinfo is not None:
        moment = moment.astimezone(LOCAL_TIMEZONE)
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def _station(request: dict) -> tuple[str, str]:
    """The modality asked for: a performer Device with an ``urn:dicom:ae`` identifier."""
    for performer in request.get("performer") or []:
        ident = performer.get("identifier") or {}
        if ident.get("system") == DICOM_AE_SYSTEM and ident.get("value"):
            return ident["value"], performer.get("display", "")
        reference = performer.get("reference") or ""
        device = _resolve(reference, request, []) if reference.startswith("#") else None
        if device and device["resourceType"] == "Device":
            for ident in device.get("identifier") or []:
                if ident.get("system") == DICOM_AE_SYSTEM and ident.get("value"):
                    names = device.get("deviceName") or []
                    return ident["value"], names[0].get("name", "") if names else ""
    return "", ""


def _physician(reference: dict | None, request: dict) -> str:
    """A requester or performer as PN: its display, or the name of a contained Practitioner."""
    if not reference or reference.get("type") == "Device":
        return ""
    if reference.get("display"):
        return _pn_from_text(reference["display"])
    target = reference.get("reference") or ""
    resource = _resolve(target, request, []) if target.startswith("#") else None
    if resource and resource["resourceType"] == "Practitioner":
        return _pn_from_names(resource.get("name") or [])
    return ""


def _reason(concepts: list[dict]) -> str:
    texts = []
    for concept in concepts:
        coding = next(iter(concept.get("coding") or []), {})
        text = concept.get("text") or coding.get("display") or coding.get("code")
        if text:
            texts.append(text)
    return "; ".join(texts)


def _body_part(concepts: list[dict]) -> str:
    """BodyPartExamined: the DICOM term for a known SNOMED code, else the code or the text."""
    for concept in concepts:
        for coding in concept.get("coding") or []:
            code = coding.get("code") or ""
            if coding.get("system") == SNOMED_SYSTEM and code in _BODY_PARTS_BY_SNOMED:
                return _BODY_PARTS_BY_SNOMED[code]
            if code:
                return code
        if concept.get("text"):
            return concept["text"]
    return ""


def _address_text(addresses: list[dict]) -> str:
    for address in addresses:
        if address.get("text"):
            return address["text"]
        parts = [*(address.get("line") or []), address.get("district"), address.get("city"),
                 address.get("state"), address.get("country")]
        if text := ", ".join(p for p in parts if p):
            return text
    return ""


def _dicom_date(value: str) -> str:
    """A FHIR date as DICOM DA; partial dates (year, year-month) do not fit DA and are dropped."""
    return value.replace("-", "") if len(value) == 10 else ""


# ------------------------------------------------------------------ names


def _pn_from_names(names: list[dict]) -> str:
    """PN from the official (else usual, else first) HumanName."""
    if not names:
        return ""
    ranked = sorted(names, key=lambda n: {"official": 0, "usual": 1}.get(n.get("use", ""), 2))
    name = ranked[0]
    family, given = name.get("family") or "", " ".join(name.get("given") or [])
    if family or given:
        return f"{family}^{given}".rstrip("^")
    return _pn_from_text(name.get("text") or "")


def _pn_from_text(text: str) -> str:
    """PN from a full name written in Vietnamese order: family name first, then the rest.

    VN Core asks for the full name in ``text``, and a Reference only has ``display``; the
    given component keeps middle and given names together, as VN Core's ``given`` does."""
    text = " ".join(text.split())
    if "^" in text or not text:
        return text
    family, _, given = text.partition(" ")
    return f"{family}^{given}".rstrip("^")


def readable_name(pn: str) -> str:
    """A PN as people write it: ``Nguyễn^Văn An`` is ``Nguyễn Văn An`` (family name first)."""
    parts = pn.split("=")[0].split("^")
    return " ".join(p.strip() for p in parts[:3] if p.strip())


def _human_name(pn: str) -> dict:
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
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
    """``data`` checked by the R4B ``model`` and dumped as JSON-able dict without empties.

    A failure here is a bug in this module, not the client's: pydantic's error propagates."""
    return model.model_validate(data).model_dump(mode="json", exclude_none=True)


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
    if patient.name:
        data["name"] = [_human_name(patient.name)]
    gender = {"M": "male", "F": "female", "O": "other"}.get(patient.sex.upper())
    if gender:
        data["gender"] = gender
    if re.fullmatch(r"\d{8}", patient.birth_date):
        b = patient.birth_date
        data["birthDate"] = f"{b[:4]}-{b[4:6]}-{b[6:]}"
    if patient.phone:
        data["telecom"] = [{"system": "phone", "value": patient.phone}]
    if patient.address:
        data["address"] = [{"text": patient.address}]
    return _validated(Patient, data)


def fhir_date_time(date: str, time: str = "") -> str:
    """DICOM DA and TM (local time) as a FHIR dateTime with the local offset; "" if no date."""
    if not re.fullmatch(r"\d{8}", date):
        return ""
    day = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    digits = time.split(".")[0].strip()
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2})?)?", digits):
        return day
    digits = digits.ljust(6, "0")
    moment = datetime.strptime(day + digits, "%Y-%m-%d%H%M%S").replace(tzinfo=LOCAL_TIMEZONE)
    return moment.isoformat()


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
        "modality": {"system": DCM_SYSTEM, "code": series.modality or "OT"},
    }
    if series.number is not None:
        data["number"] = series.number
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
        if instance.number is not None:
            item["number"] = instance.number
        instances.append(item)
    if instances:
        data["instance"] = instances
    return data


def imaging_study(result: StudyResult, *, resource_id: str, mrn_system: str,
                  subject: dict | None = None, based_on: list[dict] | None = None,
                  endpoints: str = "contained", last_updated: str | None = None,
                  accession_system: str | None = None) -> dict:
    """The study as a VN Core ImagingStudy.

    ``subject`` defaults to a logical reference (MRN identifier and the readable name),
    ``based_on`` to a logical reference to the ServiceRequest by accession number.
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
    modalities = result.modalities or tuple(dict.fromkeys(
        s.modality for s in result.series if s.modality))
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
        "subject": subject or _patient_reference(result.patient, mrn_system),
    }
    if based_on is not None:
        data["basedOn"] = based_on
    elif result.accession_number:
        data["basedOn"] = [{
            "type": "ServiceRequest",
            "identifier": _accession_identifier(result.accession_number, accession_system),
        }]
    if started := fhir_date_time(result.study_date, result.study_time):
        data["started"] = started
    if result.referring_physician:
        data["referrer"] = {"display": readable_name(result.referring_physician)}
    if endpoints == "contained":
        contained = endpoint_resources(result)
        if contained:
            data["contained"] = contained
            data["endpoint"] = [{"reference": f"#{e['id']}"} for e in contained]
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
    if order and order.procedure_code:
        coding = {"code": order.procedure_code}
        if order.procedure_code_system:
            coding["system"] = order.procedure_code_system
        if order.procedure_description:
            coding["display"] = order.procedure_description
        data["procedureCode"] = [{"coding": [coding]}]
    if order and order.reason:
        data["reasonCode"] = [{"text": order.reason}]
    if result.description:
        data["description"] = result.description
    if result.series:
        data["series"] = [_series(s) for s in result.series]
    return _validated(ImagingStudy, data)


def _patient_reference(patient: PatientInfo, default_system: str) -> dict:
    reference: dict[str, Any] = {
        "type": "Patient",
        "identifier": _mrn_identifier(patient, default_system),
    }
    if display := readable_name(patient.name):
        reference["display"] = display
    return reference


def searchset(entries: list[dict], *, self_url: str, total: int | None = None,
              base_url: str) -> dict:
    """A searchset Bundle of ``entries`` (resources with ids), each with its fullUrl."""
    base = base_url.rstrip("/")
    data = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries) if total is None else total,
        "link": [{"relation": "self", "url": self_url}],
        "entry": [{
            "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
            "resource": resource,
            "search": {"mode": "match"},
        } for resource in entries],
    }
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
        "rest": [{"mode": "server", "resource": [
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
                "interaction": [{"code": "create"}],
            },
        ]}],
    }
    return _validated(CapabilityStatement, data)
