"""Study completion: a study is complete when no instance has arrived for a quiet period.

The watcher learns of arrivals from the archive's ingest events (``Archive.subscribe``), not
by polling the index, and calls its listeners once per study when the quiet period has
passed. Pending studies live in memory, so at start-up they are found again from what the
database keeps: a listener may say which studies it still owes something for (``owed``:
the EMR results, from the outbox, however long the server was stopped), and the studies
updated within the last few quiet periods are taken as pending too, for listeners that keep
no record of their own. Listeners must therefore be idempotent (the auto-share checks for its
own share, the outbox for a result it has already). A study that receives more instances
after completing completes again later.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable

import sqlalchemy as sa

from storage.archive import Archive, StoreOutcome, StoreResult
from storage.index import studies

log = logging.getLogger("pacs.completion")

CompletionListener = Callable[[str], None]
# The studies a listener still owes its work for, from durable state (read at start-up).
OwedStudies = Callable[[], Iterable[str]]


class StudyCompletion:
    """Calls listeners with a Study Instance UID once its study has been quiet long enough."""

    def __init__(self, archive: Archive, quiet_seconds: float) -> None:
        self.archive = archive
        self.quiet_seconds = quiet_seconds
        self._listeners: list[CompletionListener] = []
        self._owed: list[OwedStudies] = []
        self._pending: dict[str, float] = {}  # study UID -> monotonic time of its last instance
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        archive.subscribe(self._stored)

    def subscribe(self, listener: CompletionListener, *,
                  owed: OwedStudies | None = None) -> None:
        """Call ``listener(study_uid)`` when a study is complete; ``owed`` names the studies
        it has not done its work for yet, which are watched again at start-up."""
        self._listeners.append(listener)
        if owed is not None:
            self._owed.append(owed)

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
        """Watch again the studies whose completion may have been pending at the last stop:
        those listeners still owe their work for, and those changed in the last few quiet
        periods. Each completes after a quiet period from now."""
        found = self._owed_studies() | self._recent_studies()
        now = time.monotonic()
        with self._lock:
            for uid in found:
                self._pending.setdefault(uid, now)
        if found:
            log.info("%d study(ies) watched for completion again after the start", len(found))

    def _owed_studies(self) -> set[str]:
        found: set[str] = set()
        for owed in self._owed:
            try:
                found.update(owed())
            except Exception:
                log.exception("finding the studies %r still owes failed", owed)
        return found

    def _recent_studies(self) -> set[str]:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3 * self.quiet_seconds)
        statement = sa.select(studies.c.study_instance_uid).where(
            studies.c.updated_at >= since)
        with self.archive.index.read() as conn:
            return {uid for (uid,) in conn.execute(statement)}

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


__all__ = ["CompletionListener", "OwedStudies", "StudyCompletion"]
