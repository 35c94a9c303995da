"""The outbox: result messages owed to EMR destinations, kept in the database until delivered.

A message is written in the same place the archive's data lives, then delivered by a worker
thread of its destination: each destination has its own, so one that is slow or hangs does
not hold up the others, and a destination's messages go out one at a time in the order they
were written (one waiting for a retry lets the others by).
A destination that is down is retried with exponential back-off (capped), for as long as it
takes, so an EMR that is down for an hour (or a PACS restart) loses nothing. A newer message
for the same study and destination supersedes one still waiting or failed, and an old failed
one cannot be sent again over a newer one; a message with the same content as the study's
last one for that destination (the same result made again: MPPS COMPLETED then the quiet
period, a restart) is not written again. A destination that *refuses* a message (HL7 AR,
HTTP 4xx) is not retried: the delivery is marked failed, visible through the API, and can be
retried by hand.

Several server nodes may share one database (ARCHITECTURE, "Scale"), each with an outbox: a
node sends a destination's deliveries only while it holds that destination's lease (a row of
``outbox_leases``, taken by a conditional UPDATE, which every database does atomically), held
for one round and renewed before each attempt. So each message goes out once and in order
whichever node wrote it; a node that stops gives its leases back, and one that dies lets them
lapse after ``lease_seconds``, when another takes over (the attempt under way when it died
may then be made again: results are idempotent for the EMR, which receives a newer one for
the same study anyway).

Logs name deliveries and destinations, never what the destination answered: error texts of
EMRs quote patient names. The full text is kept with the delivery (``last_error``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from emr.errors import loggable
from storage.errors import NotFound
from storage.index import Index, deliveries, iso_seconds, outbox_leases, stored_utc, utc_now

log = logging.getLogger("pacs.emr.outbox")

PENDING, DELIVERED, FAILED, SUPERSEDED = "pending", "delivered", "failed", "superseded"
_IDLE_SECONDS = 60.0  # a worker with nothing due looks again after this long at the latest
_LEASE_SECONDS = 120.0  # how long a dead node's lease holds a destination (> one attempt)
_HELD_ELSEWHERE_SECONDS = 5.0  # a worker whose destination another node serves looks again


class DeliveryRefused(Exception):
    """The destination answered and refused the message: sending it again will not help."""


# destination, payload -> None; raises DeliveryRefused, or anything else for "try later".
Sender = Callable[[str, str], None]
# payload -> what it says, without when it was made (two payloads saying the same are equal).
Content = Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    kind: str
    study_instance_uid: str
    state: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    payload: str

    def as_json(self, *, with_payload: bool = False) -> dict[str, Any]:
        body = {"id": self.id, "destination": self.destination, "kind": self.kind,
                "study_instance_uid": self.study_instance_uid, "state": self.state,
                "attempts": self.attempts, "next_attempt_at": iso_seconds(self.next_attempt_at),
                "last_error": self.last_error, "created_at": iso_seconds(self.created_at),
                "delivered_at": iso_seconds(self.delivered_at)}
        if with_payload:
            body["payload"] = self.payload
        return body


class Outbox:
    """Durable deliveries with retries; ``senders`` maps a kind (hl7, fhir) to its sender,
    ``contents`` a kind to what of a payload is its content (all of it when not given)."""

    def __init__(self, index: Index, senders: dict[str, Sender], *,
                 retry_seconds: float = 5.0, max_retry_seconds: float = 300.0,
                 contents: dict[str, Content] | None = None,
                 lease_seconds: float = _LEASE_SECONDS) -> None:
        self.index = index
        self.senders = senders
        self.contents = contents or {}
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.lease_seconds = lease_seconds
        # This outbox among the nodes on the database (unique: a restarted process is another).
        self.node = f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._held: set[str] = set()  # destinations whose lease this node may hold
        self._stop = threading.Event()
        self._started = False
        self._workers: dict[str, _DestinationWorker] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Serve every destination that has deliveries waiting (others start when written)."""
        self._started = True
        with self.index.read() as conn:
            waiting = [d for (d,) in conn.execute(
                sa.select(deliveries.c.destination).distinct()
                .where(deliveries.c.state == PENDING))]
        for destination in waiting:
            self._wake(destination)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.wake()
        for worker in workers:
            worker.join(15)
        for destination in list(self._held):  # the other nodes need not wait for them to lapse
            try:
                self._give_back(destination)
            except Exception as exc:  # the database is gone: the lease lapses by itself
                log.warning("could not give back the outbox lease of %s (%s)", destination,
                            loggable(exc))

    def enqueue(self, destination: str, kind: str, study_uid: str, payload: str) -> int:
        """Owe ``payload`` to ``destination``; what was still waiting for the same study there
        is superseded. The delivery's id: the study's last one for this destination, without
        writing anything, when that one says the same (it is owed or was sent already)."""
        if kind not in self.senders:
            raise ValueError(f"no sender for {kind!r} deliveries")
        with self.index.write_core() as conn:
            if not self.index.is_sqlite:
                # Nodes enqueueing the study's result at once would each find the same last
                # delivery and each write the new one (the EMR got it twice): one at a time,
                # per destination and study, until commit. (SQLite has one writer anyway.)
                key = hashlib.sha256(f"outbox\0{destination}\0{study_uid}".encode()).digest()
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                    int.from_bytes(key[:8], "big", signed=True))))
            same = self._same_result(conn, destination, kind, study_uid, payload)
            if same is not None:
                return same
            now = utc_now()
            conn.execute(deliveries.update().where(
                deliveries.c.destination == destination,
                deliveries.c.study_instance_uid == study_uid,
                deliveries.c.state.in_((PENDING, FAILED)))
                .values(state=SUPERSEDED, updated_at=now))
            pk = conn.execute(deliveries.insert().values(
                destination=destination, kind=kind, study_instance_uid=study_uid,
                payload=payload, state=PENDING, next_attempt_at=now, created_at=now,
                updated_at=now).returning(deliveries.c.pk)).scalar_one()
        self._wake(destination)
        return pk

    def _same_result(self, conn: Connection, destination: str, kind: str, study_uid: str,
                     payload: str) -> int | None:
        """The study's latest delivery to ``destination`` (pending, delivered or failed) if
        it says what ``payload`` says."""
        latest = conn.execute(
            sa.select(deliveries.c.pk, deliveries.c.kind, deliveries.c.payload)
            .where(deliveries.c.destination == destination,
                   deliveries.c.study_instance_uid == study_uid,
                   deliveries.c.state != SUPERSEDED)
            .order_by(deliveries.c.pk.desc()).limit(1)).first()
        if latest is None or latest.kind != kind:
            return None
        content = self.contents.get(kind, _whole)
        return latest.pk if content(latest.payload) == content(payload) else None

    def retry(self, delivery_id: int) -> Delivery:
        """Send a failed (or waiting) delivery again now; ``ValueError`` if it is neither."""
        with self.index.write_core() as conn:
            count = conn.execute(deliveries.update().where(
                deliveries.c.pk == delivery_id,
                deliveries.c.state.in_((PENDING, FAILED)))
                .values(state=PENDING, next_attempt_at=utc_now(), updated_at=utc_now())).rowcount
        if not count:
            state = self.get(delivery_id).state  # NotFound if there is no such delivery
            if state == SUPERSEDED:
                raise ValueError(f"delivery {delivery_id} was superseded by a newer result of "
                                 "the same study; retry that one")
            raise ValueError(f"delivery {delivery_id} is {state}, not pending or failed")
        delivery = self.get(delivery_id)
        self._wake(delivery.destination)
        return delivery

    def get(self, delivery_id: int) -> Delivery:
        with self.index.read() as conn:
            row = conn.execute(sa.select(deliveries).where(deliveries.c.pk == delivery_id)).first()
        if row is None:
            raise NotFound(f"no delivery {delivery_id}")
        return _delivery(row)

    def list(self, *, state: str = "", study_uid: str = "", limit: int = 100,
             offset: int = 0) -> list[Delivery]:
        conditions = []
        if state:
            conditions.append(deliveries.c.state == state)
        if study_uid:
            conditions.append(deliveries.c.study_instance_uid == study_uid)
        statement = (sa.select(deliveries).where(*conditions)
                     .order_by(deliveries.c.pk.desc()).limit(limit).offset(offset))
        with self.index.read() as conn:
            return [_delivery(row) for row in conn.execute(statement)]

    def counts(self) -> dict[str, int]:
        statement = sa.select(deliveries.c.state, sa.func.count()).group_by(deliveries.c.state)
        with self.index.read() as conn:
            return {state: count for state, count in conn.execute(statement)}

    # ------------------------------------------------------------------ the workers

    def _wake(self, destination: str) -> None:
        """Have ``destination``'s worker look at its deliveries now (started on first use)."""
        if not self._started or self._stop.is_set():
            return
        with self._lock:
            worker = self._workers.get(destination)
            if worker is None:
                worker = self._workers[destination] = _DestinationWorker(self, destination)
                worker.start()  # which begins with a round
                return
        worker.wake()

    def deliver_due(self, destination: str) -> float:
        """Send ``destination``'s due deliveries one at a time, the first due first (new ones
        in the order they were written); seconds until the next one is due.

        Only while this node holds the destination's lease (see the module's docstring): a
        round takes it, renews it before each attempt and gives it back at its end.

        Each is read afresh before its attempt (one superseded meanwhile is not sent), and one
        waiting for its retry does not hold up the others: an EMR that refuses one message for
        now (AE) still gets the results of other studies. Two failures in a row end the round
        until ``retry_seconds`` later: the destination itself is down, and trying each of a
        backlog in turn (each up to its 15 s deadline) would only keep the worker waiting."""
        try:
            return self._round(destination)
        finally:
            self._give_back(destination)

    def _round(self, destination: str) -> float:
        failures = 0
        while not self._stop.is_set():
            delivery = self._first_due(destination)
            if delivery is None:
                return _IDLE_SECONDS
            due = delivery.next_attempt_at or utc_now()
            wait = (due - utc_now()).total_seconds()
            if wait > 0:
                return min(max(wait, 0.05), _IDLE_SECONDS)
            if failures >= 2:
                return self.retry_seconds
            if not self._hold(destination):
                # Another node is sending; it sees this node's new deliveries too. Look
                # again soon: it may have stopped in between, or be gone.
                return _HELD_ELSEWHERE_SECONDS
            delivery = self._first_due(destination)  # what is first may have been sent
            if delivery is None or (delivery.next_attempt_at or utc_now()) > utc_now():
                continue
            failures = 0 if self._attempt(delivery) else failures + 1
        return _IDLE_SECONDS

    def _hold(self, destination: str) -> bool:
        """Take or renew ``destination``'s lease for ``lease_seconds``; False while another
        node holds it."""
        now = utc_now()
        until = now + dt.timedelta(seconds=self.lease_seconds)
        with self.index.write_core() as conn:
            if conn.execute(outbox_leases.update().where(
                    outbox_leases.c.destination == destination,
                    sa.or_(outbox_leases.c.holder == self.node,
                           outbox_leases.c.expires_at < now))
                    .values(holder=self.node, expires_at=until)).rowcount:
                self._held.add(destination)
                return True
            if conn.execute(sa.select(outbox_leases.c.holder).where(
                    outbox_leases.c.destination == destination)).first() is not None:
                return False
        try:  # the destination's first lease; two nodes may write it at once: one wins
            with self.index.write_core() as conn:
                conn.execute(outbox_leases.insert().values(
                    destination=destination, holder=self.node, expires_at=until))
        except sa.exc.IntegrityError:
            return False
        self._held.add(destination)
        return True

    def _give_back(self, destination: str) -> None:
        if destination not in self._held:
            return
        self._held.discard(destination)
        with self.index.write_core() as conn:
            conn.execute(outbox_leases.update().where(
                outbox_leases.c.destination == destination,
                outbox_leases.c.holder == self.node).values(expires_at=utc_now()))

    def _first_due(self, destination: str) -> Delivery | None:
        with self.index.read() as conn:
            row = conn.execute(
                sa.select(deliveries).where(deliveries.c.destination == destination,
                                            deliveries.c.state == PENDING)
                .order_by(deliveries.c.next_attempt_at, deliveries.c.pk).limit(1)).first()
        return _delivery(row) if row is not None else None

    def _attempt(self, delivery: Delivery) -> bool:
        """One try; whether the destination answered (delivered or refused)."""
        try:
            self.senders[delivery.kind](delivery.destination, delivery.payload)
        except DeliveryRefused as exc:
            log.warning("delivery %d to %s refused (%s)", delivery.id, delivery.destination,
                        _gist(exc))
            self._finish(delivery, FAILED, str(exc))
            return True
        except Exception as exc:
            attempts = delivery.attempts + 1
            wait = min(self.retry_seconds * 2 ** (attempts - 1), self.max_retry_seconds)
            log.warning("delivery %d to %s failed (attempt %d, next in %.0f s): %s",
                        delivery.id, delivery.destination, attempts, wait, _gist(exc))
            with self.index.write_core() as conn:
                conn.execute(deliveries.update().where(
                    deliveries.c.pk == delivery.id, deliveries.c.state == PENDING).values(
                    attempts=attempts, last_error=str(exc)[:500], updated_at=utc_now(),
                    next_attempt_at=utc_now() + dt.timedelta(seconds=wait)))
            return False
        if self._finish(delivery, DELIVERED, ""):
            log.info("delivery %d of study %s to %s done", delivery.id,
                     delivery.study_instance_uid, delivery.destination)
        return True

    def _finish(self, delivery: Delivery, state: str, error: str) -> bool:
        """Record how an attempt ended; only a delivery still pending changes. One superseded
        while its attempt was under way stays superseded (False): marked failed, it could be
        retried and sent after the newer result."""
        now = utc_now()
        with self.index.write_core() as conn:
            changed = conn.execute(deliveries.update().where(
                deliveries.c.pk == delivery.id, deliveries.c.state == PENDING).values(
                state=state, attempts=delivery.attempts + 1, last_error=error[:500],
                next_attempt_at=None, updated_at=now,
                delivered_at=now if state == DELIVERED else None)).rowcount
        if not changed:
            log.info("delivery %d to %s was superseded during its attempt; it stays superseded",
                     delivery.id, delivery.destination)
        return bool(changed)


class _DestinationWorker:
    """The thread that sends one destination's deliveries, one at a time, in order."""

    def __init__(self, outbox: Outbox, destination: str) -> None:
        self.outbox = outbox
        self.destination = destination
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"emr-outbox {destination}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = self.outbox._stop
        while not stop.is_set():
            self._wake.clear()
            try:
                delay = self.outbox.deliver_due(self.destination)
            except Exception as exc:
                # The text may quote values (patient names): the kind only, above DEBUG.
                log.error("the outbox for %s failed (%s); trying again shortly",
                          self.destination, loggable(exc))
                log.debug("outbox failure", exc_info=True)
                delay = self.outbox.retry_seconds
            self._wake.wait(delay)


def _whole(payload: str) -> str:
    return payload


def _gist(exc: Exception) -> str:
    """What may be logged of a delivery error: its kind and code, not the peer's words.

    Senders word their errors ``CODE: text`` (``HTTP 500: ...``, ``AE: ...``); connection
    errors carry no patient data."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"[:200]
    return str(exc).split(":", 1)[0][:40] or type(exc).__name__


def _delivery(row: Any) -> Delivery:
    return Delivery(row.pk, row.destination, row.kind, row.study_instance_uid, row.state,
                    row.attempts, stored_utc(row.next_attempt_at),
                    row.last_error, stored_utc(row.created_at),
                    stored_utc(row.delivered_at), row.payload)
