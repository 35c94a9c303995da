"""HTTP routes of the EMR side: the FHIR R4 API (``/fhir``) and the JSON API (``/api/orders``,
``/api/patients``, ``/api/emr/...``); the FHIR searches are ``emr.fhir_search``'s. Staff
only (``pacs.access``): EMR systems call from the hospital's networks.

Errors: each handler answers the refusals it knows of; FHIR routes answer theirs as
OperationOutcomes (``fhir_endpoint``); the archive's errors, unknown paths, wrong methods and
anything unexpected are the app's to answer (``dicomweb.errors.ContainErrors`` and
``error_handlers``: an unexpected failure is a 500 logged without the exception's text, which may
quote patient data), in FHIR's form under /fhir (``ERROR_BODIES``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import anyio
import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicomweb.errors import loggable_path
from emr import fhir, fhir_in
from emr.errors import InvalidResource, loggable
from emr.fhir_format import FHIR_JSON, check_body_format, check_response_format
from emr.fhir_search import (
    MAX_OFFSET,
    conditional_accessions,
    find_studies,
    next_page_url,
    parse_token,
    patients_by_identifier,
    search_page,
)
from emr.model import Order, OrderControl, OrderStatus, PatientInfo, PatientMerge, PatientUpdate
from emr.orders import (
    CancelRefused,
    InvalidOrder,
    OrderConflict,
    StoredOrder,
    UnknownOrder,
    UnknownPatient,
    hhmmss,
    order_json,
    valid_date,
    valid_time,
)
from emr.results import study_result
from emr.service import EmrService
from pacs.http_input import BodyTooLarge, parse_json, read_body, whole_number
from storage.errors import InvalidQuery, NotFound
from storage.index import iso_seconds, studies, study_links

log = logging.getLogger("pacs.emr.http")

_MAX_KEY = 2**63 - 1  # the largest row key a database holds (SQLite INTEGER, PostgreSQL BIGINT)
_API_TEXT_LIMIT = 64  # LO: descriptions, reason and address as the JSON API takes them
# A ServiceRequest with a contained Patient is a few KB, a Bundle with its Patient not much more.
MAX_BODY_BYTES = 1024 * 1024
# ServiceRequests validated at once. A body at the limits of ``fhir_in.read_json`` holds a
# thread for 0.7 s of CPU; without a limit of its own, a burst of them took the threads every
# request shares (40) and searches, metadata and frames waited behind them.
FHIR_PARSING_THREADS = 2


# OperationOutcome issue type (FHIR R4 valueset issue-type) of an error answered with a status.
_ISSUE_TYPES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
                405: "not-supported", 406: "not-supported", 408: "timeout", 409: "conflict",
                413: "too-long", 415: "not-supported", 422: "processing", 503: "transient"}

Endpoint = Callable[[Request], Awaitable[Response]]

# Where a ServiceRequest carries the values of emr.model (emr.fhir_in reads them): the
# expression of a refusal that names one.
_FHIR_ELEMENTS = {
    "accession_number": "ServiceRequest.identifier",
    "study_instance_uid": "ServiceRequest.identifier",
    "placer_order_number": "ServiceRequest.identifier",
    "filler_order_number": "ServiceRequest.identifier",
    "requested_procedure_id": "ServiceRequest.identifier", "modality": "ServiceRequest.code",
    "procedure_code": "ServiceRequest.code", "procedure_code_system": "ServiceRequest.code",
    "procedure_description": "ServiceRequest.code", "reason": "ServiceRequest.reasonCode",
    "priority": "ServiceRequest.priority", "scheduled_date": "ServiceRequest.occurrence",
    "scheduled_time": "ServiceRequest.occurrence",
    "referring_physician": "ServiceRequest.requester",
    "performing_physician": "ServiceRequest.performer",
    "station_ae_title": "ServiceRequest.performer", "station_name": "ServiceRequest.performer",
    "patient.patient_id": "Patient.identifier", "patient.issuer": "Patient.identifier",
    "patient.cccd": "Patient.identifier", "patient.bhyt": "Patient.identifier",
    "patient.name": "Patient.name", "patient.birth_date": "Patient.birthDate",
    "patient.sex": "Patient.gender", "patient.address": "Patient.address",
    "patient.phone": "Patient.telecom",
}


class BadRequest(ValueError):
    """A JSON API request that cannot be applied (HTTP 400)."""


def emr_routes(server) -> list[Route]:
    service: EmrService = server.emr
    settings = server.settings
    fhir_parsing = anyio.CapacityLimiter(FHIR_PARSING_THREADS)

    # ------------------------------------------------------------------ FHIR

    def fhir_base(request: Request) -> str:
        return f"{service.base_url()}/fhir" if settings.public_url else \
            str(request.base_url).rstrip("/") + "/fhir"

    async def metadata(request: Request) -> Response:
        return fhir_response(fhir.capability_statement(fhir_base(request)))

    async def apply_service_request(request: Request, *, at_base: bool = False
                                    ) -> tuple[StoredOrder, dict] | Response:
        """The order of a ServiceRequest body (or a Bundle holding one) applied, with the body
        read; else the refusal to answer."""
        try:
            raw = await read_body(request, MAX_BODY_BYTES)
        except BodyTooLarge:
            return outcome(413, "too-long", f"The body is larger than {MAX_BODY_BYTES} bytes "
                           "(1 MiB); a ServiceRequest with its Patient is a few KB.")
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(_apply_service_request, service, settings, raw,
                                  request.headers.get("if-none-exist"), at_base=at_base),
                limiter=fhir_parsing)
        except UnknownOrder as exc:
            return outcome(422, "not-found", str(exc), "ServiceRequest.identifier")
        except InvalidOrder as exc:
            return outcome(422, "value", str(exc), _FHIR_ELEMENTS.get(exc.field))
        except CancelRefused as exc:
            return outcome(409, "conflict", str(exc), "ServiceRequest.status")
        except OrderConflict as exc:
            return outcome(409, "conflict", str(exc), "ServiceRequest.subject")

    async def create_service_request(request: Request) -> Response:
        applied = await apply_service_request(request)
        if isinstance(applied, Response):
            return applied
        stored, _ = applied
        return fhir_response(_service_request(stored, settings), 201 if stored.created else 200,
                             {"Location": f"{fhir_base(request)}/ServiceRequest/{stored.pk}"})

    async def transaction(request: Request) -> Response:
        """A transaction or batch Bundle POSTed to the base (FHIR R4 http.html#transaction):
        its ServiceRequest and Patient applied as ``POST /fhir/ServiceRequest`` applies them,
        answered with a transaction-response (batch-response) Bundle, an entry for each."""
        applied = await apply_service_request(request, at_base=True)
        if isinstance(applied, Response):
            return applied
        stored, body = applied
        return fhir_response(fhir.transaction_response(
            body, status="201 Created" if stored.created else "200 OK",
            locations={"ServiceRequest": f"ServiceRequest/{stored.pk}",
                       "Patient": f"Patient/{stored.patient_pk}"},
            last_modified=iso_seconds(stored.updated_at)))

    async def read_service_request(request: Request) -> Response:
        pk = _row_key(request.path_params["id"])
        try:
            if pk is None:
                raise UnknownOrder("not a ServiceRequest id")
            stored = await run_in_threadpool(service.orders.get_by_pk, pk)
        except UnknownOrder:
            return outcome(404, "not-found", f"no ServiceRequest {request.path_params['id']}")
        return fhir_response(_service_request(stored, settings))

    async def search_imaging_studies(request: Request) -> Response:
        params = request.query_params.multi_items()
        count, offset = search_page(params)
        uids, total = await run_in_threadpool(find_studies, service, settings, params,
                                              count, offset)
        resources = await run_in_threadpool(
            lambda: [_imaging_study_or_none(service, settings, uid, updated)
                     for uid, updated in uids])
        more = offset + len(uids) < total
        return fhir_response(fhir.searchset(
            [r for r in resources if r], total=total, self_url=str(request.url),
            base_url=fhir_base(request),
            next_url=next_page_url(request, params, offset + len(uids)) if more else None))

    async def read_imaging_study(request: Request) -> Response:
        uid = request.path_params["id"]
        found = await run_in_threadpool(_study_updated, service, uid)
        if found is None:
            return outcome(404, "not-found", f"no ImagingStudy {uid}")
        resource = await run_in_threadpool(_imaging_study, service, settings, uid, found)
        return fhir_response(resource)

    async def search_patients(request: Request) -> Response:
        params = request.query_params.multi_items()
        unknown = {name for name, _ in params} - {"identifier", "_count", "_offset", "_format"}
        if unknown:
            return outcome(400, "not-supported",
                           f"search parameter(s) not supported: {', '.join(sorted(unknown))}")
        token = request.query_params.get("identifier", "")
        if not token:
            return outcome(400, "required", "identifier is required (SYSTEM|VALUE)",
                           "identifier")
        if not parse_token(token)[1]:  # find_patients without a value finds every patient
            return outcome(400, "value", "identifier needs a value (SYSTEM|VALUE)",
                           "identifier")
        count, offset = search_page(params)
        found, total = await run_in_threadpool(patients_by_identifier, service, settings,
                                               token, count, offset)
        entries = await run_in_threadpool(
            lambda: [_patient(service, settings, pk, info) for pk, info in found])
        more = total is None
        return fhir_response(fhir.searchset(
            entries, total=total, self_url=str(request.url), base_url=fhir_base(request),
            next_url=next_page_url(request, params, offset + len(found)) if more else None))

    async def read_patient(request: Request) -> Response:
        pk = _row_key(request.path_params["id"])
        try:
            if pk is None:
                raise NotFound("not a Patient id")
            info = await run_in_threadpool(service.orders.patient, pk)
        except NotFound:
            return outcome(404, "not-found", f"no Patient {request.path_params['id']}")
        return fhir_response(await run_in_threadpool(_patient, service, settings, pk, info))

    # ------------------------------------------------------------------ JSON API

    async def json_body(request: Request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise BadRequest("the body must be application/json")
        try:
            body = parse_json(await read_body(request, MAX_BODY_BYTES))  # 413 past it
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    async def create_order(request: Request) -> Response:
        try:
            order = order_from_json(await json_body(request))
            stored = await run_in_threadpool(service.apply_order, order)
        except (BadRequest, InvalidOrder) as exc:
            return _error(415 if "application/json" in str(exc) else 400, str(exc))
        except UnknownOrder as exc:
            return _error(404, str(exc))
        except OrderConflict as exc:
            return _error(409, str(exc))
        return JSONResponse(order_json(stored), status_code=201,
                            headers={"Location": _order_path(stored.order.accession_number)})

    async def list_orders(request: Request) -> Response:
        params = request.query_params
        date = params.get("date", "")
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date):  # as orders are written
            date = date.replace("-", "")
        try:
            limit, offset = _paging(params)
            found = await run_in_threadpool(
                service.orders.list, status=params.get("status", ""),
                patient_id=params.get("patient_id", ""), date=date,
                limit=limit, offset=offset)
        except (BadRequest, ValueError, InvalidQuery) as exc:
            return _error(400, str(exc))
        return JSONResponse([order_json(o) for o in found])

    async def get_order(request: Request) -> Response:
        accession = request.path_params["accession"]
        try:
            stored = await run_in_threadpool(service.orders.get, accession)
        except UnknownOrder as exc:
            return _error(404, str(exc))
        body = order_json(stored)
        body["studies"] = await run_in_threadpool(_linked_studies, service, stored.pk)
        return JSONResponse(body)

    async def cancel_order(request: Request) -> Response:
        accession = request.path_params["accession"]
        try:
            stored = await run_in_threadpool(service.orders.get, accession)
            cancelled = await run_in_threadpool(service.apply_order, dataclasses.replace(
                stored.order, control=OrderControl.CANCEL, status=OrderStatus.CANCELLED))
        except UnknownOrder as exc:
            return _error(404, str(exc))
        except OrderConflict as exc:
            return _error(409, str(exc))
        return JSONResponse(order_json(cancelled))

    async def save_patient(request: Request) -> Response:
        try:
            patient = patient_from_json(await json_body(request))
            pk = await run_in_threadpool(service.apply_patient, PatientUpdate(patient))
        except (BadRequest, InvalidOrder) as exc:
            return _error(415 if "application/json" in str(exc) else 400, str(exc))
        info = await run_in_threadpool(service.orders.patient, pk)
        return JSONResponse({"id": pk, **dataclasses.asdict(info)})

    async def merge_patients(request: Request) -> Response:
        try:
            body = await json_body(request)
            prior = body.get("prior_patient_id")
            if not isinstance(prior, str) or not prior.strip():
                raise BadRequest("prior_patient_id: required (the MRN merged away)")
            prior_issuer = body.get("prior_issuer") or ""
            if not isinstance(prior_issuer, str):
                raise BadRequest("prior_issuer: must be a string")
            merge = PatientMerge(patient_from_json(body.get("patient")), prior.strip(),
                                 prior_issuer.strip())
            moved = await run_in_threadpool(service.merge_patients, merge)
        except (BadRequest, InvalidOrder) as exc:
            return _error(415 if "application/json" in str(exc) else 400, str(exc))
        except UnknownPatient:
            return _error(404, "prior_patient_id: no such patient (neither in the EMR's "
                               "records nor in the archive); nothing was merged")
        return JSONResponse({"studies_moved": moved})

    async def unmatched(request: Request) -> Response:
        try:
            limit, offset = _paging(request.query_params)
        except BadRequest as exc:
            return _error(400, str(exc))
        return JSONResponse(await run_in_threadpool(service.linker.unmatched, limit=limit,
                                                    offset=offset))

    async def link_study(request: Request) -> Response:
        study = request.path_params["study"]
        try:
            body = await json_body(request)
            accession = body.get("accession_number")
            if not isinstance(accession, str) or not accession.strip():
                raise BadRequest("accession_number: required (the order to link to)")
            move = body.get("move_to_order_patient", True)
            if not isinstance(move, bool):
                raise BadRequest("move_to_order_patient: must be true or false")
            link = await run_in_threadpool(lambda: service.resolve(
                study, accession.strip(), move_to_order_patient=move))
        except BadRequest as exc:
            return _error(415 if "application/json" in str(exc) else 400, str(exc))
        except NotFound as exc:
            return _error(404, str(exc))
        except OrderConflict as exc:
            return _error(409, str(exc))
        return JSONResponse(dataclasses.asdict(link))

    async def dismiss_study(request: Request) -> Response:
        try:
            link = await run_in_threadpool(service.linker.dismiss, request.path_params["study"])
        except NotFound as exc:
            return _error(404, str(exc))
        except OrderConflict as exc:
            return _error(409, str(exc))
        return JSONResponse(dataclasses.asdict(link))

    async def study_order(request: Request) -> Response:
        study = request.path_params["study"]
        link = await run_in_threadpool(service.linker.link_of, study)
        if link is None:
            return _error(404, f"study {study} has not been linked (yet)")
        body: dict[str, Any] = dataclasses.asdict(link)
        if link.order_pk is not None:
            body["order"] = order_json(await run_in_threadpool(service.orders.get_by_pk,
                                                               link.order_pk))
        return JSONResponse(body)

    async def deliveries(request: Request) -> Response:
        params = request.query_params
        try:
            limit, offset = _paging(params)
        except BadRequest as exc:
            return _error(400, str(exc))
        found = await run_in_threadpool(lambda: service.outbox.list(
            state=params.get("state", ""), study_uid=params.get("study", ""), limit=limit,
            offset=offset))
        counts = await run_in_threadpool(service.outbox.counts)
        return JSONResponse({"counts": counts, "deliveries": [d.as_json() for d in found]})

    async def delivery(request: Request) -> Response:
        try:
            found = await run_in_threadpool(service.outbox.get, _delivery_id(request))
        except NotFound as exc:
            return _error(404, str(exc))
        return JSONResponse(found.as_json(with_payload=True))

    async def retry_delivery(request: Request) -> Response:
        try:
            found = await run_in_threadpool(service.outbox.retry, _delivery_id(request))
        except NotFound as exc:
            return _error(404, str(exc))
        except ValueError as exc:
            return _error(409, str(exc))
        return JSONResponse(found.as_json())

    def fhir_endpoint(endpoint: Endpoint) -> Endpoint:
        """``endpoint`` of the FHIR API, behind the checks of the formats the request asks
        for and sends (JSON only: 406, 415), with FHIR refusals answered as OperationOutcomes.
        Other errors are the app's (``ERROR_BODIES`` gives them the same form)."""
        @functools.wraps(endpoint)
        async def answer_in_fhir(request: Request) -> Response:
            try:
                if request.method in ("POST", "PUT", "PATCH"):
                    check_body_format(request.headers.get("content-type"))
                check_response_format(request.query_params.getlist("_format"),
                                      request.headers.get("accept"))
                return await endpoint(request)
            except fhir.FhirError as exc:
                return fhir_response(exc.outcome(), exc.status)
            except InvalidResource as exc:  # a bug or a stored value FHIR cannot carry
                log.error("FHIR %s %s failed: %s", request.method,
                          loggable_path(request.scope), loggable(exc))
                return outcome(500, "exception", "internal error; see the server log")
        return answer_in_fhir

    fhir_routes = [
        Route("/fhir", transaction, methods=["POST"]),
        Route("/fhir/metadata", metadata),
        Route("/fhir/ServiceRequest", create_service_request, methods=["POST"]),
        Route("/fhir/ServiceRequest/{id}", read_service_request),
        Route("/fhir/ImagingStudy", search_imaging_studies),
        Route("/fhir/ImagingStudy/{id}", read_imaging_study),
        Route("/fhir/Patient", search_patients),
        Route("/fhir/Patient/{id}", read_patient),
    ]
    api_routes = [
        Route("/api/orders", create_order, methods=["POST"]),
        Route("/api/orders", list_orders),
        # An accession number may hold "/" (sent as such or as %2F, which is decoded before
        # routing): the routes take the rest of the path, before "/cancel" for a cancel.
        Route("/api/orders/{accession:path}/cancel", cancel_order, methods=["POST"]),
        Route("/api/orders/{accession:path}", get_order),
        Route("/api/patients", save_patient, methods=["POST"]),
        Route("/api/patients/merge", merge_patients, methods=["POST"]),
        Route("/api/emr/unmatched", unmatched),
        Route("/api/emr/unmatched/{study}/link", link_study, methods=["POST"]),
        Route("/api/emr/unmatched/{study}/dismiss", dismiss_study, methods=["POST"]),
        Route("/api/emr/studies/{study}", study_order),
        Route("/api/emr/deliveries", deliveries),
        Route("/api/emr/deliveries/{id:int}", delivery),
        Route("/api/emr/deliveries/{id:int}/retry", retry_delivery, methods=["POST"]),
    ]
    return [Route(r.path, fhir_endpoint(r.endpoint), methods=r.methods) for r in fhir_routes
            ] + api_routes


def fhir_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status_code=status,
                    media_type=FHIR_JSON + "; charset=utf-8", headers=headers)


def outcome(status: int, code: str, text: str, expression: str | None = None) -> Response:
    return fhir_response(fhir.operation_outcome("error", code, text, expression), status)


def fhir_error(status: int, message: str) -> Response:
    """An error the app answers on a FHIR path (an unknown path, a wrong method, the archive's
    errors, an unexpected failure) as the OperationOutcome a FHIR client reads."""
    return outcome(status, _ISSUE_TYPES.get(status, "exception"), message)


# For ``dicomweb.errors.ContainErrors`` and ``error_handlers``: errors under /fhir in FHIR's form.
ERROR_BODIES = {"/fhir": fhir_error}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


def _order_path(accession_number: str) -> str:
    """The JSON API's address of an order, percent-encoded (RFC 3986): an accession number
    may hold "/", "#", non-ASCII letters (``BỆNH-02``), which a header cannot carry."""
    return f"/api/orders/{quote(accession_number, safe='')}"


def _row_key(text: str) -> int | None:
    """A resource id that can be a row key, else None (no such resource)."""
    number = whole_number(text)
    return number if number is not None and number <= _MAX_KEY else None


def _delivery_id(request: Request) -> int:
    delivery_id = request.path_params["id"]
    if not 0 <= delivery_id <= _MAX_KEY:
        raise NotFound(f"no delivery {delivery_id}")
    return delivery_id


def _paging(params: Any) -> tuple[int, int]:
    limit = whole_number(params.get("limit", "100"))
    if limit is None or not 1 <= limit <= 1000:
        raise BadRequest("limit: a whole number 1-1000")
    offset = whole_number(params.get("offset", "0"))
    if offset is None or offset > MAX_OFFSET:
        raise BadRequest(f"offset: a whole number 0-{MAX_OFFSET}")
    return limit, offset


# ---------------------------------------------------------------------------- JSON bodies


_PATIENT_FIELDS = tuple(f.name for f in dataclasses.fields(PatientInfo))
_ORDER_FIELDS = tuple(f.name for f in dataclasses.fields(Order)
                      if f.name not in ("patient", "control", "status", "source"))
_DICOM_DATE = re.compile(r"^\d{8}$")
_DICOM_TIME = re.compile(r"^\d{2}(\d{2}(\d{2})?)?$")


def _strings(body: dict[str, Any], names: tuple[str, ...], prefix: str) -> dict[str, str]:
    """The named fields of a JSON object, each a string (stripped; absent: "")."""
    values = {}
    for name in names:
        value = body.get(name, "")
        if not isinstance(value, str):
            raise BadRequest(f"{prefix}{name}: must be a string")
        values[name] = value.strip()
    return values


def patient_from_json(body: Any) -> PatientInfo:
    if not isinstance(body, dict):
        raise BadRequest("patient: must be an object with at least patient_id")
    values = _strings(body, _PATIENT_FIELDS, "patient.")
    if not values["patient_id"]:
        raise BadRequest("patient.patient_id: required (the hospital's MRN)")
    if values["birth_date"] and not _DICOM_DATE.match(values["birth_date"].replace("-", "")):
        raise BadRequest("patient.birth_date: YYYYMMDD or YYYY-MM-DD")
    values["birth_date"] = values["birth_date"].replace("-", "")
    if values["birth_date"] and not valid_date(values["birth_date"]):
        raise BadRequest("patient.birth_date: not a real date")
    if values["sex"] not in ("", "M", "F", "O"):
        raise BadRequest("patient.sex: M, F or O")
    if len(values["address"]) > _API_TEXT_LIMIT:
        raise BadRequest(f"patient.address: at most {_API_TEXT_LIMIT} characters (DICOM LO)")
    return PatientInfo(**values)


def order_from_json(body: dict[str, Any]) -> Order:
    """An order of the JSON API: the fields of ``emr.model.Order``, with ``patient`` an object
    of ``PatientInfo`` fields; dates YYYYMMDD (or YYYY-MM-DD), times HHMMSS (or HH:MM:SS)."""
    unknown = set(body) - set(_ORDER_FIELDS) - {"patient", "control", "status"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = _strings(body, _ORDER_FIELDS, "")
    if not values["accession_number"]:
        raise BadRequest("accession_number: required")
    values["scheduled_date"] = values["scheduled_date"].replace("-", "")
    values["scheduled_time"] = values["scheduled_time"].replace(":", "")
    if values["scheduled_date"] and not _DICOM_DATE.match(values["scheduled_date"]):
        raise BadRequest("scheduled_date: YYYYMMDD or YYYY-MM-DD")
    if values["scheduled_date"] and not valid_date(values["scheduled_date"]):
        raise BadRequest("scheduled_date: not a real date")
    if values["scheduled_time"] and not _DICOM_TIME.match(values["scheduled_time"]):
        raise BadRequest("scheduled_time: HHMMSS, HHMM, HH:MM:SS or HH:MM")
    if values["scheduled_time"] and not valid_time(values["scheduled_time"]):
        raise BadRequest("scheduled_time: not a real time of day")
    values["scheduled_time"] = hhmmss(values["scheduled_time"])  # 08:30 is 083000
    for name in ("procedure_description", "reason"):
        if len(values[name]) > _API_TEXT_LIMIT:
            raise BadRequest(f"{name}: at most {_API_TEXT_LIMIT} characters (DICOM LO)")
    try:
        control = OrderControl(body.get("control", "new"))
        status = OrderStatus(body.get("status", "SCHEDULED"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return Order(patient=patient_from_json(body.get("patient")), control=control,
                 status=status, source="api", **values)


# ---------------------------------------------------------------------------- FHIR searches


def _apply_service_request(service: EmrService, settings, raw: bytes,
                           if_none_exist: str | None, *, at_base: bool = False
                           ) -> tuple[StoredOrder, dict]:
    """Read, validate and apply a ServiceRequest body (``at_base``: a transaction or batch
    Bundle of a ServiceRequest and its Patient); the order and the body. Run in a worker thread
    (a body at the limits of ``fhir_in.read_json`` takes up to 0.7 s to validate).

    A conditional create (``If-None-Exist``, FHIR R4 http.html#ccreate) that finds its order
    applies nothing and answers that order; finding several is 412."""
    body = fhir_in.read_json(raw)
    if at_base:
        fhir_in.check_transaction(body)
    order = fhir_in.parse_service_request(body, mrn_system=settings.emr_mrn_system)
    if if_none_exist is not None:
        found = service.orders.by_accessions(
            conditional_accessions(if_none_exist, fhir_in.accession_systems(body)))
        if len(found) > 1:
            raise fhir.FhirError(412, "multiple-matches", f"If-None-Exist matches {len(found)} "
                                 "ServiceRequests; nothing was applied")
        if found:
            return next(iter(found.values())), body
    return service.apply_order(order), body


def _patient(service: EmrService, settings, pk: int, info: PatientInfo) -> dict:
    """The Patient resource of an EMR patient; one merged away (ADT^A40) says where it went."""
    resource = fhir.patient_resource(info, str(pk), mrn_system=settings.emr_mrn_system)
    survivor = service.orders.merged_into(pk)
    if survivor is not None:
        resource = {**resource, "active": False, "link": [
            {"other": {"reference": f"Patient/{survivor}"}, "type": "replaced-by"}]}
    return resource


def _service_request(stored, settings) -> dict:
    return fhir.service_request_resource(
        stored.order, str(stored.pk), mrn_system=settings.emr_mrn_system,
        patient_id=str(stored.patient_pk), last_updated=iso_seconds(stored.updated_at))


def _study_updated(service: EmrService, uid: str) -> dt.datetime | None:
    with service.archive.index.read() as conn:
        return conn.execute(sa.select(studies.c.updated_at).where(
            studies.c.study_instance_uid == uid)).scalar()


def _imaging_study_or_none(service: EmrService, settings, uid: str,
                           updated: dt.datetime) -> dict | None:
    """One study of a search; one that cannot be shown is left out (and logged) rather than
    failing the patient's whole search."""
    try:
        return _imaging_study(service, settings, uid, updated)
    except InvalidResource as exc:
        log.error("ImagingStudy %s left out of a search: %s", uid, loggable(exc))
        return None


def _imaging_study(service: EmrService, settings, uid: str,
                   updated: dt.datetime) -> dict | None:
    order = service.order_of(uid)
    try:
        result = study_result(service.archive, uid, base=service.base_url(), order=order)
    except NotFound:
        return None
    subject = None
    if order is not None:
        subject = {"reference": f"Patient/{order.patient_pk}",
                   "display": fhir.readable_name(order.order.patient.name) or None}
        subject = {k: v for k, v in subject.items() if v}
    return fhir.imaging_study(result, resource_id=uid, mrn_system=settings.emr_mrn_system,
                              subject=subject, last_updated=iso_seconds(updated))


def _linked_studies(service: EmrService, order_pk: int) -> list[str]:
    with service.archive.index.read() as conn:
        return [uid for (uid,) in conn.execute(sa.select(study_links.c.study_instance_uid)
                                               .where(study_links.c.order_pk == order_pk))]
