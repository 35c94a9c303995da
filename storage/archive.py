"""The archive: the one way instances get in (``Archive.store``), and the upkeep around it.

``store`` parses and checks the header, writes the blob durably, then commits the index rows in
one transaction, and only then reports success. The same SOP Instance UID offered again is kept
or replaced by the configured policy and reported as a warning, never indexed twice.
``reconcile`` (run at start-up) re-indexes blobs that a crash left without index rows; ``check``
verifies every row against its blob.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from storage import upkeep
from storage.attributes import Level, index_values
from storage.blobs import BlobStore, StagedBlob
from storage.errors import (
    BlobExists,
    InstanceMismatch,
    InvalidInstance,
    NotFound,
    PatientConflict,
    StorageUnavailable,
)
from storage.index import Index, RawCursor, instances, patients, series, studies
from storage.parsing import ParsedInstance, parse_instance
from storage.upkeep import CheckReport, ReconcileReport

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("keep", "replace")
READ_AHEAD_BYTES = 64 * 1024 * 1024  # most a retrieve holds read ahead of what it sends


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE_KEPT = "duplicate-kept"  # same SOP Instance UID already archived; new copy dropped
    REPLACED = "replaced"  # same SOP Instance UID already archived; new copy replaced it


@dataclasses.dataclass(frozen=True)
class StoreResult:
    """What happened to one offered instance. No patient data, so it is safe to log."""

    outcome: StoreOutcome
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str

    @property
    def is_warning(self) -> bool:
        return self.outcome is not StoreOutcome.STORED

    @property
    def message(self) -> str:
        # Short: it becomes a DIMSE ErrorComment (64 characters at most).
        if self.outcome is StoreOutcome.DUPLICATE_KEPT:
            return "Instance already stored; kept the first copy"
        if self.outcome is StoreOutcome.REPLACED:
            return "Instance already stored; replaced the stored copy"
        return "Stored"


@dataclasses.dataclass(frozen=True)
class InstanceLocation:
    """Where an indexed instance's bytes are, for retrieval."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int


StoreListener = Callable[[StoreResult], None]
_NOT_STORED = object()  # Archive._stored_meanwhile: no one stored the instance
# Called with the Study Instance UIDs a deletion removed entirely.
DeletionListener = Callable[[list[str]], None]


def blob_key(parsed: ParsedInstance) -> str:
    """Key of an instance's blob: one folder per study and series (UIDs are digits and dots)."""
    return f"{parsed.study_instance_uid}/{parsed.series_instance_uid}/{parsed.sop_instance_uid}.dcm"


def _with_digest(key: str, digest: str) -> str:
    """``key`` made to name these bytes only: ``…/SOP.<12 hex of their SHA-256>.dcm``."""
    return f"{key[:-4]}.{digest[:12]}.dcm"


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The index rows of one instance, computed from its header before the transaction."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def _rows(parsed: ParsedInstance, key: str, digest: str) -> _Rows:
    header = parsed.header
    patient = index_values(Level.PATIENT, header)
    patient["patient_id"] = patient["patient_id"] or ""
    patient["issuer_of_patient_id"] = patient["issuer_of_patient_id"] or ""
    instance = {
        **index_values(Level.INSTANCE, header),
        "transfer_syntax_uid": parsed.transfer_syntax,
        "blob_key": key,
        "size": len(parsed.data),
        "sha256": digest,
        "frames": None if parsed.frames is None else json.dumps(parsed.frames,
                                                              separators=(",", ":")),
        "header": json.dumps(header, ensure_ascii=False, separators=(",", ":")),
    }
    study = {**index_values(Level.STUDY, header),
             "received_patient_id": patient["patient_id"],
             "received_issuer_of_patient_id": patient["issuer_of_patient_id"]}
    return _Rows(patient, study, index_values(Level.SERIES, header), instance)


# (Patient ID, issuer) pairs.
_Identity = tuple[str, str]


def _same_patient(identity: _Identity, study_identities: tuple[_Identity, ...]) -> bool:
    """Whether an instance's patient may be filed in a study known under ``study_identities``
    (the patient it is filed under now, and the one its first instance carried).

    An ID that is empty on either side cannot conflict; an issuer only when both sides give
    one (most modalities send none)."""
    patient_id, issuer = identity
    known = [(i, s) for i, s in study_identities if i]
    if not patient_id or not known:
        return True
    return any(patient_id == i and (not issuer or not s or issuer == s) for i, s in known)


# The per-instance statements, as plain SQL run on the DBAPI cursor (``Index.raw``).
_SQL_FIND_LOCATION = ("SELECT sop_instance_uid, sop_class_uid, transfer_syntax_uid, blob_key, size"
                      " FROM instances WHERE sop_instance_uid = ?")
_SQL_FIND_PARENTS = ("SELECT st.study_instance_uid, se.series_instance_uid FROM instances i"
                     " JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk"
                     " WHERE i.sop_instance_uid = ?")
# The counter updates name the parent too: a remembered (patient, study, series) that a merge,
# a move or a deletion in another process made stale then updates nothing, and is looked up again.
_SQL_BUMP_SERIES = ("UPDATE series SET num_instances = num_instances + 1, updated_at = ?"
                    " WHERE pk = ? AND study_pk = ?")
_SQL_BUMP_STUDY = ("UPDATE studies SET num_instances = num_instances + 1,"
                   " num_series = num_series + ?, updated_at = ? WHERE pk = ? AND patient_pk = ?")
_SQL_BUMP_PATIENT = ("UPDATE patients SET num_instances = num_instances + 1,"
                     " num_series = num_series + ?, num_studies = num_studies + ?,"
                     " updated_at = ? WHERE pk = ?")
_SQL_FIND_SERIES = "SELECT pk, study_pk FROM series WHERE series_instance_uid = ?"
_SQL_FIND_STUDY = "SELECT pk, patient_pk FROM studies WHERE study_instance_uid = ?"
_SQL_FIND_PATIENT = "SELECT pk FROM patients WHERE patient_id = ? AND issuer_of_patient_id = ?"
_SQL_STUDY_PATIENT = "SELECT patient_pk FROM studies WHERE pk = ?"
_SQL_FIRST_PATIENT_ID = ("UPDATE studies SET received_patient_id = ?,"
                         " received_issuer_of_patient_id = ? WHERE pk = ?"
                         " AND COALESCE(received_patient_id, '') = ''")
_SQL_STUDY_IDENTITIES = ("SELECT patients.patient_id, patients.issuer_of_patient_id,"
                         " studies.received_patient_id, studies.received_issuer_of_patient_id"
                         " FROM studies JOIN patients ON studies.patient_pk = patients.pk"
                         " WHERE studies.pk = ?")
_SQL_SERIES_STUDY = "SELECT study_pk FROM series WHERE pk = ?"
_SQL_STUDY_MODALITIES = ("SELECT DISTINCT modality FROM series"
                         " WHERE study_pk = ? AND modality IS NOT NULL")
_SQL_SET_MODALITIES = "UPDATE studies SET modalities_in_study = ? WHERE pk = ?"
_SQL_INSTANCE_PK = "SELECT pk FROM instances WHERE sop_instance_uid = ?"
_SQL_INSTANCE_PARENTS = ("SELECT series.pk, studies.pk, studies.patient_pk FROM instances"
                         " JOIN series ON instances.series_pk = series.pk"
                         " JOIN studies ON series.study_pk = studies.pk WHERE instances.pk = ?")
_SQL_INSTANCES_UNDER = ("SELECT instances.pk, instances.blob_key, studies.study_instance_uid"
                        " FROM instances"
                        " JOIN series ON instances.series_pk = series.pk"
                        " JOIN studies ON series.study_pk = studies.pk WHERE ")
_SQL_INSERTS: dict[tuple[str, tuple[str, ...], bool], str] = {}


def _insert_sql(table: sa.Table, columns: tuple[str, ...], *, unless_exists: bool = False) -> str:
    """``INSERT`` of ``columns`` into ``table``; with ``unless_exists``, a row that would break a
    unique key is skipped and the new row's pk returned (SQLite 3.35+ and PostgreSQL)."""
    cache_key = (table.name, columns, unless_exists)
    sql = _SQL_INSERTS.get(cache_key)
    if sql is None:
        unknown = set(columns) - set(table.c.keys())
        if unknown:
            raise ValueError(f"not columns of {table.name}: {sorted(unknown)}")
        sql = (f"INSERT INTO {table.name} ({', '.join(columns)})"
               f" VALUES ({', '.join('?' * len(columns))})")
        if unless_exists:
            sql += " ON CONFLICT DO NOTHING RETURNING pk"
        _SQL_INSERTS[cache_key] = sql
    return sql


class Archive:
    """The archive: blob store plus index, and the rules that keep them consistent."""

    def __init__(self, index: Index, blobs: BlobStore, *, duplicate_policy: str = "keep",
                 accept_conflicting_patient_id: bool = False) -> None:
        if duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate_policy must be one of {DUPLICATE_POLICIES}")
        self.index = index
        self.blobs = blobs
        self.duplicate_policy = duplicate_policy
        # An instance whose Patient ID is not its study's: refused (PatientConflict), or filed
        # under the study's patient anyway.
        self.accept_conflicting_patient_id = accept_conflicting_patient_id
        self._listeners: list[StoreListener] = []
        self._deletion_listeners: list[DeletionListener] = []
        # Stores of the same SOP Instance UID are serialised so the policy is applied once.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        # series UID -> (patient pk, study pk, series pk, the study's patient identities):
        # saves four lookups per instance.
        self._series_cache: dict[str, tuple[int, int, int, tuple[_Identity, ...]]] = {}
        self._cache_lock = threading.Lock()
        # Blob writes (hash, write, fsync) run here while the calling thread prepares the
        # index rows: the fsync waits then overlap with Python work.
        self._io = ThreadPoolExecutor(max_workers=16, thread_name_prefix="blob-write")
        self._reads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blob-read")

    # ------------------------------------------------------------------ ingest

    def subscribe_deletions(self, listener: DeletionListener) -> None:
        """Call ``listener`` with the studies a deletion removed (exceptions are logged)."""
        self._deletion_listeners.append(listener)

    def subscribe(self, listener: StoreListener) -> None:
        """Call ``listener`` after each successful store (exceptions are logged, not raised)."""
        self._listeners.append(listener)

    def store(
        self,
        data: bytes,
        *,
        transfer_syntax: str | None = None,
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> StoreResult:
        """Archive one instance; return only once its blob and index rows are durable.

        ``expected_*`` are the UIDs a C-STORE request announced (or the study a STOW-RS request
        targets); a data set that disagrees is refused. Raises ``InvalidInstance`` (nothing
        written) or ``StorageUnavailable``.
        """
        # The blob's slow part (temporary file written and fsynced) starts now and overlaps with
        # parsing and the index work; it gets its name, or is dropped, once the header is read.
        staged = self._io.submit(self._stage_blob, data)
        try:
            parsed = parse_instance(data, transfer_syntax=transfer_syntax)
            for name, expected, actual in (
                ("SOP Class UID", expected_sop_class_uid, parsed.sop_class_uid),
                ("SOP Instance UID", expected_sop_instance_uid, parsed.sop_instance_uid),
                ("Study Instance UID", expected_study_instance_uid, parsed.study_instance_uid),
            ):
                if expected and expected.strip("\x00 ") != actual:
                    raise InstanceMismatch(
                        f"{name} differs: data set {actual}, request {expected}")
            if parsed.data is not data:  # the file meta was rewritten: stage those bytes
                _discard_staged(staged)
                staged = self._io.submit(self._stage_blob, parsed.data)
            uid = parsed.sop_instance_uid
            with self._uid_locks[hash(uid) % len(self._uid_locks)]:
                existing = self.find_location(uid)
                if existing is not None and self.duplicate_policy == "keep":
                    self._check_same_instance(parsed, existing)
                    log.info("duplicate %s: kept the stored copy", uid)
                    _discard_staged(staged)
                    return self._result(parsed, StoreOutcome.DUPLICATE_KEPT)
                key = blob_key(parsed)
                if self.blobs.remote:
                    # Never overwrite the acknowledged copy, nor one another process or node
                    # is storing (the lock above is this process's). An object store has no
                    # put-if-absent here, and two nodes storing one new UID with other bytes
                    # (another File Meta) would each write the key, the index row of one
                    # describing the other's bytes: the bytes' hash keeps them apart.
                    key = _with_digest(key, staged.result()[1])
                elif (existing is not None and existing.blob_key == key) or (
                        existing is None and self.blobs.exists(key)):
                    # On disk a file already there is seen, and a new file takes its name only
                    # if it is still free (``commit(new=True)``): a key of its own.
                    key = _with_digest(key, hashlib.sha256(parsed.data).hexdigest())
                written = self._io.submit(self._commit_blob, staged, key)
                staged = None  # from here on, failures delete the committed blob instead
                try:
                    self._index_instance(parsed, _rows(parsed, key, ""),
                                         replace=existing is not None, blob=written)
                except Exception as exc:
                    lost_key = isinstance(written.exception(), BlobExists)  # (waits for it)
                    raced = self._stored_meanwhile(uid, key) if existing is None else _NOT_STORED
                    if self._may_discard(key, existing, raced, exc, lost_key=lost_key):
                        self._discard_blob(key)
                    if isinstance(raced, InstanceLocation) and self.duplicate_policy == "keep":
                        log.info("duplicate %s: stored by another process meanwhile", uid)
                        return self._result(parsed, StoreOutcome.DUPLICATE_KEPT)
                    raise
                if existing is not None and existing.blob_key != key:  # not the same bytes
                    self._discard_blob(existing.blob_key)
        except BaseException:
            if staged is not None:
                _discard_staged(staged)
            raise
        outcome = StoreOutcome.REPLACED if existing is not None else StoreOutcome.STORED
        result = self._result(parsed, outcome)
        self.notify_stored(result)
        return result

    def _check_same_instance(self, parsed: ParsedInstance, existing: InstanceLocation) -> None:
        """A UID kept as a duplicate must name the same instance: one of another SOP class,
        series or study is another object given the same UID (a modality's UID generator
        gone wrong), and answered a duplicate it was lost without anyone knowing: refused."""
        try:
            row = self.index.raw_first(_SQL_FIND_PARENTS, (parsed.sop_instance_uid,))
        except sa.exc.SQLAlchemyError as exc:
            raise StorageUnavailable(f"the index database failed: {_db_error(exc)}") from exc
        stored = (existing.sop_class_uid, *(row or ("", "")))
        arrived = (parsed.sop_class_uid, parsed.study_instance_uid, parsed.series_instance_uid)
        differ = [name for name, a, b in zip(("SOP Class", "Study", "Series"), stored, arrived,
                                             strict=True) if a != b]
        if row is not None and differ:
            # The gist first: a C-STORE ErrorComment keeps 64 characters.
            raise InstanceMismatch(
                f"SOP Instance UID is another instance's (other {', '.join(differ)} UID): not "
                f"stored ({parsed.sop_instance_uid})")

    def _stored_meanwhile(self, uid: str, key: str) -> InstanceLocation | object | None:
        """After a failed store of a new ``uid`` at ``key``: where another process (a DICOM
        worker, a ``pacs import``, another node) stored it meanwhile; ``_NOT_STORED`` when no
        one did; None when the index cannot say. A blob an index row names must stay, even at
        this store's key, for that store was acknowledged; when unsure it stays too (an orphan
        is re-indexed at start-up, a deleted acknowledged blob is lost)."""
        try:
            found = self.find_location(uid)
        except StorageUnavailable:
            return None
        return _NOT_STORED if found is None else found

    def notify_stored(self, result: StoreResult) -> None:
        """Tell the listeners about a store (done by ``store``; also for the stores a DICOM
        worker process made, whose events reach the main process this way)."""
        for listener in self._listeners:
            try:
                listener(result)
            except Exception:
                log.exception("store listener %r failed", listener)

    def _stage_blob(self, data: bytes) -> tuple[StagedBlob, str]:
        """Hash ``data`` and start its durable write; the staged blob and its SHA-256 (hex)."""
        return self.blobs.stage(data), hashlib.sha256(data).hexdigest()

    @staticmethod
    def _commit_blob(staged: Future[tuple[StagedBlob, str]], key: str) -> str:
        """Make a staged blob durable under ``key``; its SHA-256 (hex)."""
        blob, digest = staged.result()
        blob.commit(key, new=True)
        return digest

    @staticmethod
    def _result(parsed: ParsedInstance, outcome: StoreOutcome) -> StoreResult:
        return StoreResult(outcome, parsed.sop_class_uid, parsed.sop_instance_uid,
                           parsed.study_instance_uid, parsed.series_instance_uid,
                           parsed.transfer_syntax)

    def _may_discard(self, key: str, existing: InstanceLocation | None, raced: Any,
                     exc: Exception, *, lost_key: bool) -> bool:
        """Whether a store that failed after writing its blob at ``key`` deletes it.

        Never the blob an index row names: the acknowledged copy (the same bytes sent again
        under the replace policy have its key on S3), or the one another process stored
        meanwhile at this key; nor one this store did not write (``lost_key``). With the UID
        archived at another key no row can name this one. With no row for the UID yet, on S3,
        where a key names its bytes, another node storing the same bytes may be about to
        commit its row naming it: only an instance the archive refused (``InvalidInstance``,
        which the same bytes would be too) is deleted there; after a passing failure (the
        database) the blob stays, re-indexed at start-up if the sender does not send it
        again."""
        if lost_key or (existing is not None and existing.blob_key == key) or raced is None:
            return False
        if isinstance(raced, InstanceLocation):
            return raced.blob_key != key
        return not self.blobs.remote or isinstance(exc, InvalidInstance)

    def _discard_blob(self, key: str) -> None:
        try:
            self.blobs.delete(key)
        except Exception:
            log.warning("could not delete blob %s; `pacs check` will report it", key)

    def _index_instance(self, parsed: ParsedInstance, rows: _Rows, *, replace: bool,
                        blob: Future[str] | None = None) -> None:
        """Write the index rows of a blob in one transaction.

        With ``blob`` (the pending durable write, giving the SHA-256), the rows are written
        while the blob is being fsynced and committed only after the write succeeded: the
        commit still follows durability, and the two waits overlap.
        """
        try:
            self._write_rows(parsed, rows, replace=replace, use_cache=True, blob=blob)
        except (sa.exc.IntegrityError, _StaleParents):
            # A cached series was deleted or moved meanwhile, or a concurrent writer raced
            # us: retry once from the database's own state.
            self._forget_series(parsed.series_instance_uid)
            try:
                self._write_rows(parsed, rows, replace=replace, use_cache=False, blob=blob)
            except sa.exc.SQLAlchemyError as exc:
                raise StorageUnavailable(f"the index database failed: {_db_error(exc)}") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StorageUnavailable(f"the index database failed: {_db_error(exc)}") from exc

    def _write_rows(self, parsed: ParsedInstance, rows: _Rows, *, replace: bool,
                    use_cache: bool, blob: Future[str] | None) -> None:
        now = dt.datetime.now(dt.UTC)
        stamp = self.index.timestamp(now)
        # The blob's write must be durable before the rows commit. When another writer holds
        # the index, wait for it before queueing (a writer holds the index until it commits).
        with self.index.write(when_busy=blob.exception if blob is not None else None) as cursor:
            # The copy replaced is counted out, but its parents stay until the new one is in:
            # in the same study (the usual case), the study keeps its patient (the EMR's,
            # perhaps) and the new copy is checked against it.
            replaced = None
            if replace:
                old = cursor.execute(_SQL_INSTANCE_PK, (parsed.sop_instance_uid,)).fetchone()
                if old is not None:
                    replaced = self._remove_instance_row(cursor, old[0], stamp)
            cached = (self._series_cache.get(parsed.series_instance_uid)
                      if use_cache and not replace else None)
            identity = (rows.patient["patient_id"], rows.patient["issuer_of_patient_id"])
            if cached is not None:
                patient_pk, study_pk, series_pk, study_identities = cached
                new_study = new_series = False
            else:
                patient_pk, new_study, study_pk, new_series, series_pk = self._parents(
                    cursor, parsed, rows, stamp)
                if new_study:
                    study_identities = (identity,)
                else:
                    row = cursor.execute(_SQL_STUDY_IDENTITIES, (study_pk,)).fetchone()
                    study_identities = ((row[0] or "", row[1] or ""), (row[2] or "", row[3] or ""))
            if not _same_patient(identity, study_identities):
                if cached is not None:  # the study may have moved since: ask the database
                    raise _StaleParents(parsed.series_instance_uid)
                self._patient_conflict(parsed)
            if identity[0] and not any(i for i, _ in study_identities):
                # The study's first Patient ID (its instances so far had none): from now on,
                # the study's. A concurrent writer that gave it another first: check again.
                if cursor.execute(_SQL_FIRST_PATIENT_ID, (*identity, study_pk)).rowcount != 1:
                    raise _StaleParents(parsed.series_instance_uid)
                study_identities = (*study_identities, identity)
            pending = blob
            if pending is not None and not self.index.is_sqlite:
                # Before the counters: on PostgreSQL their row locks are held until commit and
                # concurrent writers of the study wait for them. (SQLite's one writer slot is
                # held from the start anyway: there, the rows are written while the blob is.)
                rows.instance["sha256"] = pending.result()  # StorageUnavailable rolls back
                pending = None
            # Counters: child levels first, each row locked in the same order by every writer.
            bumped = cursor.execute(_SQL_BUMP_SERIES, (stamp, series_pk, study_pk)).rowcount
            bumped += cursor.execute(_SQL_BUMP_STUDY,
                                     (int(new_series), stamp, study_pk, patient_pk)).rowcount
            if bumped != 2:
                raise _StaleParents(parsed.series_instance_uid)
            if new_series:
                self._refresh_modalities(cursor, study_pk)
            cursor.execute(_SQL_BUMP_PATIENT, (int(new_series), int(new_study), stamp, patient_pk))
            if pending is not None:
                rows.instance["sha256"] = pending.result()  # StorageUnavailable rolls back
            values = {**rows.instance, "series_pk": series_pk, "stored_at": stamp}
            cursor.execute(_insert_sql(instances, tuple(values)), tuple(values.values()))
            if replaced is not None:  # the new copy went elsewhere: the old parents may be empty
                self._drop_empty_parents(cursor, *replaced, stamp)
        with self._cache_lock:
            if len(self._series_cache) > 10_000:
                self._series_cache.clear()
            self._series_cache[parsed.series_instance_uid] = (patient_pk, study_pk, series_pk,
                                                              study_identities)

    def _patient_conflict(self, parsed: ParsedInstance) -> None:
        """An instance whose Patient ID is not its study's: refused, unless configured to be
        filed under the study's patient. (Two patients in one study is how a study UID reused by
        a modality, or a patient picked wrongly and corrected half-way, shows itself.)"""
        where = f"instance {parsed.sop_instance_uid} of study {parsed.study_instance_uid}"
        if not self.accept_conflicting_patient_id:
            # The gist first: a C-STORE ErrorComment keeps 64 characters.
            raise PatientConflict(
                f"Patient ID differs from the study's patient: not stored ({where}). Correct "
                "the Patient ID at the sender, or move the study to this patient first")
        log.warning("%s carries another Patient ID than its study: filed under the study's "
                    "patient (accept_conflicting_patient_id)", where)

    def _parents(self, cursor: RawCursor, parsed: ParsedInstance, rows: _Rows,
                 stamp: Any) -> tuple[int, bool, int, bool, int]:
        """Patient, study and series rows of an instance, inserted where missing.

        An existing study keeps the patient it was first stored under, and an existing series
        its study: the first instance decides, later ones cannot move them.
        """
        found = cursor.execute(_SQL_FIND_SERIES, (parsed.series_instance_uid,)).fetchone()
        if found is not None:
            series_pk, study_pk = found
            patient_pk = cursor.execute(_SQL_STUDY_PATIENT, (study_pk,)).fetchone()[0]
            return patient_pk, False, study_pk, False, series_pk
        found = cursor.execute(_SQL_FIND_STUDY, (parsed.study_instance_uid,)).fetchone()
        if found is not None:
            study_pk, patient_pk = found
            new_study = False
        else:
            identity = (rows.patient["patient_id"], rows.patient["issuer_of_patient_id"])
            found = cursor.execute(_SQL_FIND_PATIENT, identity).fetchone()
            if found is not None:
                patient_pk = found[0]
            else:
                patient_pk, _ = self._insert(cursor, patients, rows.patient, stamp,
                                             _SQL_FIND_PATIENT, identity)
            study_pk, new_study = self._insert(
                cursor, studies, {**rows.study, "patient_pk": patient_pk}, stamp,
                _SQL_FIND_STUDY, (parsed.study_instance_uid,))
            if not new_study:  # a concurrent writer created it: it decides the patient
                patient_pk = cursor.execute(_SQL_STUDY_PATIENT, (study_pk,)).fetchone()[0]
        series_pk, new_series = self._insert(
            cursor, series, {**rows.series, "study_pk": study_pk}, stamp,
            _SQL_FIND_SERIES, (parsed.series_instance_uid,))
        if not new_series:
            study_pk = cursor.execute(_SQL_SERIES_STUDY, (series_pk,)).fetchone()[0]
            patient_pk = cursor.execute(_SQL_STUDY_PATIENT, (study_pk,)).fetchone()[0]
        return patient_pk, new_study, study_pk, new_series, series_pk

    @staticmethod
    def _insert(cursor: RawCursor, table: sa.Table, values: dict[str, Any], stamp: Any,
                find_sql: str, find_params: tuple) -> tuple[int, bool]:
        """Insert a row unless a concurrent writer just did: its key, and whether we did."""
        values = {**values, "created_at": stamp, "updated_at": stamp}
        inserted = cursor.execute(_insert_sql(table, tuple(values), unless_exists=True),
                                  tuple(values.values())).fetchone()
        if inserted is not None:
            return inserted[0], True
        return cursor.execute(find_sql, find_params).fetchone()[0], False

    @staticmethod
    def _refresh_modalities(cursor: RawCursor, study_pk: int) -> None:
        modalities = {row[0] for row in cursor.execute(_SQL_STUDY_MODALITIES, (study_pk,))}
        cursor.execute(_SQL_SET_MODALITIES, ("\\".join(sorted(modalities)) or None, study_pk))

    def forget_cached_parents(self) -> None:
        """Drop what the ingest path remembers of series' parents (after studies move)."""
        self._forget_series()

    def _forget_series(self, series_uid: str | None = None) -> None:
        with self._cache_lock:
            if series_uid is None:
                self._series_cache.clear()
            else:
                self._series_cache.pop(series_uid, None)

    # ------------------------------------------------------------------ lookups

    def find_location(self, sop_instance_uid: str) -> InstanceLocation | None:
        """Where an instance is stored, or None when it is not archived."""
        try:
            row = self.index.raw_first(_SQL_FIND_LOCATION, (sop_instance_uid,))
        except sa.exc.SQLAlchemyError as exc:
            raise StorageUnavailable(f"the index database failed: {_db_error(exc)}") from exc
        return InstanceLocation(*row) if row else None

    def location(self, sop_instance_uid: str) -> InstanceLocation:
        """Where an instance is stored (``NotFound`` if it is not)."""
        found = self.find_location(sop_instance_uid)
        if found is None:
            raise NotFound(f"no instance with SOP Instance UID {sop_instance_uid}")
        return found

    def read(self, location: InstanceLocation) -> bytes:
        """The stored Part 10 bytes of an instance."""
        try:
            return self.blobs.get(location.blob_key)
        except KeyError:
            raise StorageUnavailable(
                f"the blob of {location.sop_instance_uid} is missing; run `pacs check`") from None

    def read_ahead(self, locations: Iterable[InstanceLocation], *, count: int = 4,
                   max_bytes: int = READ_AHEAD_BYTES
                   ) -> Iterator[tuple[InstanceLocation, Future[bytes]]]:
        """Each location with the read of its blob (``Future.result()`` gives ``read``'s bytes
        or raises its error), reading up to ``count`` instances and ``max_bytes`` ahead (at
        least one): a retrieve sends one instance while the next are read, which with S3 are
        requests of their own. Reads not yet needed are cancelled when the caller stops."""
        pending: collections.deque[tuple[InstanceLocation, Future[bytes]]] = collections.deque()
        remaining = iter(locations)
        ahead = 0
        try:
            while True:
                for location in remaining:
                    pending.append((location, self._reads.submit(self.read, location)))
                    ahead += location.size or 0
                    if len(pending) >= count or ahead >= max_bytes:
                        break
                if not pending:
                    return
                location, data = pending.popleft()
                ahead -= location.size or 0
                yield location, data
        finally:
            for _, data in pending:
                data.cancel()

    # ------------------------------------------------------------------ deletion

    def delete(self, level: Level, uid: str) -> int:
        """Delete a study, series or instance (rows, then blobs); the number of instances."""
        column = {Level.STUDY: "studies.study_instance_uid",
                  Level.SERIES: "series.series_instance_uid",
                  Level.INSTANCE: "instances.sop_instance_uid"}[level]
        stamp = self.index.timestamp(dt.datetime.now(dt.UTC))
        with self.index.write() as cursor:
            rows = cursor.execute(_SQL_INSTANCES_UNDER + column + " = ?", (uid,)).fetchall()
            if not rows:
                raise NotFound(f"no {level.name.lower()} with UID {uid}")
            for pk, _, _ in rows:
                self._delete_instance_rows(cursor, pk, stamp)
            touched = sorted({study for _, _, study in rows})
            gone = [uid for uid in touched
                    if cursor.execute(_SQL_FIND_STUDY, (uid,)).fetchone() is None]
        self._forget_series()
        for _, key, _ in rows:
            self._discard_blob(key)
        for listener in self._deletion_listeners:
            try:
                listener(gone)
            except Exception:
                log.exception("deletion listener %r failed", listener)
        return len(rows)

    def _delete_instance_rows(self, cursor: RawCursor, instance_pk: int, stamp: Any) -> None:
        """Remove one instance row, fix the counters, and drop parents left empty."""
        self._drop_empty_parents(cursor, *self._remove_instance_row(cursor, instance_pk, stamp),
                                 stamp)

    @staticmethod
    def _remove_instance_row(cursor: RawCursor, instance_pk: int, stamp: Any
                             ) -> tuple[int, int, int]:
        """Remove one instance row and count it out of its series, study and patient, which
        stay even if empty; their keys."""
        parents = cursor.execute(_SQL_INSTANCE_PARENTS, (instance_pk,)).fetchone()
        cursor.execute("DELETE FROM instances WHERE pk = ?", (instance_pk,))
        for table, pk in zip(("series", "studies", "patients"), parents, strict=True):
            cursor.execute(f"UPDATE {table} SET num_instances = num_instances - 1,"
                           " updated_at = ? WHERE pk = ?", (stamp, pk))
        return parents

    def _drop_empty_parents(self, cursor: RawCursor, series_pk: int, study_pk: int,
                            patient_pk: int, stamp: Any) -> None:
        """Delete the series, study and patient left without instances, fixing the counters
        of those that stay."""
        left = cursor.execute("SELECT num_instances FROM series WHERE pk = ?",
                              (series_pk,)).fetchone()
        series_gone = left is not None and left[0] <= 0
        if series_gone:
            cursor.execute("DELETE FROM series WHERE pk = ?", (series_pk,))
        study_series = cursor.execute(
            "UPDATE studies SET num_series = num_series - ?, updated_at = ? WHERE pk = ?"
            " RETURNING num_series", (int(series_gone), stamp, study_pk)).fetchone()
        study_gone = study_series is not None and study_series[0] <= 0
        if study_gone:
            cursor.execute("DELETE FROM studies WHERE pk = ?", (study_pk,))
        elif series_gone:
            self._refresh_modalities(cursor, study_pk)
        patient_studies = cursor.execute(
            "UPDATE patients SET num_series = num_series - ?, num_studies = num_studies - ?,"
            " updated_at = ? WHERE pk = ? RETURNING num_studies",
            (int(series_gone), int(study_gone), stamp, patient_pk)).fetchone()
        if patient_studies is not None and patient_studies[0] <= 0:
            cursor.execute("DELETE FROM patients WHERE pk = ?", (patient_pk,))

    # ------------------------------------------------------------------ upkeep

    def reconcile(self) -> ReconcileReport:
        """Index the blobs a crash left without index rows (see ``storage.upkeep``)."""
        return upkeep.reconcile(self)

    def check(self, *, verify_hashes: bool = True) -> CheckReport:
        """Compare every index row with its blob and find orphans (see ``storage.upkeep``)."""
        return upkeep.check(self, verify_hashes=verify_hashes)

    def index_stored_blob(self, key: str, parsed: ParsedInstance) -> None:
        """Index a blob that is already durable under ``key`` (reconciliation). One whose File
        Meta parsing had to write (none, or stale) is first stored again as parsed: the row's
        size, hash and frame offsets are those of ``parsed.data``, which ``store`` would have
        kept; indexed over the old bytes, the instance failed ``pacs check`` and its frames."""
        if parsed.meta_rewritten:
            self.blobs.put(key, parsed.data)  # an orphan: no row names these bytes yet
        digest = hashlib.sha256(parsed.data).hexdigest()
        self._index_instance(parsed, _rows(parsed, key, digest), replace=False)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._reads.shutdown(wait=True, cancel_futures=True)
        self.index.dispose()


class _StaleParents(Exception):
    """The remembered parents of a series no longer match the index (rolled back, retried)."""


def _discard_staged(staged: Future[tuple[StagedBlob, str]]) -> None:
    """Drop a staged blob once its write has finished (a failed write left nothing)."""
    def discard(done: Future[tuple[StagedBlob, str]]) -> None:
        if done.exception() is None:
            done.result()[0].discard()
    staged.add_done_callback(discard)


def _db_error(exc: sa.exc.SQLAlchemyError) -> str:
    original = getattr(exc, "orig", None)
    return str(original or exc).splitlines()[0]


def open_archive(database_url: str, storage_url: str, *, duplicate_policy: str = "keep",
                 accept_conflicting_patient_id: bool = False, migrate: bool = True,
                 connections: int = 16, name: str = "pacs") -> Archive:
    """An archive over the index at ``database_url`` and the blob store at ``storage_url``
    (``connections``, ``name``: the index's, see ``storage.index.create_engine``)."""
    from storage.blobs import open_blob_store
    from storage.index import open_index

    index = open_index(database_url, migrate=migrate, connections=connections, name=name)
    return Archive(index, open_blob_store(storage_url), duplicate_policy=duplicate_policy,
                   accept_conflicting_patient_id=accept_conflicting_patient_id)
