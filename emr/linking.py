"""Study-to-order links, made as studies arrive (the archive's ingest events, not polling).

A new study is linked to its order by AccessionNumber, or by PatientID plus Requested
Procedure ID when the modality sent no accession number. An accession number that matches an
order of another patient is not trusted: that study, like one with no order at all, goes to
the *unmatched* queue, which staff resolve through the API (link to an order, optionally moving
the study to the order's patient) or dismiss. An order that arrives after its images links
them then.

When a study is linked, the index takes the EMR's demographics for its patient (the EMR is the
authority on names and birth dates; see ``storage.patients``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

import sqlalchemy as sa

from emr.model import OrderStatus, PatientInfo
from emr.orders import OrderStore, StoredOrder, UnknownOrder
from storage.archive import Archive, StoreOutcome, StoreResult
from storage.errors import NotFound
from storage.index import iso_seconds, patients, series, studies, study_links
from storage.patients import Demographics, correct_patient, reassign_study

log = logging.getLogger("pacs.emr.linking")

LINKED, UNMATCHED, DISMISSED = "linked", "unmatched", "dismissed"
_RECOVER_HOURS = 24  # at start-up, studies changed this recently are checked for a link


@dataclasses.dataclass(frozen=True)
class StudyLink:
    study_instance_uid: str
    state: str  # linked | unmatched | dismissed
    reason: str  # how it was linked, or why not
    order_pk: int | None = None


def demographics(patient: PatientInfo) -> Demographics:
    return Demographics(patient.patient_id, patient.issuer, patient.name, patient.birth_date,
                        patient.sex)


class StudyLinker:
    """Links arriving studies to orders, on a thread of its own (ingest never waits for it)."""

    def __init__(self, archive: Archive, orders: OrderStore) -> None:
        self.archive = archive
        self.orders = orders
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seen: OrderedDict[str, None] = OrderedDict()  # studies already queued or linked
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listeners: list[Any] = []
        archive.subscribe(self._stored)
        archive.subscribe_deletions(self._deleted)

    def subscribe(self, listener: Any) -> None:
        """Call ``listener(link, order)`` after a study is linked to an order."""
        self._listeners.append(listener)

    def start(self) -> None:
        for uid in self._unlinked_recent_studies():
            self._enqueue(uid)
        self._thread = threading.Thread(target=self._run, name="study-linking", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued study has been handled (for tests and the CLI)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    # ------------------------------------------------------------------ events

    def _stored(self, result: StoreResult) -> None:
        if result.outcome is StoreOutcome.DUPLICATE_KEPT:
            return
        self._enqueue(result.study_instance_uid)

    def _deleted(self, study_uids: list[str]) -> None:
        """A deleted study has no link any more; sent again, it is linked afresh."""
        if not study_uids:
            return
        with self._lock:
            for uid in study_uids:
                self._seen.pop(uid, None)
        with self.archive.index.write_core() as conn:
            conn.execute(study_links.delete().where(
                study_links.c.study_instance_uid.in_(study_uids)))

    def _enqueue(self, study_uid: str) -> None:
        with self._lock:
            if study_uid in self._seen:
                return
            self._seen[study_uid] = None
            if len(self._seen) > 50_000:
                self._seen.popitem(last=False)
        self._queue.put(study_uid)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.link_study(item)
            except Exception:
                log.exception("linking study %s failed", item)
                with self._lock:
                    self._seen.pop(item, None)  # tried again with its next instance
            finally:
                self._queue.task_done()

    def _unlinked_recent_studies(self) -> list[str]:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=_RECOVER_HOURS)
        linked = sa.select(study_links.c.study_instance_uid)
        statement = sa.select(studies.c.study_instance_uid).where(
            studies.c.updated_at >= since, studies.c.study_instance_uid.not_in(linked))
        with self.archive.index.read() as conn:
            return [uid for (uid,) in conn.execute(statement)]

    # ------------------------------------------------------------------ linking

    def link_study(self, study_uid: str) -> StudyLink | None:
        """Link one study if it is not linked yet (None if it is no longer archived)."""
        current = self.link_of(study_uid)
        if current is not None and current.state != UNMATCHED:
            return current
        facts = self._study_facts(study_uid)
        if facts is None:
            return None
        order, reason = self._match(facts)
        if order is None:
            link = StudyLink(study_uid, UNMATCHED, reason)
            self._save(link)
            if current is None:
                log.info("study %s is unmatched: %s", study_uid, reason)
            return link
        return self._link(study_uid, order, reason)

    def link_waiting(self, accession_number: str) -> list[StudyLink]:
        """Link unmatched studies that carry this accession number (its order just came)."""
        statement = (sa.select(studies.c.study_instance_uid)
                     .join(study_links, study_links.c.study_instance_uid
                           == studies.c.study_instance_uid)
                     .where(study_links.c.state == UNMATCHED,
                            studies.c.accession_number == accession_number))
        with self.archive.index.read() as conn:
            waiting = [uid for (uid,) in conn.execute(statement)]
        links = [self.link_study(uid) for uid in waiting]
        return [link for link in links if link is not None and link.state == LINKED]

    def resolve(self, study_uid: str, accession_number: str, *,
                move_to_order_patient: bool = True) -> StudyLink:
        """Staff link a study to an order by hand; the study moves to the order's patient
        (index and metadata) unless told not to."""
        if self._study_facts(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        order = self.orders.get(accession_number)  # UnknownOrder if there is none
        if move_to_order_patient:
            reassign_study(self.archive, study_uid, demographics(order.order.patient))
        return self._link(study_uid, order, "manual", correct=False)

    def dismiss(self, study_uid: str) -> StudyLink:
        """Take a study out of the unmatched queue without an order (e.g. a test scan)."""
        if self._study_facts(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        link = StudyLink(study_uid, DISMISSED, "dismissed by staff")
        self._save(link)
        return link

    def _link(self, study_uid: str, order: StoredOrder, reason: str, *,
              correct: bool = True) -> StudyLink:
        link = StudyLink(study_uid, LINKED, reason, order.pk)
        if correct:
            correct_patient(self.archive, demographics(order.order.patient),
                            study_uid=study_uid)
        self._save(link)
        if order.status is OrderStatus.SCHEDULED:
            self.orders.set_status(order.order.accession_number, OrderStatus.IN_PROGRESS)
        log.info("study %s linked to order %d (%s)", study_uid, order.pk, reason)
        for listener in self._listeners:
            try:
                listener(link, order)
            except Exception:
                log.exception("link listener %r failed", listener)
        return link

    def _match(self, facts: dict[str, Any]) -> tuple[StoredOrder | None, str]:
        if facts["accession_number"]:
            try:
                order = self.orders.get(facts["accession_number"])
            except UnknownOrder:
                return None, "no order has this accession number"
            if not _same_patient(order.order.patient, facts):
                return None, "the order with this accession number is for another patient"
            if order.status is OrderStatus.CANCELLED:
                return None, "the order with this accession number was cancelled"
            return order, "accession number"
        for procedure_id in facts["requested_procedure_ids"]:
            order = self.orders.find_for_procedure(facts["patient_id"], procedure_id)
            if order is not None and order.status is not OrderStatus.CANCELLED:
                return order, "patient and requested procedure"
        return None, "no accession number, and no order of the patient for its procedure"

    def _study_facts(self, study_uid: str) -> dict[str, Any] | None:
        statement = (sa.select(studies.c.pk, studies.c.accession_number, patients.c.patient_id,
                               patients.c.issuer_of_patient_id)
                     .join(patients, studies.c.patient_pk == patients.c.pk)
                     .where(studies.c.study_instance_uid == study_uid))
        with self.archive.index.read() as conn:
            row = conn.execute(statement).first()
            if row is None:
                return None
            procedures = [p for (p,) in conn.execute(
                sa.select(series.c.request_requested_procedure_id).distinct()
                .where(series.c.study_pk == row.pk,
                       series.c.request_requested_procedure_id.is_not(None)))]
        return {"accession_number": (row.accession_number or "").strip(),
                "patient_id": row.patient_id, "issuer": row.issuer_of_patient_id,
                "requested_procedure_ids": [p for p in procedures if p]}

    # ------------------------------------------------------------------ the table

    def _save(self, link: StudyLink) -> None:
        now = dt.datetime.now(dt.UTC)
        values = {"state": link.state, "reason": link.reason, "order_pk": link.order_pk,
                  "updated_at": now}
        with self.archive.index.write_core() as conn:
            updated = conn.execute(study_links.update().where(
                study_links.c.study_instance_uid == link.study_instance_uid)
                .values(**values)).rowcount
            if not updated:
                conn.execute(study_links.insert().values(
                    study_instance_uid=link.study_instance_uid, created_at=now, **values))

    def link_of(self, study_uid: str) -> StudyLink | None:
        with self.archive.index.read() as conn:
            row = conn.execute(sa.select(study_links).where(
                study_links.c.study_instance_uid == study_uid)).first()
        return _link(row) if row else None

    def unmatched(self, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """The unmatched queue, oldest first, with what staff need to resolve each study."""
        statement = (
            sa.select(study_links.c.study_instance_uid, study_links.c.reason,
                      study_links.c.created_at, studies.c.accession_number, studies.c.study_date,
                      studies.c.study_description, studies.c.modalities_in_study,
                      studies.c.num_instances, patients.c.patient_id, patients.c.patient_name,
                      patients.c.patient_birth_date, patients.c.patient_sex)
            .join(studies, studies.c.study_instance_uid == study_links.c.study_instance_uid)
            .join(patients, studies.c.patient_pk == patients.c.pk)
            .where(study_links.c.state == UNMATCHED)
            .order_by(study_links.c.pk).limit(limit).offset(offset))
        with self.archive.index.read() as conn:
            rows = conn.execute(statement).mappings().all()
        return [{**{k: v for k, v in row.items() if k != "created_at"},
                 "queued_at": iso_seconds(row["created_at"])} for row in rows]


def _same_patient(patient: PatientInfo, facts: dict[str, Any]) -> bool:
    if patient.patient_id != facts["patient_id"]:
        return False
    return not (patient.issuer and facts["issuer"] and patient.issuer != facts["issuer"])


def _link(row: Any) -> StudyLink:
    return StudyLink(row.study_instance_uid, row.state, row.reason, row.order_pk)
