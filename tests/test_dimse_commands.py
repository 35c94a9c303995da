"""DIMSE command sets read and written without pydicom (``pacs.dimse.commands``): what they
produce must be what pynetdicom itself would, and odd messages must still be served."""

from __future__ import annotations

import io
import queue
import socket
import subprocess
import time
from types import SimpleNamespace

import httpx
import pydicom
import pytest
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_FIND_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pacs.dimse import commands
from tests import dimse_client as client
from tests.factory import Spec, instance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_command(primitive, message_class) -> bytes:
    """The first PDV (control header included) pynetdicom sends for ``primitive``."""
    message = message_class()
    message.primitive_to_message(primitive)
    first = next(iter(message.encode_msg(1, 16384)))
    return first.presentation_data_value_list[0][1]


def _read_request(encoded: bytes) -> C_STORE | None:
    fields = commands._command_fields(encoded)
    return None if fields is None else commands._store_request(fields)


def _read_response(encoded: bytes) -> C_STORE | None:
    fields = commands._command_fields(encoded)
    return None if fields is None else commands._store_response(fields)


@pytest.mark.parametrize("originator", [None, ("MODALITY", 7)])
def test_store_request_read_as_pynetdicom_writes_it(originator):
    primitive = C_STORE()
    primitive.MessageID = 4321
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.2.3"  # odd length: padded
    primitive.Priority = 2
    if originator:
        primitive.MoveOriginatorApplicationEntityTitle = originator[0]
        primitive.MoveOriginatorMessageID = originator[1]
    primitive.DataSet = io.BytesIO(b"\x08\x00\x05\x00")
    encoded = _pynetdicom_command(primitive, C_STORE_RQ)
    assert encoded[0] & 0x03 == 0x03  # a whole command in one fragment

    read = _read_request(encoded)
    assert read is not None
    assert read.MessageID == 4321
    assert read.AffectedSOPClassUID == CT
    assert read.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1.2.3"
    assert read.Priority == 2
    if originator:
        assert read.MoveOriginatorApplicationEntityTitle == "MODALITY"
        assert read.MoveOriginatorMessageID == 7
    else:
        assert read.MoveOriginatorApplicationEntityTitle is None
        assert read.MoveOriginatorMessageID is None


def test_own_encoder_and_reader_agree():
    encoded = b"\x03" + commands.store_request(
        sop_class_uid=CT, message_id=9, priority=0, sop_instance_uid="1.2.3.4",
        move_originator_ae="PACS", move_originator_id=3)
    read = _read_request(encoded)
    assert (read.MessageID, read.AffectedSOPClassUID, read.AffectedSOPInstanceUID,
            read.Priority, read.MoveOriginatorApplicationEntityTitle,
            read.MoveOriginatorMessageID) == (9, CT, "1.2.3.4", 0, "PACS", 3)


@pytest.mark.parametrize(("status", "comment"), [(0x0000, None), (0xB007, "Kept the first"),
                                                 (0xA700, None)])
def test_store_response_read_as_pynetdicom_writes_it(status, comment):
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 77
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Status = status
    if comment:
        primitive.ErrorComment = comment
    read = _read_response(_pynetdicom_command(primitive, C_STORE_RSP))
    assert read is not None
    assert (read.MessageIDBeingRespondedTo, read.Status, read.AffectedSOPClassUID,
            read.AffectedSOPInstanceUID, read.ErrorComment) == (77, status, CT, "1.2.3.4.5",
                                                                 comment)
    assert read.is_valid_response


def test_store_response_with_more_than_the_usual_is_left_to_pynetdicom():
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0xB000
    primitive.OffendingElement = [0x00100010]
    assert _read_response(_pynetdicom_command(primitive, C_STORE_RSP)) is None
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 0
    request.DataSet = io.BytesIO(b"")
    assert _read_response(_pynetdicom_command(request, C_STORE_RQ)) is None


def test_other_or_broken_commands_are_left_to_pynetdicom():
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert _read_request(_pynetdicom_command(echo, C_ECHO_RQ)) is None
    whole = b"\x03" + commands.store_request(sop_class_uid=CT, message_id=1, priority=0,
                                            sop_instance_uid="1.2.3")
    assert _read_request(whole[:-3]) is None  # truncated element
    no_uid = b"\x03" + commands.command_set(
        commands.us_element(0x00000100, commands.C_STORE_RQ),
        commands.us_element(0x00000110, 1), commands.us_element(0x00000700, 0),
        commands.us_element(0x00000800, commands.DATA_SET_PRESENT))
    assert _read_request(no_uid) is None


@pytest.mark.parametrize(("primitive_class", "message_class"),
                         [(C_FIND, C_FIND_RSP), (C_ECHO, C_ECHO_RSP)])
@pytest.mark.parametrize("status", [0x0000, 0xFE00, 0xA700])
def test_status_only_response_is_what_pynetdicom_writes(primitive_class, message_class, status):
    primitive = primitive_class()
    primitive.MessageIDBeingRespondedTo = 11
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    primitive.Status = status
    command, data_set = commands._encode_simple(primitive)
    assert data_set is None
    assert b"\x03" + command == _pynetdicom_command(primitive, message_class)


def test_status_response_with_more_than_a_status_is_left_to_pynetdicom():
    final = C_FIND()
    final.MessageIDBeingRespondedTo, final.Status = 1, 0xA900
    final.ErrorComment = "Identifier does not match"
    assert commands._encode_simple(final) is None
    pending = C_FIND()
    pending.MessageIDBeingRespondedTo, pending.Status = 1, 0xFF00
    pending.Identifier = io.BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY ")
    assert commands._encode_simple(pending) is None


class _Recorder:
    """Stands in for the DIMSE provider of an association: keeps what would go to the DUL."""

    def __init__(self, pdu_handlers: list) -> None:
        self.sent: list[P_DATA] = []
        self.assoc = SimpleNamespace(get_handlers=lambda event: pdu_handlers,
                                     dul=SimpleNamespace(send_pdu=self.sent.append, socket=None))


@pytest.mark.parametrize("data_size", [1, 4089, 4090, 10_000])
def test_message_sent_as_one_write_has_the_bytes_pynetdicom_sends(data_size):
    """A whole C-STORE request handed to the DUL as one write: the same P-DATA-TF PDUs, byte
    for byte, as pynetdicom's own encoder cuts for a peer that takes 4 KB PDUs."""
    primitive = C_STORE()
    primitive.MessageID = 3
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    primitive.Priority = 0
    data_set = bytes(range(256)) * (data_size // 256) + bytes(data_size % 256)
    primitive.DataSet = io.BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(5, 4096))

    command = commands.store_request(sop_class_uid=CT, message_id=3, priority=0,
                                     sop_instance_uid="1.2.3.4")
    whole, per_pdu = _Recorder([]), _Recorder(["a PDU handler"])
    for recorder in (whole, per_pdu):
        commands._queue(recorder, 5, command, data_set, 4096 - commands.PDV_OVERHEAD)
    assert len(whole.sent) == 1 and whole.sent[0].encoded == expected
    # With a handler bound to each PDU sent, one P-DATA per PDU, as pynetdicom does.
    assert b"".join(P_DATA_TF(p).encode() for p in per_pdu.sent) == expected


def test_message_written_by_the_sender_unless_an_earlier_one_waits_for_the_dul():
    """Nothing queued for the DUL: the sending thread writes the PDUs itself. Something queued
    (or the association not in a sending state): the message queues behind it."""
    command = commands.store_response(sop_class_uid=CT, message_id=3, status=0,
                                      sop_instance_uid="1.2.3.4")
    ours, peer = socket.socketpair()
    try:
        recorder = _Recorder([])
        dul = recorder.assoc.dul
        dul.socket = SimpleNamespace(socket=ours, event_queue=queue.Queue())
        dul.to_provider_queue = queue.Queue()
        dul.state_machine = SimpleNamespace(current_state="Sta6")
        dul.assoc = recorder.assoc

        commands._queue(recorder, 1, command, None, 16_378)
        expected = commands._PDATA_HEADER.pack(0x04, 0, len(command) + 6, len(command) + 2, 1)
        expected += b"\x03" + command
        assert not recorder.sent
        peer.settimeout(5)
        assert peer.recv(65536) == expected

        dul.to_provider_queue.put("an earlier message")
        commands._queue(recorder, 1, command, None, 16_378)
        assert len(recorder.sent) == 1 and recorder.sent[0].encoded == expected
        dul.to_provider_queue.get()

        dul.state_machine.current_state = "Sta7"  # release requested by us: the DUL decides
        commands._queue(recorder, 1, command, None, 16_378)
        assert len(recorder.sent) == 2
    finally:
        ours.close()
        peer.close()


def test_retrieved_instance_in_many_small_pdus_arrives_unchanged(start_server, tmp_path,
                                                                 dcmtk_env):
    """getscu taking 4 KB PDUs: the stored slice is sent as ~9 PDUs in one write and arrives
    as it was stored."""
    server = start_server(PACS_DICOM_WORKERS="1")
    spec = Spec(rows=128, columns=128)
    stored = tmp_path / "slice.dcm"
    stored.write_bytes(instance(spec))
    assert client.store_files(server.dicom_port, [stored])[stored].Status == 0x0000
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        ["getscu", "--max-pdu", "4096", "-aec", "PACS", "-S", "-od", str(out),
         "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={spec.study_uid}",
         "-k", f"SeriesInstanceUID={spec.series_uid}", "-k", f"SOPInstanceUID={spec.sop_uid}",
         "127.0.0.1", str(server.dicom_port)],
        env=dcmtk_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (received,) = out.iterdir()
    assert pydicom.dcmread(received) == pydicom.dcmread(stored)


def test_data_sets_in_many_small_fragments_are_stored_unchanged(start_server, tmp_path,
                                                                 dcmtk_env):
    """storescu limited to 4 KB PDUs: a 128x128 CT slice arrives in ~9 fragments, the command
    in a PDU of its own; what is stored is exactly what was sent."""
    server = start_server(PACS_DICOM_WORKERS="1")
    spec = Spec(rows=128, columns=128)
    path = tmp_path / "slice.dcm"
    path.write_bytes(instance(spec))
    done = subprocess.run(["storescu", "--max-send-pdu", "4096", "-aec", "PACS", "127.0.0.1",
                           str(server.dicom_port), str(path)], env=dcmtk_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    original = pydicom.dcmread(path)
    status, received = client.c_get(server.dicom_port, client.identifier(
        "IMAGE", StudyInstanceUID=spec.study_uid, SeriesInstanceUID=spec.series_uid,
        SOPInstanceUID=spec.sop_uid), [(CT, "1.2.840.10008.1.2.1")])
    assert status.Status == 0x0000
    assert len(received) == 1 and received[0] == original


def test_command_inside_a_data_set_aborts_only_that_association(start_server):
    """A C-STORE request whose data set is interrupted by another command is not a DIMSE
    message: the association is aborted, nothing is stored, the server goes on serving."""
    server = start_server(PACS_DICOM_WORKERS="1")
    assoc = client.associate(server.dicom_port, [build_context(CT)])
    context_id = assoc.accepted_contexts[0].context_id
    spec = Spec()
    command = commands.store_request(sop_class_uid=CT, message_id=1, priority=0,
                                     sop_instance_uid=spec.sop_uid)
    for control, payload in ((0x03, command), (0x00, b"\x08\x00\x05\x00"), (0x03, command)):
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, bytes([control]) + payload]]
        assoc.dul.send_pdu(pdata)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert client.echo(server.dicom_port) == 0x0000
    found = httpx.get(f"{server.http}/dicomweb/instances?SOPInstanceUID={spec.sop_uid}")
    assert found.status_code == 204 or found.json() == []
