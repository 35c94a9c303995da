"""What the FHIR API takes in: request bodies too large or too deep, values it cannot schedule,
searches with empty or paged identifiers, Accept headers that refuse FHIR JSON.

Each test runs against the EMR routes mounted as ``pacs.http`` mounts them, in this process,
over an archive of its own (SQLite); every refusal is an OperationOutcome and writes nothing.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from starlette.applications import Starlette
from starlette.middleware import Middleware

from dicomweb.errors import ContainErrors, error_handlers
from emr.fhir import CCCD_SYSTEM
from emr.fhir_in import MAX_DEPTH, MAX_VALUES
from emr.http import ERROR_BODIES, MAX_BODY_BYTES, emr_routes
from emr.model import PatientInfo, PatientMerge
from emr.orders import UnknownOrder
from emr.service import EmrService
from pacs.app import archive_for
from pacs.settings import Settings
from tests.test_fhir_resources import MRN_SYSTEM, contained_request, transaction_bundle

FHIR_JSON = {"Content-Type": "application/fhir+json"}
ACCESSION_SYSTEM = "https://bv-cho-ray.example/sid/accession"  # contained_request's


class Client:
    """An ASGI app asked one request at a time, through httpx's ASGI transport."""

    def __init__(self, app) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacs") as http:
                return await http.request(method, url, **kwargs)
        return asyncio.run(send())

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture(scope="module")
def emr(tmp_path_factory):
    """The EMR routes and their service, over a fresh archive."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("fhir-input") / "pacs-data",
                        hl7_port=0, emr_mrn_system=MRN_SYSTEM)
    archive = archive_for(settings)
    service = EmrService(archive, settings)
    app = Starlette(routes=emr_routes(SimpleNamespace(emr=service, settings=settings)),
                    middleware=[Middleware(ContainErrors, bodies=ERROR_BODIES)],
                    exception_handlers=error_handlers(ERROR_BODIES))
    yield SimpleNamespace(http=Client(app), service=service)
    archive.close()


def service_request(accession: str, patient_id: str = "BN0001", **changes) -> dict:
    request = contained_request(**changes)
    request["identifier"][0]["value"] = accession
    request["contained"][0]["identifier"][0]["value"] = patient_id  # the MRN
    return request


def post(emr, body, headers: dict | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return emr.http.post("/fhir/ServiceRequest", content=content,
                         headers={**FHIR_JSON, **(headers or {})})


def issue(answer) -> dict:
    """The one issue of an OperationOutcome answer (which must validate)."""
    assert answer.headers["content-type"].startswith("application/fhir+json")
    body = answer.json()
    OperationOutcome.model_validate(body)
    [only] = body["issue"]
    return only


def ordered(emr, accession: str) -> bool:
    try:
        emr.service.orders.get(accession)
    except UnknownOrder:
        return False
    return True


# ---------------------------------------------------------------------------- body size


def test_a_body_larger_than_1_mib_is_413_before_it_is_read(emr):
    # Fuzzing: no limit on FHIR bodies; 6 MiB of JSON took 6 GB and 48 s to refuse.
    body = json.dumps(service_request("BIG1")).encode()
    body += b" " * (MAX_BODY_BYTES + 1 - len(body))

    answer = post(emr, body)

    assert answer.status_code == 413
    assert issue(answer)["code"] == "too-long"
    assert "1 MiB" in issue(answer)["diagnostics"]
    assert not ordered(emr, "BIG1")


def test_a_json_api_order_larger_than_1_mib_is_413(emr):
    order = {"accession_number": "BIG3", "modality": "CT", "patient": {"patient_id": "BN-BIG"},
             "procedure_description": "x" * (MAX_BODY_BYTES + 1)}
    answer = emr.http.post("/api/orders", json=order)
    assert answer.status_code == 413 and answer.json()["status"] == 413
    assert not ordered(emr, "BIG3")


def test_a_body_sent_without_its_length_is_cut_off_at_1_mib(emr):
    chunk = b" " * 65536

    async def chunks():  # chunked: no Content-Length to refuse it by
        yield json.dumps(service_request("BIG2")).encode()
        for _ in range(MAX_BODY_BYTES // len(chunk) + 1):
            yield chunk

    answer = emr.http.post("/fhir/ServiceRequest", content=chunks(), headers=FHIR_JSON)

    assert answer.status_code == 413
    assert issue(answer)["code"] == "too-long"
    assert not ordered(emr, "BIG2")


def test_a_body_of_almost_1_mib_is_read(emr):
    body = json.dumps(service_request("BIG3")).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))

    answer = post(emr, body)

    assert answer.status_code == 201, answer.text[:300]
    assert ordered(emr, "BIG3")


# ---------------------------------------------------------------------------- JSON values


def test_an_array_of_more_values_than_the_limit_is_413_naming_the_element(emr):
    # Fuzzing: the models keep an error per bad array item; 2 MiB of "note": [1,1,...] took
    # 2 GB and 11 s. This body is 30 KB.
    answer = post(emr, service_request("AMP1", note=[1] * MAX_VALUES))

    assert answer.status_code == 413
    assert issue(answer)["code"] == "too-long"
    assert issue(answer)["expression"] == ["ServiceRequest.note"]
    assert f"more than {MAX_VALUES} JSON values" in issue(answer)["diagnostics"]
    assert not ordered(emr, "AMP1")


def test_too_many_values_inside_a_bundle_are_named_by_their_path_in_it(emr):
    request = service_request("AMP2")
    patient = request.pop("contained")[0]
    request["subject"] = {"reference": "urn:uuid:p1"}
    patient["name"][0]["given"] = ["An"] * MAX_VALUES
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": patient}, {"resource": request}]}

    answer = post(emr, bundle)

    assert answer.status_code == 413
    assert issue(answer)["expression"] == ["Bundle.entry[0].resource.name[0].given"]


def test_a_body_within_the_value_limit_gets_the_models_400(emr):
    answer = post(emr, service_request("AMP3", note=[1] * (MAX_VALUES // 2)))

    assert answer.status_code == 400
    assert issue(answer)["expression"][0].startswith("ServiceRequest.note[0]")
    assert not ordered(emr, "AMP3")


# ---------------------------------------------------------------------------- nesting


def nested_extension(levels: int) -> dict:
    extension = {"url": "http://example.org/e", "valueString": "v"}
    for level in range(levels):
        extension = {"url": f"http://example.org/e{level}", "extension": [extension]}
    return extension


def test_extensions_nested_300_deep_are_400_naming_the_element(emr):
    # Fuzzing: RecursionError in the models, answered 500.
    answer = post(emr, service_request("DEEP1", extension=[nested_extension(300)]))

    assert answer.status_code == 400
    assert issue(answer)["code"] == "structure"
    assert issue(answer)["expression"][0].startswith(
        "ServiceRequest.extension[0].extension[0].extension[0]")
    assert f"more than {MAX_DEPTH} deep" in issue(answer)["diagnostics"]
    assert not ordered(emr, "DEEP1")


def test_extensions_nested_as_deep_as_the_limit_allows_are_read(emr):
    # ServiceRequest, extension[], {}: 3 levels; each nested extension adds 2.
    levels = (MAX_DEPTH - 3) // 2

    answer = post(emr, service_request("DEEP2", extension=[nested_extension(levels)]))

    assert answer.status_code == 201, answer.text[:300]


def test_contained_resources_nested_200_deep_are_400_naming_the_element(emr):
    # Fuzzing: RecursionError, answered 500.
    request = service_request("DEEP3")
    inner = request["contained"][0]
    for level in range(200):
        inner["contained"] = [{"resourceType": "Patient", "id": f"n{level}"}]
        inner = inner["contained"][0]

    answer = post(emr, request)

    assert answer.status_code == 400
    assert issue(answer)["expression"][0].startswith("ServiceRequest.contained[0].contained[0]")
    assert not ordered(emr, "DEEP3")


def test_a_contained_resource_that_contains_another_is_400_by_dom_2(emr):
    request = service_request("DEEP4")
    request["contained"][0]["contained"] = [{"resourceType": "Patient", "id": "other"}]

    answer = post(emr, request)

    assert answer.status_code == 400
    assert issue(answer)["code"] == "invariant"
    assert issue(answer)["expression"] == ["ServiceRequest.contained[0].contained"]
    assert not ordered(emr, "DEEP4")


# ---------------------------------------------------------------------------- dates


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"])
@pytest.mark.parametrize("element", ["occurrenceDateTime", "occurrencePeriod.start"])
def test_a_scheduled_time_outside_the_calendar_in_local_time_is_400(emr, moment, element):
    # Fuzzing: OverflowError converting to local time, answered 500.
    accession = f"CAL{moment[:2]}{len(element)}"
    occurrence = ({"occurrenceDateTime": moment} if element == "occurrenceDateTime" else
                  {"occurrenceDateTime": None, "occurrencePeriod": {"start": moment}})
    request = {k: v for k, v in service_request(accession, **occurrence).items()
               if v is not None}

    answer = post(emr, request)

    assert answer.status_code == 400, answer.text[:300]
    assert issue(answer)["code"] == "value"
    assert issue(answer)["expression"] == [f"ServiceRequest.{element}"]
    assert "years 1-9999" in issue(answer)["diagnostics"]
    assert not ordered(emr, accession)


def test_a_scheduled_time_before_year_1000_keeps_four_digits_of_year(emr):
    # strftime wrote year 999 as "999": the order was refused as "not a real date".
    answer = post(emr, service_request("CAL999", occurrenceDateTime="0999-01-02T10:00:00+07:00"))

    assert answer.status_code == 201, answer.text[:300]
    assert emr.service.orders.get("CAL999").order.scheduled_date == "09990102"


# ---------------------------------------------------------------------------- creates


def if_none_exist(*accessions: str, system: str = ACCESSION_SYSTEM) -> dict:
    """The header of a conditional create for any of these accession numbers."""
    return {"If-None-Exist": "identifier=" + ",".join(f"{system}|{a}" for a in accessions)}


def test_a_post_answers_201_when_it_creates_the_order_and_200_when_it_updates_it(emr):
    # Review: the second POST, which updated the order, was answered 201 Created too.
    created = post(emr, service_request("UPD1"))
    updated = post(emr, service_request("UPD1", priority="stat"))

    assert (created.status_code, updated.status_code) == (201, 200), updated.text[:300]
    assert updated.headers["location"] == created.headers["location"]
    assert updated.json()["priority"] == "stat"


def test_a_new_request_for_another_patients_accession_is_409_and_moves_nothing(emr):
    # Review: the order (no images yet) silently moved to the patient of the second request.
    assert post(emr, service_request("DUP1")).status_code == 201

    answer = post(emr, service_request("DUP1", patient_id="BN0999"))

    assert answer.status_code == 409, answer.text[:300]
    assert issue(answer)["code"] == "conflict"
    assert issue(answer)["expression"] == ["ServiceRequest.subject"]
    assert emr.service.orders.get("DUP1").order.patient.patient_id == "BN0001"


@pytest.mark.parametrize("system", [ACCESSION_SYSTEM, None])
def test_a_conditional_create_that_finds_its_order_applies_nothing_and_answers_it(emr, system):
    # Review: If-None-Exist was ignored: the POST overwrote the order, even with another
    # patient.
    accession = f"CC1{'S' if system else ''}"
    first = post(emr, service_request(accession))
    criteria = {"If-None-Exist": f"identifier={accession}"} if system is None else \
        if_none_exist(accession, system=system)

    again = post(emr, service_request(accession, patient_id="BN0998", priority="stat"),
                 headers=criteria)

    assert again.status_code == 200, again.text[:300]
    assert again.headers["location"] == first.headers["location"]
    assert again.json()["id"] == first.json()["id"]
    kept = emr.service.orders.get(accession).order
    assert (kept.patient.patient_id, kept.priority) == ("BN0001", "HIGH")


def test_a_conditional_create_that_finds_nothing_creates_the_order(emr):
    answer = post(emr, service_request("CC2"), headers=if_none_exist("CC2"))

    assert answer.status_code == 201, answer.text[:300]
    assert ordered(emr, "CC2")


def test_a_conditional_create_matching_two_orders_is_412_and_applies_nothing(emr):
    for accession in ("CC3", "CC4"):
        assert post(emr, service_request(accession)).status_code == 201

    answer = post(emr, service_request("CC5"), headers=if_none_exist("CC3", "CC4"))

    assert answer.status_code == 412, answer.text[:300]
    assert issue(answer)["code"] == "multiple-matches"
    assert not ordered(emr, "CC5")


@pytest.mark.parametrize(("criteria", "parameter"), [
    ("status=active", "status"),
    ("identifier=CC6&_lastUpdated=gt2020-01-01", "_lastUpdated"),
    ("identifier=https://his.example/sid/order|HIS-778899", "identifier"),  # the placer's
    ("identifier=", "identifier"),
])
def test_a_conditional_create_on_criteria_orders_are_not_found_by_is_400_naming_them(
        emr, criteria, parameter):
    answer = post(emr, service_request("CC6"), headers={"If-None-Exist": criteria})

    assert answer.status_code == 400, answer.text[:300]
    assert issue(answer)["expression"] == [parameter]
    assert not ordered(emr, "CC6")


# ---------------------------------------------------------------------------- Patient search


@pytest.fixture(scope="module")
def five_with_one_cccd(emr) -> str:
    """Five EMR patients sharing one CCCD (records the hospital has not merged yet)."""
    cccd = "079099000555"
    for number in range(5):
        emr.service.orders.save_patient(PatientInfo(patient_id=f"BNC{number}", cccd=cccd))
    return cccd


@pytest.mark.parametrize("token", ["|", f"{CCCD_SYSTEM}|", f"{MRN_SYSTEM}|", ""])
@pytest.mark.parametrize("resource", ["Patient", "ImagingStudy"])
def test_a_search_with_an_empty_identifier_value_is_400(emr, five_with_one_cccd, token,
                                                       resource):
    # Fuzzing: an empty value matched every patient, and every study without an accession.
    answer = emr.http.get(f"/fhir/{resource}", params={"identifier": token})

    assert answer.status_code == 400
    assert issue(answer)["expression"] == ["identifier"]


@pytest.mark.parametrize("count", ["abc", "0", "101", "-1", "２"])
def test_a_patient_search_count_out_of_bounds_is_400(emr, count):
    answer = emr.http.get("/fhir/Patient", params={"identifier": "BNC0", "_count": count})

    assert answer.status_code == 400
    assert issue(answer)["expression"] == ["_count"]


def test_a_patient_search_pages_by_count_with_next_links(emr, five_with_one_cccd):
    # Fuzzing: _count was neither checked nor applied, and there was no next link.
    page = emr.http.get("/fhir/Patient", params={
        "identifier": f"{CCCD_SYSTEM}|{five_with_one_cccd}", "_count": "2"}).json()
    pages = [page]
    while following := [link["url"] for link in page["link"] if link["relation"] == "next"]:
        page = emr.http.get(following[0]).json()
        pages.append(page)

    assert [len(p["entry"]) for p in pages] == [2, 2, 1]
    assert [p.get("total") for p in pages] == [None, None, 5]  # known once the last is read
    ids = [e["resource"]["identifier"][0]["value"] for p in pages for e in p["entry"]]
    assert sorted(ids) == [f"BNC{number}" for number in range(5)]


def test_a_patient_search_gives_its_total_when_all_fits_in_one_page(emr, five_with_one_cccd):
    page = emr.http.get("/fhir/Patient", params={
        "identifier": f"{CCCD_SYSTEM}|{five_with_one_cccd}"}).json()

    assert page["total"] == 5 and len(page["entry"]) == 5
    assert [link["relation"] for link in page["link"]] == ["self"]


def test_a_patient_search_by_mrn_of_the_default_system_still_finds_a_patient_without_issuer(
        emr, five_with_one_cccd):
    page = emr.http.get("/fhir/Patient", params={"identifier": f"{MRN_SYSTEM}|BNC3"}).json()

    assert page["total"] == 1
    assert page["entry"][0]["resource"]["identifier"][0]["value"] == "BNC3"


def patients_found(emr, token: str) -> list[dict]:
    bundle = emr.http.get("/fhir/Patient", params={"identifier": token}).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


@pytest.mark.parametrize(("token", "found"), [
    ("BN520", ["BN520"]),
    (f"{MRN_SYSTEM}|BN520", ["BN520"]),  # the hospital's own namespace holds …/BVDK
    (f"{MRN_SYSTEM}/BVDK|BN520", ["BN520"]),
    ("|BN520", []),  # no system: the MRNs the EMR sent without an issuer
    ("|BN521", ["BN521"]),
    (f"{MRN_SYSTEM}|BN521", ["BN521"]),
    ("https://other.vn/mrn|BN521", []),
    ("urn:oid:9.9.9|BN521", []),
    (f"{MRN_SYSTEM}/BVCR|BN521", []),
])
def test_a_patient_search_by_mrn_finds_it_only_under_the_system_of_its_issuer(emr, token,
                                                                             found):
    # Review: the configured system missed an MRN sent with the hospital's namespace (which
    # ImagingStudy?patient.identifier found), and the systems of other issuers found the MRN
    # sent without one: another hospital's patient taken for ours.
    emr.service.orders.save_patient(PatientInfo(patient_id="BN520", issuer="BVDK"))
    emr.service.orders.save_patient(PatientInfo(patient_id="BN521"))

    resources = patients_found(emr, token)

    assert [r["identifier"][0]["value"] for r in resources] == found


def test_a_patient_merged_away_is_found_by_its_identifier_and_says_where_it_went(emr):
    # Review: after ADT^A40 the prior MRN found nothing, though Patient/{id} still reads it.
    emr.service.orders.save_patient(PatientInfo(patient_id="BN530", name="Kiều^Văn Lẻ"))
    emr.service.merge_patients(PatientMerge(PatientInfo(patient_id="BN531"), "BN530"))

    [prior] = patients_found(emr, f"{MRN_SYSTEM}|BN530")

    [survivor] = patients_found(emr, "BN531")
    assert prior["active"] is False
    assert prior["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"},
                              "type": "replaced-by"}]
    assert prior == emr.http.get(f"/fhir/Patient/{prior['id']}").json()


# ---------------------------------------------------------------------------- Accept


@pytest.mark.parametrize("accept", ["application/fhir+json;q=0, */*",
                                    "*/*, application/fhir+json; q=0.000",
                                    "application/fhir+json;q=0, application/json"])
def test_an_accept_header_refusing_fhir_json_by_name_is_406_and_nothing_is_applied(emr, accept):
    # Fuzzing: a range with q=0 was dropped, and */* then let the request through.
    answer = post(emr, service_request("ACC1"), headers={"Accept": accept})

    assert answer.status_code == 406
    assert issue(answer)["code"] == "not-supported"
    assert not ordered(emr, "ACC1")
    assert emr.http.get("/fhir/metadata", headers={"Accept": accept}).status_code == 406


@pytest.mark.parametrize("accept", ["application/json;q=0, */*",
                                    "*/*;q=0, application/json",
                                    "application/fhir+json;q=0.1, */*;q=0"])
def test_an_accept_header_allowing_one_of_fhir_jsons_names_is_answered(emr, accept):
    answer = emr.http.get("/fhir/metadata", headers={"Accept": accept})

    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["resourceType"] == "CapabilityStatement"


# ---------------------------------------------------------------------------- the base


def transaction(accession: str, patient_id: str, kind: str = "transaction") -> dict:
    """A transaction Bundle of a Patient and a ServiceRequest naming it, as FHIR clients
    POST them to the base."""
    request = service_request(accession, patient_id)
    patient = request.pop("contained")[0]
    url = "urn:uuid:0b5e6a4c-8f7d-4a1b-9c2e-1d3f5a7b9c0d"
    request["subject"] = {"reference": url}
    return {**transaction_bundle(request, patient, url), "type": kind}


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_transaction_posted_to_the_base_is_applied_and_answered_entry_by_entry(emr, kind):
    # The base answered 404: a FHIR client posting its Bundle there could not order.
    accession = f"TX-{kind}"
    body = json.dumps(transaction(accession, f"BN-{kind}", kind)).encode()

    first = emr.http.post("/fhir", content=body, headers=FHIR_JSON)
    again = emr.http.post("/fhir", content=body, headers=FHIR_JSON)

    assert first.status_code == 200, first.text[:300]
    answer = Bundle.model_validate(first.json())
    assert answer.type == f"{kind}-response"
    stored = emr.service.orders.get(accession)
    patient, order = (entry.response for entry in answer.entry)
    assert (order.status, order.location) == ("201 Created", f"ServiceRequest/{stored.pk}")
    assert (patient.status, patient.location) == ("200 OK", f"Patient/{stored.patient_pk}")
    assert again.json()["entry"][1]["response"]["status"] == "200 OK"  # updated, not made


@pytest.mark.parametrize(("body", "status", "where"), [
    (service_request("TX-ALONE"), 400, "Bundle.type"),  # a resource, not a Bundle
    ({**transaction("TX-COLL", "BN-C"), "type": "collection"}, 400, "Bundle.type"),
    ({**transaction("TX-OBS", "BN-O"), "entry": [*transaction("TX-OBS", "BN-O")["entry"], {
        "resource": {"resourceType": "Observation", "status": "final",
                     "code": {"text": "x"}}}]}, 422, "Bundle.entry[2]"),
])
def test_the_base_takes_a_transaction_of_an_order_only_and_says_what_else_it_is(
        emr, body, status, where):
    answer = emr.http.post("/fhir", content=json.dumps(body).encode(), headers=FHIR_JSON)

    assert answer.status_code == status, answer.text[:300]
    assert issue(answer)["expression"] == [where]
    assert not any(ordered(emr, a) for a in ("TX-ALONE", "TX-COLL", "TX-OBS"))
