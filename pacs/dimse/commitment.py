"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality asks (N-ACTION) whether the archive has safely taken a list of instances before it
deletes its local copies. The request is acknowledged at once; the answer follows as an
N-EVENT-REPORT: on a new association when the requester is in ``PACS_PEERS`` (modalities that
list a commitment port usually release at once and wait there), otherwise on the requester's
own association, which it must keep open. An instance counts as committed when its index row
exists with the same SOP class and its blob is present with the recorded size.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from pacs.dimse import reactor, status
from pacs.dimse.handlers import set_tcp_nodelay, status_dataset
from pacs.settings import Settings
from storage.archive import Archive
from storage.errors import ArchiveError

log = logging.getLogger("pacs.dimse")

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs
NO_SUCH_OBJECT_INSTANCE = 0x0112  # Failure Reasons (PS3.4 J.3.2.1.1)
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110


class StorageCommitment:
    """The N-ACTION handler and the deliveries of its results."""

    def __init__(self, archive: Archive, settings: Settings, ae_title: str) -> None:
        self.archive = archive
        self.settings = settings
        self.ae_title = ae_title
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="commitment")

    def on_n_action(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        request = event.request
        if request.RequestedSOPClassUID != StorageCommitmentPushModel:
            return status_dataset(status.SOP_CLASS_NOT_SUPPORTED, "only Storage Commitment"), None
        if request.RequestedSOPInstanceUID != StorageCommitmentPushModelInstance:
            return status_dataset(0x0117, "use the well-known instance 1.2.840.10008.1.20.1.1"), \
                None
        if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
            return status_dataset(0x0123, f"no such action {request.ActionTypeID}"), None
        try:
            info = event.action_information
            transaction = str(info.TransactionUID)
            references = [(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                          for item in info.ReferencedSOPSequence]
        except (AttributeError, TypeError, ValueError) as exc:
            return status_dataset(PROCESSING_FAILURE,
                                  f"needs TransactionUID and ReferencedSOPSequence: {exc}"), None
        requester = event.assoc.requestor.ae_title
        self._workers.submit(self._answer, event.assoc, requester, transaction, references)
        return status_dataset(status.SUCCESS), None

    def report(self, transaction: str, references: list[tuple[str, str]]) -> tuple[int, Dataset]:
        """The event type and N-EVENT-REPORT information for one commitment request."""
        committed, failed = [], []
        for sop_class, sop_instance in references:
            reason = self._failure_reason(sop_class, sop_instance)
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            if reason is None:
                item.RetrieveAETitle = self.ae_title
                committed.append(item)
            else:
                item.FailureReason = reason
                failed.append(item)
        info = Dataset()
        info.TransactionUID = transaction
        info.RetrieveAETitle = self.ae_title
        if committed:
            info.ReferencedSOPSequence = committed
        if failed:
            info.FailedSOPSequence = failed
        return (SOME_FAILED if failed else ALL_COMMITTED), info

    def _failure_reason(self, sop_class: str, sop_instance: str) -> int | None:
        try:
            location = self.archive.find_location(sop_instance)
            if location is None:
                return NO_SUCH_OBJECT_INSTANCE
            if location.sop_class_uid != sop_class:
                return CLASS_INSTANCE_CONFLICT
            if self.archive.blobs.size(location.blob_key) != location.size:
                return PROCESSING_FAILURE
        except ArchiveError:
            return PROCESSING_FAILURE
        return None

    def _answer(self, assoc, requester: str, transaction: str,
                references: list[tuple[str, str]]) -> None:
        event_type, info = self.report(transaction, references)
        log.info("storage commitment %s for %s: %d instance(s), event type %d", transaction,
                 requester, len(references), event_type)
        if self.settings.peer(requester) is not None:
            self._deliver_on_new_association(requester, event_type, info)
            return
        if assoc.is_established and reactor.wait_until_idle(assoc, timeout=10):
            try:
                # send_n_event_report pauses this association's reactor first, so the
                # N-ACTION response has already gone out.
                answer, _ = assoc.send_n_event_report(
                    info, event_type, StorageCommitmentPushModel,
                    StorageCommitmentPushModelInstance)
                if "Status" in answer:
                    return
            except (RuntimeError, ValueError) as exc:
                log.info("commitment report on the open association failed: %s", exc)
        log.warning("storage commitment result for %s not delivered: its association closed "
                    "and %s is not in PACS_PEERS", requester, requester)

    def _deliver_on_new_association(self, requester: str, event_type: int,
                                    info: Dataset) -> None:
        peer = self.settings.peer(requester)
        ae = AE(self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(peer.host, peer.port,
                             contexts=[build_context(StorageCommitmentPushModel)],
                             ae_title=peer.ae_title,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
        if not assoc.is_established:
            log.warning("storage commitment result not delivered: %s refused the association",
                        peer)
            return
        try:
            answer, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                                  StorageCommitmentPushModelInstance)
            if "Status" not in answer:
                log.warning("storage commitment result to %s got no response", peer)
        finally:
            assoc.release()

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
