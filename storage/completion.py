"""Study completion: a study is complete when no instance has arrived for a quiet period.

The watcher learns of arrivals from the archive's ingest events (``Archive.subscribe``), not
by polling the index, and calls its listeners once per study when the quiet period has
passed. Pending studies live in memory; at start-up the studies updated within the last few
quiet periods are taken as pending again, so a restart during the quiet period loses
nothing. Listeners must therefore be idempotent (the auto-share checks for its own share).
A study that receives more instances after completing completes again later.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from storage.archive import Archive, StoreOutcome, StoreResult
from storage.index import studies

log = logging.getLogger("pacs.completion")

CompletionListener = Callable[[str], None]


class StudyCompletion:
    """Calls listeners with a Study Instance UID once its study has been quiet long enough."""

    def __init__(self, archive: Archive, quiet_seconds: float) -> None:
        self.archive = archive
        self.quiet_seconds = quiet_seconds
        self._listeners: list[CompletionListener] = []
        self._pending: dict[str, float] = {}  # study UID -> monotonic time of its last instance
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        archive.subscribe(self._stored)

    def subscribe(self, listener: CompletionListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._run, name="study-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def is_pending(self, study_uid: str) -> bool:
        """Whether the study is still within its quiet period (not complete yet)."""
        with self._lock:
            return study_uid in self._pending

    def _stored(self, result: StoreResult) -> None:
        if result.outcome is StoreOutcome.DUPLICATE_KEPT:
            return  # nothing changed in the study
        with self._lock:
            self._pending[result.study_instance_uid] = time.monotonic()

    def _recover(self) -> None:
        """Studies that changed shortly before start-up may not have completed yet."""
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3 * self.quiet_seconds)
        statement = sa.select(studies.c.study_instance_uid).where(
            studies.c.updated_at >= since)
        with self.archive.index.read() as conn:
            recent = [uid for (uid,) in conn.execute(statement)]
        now = time.monotonic()
        with self._lock:
            for uid in recent:
                self._pending.setdefault(uid, now)
        if recent:
            log.info("%d recently changed study(ies) watched for completion", len(recent))

    def _run(self) -> None:
        tick = max(0.2, min(self.quiet_seconds / 4, 5.0))
        while not self._stop.wait(tick):
            self.check()

    def check(self) -> list[str]:
        """Fire the listeners for every study quiet long enough; the UIDs completed."""
        deadline = time.monotonic() - self.quiet_seconds
        with self._lock:
            done = [uid for uid, last in self._pending.items() if last <= deadline]
            for uid in done:
                del self._pending[uid]
        for uid in done:
            for listener in self._listeners:
                try:
                    listener(uid)
                except Exception:
                    log.exception("study completion listener %r failed for %s", listener, uid)
        return done


__all__ = ["CompletionListener", "StudyCompletion"]
