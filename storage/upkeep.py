"""Archive upkeep: start-up reconciliation and the consistency check behind `pacs check`.

Both compare the blob store with the index without holding either in memory: blob keys and
indexed keys are two streams sorted byte-wise, merged in one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import sqlalchemy as sa

from storage.errors import InvalidInstance, StorageUnavailable
from storage.index import instances
from storage.parsing import ParsedInstance, parse_instance

if TYPE_CHECKING:
    from storage.archive import Archive

log = logging.getLogger("storage.archive")


@dataclasses.dataclass
class ReconcileReport:
    blobs_seen: int = 0
    reindexed: int = 0
    superseded: list[str] = dataclasses.field(default_factory=list)  # UID indexed elsewhere
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
    # Readable but refused by the ingest rules (a Patient ID its study does not have): key ->
    # reason. Left as they are, for a person to look at.
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CheckReport:
    instances: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)  # rows without a blob
    corrupt: list[str] = dataclasses.field(default_factory=list)  # size or hash differs
    orphans: list[str] = dataclasses.field(default_factory=list)  # blobs without a row
    # What start-up reconciliation will do with each orphan: key -> a short sentence.
    orphan_fates: dict[str, str] = dataclasses.field(default_factory=dict)
    # Blobs (instance UID) or blob folders (key ending in "/") that cannot be read: -> reason.
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans or self.unreadable)


def _indexed_keys(archive: Archive) -> Iterator[str]:
    """All blob keys in the index, sorted byte-wise, streamed."""
    column = instances.c.blob_key
    if archive.index.engine.dialect.name == "postgresql":
        column = sa.collate(column, "C")
    with archive.index.engine.connect() as conn:
        result = conn.execution_options(yield_per=2000).execute(
            sa.select(instances.c.blob_key).order_by(column))
        for (key,) in result:
            yield key


def orphans(archive: Archive,
            on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Blob keys with no index row: a merge of two sorted streams, in constant memory.

    Folders that cannot be listed go to ``on_error(folder_key, reason)`` (see
    ``BlobStore.iterate``)."""
    indexed = _indexed_keys(archive)
    current = next(indexed, None)
    for key in archive.blobs.iterate(on_error=on_error):
        while current is not None and current < key:
            current = next(indexed, None)
        if current != key:
            yield key


def _unlisted_folder(folder: str, reason: str) -> None:
    log.warning("reconciliation: blob folder %s cannot be listed (%s); its blobs are skipped",
                folder, reason)


def reconcile(archive: Archive) -> ReconcileReport:
    """Index the blobs a crash left without index rows (they were never acknowledged).

    A blob that cannot be read or indexed is logged (key only: the reason may quote patient
    data) and skipped; the others are still indexed."""
    report = ReconcileReport()
    for key in list(orphans(archive, on_error=_record_unlisted(report))):
        report.blobs_seen += 1
        fate = _reconcile_one(archive, key)
        if fate is None:
            report.reindexed += 1
        elif fate[0] == "superseded":
            report.superseded.append(key)
        else:
            getattr(report, fate[0])[key] = fate[1]
            log.warning("reconciliation: orphan blob %s %s, left as it is", key,
                        "cannot be read" if fate[0] == "unreadable" else "is refused")
    if report.reindexed or report.superseded or report.unreadable or report.refused:
        log.warning("reconciliation: %d blob(s) re-indexed, %d superseded, %d unreadable, "
                    "%d refused", report.reindexed, len(report.superseded),
                    len(report.unreadable), len(report.refused))
    return report


def _record_unlisted(report: ReconcileReport) -> Callable[[str, str], None]:
    def record(folder: str, reason: str) -> None:
        _unlisted_folder(folder, reason)
        report.unreadable[folder] = f"cannot list the folder: {reason}"
    return record


def _reconcile_one(archive: Archive, key: str) -> tuple[str, str] | None:
    """Index one orphan: None when indexed, else (``unreadable``|``refused``|``superseded``,
    reason)."""
    parsed = _parse_blob(archive, key)
    if isinstance(parsed, tuple):
        return parsed
    if archive.find_location(parsed.sop_instance_uid) is not None:
        return "superseded", "a copy of an archived instance"  # a replace or a lost race
    try:
        archive.index_stored_blob(key, parsed)
    except InvalidInstance as exc:  # one blob the rules refuse must not stop the others
        return "refused", str(exc)
    return None


def _parse_blob(archive: Archive, key: str) -> ParsedInstance | tuple[str, str]:
    """The parsed blob, or (``unreadable``, reason) when it cannot be read or parsed."""
    try:
        data = archive.blobs.get(key)
    except (KeyError, StorageUnavailable) as exc:
        return "unreadable", "gone" if isinstance(exc, KeyError) else str(exc)
    try:
        return parse_instance(data)
    except InvalidInstance as exc:
        return "unreadable", str(exc)
    except Exception as exc:  # noqa: BLE001 - a parser bug on one blob must not stop the rest
        # Its message can quote bytes of the file (patient data): type only.
        return "unreadable", f"the parser failed ({type(exc).__name__})"


def orphan_fate(archive: Archive, key: str) -> str:
    """What start-up reconciliation will do with an orphan blob, in words, for `pacs check`."""
    parsed = _parse_blob(archive, key)
    if isinstance(parsed, tuple):
        return f"cannot be read as an instance ({parsed[1]}); reconciliation leaves it"
    if archive.find_location(parsed.sop_instance_uid) is not None:
        return ("a copy of an archived instance stored elsewhere; reconciliation leaves it "
                "(safe to delete once checked)")
    return ("`pacs serve` re-indexes it at start-up, unless the ingest rules refuse it "
            "(it is then logged and left)")


def check(archive: Archive, *, verify_hashes: bool = True) -> CheckReport:
    """Compare every index row with its blob (existence, size, SHA-256) and find orphans.

    A blob or blob folder that cannot be read is a problem reported for it; the check goes
    on with the others."""
    report = CheckReport()
    with archive.index.engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(sa.select(
            instances.c.sop_instance_uid, instances.c.blob_key, instances.c.size,
            instances.c.sha256))
        for uid, key, size, digest in rows:
            report.instances += 1
            try:
                problem = _blob_problem(archive, key, size, digest, verify_hashes)
            except StorageUnavailable as exc:
                report.unreadable[uid] = str(exc)
                continue
            if problem:
                getattr(report, problem).append(uid)
    report.orphans = list(orphans(archive, on_error=report.unreadable.__setitem__))
    report.orphan_fates = {key: orphan_fate(archive, key) for key in report.orphans}
    return report


def _blob_problem(archive: Archive, key: str, size: int, digest: str,
                  verify_hashes: bool) -> str | None:
    """``missing``, ``corrupt`` or None for one index row's blob."""
    actual_size = archive.blobs.size(key)
    if actual_size is None:
        return "missing"
    if actual_size != size:
        return "corrupt"
    if verify_hashes:
        hasher = hashlib.sha256()
        for chunk in archive.blobs.open_chunks(key):
            hasher.update(chunk)
        if hasher.hexdigest() != digest:
            return "corrupt"
    return None
