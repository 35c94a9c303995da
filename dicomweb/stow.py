"""STOW-RS (PS3.18 10.5): a multipart request of DICOM instances into ``Archive.store``.

Parts are read from the request as they arrive and stored one at a time through the archive's
one ingest path, so a request carrying a whole study needs memory for one instance only. The
answer lists what was stored (ReferencedSOPSequence, with a WarningReason for duplicates) and
what failed (FailedSOPSequence with a FailureReason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from storage.archive import Archive, StoreResult
from storage.errors import InstanceMismatch, InvalidInstance, StorageUnavailable
from storage.parsing import parse_instance

log = logging.getLogger("pacs.dicomweb")

# FailureReason / WarningReason values (PS3.18 Table 10.5.3-2/-3; DICOM status codes).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900  # also: not in the study the request targets
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_WARNING = 0xB007  # the same as the C-STORE warning for a duplicate

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
RETRIEVE_URL = "00081190"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


@dataclass
class StowOutcome:
    """What one STOW-RS request did, instance by instance."""

    stored: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    warnings: int = 0
    study_uids: set[str] = field(default_factory=set)

    @property
    def http_status(self) -> int:
        if self.failed and not self.stored:
            return 409
        if self.failed or self.warnings:
            return 202
        return 200

    def response_json(self, study_url: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if study_url:
            body[RETRIEVE_URL] = {"vr": "UR", "Value": [study_url]}
        if self.failed:
            body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.failed}
        if self.stored:
            body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.stored}
        return body


def store_part(archive: Archive, data: bytes, outcome: StowOutcome, *, study_uid: str | None,
               base: str) -> None:
    """Store one part's instance and record the result (never raises for bad data)."""
    try:
        result = archive.store(data, expected_study_instance_uid=study_uid)
    except InstanceMismatch as exc:
        _fail(outcome, data, DATA_SET_DOES_NOT_MATCH, str(exc))
    except InvalidInstance as exc:
        _fail(outcome, data, CANNOT_UNDERSTAND, str(exc))
    except StorageUnavailable as exc:
        log.error("STOW-RS: storage failed: %s", exc)
        _fail(outcome, data, OUT_OF_RESOURCES, str(exc))
    except Exception:
        log.exception("STOW-RS: unexpected failure while storing an instance")
        _fail(outcome, data, PROCESSING_FAILURE, "internal error")
    else:
        _stored(outcome, result, base)


def fail_part(outcome: StowOutcome, data: bytes, reason: int, message: str) -> None:
    """Record a part that was refused before reaching the archive (e.g. not application/dicom)."""
    _fail(outcome, data, reason, message)


def _stored(outcome: StowOutcome, result: StoreResult, base: str) -> None:
    url = (f"{base}/studies/{result.study_instance_uid}/series/{result.series_instance_uid}"
           f"/instances/{result.sop_instance_uid}")
    item: dict[str, Any] = {
        REFERENCED_SOP_CLASS_UID: {"vr": "UI", "Value": [result.sop_class_uid]},
        REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [result.sop_instance_uid]},
        RETRIEVE_URL: {"vr": "UR", "Value": [url]},
    }
    if result.is_warning:
        item[WARNING_REASON] = {"vr": "US", "Value": [DUPLICATE_WARNING]}
        outcome.warnings += 1
    outcome.stored.append(dict(sorted(item.items())))
    outcome.study_uids.add(result.study_instance_uid)


def _fail(outcome: StowOutcome, data: bytes, reason: int, message: str) -> None:
    log.warning("STOW-RS: instance refused (0x%04X): %s", reason, message)
    item: dict[str, Any] = {FAILURE_REASON: {"vr": "US", "Value": [reason]}}
    try:  # name the instance when its header can be read at all
        parsed = parse_instance(data)
        item[REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [parsed.sop_class_uid]}
        item[REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [parsed.sop_instance_uid]}
    except Exception:
        pass
    # Not a standard attribute of the item: the reason in words, for whoever reads the reply.
    item["00000902"] = {"vr": "LO", "Value": [message[:64]]}
    outcome.failed.append(dict(sorted(item.items())))
