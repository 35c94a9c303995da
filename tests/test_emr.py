"""EMR links end to end, against a real server: HL7 orders over MLLP (the ``hl7`` package's
client), the Modality Worklist queried with DCMTK ``findscu -W``, studies sent with
``storescu`` linked to their orders, MPPS from a pynetdicom SCU, results delivered to an HL7
listener and a FHIR server of the test's own (which go down and come back), the unmatched
queue, and the FHIR API."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import hl7
import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.servicerequest import ServiceRequest
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from tests import dimse_client as client
from tests.conftest import PacsProcess, free_port
from tests.emr_peers import ProgrammableFhir, ProgrammableMllp
from tests.factory import TEST_ROOT, Spec, ct_series

CCCD_SYSTEM = "http://fhir.hl7.org.vn/core/sid/cccd"
VN_CORE_IMAGING_STUDY = "http://fhir.hl7.org.vn/core/StructureDefinition/vn-core-imaging-study"
TODAY = dt.date.today().strftime("%Y%m%d")


# ---------------------------------------------------------------------------- helpers


def send_hl7(server: PacsProcess, message: str) -> hl7.Message:
    """One message over MLLP with the ``hl7`` package's client; the parsed ACK."""
    with MLLPClient("127.0.0.1", server.hl7_port) as mllp:
        answer = mllp.send_message(message.replace("\n", "\r"))
    return hl7.parse(answer.strip(b"\x0b\x1c\r").decode("utf-8"))


def ack_code(ack: hl7.Message) -> str:
    return str(ack.segment("MSA")[1])


def orm(accession: str, *, patient_id: str = "BN1001", name: str = "Nguyễn^Văn An",
        control: str = "NW", modality: str = "CT", station: str = "CT01",
        when: str = TODAY + "0900", cccd: str = "079088001234",
        procedure: str = "CT001^CT bụng có cản quang^L") -> str:
    return "\r".join([
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|{TODAY}083000||ORM^O01|MSG{accession}{control}|P|2.3.1"
        "||||||UNICODE UTF-8",
        f"PID|1||{patient_id}^^^BVDK^MR~{cccd}^^^BCA^NI~DN4797912345678^^^BHXH^HC||{name}||"
        "19880512|M|||12 Lê Lợi^^Huế^^^VNM||0905123456",
        "PV1|1|O",
        f"ORC|{control}|P{accession}|{accession}||SC||^^^{when}^^R||{TODAY}083000|||"
        "BS01^Trần^Thị Bình",
        f"OBR|1|P{accession}|{accession}|{procedure}|||||||||Đau bụng|||||{accession}|"
        f"RP{accession}|SPS{accession}|{station}|||{modality}|||^^^{when}^^R",
    ]) + "\r"


def adt(event: str, patient_id: str, name: str, *, prior: str = "") -> str:
    segments = [
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|{TODAY}083000||ADT^{event}|ADT{event}{patient_id}|P|2.5.1"
        "||||||UNICODE UTF-8",
        f"EVN|{event}|{TODAY}083000",
        f"PID|1||{patient_id}^^^BVDK^MR||{name}||19880512|M",
    ]
    if prior:
        segments.append(f"MRG|{prior}^^^BVDK^MR")
    return "\r".join(segments) + "\r"


def storescu(server: PacsProcess, tmp_path: Path, spec: Spec, slices: int, env) -> None:
    folder = tmp_path / f"study-{spec.study_uid[-8:]}"
    folder.mkdir(exist_ok=True)
    paths = []
    for n, data in enumerate(ct_series(spec, slices, size=32)):
        path = folder / f"{n:03d}.dcm"
        path.write_bytes(data)
        paths.append(str(path))
    result = client.run(["storescu", "-aec", server.ae_title, "127.0.0.1",
                         str(server.dicom_port), *paths], env)
    assert result.returncode == 0, result.stderr


def wait_for(condition, timeout: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def findscu_worklist(server: PacsProcess, tmp_path: Path, env, *keys: str) -> list[Dataset]:
    out = tmp_path / f"mwl-{time.monotonic_ns()}"
    out.mkdir()
    args = ["findscu", "-W", "-aec", server.ae_title, "-X", "-od", str(out),
            "-k", "SpecificCharacterSet=ISO_IR 192", "-k", "PatientName", "-k", "PatientID",
            "-k", "AccessionNumber", "-k", "StudyInstanceUID", "-k", "RequestedProcedureID",
            "-k", "ScheduledProcedureStepSequence[0].Modality",
            "-k", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
            "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
            "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"]
    for key in keys:
        args += ["-k", key]
    result = client.run([*args, "127.0.0.1", str(server.dicom_port)], env)
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def mpps_created(accession: str, study_uid: str, patient_id: str) -> Dataset:
    """An MPPS N-CREATE as a modality sends it: every attribute PS3.4 Table F.7.2-1 makes
    Type 1 or 2 in N-CREATE (Type 2 empty where a modality knows nothing)."""
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid
    scheduled.ReferencedStudySequence = []
    scheduled.AccessionNumber = accession
    scheduled.RequestedProcedureID = f"RP{accession}"
    scheduled.RequestedProcedureDescription = ""
    scheduled.ScheduledProcedureStepID = f"SPS{accession}"
    scheduled.ScheduledProcedureStepDescription = ""
    scheduled.ScheduledProtocolCodeSequence = []
    created = Dataset()
    created.SpecificCharacterSet = "ISO_IR 192"
    created.ScheduledStepAttributesSequence = [scheduled]
    created.PatientName = "Nguyễn^Văn An"
    created.PatientID = patient_id
    created.PatientBirthDate = ""
    created.PatientSex = ""
    created.ReferencedPatientSequence = []
    created.PerformedProcedureStepID = f"PPS{accession}"
    created.PerformedStationAETitle = "CT01"
    created.PerformedStationName = ""
    created.PerformedLocation = ""
    created.PerformedProcedureStepStartDate = TODAY
    created.PerformedProcedureStepStartTime = "090000"
    created.PerformedProcedureStepStatus = "IN PROGRESS"
    created.PerformedProcedureStepDescription = ""
    created.PerformedProcedureTypeDescription = ""
    created.ProcedureCodeSequence = []
    created.PerformedProcedureStepEndDate = ""
    created.PerformedProcedureStepEndTime = ""
    created.Modality = "CT"
    created.StudyID = ""
    created.PerformedProtocolCodeSequence = []
    created.PerformedSeriesSequence = []
    return created


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def emr(tmp_path):
    hl7_in, fhir_in = ProgrammableMllp(), ProgrammableFhir()
    server = PacsProcess(tmp_path / "pacs-data", env={
        "PACS_EMR_RESULTS_TO": f"mllp://127.0.0.1:{hl7_in.port},{fhir_in.base}",
        "PACS_STUDY_COMPLETE_SECONDS": "1", "PACS_EMR_RETRY_SECONDS": "0.3",
        "PACS_EMR_RETRY_MAX_SECONDS": "1", "PACS_PUBLIC_URL": "https://pacs.benhvien.vn",
        "PACS_HL7_FACILITY": "BVDK"})
    try:  # whatever fails to start, what did start is stopped (a server was left running)
        server.start()
        hl7_in.start()
        fhir_in.start()
        yield server, hl7_in, fhir_in
    finally:
        server.stop()
        hl7_in.stop()
        fhir_in.stop()


# ---------------------------------------------------------------------------- orders in


def test_hl7_order_is_acknowledged_and_the_worklist_gives_the_vietnamese_name(emr, tmp_path,
                                                                              dcmtk_env):
    server, _, _ = emr
    ack = send_hl7(server, orm("A1001"))
    assert ack_code(ack) == "AA"
    assert str(ack.segment("MSA")[2]) == "MSGA1001NW"

    found = findscu_worklist(server, tmp_path, dcmtk_env, "PatientName=nguyen van an")

    assert len(found) == 1
    item = found[0]
    assert item.SpecificCharacterSet == "ISO_IR 192"
    assert str(item.PatientName) == "Nguyễn^Văn An"
    assert item.PatientID == "BN1001" and item.AccessionNumber == "A1001"
    assert item.RequestedProcedureID == "RPA1001"
    step = item.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT" and step.ScheduledStationAETitle == "CT01"
    assert step.ScheduledProcedureStepStartDate == TODAY
    assert step.ScheduledProcedureStepID == "SPSA1001"
    assert item.StudyInstanceUID  # the modality will use it: the study links by itself


def test_worklist_matches_station_modality_and_date_range(emr, tmp_path, dcmtk_env):
    server, _, _ = emr
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).strftime("%Y%m%d")
    for accession, modality, station, day in (("W1", "CT", "CT01", TODAY),
                                              ("W2", "MR", "MR01", TODAY),
                                              ("W3", "CT", "CT01", tomorrow)):
        assert ack_code(send_hl7(server, orm(accession, modality=modality, station=station,
                                             when=day + "1000"))) == "AA"

    def accessions(*keys: str) -> set[str]:
        return {ds.AccessionNumber for ds in findscu_worklist(server, tmp_path, dcmtk_env,
                                                              *keys)}

    step = "ScheduledProcedureStepSequence[0]."
    assert accessions(step + "Modality=CT") == {"W1", "W3"}
    assert accessions(step + "ScheduledStationAETitle=MR01") == {"W2"}
    assert accessions(step + f"ScheduledProcedureStepStartDate={TODAY}") == {"W1", "W2"}
    assert accessions(step + f"ScheduledProcedureStepStartDate={tomorrow}-") == {"W3"}
    assert accessions("AccessionNumber=W2") == {"W2"}
    assert accessions("PatientName=Nguyễn*") == {"W1", "W2", "W3"}
    assert accessions("PatientName=Nguyên*") == set()  # with accents, accents count


def test_cancelled_order_leaves_the_worklist_and_duplicates_are_idempotent(emr, tmp_path,
                                                                          dcmtk_env):
    server, _, _ = emr
    assert ack_code(send_hl7(server, orm("C1"))) == "AA"
    assert ack_code(send_hl7(server, orm("C1"))) == "AA"  # the HIS sent it twice
    orders = httpx.get(server.http + "/api/orders", params={"patient_id": "BN1001"}).json()
    assert [o["accession_number"] for o in orders] == ["C1"]

    assert ack_code(send_hl7(server, orm("C1", control="CA"))) == "AA"

    assert httpx.get(server.http + "/api/orders/C1").json()["status"] == "CANCELLED"
    assert findscu_worklist(server, tmp_path, dcmtk_env, "AccessionNumber=C1") == []


@pytest.mark.parametrize("message, code, reason", [
    ("PID|1||X1^^^BVDK^MR||Lê^Văn Tám\r", "AR", "MSH"),  # no MSH at all
    ("MSH|^~|HIS|BVDK|PACS|BVDK|20261204||ORM^O01|BAD1|P|2.3.1\r", "AR", ""),  # encoding chars
    ("MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261204||ADT^A03|BAD2|P|2.5.1\rPID|1||X1^^^BVDK^MR\r",
     "AR", "A03"),  # a message type the PACS does not take
    ("MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261204||ORM^O01|BAD3|P|2.3.1\rORC|NW|P1|F1\r"
     "PID|1||X1^^^BVDK^MR||Lê^Văn Tám\rOBR|1|P1|F1|CT1^CT\r", "AR", "PID"),  # wrong order
])
def test_malformed_hl7_gets_a_reasoned_negative_ack_and_the_listener_keeps_going(
        emr, message, code, reason):
    server, _, _ = emr

    ack = send_hl7(server, message)

    assert ack_code(ack) == code
    assert reason in str(ack)
    assert httpx.get(server.http + "/api/orders", params={"patient_id": "X1"}).json() == []
    assert ack_code(send_hl7(server, orm("AFTER1"))) == "AA"  # still listening


def test_order_without_accession_number_is_an_application_error(emr):
    server, _, _ = emr
    message = "\r".join([
        "MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261204||ORM^O01|NOACC|P|2.3.1",
        "PID|1||X2^^^BVDK^MR||Lê^Văn Tám", "ORC|NW|P9", "OBR|1|P9||CT1^CT"]) + "\r"

    ack = send_hl7(server, message)

    assert ack_code(ack) == "AE" and "accession" in str(ack).lower()


# ---------------------------------------------------------------------------- linking, results


def test_study_with_the_orders_accession_is_linked_and_results_reach_the_emr(emr, tmp_path,
                                                                             dcmtk_env):
    server, hl7_in, fhir_in = emr
    assert ack_code(send_hl7(server, orm("L1001"))) == "AA"
    # The modality typed the name without accents; the EMR's name wins once linked.
    spec = Spec(patient_id="BN1001", patient_name="NGUYEN^VAN AN", accession="L1001")

    storescu(server, tmp_path, spec, 1, dcmtk_env)
    link = wait_for(lambda: httpx.get(f"{server.http}/api/emr/studies/{spec.study_uid}")
                    .json().get("state") == "linked" or None, what="the link")
    assert link
    storescu(server, tmp_path, spec, 2, dcmtk_env)  # the rest of the study, after the link
    assert httpx.get(server.http + "/api/orders/L1001").json()["status"] == "IN PROGRESS"
    found = httpx.get(server.http + "/dicomweb/studies",
                      params={"StudyInstanceUID": spec.study_uid}).json()
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn^Văn An"

    oru = wait_for(lambda: hl7_in.messages, what="the ORU")[0]
    # Slices that arrived after the link take the EMR's name too (at completion at the latest).
    metadata = httpx.get(f"{server.http}/dicomweb/studies/{spec.study_uid}/metadata").json()
    assert {m["00100010"]["Value"][0]["Alphabetic"] for m in metadata} == {"Nguyễn^Văn An"}
    parsed = hl7.parse(oru)
    assert str(parsed.segment("MSH")[9]).startswith("ORU^R01")
    assert "L1001" in str(parsed.segment("OBR"))
    assert f"https://pacs.benhvien.vn/studies/{spec.study_uid}" in oru.replace("\\T\\", "&")
    assert "Nguyễn" in str(parsed.segment("PID")[5])

    study = ImagingStudy.model_validate(wait_for(lambda: fhir_in.resources,
                                                 what="the ImagingStudy")[0])
    assert fhir_in.paths[0] == f"/fhir/ImagingStudy/{spec.study_uid}"
    assert VN_CORE_IMAGING_STUDY in study.meta.profile
    values = {i.value for i in study.identifier}
    assert f"urn:oid:{spec.study_uid}" in values and "L1001" in values
    assert study.numberOfInstances == 3
    endpoints = [r for r in study.contained if r.get_resource_type() == "Endpoint"]
    assert {e.connectionType.code for e in endpoints} == {"dicom-wado-rs", "ihe-iid"}
    [patient] = [r for r in study.contained if r.get_resource_type() == "Patient"]
    assert study.subject.reference == f"#{patient.id}"
    assert {i.value for i in patient.identifier} == {"BN1001", "079088001234",
                                                     "DN4797912345678"}
    # The receiver has the message before its answer reaches the outbox: wait for the state.
    wait_for(lambda: {d["state"] for d in httpx.get(
        server.http + "/api/emr/deliveries", params={"study": spec.study_uid}
    ).json()["deliveries"]} == {"delivered"}, what="both deliveries marked delivered")
    metrics = httpx.get(server.http + "/metrics").text
    assert 'pacs_emr_deliveries{state="delivered"} 2.0' in metrics
    assert 'pacs_emr_studies{state="linked"} 1.0' in metrics
    assert "Kết quả đã gửi / Results delivered</th><td>2" in httpx.get(server.http + "/admin").text


def test_results_wait_in_the_outbox_while_the_emr_is_down(emr, tmp_path, dcmtk_env):
    server, hl7_in, fhir_in = emr
    hl7_in.stop()
    fhir_in.stop()
    assert ack_code(send_hl7(server, orm("D1001"))) == "AA"
    spec = Spec(patient_id="BN1001", accession="D1001")
    storescu(server, tmp_path, spec, 2, dcmtk_env)

    def failing() -> list[dict]:
        found = httpx.get(server.http + "/api/emr/deliveries",
                          params={"study": spec.study_uid}).json()["deliveries"]
        return len(found) == 2 and all(d["attempts"] >= 2 and d["state"] == "pending"
                                       for d in found) and found
    pending = wait_for(failing, what="failed attempts")
    assert all(d["last_error"] for d in pending)

    hl7_in.start()
    fhir_in.start()

    wait_for(lambda: hl7_in.messages and fhir_in.resources, what="delivery after the outage")
    wait_for(lambda: {d["state"] for d in httpx.get(
        server.http + "/api/emr/deliveries", params={"study": spec.study_uid}
    ).json()["deliveries"]} == {"delivered"}, what="delivered state")
    assert "D1001" in hl7_in.messages[0]


def test_outbox_survives_a_restart_of_the_pacs(tmp_path, dcmtk_env):
    hl7_port = free_port()
    env = {"PACS_EMR_RESULTS_TO": f"mllp://127.0.0.1:{hl7_port}",
           "PACS_STUDY_COMPLETE_SECONDS": "1", "PACS_EMR_RETRY_SECONDS": "0.3",
           "PACS_EMR_RETRY_MAX_SECONDS": "1"}
    server = PacsProcess(tmp_path / "pacs-data", env=env).start()
    try:
        assert ack_code(send_hl7(server, orm("R1001"))) == "AA"
        spec = Spec(patient_id="BN1001", accession="R1001")
        storescu(server, tmp_path, spec, 2, dcmtk_env)
        wait_for(lambda: httpx.get(server.http + "/api/emr/deliveries").json()["counts"]
                 .get("pending"), what="a pending delivery")
    finally:
        server.stop()
    hl7_in = ProgrammableMllp(hl7_port).start()
    again = PacsProcess(tmp_path / "pacs-data", env=env)
    try:
        again.start()
        wait_for(lambda: hl7_in.messages, what="delivery after the restart")
        assert "R1001" in hl7_in.messages[0]
    finally:
        again.stop()
        hl7_in.stop()


def test_unmatched_study_is_queued_and_staff_link_it_to_the_right_order(emr, tmp_path,
                                                                        dcmtk_env):
    server, hl7_in, _ = emr
    assert ack_code(send_hl7(server, orm("U1001", patient_id="BN2002",
                                         name="Phạm^Thị Hoa"))) == "AA"
    # Emergency scan: temporary ID, no accession number.
    spec = Spec(patient_id="CC-TEMP-7", patient_name="CAP CUU^7", accession="")
    storescu(server, tmp_path, spec, 2, dcmtk_env)

    queued = wait_for(lambda: httpx.get(server.http + "/api/emr/unmatched").json(),
                      what="the unmatched queue")
    assert [q["study_instance_uid"] for q in queued] == [spec.study_uid]
    assert queued[0]["patient_id"] == "CC-TEMP-7"

    bad = httpx.post(f"{server.http}/api/emr/unmatched/{spec.study_uid}/link",
                     json={"accession_number": "NO-SUCH"})
    assert bad.status_code == 404
    linked = httpx.post(f"{server.http}/api/emr/unmatched/{spec.study_uid}/link",
                        json={"accession_number": "U1001"})

    assert linked.status_code == 200 and linked.json()["state"] == "linked"
    assert httpx.get(server.http + "/api/emr/unmatched").json() == []
    found = httpx.get(server.http + "/dicomweb/studies",
                      params={"StudyInstanceUID": spec.study_uid}).json()[0]
    assert found["00100020"]["Value"] == ["BN2002"]
    assert found["00100010"]["Value"][0]["Alphabetic"] == "Phạm^Thị Hoa"
    metadata = httpx.get(f"{server.http}/dicomweb/studies/{spec.study_uid}/metadata").json()
    assert {m["00100020"]["Value"][0] for m in metadata} == {"BN2002"}
    assert httpx.get(server.http + "/dicomweb/studies",
                     params={"PatientID": "CC-TEMP-7"}).status_code == 204
    wait_for(lambda: any("U1001" in m for m in hl7_in.messages), what="the ORU")
    # Dismissing is for the queue: a linked study keeps its order.
    refused = httpx.post(f"{server.http}/api/emr/unmatched/{spec.study_uid}/dismiss")
    assert refused.status_code == 409 and "linked" in refused.json()["message"]
    assert httpx.get(f"{server.http}/api/emr/studies/{spec.study_uid}").json()["state"] \
        == "linked"


def test_a_dismissed_test_scan_leaves_the_queue(emr, tmp_path, dcmtk_env):
    server, _, _ = emr
    spec = Spec(patient_id="QA-PHANTOM", accession="")
    storescu(server, tmp_path, spec, 1, dcmtk_env)
    wait_for(lambda: httpx.get(server.http + "/api/emr/unmatched").json(), what="queued")

    dismissed = httpx.post(f"{server.http}/api/emr/unmatched/{spec.study_uid}/dismiss")

    assert dismissed.status_code == 200 and dismissed.json()["state"] == "dismissed"
    assert httpx.get(server.http + "/api/emr/unmatched").json() == []
    assert httpx.post(f"{server.http}/api/emr/unmatched/1.2.3.4/dismiss").status_code == 404


def test_order_that_arrives_after_its_images_links_them(emr, tmp_path, dcmtk_env):
    server, hl7_in, _ = emr
    spec = Spec(patient_id="BN1001", accession="LATE1")
    storescu(server, tmp_path, spec, 1, dcmtk_env)
    wait_for(lambda: httpx.get(server.http + "/api/emr/unmatched").json(), what="queued")

    assert ack_code(send_hl7(server, orm("LATE1"))) == "AA"

    assert httpx.get(f"{server.http}/api/emr/studies/{spec.study_uid}").json()["state"] \
        == "linked"
    assert httpx.get(server.http + "/api/emr/unmatched").json() == []
    wait_for(lambda: any("LATE1" in m for m in hl7_in.messages), what="the ORU")


def test_adt_update_and_merge_change_the_index(emr, tmp_path, dcmtk_env):
    server, _, _ = emr
    old = Spec(patient_id="BN3003", patient_name="Vo^Van Tam", accession="")
    storescu(server, tmp_path, old, 1, dcmtk_env)
    wait_for(lambda: httpx.get(server.http + "/dicomweb/studies",
                               params={"PatientID": "BN3003"}).status_code == 200, what="stored")

    assert ack_code(send_hl7(server, adt("A08", "BN3003", "Võ^Văn Tám"))) == "AA"
    study = httpx.get(server.http + "/dicomweb/studies", params={"PatientID": "BN3003"}).json()
    assert study[0]["00100010"]["Value"][0]["Alphabetic"] == "Võ^Văn Tám"

    assert ack_code(send_hl7(server, adt("A40", "BN4004", "Võ^Văn Tám", prior="BN3003"))) \
        == "AA"
    assert httpx.get(server.http + "/dicomweb/studies",
                     params={"PatientID": "BN3003"}).status_code == 204
    moved = httpx.get(server.http + "/dicomweb/studies", params={"PatientID": "BN4004"}).json()
    assert [s["0020000D"]["Value"][0] for s in moved] == [old.study_uid]


def test_mpps_moves_the_order_along_and_completion_reports_the_study(emr, tmp_path,
                                                                     dcmtk_env):
    server, hl7_in, _ = emr
    assert ack_code(send_hl7(server, orm("M1001"))) == "AA"
    order = httpx.get(server.http + "/api/orders/M1001").json()
    spec = Spec(patient_id="BN1001", accession="M1001", study_uid=order["study_instance_uid"])
    mpps_uid = generate_uid(TEST_ROOT)
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        created = mpps_created("M1001", spec.study_uid, "BN1001")
        status, _ = assoc.send_n_create(created, ModalityPerformedProcedureStep, mpps_uid)
        assert status.Status == 0x0000
        again, _ = assoc.send_n_create(created, ModalityPerformedProcedureStep, mpps_uid)
        assert again.Status == 0x0111  # duplicate SOP instance
        assert httpx.get(server.http + "/api/orders/M1001").json()["status"] == "IN PROGRESS"

        storescu(server, tmp_path, spec, 2, dcmtk_env)
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate = TODAY  # Type 1 once COMPLETED (PS3.4 Table F.7.2-1)
        done.PerformedProcedureStepEndTime = "093000"
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)
        assert status.Status == 0x0000
        late, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)
        assert late.Status == 0x0110  # a completed step cannot change
        unknown, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep,
                                      generate_uid(TEST_ROOT))
        assert unknown.Status == 0x0112
    finally:
        assoc.release()

    assert httpx.get(server.http + "/api/orders/M1001").json()["status"] == "COMPLETED"
    wait_for(lambda: any("M1001" in m for m in hl7_in.messages), what="the ORU")


# ---------------------------------------------------------------------------- FHIR and JSON


def _service_request(accession: str) -> dict:
    return {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "identifier": [{"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": accession}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2",
                             "display": "CT ngực"}]},
        "category": [{"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                  "code": "CT"}]}],
        "occurrenceDateTime": dt.date.today().isoformat() + "T14:00:00+07:00",
        "subject": {"reference": "#p"},
        "contained": [{"resourceType": "Patient", "id": "p",
                       "identifier": [
                           {"type": {"coding": [{
                               "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                               "code": "MR"}]}, "value": "BN5005"},
                           {"system": CCCD_SYSTEM, "value": "001199000555"}],
                       "name": [{"family": "Đặng", "given": ["Thu Hà"]}],
                       "gender": "female", "birthDate": "1999-03-04"}]}


def test_fhir_service_request_creates_an_order_and_bad_ones_get_an_operation_outcome(emr):
    server, _, _ = emr

    created = httpx.post(server.http + "/fhir/ServiceRequest", json=_service_request("F1"),
                         headers={"Content-Type": "application/fhir+json"})
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    assert location.startswith("https://pacs.benhvien.vn/fhir/ServiceRequest/")  # public URL
    read = httpx.get(server.http + location.removeprefix("https://pacs.benhvien.vn"))
    assert read.status_code == 200
    assert ServiceRequest.model_validate(read.json()).status == "active"
    assert read.json()["subject"]["display"] == "Đặng Thu Hà"
    order = httpx.get(server.http + "/api/orders/F1").json()
    assert order["patient"]["name"] == "Đặng^Thu Hà" and order["patient"]["cccd"] \
        == "001199000555"
    assert order["modality"] == "CT" and order["scheduled_date"] == TODAY

    for body in (b"{not json", json.dumps({"resourceType": "ServiceRequest",
                                           "status": 7}).encode(),
                 json.dumps({"resourceType": "Patient"}).encode()):
        refused = httpx.post(server.http + "/fhir/ServiceRequest", content=body,
                             headers={"Content-Type": "application/fhir+json"})
        assert refused.status_code in (400, 422)
        OperationOutcome.model_validate(refused.json())
    missing = {**_service_request("F2"), "identifier": []}
    refused = httpx.post(server.http + "/fhir/ServiceRequest", json=missing)
    assert refused.status_code == 422
    assert "accession" in refused.json()["issue"][0]["diagnostics"].lower()


def test_fhir_imaging_study_search_by_cccd_uid_and_accession(emr, tmp_path, dcmtk_env):
    server, _, _ = emr
    assert httpx.post(server.http + "/fhir/ServiceRequest",
                      json=_service_request("F3")).status_code == 201
    spec = Spec(patient_id="BN5005", patient_name="Dang^Thu Ha", accession="F3")
    storescu(server, tmp_path, spec, 2, dcmtk_env)
    wait_for(lambda: httpx.get(f"{server.http}/api/emr/studies/{spec.study_uid}")
             .status_code == 200, what="the link")

    searches = [{"patient.identifier": f"{CCCD_SYSTEM}|001199000555"},
                {"identifier": f"urn:dicom:uid|urn:oid:{spec.study_uid}"},
                {"identifier": "F3"},
                {"_lastUpdated": "ge" + dt.date.today().isoformat()}]
    for params in searches:
        response = httpx.get(server.http + "/fhir/ImagingStudy", params=params)
        assert response.status_code == 200, (params, response.text)
        bundle = Bundle.model_validate(response.json())
        assert bundle.type == "searchset" and bundle.total == 1, params
        study = bundle.entry[0].resource
        assert study.id == spec.study_uid and study.subject.display == "Đặng Thu Hà"
    none = httpx.get(server.http + "/fhir/ImagingStudy",
                     params={"patient.identifier": f"{CCCD_SYSTEM}|999"}).json()
    assert none["total"] == 0

    read = httpx.get(f"{server.http}/fhir/ImagingStudy/{spec.study_uid}")
    assert read.status_code == 200
    assert ImagingStudy.model_validate(read.json()).numberOfSeries == 1
    assert httpx.get(server.http + "/fhir/ImagingStudy/1.2.3").status_code == 404
    patients = httpx.get(server.http + "/fhir/Patient",
                         params={"identifier": f"{CCCD_SYSTEM}|001199000555"}).json()
    assert patients["total"] == 1
    assert patients["entry"][0]["resource"]["name"][0]["family"] == "Đặng"
    bad = httpx.get(server.http + "/fhir/ImagingStudy", params={"_lastUpdated": "yesterday"})
    assert bad.status_code == 400
    OperationOutcome.model_validate(bad.json())


def test_json_order_api_validates_its_input(emr):
    server, _, _ = emr
    ok = httpx.post(server.http + "/api/orders", json={
        "accession_number": "J1", "modality": "US", "scheduled_date": "2026-12-05",
        "patient": {"patient_id": "BN6006", "name": "Lý^Thị Mai", "bhyt": "HC4010123456789"}})
    assert ok.status_code == 201, ok.text
    assert ok.json()["scheduled_date"] == "20261205"
    assert ok.json()["patient"]["bhyt"] == "HC4010123456789"

    for body, field in (({"modality": "US", "patient": {"patient_id": "X"}},
                         "accession_number"),
                        ({"accession_number": "J2", "patient": {}}, "patient_id"),
                        ({"accession_number": "J3", "patient": {"patient_id": "X"},
                          "scheduled_date": "05/12/2026"}, "scheduled_date"),
                        ({"accession_number": "J4", "patient": {"patient_id": "X"},
                          "colour": "red"}, "colour")):
        refused = httpx.post(server.http + "/api/orders", json=body)
        assert refused.status_code == 400 and field in refused.json()["message"]
    as_text = httpx.post(server.http + "/api/orders", content=b'{"accession_number": "J5"}',
                         headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 415
    assert httpx.post(server.http + "/api/orders/NOPE/cancel").status_code == 404


def test_emr_routes_are_staff_only(emr):
    server, _, _ = emr
    outsider = {"Authorization": "Bearer 1.abc.9999999999.forged"}
    for method, path in (("GET", "/fhir/ImagingStudy"), ("POST", "/fhir/ServiceRequest"),
                         ("GET", "/api/orders"), ("GET", "/api/emr/unmatched"),
                         ("GET", "/api/emr/deliveries")):
        response = httpx.request(method, server.http + path, headers=outsider)
        assert response.status_code == 401, path

