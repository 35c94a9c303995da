"""FHIR resources to and from the EMR model: pure functions, no server, no network."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from emr.errors import InvalidResource, loggable
from emr.fhir import (
    BHYT_SYSTEM,
    CCCD_SYSTEM,
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    ENDPOINT_CONNECTION_SYSTEM,
    SNOMED_SYSTEM,
    V2_0203_SYSTEM,
    VN_CORE_IMAGING_STUDY_PROFILE,
    VN_CORE_PATIENT_PROFILE,
    FhirError,
    capability_statement,
    endpoint_id,
    endpoint_resources,
    imaging_study,
    mrn_issuer,
    mrn_system,
    operation_outcome,
    patient_resource,
    searchset,
    service_request_resource,
)
from emr.fhir_in import parse_service_request
from emr.model import (
    Order,
    OrderControl,
    OrderStatus,
    PatientInfo,
    ResultInstance,
    ResultSeries,
    StudyResult,
)

MRN_SYSTEM = "https://bv-cho-ray.example/sid/mrn"
CCCD = "079088001234"
BHYT = "DN4797912345678"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"


def patient_json(resource_id: str = "p1") -> dict:
    return {
        "resourceType": "Patient",
        "id": resource_id,
        "identifier": [
            {"type": {"coding": [{"system": V2_0203_SYSTEM, "code": "MR"}]},
             "system": MRN_SYSTEM, "value": "BN0001"},
            {"system": CCCD_SYSTEM, "value": CCCD},
            {"system": BHYT_SYSTEM, "value": BHYT},
        ],
        "name": [{"use": "official", "text": "Nguyễn Văn An", "family": "Nguyễn",
                  "given": ["Văn", "An"]}],
        "gender": "male",
        "birthDate": "1988-03-15",
        "telecom": [{"system": "phone", "value": "0903123456"}],
        "address": [{"line": ["12 Nguyễn Thị Minh Khai"], "district": "Quận 1",
                     "city": "Hồ Chí Minh", "country": "VN"}],
    }


def service_request_json(subject: dict | None = None, **changes) -> dict:
    request = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {"type": {"coding": [{"system": V2_0203_SYSTEM, "code": "ACSN"}]},
             "system": "https://bv-cho-ray.example/sid/accession", "value": "ACC2024050001"},
            {"type": {"coding": [{"system": V2_0203_SYSTEM, "code": "PLAC"}]},
             "system": "https://his.example/sid/order", "value": "HIS-778899"},
        ],
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": DCM_SYSTEM, "code": "CT"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2",
                             "display": "CT Chest"}],
                 "text": "Chụp CT ngực không tiêm thuốc cản quang"},
        "priority": "urgent",
        "subject": subject or {"reference": "#p1"},
        "occurrenceDateTime": "2024-05-02T01:30:00Z",
        "requester": {"display": "Trần Thị Bình"},
        "reasonCode": [{"text": "Ho kéo dài, nghi viêm phổi"}],
        "bodySite": [{"coding": [{"system": SNOMED_SYSTEM, "code": "51185008",
                                  "display": "Chest"}]}],
    }
    request.update(changes)
    return request


def contained_request(**changes) -> dict:
    request = service_request_json(**changes)
    request["contained"] = [patient_json()]
    return request


def transaction_bundle(request: dict, patient: dict, patient_url: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_url, "resource": patient,
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:0b7e2c9e-4d1f-4c59-9e0a-2f7f3f0d9a11", "resource": request,
             "request": {"method": "POST", "url": "ServiceRequest"}},
        ],
    }


def refused(body) -> FhirError:
    with pytest.raises(FhirError) as caught:
        parse_service_request(body, mrn_system=MRN_SYSTEM)
    OperationOutcome.model_validate(caught.value.outcome())
    return caught.value


# ------------------------------------------------------------------ ServiceRequest in


def test_service_request_with_contained_patient_becomes_a_new_scheduled_order():
    order = parse_service_request(contained_request(), mrn_system=MRN_SYSTEM)

    assert isinstance(order, Order)
    assert order.control == OrderControl.NEW
    assert order.status == OrderStatus.SCHEDULED
    assert order.accession_number == "ACC2024050001"
    assert order.placer_order_number == "HIS-778899"
    assert order.modality == "CT"
    assert order.procedure_code == "24627-2"
    assert order.procedure_code_system == "http://loinc.org"
    assert order.procedure_description == "CT Chest"
    assert order.priority == "HIGH"
    assert order.referring_physician == "Trần^Thị Bình"
    assert order.reason == "Ho kéo dài, nghi viêm phổi"
    assert order.body_part == "CHEST"
    assert order.source == "fhir"


@pytest.mark.parametrize(("display", "name"), [
    ("BS. Trần Thị Bình", "Trần^Thị Bình^^BS."),
    ("ThS.BS. Nguyễn Văn An", "Nguyễn^Văn An^^ThS.BS."),
    ("PGS. TS. Lê Hoa", "Lê^Hoa^^PGS. TS."),
    ("Trần Thị Bình", "Trần^Thị Bình"),
    ("BS.", "BS."),  # a title alone is all there is
])
def test_a_doctors_title_before_the_name_is_the_prefix_not_the_family_name(display, name):
    # "BS. Trần Thị Bình" (Dr. ...) became family name "BS." and given "Trần Thị Bình".
    order = parse_service_request(contained_request(requester={"display": display}),
                                  mrn_system=MRN_SYSTEM)

    assert order.referring_physician == name


def test_contained_patient_maps_vietnamese_name_identifiers_and_demographics():
    patient = parse_service_request(contained_request(), mrn_system=MRN_SYSTEM).patient

    assert patient == PatientInfo(
        patient_id="BN0001", issuer="", name="Nguyễn^Văn An", birth_date="19880315", sex="M",
        cccd=CCCD, bhyt=BHYT,
        address="12 Nguyễn Thị Minh Khai, Quận 1, Hồ Chí Minh, VN", phone="0903123456")


def test_scheduled_time_in_utc_is_converted_to_vietnam_local_time():
    order = parse_service_request(contained_request(), mrn_system=MRN_SYSTEM)

    assert (order.scheduled_date, order.scheduled_time) == ("20240502", "083000")


def test_scheduled_period_start_with_local_offset_is_kept_and_date_only_has_no_time():
    period = contained_request(occurrencePeriod={"start": "2024-05-02T23:15:00+07:00"})
    del period["occurrenceDateTime"]
    date_only = contained_request(occurrenceDateTime="2024-05-03")

    assert parse_service_request(period, mrn_system=MRN_SYSTEM).scheduled_time == "231500"
    dated = parse_service_request(date_only, mrn_system=MRN_SYSTEM)
    assert (dated.scheduled_date, dated.scheduled_time) == ("20240503", "")


def test_logical_subject_with_mrn_identifier_and_display_is_enough():
    subject = {"identifier": {"type": {"coding": [{"system": V2_0203_SYSTEM, "code": "MR"}]},
                              "system": "urn:oid:1.2.840.113619.6.1", "value": "BN0002"},
               "display": "Lê Thị Hồng Nhung"}

    patient = parse_service_request(service_request_json(subject),
                                    mrn_system=MRN_SYSTEM).patient

    assert patient.patient_id == "BN0002"
    assert patient.issuer == "1.2.840.113619.6.1"
    assert patient.name == "Lê^Thị Hồng Nhung"


def test_transaction_bundle_resolves_subject_by_full_url():
    patient_url = "urn:uuid:5d1f8a52-3c1e-4e43-a3c6-0c8f0f6b7a10"
    bundle = transaction_bundle(service_request_json({"reference": patient_url}),
                                patient_json(), patient_url)

    order = parse_service_request(bundle, mrn_system=MRN_SYSTEM)

    assert order.patient.patient_id == "BN0001"
    assert order.patient.cccd == CCCD
    assert order.accession_number == "ACC2024050001"


def test_bundle_resolves_relative_patient_reference_against_full_url():
    bundle = transaction_bundle(service_request_json({"reference": "Patient/p1"}),
                                patient_json(), "https://his.example/fhir/Patient/p1")
    bundle["type"] = "collection"

    assert parse_service_request(bundle, mrn_system=MRN_SYSTEM).patient.bhyt == BHYT


def test_mrn_found_by_server_system_with_issuer_suffix():
    patient = patient_json()
    patient["identifier"][0] = {"system": f"{MRN_SYSTEM}/BVCR", "value": "BN0003"}
    request = service_request_json()
    request["contained"] = [patient]

    found = parse_service_request(request, mrn_system=MRN_SYSTEM).patient

    assert (found.patient_id, found.issuer) == ("BN0003", "BVCR")


def test_revoked_request_cancels_the_order():
    order = parse_service_request(contained_request(status="revoked"), mrn_system=MRN_SYSTEM)

    assert order.control == OrderControl.CANCEL
    assert order.status == OrderStatus.CANCELLED


@pytest.mark.parametrize(("status", "control", "order_status"), [
    ("active", OrderControl.NEW, OrderStatus.SCHEDULED),
    ("completed", OrderControl.UPDATE, OrderStatus.COMPLETED),
    ("entered-in-error", OrderControl.CANCEL, OrderStatus.CANCELLED),
])
def test_request_status_maps_to_order_control_and_status(status, control, order_status):
    order = parse_service_request(contained_request(status=status), mrn_system=MRN_SYSTEM)

    assert (order.control, order.status) == (control, order_status)


# Review: a draft or on-hold ServiceRequest (status is a modifier element) was scheduled as
# an active order, the worklist handed it to the modality, and it read back as active.
@pytest.mark.parametrize("status", ["draft", "on-hold", "unknown"])
def test_a_request_that_is_not_active_yet_is_422_naming_the_status(status):
    error = refused(contained_request(status=status))

    assert (error.status, error.code) == (422, "not-supported")
    assert error.expression == "ServiceRequest.status"
    assert repr(status) in error.diagnostics


@pytest.mark.parametrize("intent", ["proposal", "plan", "directive", "option"])
def test_a_request_that_is_not_an_order_is_422_naming_the_intent(intent):
    error = refused(contained_request(intent=intent))

    assert (error.status, error.code) == (422, "not-supported")
    assert error.expression == "ServiceRequest.intent"


@pytest.mark.parametrize("intent", ["order", "original-order", "filler-order"])
def test_a_request_of_any_kind_of_order_is_scheduled(intent):
    order = parse_service_request(contained_request(intent=intent), mrn_system=MRN_SYSTEM)

    assert (order.control, order.status) == (OrderControl.NEW, OrderStatus.SCHEDULED)


def test_station_ae_title_from_contained_device_performer():
    request = contained_request(performer=[{"reference": "#ct1"}])
    request["contained"].append({
        "resourceType": "Device", "id": "ct1",
        "identifier": [{"system": "urn:dicom:ae", "value": "CT_TANG2"}],
        "deviceName": [{"name": "CT 128 lát tầng 2", "type": "user-friendly-name"}],
    })

    order = parse_service_request(request, mrn_system=MRN_SYSTEM)

    assert (order.station_ae_title, order.station_name) == ("CT_TANG2", "CT 128 lát tầng 2")


def test_missing_accession_number_is_422_required():
    request = contained_request()
    request["identifier"] = request["identifier"][1:]

    error = refused(request)

    assert (error.status, error.code) == (422, "required")
    assert error.expression == "ServiceRequest.identifier"


def test_patient_without_mrn_is_422_required():
    request = contained_request()
    request["contained"][0]["identifier"] = [{"system": CCCD_SYSTEM, "value": CCCD}]

    error = refused(request)

    assert (error.status, error.code) == (422, "required")
    assert "MR" in error.diagnostics


def test_unresolvable_subject_reference_is_422_required():
    error = refused(service_request_json({"reference": "Patient/khong-co"}))

    assert (error.status, error.code) == (422, "required")
    assert error.expression == "ServiceRequest.subject"


def test_wrong_element_type_is_400_with_the_element_path():
    request = contained_request(priority=5)

    error = refused(request)

    assert error.status == 400
    assert error.code == "structure"
    assert error.expression == "ServiceRequest.priority"


def test_string_where_an_object_belongs_is_400():
    error = refused(contained_request(subject="Patient/p1"))

    assert error.status == 400
    assert "expected a JSON object" in error.diagnostics
    assert error.expression == "ServiceRequest.subject"


def test_malformed_date_in_contained_patient_is_400_value():
    request = contained_request()
    request["contained"][0]["birthDate"] = "15/03/1988"

    error = refused(request)

    assert (error.status, error.code) == (400, "value")
    assert error.expression == "ServiceRequest.contained[0].birthDate"


def test_unknown_resource_type_is_400():
    error = refused({"resourceType": "ChiDinh", "id": "x"})

    assert (error.status, error.code) == (400, "structure")
    assert "ChiDinh" in error.diagnostics


def test_unknown_resource_type_inside_a_bundle_is_400():
    bundle = transaction_bundle(service_request_json({"reference": "urn:uuid:1"}),
                                {"resourceType": "BenhNhan"}, "urn:uuid:1")

    error = refused(bundle)

    assert error.status == 400
    assert error.expression == "Bundle.entry[0].resource.resourceType"


def test_patient_instead_of_service_request_is_400_not_supported():
    error = refused(patient_json())

    assert (error.status, error.code) == (400, "not-supported")


@pytest.mark.parametrize("body", ["ServiceRequest", [1, 2], None, {"status": "active"}])
def test_body_that_is_not_a_resource_is_400(body):
    assert refused(body).status == 400


def test_unknown_status_code_is_400_value():
    error = refused(contained_request(status="dang-cho"))

    assert (error.status, error.code) == (400, "value")


def test_bundle_without_service_request_is_422():
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": "urn:uuid:1", "resource": patient_json()}]}

    assert refused(bundle).status == 422


# ------------------------------------------------------------------ resources out


def ct_study() -> StudyResult:
    patient = PatientInfo(patient_id="BN0001", name="Nguyễn^Văn An", birth_date="19880315",
                          sex="M", cccd=CCCD, bhyt=BHYT)
    return StudyResult(
        study_instance_uid=STUDY_UID,
        patient=patient,
        accession_number="ACC2024050001",
        study_date="20240502",
        study_time="083512.250",
        description="CT ngực không cản quang",
        modalities=("CT",),
        number_of_series=2,
        number_of_instances=3,
        referring_physician="Trần^Thị Bình",
        viewer_url="https://pacs.example/studies/" + STUDY_UID,
        iid_url="https://pacs.example/iid?studyUID=" + STUDY_UID,
        wado_rs_url="https://pacs.example/dicomweb",
        series=(
            ResultSeries(f"{STUDY_UID}.1", modality="CT", number=1, description="Topogram",
                         body_part="CHEST",
                         instances=(ResultInstance(CT_IMAGE, f"{STUDY_UID}.1.1", 1),)),
            ResultSeries(f"{STUDY_UID}.2", modality="CT", number=2, description="Phổi 1mm",
                         body_part="Ngực",
                         instances=(ResultInstance(CT_IMAGE, f"{STUDY_UID}.2.1", 1),
                                    ResultInstance(CT_IMAGE, f"{STUDY_UID}.2.2", 2))),
        ),
    )


def test_imaging_study_round_trips_through_the_r4b_model_with_vn_core_profile():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM,
                          last_updated="2024-05-02T09:00:00+07:00")

    parsed = ImagingStudy.model_validate(copy.deepcopy(study))

    assert parsed.model_dump(mode="json", exclude_none=True) == study
    assert study["meta"]["profile"] == [VN_CORE_IMAGING_STUDY_PROFILE]
    assert study["meta"]["lastUpdated"] == "2024-05-02T09:00:00+07:00"
    assert study["status"] == "available"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 3)


def test_imaging_study_has_study_uid_and_accession_identifiers():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM)

    uid, accession = study["identifier"]
    assert (uid["system"], uid["value"]) == (DICOM_UID_SYSTEM, f"urn:oid:{STUDY_UID}")
    assert uid["use"] == "official"
    assert accession["type"]["coding"][0] == {"system": V2_0203_SYSTEM, "code": "ACSN",
                                              "display": "Accession ID"}
    assert accession["value"] == "ACC2024050001"


def test_imaging_study_subject_and_based_on_are_logical_references():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM)

    assert study["subject"]["display"] == "Nguyễn Văn An"
    assert study["subject"]["identifier"]["value"] == "BN0001"
    assert study["subject"]["identifier"]["system"] == MRN_SYSTEM
    assert study["basedOn"][0]["identifier"]["value"] == "ACC2024050001"
    assert study["started"] == "2024-05-02T08:35:12+07:00"


def test_imaging_study_contains_wado_rs_and_iid_endpoints():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM)

    kinds = {e["id"]: e for e in study["contained"]}
    assert study["endpoint"] == [{"reference": "#wado"}, {"reference": "#iid"}]
    assert kinds["wado"]["connectionType"] == {"system": ENDPOINT_CONNECTION_SYSTEM,
                                               "code": "dicom-wado-rs"}
    assert kinds["wado"]["address"] == "https://pacs.example/dicomweb"
    assert kinds["wado"]["payloadMimeType"] == ["application/dicom"]
    assert kinds["iid"]["connectionType"]["code"] == "ihe-iid"
    assert kinds["iid"]["address"].startswith("https://pacs.example/iid")


def test_separate_endpoints_are_referenced_by_their_ids():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM,
                          endpoints="separate")
    endpoints = endpoint_resources(ct_study(), resource_id="is-1")

    assert "contained" not in study
    assert study["endpoint"] == [{"reference": f"Endpoint/{e['id']}"} for e in endpoints]
    assert len(endpoint_id(STUDY_UID + ".1234567890123456789012345678901234", "wado")) <= 64


def test_imaging_study_modalities_and_series_body_sites():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM)

    assert study["modality"] == [{"system": DCM_SYSTEM, "code": "CT"}]
    first, second = study["series"]
    assert first["modality"] == {"system": DCM_SYSTEM, "code": "CT"}
    assert first["bodySite"] == {"system": SNOMED_SYSTEM, "code": "51185008",
                                 "display": "Chest"}
    assert second["bodySite"] == {"display": "Ngực"}
    assert second["numberOfInstances"] == 2
    assert second["instance"][1] == {"uid": f"{STUDY_UID}.2.2", "number": 2,
                                     "sopClass": {"system": "urn:ietf:rfc:3986",
                                                  "code": f"urn:oid:{CT_IMAGE}"}}


def test_imaging_study_without_time_or_accession_stays_valid():
    bare = StudyResult(study_instance_uid=STUDY_UID,
                       patient=PatientInfo(patient_id="BN0009"), study_date="20240502")

    study = imaging_study(bare, resource_id="is-2", mrn_system=MRN_SYSTEM)

    assert study["started"] == "2024-05-02"
    assert "basedOn" not in study
    assert len(study["identifier"]) == 1


# Fuzzing: a study whose ReferringPhysicianName is '^^^^' made referrer.display "", which
# fhir.resources refuses: GET /fhir/ImagingStudy/{uid} and every search holding it were 500.
@pytest.mark.parametrize("blank", ["", "^^^^", " ^ ", "=^^"])
def test_imaging_study_leaves_out_elements_that_would_be_empty(blank):
    study = dataclasses.replace(
        ct_study(), referring_physician=blank, description="  ",
        patient=PatientInfo(patient_id="BN0001", name=blank),
        series=(ResultSeries(f"{STUDY_UID}.1", modality=" CT ", number=-1, description=" ",
                             body_part=" ",
                             instances=(ResultInstance(CT_IMAGE, f"{STUDY_UID}.1.1", 2**40),)),))

    resource = imaging_study(study, resource_id="is-1", mrn_system=MRN_SYSTEM)

    ImagingStudy.model_validate(copy.deepcopy(resource))
    assert "referrer" not in resource and "description" not in resource
    assert "display" not in resource["subject"]
    series = resource["series"][0]
    assert series["modality"]["code"] == "CT"
    assert "number" not in series and "description" not in series
    assert "number" not in series["instance"][0]


def test_stored_values_fhir_cannot_carry_are_left_out_of_service_request_and_patient():
    patient = PatientInfo(patient_id="BN0002", name="^^", birth_date="19880230",
                          address=" ")
    order = Order(accession_number="ACC1", patient=patient, scheduled_date="20201345",
                  scheduled_time="2599", modality="C  T", procedure_code=" CT001 ",
                  procedure_description=" ")

    request = service_request_resource(order, "7", mrn_system=MRN_SYSTEM)
    person = patient_resource(patient, "8", mrn_system=MRN_SYSTEM)

    assert "occurrenceDateTime" not in request
    assert request["category"][0]["coding"][0]["code"] == "C T"
    assert request["code"] == {"coding": [{"code": "CT001"}]}
    assert "birthDate" not in person and "name" not in person and "address" not in person
    good_day = Order(accession_number="ACC1", patient=patient, scheduled_date="20261205",
                     scheduled_time="2599")
    assert service_request_resource(good_day, "7", mrn_system=MRN_SYSTEM)[
        "occurrenceDateTime"] == "2026-12-05"


def test_a_resource_that_cannot_be_built_names_the_element_but_never_the_value():
    study = dataclasses.replace(ct_study(), patient=PatientInfo(
        patient_id="BN0003", name="Quách^Thị Diễm"))

    with pytest.raises(InvalidResource) as refused:
        imaging_study(study, resource_id="Quách Thị Diễm", mrn_system=MRN_SYSTEM)

    assert "id" in str(refused.value)
    assert "Quách" not in str(refused.value) and "Quách" not in loggable(refused.value)
    assert refused.value.__suppress_context__  # pydantic's text is not in the traceback
    try:
        Patient.model_validate({"resourceType": "Patient", "birthDate": "Quách"})
    except Exception as exc:  # pydantic's own error: its text quotes the value
        assert "Quách" in str(exc) and "Quách" not in loggable(exc)
        assert "birthDate" in loggable(exc)


def test_patient_resource_uses_vn_core_identifiers_and_name_parts():
    patient = PatientInfo(patient_id="BN0001", issuer="BVCR", name="Nguyễn^Văn An",
                          birth_date="19880315", sex="F", cccd=CCCD, bhyt=BHYT)

    resource = patient_resource(patient, "p1", mrn_system=MRN_SYSTEM)

    Patient.model_validate(resource)
    assert resource["meta"]["profile"] == [VN_CORE_PATIENT_PROFILE]
    systems = {i["system"]: i["value"] for i in resource["identifier"]}
    assert systems == {f"{MRN_SYSTEM}/BVCR": "BN0001", CCCD_SYSTEM: CCCD, BHYT_SYSTEM: BHYT}
    assert resource["name"][0] == {"use": "official", "text": "Nguyễn Văn An",
                                   "family": "Nguyễn", "given": ["Văn", "An"]}
    assert (resource["gender"], resource["birthDate"]) == ("female", "1988-03-15")


def test_patient_resource_parses_back_to_the_same_patient():
    patient = PatientInfo(patient_id="BN0001", issuer="BVCR", name="Nguyễn^Văn An",
                          birth_date="19880315", sex="M", cccd=CCCD, bhyt=BHYT,
                          address="12 Nguyễn Thị Minh Khai, Quận 1", phone="0903123456")
    request = service_request_json({"reference": "#p1"})
    request["contained"] = [patient_resource(patient, "p1", mrn_system=MRN_SYSTEM)]

    assert parse_service_request(request, mrn_system=MRN_SYSTEM).patient == patient


def test_searchset_bundle_validates_with_full_urls_and_match_mode():
    study = imaging_study(ct_study(), resource_id="is-1", mrn_system=MRN_SYSTEM)
    patient = patient_resource(ct_study().patient, "p1", mrn_system=MRN_SYSTEM)

    bundle = searchset([study, patient], self_url="https://pacs.example/fhir/ImagingStudy?x=1",
                       base_url="https://pacs.example/fhir/", total=2)

    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset"
    assert bundle["total"] == 2
    assert [e["fullUrl"] for e in bundle["entry"]] == [
        "https://pacs.example/fhir/ImagingStudy/is-1", "https://pacs.example/fhir/Patient/p1"]
    assert all(e["search"] == {"mode": "match"} for e in bundle["entry"])


def test_operation_outcome_and_capability_statement_validate():
    outcome = operation_outcome("error", "required", "Thiếu số accession",
                                "ServiceRequest.identifier")
    capability = capability_statement("https://pacs.example/fhir",
                                      date="2024-05-02T09:00:00+07:00")

    OperationOutcome.model_validate(outcome)
    CapabilityStatement.model_validate(capability)
    assert outcome["issue"][0]["expression"] == ["ServiceRequest.identifier"]
    assert capability["fhirVersion"] == "4.0.1"


@pytest.mark.parametrize(("issuer", "system"), [
    ("", MRN_SYSTEM),
    ("BVCR", f"{MRN_SYSTEM}/BVCR"),
    ("Bệnh viện A", f"{MRN_SYSTEM}/B%E1%BB%87nh%20vi%E1%BB%87n%20A"),
    ("1.2.840.113619.6.1", "urn:oid:1.2.840.113619.6.1"),
    ("https://his.example/sid/pid", "https://his.example/sid/pid"),
])
def test_mrn_system_is_built_from_the_issuer_and_reverses(issuer, system):
    assert mrn_system(issuer, MRN_SYSTEM) == system
    assert mrn_issuer(system, MRN_SYSTEM) == issuer
