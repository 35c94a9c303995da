"""STOW-RS (PS3.18 10.5): a multipart request of DICOM instances into ``Archive.store``.

Parts are read from the request as they arrive and stored through the archive's one ingest
path while the next ones arrive: a few at a time (``StoreWindow``), so a request carrying a
whole study needs memory for a few instances only, and the fsyncs that make each instance
durable overlap with each other and with reading the request. The answer lists, in the
request's order, what was stored (ReferencedSOPSequence, with a WarningReason for duplicates)
and what failed (FailedSOPSequence with a FailureReason; OtherFailuresSequence for a body that
failed after instances were stored).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from storage.archive import Archive, StoreResult
from storage.errors import (
    InstanceMismatch,
    InvalidInstance,
    PatientConflict,
    StorageUnavailable,
)
from storage.parsing import announced_sop_instance_uid, parse_instance

log = logging.getLogger("pacs.dicomweb")

# FailureReason / WarningReason values (PS3.18 Table 10.5.3-2/-3; DICOM status codes).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900  # also: not in the study the request targets
CANNOT_UNDERSTAND = 0xC000
PATIENT_CONFLICT = 0xC001  # as over C-STORE: the Patient ID is not the study's
DUPLICATE_WARNING = 0xB007  # the same as the C-STORE warning for a duplicate

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
RETRIEVE_URL = "00081190"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
OTHER_FAILURES_SEQUENCE = "0008119A"
ERROR_COMMENT = "00000902"
# Refusals of one request logged one by one; past that, one line says how many more.
LOGGED_REFUSALS = 10


@dataclass
class StowOutcome:
    """What one STOW-RS request did, instance by instance."""

    stored: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    other_failures: list[dict[str, Any]] = field(default_factory=list)  # of no one instance
    warnings: int = 0
    study_uids: set[str] = field(default_factory=set)

    @property
    def http_status(self) -> int:
        if self.failed and not self.stored:
            return 409
        if self.failed or self.other_failures or self.warnings:
            return 202
        return 200

    def refused(self, item: dict[str, Any], message: str) -> None:
        self.failed.append(item)
        if len(self.failed) <= LOGGED_REFUSALS:
            log.warning("STOW-RS: instance refused (0x%04X): %s",
                        item[FAILURE_REASON]["Value"][0], message)

    def interrupted(self, reason: int, message: str) -> None:
        """The request's body failed after some instances were stored (malformed past that
        point, too large, stopped arriving): they stay stored, and the answer says so and
        why the rest was not read (OtherFailuresSequence, PS3.18 Table 10.5.3-3)."""
        log.warning("STOW-RS: the request stopped after %d instance(s) stored: %s",
                    len(self.stored), message)
        self.other_failures.append(_failure_item(reason, message))

    def finish(self) -> None:
        if len(self.failed) > LOGGED_REFUSALS:
            log.warning("STOW-RS: %d more instance(s) refused in that request",
                        len(self.failed) - LOGGED_REFUSALS)

    def response_json(self, study_url: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if study_url:
            body[RETRIEVE_URL] = {"vr": "UR", "Value": [study_url]}
        if self.failed:
            body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.failed}
        if self.other_failures:
            body[OTHER_FAILURES_SEQUENCE] = {"vr": "SQ", "Value": self.other_failures}
        if self.stored:
            body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.stored}
        return body


@dataclass(frozen=True)
class PartResult:
    """What happened to one part: its item for ReferencedSOPSequence or FailedSOPSequence."""

    item: dict[str, Any]
    failed: bool
    warning: bool = False
    study_uid: str | None = None
    message: str = ""  # why it failed

    def add_to(self, outcome: StowOutcome) -> None:
        if self.failed:
            outcome.refused(self.item, self.message)
            return
        outcome.stored.append(self.item)
        outcome.warnings += self.warning
        outcome.study_uids.add(self.study_uid)


def store_part(archive: Archive, data: bytes, *, study_uid: str | None,
               base: str) -> PartResult:
    """Store one part's instance (never raises for bad data)."""
    try:
        result = archive.store(data, expected_study_instance_uid=study_uid)
    except InstanceMismatch as exc:
        return failed_part(data, DATA_SET_DOES_NOT_MATCH, str(exc))
    except PatientConflict as exc:
        return failed_part(data, PATIENT_CONFLICT, str(exc))
    except InvalidInstance as exc:
        return failed_part(data, CANNOT_UNDERSTAND, str(exc))
    except StorageUnavailable as exc:
        log.error("STOW-RS: storage failed: %s", exc)
        return failed_part(data, OUT_OF_RESOURCES, str(exc))
    except Exception:
        log.exception("STOW-RS: unexpected failure while storing an instance")
        return failed_part(data, PROCESSING_FAILURE, "internal error")
    return _stored(result, base)


class StoreWindow:
    """Parts being stored while the request is read: at most ``parts`` of them and ``size``
    bytes (a part bigger than that is stored alone); results are added to ``outcome`` in the
    request's order.

    Two parts of one request with the same SOP Instance UID are stored in the request's order,
    so the duplicate policy ("keep the first") means the first in the request: a part waits
    for an earlier one that its File Meta says has the same UID, and a part whose File Meta
    cannot be read waits for all earlier ones.
    """

    def __init__(self, outcome: StowOutcome, *, parts: int = 4, size: int = 64 << 20) -> None:
        self.outcome = outcome
        self.parts = parts
        self.size = size
        self._pending: deque[tuple[asyncio.Future[PartResult], int, str | None]] = deque()
        self._bytes = 0

    async def store(self, data: bytes, store: Callable[[], Awaitable[PartResult]]) -> None:
        """Start storing a part (``store()`` does it), after making room for it."""
        uid = announced_sop_instance_uid(data)
        while self._pending and (len(self._pending) >= self.parts
                                 or self._bytes + len(data) > self.size or uid is None
                                 or any(uid == other for _, _, other in self._pending)):
            await self._finish_oldest()
        self._pending.append((asyncio.ensure_future(store()), len(data), uid))
        self._bytes += len(data)

    def add_result(self, result: PartResult) -> None:
        """A part decided without storing it (refused before reaching the archive)."""
        future: asyncio.Future[PartResult] = asyncio.get_running_loop().create_future()
        future.set_result(result)
        self._pending.append((future, 0, None))

    async def drain(self) -> None:
        """Wait for every part still being stored (also when the request turned out bad:
        what was stored stays stored, and no store is left running unobserved)."""
        while self._pending:
            await self._finish_oldest()

    async def _finish_oldest(self) -> None:
        future, size, _ = self._pending[0]
        try:
            result = await future
        finally:
            self._pending.popleft()
            self._bytes -= size
        result.add_to(self.outcome)


def _stored(result: StoreResult, base: str) -> PartResult:
    url = (f"{base}/studies/{result.study_instance_uid}/series/{result.series_instance_uid}"
           f"/instances/{result.sop_instance_uid}")
    item: dict[str, Any] = {
        REFERENCED_SOP_CLASS_UID: {"vr": "UI", "Value": [result.sop_class_uid]},
        REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [result.sop_instance_uid]},
        RETRIEVE_URL: {"vr": "UR", "Value": [url]},
    }
    if result.is_warning:
        item[WARNING_REASON] = {"vr": "US", "Value": [DUPLICATE_WARNING]}
    return PartResult(dict(sorted(item.items())), failed=False, warning=result.is_warning,
                      study_uid=result.study_instance_uid)


def failed_part(data: bytes, reason: int, message: str) -> PartResult:
    """A part that was refused, by the archive or before reaching it."""
    item = _failure_item(reason, message)
    try:  # name the instance when its header can be read at all
        parsed = parse_instance(data)
        item[REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [parsed.sop_class_uid]}
        item[REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [parsed.sop_instance_uid]}
    except Exception:
        pass
    return PartResult(dict(sorted(item.items())), failed=True, message=message)


def _failure_item(reason: int, message: str) -> dict[str, Any]:
    # ErrorComment is not a standard attribute of these items: the reason in words, for
    # whoever reads the reply.
    return {ERROR_COMMENT: {"vr": "LO", "Value": [message[:64]]},
            FAILURE_REASON: {"vr": "US", "Value": [reason]}}
