"""What is negotiated with peers, and what they are told when it fails: the transfer syntax of a
storage context, a C-MOVE destination that cannot be reached, sub-operations that fail.

All against one running `pacs serve`, with pynetdicom as the peer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from tests import dimse_client as client
from tests.conftest import PacsProcess, free_port
from tests.factory import Spec, instance

UNKNOWN_SYNTAX = "1.2.3.4.5.6"
JPEG_XL = "1.2.840.10008.1.2.4.112"  # newer than pydicom's registry; stored as received
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04  # presentation context result, PS3.8 9.3.3.2
UNREACHABLE_AE = "DOWN"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[PacsProcess]:
    """One server; its peer DOWN is configured on a loopback port nothing listens on."""
    root = tmp_path_factory.mktemp("negotiation")
    process = PacsProcess(root / "pacs-data", env={
        "PACS_PEERS": f"{UNREACHABLE_AE}@127.0.0.1:{free_port()}"}).start()
    yield process
    process.stop()


def _store(server: PacsProcess, folder: Path, specs: list[Spec]) -> None:
    folder.mkdir()
    paths = []
    for n, spec in enumerate(specs):
        paths.append(folder / f"{n}.dcm")
        paths[-1].write_bytes(instance(spec))
    assert all(s.Status == 0x0000 for s in client.store_files(server.dicom_port, paths).values())


def _remove_blob(server: PacsProcess, sop_instance_uid: str) -> None:
    """Lose an instance's stored file (its index row stays): its retrieve fails."""
    blobs = [p for p in (server.data_dir / "blobs").rglob("*.dcm")
             if sop_instance_uid.encode() in p.read_bytes()]
    assert len(blobs) == 1
    blobs[0].unlink()


def _log_since(server: PacsProcess, start: int) -> str:
    return server.log()[start:]


def test_a_storage_context_takes_the_first_proposed_syntax_the_archive_can_read(
        server, tmp_path) -> None:
    # pynetdicom accepted the first syntax proposed, known or not: every C-STORE on a context
    # accepted with 1.2.3.4.5.6 then failed (0xC000), though Explicit VR LE was offered too.
    assoc = client.associate(server.dicom_port, [
        build_context(CTImageStorage, [UNKNOWN_SYNTAX, ExplicitVRLittleEndian]),
        build_context(MRImageStorage, [UNKNOWN_SYNTAX, JPEG2000Lossless, ExplicitVRLittleEndian]),
        build_context(SecondaryCaptureImageStorage, [JPEG_XL, ExplicitVRLittleEndian]),
    ])
    try:
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == {CTImageStorage: ExplicitVRLittleEndian,
                            MRImageStorage: JPEG2000Lossless,  # the requestor's order kept
                            SecondaryCaptureImageStorage: JPEG_XL}
        path = tmp_path / "ct.dcm"
        path.write_bytes(instance(Spec(patient_id="NEG1")))
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()


def test_a_storage_context_proposing_no_syntax_the_archive_can_read_is_rejected(server) -> None:
    assoc = client.associate(server.dicom_port, [
        build_context(Verification),
        build_context(CTImageStorage, [UNKNOWN_SYNTAX]),
    ])
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        assert [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts] == [
            (CTImageStorage, TRANSFER_SYNTAXES_NOT_SUPPORTED)]
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_a_configured_move_destination_that_is_down_is_a702_not_a801(server, tmp_path) -> None:
    # 0xA801 says the destination is unknown, and sends the requester to check its AE title;
    # this one is configured but does not answer (PS3.4 C.4.2.1.5).
    spec = Spec(patient_id="NEG-DOWN")
    _store(server, tmp_path / "in", [spec])
    start = len(server.log())
    assoc = client.associate(server.dicom_port, [
        build_context(StudyRootQueryRetrieveInformationModelMove)])
    try:
        responses = [s for s, _ in assoc.send_c_move(
            client.identifier("STUDY", StudyInstanceUID=spec.study_uid), UNREACHABLE_AE,
            StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == 0xA702
    assert final.ErrorComment == f"Move destination {UNREACHABLE_AE} could not be reached"
    assert final.NumberOfFailedSuboperations == 1
    assert final.NumberOfCompletedSuboperations == 0
    assert f"destination {UNREACHABLE_AE} at 127.0.0.1:" in _log_since(server, start)


def test_a_failed_sub_operation_logs_its_reason_once_and_no_pynetdicom_error(
        server, tmp_path) -> None:
    # A sub-operation that failed before sending (here: the stored file is gone) logged
    # "ERROR pynetdicom.service_class: Unable to determine the presentation context ...
    # (0002,0010)", which said nothing of why.
    study = Spec(patient_id="NEG-GET")
    kept = Spec(study_uid=study.study_uid, series_uid=study.series_uid, patient_id="NEG-GET",
                instance_number=2)
    _store(server, tmp_path / "in", [study, kept])
    _remove_blob(server, study.sop_uid)
    start = len(server.log())
    final, received = client.c_get(
        server.dicom_port, client.identifier("STUDY", StudyInstanceUID=study.study_uid),
        [(CTImageStorage, ExplicitVRLittleEndian)])
    # PS3.4 C.4.3.3.1: Warning when some sub-operations failed, listing them.
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert [ds.SOPInstanceUID for ds in received] == [kept.sop_uid]
    log = _log_since(server, start)
    assert not re.search(r"ERROR .*pynetdicom", log), log
    ours = [line for line in log.splitlines() if study.sop_uid in line]
    assert len(ours) == 1 and "WARNING" in ours[0] and "is missing" in ours[0], log


def test_a_retrieve_whose_sub_operations_all_fail_is_a702(server, tmp_path) -> None:
    # PS3.4 C.4.3.3.1 (C-GET) and C.4.2.3.1 (C-MOVE): Failure when all sub-operations failed,
    # Warning (0xB000) in all other cases with a failure or warning.
    spec = Spec(patient_id="NEG-ALL")
    _store(server, tmp_path / "in", [spec])
    _remove_blob(server, spec.sop_uid)
    final, received = client.c_get(
        server.dicom_port, client.identifier("STUDY", StudyInstanceUID=spec.study_uid),
        [(CTImageStorage, ExplicitVRLittleEndian)])
    assert final.Status == 0xA702
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 1)
    assert received == []
