"""Several ``pacs serve`` nodes on one PostgreSQL database (ARCHITECTURE, "Scale"): what one
node does once must happen once whichever nodes do it at the same moment.

Each test runs two instances of a component on one fresh PostgreSQL schema, as two nodes
would (their own engine, their own connections), and has them act at once. Threads of one
process stand for the nodes: where a component serialises its work with a lock of its
process, the test gives each node a lock of its own, as separate processes would have.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import storage
from emr.model import OrderStatus
from emr.outbox import Outbox
from pacs.app import AUTO_SHARE, PacsServer
from pacs.settings import Settings
from storage.archive import Archive, open_archive
from storage.attributes import Level
from storage.index import create_engine, deliveries, open_index, shares
from storage.query import Query, find
from storage.shares import ShareStore
from tests.emr_peers import ProgrammableMllp
from tests.factory import Spec, ct_series, instance
from tests.test_emr import wait_for
from tests.test_emr_results import Pacs, _instances
from viewer import film
from viewer.film import ENCAPSULATED_PDF_STORAGE, store_film


@pytest.fixture
def database_url(fresh_postgres_url: str) -> str:
    return fresh_postgres_url.replace("postgresql://", "postgresql+psycopg://")


def at_once(*calls: Callable[[], object]) -> list[object]:
    """Run ``calls`` each in a thread of its own, released together; their results."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait(10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# ---------------------------------------------------------------------------- shares


@pytest.fixture
def two_archives(tmp_path, database_url) -> Iterator[list[Archive]]:
    archives = [open_archive(database_url, f"file://{tmp_path / 'blobs'}") for _ in range(2)]
    yield archives
    for archive in archives:
        archive.close()




@pytest.fixture
def two_servers(tmp_path, database_url) -> Iterator[list[PacsServer]]:
    """Two nodes' ``PacsServer`` (not running) sharing one database, blobs and secret."""
    nodes = [PacsServer(Settings(
        data_dir=tmp_path / name, database_url=database_url,
        storage_url=f"file://{tmp_path / 'blobs'}", secret_key="one secret for the site",
        hl7_port=0, dicom_workers=1, share_on_complete=True,
        share_on_complete_pin="generated")) for name in ("a", "b")]
    yield nodes
    for node in nodes:
        node.archive.close()


# Review: PacsServer._share_completed_study listed the study's automatic shares, then created
# one: two nodes completing the same study at once (its instances came to both) each found
# none and each made one, two QR codes for one patient.
def test_a_study_completed_on_two_nodes_at_once_gets_one_automatic_share(two_servers):
    first, second = two_servers
    studies = [Spec(patient_id=f"BN-NODES-{n}") for n in range(3)]
    for spec in studies:
        first.archive.store(instance(spec))

    for spec in studies:
        at_once(lambda uid=spec.study_uid: first._share_completed_study(uid),
                lambda uid=spec.study_uid: second._share_completed_study(uid))

    for spec in studies:
        made = first.shares.list(study_uid=spec.study_uid)
        assert [s.created_by for s in made] == [AUTO_SHARE], spec.study_uid
    # Completing again, on either node, keeps the one share.
    second._share_completed_study(studies[0].study_uid)
    assert len(second.shares.list(study_uid=studies[0].study_uid)) == 1


def test_a_wrong_pin_sent_to_two_nodes_at_once_is_tried_once(two_archives):
    """PIN attempts are counted in the database, one conditional UPDATE each: guesses sent
    to every node at once are not each tried, and the one tried counts once."""
    nodes = [ShareStore(archive.index, b"one secret for the site", pin_max_attempts=3)
             for archive in two_archives]
    spec = Spec(patient_id="BN-NODES-PIN")
    two_archives[0].store(instance(spec))
    share, _ = nodes[0].create(spec.study_uid, days=1, pin="1234")

    outcomes = at_once(*(lambda node=node, guess=guess: node.check_pin(share, guess)
                         for node in nodes for guess in ("1111", "2222", "3333")))

    assert sorted(o.outcome.value for o in outcomes) == ["wait"] * 5 + ["wrong"]
    assert nodes[1].get(share.id).pin_failures == 1


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_studies_that_had_two_automatic_shares_keep_both_and_one_stays_automatic(
        request, tmp_path, database):
    """Migration 0007 adds the index that keeps a second automatic share out; a study that
    already had two (made before it) keeps both, the newer one no longer called automatic."""
    url = (f"sqlite:///{tmp_path / 'index.sqlite'}" if database == "sqlite" else
           request.getfixturevalue("database_url"))
    engine = create_engine(url)
    try:
        _migrate(engine, "0006")
        moment = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
        with engine.begin() as conn:
            conn.execute(shares.insert(), [
                {"study_instance_uid": study, "token_sha256": f"{n:064x}", "nonce": "00",
                 "created_by": by, "created_at": moment, "expires_at": moment}
                for n, (study, by) in enumerate([("1.2.1", "auto"), ("1.2.1", "auto"),
                                                 ("1.2.1", "cli"), ("1.2.2", "auto")])])

        _migrate(engine, "head")

        with engine.begin() as conn:
            kept = conn.execute(sa.select(shares.c.study_instance_uid, shares.c.created_by)
                                .order_by(shares.c.pk)).all()
            assert [tuple(row) for row in kept] == [
                ("1.2.1", "auto"), ("1.2.1", "auto (duplicate)"), ("1.2.1", "cli"),
                ("1.2.2", "auto")]
            with pytest.raises(sa.exc.IntegrityError):
                conn.execute(shares.insert().values(
                    study_instance_uid="1.2.2", token_sha256="f" * 64, nonce="00",
                    created_by="auto", created_at=moment, expires_at=moment))
    finally:
        engine.dispose()


def _migrate(engine: sa.Engine, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(storage.__file__).parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


# ---------------------------------------------------------------------------- the outbox


@pytest.fixture
def two_outboxes(database_url) -> Iterator[list[Outbox]]:
    """Two nodes' outboxes (not sending) on one database; comparing two results' content
    takes a while, as it may on a busy node, so the nodes' transactions overlap."""
    def slow_content(payload: str) -> str:
        time.sleep(0.2)
        return payload

    indexes = [open_index(database_url), open_index(database_url)]
    yield [Outbox(index, {"hl7": lambda d, p: None}, contents={"hl7": slow_content})
           for index in indexes]
    for index in indexes:
        index.dispose()


# Review: Outbox.enqueue read the study's latest delivery, then wrote the new one. PostgreSQL
# runs two nodes' transactions side by side: both found the same earlier result, both wrote
# the new one, and the EMR received that result twice.
def test_the_same_result_enqueued_on_two_nodes_at_once_is_written_once(two_outboxes):
    first, second = two_outboxes
    destination = "mllp://emr:2575"
    first.enqueue(destination, "hl7", "1.2.9", "ORU 2 images")  # the study's earlier result

    ids = at_once(lambda: first.enqueue(destination, "hl7", "1.2.9", "ORU 3 images"),
                  lambda: second.enqueue(destination, "hl7", "1.2.9", "ORU 3 images"))

    assert ids[0] == ids[1]
    with first.index.read() as conn:
        states = conn.execute(sa.select(deliveries.c.payload, deliveries.c.state)
                              .order_by(deliveries.c.pk)).all()
    assert [tuple(row) for row in states] == [("ORU 2 images", "superseded"),
                                              ("ORU 3 images", "pending")]


def test_different_results_enqueued_on_two_nodes_at_once_leave_one_pending(two_outboxes):
    """A node that saw fewer images and one that saw them all report at once: one result
    is owed, the other superseded, whichever came second."""
    first, second = two_outboxes
    destination = "mllp://emr:2575"
    first.enqueue(destination, "hl7", "1.2.10", "ORU 1 image")

    at_once(lambda: first.enqueue(destination, "hl7", "1.2.10", "ORU 2 images"),
            lambda: second.enqueue(destination, "hl7", "1.2.10", "ORU 3 images"))

    pending = first.list(state="pending", study_uid="1.2.10")
    assert len(pending) == 1 and pending[0].payload in ("ORU 2 images", "ORU 3 images")


# ---------------------------------------------------------------------------- completion


def test_a_study_whose_images_came_to_two_nodes_is_reported_once_with_all_of_them(
        tmp_path, database_url):
    """Each node watches the instances it received: both complete the study, each reading
    all of it from the database, and the same result is owed once."""
    hl7_in = ProgrammableMllp().start()
    nodes = [Pacs(database_url, tmp_path / "pacs-data", [f"mllp://127.0.0.1:{hl7_in.port}"],
                  quiet=1.0) for _ in range(2)]
    try:
        nodes[0].order("NODES1", "BNN01")
        spec = Spec(patient_id="BNN01", accession="NODES1")
        slices = ct_series(spec, 6, size=16)
        at_once(lambda: [nodes[0].archive.store(data) for data in slices[0::2]],
                lambda: [nodes[1].archive.store(data) for data in slices[1::2]])

        wait_for(lambda: hl7_in.about("NODES1"), what="the result")
        time.sleep(2.5)  # both nodes' quiet periods pass
        results = hl7_in.about("NODES1")
        assert len(results) == 1
        assert _instances(results[0]) == "6"
        assert nodes[1].emr.orders.get("NODES1").status is OrderStatus.COMPLETED
    finally:
        for node in nodes:
            node.stop()
        hl7_in.stop()


# ---------------------------------------------------------------------------- films


# Review: films were numbered one at a time under a lock of the process: two films of one
# study stored at the same moment on two nodes got the same Instance Number.
def test_films_stored_at_once_on_two_nodes_get_distinct_instance_numbers(two_archives,
                                                                         monkeypatch):
    first, second = two_archives
    study = Spec()
    first.store(instance(study))
    # Each node is a process of its own: the lock between one process's threads is not
    # shared between them.
    node_locks = {id(first): threading.Lock(), id(second): threading.Lock()}
    current = threading.local()
    monkeypatch.setattr(film, "_FILM_STORES", _PerNodeLock(node_locks, current))

    def store(archive: Archive, n: int) -> Callable[[], object]:
        def run() -> object:
            current.node = id(archive)
            return store_film(archive, study.study_uid, b"%PDF-1.4 film " + str(n).encode())
        return run

    for n in range(0, 6, 2):
        at_once(store(first, n), store(second, n + 1))

    films = find(first.index, Query(Level.INSTANCE, {
        "StudyInstanceUID": study.study_uid, "SOPClassUID": ENCAPSULATED_PDF_STORAGE}))
    assert sorted(r["InstanceNumber"] for r in films) == [1, 2, 3, 4, 5, 6]


class _PerNodeLock(contextlib.AbstractContextManager):
    """A lock per node: the calling thread's node (``current.node``) picks which."""

    def __init__(self, locks: dict[int, threading.Lock], current: threading.local) -> None:
        self._locks = locks
        self._current = current

    def __enter__(self) -> None:
        self._locks[self._current.node].acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._locks[self._current.node].release()
