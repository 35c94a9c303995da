"""The index database: SQLAlchemy Core tables, engine set-up and migrations.

SQLite (WAL) by default, PostgreSQL by URL. The schema is created and upgraded by Alembic
(``storage/migrations``); ``open_index`` runs pending migrations before anything else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from storage.attributes import INTEGER_VRS, Level, level_attributes

metadata = sa.MetaData()
T = TypeVar("T")


def _attribute_columns(level: Level) -> list[sa.Column]:
    """Columns of the matching attributes of ``level`` (Text: malformed values still fit)."""
    columns: list[sa.Column] = []
    for attribute in level_attributes(level):
        if attribute.column in ("num_studies", "num_series", "num_instances"):
            continue  # counters are declared with NOT NULL and a default
        if attribute.keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            continue  # the level's unique key, declared with its table
        if attribute.vr in INTEGER_VRS:
            columns.append(sa.Column(attribute.column, sa.Integer))
        elif attribute.vr == "PN":
            columns += [
                sa.Column(attribute.column, sa.Text),
                sa.Column(attribute.column + "_ci", sa.Text),  # case-folded, for matching
                sa.Column(attribute.column + "_fold", sa.Text),  # accent-folded, fuzzy matching
            ]
        elif attribute.keyword in ("PatientID", "IssuerOfPatientID"):
            # Part of the patient's identity: '' rather than NULL so the unique key works.
            columns.append(sa.Column(attribute.column, sa.Text, nullable=False,
                                     server_default=""))
        else:
            columns.append(sa.Column(attribute.column, sa.Text))
    return columns


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer, nullable=False, server_default="0")


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


patients = sa.Table(
    "patients", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    *_attribute_columns(Level.PATIENT),
    _counter("num_studies"), _counter("num_series"), _counter("num_instances"),
    *_timestamps(),
    sa.UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_identity"),
)

studies = sa.Table(
    "studies", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patients.pk", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
    *_attribute_columns(Level.STUDY),
    # The Patient ID and issuer the study's first instance carried. The EMR may since have put
    # the study under another patient; later instances carrying this one still belong to it.
    # NULL for studies archived before this was kept.
    sa.Column("received_patient_id", sa.Text),
    sa.Column("received_issuer_of_patient_id", sa.Text),
    _counter("num_series"), _counter("num_instances"),
    *_timestamps(),
)

series = sa.Table(
    "series", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("study_pk", sa.Integer, sa.ForeignKey("studies.pk", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
    *_attribute_columns(Level.SERIES),
    _counter("num_instances"),
    *_timestamps(),
)

instances = sa.Table(
    "instances", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.pk", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    *_attribute_columns(Level.INSTANCE),
    sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
    sa.Column("blob_key", sa.String(255), nullable=False, unique=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    # JSON lists of [offset, length, ...] per frame; NULL when frames must be decoded.
    sa.Column("frames", sa.Text),
    # The instance's DICOM JSON (PS3.18 F), without Pixel Data; bulk values by reference.
    sa.Column("header", sa.Text, nullable=False),
    sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
)

# Share links (viewer.shares): one study reachable by a token that is stored only as its
# SHA-256. Not tied to the study row by a foreign key: a share outlives a study being deleted
# and sent again, and simply finds nothing while the study is gone.
shares = sa.Table(
    "shares", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    # Random; with the server secret it re-derives the token (and a generated PIN) so the
    # result slip can be printed again. A copy of the database alone does not open a share.
    sa.Column("nonce", sa.String(32), nullable=False),
    # "", "generated" (6 digits derived like the token), "birth-year" or "given".
    sa.Column("pin_kind", sa.String(16), nullable=False, server_default=""),
    sa.Column("pin_hash", sa.Text),  # scrypt$salt$hash
    sa.Column("pin_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("pin_retry_at", sa.DateTime(timezone=True)),
    sa.Column("locked_at", sa.DateTime(timezone=True)),
    sa.Column("allow_download", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_by", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("opened_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_opened_at", sa.DateTime(timezone=True)),
    sa.Column("last_opened_at", sa.DateTime(timezone=True)),
)

# ``created_by`` of the share a study gets when it is complete (``share_on_complete``).
AUTOMATIC_SHARE = "auto"

# Every use of a share: the page opened, a PIN tried, images viewed, files downloaded.
share_accesses = sa.Table(
    "share_accesses", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("share_pk", sa.Integer, sa.ForeignKey("shares.pk", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("address", sa.Text, nullable=False, server_default=""),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Column("session", sa.String(32), nullable=False, server_default=""),
)

# ---- EMR links (emr/): what the hospital record sends and what the archive answers back.

# Patients as the EMR knows them (ADT, orders). Separate from ``patients``, which holds the
# patients images arrived for; the EMR's corrections are copied there (storage.patients).
emr_patients = sa.Table(
    "emr_patients", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("patient_id", sa.String(64), nullable=False),  # the MRN
    sa.Column("issuer", sa.String(64), nullable=False, server_default=""),
    sa.Column("name", sa.Text, nullable=False, server_default=""),  # PN
    sa.Column("name_ci", sa.Text, nullable=False, server_default=""),
    sa.Column("name_fold", sa.Text, nullable=False, server_default=""),
    sa.Column("birth_date", sa.String(8), nullable=False, server_default=""),
    sa.Column("sex", sa.String(4), nullable=False, server_default=""),
    sa.Column("cccd", sa.String(32), nullable=False, server_default="", index=True),
    sa.Column("bhyt", sa.String(32), nullable=False, server_default="", index=True),
    sa.Column("address", sa.Text, nullable=False, server_default=""),
    sa.Column("phone", sa.String(64), nullable=False, server_default=""),
    # Set when an ADT merge made this record part of another: it is kept for the history.
    sa.Column("merged_into_pk", sa.Integer, sa.ForeignKey("emr_patients.pk")),
    *_timestamps(),
    sa.UniqueConstraint("patient_id", "issuer", name="uq_emr_patients_identity"),
)

# Imaging orders: one requested procedure with its scheduled step, the Modality Worklist's
# source. Text columns hold DICOM forms (PN, YYYYMMDD, HHMMSS).
orders = sa.Table(
    "orders", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("accession_number", sa.String(64), nullable=False, unique=True),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("emr_patients.pk"), nullable=False,
              index=True),
    sa.Column("status", sa.String(16), nullable=False),
    *(sa.Column(name, sa.Text, nullable=False, server_default="") for name in (
        "placer_order_number", "filler_order_number", "requested_procedure_id",
        "scheduled_step_id", "modality", "station_ae_title", "station_name", "scheduled_date",
        "scheduled_time", "procedure_code", "procedure_code_system", "procedure_description",
        "reason", "priority", "referring_physician", "performing_physician", "body_part",
        "study_instance_uid", "source")),
    *_timestamps(),
)

# Which order each arrived study belongs to; ``state`` "unmatched" is the queue staff resolve.
study_links = sa.Table(
    "study_links", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("order_pk", sa.Integer, sa.ForeignKey("orders.pk"), index=True),
    sa.Column("state", sa.String(16), nullable=False),  # linked | unmatched | dismissed
    sa.Column("reason", sa.Text, nullable=False, server_default=""),  # how linked, or why not
    *_timestamps(),
)

# Modality Performed Procedure Steps (N-CREATE / N-SET) as the modality reported them.
performed_steps = sa.Table(
    "performed_steps", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("order_pk", sa.Integer, sa.ForeignKey("orders.pk"), index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, server_default=""),
    sa.Column("attributes", sa.Text, nullable=False),  # DICOM JSON of what was sent
    *_timestamps(),
)

# The outbox: every result message owed to an EMR destination, until it is delivered.
deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("pk", sa.Integer, primary_key=True),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # hl7 | fhir
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("payload", sa.Text, nullable=False),
    # pending | delivered | failed (refused, or out of attempts) | superseded
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    *_timestamps(),
)

# The server node sending a destination's deliveries for now. Several nodes on one database
# each run an outbox: a destination is served by one of them at a time, so each message goes
# out once and in the order written; a node that stops or dies lets the lease lapse.
outbox_leases = sa.Table(
    "outbox_leases", metadata,
    sa.Column("destination", sa.Text, primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

TABLES = {Level.PATIENT: patients, Level.STUDY: studies, Level.SERIES: series,
          Level.INSTANCE: instances}


def _pattern_index(name: str, table: sa.Table, column: str) -> sa.Index:
    # Prefix LIKE ('Nguyễn%') can use a b-tree index: on PostgreSQL only with text_pattern_ops
    # when the database collation is not "C"; SQLite needs case_sensitive_like (set below).
    return sa.Index(name, table.c[column], postgresql_ops={column: "text_pattern_ops"})


_pattern_index("ix_patients_patient_id", patients, "patient_id")
_pattern_index("ix_patients_patient_name_ci", patients, "patient_name_ci")
_pattern_index("ix_patients_patient_name_fold", patients, "patient_name_fold")
sa.Index("ix_studies_study_date", studies.c.study_date)
_pattern_index("ix_studies_accession_number", studies, "accession_number")
sa.Index("ix_series_modality", series.c.modality)
sa.Index("ix_instances_sop_class_uid", instances.c.sop_class_uid)
sa.Index("ix_share_accesses_at", share_accesses.c.at)
# One automatic share per study, even when two nodes complete the study at the same moment.
sa.Index("uq_shares_automatic", shares.c.study_instance_uid, unique=True,
         sqlite_where=shares.c.created_by == AUTOMATIC_SHARE,
         postgresql_where=shares.c.created_by == AUTOMATIC_SHARE)
_pattern_index("ix_emr_patients_name_fold", emr_patients, "name_fold")
_pattern_index("ix_emr_patients_name_ci", emr_patients, "name_ci")
sa.Index("ix_orders_worklist", orders.c.status, orders.c.scheduled_date)
sa.Index("ix_study_links_state", study_links.c.state)
sa.Index("ix_deliveries_due", deliveries.c.state, deliveries.c.next_attempt_at)


class Index:
    """The index database: an engine plus the few rules every transaction follows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time anyway; taking a lock first avoids SQLITE_BUSY
        # retries, whose back-off sleeps (1 ms and up) cost more than a whole transaction.
        self._write_lock = (_SqliteWriterLock(engine.url.database) if self.is_sqlite
                            else contextlib.nullcontext())
        self._sql_cache: dict[str, str] = {}

    @contextlib.contextmanager
    def write(self, *, when_busy: Callable[[], object] | None = None) -> Iterator[RawCursor]:
        """A write transaction: committed when the block ends, rolled back on error.

        Writes are plain SQL on the DBAPI connection (see ``RawCursor``): the ingest path runs
        a handful of one-row statements per instance, and SQLAlchemy's execution layer cost
        several times what the database needs for them.

        ``when_busy`` is called, before waiting, when SQLite's one writer slot is taken: a
        writer whose transaction would wait for something (the ingest path: its blob's fsync)
        waits for it there instead, so the slot is not held through that wait while others
        queue for it.
        """
        with _writer_slot(self._write_lock, when_busy):
            dbapi_connection = self.engine.raw_connection()
            try:
                cursor = RawCursor(self, dbapi_connection.cursor())
                if self.is_sqlite:
                    cursor.execute("BEGIN IMMEDIATE")  # PostgreSQL's driver begins by itself
                try:
                    yield cursor
                except BaseException:
                    # A failed rollback means a broken connection: the pool discards it.
                    with contextlib.suppress(self.engine.dialect.dbapi.Error):
                        dbapi_connection.rollback()
                    raise
                cursor.commit(dbapi_connection)
            finally:
                dbapi_connection.close()  # back to the pool

    @contextlib.contextmanager
    def write_core(self) -> Iterator[Connection]:
        """A write transaction for SQLAlchemy Core statements (the low-volume tables: shares,
        their access log), taking the write lock up front like ``write``."""
        with self._write_lock, self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (one consistent snapshot)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def first(self, statement: sa.Executable, params: dict | None = None) -> sa.Row | None:
        """The first row of one statement, run without an explicit transaction (cheapest read)."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn.execution_options(sqlite_begin=None)
            return conn.execute(statement, params or {}).first()

    def dispose(self) -> None:
        self.engine.dispose()
        if isinstance(self._write_lock, _SqliteWriterLock):
            self._write_lock.close()

    def raw_first(self, sql: str, params: Sequence[Any]) -> tuple | None:
        """The first row of one plain-SQL query, outside any transaction (cheapest read)."""
        dbapi_connection = self.engine.raw_connection()
        try:
            row = RawCursor(self, dbapi_connection.cursor()).execute(sql, params).fetchone()
            if not self.is_sqlite:
                dbapi_connection.rollback()  # psycopg opened a transaction for the SELECT
            return row
        finally:
            dbapi_connection.close()

    def timestamp(self, moment: dt.datetime) -> Any:
        """``moment`` as a DBAPI parameter for a ``DateTime`` column, stored the way SQLAlchemy
        stores it (SQLite: text without the zone, always UTC here)."""
        if self.is_sqlite:
            return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return moment

    def _native_sql(self, sql: str) -> str:
        native = self._sql_cache.get(sql)
        if native is None:
            native = sql if self.is_sqlite else sql.replace("?", "%s")
            self._sql_cache[sql] = native
        return native


@contextlib.contextmanager
def _writer_slot(lock: _SqliteWriterLock | contextlib.nullcontext,
                 when_busy: Callable[[], object] | None) -> Iterator[None]:
    if when_busy is None or not isinstance(lock, _SqliteWriterLock):
        with lock:
            yield
        return
    if not lock.try_acquire():
        when_busy()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _SqliteWriterLock:
    """The right to write to one SQLite database: a lock between this process's threads, and
    an advisory file lock between the processes that share the file (DICOM workers, the CLI).
    A waiting writer wakes as soon as the lock is released, unlike SQLite's busy handler."""

    def __init__(self, database: str | None) -> None:
        self._threads = threading.Lock()
        self._fd: int | None = None
        if database and database != ":memory:":
            self._fd = os.open(f"{database}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                               0o600)

    def acquire(self) -> None:
        self._threads.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._threads.release()
                raise

    def try_acquire(self) -> bool:
        """Take the lock if no thread or process holds it; whether it was taken."""
        if not self._threads.acquire(blocking=False):
            return False
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._threads.release()
                return False
            except BaseException:
                self._threads.release()
                raise
        return True

    def release(self) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class RawCursor:
    """A DBAPI cursor for plain SQL written with ``?`` placeholders, portable between SQLite and
    PostgreSQL. Its errors are SQLAlchemy's, so callers handle one family of errors."""

    __slots__ = ("_index", "_cursor")

    def __init__(self, index: Index, cursor: Any) -> None:
        self._index = index
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        dbapi = self._index.engine.dialect.dbapi
        try:
            return self._cursor.execute(self._index._native_sql(sql), params)
        except dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, params, exc, dbapi.Error,
                                             hide_parameters=True) from exc

    def commit(self, dbapi_connection: Any) -> None:
        dbapi = self._index.engine.dialect.dbapi
        try:
            dbapi_connection.commit()
        except dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance("COMMIT", (), exc, dbapi.Error) from exc


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def stored_utc(value: dt.datetime | None) -> dt.datetime | None:
    """A DateTime read back from the index, zone-aware: SQLite returns naive ones, and
    everything stored here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def iso_seconds(value: dt.datetime | None) -> str | None:
    """A stored DateTime as ISO 8601 to the second (None stays None)."""
    value = stored_utc(value)
    return value.isoformat(timespec="seconds") if value is not None else None


def retry_on_conflict(work: Callable[[], T]) -> T:
    """Run ``work`` (a write transaction); once more if another connection inserted the same
    unique key at the same moment (PostgreSQL): the row exists then, and the second run finds
    and updates it instead of inserting."""
    try:
        return work()
    except sa.exc.IntegrityError:
        return work()


def create_engine(url: str, *, connections: int = 16, name: str = "pacs") -> Engine:
    """An engine with the settings this application relies on, for SQLite or PostgreSQL.

    With PostgreSQL the engine opens at most ``connections`` (requests beyond wait for a free
    one, up to a minute), reported to the server as ``application_name`` ``name``. Errors never
    quote their SQL parameters (``hide_parameters``): those are patient names and IDs, and
    database errors end up in logs."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, pool_size=32, max_overflow=32, pool_timeout=60, hide_parameters=True,
            connect_args={"timeout": 60, "check_same_thread": False},
        )
        _configure_sqlite(engine)
        return engine
    return sa.create_engine(url, pool_size=connections, max_overflow=0, pool_pre_ping=True,
                            pool_timeout=60, hide_parameters=True,
                            connect_args={"application_name": name[:63]})


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN itself (pysqlite's own is deferred
        # and emitted lazily, which breaks write transactions under concurrency).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer. synchronous=NORMAL: a commit is not fsynced
        # until checkpoint, so power loss may drop the last commits - but every blob is
        # fsynced before its row is written, and start-up reconciliation re-indexes blobs
        # without rows, so no acknowledged instance is lost.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # LIKE is case-sensitive (DICOM matching is; PN uses case-folded columns instead),
        # which also lets SQLite use indexes for prefix LIKE.
        cursor.execute("PRAGMA case_sensitive_like=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        if mode is not None:  # None: a single statement in SQLite's own autocommit
            conn.exec_driver_sql(f"BEGIN {mode}")


def run_migrations(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision (creates it on an empty database)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def open_index(url: str, *, migrate: bool = True, connections: int = 16,
               name: str = "pacs") -> Index:
    """Connect to the index database at ``url`` and apply pending migrations (``connections``
    and ``name``: see ``create_engine``)."""
    engine = create_engine(url, connections=connections, name=name)
    if migrate:
        run_migrations(engine)
    return Index(engine)


__all__ = ["AUTOMATIC_SHARE", "Index", "TABLES", "instances", "metadata", "open_index",
           "patients", "series", "share_accesses", "shares", "studies"]
