"""Study-to-order links, made as studies arrive (the archive's ingest events, not polling).

A new study is linked to its order by AccessionNumber, or by PatientID plus Requested
Procedure ID when the modality sent no accession number. The PatientID of the images may be
one the EMR has since merged into the order's patient (ADT^A40): it is that patient, and the
study moves to them when linked. An accession number that matches an order of another
patient is not trusted: that study, like one with no order at all, goes to the *unmatched*
queue, which staff resolve through the API (link to an order, optionally moving the study to
the order's patient) or dismiss. An order that arrives after its images links them then, by
either rule.

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

from emr.errors import loggable
from emr.model import OrderStatus, PatientInfo
from emr.orders import OrderConflict, OrderStore, StoredOrder
from storage.archive import Archive, StoreOutcome, StoreResult
from storage.errors import NotFound
from storage.index import iso_seconds, patients, series, studies, study_links
from storage.patients import Demographics, correct_patient, reassign_study

log = logging.getLogger("pacs.emr.linking")

LINKED, UNMATCHED, DISMISSED = "linked", "unmatched", "dismissed"
_RECOVER_HOURS = 24  # at start-up, studies changed this recently are checked for a link
_BATCH = 200  # studies linked together at most (one IN list, under SQLite's 999 parameters)
_BATCH_WAIT = 0.5  # seconds a new study waits for others to link with it


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
        # Held while a study is matched and its link written, and while an order that has
        # just come looks for the studies waiting for it: otherwise a study matched against
        # the orders of a moment before could be queued as unmatched just after the order
        # looked, and wait for staff though its order is there (images and orders of a busy
        # modality arrive together).
        self._linking = threading.RLock()
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
        """Link queued studies in batches: under a burst of new studies (a modality sending a
        day's work) a few transactions serve many studies."""
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            if batch[0] is not None:
                time.sleep(_BATCH_WAIT)  # let a burst gather
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            uids = [uid for uid in batch if uid is not None]
            stopping = len(uids) < len(batch)
            try:
                if uids:
                    self.link_studies(uids)
            except Exception as exc:
                # The text may quote values (patient names): the kind only, above DEBUG.
                log.error("linking %d study(ies) failed: %s", len(uids), loggable(exc))
                log.debug("linking failure", exc_info=True)
                with self._lock:
                    for uid in uids:
                        self._seen.pop(uid, None)  # tried again with their next instance
            finally:
                for _ in batch:
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
        return self.link_studies([study_uid]).get(study_uid)

    def link_studies(self, study_uids: list[str]) -> dict[str, StudyLink]:
        """Link the studies that are not linked yet; the link of each study still archived."""
        with self._linking:
            return self._link_studies(study_uids)

    def _link_studies(self, study_uids: list[str]) -> dict[str, StudyLink]:
        current = self._links_of(study_uids)
        result = {uid: link for uid, link in current.items() if link.state != UNMATCHED}
        facts = self._facts_of([uid for uid in study_uids if uid not in result])
        queued = self._match_all(facts, result)
        self._save(*(link for link in queued if current.get(link.study_instance_uid) != link))
        for link in queued:
            if link.study_instance_uid not in current:
                log.info("study %s is unmatched: %s", link.study_instance_uid, link.reason)
        # Another node's order may have come between the read of the orders and the write
        # of the queue, and looked for waiting studies before they were written (in this
        # process, ``_linking`` keeps the two apart): look once more, now they are queued.
        new = {link.study_instance_uid for link in queued if link.study_instance_uid
               not in current}
        if new:
            self._match_all({uid: facts[uid] for uid in new}, result)
        return result

    def _match_all(self, facts: dict[str, dict[str, Any]], result: dict[str, StudyLink]
                   ) -> list[StudyLink]:
        """Link each study in ``facts`` that has its order; the unmatched ones' links (not
        written). ``result`` gets the link of each."""
        ordered = self.orders.by_accessions(
            {f["accession_number"] for f in facts.values() if f["accession_number"]})
        unmatched = []
        for uid, study in facts.items():
            order, reason = self._match(study, ordered)
            if order is not None:
                merged = not _same_patient(order.order.patient, study)
                result[uid] = self._link(uid, order, reason, move=merged)
            else:
                unmatched.append(StudyLink(uid, UNMATCHED, reason))
                result[uid] = unmatched[-1]
        return unmatched

    def link_waiting(self, order: StoredOrder) -> list[StudyLink]:
        """Link the unmatched studies this order (just come) is for: those carrying its
        accession number, and those without one carrying its Requested Procedure ID (whose
        patient ``_match`` then checks)."""
        waiting_for = studies.c.accession_number == order.order.accession_number
        procedure = order.order.requested_procedure_id
        if procedure:
            with_procedure = sa.select(series.c.study_pk).where(
                series.c.request_requested_procedure_id == procedure)
            waiting_for = sa.or_(waiting_for, sa.and_(
                sa.func.coalesce(studies.c.accession_number, "") == "",
                studies.c.pk.in_(with_procedure)))
        statement = (sa.select(studies.c.study_instance_uid)
                     .join(study_links, study_links.c.study_instance_uid
                           == studies.c.study_instance_uid)
                     .where(study_links.c.state == UNMATCHED, waiting_for))
        with self._linking:
            with self.archive.index.read() as conn:
                waiting = [uid for (uid,) in conn.execute(statement)]
            links = [self.link_study(uid) for uid in waiting]
        return [link for link in links if link is not None and link.state == LINKED]

    def resolve(self, study_uid: str, accession_number: str, *,
                move_to_order_patient: bool = True) -> StudyLink:
        """Staff link a study to an order by hand; the study moves to the order's patient
        (index and metadata) unless told not to. Refused (``OrderConflict``) before anything
        is written: see ``_check_linkable``."""
        if self._study_facts(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        with self._linking:  # no study is linked by its own between the checks and the link
            order = self.orders.get(accession_number)  # UnknownOrder if there is none
            self._check_linkable(study_uid, order)
            if move_to_order_patient:
                reassign_study(self.archive, study_uid, demographics(order.order.patient))
            return self._link(study_uid, order, "manual", correct=False)

    def _check_linkable(self, study_uid: str, order: StoredOrder) -> None:
        """``OrderConflict`` for a manual link the EMR could not take back: to a cancelled
        order (its result would report a procedure the EMR withdrew), or of a study linked to
        another order already (its result went out for that order, and nothing withdraws
        it). Linking again to the same order is allowed (it changes nothing)."""
        accession = order.order.accession_number
        if order.status is OrderStatus.CANCELLED:
            raise OrderConflict(f"order {accession} was cancelled; a study cannot be linked "
                                "to it (order it again, or link the study to another order)",
                                field="accession_number")
        current = self.link_of(study_uid)
        if current is not None and current.state == LINKED and current.order_pk != order.pk:
            linked = self.orders.get_by_pk(current.order_pk).order.accession_number
            raise OrderConflict(f"study {study_uid} is linked to {linked} already; its result "
                                "was reported for that order, and a link cannot be undone "
                                "here (correct the order in the EMR instead)",
                                field="accession_number")

    def dismiss(self, study_uid: str) -> StudyLink:
        """Take a study out of the unmatched queue without an order (e.g. a test scan).
        ``OrderConflict`` for a study linked to an order: dismissing it would drop the link."""
        if self._study_facts(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        with self._linking:
            current = self.link_of(study_uid)
            if current is not None and current.state == LINKED:
                raise OrderConflict(f"study {study_uid} is linked to an order; only a study"
                                    " waiting in the unmatched queue can be dismissed")
            link = StudyLink(study_uid, DISMISSED, "dismissed by staff")
            self._save(link)
        return link

    def _link(self, study_uid: str, order: StoredOrder, reason: str, *,
              correct: bool = True, move: bool = False) -> StudyLink:
        """Link a study to its order; its index patient takes the EMR's demographics
        (``correct``), or the study moves to the order's patient (``move``: its images carry
        an ID merged into that patient's)."""
        link = StudyLink(study_uid, LINKED, reason, order.pk)
        if move:
            reassign_study(self.archive, study_uid, demographics(order.order.patient))
        elif correct:
            correct_patient(self.archive, demographics(order.order.patient),
                            study_uid=study_uid)
        self._save(link)
        if order.status is OrderStatus.SCHEDULED:
            self.orders.set_status(order.order.accession_number, OrderStatus.IN_PROGRESS)
        log.info("study %s linked to order %d (%s)", study_uid, order.pk, reason)
        for listener in self._listeners:
            try:
                listener(link, order)
            except Exception as exc:
                log.error("link listener %r failed: %s", listener, loggable(exc))
                log.debug("link listener failure", exc_info=True)
        return link

    def _match(self, facts: dict[str, Any], ordered: dict[str, StoredOrder]
               ) -> tuple[StoredOrder | None, str]:
        """The order of a study (``ordered``: the orders of the accession numbers at hand)."""
        if facts["accession_number"]:
            order = ordered.get(facts["accession_number"])
            if order is None:
                return None, "no order has this accession number"
            if not self._is_patient_of(order, facts):
                return None, "the order with this accession number is for another patient"
            if order.status is OrderStatus.CANCELLED:
                return None, "the order with this accession number was cancelled"
            return order, "accession number"
        for patient_id in self._patient_ids(facts):
            for procedure_id in facts["requested_procedure_ids"]:
                order = self.orders.find_for_procedure(patient_id, procedure_id)
                if order is not None and order.status is not OrderStatus.CANCELLED:
                    return order, "patient and requested procedure"
        return None, "no accession number, and no order of the patient for its procedure"

    def _is_patient_of(self, order: StoredOrder, facts: dict[str, Any]) -> bool:
        """Whether the study's images name the order's patient: by their ID, or by an ID the
        EMR merged into the order's patient (ADT^A40) before or after they came."""
        if _same_patient(order.order.patient, facts):
            return True
        survivor = self._survivor(facts)
        return survivor is not None and _same_patient(
            order.order.patient, {"patient_id": survivor.patient_id, "issuer": survivor.issuer})

    def _patient_ids(self, facts: dict[str, Any]) -> list[str]:
        """The MRNs an order of the study's patient may be under: the images' own, and the
        one it was merged into."""
        survivor = self._survivor(facts)
        return [facts["patient_id"], *([survivor.patient_id] if survivor is not None else [])]

    def _survivor(self, facts: dict[str, Any]) -> PatientInfo | None:
        """The EMR patient the images' patient was merged into (None if it was not)."""
        named = PatientInfo(patient_id=facts["patient_id"], issuer=facts["issuer"] or "")
        survivor = self.orders.surviving_patient(named)
        return None if survivor is named else survivor

    def _study_facts(self, study_uid: str) -> dict[str, Any] | None:
        return self._facts_of([study_uid]).get(study_uid)

    def _facts_of(self, study_uids: list[str]) -> dict[str, dict[str, Any]]:
        """What linking needs of each study still archived: accession number, patient, and
        the Requested Procedure IDs of a study without an accession number."""
        if not study_uids:
            return {}
        statement = (sa.select(studies.c.pk, studies.c.study_instance_uid,
                               studies.c.accession_number, patients.c.patient_id,
                               patients.c.issuer_of_patient_id)
                     .join(patients, studies.c.patient_pk == patients.c.pk)
                     .where(studies.c.study_instance_uid.in_(study_uids)))
        with self.archive.index.read() as conn:
            rows = conn.execute(statement).all()
            without_accession = [row.pk for row in rows if not (row.accession_number or "").strip()]
            procedures: dict[int, list[str]] = {}
            if without_accession:
                for study_pk, procedure in conn.execute(
                        sa.select(series.c.study_pk, series.c.request_requested_procedure_id)
                        .distinct()
                        .where(series.c.study_pk.in_(without_accession),
                               series.c.request_requested_procedure_id.is_not(None))):
                    if procedure:
                        procedures.setdefault(study_pk, []).append(procedure)
        return {row.study_instance_uid: {
            "accession_number": (row.accession_number or "").strip(),
            "patient_id": row.patient_id, "issuer": row.issuer_of_patient_id,
            "requested_procedure_ids": procedures.get(row.pk, [])} for row in rows}

    # ------------------------------------------------------------------ the table

    def _save(self, *links: StudyLink) -> None:
        """Write links (one transaction for all)."""
        if not links:
            return
        now = dt.datetime.now(dt.UTC)
        with self.archive.index.write_core() as conn:
            for link in links:
                values = {"state": link.state, "reason": link.reason,
                          "order_pk": link.order_pk, "updated_at": now}
                updated = conn.execute(study_links.update().where(
                    study_links.c.study_instance_uid == link.study_instance_uid)
                    .values(**values)).rowcount
                if not updated:
                    conn.execute(study_links.insert().values(
                        study_instance_uid=link.study_instance_uid, created_at=now, **values))

    def link_of(self, study_uid: str) -> StudyLink | None:
        return self._links_of([study_uid]).get(study_uid)

    def _links_of(self, study_uids: list[str]) -> dict[str, StudyLink]:
        if not study_uids:
            return {}
        with self.archive.index.read() as conn:
            rows = conn.execute(sa.select(study_links).where(
                study_links.c.study_instance_uid.in_(study_uids))).all()
        return {row.study_instance_uid: _link(row) for row in rows}

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
