"""Archive upkeep: start-up reconciliation and the consistency check behind `pacs check`.

Both compare the blob store with the index without holding either in memory: blob keys and
indexed keys are two streams sorted byte-wise, merged in one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import sqlalchemy as sa

from storage.errors import InvalidInstance
from storage.index import instances
from storage.parsing import parse_instance

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

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans)


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


def orphans(archive: Archive) -> Iterator[str]:
    """Blob keys with no index row: a merge of two sorted streams, in constant memory."""
    indexed = _indexed_keys(archive)
    current = next(indexed, None)
    for key in archive.blobs.iterate():
        while current is not None and current < key:
            current = next(indexed, None)
        if current != key:
            yield key


def reconcile(archive: Archive) -> ReconcileReport:
    """Index the blobs a crash left without index rows (they were never acknowledged)."""
    report = ReconcileReport()
    for key in list(orphans(archive)):
        report.blobs_seen += 1
        try:
            parsed = parse_instance(archive.blobs.get(key))
        except (InvalidInstance, KeyError) as exc:
            report.unreadable[key] = str(exc)
            continue
        if archive.find_location(parsed.sop_instance_uid) is not None:
            report.superseded.append(key)  # a replace or a race that lost; the row is elsewhere
            continue
        try:
            archive.index_stored_blob(key, parsed)
        except InvalidInstance as exc:  # one blob the rules refuse must not stop the others
            report.refused[key] = str(exc)
            continue
        report.reindexed += 1
    if report.reindexed or report.superseded or report.unreadable or report.refused:
        log.warning("reconciliation: %d blob(s) re-indexed, %d superseded, %d unreadable, "
                    "%d refused", report.reindexed, len(report.superseded),
                    len(report.unreadable), len(report.refused))
    return report


def check(archive: Archive, *, verify_hashes: bool = True) -> CheckReport:
    """Compare every index row with its blob (existence, size, SHA-256) and find orphans."""
    report = CheckReport()
    with archive.index.engine.connect() as conn:
        rows = conn.execution_options(yield_per=1000).execute(sa.select(
            instances.c.sop_instance_uid, instances.c.blob_key, instances.c.size,
            instances.c.sha256))
        for uid, key, size, digest in rows:
            report.instances += 1
            actual_size = archive.blobs.size(key)
            if actual_size is None:
                report.missing.append(uid)
            elif actual_size != size:
                report.corrupt.append(uid)
            elif verify_hashes:
                hasher = hashlib.sha256()
                for chunk in archive.blobs.open_chunks(key):
                    hasher.update(chunk)
                if hasher.hexdigest() != digest:
                    report.corrupt.append(uid)
    report.orphans = list(orphans(archive))
    return report
