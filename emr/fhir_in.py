"""FHIR R4 in: the order in a ServiceRequest (alone, with a contained Patient, or in a Bundle).

Validated with the ``fhir.resources.R4B`` models before anything is read; see ``emr.fhir`` for
the identifier systems and the time-zone rule.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.servicerequest import ServiceRequest

from emr.fhir import (
    BHYT_SYSTEM,
    BODY_PARTS_BY_SNOMED,
    BUNDLE_TYPES,
    CCCD_SYSTEM,
    DCM_SYSTEM,
    DICOM_AE_SYSTEM,
    DICOM_UID_SYSTEM,
    GENDERS,
    LEGACY_BHYT_SYSTEM,
    MODALITY_CODE,
    PRIORITIES,
    REQUEST_INTENTS,
    REQUEST_STATUSES,
    SNOMED_SYSTEM,
    V2_0203_SYSTEM,
    FhirError,
    mrn_issuer,
)
from emr.model import (
    LOCAL_TIMEZONE,
    Order,
    OrderControl,
    OrderStatus,
    PatientInfo,
    one_line,
)
from pacs.http_input import JsonNestedTooDeep, TooManyJsonValues, check_json_size, parse_json

# ServiceRequest.status and .intent of an order the worklist may hand out (status is a
# modifier element: draft and on-hold requests are not to be done; revoked, entered-in-error
# and completed change an order, see _order).
_SCHEDULABLE_STATUSES = {"active", "revoked", "entered-in-error", "completed"}
_ORDER_INTENTS = {"order", "original-order", "reflex-order", "filler-order", "instance-order"}

# What a body may hold before the models see it. Validating costs time and memory per value
# (pydantic keeps an error per bad array item: 2 MiB of ``"note": [1,1,...]`` took 2 GB), and
# the models recurse once per level. A ServiceRequest with its Patient holds a few hundred
# values nested at most ~20 deep; a body at these limits validates in about a quarter second.
MAX_VALUES = 10_000
MAX_DEPTH = 64


def read_json(raw: bytes) -> Any:
    """A request body as JSON for :func:`parse_service_request`; :class:`FhirError` 400 when
    it is not JSON or nests deeper than ``MAX_DEPTH``, 413 when it holds more than
    ``MAX_VALUES`` values."""
    try:
        body = parse_json(raw)
    except ValueError as exc:
        raise FhirError(400, "structure", str(exc)) from None
    kind = body.get("resourceType") if isinstance(body, dict) else None
    kind = kind if isinstance(kind, str) else ""
    try:
        check_json_size(body, max_values=MAX_VALUES, max_depth=MAX_DEPTH)
    except TooManyJsonValues as exc:
        where = _fhirpath(kind, exc.location) or "the body"
        raise FhirError(413, "too-long", f"The body holds more than {MAX_VALUES} JSON values "
                        f"(the limit was passed in {where}); a ServiceRequest with its Patient "
                        "holds a few hundred.", where) from None
    except JsonNestedTooDeep as exc:
        where = _fhirpath(kind, exc.location)
        shown = _fhirpath(kind, exc.location[:4]) + ("…" if len(exc.location) > 4 else "")
        raise FhirError(400, "structure", f"The body nests values more than {MAX_DEPTH} deep "
                        f"(in {shown}); FHIR resources nest a few levels.", where) from None
    return body


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


def check_transaction(body: Any) -> None:
    """What a POST to the FHIR base takes: a transaction or batch Bundle whose entries are a
    ServiceRequest and its Patient, each to POST (``FhirError`` 400/422 otherwise: an entry
    this server would not apply cannot be answered as done)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle" \
            or body.get("type") not in ("transaction", "batch"):
        raise FhirError(400, "not-supported", "The base takes a transaction or batch Bundle; "
                        "POST a ServiceRequest to [base]/ServiceRequest.", "Bundle.type")
    for number, entry in enumerate(body.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        kind = resource.get("resourceType") if isinstance(resource, dict) else None
        method = ((entry.get("request") or {}).get("method") or "POST").upper()
        if kind not in ("ServiceRequest", "Patient") or method not in ("POST", "PUT"):
            raise FhirError(422, "not-supported", f"entry {number}: only a ServiceRequest and "
                            f"its Patient are taken here, to POST (got {kind} {method})",
                            f"Bundle.entry[{number}]")


def _check_resource_types(resource: dict, path: str, *, contained: bool = False) -> None:
    """Refuse resources without a known resourceType, which the models would let through,
    and contained resources that contain others (FHIR dom-2, which the models do not check:
    unchecked, they nest as deep as a body goes)."""
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
    inner = resource.get("contained")
    if contained and inner is not None:
        raise FhirError(400, "invariant", f"{path} is a contained resource and cannot contain "
                        "resources itself (FHIR dom-2): contain them all in the "
                        "ServiceRequest.", f"{path}.contained")
    if isinstance(inner, list):
        for i, item in enumerate(inner):
            if isinstance(item, dict):
                _check_resource_types(item, f"{path}.contained[{i}]", contained=True)
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
    if status not in _SCHEDULABLE_STATUSES:
        # status is a modifier: a draft or an order on hold is not one to do, and no order
        # status here says "not yet" (the worklist would hand it to the modality).
        raise FhirError(422, "not-supported", f"A ServiceRequest with status {status!r} cannot "
                        "be scheduled; send it when it is active (or revoked to cancel it).",
                        "ServiceRequest.status")
    intent = request.get("intent")
    if intent not in REQUEST_INTENTS:
        raise FhirError(400, "value", f"Unknown ServiceRequest.intent {intent!r}.",
                        "ServiceRequest.intent")
    if intent not in _ORDER_INTENTS:
        raise FhirError(422, "not-supported", f"A ServiceRequest with intent {intent!r} is not "
                        "an order to do; send intent 'order' (or one of its kinds: "
                        f"{', '.join(sorted(_ORDER_INTENTS - {'order'}))}).",
                        "ServiceRequest.intent")
    priority = request.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise FhirError(400, "value", f"Unknown ServiceRequest.priority {priority!r}.",
                        "ServiceRequest.priority")
    identifiers = request.get("identifier") or []
    accession = next((i["value"] for i in _accession_identifiers(identifiers)), "")
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


def accession_systems(body: dict) -> set[str]:
    """The identifier systems a ServiceRequest body that :func:`parse_service_request` took
    gives its accession number under (a conditional create may name them)."""
    request = body if body["resourceType"] == "ServiceRequest" else _request_in_bundle(body)[0]
    return {i["system"] for i in _accession_identifiers(request.get("identifier") or [])
            if i.get("system")}


def _accession_identifiers(identifiers: list[dict]) -> list[dict]:
    """The identifiers an accession number is read from, best first: of type ACSN, then of a
    system that says so (``…/accession``)."""
    valued = [i for i in identifiers if i.get("value")]
    typed = [i for i in valued if "ACSN" in _type_codes(i)]
    return typed + [i for i in valued if i not in typed
                    and "accession" in (i.get("system") or "").lower()]


def _identifier_value(identifiers: list[dict], type_code: str) -> str:
    return next((i["value"] for i in identifiers
                 if i.get("value") and type_code in _type_codes(i)), "")


def _procedure(code: dict) -> tuple[str, str, str]:
    """Code, system and description; the system stays a FHIR URI (the model allows either)."""
    coding = next(iter(code.get("coding") or []), {})
    description = one_line(coding.get("display") or code.get("text") or "")
    return coding.get("code", ""), coding.get("system", ""), description


def _modality(request: dict) -> str:
    concepts = [*(request.get("category") or []), request.get("code") or {},
                *(request.get("orderDetail") or [])]
    for concept in concepts:
        for coding in concept.get("coding") or []:
            code = coding.get("code") or ""
            if coding.get("system") == DCM_SYSTEM and MODALITY_CODE.match(code):
                return code
    return ""


def _scheduled(request: dict) -> tuple[str, str]:
    if request.get("occurrenceDateTime"):
        return _dicom_date_time(request["occurrenceDateTime"], "ServiceRequest.occurrenceDateTime")
    start = (request.get("occurrencePeriod") or {}).get("start") or ""
    return _dicom_date_time(start, "ServiceRequest.occurrencePeriod.start")


def _dicom_date_time(value: str, element: str) -> tuple[str, str]:
    """A FHIR dateTime as local DICOM date and time; a partial date gives nothing.
    :class:`FhirError` 400 for a moment whose local day is outside the years 1-9999."""
    if len(value) == 10:
        return value.replace("-", ""), ""
    if len(value) < 10:
        return "", ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # the model's regex allows what Python cannot read (24:00:00)
        return "", ""
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(LOCAL_TIMEZONE)
        except OverflowError:  # 0001-01-01T00:00:00+14:00 is in year 0 anywhere else
            raise FhirError(400, "value", f"{element} {value!r} is outside the years 1-9999 "
                            f"in local time ({LOCAL_TIMEZONE}).", element) from None
    # Not strftime: its %Y writes year 1 as "1" on Linux, not the "0001" of DICOM DA.
    return f"{moment.year:04d}{moment:%m%d}", f"{moment:%H%M%S}"


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
            texts.append(one_line(text))
    return "; ".join(texts)


def _body_part(concepts: list[dict]) -> str:
    """BodyPartExamined: the DICOM term for a known SNOMED code, else the code or the text."""
    for concept in concepts:
        for coding in concept.get("coding") or []:
            code = coding.get("code") or ""
            if coding.get("system") == SNOMED_SYSTEM and code in BODY_PARTS_BY_SNOMED:
                return BODY_PARTS_BY_SNOMED[code]
            if code:
                return code
        if concept.get("text"):
            return concept["text"]
    return ""


def _address_text(addresses: list[dict]) -> str:
    for address in addresses:
        if address.get("text"):
            return one_line(address["text"])
        parts = [*(address.get("line") or []), address.get("district"), address.get("city"),
                 address.get("state"), address.get("country")]
        if text := ", ".join(p for p in parts if p):
            return one_line(text)
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
    family = one_line(name.get("family") or "")
    given = one_line(" ".join(name.get("given") or []))
    if family or given:
        return f"{family}^{given}".rstrip("^")
    return _pn_from_text(name.get("text") or "")


def _pn_from_text(text: str) -> str:
    """PN from a full name written in Vietnamese order: family name first, then the rest.

    VN Core asks for the full name in ``text``, and a Reference only has ``display``; the
    given component keeps middle and given names together, as VN Core's ``given`` does. Titles
    written before the name, each ending in a dot (``BS.``, ``ThS.BS.``, ``PGS. TS.``), are the
    prefix component: ``BS. Trần Thị Bình`` is ``Trần^Thị Bình^^BS.``, not family name "BS."."""
    text = " ".join(text.split())
    if "^" in text or not text:
        return text
    words = text.split(" ")
    titles = []
    while len(words) > 1 and words[0].endswith("."):
        titles.append(words.pop(0))
    family, given = words[0], " ".join(words[1:])
    return f"{family}^{given}^^{' '.join(titles)}".rstrip("^")
