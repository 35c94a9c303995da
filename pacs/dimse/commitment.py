"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality asks (N-ACTION) whether the archive has safely taken a list of instances before it
deletes its local copies. The request is acknowledged at once; the answer follows as an
N-EVENT-REPORT: on a new association when the requester is in ``PACS_PEERS`` (modalities that
list a commitment port usually release at once and wait there), otherwise, or when that fails,
on the requester's own association while it stays open. An answer that could not be given is
tried again after 10 s, 1 min and 5 min (``RETRY_DELAYS``), while there is a way to give it: a
modality deletes nothing it has no answer for, so a lost answer only costs it a new request,
but its operator a worry. An instance counts as committed when its index row exists with the
same SOP class and its blob is present with the recorded size.
"""

from __future__ import annotations

import logging
import threading
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
RETRY_DELAYS = (10.0, 60.0, 300.0)  # seconds before the second, third and fourth attempt


class StorageCommitment:
    """The N-ACTION handler and the deliveries of its results."""

    def __init__(self, archive: Archive, settings: Settings, ae_title: str) -> None:
        self.archive = archive
        self.settings = settings
        self.ae_title = ae_title
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="commitment")
        self._retries: set[threading.Timer] = set()
        self._closed = False
        self.retry_delays = RETRY_DELAYS

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
            transaction, references = _request_of(event.action_information)
        except _MissingAttribute as exc:
            return status_dataset(exc.status, str(exc)), None
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
        self._deliver(assoc, requester, event_type, info, attempt=1)

    def _deliver(self, assoc, requester: str, event_type: int, info: Dataset,
                 attempt: int) -> None:
        """One attempt at giving the answer; the next one scheduled if it failed."""
        if self._closed:
            return
        peer = self.settings.peer(requester)
        if peer is not None and self._deliver_on_new_association(peer, event_type, info):
            return
        if self._deliver_on_open_association(assoc, event_type, info):
            return
        if attempt > len(self.retry_delays) or (peer is None and not assoc.is_established):
            log.warning("storage commitment result %s for %s not delivered (%d attempt(s)): %s",
                        info.TransactionUID, requester, attempt,
                        "its association closed and it is not in PACS_PEERS" if peer is None
                        else f"{peer} cannot be reached and its association closed")
            return
        delay = self.retry_delays[attempt - 1]
        log.info("storage commitment result %s for %s not delivered yet; again in %.0f s",
                 info.TransactionUID, requester, delay)
        self._later(delay, self._deliver, assoc, requester, event_type, info, attempt + 1)

    def _later(self, delay: float, function, *args) -> None:
        timer = threading.Timer(delay, self._run_retry, args=(function, args))
        timer.daemon = True
        self._retries.add(timer)
        timer.start()

    def _run_retry(self, function, args) -> None:
        self._retries.discard(threading.current_thread())  # type: ignore[arg-type]
        if not self._closed:
            self._workers.submit(function, *args)

    @staticmethod
    def _deliver_on_open_association(assoc, event_type: int, info: Dataset) -> bool:
        if not (assoc.is_established and reactor.wait_until_idle(assoc, timeout=10)):
            return False
        try:
            # send_n_event_report pauses this association's reactor first, so the N-ACTION
            # response has already gone out.
            answer, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                                  StorageCommitmentPushModelInstance)
            return "Status" in answer
        except (RuntimeError, ValueError) as exc:
            log.info("commitment report on the open association failed: %s", exc)
            return False

    def _deliver_on_new_association(self, peer, event_type: int, info: Dataset) -> bool:
        ae = AE(self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(peer.host, peer.port,
                             contexts=[build_context(StorageCommitmentPushModel)],
                             ae_title=peer.ae_title,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
        if not assoc.is_established:
            log.info("storage commitment result: %s refused or did not answer the association",
                     peer)
            return False
        try:
            answer, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                                  StorageCommitmentPushModelInstance)
            if "Status" not in answer:
                log.info("storage commitment result to %s got no response", peer)
                return False
            return True
        finally:
            assoc.release()

    def close(self) -> None:
        self._closed = True
        for timer in list(self._retries):
            timer.cancel()
        self._workers.shutdown(wait=False, cancel_futures=True)


class _MissingAttribute(ValueError):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status_code


def _request_of(info: Dataset | None) -> tuple[str, list[tuple[str, str]]]:
    """Transaction UID and (SOP class, SOP instance) references of an N-ACTION's information
    (PS3.4 Table J.3-1: both Type 1); ``_MissingAttribute`` with the status saying what lacks."""
    info = info if info is not None else Dataset()
    for keyword in ("TransactionUID", "ReferencedSOPSequence"):
        if keyword not in info:
            raise _MissingAttribute(status.MISSING_ATTRIBUTE, f"{keyword} is missing")
        if not info.get(keyword):
            raise _MissingAttribute(status.MISSING_ATTRIBUTE_VALUE, f"{keyword} is empty")
    references = []
    for n, item in enumerate(info.ReferencedSOPSequence, start=1):
        sop_class, sop_instance = (str(item.get(k) or "") for k in (
            "ReferencedSOPClassUID", "ReferencedSOPInstanceUID"))
        if not (sop_class and sop_instance):
            raise _MissingAttribute(status.MISSING_ATTRIBUTE_VALUE,
                                    f"ReferencedSOPSequence item {n} lacks its SOP class/instance")
        references.append((sop_class, sop_instance))
    return str(info.TransactionUID), references
