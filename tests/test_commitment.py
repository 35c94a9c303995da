"""Storage Commitment Push Model: the modality learns what is safely archived."""

from __future__ import annotations

import queue
import time
from types import SimpleNamespace

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from pacs.dimse.commitment import StorageCommitment
from pacs.settings import Peer, Settings
from storage.archive import open_archive
from tests import dimse_client as client
from tests.conftest import free_port
from tests.factory import Spec, instance


def _request(transaction: str, references: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def _stored(server, tmp_path, n=2):
    specs = [Spec(patient_id="COMMIT") for _ in range(n)]
    paths = []
    for i, spec in enumerate(specs):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(instance(spec))
        paths.append(path)
    assert all(s.Status == 0 for s in client.store_files(server.dicom_port, paths).values())
    return specs


def test_commitment_result_comes_back_on_the_same_association(start_server, tmp_path):
    server = start_server()
    specs = _stored(server, tmp_path)
    reports: queue.Queue = queue.Queue()

    def on_report(event):
        reports.put((event.event_type, event.event_information))
        return 0x0000, None

    assoc = client.associate(server.dicom_port, [build_context(StorageCommitmentPushModel)],
                             calling="CT01", handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        references = [(s.sop_class, s.sop_uid) for s in specs]
        references.append(("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.424242"))
        references.append(("1.2.840.10008.5.1.4.1.1.4", specs[0].sop_uid))  # wrong class
        status, _ = assoc.send_n_action(_request("1.2.826.0.1.3680043.8.498.77", references), 1,
                                        StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        assert status.Status == 0x0000
        event_type, info = reports.get(timeout=20)
    finally:
        assoc.release()
    assert event_type == 2  # some failed
    assert info.TransactionUID == "1.2.826.0.1.3680043.8.498.77"
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == \
        sorted(s.sop_uid for s in specs)
    failures = {(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence}
    assert failures == {("1.2.826.0.1.3680043.8.498.424242", 0x0112),
                        (specs[0].sop_uid, 0x0119)}


def test_commitment_result_opens_a_new_association_when_the_modality_left(start_server,
                                                                        tmp_path):
    port = free_port()
    reports: queue.Queue = queue.Queue()

    def on_report(event):
        reports.put((event.assoc.requestor.ae_title, event.event_type, event.event_information))
        return 0x0000, None

    modality = AE("MR01")
    modality.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    listener = modality.start_server(("127.0.0.1", port), block=False,
                                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        server = start_server(PACS_PEERS=f"MR01@127.0.0.1:{port}")
        specs = _stored(server, tmp_path, n=3)
        assoc = client.associate(server.dicom_port, [build_context(StorageCommitmentPushModel)],
                                 calling="MR01")
        status, _ = assoc.send_n_action(
            _request("1.2.826.0.1.3680043.8.498.78", [(s.sop_class, s.sop_uid) for s in specs]),
            1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        assoc.release()  # leaves before the result, as many modalities do
        assert status.Status == 0x0000
        calling, event_type, info = reports.get(timeout=20)
        # Let the listener answer the report before it shuts down.
        deadline = time.monotonic() + 10
        while listener.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.shutdown()
    assert calling == "PACS"
    assert event_type == 1  # all committed
    assert len(info.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in info


def test_malformed_commitment_request_is_refused(start_server):
    server = start_server()
    assoc = client.associate(server.dicom_port, [build_context(StorageCommitmentPushModel)])
    try:
        no_references = Dataset()
        no_references.TransactionUID = "1.2.826.0.1.3680043.8.498.79"
        no_transaction = _request("", [("1.2.840.10008.5.1.4.1.1.2", "1.2.3")])
        del no_transaction.TransactionUID
        lacking_item = _request("1.2.826.0.1.3680043.8.498.80", [("", "1.2.3")])
        for request, expected, named in (
                (no_references, 0x0120, "ReferencedSOPSequence is missing"),
                (no_transaction, 0x0120, "TransactionUID is missing"),
                (_request("1.2.826.0.1.3680043.8.498.81", []), 0x0121,
                 "ReferencedSOPSequence is empty"),  # was accepted, reported with no items
                (lacking_item, 0x0121, "item 1")):
            status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                            StorageCommitmentPushModelInstance)
            assert status.Status == expected and named in status.ErrorComment, named
        status, _ = assoc.send_n_action(_request("1.2.3", []), 7, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        assert status.Status == 0x0123
    finally:
        assoc.release()


def test_commitment_result_falls_back_to_the_open_association(start_server, tmp_path):
    """The requester is in PACS_PEERS but nothing listens on its port, while it keeps its own
    association open waiting: the answer comes there (it was lost)."""
    server = start_server(PACS_PEERS=f"CT02@127.0.0.1:{free_port()}")
    specs = _stored(server, tmp_path, n=1)
    reports: queue.Queue = queue.Queue()

    def on_report(event):
        reports.put(event.event_type)
        return 0x0000, None

    assoc = client.associate(server.dicom_port, [build_context(StorageCommitmentPushModel)],
                             calling="CT02", handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        status, _ = assoc.send_n_action(
            _request("1.2.826.0.1.3680043.8.498.82", [(specs[0].sop_class, specs[0].sop_uid)]),
            1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        assert status.Status == 0x0000
        assert reports.get(timeout=30) == 1
    finally:
        assoc.release()


def test_an_undelivered_commitment_result_is_tried_again(tmp_path):
    """The modality left, and its commitment port was down at the first attempt: the answer
    comes once the port is up (attempts after 10 s, 1 min, 5 min; shortened here)."""
    archive = open_archive(f"sqlite:///{tmp_path / 'i.sqlite'}", f"file://{tmp_path / 'b'}")
    spec = Spec()
    archive.store(instance(spec))
    port = free_port()
    commitment = StorageCommitment(archive, Settings(peers=(Peer("US01", "127.0.0.1", port),)),
                                   "PACS")
    commitment.retry_delays = (1.0, 1.0)
    reports: queue.Queue = queue.Queue()
    left = SimpleNamespace(is_established=False)  # the modality's association, closed
    try:
        commitment._answer(left, "US01", "1.2.826.0.1.3680043.8.498.83",
                           [(spec.sop_class, spec.sop_uid)])  # port down: nothing
        modality = AE("US01")
        modality.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        listener = modality.start_server(("127.0.0.1", port), block=False, evt_handlers=[(
            evt.EVT_N_EVENT_REPORT, lambda event: (reports.put(event.event_type), 0)[1])])
        try:
            assert reports.get(timeout=20) == 1
        finally:
            listener.shutdown()
    finally:
        commitment.close()
        archive.close()
