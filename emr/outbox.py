"""The outbox: result messages owed to EMR destinations, kept in the database until delivered.

A message is written in the same place the archive's data lives, then delivered by a worker
thread (each destination on a thread of its own, so one that hangs does not hold up the
others); a destination that is down is retried with exponential back-off (capped), for as long
as it takes, so an EMR that is down for an hour (or a PACS restart) loses nothing. A newer
message for the same study and destination supersedes one still waiting or failed, and an old
failed one cannot be sent again over a newer one. A destination that *refuses* a message (HL7
AR, HTTP 4xx) is not retried: the delivery is marked failed, visible through the API, and can
be retried by hand.

Logs name deliveries and destinations, never what the destination answered: error texts of
EMRs quote patient names. The full text is kept with the delivery (``last_error``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from emr.errors import loggable
from storage.errors import NotFound
from storage.index import Index, deliveries, iso_seconds, stored_utc, utc_now

log = logging.getLogger("pacs.emr.outbox")

PENDING, DELIVERED, FAILED, SUPERSEDED = "pending", "delivered", "failed", "superseded"


class DeliveryRefused(Exception):
    """The destination answered and refused the message: sending it again will not help."""


# destination, payload -> None; raises DeliveryRefused, or anything else for "try later".
Sender = Callable[[str, str], None]


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
    """Durable deliveries with retries; ``senders`` maps a kind (hl7, fhir) to its sender."""

    def __init__(self, index: Index, senders: dict[str, Sender], *,
                 retry_seconds: float = 5.0, max_retry_seconds: float = 300.0) -> None:
        self.index = index
        self.senders = senders
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="emr-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(15)

    def enqueue(self, destination: str, kind: str, study_uid: str, payload: str) -> int:
        """Owe ``payload`` to ``destination``; what was still waiting for the same study there
        is superseded. The delivery's id."""
        if kind not in self.senders:
            raise ValueError(f"no sender for {kind!r} deliveries")
        now = utc_now()
        with self.index.write_core() as conn:
            conn.execute(deliveries.update().where(
                deliveries.c.destination == destination,
                deliveries.c.study_instance_uid == study_uid,
                deliveries.c.state.in_((PENDING, FAILED)))
                .values(state=SUPERSEDED, updated_at=now))
            pk = conn.execute(deliveries.insert().values(
                destination=destination, kind=kind, study_instance_uid=study_uid,
                payload=payload, state=PENDING, next_attempt_at=now, created_at=now,
                updated_at=now).returning(deliveries.c.pk)).scalar_one()
        self._wake.set()
        return pk

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
        self._wake.set()
        return self.get(delivery_id)

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

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.deliver_due()
            except Exception as exc:
                # The text may quote values (patient names): the kind only, above DEBUG.
                log.error("the outbox failed (%s); trying again shortly", loggable(exc))
                log.debug("outbox failure", exc_info=True)
                delay = self.retry_seconds
            self._wake.wait(delay)
            self._wake.clear()

    def deliver_due(self) -> float:
        """Try every delivery that is due; seconds until the next one is."""
        now = utc_now()
        with self.index.read() as conn:
            due = conn.execute(
                sa.select(deliveries).where(deliveries.c.state == PENDING,
                                            deliveries.c.next_attempt_at <= now)
                .order_by(deliveries.c.next_attempt_at, deliveries.c.pk).limit(200)).all()
        by_destination: dict[str, list[Delivery]] = {}
        for row in due:
            by_destination.setdefault(row.destination, []).append(_delivery(row))
        if len(by_destination) == 1:
            self._deliver_in_order(next(iter(by_destination.values())))
        elif by_destination:
            with ThreadPoolExecutor(min(len(by_destination), 8),
                                    thread_name_prefix="emr-outbox") as pool:
                list(pool.map(self._deliver_in_order, by_destination.values()))
        with self.index.read() as conn:
            following = conn.execute(sa.select(sa.func.min(deliveries.c.next_attempt_at))
                                     .where(deliveries.c.state == PENDING)).scalar()
        if following is None:
            return 60.0
        return min(max((stored_utc(following) - utc_now()).total_seconds(), 0.05), 60.0)

    def _deliver_in_order(self, due: list[Delivery]) -> None:
        """One destination's due deliveries, oldest first, until it fails to answer."""
        for delivery in due:
            if self._stop.is_set() or not self._attempt(delivery):
                return

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
        self._finish(delivery, DELIVERED, "")
        log.info("delivery %d of study %s to %s done", delivery.id,
                 delivery.study_instance_uid, delivery.destination)
        return True

    def _finish(self, delivery: Delivery, state: str, error: str) -> None:
        now = utc_now()
        with self.index.write_core() as conn:
            conn.execute(deliveries.update().where(deliveries.c.pk == delivery.id).values(
                state=state, attempts=delivery.attempts + 1, last_error=error[:500],
                next_attempt_at=None, updated_at=now,
                delivered_at=now if state == DELIVERED else None))


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
