"""The DICOM network services against a running `pacs serve`, with DCMTK tools and pynetdicom."""

from __future__ import annotations

import copy
import socket
import struct
import subprocess
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests import dimse_client as client
from tests.compare import DECOMPRESSED_PIXEL_MODULE, assert_same_data_set
from tests.conftest import free_port
from tests.factory import Spec, dataset, instance, part10


@pytest.fixture
def move_destination(tmp_path, dcmtk_env):
    """DCMTK storescp as a C-MOVE destination (AE STORESCP)."""
    port = free_port()
    folder = tmp_path / "received"
    folder.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(folder), "+B",
                             "--exec-on-reception", "true", str(port)],
                            env=dcmtk_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield port, folder
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def server(start_server, move_destination):
    port, _ = move_destination
    return start_server(PACS_PEERS=f"STORESCP@127.0.0.1:{port}")


def write_instances(folder, specs):
    folder.mkdir(exist_ok=True)
    paths = []
    for n, spec in enumerate(specs):
        path = folder / f"{n:04d}.dcm"
        path.write_bytes(instance(spec))
        paths.append(path)
    return paths


def storescu(server, paths, env, *extra):
    return client.run(["storescu", "-aec", server.ae_title, *extra, "127.0.0.1",
                       str(server.dicom_port), *map(str, paths)], env)


def findscu(server, env, keys, *options, out_dir=None):
    cmd = ["findscu", "-aec", server.ae_title, *options]
    if out_dir is not None:
        cmd += ["-X", "-od", str(out_dir)]
    for key in keys:
        cmd += ["-k", key]
    return client.run([*cmd, "127.0.0.1", str(server.dicom_port)], env)


def test_echoscu(server, dcmtk_env):
    result = client.run(["echoscu", "-aec", "PACS", "127.0.0.1", str(server.dicom_port)],
                        dcmtk_env)
    assert result.returncode == 0, result.stderr
    assert client.echo(server.dicom_port) == 0x0000


def test_healthz_reports_the_dicom_server(server):
    import httpx

    body = httpx.get(server.http + "/healthz").json()
    assert body["status"] == "ok"
    assert body["dicom_port"] == server.dicom_port


def test_storescu_then_findscu_finds_vietnamese_name_without_diacritics(server, dcmtk_env,
                                                                       tmp_path):
    spec = Spec(patient_name="Nguyễn^Văn An", patient_id="CCCD001203004567")
    paths = write_instances(tmp_path / "in", [spec, Spec(patient_name="Trần^Thị Bình",
                                                         patient_id="BN2")])
    result = storescu(server, paths, dcmtk_env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "found"
    out.mkdir()
    result = findscu(server, dcmtk_env, [
        "QueryRetrieveLevel=STUDY", "PatientName=nguyen van an", "PatientID", "StudyInstanceUID",
        "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"],
        "-S", out_dir=out)
    assert result.returncode == 0, result.stderr
    responses = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert len(responses) == 1
    found = responses[0]
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == "Nguyễn^Văn An"
    assert found.PatientID == "CCCD001203004567"
    assert found.StudyInstanceUID == spec.study_uid
    assert found.StudyDescription == "CT bụng có cản quang"
    assert found.ModalitiesInStudy == "CT"
    assert found.NumberOfStudyRelatedInstances == 1


def test_a_query_without_specific_character_set_is_read_as_utf8(server, dcmtk_env, tmp_path):
    # Its values were read as Latin-1: "Nguyễn" became "Nguyá»\x85n" and matched nothing, or
    # the patients whose names had been stored so.
    spec = Spec(patient_name="Lương^Thị Thuỷ", patient_id="BN-UTF8")
    assert storescu(server, write_instances(tmp_path / "in", [spec]), dcmtk_env).returncode == 0
    out = tmp_path / "found"
    out.mkdir()
    result = findscu(server, dcmtk_env, ["QueryRetrieveLevel=STUDY", "PatientName=Lương^Thị*",
                                         "PatientID"], "-S", out_dir=out)  # no SpecificCharacterSet
    assert result.returncode == 0, result.stderr
    assert [pydicom.dcmread(p).PatientID for p in sorted(out.iterdir())] == ["BN-UTF8"]


def test_findscu_finds_a_name_with_an_ideographic_group_by_its_alphabetic_one(server, dcmtk_env,
                                                                            tmp_path):
    spec = Spec(patient_name="Phạm^Thị Hoa=范^氏花", patient_id="BN-PH1")
    paths = write_instances(tmp_path / "in", [spec, Spec(patient_name="Phạm^Thị Hoa Nguyễn",
                                                         patient_id="BN-PH2")])
    assert storescu(server, paths, dcmtk_env).returncode == 0
    out = tmp_path / "found"
    out.mkdir()
    result = findscu(server, dcmtk_env, ["QueryRetrieveLevel=STUDY", "PatientName=pham^thi hoa",
                                         "PatientID", "StudyInstanceUID"], "-S", out_dir=out)
    assert result.returncode == 0, result.stderr
    responses = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert [r.PatientID for r in responses] == ["BN-PH1"]
    assert str(responses[0].PatientName) == "Phạm^Thị Hoa=范^氏花"


def test_c_find_at_every_level_in_both_models(server, tmp_path):
    study = Spec(patient_name="Lê^Thị Hồng", patient_id="P77", study_date="20240520")
    series_specs = [Spec(study_uid=study.study_uid, series_uid=study.series_uid,
                         patient_name=study.patient_name, patient_id="P77",
                         study_date="20240520", instance_number=n) for n in range(1, 4)]
    statuses = client.store_files(server.dicom_port, write_instances(tmp_path, series_specs))
    assert all(s.Status == 0 for s in statuses.values())
    port = server.dicom_port
    patients = client.c_find(port, client.identifier(
        "PATIENT", PatientName="le^thi*", PatientID="", NumberOfPatientRelatedInstances=""),
        patient_root=True)
    assert [(p.PatientID, p.NumberOfPatientRelatedInstances) for p in patients] == [("P77", 3)]
    studies = client.c_find(port, client.identifier(
        "STUDY", StudyDate="20240501-20240531", StudyInstanceUID="", PatientName=""))
    assert [s.StudyInstanceUID for s in studies] == [study.study_uid]
    series = client.c_find(port, client.identifier(
        "SERIES", StudyInstanceUID=study.study_uid, SeriesInstanceUID="", Modality="CT",
        NumberOfSeriesRelatedInstances=""))
    assert [(s.SeriesInstanceUID, s.NumberOfSeriesRelatedInstances) for s in series] == \
        [(study.series_uid, 3)]
    images = client.c_find(port, client.identifier(
        "IMAGE", StudyInstanceUID=study.study_uid, SeriesInstanceUID=study.series_uid,
        SOPInstanceUID="", InstanceNumber="2", Rows="", SOPClassUID=""))
    assert [(i.SOPInstanceUID, i.InstanceNumber, i.Rows) for i in images] == \
        [(series_specs[1].sop_uid, 2, 8)]
    uid_list = client.c_find(port, client.identifier(
        "IMAGE", StudyInstanceUID=study.study_uid, SeriesInstanceUID=study.series_uid,
        SOPInstanceUID=[series_specs[0].sop_uid, series_specs[2].sop_uid]))
    assert sorted(i.SOPInstanceUID for i in uid_list) == sorted(
        [series_specs[0].sop_uid, series_specs[2].sop_uid])


def test_c_find_returns_requested_keys_the_index_does_not_hold(server, tmp_path):
    spec = Spec(patient_id="P88", extra={"InstitutionName": "Bệnh viện Bạch Mai",
                                         "BodyPartExamined": "ABDOMEN"})
    client.store_files(server.dicom_port, write_instances(tmp_path, [spec]))
    found = client.c_find(server.dicom_port, client.identifier(
        "SERIES", StudyInstanceUID=spec.study_uid, SeriesInstanceUID="", InstitutionName="",
        BodyPartExamined="", ImageType="", RetrieveAETitle=""))
    assert len(found) == 1
    assert found[0].InstitutionName == "Bệnh viện Bạch Mai"
    assert found[0].BodyPartExamined == "ABDOMEN"
    assert found[0].RetrieveAETitle == "PACS"
    assert "ImageType" in found[0] and found[0].ImageType in (None, "", [])


def test_bad_c_find_identifiers_get_a_failure_status(server):
    port = server.dicom_port
    with pytest.raises(client.C_FindFailed) as raised:
        client.c_find(port, client.identifier("STUDY", StudyDate="2024-05-01"))
    assert raised.value.status.Status == 0xA900
    assert "StudyDate" in raised.value.status.ErrorComment
    with pytest.raises(client.C_FindFailed) as raised:
        client.c_find(port, client.identifier("WARD"))
    assert raised.value.status.Status == 0xA900
    with pytest.raises(client.C_FindFailed):
        client.c_find(port, client.identifier("PATIENT", PatientID="*"))  # Study Root model
    assert client.echo(port) == 0


def test_keys_the_archive_cannot_match_on_are_answered_pending_ff01(server, tmp_path):
    """PS3.4 C.4.1.1.4: matches go on, with a warning that an optional key given a value was not
    matched on (all answers were 0xFF00, as if the filter had been applied)."""
    spec = Spec(patient_id="FF01")
    client.store_files(server.dicom_port, write_instances(tmp_path, [spec]))

    def pending(**keys):
        assoc = client.associate(server.dicom_port, [build_context(
            StudyRootQueryRetrieveInformationModelFind)])
        try:
            return {s.Status for s, _ in assoc.send_c_find(
                client.identifier("STUDY", PatientID="FF01", **keys),
                StudyRootQueryRetrieveInformationModelFind) if s and s.Status in (
                0xFF00, 0xFF01)}
        finally:
            assoc.release()

    assert pending(PatientName="*", StudyDescription="") == {0xFF00}
    assert pending(OperatorsName="NGUYEN*") == {0xFF01}  # not indexed
    assert pending(SeriesInstanceUID=spec.series_uid) == {0xFF01}  # a lower level's key
    assert pending(NumberOfStudyRelatedInstances="1") == {0xFF01}  # a count


def test_c_move_sends_identical_data_sets_and_unknown_destination_is_a801(
        server, tmp_path, move_destination, dcmtk_env):
    _, received = move_destination
    specs = [Spec(patient_id="MOVE1")]
    specs += [Spec(study_uid=specs[0].study_uid, series_uid=specs[0].series_uid,
                   patient_id="MOVE1", instance_number=n) for n in (2, 3)]
    paths = write_instances(tmp_path / "in", specs)
    assert storescu(server, paths, dcmtk_env).returncode == 0
    result = client.run(["movescu", "-aec", "PACS", "-aem", "STORESCP", "-S",
                         "-k", "QueryRetrieveLevel=STUDY", "-k",
                         f"StudyInstanceUID={specs[0].study_uid}",
                         "127.0.0.1", str(server.dicom_port)], dcmtk_env)
    assert result.returncode == 0, result.stderr
    moved = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in received.iterdir()}
    assert set(moved) == {s.sop_uid for s in specs}
    for spec, path in zip(specs, paths, strict=True):
        assert moved[spec.sop_uid] == pydicom.dcmread(path)  # element by element

    status = client.c_move(server.dicom_port, client.identifier(
        "STUDY", StudyInstanceUID=specs[0].study_uid), "NOWHERE")
    assert status.Status == 0xA801


def test_c_get_returns_stored_instances(server, tmp_path, dcmtk_env):
    spec = Spec(patient_id="GET1")
    paths = write_instances(tmp_path / "in", [spec])
    assert storescu(server, paths, dcmtk_env).returncode == 0
    out = tmp_path / "got"
    out.mkdir()
    result = client.run(["getscu", "-aec", "PACS", "-S", "-od", str(out),
                         "-k", "QueryRetrieveLevel=SERIES",
                         "-k", f"StudyInstanceUID={spec.study_uid}",
                         "-k", f"SeriesInstanceUID={spec.series_uid}",
                         "127.0.0.1", str(server.dicom_port)], dcmtk_env)
    assert result.returncode == 0, result.stderr
    got = list(out.iterdir())
    assert len(got) == 1
    assert pydicom.dcmread(got[0]) == pydicom.dcmread(paths[0])


def test_retrieve_without_any_unique_key_is_refused(server):
    status, received = client.c_get(server.dicom_port, client.identifier("STUDY"),
                                    [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")])
    assert status.Status == 0xA900
    assert received == []


@pytest.mark.parametrize("keys", [{"StudyInstanceUID": "*"}, {"StudyInstanceUID": "1.2*"},
                                  {"PatientID": "*"}, {"PatientID": "?*"}])
def test_a_retrieve_with_a_wildcard_in_a_unique_key_is_refused_and_sends_nothing(
        server, tmp_path, move_destination, keys):
    # PS3.4 C.4.2.2.1: no wildcards in a retrieve's unique keys. Matched as C-FIND keys, "*"
    # moved every instance of the archive.
    _, received = move_destination
    client.store_files(server.dicom_port, write_instances(tmp_path, [Spec(patient_id="WILD1")]))
    status, got = client.c_get(server.dicom_port, client.identifier("STUDY", **keys),
                               [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")])
    assert status.Status == 0xA900 and got == []
    moved = client.c_move(server.dicom_port, client.identifier("STUDY", **keys), "STORESCP")
    assert moved.Status == 0xA900
    assert list(received.iterdir()) == []


@pytest.mark.parametrize(("level", "keys", "reason"), [
    ("PATIENT", {"PatientID": "LEVEL1"}, "not in the Study Root"),  # whole patient sent
    ("IMAGE", {"PatientID": "LEVEL1"}, "SOPInstanceUID is missing"),  # whole patient sent
    ("SERIES", {"StudyInstanceUID": "study"}, "SeriesInstanceUID is missing"),
    ("SERIES", {"SeriesInstanceUID": "series", "SOPInstanceUID": "sop"},
     "SOPInstanceUID is below the SERIES level"),  # whole series sent for one image
])
def test_a_retrieve_must_name_what_its_level_retrieves(
        start_server, tmp_path, level, keys, reason):
    """PS3.4 C.4.2.2.1: the level's unique key says what is retrieved, and the Study Root has
    no PATIENT level. C-MOVE is refused before the destination is contacted: it was answered
    0xA801 (destination unknown) when the destination was down."""
    down = free_port()  # nothing listens there
    server = start_server(tmp_path / "pacs", PACS_PEERS=f"DOWN@127.0.0.1:{down}")
    spec = Spec(patient_id="LEVEL1")
    client.store_files(server.dicom_port, write_instances(tmp_path / "in", [spec]))
    uids = {"study": spec.study_uid, "series": spec.series_uid, "sop": spec.sop_uid}
    keys = {k: uids.get(v, v) for k, v in keys.items()}
    status, got = client.c_get(server.dicom_port, client.identifier(level, **keys),
                               [(CTImageStorage, "1.2.840.10008.1.2.1")])
    assert status.Status == 0xA900 and reason in status.ErrorComment and got == []
    moved = client.c_move(server.dicom_port, client.identifier(level, **keys), "DOWN")
    assert moved.Status == 0xA900 and reason in moved.ErrorComment
    assert not moved.get("NumberOfFailedSuboperations")  # no sub-operation ever was
    # The same patient through the Patient Root model, where PATIENT is a level.
    assoc = client.associate(server.dicom_port, [
        build_context(PatientRootQueryRetrieveInformationModelGet),
        build_context(CTImageStorage, "1.2.840.10008.1.2.1")],
        roles=[build_role(CTImageStorage, scp_role=True)],
        handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        statuses = [s for s, _ in assoc.send_c_get(client.identifier(
            "PATIENT", PatientID="LEVEL1"), PatientRootQueryRetrieveInformationModelGet)
            if s is not None]
    finally:
        assoc.release()
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == 1


def test_c_find_returns_a_requested_sequence_that_the_stored_file_holds(server, tmp_path):
    # The fast encoder took the stored header's sequence for a list of items: 0xC311 and no
    # answer at all for a query asking for OtherPatientIDsSequence.
    other = Dataset()
    other.PatientID = "079203001234"
    other.IssuerOfPatientID = "CCCD"
    spec = Spec(patient_id="SEQ1", extra={"OtherPatientIDsSequence": [other]})
    client.store_files(server.dicom_port, write_instances(tmp_path, [spec]))
    found = client.c_find(server.dicom_port, client.identifier(
        "STUDY", PatientID="SEQ1", StudyInstanceUID="", OtherPatientIDsSequence=[]))
    assert len(found) == 1
    assert found[0].OtherPatientIDsSequence[0].PatientID == "079203001234"


def test_an_instance_number_beyond_64_bits_is_stored(server, tmp_path):
    # The index column overflowed and the store failed with 0xA700 "Internal error".
    spec = Spec(patient_id="BIGNUM")
    ds = dataset(spec)
    ds.add_new(0x00200013, "IS", "99999999999999999999")
    path = tmp_path / "big.dcm"
    path.write_bytes(part10(ds))
    assert client.store_files(server.dicom_port, [path])[path].Status == 0x0000
    found = client.c_find(server.dicom_port, client.identifier(
        "IMAGE", StudyInstanceUID=spec.study_uid, SeriesInstanceUID=spec.series_uid,
        SOPInstanceUID=""))
    assert [f.SOPInstanceUID for f in found] == [spec.sop_uid]


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def test_an_association_request_pynetdicom_cannot_act_on_is_aborted_at_once(server):
    # An even presentation context ID made pynetdicom's state machine raise in the network
    # thread: no answer for 30 s while the request held an association slot, and a few dozen
    # of them locked every modality out.
    context = _item(0x20, bytes([2, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1")
                    + _item(0x40, b"1.2.840.10008.1.2"))
    body = (struct.pack(">HH", 1, 0) + b"PACS".ljust(16) + b"FUZZ".ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context
            + _item(0x50, _item(0x51, struct.pack(">I", 16384))))
    request = struct.pack(">BBI", 1, 0, len(body)) + body
    with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(request)
        answer = sock.recv(64)
        assert answer[:1] == b"\x07", answer  # A-ABORT
        assert time.monotonic() - started < 5
    for _ in range(80):
        with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10) as sock:
            sock.sendall(request)
    assert client.echo(server.dicom_port) == 0


def test_an_instance_of_another_patient_is_refused_from_a_study(server, tmp_path):
    spec = Spec(patient_id="BN-C1", patient_name="Hà^Văn Một")
    first, intruder = tmp_path / "first.dcm", tmp_path / "intruder.dcm"
    first.write_bytes(instance(spec))
    intruder.write_bytes(instance(study_uid=spec.study_uid, series_uid=spec.series_uid,
                                  patient_id="BN-C2", patient_name="Hà^Văn Hai"))
    assert client.store_files(server.dicom_port, [first])[first].Status == 0x0000
    refused = client.store_files(server.dicom_port, [intruder])[intruder]
    assert refused.Status == 0xC001
    assert refused.ErrorComment.startswith("Patient ID differs from the study's patient")
    found = client.c_find(server.dicom_port, client.identifier(
        "STUDY", StudyInstanceUID=spec.study_uid, PatientID="",
        NumberOfStudyRelatedInstances=""))
    assert [(f.PatientID, f.NumberOfStudyRelatedInstances) for f in found] == [("BN-C1", 1)]


def test_duplicate_store_is_a_warning_and_keeps_the_first(server, tmp_path):
    spec = Spec(patient_id="DUP")
    first = tmp_path / "first.dcm"
    first.write_bytes(instance(spec))
    second = tmp_path / "second.dcm"
    second.write_bytes(instance(Spec(**{**spec.__dict__, "study_description": "khác"})))
    statuses = client.store_files(server.dicom_port, [first])
    assert statuses[first].Status == 0x0000
    statuses = client.store_files(server.dicom_port, [second])
    assert statuses[second].Status == 0xB007
    assert "already stored" in statuses[second].ErrorComment.lower()
    found = client.c_find(server.dicom_port, client.identifier(
        "STUDY", PatientID="DUP", StudyDescription="", NumberOfStudyRelatedInstances=""))
    assert [(f.StudyDescription, f.NumberOfStudyRelatedInstances) for f in found] == \
        [("CT bụng có cản quang", 1)]


def _raw_file(tmp_path, name, meta_sop_class, meta_sop_instance, dataset_bytes,
              ts="1.2.840.10008.1.2.1"):
    """A Part 10 file whose data set bytes are sent as they are (chunked C-STORE)."""
    from storage.parsing import part10 as build

    path = tmp_path / name
    path.write_bytes(build(dataset_bytes, meta_sop_class, meta_sop_instance, ts))
    return path


def _encoded(ds: Dataset) -> bytes:
    """The data set alone, Explicit VR Little Endian, as a C-STORE carries it."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def test_malformed_stores_fail_with_a_reason_and_the_server_keeps_working(server, tmp_path):
    good = Spec(patient_id="GOOD")
    client.store_files(server.dicom_port, write_instances(tmp_path / "good", [good]))

    valid = dataset(Spec(patient_id="BAD"))
    complete = _encoded(valid)
    no_uid = copy.deepcopy(valid)
    del no_uid.SOPInstanceUID
    unknown_class = copy.deepcopy(valid)
    unknown_class.SOPClassUID = "1.2.826.0.1.3680043.8.498.999.1"
    # A known class that holds no image: stored with 0x0000 because its name has "Storage".
    commitment = copy.deepcopy(valid)
    commitment.SOPClassUID = "1.2.840.10008.1.20.1"
    cases = {
        "truncated": (_raw_file(tmp_path, "t.dcm", valid.SOPClassUID, valid.SOPInstanceUID,
                                complete[:-40]), 0xC000, "truncated"),
        # Cut inside the Series Instance UID: never stored under a shortened UID.
        "cut in a uid": (_raw_file(tmp_path, "s.dcm", valid.SOPClassUID, valid.SOPInstanceUID,
                                   complete[:complete.index(valid.SeriesInstanceUID.encode())
                                            + 10]), 0xC000, "truncated"),
        "missing uid": (_raw_file(tmp_path, "m.dcm", valid.SOPClassUID, valid.SOPInstanceUID,
                                  _encoded(no_uid)), 0xC000, "missing"),
        "not dicom": (_raw_file(tmp_path, "n.dcm", valid.SOPClassUID, "1.2.3.4",
                                b"\x00" * 7 + b"this is not a data set" * 20), 0xC000, ""),
        "uid mismatch": (_raw_file(tmp_path, "u.dcm", valid.SOPClassUID, "1.2.3.4.5.6",
                                   complete), 0xA900, "differs"),
        "unknown sop class": (_raw_file(tmp_path, "c.dcm", unknown_class.SOPClassUID,
                                        valid.SOPInstanceUID, _encoded(unknown_class)),
                              0x0122, "not supported"),
        "storage commitment class": (_raw_file(tmp_path, "k.dcm", commitment.SOPClassUID,
                                               valid.SOPInstanceUID, _encoded(commitment)),
                                     0x0122, "not supported"),
    }
    for name, (path, expected, reason) in cases.items():
        status = client.store_files(server.dicom_port, [path])[path]
        assert status.Status == expected, name
        assert reason in status.get("ErrorComment", ""), (name, status)
    assert client.echo(server.dicom_port) == 0
    found = client.c_find(server.dicom_port, client.identifier("IMAGE", PatientID="*",
                                                               SOPInstanceUID=""))
    assert [f.SOPInstanceUID for f in found] == [good.sop_uid]


def test_calling_ae_not_in_the_allow_list_is_rejected(start_server, tmp_path, dcmtk_env):
    server = start_server(tmp_path / "restricted", PACS_ALLOWED_CALLING_AES="CT01,MR01")
    ok = client.run(["echoscu", "-aet", "CT01", "-aec", "PACS", "127.0.0.1",
                     str(server.dicom_port)], dcmtk_env)
    assert ok.returncode == 0, ok.stderr
    refused = client.run(["echoscu", "-aet", "INTRUDER", "-aec", "PACS", "127.0.0.1",
                          str(server.dicom_port)], dcmtk_env)
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower()
    with pytest.raises(ConnectionError):
        client.echo(server.dicom_port, calling="INTRUDER")


def test_compressed_instance_is_decompressed_for_a_peer_that_accepts_only_uncompressed(
        server, corpus, move_destination):
    _, received = move_destination
    source = corpus / "github-neurolabusc+dcm_qa_ts" / "In" / "5.dcm"
    original = pydicom.dcmread(source)
    assert original.file_meta.TransferSyntaxUID.is_compressed
    status = client.store_files(server.dicom_port, [source])[source]
    assert status.Status in (0x0000, 0xB007)
    final = client.c_move(server.dicom_port, client.identifier(
        "IMAGE", StudyInstanceUID=original.StudyInstanceUID,
        SeriesInstanceUID=original.SeriesInstanceUID,
        SOPInstanceUID=original.SOPInstanceUID), "STORESCP")
    assert final.Status == 0x0000
    moved = pydicom.dcmread(next(received.iterdir()))
    assert not moved.file_meta.TransferSyntaxUID.is_compressed
    assert (moved.pixel_array == original.pixel_array).all()
    # The same instance, only decompressed (pydicom's decompress made up a new SOP Instance UID).
    assert moved.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert_same_data_set(moved, original, "5.dcm", ignore=DECOMPRESSED_PIXEL_MODULE)


def test_c_get_converts_what_the_requester_cannot_take_to_explicit_little_endian(
        server, corpus):
    """A requester that offers only Explicit VR Little Endian gets a JPEG-compressed and a Big
    Endian instance converted, each the same instance (UIDs, attributes, pixels). Big Endian
    was refused outright ('not compressed'), as a failed sub-operation."""
    folder = corpus / "github-neurolabusc+dcm_qa_ts" / "In"
    originals = {name: pydicom.dcmread(folder / name) for name in ("3.dcm", "5.dcm")}
    assert originals["3.dcm"].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
    assert originals["5.dcm"].file_meta.TransferSyntaxUID.is_compressed
    for name in originals:
        assert client.store_files(server.dicom_port, [folder / name])[folder / name].Status \
            in (0x0000, 0xB007)
    for name, original in originals.items():
        final, received = client.c_get(server.dicom_port, client.identifier(
            "IMAGE", StudyInstanceUID=original.StudyInstanceUID,
            SeriesInstanceUID=original.SeriesInstanceUID,
            SOPInstanceUID=original.SOPInstanceUID),
            [(original.SOPClassUID, pydicom.uid.ExplicitVRLittleEndian)])
        assert final.Status == 0x0000, name
        (got,) = received
        assert got.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian, name
        assert got.SOPInstanceUID == original.SOPInstanceUID, name
        assert_same_data_set(got, original, name, ignore=DECOMPRESSED_PIXEL_MODULE)
        assert np.array_equal(got.pixel_array, original.pixel_array), name


def test_an_idle_association_is_ended_without_an_error_in_the_log(start_server):
    # Modalities leave associations open when they are done: routine, not an error (it was
    # logged at ERROR, which paged whoever watches the errors).
    server = start_server(PACS_DICOM_NETWORK_TIMEOUT="1", PACS_DICOM_WORKERS="1")
    assoc = client.associate(server.dicom_port, [build_context("1.2.840.10008.1.1")])
    assert assoc.is_established
    for _ in range(50):
        if not assoc.is_alive():
            break
        time.sleep(0.1)
    assert assoc.is_aborted
    log = server.log()
    assert "idle for 1 s: aborting" in log
    assert " ERROR " not in log


def test_c_move_sub_operations_name_the_requester_as_move_originator(start_server, tmp_path):
    """PS3.7 9.3.1.1: the destination learns which AE asked for the C-MOVE (and its message)
    from each C-STORE; pynetdicom named our own AE. Both ways out: stored bytes as they are
    (Implicit VR instance) and re-encoded by pynetdicom (Explicit VR, for a destination that
    takes Implicit VR only)."""
    seen = []

    def on_store(event):
        request = event.request
        seen.append((request.MoveOriginatorApplicationEntityTitle,
                     request.MoveOriginatorMessageID, request.AffectedSOPInstanceUID))
        return 0x0000

    destination = AE(ae_title="DEST")
    destination.supported_contexts = [build_context(CTImageStorage, ImplicitVRLittleEndian)]
    port = free_port()
    scp = destination.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        server = start_server(tmp_path / "pacs", PACS_PEERS=f"DEST@127.0.0.1:{port}")
        spec = Spec()
        implicit = dataset(Spec(study_uid=spec.study_uid, series_uid=spec.series_uid,
                                instance_number=2))
        files = write_instances(tmp_path / "in", [spec])
        (tmp_path / "in" / "implicit.dcm").write_bytes(part10(implicit, ImplicitVRLittleEndian))
        files.append(tmp_path / "in" / "implicit.dcm")
        assert all(s.Status == 0 for s in client.store_files(server.dicom_port, files).values())
        assoc = client.associate(server.dicom_port, [build_context(
            StudyRootQueryRetrieveInformationModelMove)], calling="WORKSTATION7")
        try:
            statuses = [s.Status for s, _ in assoc.send_c_move(
                client.identifier("STUDY", StudyInstanceUID=spec.study_uid), "DEST",
                StudyRootQueryRetrieveInformationModelMove, msg_id=42) if s is not None]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000
        assert sorted(seen, key=lambda s: s[2]) == sorted(
            [("WORKSTATION7", 42, spec.sop_uid), ("WORKSTATION7", 42, implicit.SOPInstanceUID)],
            key=lambda s: s[2])
    finally:
        scp.shutdown()
