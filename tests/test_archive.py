"""The ingest path and its upkeep, on every index x blob backend combination."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from pydicom.uid import MRImageStorage

from storage.archive import StoreOutcome
from storage.attributes import Level
from storage.errors import (
    InstanceMismatch,
    InvalidInstance,
    NotFound,
    PatientConflict,
    StorageUnavailable,
)
from storage.parsing import parse_instance
from storage.patients import Demographics, reassign_study
from storage.query import Query, find
from tests.factory import Spec, dataset, instance, part10


def _study(archive, uid):
    rows = find(archive.index, Query(Level.STUDY, {"StudyInstanceUID": uid}))
    assert len(rows) == 1
    return rows[0]


def test_stored_instance_reads_back_byte_for_byte(archive):
    data = instance()
    result = archive.store(data)
    assert result.outcome is StoreOutcome.STORED
    assert not result.is_warning
    location = archive.location(result.sop_instance_uid)
    assert archive.read(location) == data
    assert location.size == len(data)


def test_read_ahead_gives_each_instance_in_order_within_its_bound(archive):
    """What C-GET and C-MOVE send from: every instance in order, a missing blob an error of its
    own instance only, never more read ahead than asked, nothing more read once stopped."""
    datas = [instance(Spec(instance_number=n + 1)) for n in range(6)]
    locations = [archive.location(archive.store(data).sop_instance_uid) for data in datas]
    archive.blobs.delete(locations[2].blob_key)
    started = []
    read = archive.read
    archive.read = lambda location: started.append(location) or read(location)

    got = []
    for location, data in archive.read_ahead(locations, count=3):
        if not got:
            assert len(started) <= 3  # the first one and at most two ahead
        try:
            got.append((location, data.result()))
        except StorageUnavailable as exc:
            assert locations[2].sop_instance_uid in str(exc)
            got.append((location, None))
    assert got == [(loc, None if n == 2 else datas[n]) for n, loc in enumerate(locations)]

    started.clear()
    for _, data in archive.read_ahead(locations, max_bytes=1):
        assert data.result() == datas[0]  # a budget smaller than one instance still reads one
        assert started == locations[:1]
        break
    reads = archive.read_ahead(locations, count=2)
    next(reads)
    reads.close()  # the caller stopped (a cancelled C-GET): what was not started is dropped
    archive._reads.submit(lambda: None).result()  # the reads already running have finished
    assert len(started) <= 1 + 2


def test_a_uid_archived_for_another_object_is_refused_not_kept_as_a_duplicate(archive):
    # Answered as a duplicate (a warning: "stored"), another study's image was lost unseen.
    spec = Spec()
    archive.store(instance(spec))
    for other, named in ((Spec(**{**spec.__dict__, "study_uid": Spec().study_uid,
                                  "patient_id": "OTHER77"}), "Study"),
                         (Spec(**{**spec.__dict__, "series_uid": Spec().series_uid}), "Series"),
                         (Spec(**{**spec.__dict__, "sop_class": MRImageStorage}), "SOP Class")):
        with pytest.raises(InstanceMismatch, match=f"other {named}"):
            archive.store(instance(other))
    assert _study(archive, spec.study_uid)["NumberOfStudyRelatedInstances"] == 1


def test_duplicate_is_kept_once_and_reported(archive):
    spec = Spec()
    first = instance(spec)
    changed = instance(Spec(**{**spec.__dict__, "study_description": "khác"}))
    archive.store(first)
    again = archive.store(changed)
    assert again.outcome is StoreOutcome.DUPLICATE_KEPT
    assert again.is_warning and "already stored" in again.message.lower()
    assert archive.read(archive.location(spec.sop_uid)) == first
    assert _study(archive, spec.study_uid)["NumberOfStudyRelatedInstances"] == 1


def test_replace_policy_replaces_the_copy_and_keeps_one_row(backend):
    archive = backend.open(duplicate_policy="replace")
    try:
        spec = Spec()
        first, second = instance(spec), instance(Spec(**{**spec.__dict__,
                                                         "series_description": "mới"}))
        archive.store(first)
        old_key = archive.location(spec.sop_uid).blob_key
        result = archive.store(second)
        assert result.outcome is StoreOutcome.REPLACED
        location = archive.location(spec.sop_uid)
        assert archive.read(location) == second
        assert not archive.blobs.exists(old_key)
        study = _study(archive, spec.study_uid)
        assert (study["NumberOfStudyRelatedInstances"], study["NumberOfStudyRelatedSeries"]) \
            == (1, 1)
    finally:
        archive.close()


def test_aggregates_follow_ingest_and_deletion(archive):
    study = Spec().study_uid
    ct_series, sr_series = Spec().series_uid, Spec().series_uid
    for n in range(3):
        archive.store(instance(study_uid=study, series_uid=ct_series, instance_number=n + 1))
    sr = Spec(study_uid=study, series_uid=sr_series, modality="SR",
              sop_class="1.2.840.10008.5.1.4.1.1.88.11")
    archive.store(instance(sr))
    row = _study(archive, study)
    assert row["ModalitiesInStudy"] == "CT\\SR"
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 4)
    patient = find(archive.index, Query(Level.PATIENT, {"PatientID": "BN0001"}))[0]
    assert (patient["NumberOfPatientRelatedStudies"], patient["NumberOfPatientRelatedSeries"],
            patient["NumberOfPatientRelatedInstances"]) == (1, 2, 4)

    sr_blob = archive.location(sr.sop_uid).blob_key
    assert archive.delete(Level.SERIES, sr_series) == 1
    row = _study(archive, study)
    assert row["ModalitiesInStudy"] == "CT"
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 3)
    assert archive.blobs.size(sr_blob) is None

    assert archive.delete(Level.STUDY, study) == 3
    assert find(archive.index, Query(Level.STUDY, {"StudyInstanceUID": study})) == []
    assert find(archive.index, Query(Level.PATIENT, {"PatientID": "BN0001"})) == []
    assert list(archive.blobs.iterate()) == []
    with pytest.raises(NotFound):
        archive.delete(Level.STUDY, study)


def _patients(archive):
    return [(r["PatientID"], r["NumberOfPatientRelatedInstances"])
            for r in find(archive.index, Query(Level.PATIENT, {}))]


def test_an_instance_of_another_patient_is_refused_from_the_study(archive):
    """Two patients in one study (a study UID reused by a modality, a patient corrected
    half-way): the second patient's images must not be shown as the first one's."""
    spec = Spec()
    archive.store(instance(spec))
    other = dict(study_uid=spec.study_uid, patient_id="OTHER", patient_name="Lê^Văn Tám")
    for series_uid in (spec.series_uid, None):  # the same series (remembered), a new one
        with pytest.raises(PatientConflict, match="differs from the study's patient") as refused:
            archive.store(instance(**other, **({"series_uid": series_uid} if series_uid else {})))
        assert "OTHER" not in str(refused.value) and "BN0001" not in str(refused.value)
    assert _patients(archive) == [("BN0001", 1)]
    assert len(list(archive.blobs.iterate())) == 1
    # The same patient, with or without an issuer, or with no Patient ID at all: accepted.
    archive.store(instance(study_uid=spec.study_uid, extra={"IssuerOfPatientID": "BV-HN"}))
    archive.store(instance(study_uid=spec.study_uid, series_uid=spec.series_uid, patient_id=""))
    assert _patients(archive) == [("BN0001", 3)]


def test_a_study_begun_without_a_patient_id_takes_one_patient_only(archive):
    spec = Spec(patient_id="")
    archive.store(instance(spec))
    archive.store(instance(study_uid=spec.study_uid, series_uid=spec.series_uid,
                           patient_id="BN-REPA"))
    for series_uid in (spec.series_uid, Spec().series_uid):
        with pytest.raises(PatientConflict):
            archive.store(instance(study_uid=spec.study_uid, series_uid=series_uid,
                                   patient_id="BN-REPB"))
    archive.store(instance(study_uid=spec.study_uid, patient_id="BN-REPA"))
    archive.store(instance(study_uid=spec.study_uid, patient_id=""))
    assert _study(archive, spec.study_uid)["NumberOfStudyRelatedInstances"] == 4


def test_a_conflicting_patient_id_is_filed_under_the_study_when_configured(archive):
    archive.accept_conflicting_patient_id = True
    spec = Spec()
    archive.store(instance(spec))
    archive.store(instance(study_uid=spec.study_uid, series_uid=spec.series_uid,
                           patient_id="OTHER", patient_name="Lê^Văn Tám"))
    assert _patients(archive) == [("BN0001", 2)]


def test_a_study_the_emr_moved_takes_instances_with_the_id_it_arrived_with(archive):
    """An emergency patient scanned as UNKNOWN-7, put under the real patient while the exam
    goes on: the modality's later images still say UNKNOWN-7."""
    spec = Spec(patient_id="UNKNOWN-7", patient_name="UNKNOWN^PATIENT")
    archive.store(instance(spec))
    reassign_study(archive, spec.study_uid, Demographics("BN0042", name="Vũ^Thị Lan"))
    archive.store(instance(study_uid=spec.study_uid, series_uid=spec.series_uid,
                           patient_id="UNKNOWN-7", patient_name="UNKNOWN^PATIENT"))
    archive.store(instance(study_uid=spec.study_uid, patient_id="UNKNOWN-7"))
    archive.store(instance(study_uid=spec.study_uid, patient_id="BN0042"))
    with pytest.raises(PatientConflict):
        archive.store(instance(study_uid=spec.study_uid, patient_id="BN0099"))
    assert _patients(archive) == [("BN0042", 4)]


def test_a_study_moved_by_another_process_is_not_refused_from_memory(backend):
    """A DICOM worker process remembers the study's patient for each series; the EMR's move
    happens in the main process. What the worker remembers must not refuse the images that
    now belong, and must not take those that no longer do."""
    worker, main = backend.open(), backend.open()
    try:
        spec = Spec(patient_id="UNKNOWN-8", patient_name="UNKNOWN^PATIENT")
        worker.store(instance(spec))  # the worker now remembers the series' parents
        reassign_study(main, spec.study_uid, Demographics("BN0043", name="Vũ^Văn Hải"))
        series = dict(study_uid=spec.study_uid, series_uid=spec.series_uid)
        for patient_id in ("BN0043", "UNKNOWN-8"):
            worker.store(instance(**series, patient_id=patient_id))
        with pytest.raises(PatientConflict):
            worker.store(instance(**series, patient_id="BN0099"))
        assert _patients(main) == [("BN0043", 3)]
    finally:
        worker.close()
        main.close()


def test_replacing_a_studys_only_instance_keeps_its_patient_and_the_check(backend):
    archive = backend.open(duplicate_policy="replace")
    try:
        spec = Spec(patient_id="UNKNOWN-9")
        archive.store(instance(spec))
        with pytest.raises(PatientConflict):  # the only instance, re-sent as another patient
            archive.store(instance(Spec(**{**spec.__dict__, "patient_id": "BN-KHAC"})))
        reassign_study(archive, spec.study_uid, Demographics("BN0044"))
        assert archive.store(instance(spec)).outcome is StoreOutcome.REPLACED  # sent again
        assert _patients(archive) == [("BN0044", 1)]  # the EMR's move stands
        moved = Spec(**{**spec.__dict__, "series_uid": Spec().series_uid})
        archive.store(instance(moved))  # the same instance, now in another series
        study = _study(archive, spec.study_uid)
        assert (study["NumberOfStudyRelatedInstances"], study["NumberOfStudyRelatedSeries"]) \
            == (1, 1)
        assert _patients(archive) == [("BN0044", 1)]
    finally:
        archive.close()


def test_invalid_instance_writes_nothing(archive):
    with pytest.raises(InvalidInstance):
        archive.store(b"not dicom at all, just text" * 10)
    assert list(archive.blobs.iterate()) == []
    assert find(archive.index, Query(Level.INSTANCE, {})) == []


def test_reconcile_indexes_blobs_left_without_rows(archive):
    spec = Spec()
    parsed = parse_instance(instance(spec))
    # What a crash between the blob write and the index commit leaves behind:
    archive.blobs.put(f"{spec.study_uid}/{spec.series_uid}/{spec.sop_uid}.dcm", parsed.data)
    archive.blobs.put("9.9/9.9/9.9.dcm", b"half a file")
    report = archive.reconcile()
    assert report.reindexed == 1
    assert list(report.unreadable) == ["9.9/9.9/9.9.dcm"]
    assert archive.read(archive.location(spec.sop_uid)) == parsed.data
    assert archive.reconcile().reindexed == 0  # idempotent


def test_a_reconciled_blob_without_file_meta_is_indexed_as_stored_again(archive):
    """A bare data set (no File Meta) is given one when parsed: the orphan was indexed with
    the size and hash of those bytes over the old ones, and failed the next check."""
    spec = Spec()
    full = instance(spec)
    bare = full[144 + int.from_bytes(full[140:144], "little"):]  # no preamble, no File Meta
    key = f"{spec.study_uid}/{spec.series_uid}/{spec.sop_uid}.dcm"
    archive.blobs.put(key, bare)
    assert archive.reconcile().reindexed == 1
    assert archive.check().clean
    stored = archive.read(archive.location(spec.sop_uid))
    assert stored[128:132] == b"DICM" and stored.endswith(bare)


def test_reconcile_goes_on_past_a_blob_the_rules_refuse(archive):
    spec = Spec()
    archive.store(instance(spec))
    intruder, other = Spec(study_uid=spec.study_uid, patient_id="BN-KHAC"), Spec()
    for orphan in (intruder, other):
        archive.blobs.put(f"{orphan.study_uid}/{orphan.series_uid}/{orphan.sop_uid}.dcm",
                          parse_instance(instance(orphan)).data)
    report = archive.reconcile()
    assert report.reindexed == 1 and archive.location(other.sop_uid) is not None
    assert "differs from the study's patient" in report.refused[
        f"{intruder.study_uid}/{intruder.series_uid}/{intruder.sop_uid}.dcm"]


def test_check_finds_missing_corrupt_and_orphan_blobs(archive):
    a, b = Spec(), Spec()
    archive.store(instance(a))
    archive.store(instance(b))
    assert archive.check().clean
    archive.blobs.delete(archive.location(a.sop_uid).blob_key)
    key_b = archive.location(b.sop_uid).blob_key
    data = bytearray(archive.blobs.get(key_b))
    data[-1] ^= 0xFF  # same size, different content
    archive.blobs.put(key_b, bytes(data))
    archive.blobs.put("1.2/3.4/5.6.dcm", b"stray")
    report = archive.check()
    assert report.missing == [a.sop_uid]
    assert report.corrupt == [b.sop_uid]
    assert report.orphans == ["1.2/3.4/5.6.dcm"]
    assert archive.check(verify_hashes=False).corrupt == []  # size alone cannot see it


def test_index_failure_reports_storage_unavailable_and_leaves_no_blob(archive):
    with archive.index.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE instances"))
    with pytest.raises(StorageUnavailable, match="index database"):
        archive.store(instance())
    assert list(archive.blobs.iterate()) == []


def test_blob_failure_reports_storage_unavailable_and_indexes_nothing(make_backend, tmp_path):
    archive = make_backend("sqlite-files").open()
    try:
        (tmp_path / "blobs" / ".tmp").rmdir()
        (tmp_path / "blobs" / ".tmp").write_bytes(b"")
        with pytest.raises(StorageUnavailable, match="cannot write"):
            archive.store(instance())
        assert find(archive.index, Query(Level.INSTANCE, {})) == []
    finally:
        archive.close()


def test_rejected_and_duplicate_instances_leave_no_temporary_files(make_backend, tmp_path):
    # The blob is staged (written and fsynced) while the header is parsed: a refusal or a
    # kept duplicate must drop it again.
    archive = make_backend("sqlite-files").open()
    try:
        data = instance()
        archive.store(data)
        assert archive.store(data).outcome is StoreOutcome.DUPLICATE_KEPT
        with pytest.raises(InvalidInstance):
            archive.store(b"\0" * 128 + b"DICM" + b"\x02\x00" * 500)
    finally:
        archive.close()  # waits for the staged writes and their clean-up
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []
    assert len(list((tmp_path / "blobs").rglob("*.dcm"))) == 1


def test_parallel_stores_keep_counts_exact_and_one_row_per_uid(archive):
    study, series_uids = Spec().study_uid, [Spec().series_uid for _ in range(4)]
    datas = [instance(study_uid=study, series_uid=series_uids[n % 4], instance_number=n)
             for n in range(80)]
    same_uid = Spec(study_uid=study, series_uid=series_uids[0])
    copies = [instance(same_uid) for _ in range(8)]
    barrier = threading.Barrier(8)

    def store_copy(data):
        barrier.wait()
        return archive.store(data).outcome

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(store_copy, copies))
        list(pool.map(archive.store, datas))
    assert outcomes.count(StoreOutcome.STORED) == 1
    assert outcomes.count(StoreOutcome.DUPLICATE_KEPT) == 7
    row = _study(archive, study)
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (4, 81)
    series_rows = find(archive.index, Query(Level.SERIES, {"StudyInstanceUID": study}))
    assert sorted(r["NumberOfSeriesRelatedInstances"] for r in series_rows) == [20, 20, 20, 21]


@pytest.mark.parametrize("name", ["sqlite-files", "postgres-files", "postgres-s3"])
def test_the_same_instance_stored_by_two_processes_at_once_loses_nothing(make_backend, name):
    """Two archives on one index and blob store stand for two processes (DICOM workers, a
    ``pacs import`` beside ``pacs serve``), whose per-UID locks are their own. The one that
    lost the race for the index row deleted the blob at their common key: the winner's,
    acknowledged. Every instance must end up indexed once, its blob present and intact."""
    backend = make_backend(name)
    first, second = backend.open(), backend.open()
    try:
        datas = [instance() for _ in range(30)]
        barrier = threading.Barrier(2)

        def store_all(archive):
            barrier.wait()
            outcomes = []
            for data in datas:
                try:
                    outcomes.append(archive.store(data).outcome)
                except StorageUnavailable:  # may be answered so; the sender sends again
                    outcomes.append(None)
            return outcomes

        with ThreadPoolExecutor(2) as pool:
            one, two = pool.map(store_all, (first, second))
        assert all(StoreOutcome.STORED in pair for pair in zip(one, two, strict=True))
        for data in datas:
            location = first.location(parse_instance(data).sop_instance_uid)
            assert first.read(location) == data  # present, and the bytes acknowledged
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("name", ["sqlite-files", "postgres-files", "postgres-s3"])
def test_one_uid_stored_with_other_bytes_by_two_processes_at_once_keeps_one_whole(
        make_backend, name):
    """Two processes (or nodes) store the same new instances at once, each with other bytes
    (another header length: other frame offsets). Both wrote the one key, a rename on disk, a
    PUT on S3, and the index row of the winner could describe the loser's bytes: ``pacs
    check`` found it corrupt and its frames were read at the wrong offsets."""
    backend = make_backend(name)
    first, second = backend.open(), backend.open()
    try:
        specs = [Spec() for _ in range(30)]

        def version(spec: Spec, comment: str) -> bytes:
            ds = dataset(spec)
            ds.ImageComments = comment
            return part10(ds)
        ones = [version(spec, "a") for spec in specs]
        twos = [version(spec, "second version, longer") for spec in specs]
        barrier = threading.Barrier(2)

        def store_all(archive, datas):
            barrier.wait()
            for data in datas:
                with contextlib.suppress(StorageUnavailable):  # the sender would send again
                    archive.store(data)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(store_all, (first, second), (ones, twos)))
        report = first.check()
        assert report.clean, report
        for spec, one, two in zip(specs, ones, twos, strict=True):
            assert first.read(first.location(spec.sop_uid)) in (one, two)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("name", ["sqlite-files", "sqlite-s3"])
def test_the_same_bytes_sent_again_then_a_failed_index_write_keep_the_stored_copy(
        make_backend, name, monkeypatch):
    """Review: on S3 (keys name the bytes) the same instance sent again under the replace
    policy has the stored copy's key; when the index write then failed (the database gone a
    moment), the failed store deleted that key: the acknowledged instance's blob."""
    archive = make_backend(name).open(duplicate_policy="replace")
    try:
        data = instance()
        uid = parse_instance(data).sop_instance_uid
        archive.store(data)

        def database_gone(*args, **kwargs):
            raise StorageUnavailable("the index database did not answer")
        monkeypatch.setattr(archive, "_index_instance", database_gone)
        with pytest.raises(StorageUnavailable):
            archive.store(data)
        monkeypatch.undo()

        assert archive.read(archive.location(uid)) == data
        assert archive.check().clean
    finally:
        archive.close()


def test_a_writer_that_finds_the_index_busy_waits_for_its_own_work_first(tmp_path):
    """SQLite has one writer at a time. A writer that finds the slot taken, here by another
    handle on the same file (as a DICOM worker process would hold it), is told so before it
    queues (the ingest path then waits for its blob's fsync outside the slot); one that finds
    it free is not."""
    from storage.index import open_index

    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    ours, theirs = open_index(url), open_index(url, migrate=False)
    events: list[str] = []
    try:
        with ours.write(when_busy=lambda: events.append("busy")) as cursor:
            cursor.execute("SELECT 1")
        assert events == []

        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with theirs.write():
                holding.set()
                release.wait(10)
                events.append("released")

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10)

        def when_busy() -> None:
            events.append("busy")
            release.set()  # our own work is done; the slot is freed meanwhile

        with ours.write(when_busy=when_busy) as cursor:
            events.append("writing")
            cursor.execute("SELECT 1")
        holder.join(10)
        assert events == ["busy", "released", "writing"]
    finally:
        ours.engine.dispose()
        theirs.engine.dispose()
