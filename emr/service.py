"""The EMR side of the server, wired together: orders in (HL7 v2 over MLLP, FHIR, JSON), the
worklist and MPPS, study linking, and results out through the outbox.

Every way in ends in the same few methods (``apply_order``, ``apply_patient``,
``merge_patients``), so HL7, FHIR and the JSON API behave the same.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from urllib.parse import urlsplit

import sqlalchemy as sa

from emr import deadline_http, fhir, hl7_out, hl7v2, mllp
from emr.errors import loggable
from emr.linking import LINKED, StudyLink, StudyLinker, demographics
from emr.model import Order, OrderStatus, PatientMerge, PatientUpdate, StudyResult
from emr.orders import (
    CancelRefused,
    InvalidMerge,
    OrderRefusal,
    OrderStore,
    StoredOrder,
    UnknownPatient,
)
from emr.outbox import DeliveryRefused, Outbox
from emr.performed import COMPLETED, PerformedSteps
from emr.results import study_result
from pacs.dimse.worklist import WorklistHandlers
from pacs.settings import Settings
from storage.archive import Archive
from storage.completion import StudyCompletion
from storage.errors import NotFound
from storage.index import (
    Index,
    deliveries,
    orders,
    patients,
    studies,
    study_links,
    utc_now,
)
from storage.patients import correct_patient, merge_patient, same_patient
from storage.query import NameMatching
from viewer.share_api import public_base

log = logging.getLogger("pacs.emr")

_SEND_TIMEOUT = 15.0  # seconds one attempt to deliver a result may take, all in all
# How far back a linked study that never had a result is owed one at start-up (a stop during
# its quiet period); older ones were there before results were turned on.
UNREPORTED_LOOKBACK = dt.timedelta(days=7)
# HL7 messages split at the same time. A message within the limits of emr.hl7_segments takes up
# to ~90 MB and a second to split; under the GIL more at once are no faster, only bigger (eight
# took 550 MB), and each MLLP connection has a thread of its own.
_HL7_PARSING = 2
# Where HL7 orders and ADT carry the values of emr.model (emr.hl7v2 reads them; the field most
# HIS fill where there are several): ERR-2 of a refusal that names one.
_HL7_FIELDS = {
    "accession_number": "OBR-18", "control": "ORC-1", "placer_order_number": "ORC-2",
    "filler_order_number": "ORC-3", "requested_procedure_id": "OBR-19",
    "scheduled_step_id": "OBR-20", "station_ae_title": "OBR-21", "modality": "OBR-24",
    "scheduled_date": "OBR-36", "scheduled_time": "OBR-36", "procedure_code": "OBR-4",
    "procedure_code_system": "OBR-4", "procedure_description": "OBR-4", "reason": "OBR-31",
    "priority": "OBR-27", "referring_physician": "ORC-12", "performing_physician": "OBR-34",
    "study_instance_uid": "IPC-3", "station_name": "IPC-7",
    "patient.patient_id": "PID-3", "patient.issuer": "PID-3", "patient.cccd": "PID-3",
    "patient.bhyt": "PID-3", "patient.name": "PID-5", "patient.birth_date": "PID-7",
    "patient.sex": "PID-8", "patient.address": "PID-11", "patient.phone": "PID-13",
}


class EmrService:
    """Orders, worklist, links and results for one archive."""

    def __init__(self, archive: Archive, settings: Settings,
                 completion: StudyCompletion | None = None) -> None:
        self.archive = archive
        self.settings = settings
        self.orders = OrderStore(archive.index)
        self.steps = PerformedSteps(archive.index)
        self.linker = StudyLinker(archive, self.orders)
        self.outbox = Outbox(archive.index, {"hl7": self._send_hl7, "fhir": self._send_fhir},
                             retry_seconds=settings.emr_retry_seconds,
                             max_retry_seconds=settings.emr_retry_max_seconds,
                             contents={"hl7": hl7_out.oru_content})
        self.completion = completion
        self.worklist = WorklistHandlers(self.orders, self.steps,
                                         NameMatching(settings.person_name_matching),
                                         on_performed=self._performed)
        self.hl7_server = mllp.MllpServer(
            settings.hl7_host, settings.hl7_port, self.handle_hl7,
            max_connections=settings.hl7_max_connections) if settings.hl7_port else None
        self._hl7_parsing = threading.BoundedSemaphore(_HL7_PARSING)
        if completion is not None:
            completion.subscribe(self.study_complete, owed=self.unreported_studies)

    def start(self) -> None:
        self.orders.normalise_scheduled_times()
        self.linker.start()
        self.outbox.start()
        if self.hl7_server is not None:
            self.hl7_server.start()

    def stop(self) -> None:
        if self.hl7_server is not None:
            self.hl7_server.stop()
        self.outbox.stop()
        self.linker.stop()

    # ------------------------------------------------------------------ orders in

    def apply_order(self, order: Order) -> StoredOrder:
        """Create, update or cancel an order, then link studies that were waiting for it."""
        stored = self.orders.apply(order)
        for link in self.linker.link_waiting(stored):
            study = link.study_instance_uid
            log.info("study %s was waiting for its order", study)
            if self.completion is None or not self.completion.is_pending(study):
                self.report_study(study)  # complete already: its completion found no order
        return stored

    def apply_patient(self, update: PatientUpdate) -> int:
        """Register or update a patient; the index takes the new demographics too."""
        pk = self.orders.save_patient(update.patient)
        correct_patient(self.archive, demographics(update.patient))
        return pk

    def merge_patients(self, merge: PatientMerge) -> int:
        """Merge the prior patient into the surviving one, in orders and in the index; studies
        moved.

        Nothing changes, not even the surviving patient's record, when the merge cannot be
        done as asked: ``UnknownPatient`` when the prior patient is unknown (a mistyped MRN
        must not pass for a merge done), ``InvalidMerge`` when prior and survivor are one
        patient (the same ID, an issuer on one side only: the other issuer's patients with
        that ID would be taken along) or when it would undo an earlier merge."""
        survivor = merge.patient
        if same_patient(merge.prior_patient_id, merge.prior_issuer, survivor.patient_id,
                        survivor.issuer):
            raise InvalidMerge("the prior patient is the surviving patient itself (the same"
                               " ID, and the same issuer or none on one side); nothing was"
                               " merged")
        if not self.knows_patient(merge.prior_patient_id, merge.prior_issuer):
            raise UnknownPatient("the prior patient is neither in the EMR's records nor in the "
                                 "archive; nothing was merged")
        self.orders.merge_patient(merge.prior_patient_id, merge.prior_issuer, merge.patient)
        # A survivor the HIS names that was itself merged away: the images go where its
        # orders went, to the record it became part of.
        survivor = demographics(self.orders.surviving_patient(merge.patient))
        moved = merge_patient(self.archive, merge.prior_patient_id, merge.prior_issuer, survivor)
        correct_patient(self.archive, survivor)
        return moved

    def knows_patient(self, patient_id: str, issuer: str = "") -> bool:
        """Whether the EMR sent this patient or the archive has images of them."""
        if self.orders.knows_patient(patient_id, issuer):
            return True
        condition = patients.c.patient_id == patient_id
        if issuer:
            condition = sa.and_(condition, patients.c.issuer_of_patient_id.in_((issuer, "")))
        with self.archive.index.read() as conn:
            return conn.execute(sa.select(patients.c.pk).where(condition).limit(1)
                                ).first() is not None

    def handle_hl7(self, data: bytes) -> bytes:
        """One HL7 message in, its ACK out. Never raises: every failure is an AE/AR ACK."""
        header = None
        try:
            with self._hl7_parsing:
                header, message = hl7v2.parse_inbound(hl7v2.decode(data))
            if isinstance(message, Order):
                self.apply_order(message)
            elif isinstance(message, PatientMerge):
                self.merge_patients(message)
            else:
                self.apply_patient(message)
            answer = self._ack(header, "AA")
        except hl7v2.Hl7Error as exc:
            header = header or exc.header
            # The reason goes back in the ACK; it may quote a field, so not into the log.
            log.warning("HL7 message %s refused (%s at %s)", header.control_id if header
                        else "?", exc.ack_code, exc.error_location or "?")
            answer = self._ack(header, exc.ack_code, exc.reason, exc.error_location,
                               exc.error_code)
        except UnknownPatient:
            log.warning("HL7 message %s not applied: unknown prior patient (MRG-1)",
                        header.control_id if header else "?")
            answer = self._ack(header, "AE", "MRG-1 prior patient unknown: neither sent by the"
                               " HIS nor in the archive; nothing was merged (không tìm thấy"
                               " bệnh nhân cũ)", "MRG-1", "204")
        except InvalidMerge as exc:
            log.warning("HL7 message %s not applied: merge refused (MRG-1)",
                        header.control_id if header else "?")
            answer = self._ack(header, "AE", f"MRG-1: {exc} (không gộp được bệnh nhân)",
                               "MRG-1", "207")
        except CancelRefused as exc:
            log.warning("HL7 message %s not applied: the order has images, cancel refused",
                        header.control_id if header else "?")
            answer = self._ack(header, "AE", f"{exc} (không hủy được chỉ định đã chụp)",
                               *_hl7_error(exc))
        except (NotFound, OrderRefusal) as exc:
            log.warning("HL7 message %s not applied: %s", header.control_id if header else "?",
                        type(exc).__name__)
            answer = self._ack(header, "AE", str(exc), *_hl7_error(exc))
        except Exception as exc:
            # Database errors quote their parameters (patient names): the type only, above
            # DEBUG.
            log.error("HL7 message %s failed: %s", header.control_id if header else "?",
                      loggable(exc))
            log.debug("HL7 failure", exc_info=True)
            answer = self._ack(header, "AE", "internal error; the message was not applied")
        return answer.encode("utf-8")

    def _ack(self, header: hl7v2.Header | None, code: str, text: str = "", location: str = "",
             error_code: str = "") -> str:
        return hl7_out.ack(header, code, text, error_location=location, error_code=error_code,
                         sending_application=self.settings.hl7_application,
                         sending_facility=self.settings.hl7_facility)

    # ------------------------------------------------------------------ results out

    def base_url(self) -> str:
        return public_base(self.settings)

    def order_of(self, study_uid: str) -> StoredOrder | None:
        link = self.linker.link_of(study_uid)
        if link is None or link.state != LINKED or link.order_pk is None:
            return None
        return self.orders.get_by_pk(link.order_pk)

    def study_complete(self, study_uid: str) -> None:
        """A study is complete: the instances that came after it was linked take the EMR's
        demographics too, then the EMR is told."""
        self.linker.wait_idle(5)  # a study completing is linked before it is reported
        order = self.order_of(study_uid)
        if order is not None:
            correct_patient(self.archive, demographics(order.order.patient),
                            study_uid=study_uid)
        self.report_study(study_uid)

    def report_study(self, study_uid: str) -> list[int]:
        """Owe every destination the result of a (complete) study linked to an order; the
        ids of the deliveries. Studies without an order are reported once they are linked.

        The order is done once its study is (the result says so: ORC-5 CM). A result that
        says what the study's last one said is not sent again (``Outbox.enqueue``)."""
        order = self.order_of(study_uid)
        if order is None:
            return []
        self._order_done(order)
        if not self.settings.emr_results_to:
            return []
        try:
            result = study_result(self.archive, study_uid, base=self.base_url(), order=order)
        except NotFound:
            return []
        ids = [self.outbox.enqueue(destination, *self._result_message(destination, result))
               for destination in self.settings.emr_results_to]
        log.info("study %s: result owed to %d destination(s)", study_uid, len(ids))
        return ids

    def _result_message(self, destination: str, result: StudyResult) -> tuple[str, str, str]:
        """(kind, study UID, payload) of the result for one destination."""
        if destination.startswith("mllp://"):
            return "hl7", result.study_instance_uid, hl7_out.oru_message(
                result, sending_application=self.settings.hl7_application,
                sending_facility=self.settings.hl7_facility)
        resource = fhir.imaging_study(result, resource_id=_fhir_id(result.study_instance_uid),
                                      mrn_system=self.settings.emr_mrn_system,
                                      contain_patient=True)
        return "fhir", result.study_instance_uid, json.dumps(resource, ensure_ascii=False)

    def _order_done(self, order: StoredOrder) -> None:
        """A study of the order is complete: the order is COMPLETED (unless the modality
        said DISCONTINUED, or it is done already)."""
        if order.status in (OrderStatus.SCHEDULED, OrderStatus.IN_PROGRESS):
            self.orders.set_status(order.order.accession_number, OrderStatus.COMPLETED)

    def unreported_studies(self) -> list[str]:
        """Linked studies whose images changed after their last result was written, or that
        have none and changed within ``UNREPORTED_LOOKBACK``: their completion was pending
        when the server stopped. Read at start-up from the database, which keeps what the
        memory of pending completions loses. (Without the look-back, turning results on for
        an archive of a year's linked studies sent all of them at the next start.)"""
        if not self.settings.emr_results_to:
            return []
        reported = (sa.select(sa.func.max(deliveries.c.created_at))
                    .where(deliveries.c.study_instance_uid == studies.c.study_instance_uid)
                    .scalar_subquery())
        since = utc_now() - UNREPORTED_LOOKBACK
        statement = (sa.select(studies.c.study_instance_uid)
                     .join(study_links, study_links.c.study_instance_uid
                           == studies.c.study_instance_uid)
                     .where(study_links.c.state == LINKED,
                            sa.or_(sa.and_(reported.is_(None), studies.c.updated_at >= since),
                                   reported < studies.c.updated_at)))
        with self.archive.index.read() as conn:
            return [uid for (uid,) in conn.execute(statement)]

    def resolve(self, study_uid: str, accession_number: str, *,
                move_to_order_patient: bool = True) -> StudyLink:
        """Staff link an unmatched study to an order; its result goes out at once."""
        link = self.linker.resolve(study_uid, accession_number,
                                   move_to_order_patient=move_to_order_patient)
        self.report_study(study_uid)
        return link

    def _performed(self, order: StoredOrder | None, study_uid: str, step_status: str) -> None:
        self.step_performed(study_uid, step_status)

    def step_performed(self, study_uid: str, step_status: str) -> None:
        """MPPS COMPLETED: the modality says the study is done; report it if images are here.
        (Called here for MPPS in this process, by ``pacs.dimse.workers`` for its workers'.)"""
        if step_status == COMPLETED and study_uid:
            self.linker.link_study(study_uid)
            self.study_complete(study_uid)

    def _send_hl7(self, destination: str, payload: str) -> None:
        """One ORU over MLLP. Delivered only on AA/CA quoting our message in MSA-2 (HL7 v2.5
        2.9, 2.14): an ACK for another message says nothing about this one."""
        address = urlsplit(destination)
        answer = mllp.send(address.hostname or "", address.port or 2575, payload,
                           timeout=_SEND_TIMEOUT)
        ack = hl7v2.read_ack(answer)
        if ack.code in ("AR", "CR"):
            raise DeliveryRefused(f"{ack.code}: {ack.text}")
        if ack.code not in ("AA", "CA"):
            raise RuntimeError(f"{ack.code}: {ack.text}")  # AE: the receiver may manage later
        sent = hl7_out.control_id_of(payload)
        if ack.control_id != sent:
            raise RuntimeError(f"MSA-2: the {ack.code} names message {ack.control_id[:40]!r},"
                               f" not {sent!r}; not counted as delivered")

    def _send_fhir(self, destination: str, payload: str) -> None:
        """One ImagingStudy PUT, the whole exchange within ``_SEND_TIMEOUT``."""
        resource_id = json.loads(payload)["id"]
        url = f"{destination.rstrip('/')}/ImagingStudy/{resource_id}"
        answer = deadline_http.request(
            "PUT", url, payload.encode("utf-8"), timeout=_SEND_TIMEOUT,
            headers={"Content-Type": "application/fhir+json; charset=utf-8",
                     "Accept": "application/fhir+json"})
        if answer.is_success:
            return
        message = f"HTTP {answer.status}: {answer.text[:300]}"
        if 400 <= answer.status < 500 and answer.status not in (408, 429):
            raise DeliveryRefused(message)
        raise RuntimeError(message)


def emr_counts(index: Index) -> dict[str, dict[str, int]]:
    """Orders by status, studies by link state, deliveries by state: for /admin and /metrics."""
    def by(column: sa.Column) -> dict[str, int]:
        statement = sa.select(column, sa.func.count()).group_by(column)
        with index.read() as conn:
            return {str(key): count for key, count in conn.execute(statement)}
    return {"orders": by(orders.c.status), "studies": by(study_links.c.state),
            "deliveries": by(deliveries.c.state)}


def _hl7_error(exc: Exception) -> tuple[str, str]:
    """ERR-2 and ERR-3 of a refusal: where its value travels in the message, and its HL7
    table 0357 code (both empty when the refusal does not say)."""
    if isinstance(exc, OrderRefusal):
        return _HL7_FIELDS.get(exc.field, ""), exc.error_code
    return "", ""


def _fhir_id(study_uid: str) -> str:
    """A FHIR id for a study: its UID (digits and dots, at most 64: a valid id as it is)."""
    return study_uid
