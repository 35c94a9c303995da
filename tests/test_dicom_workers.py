"""The DICOM server in several worker processes (``pacs.dimse.workers``).

Parallel associations are served by different processes sharing one index and blob store;
what they store reaches the main process (linking, completion); a worker that dies is
replaced; the workers never outlive the main process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest
import sqlalchemy as sa
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from storage.archive import StoreOutcome
from storage.index import patients, studies
from storage.patients import Demographics, reassign_study
from tests import dimse_client as client
from tests.conftest import POSTGRES_ADMIN_URL
from tests.factory import Spec, instance


def _children(pid: int) -> list[int]:
    """PIDs of the DICOM worker processes of server ``pid`` (not multiprocessing's helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def dataset(spec: Spec) -> pydicom.Dataset:
    """A data set as a modality would send it (with its file meta)."""
    return pydicom.dcmread(io.BytesIO(instance(spec)))


def _store(port: int, datas: list) -> list[int]:
    """Store data sets on one association; the statuses."""
    assoc = client.associate(port, [build_context(CTImageStorage)])
    try:
        return [assoc.send_c_store(ds).Status for ds in datas]
    finally:
        assoc.release()


def _patient_counts(archive) -> dict[str, tuple[int, int, int]]:
    with archive.index.read() as conn:
        rows = conn.execute(sa.select(patients.c.patient_id, patients.c.num_studies,
                                      patients.c.num_series, patients.c.num_instances))
        return {row[0]: tuple(row[1:]) for row in rows}


@pytest.mark.parametrize("backend", ["sqlite-files", "postgres-files"])
def test_archive_handles_of_several_processes_keep_one_consistent_index(backend, make_backend):
    """Two archive handles on one index (as two workers have): concurrent stores are all
    indexed once with exact counters, and a study moved through one handle is not put back
    under its old patient by the other's memory of the series."""
    where = make_backend(backend)
    first, second = where.open(), where.open()
    try:
        study = Spec(patient_id="BN-W1")
        specs = [Spec(patient_id="BN-W1", study_uid=study.study_uid,
                      series_uid=study.series_uid if n % 2 else Spec().series_uid,
                      instance_number=n + 1) for n in range(120)]
        datas = [instance(spec) for spec in specs]

        def store(args):
            archive, data = args
            return archive.store(data).outcome

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(store, [((first, second)[n % 2], data)
                                             for n, data in enumerate(datas)]))
        assert outcomes == [StoreOutcome.STORED] * 120
        assert _patient_counts(first)["BN-W1"] == (1, 61, 120)

        # The first handle remembers the series' parents; the second moves the study.
        reassign_study(second, study.study_uid,
                       Demographics("BN-W2", "", "Lê^Thị Hoa", "19900101", "F"))
        late = Spec(patient_id="BN-W1", study_uid=study.study_uid, series_uid=study.series_uid,
                    instance_number=500)
        assert first.store(instance(late)).outcome is StoreOutcome.STORED
        counts = _patient_counts(first)
        assert "BN-W1" not in counts  # the study stayed with its new patient
        assert counts["BN-W2"] == (1, 61, 121)
        with first.index.read() as conn:
            assert conn.execute(sa.select(studies.c.num_instances)).scalar_one() == 121
        assert first.check(verify_hashes=True).clean
    finally:
        first.close()
        second.close()


def _storescu_at_once(port: int, folders: list[Path], env: dict) -> list[int]:
    """One DCMTK storescu per folder, all at once (one association each); their exit codes.
    DCMTK rather than pynetdicom: stock pynetdicom's requestor now and then hands a response
    to its own reactor thread and waits out its DIMSE timeout, more often with several
    associations in one busy process."""
    senders = [subprocess.Popen(["storescu", "-aec", "PACS", "127.0.0.1", str(port),
                                 *map(str, sorted(folder.iterdir()))],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for folder in folders]
    for sender in senders:
        sender.communicate(timeout=120)
    return [sender.returncode for sender in senders]


def _study_folder(folder: Path, specs: list[Spec]) -> Path:
    folder.mkdir()
    for number, spec in enumerate(specs):
        (folder / f"{number:03d}.dcm").write_bytes(instance(spec))
    return folder


def test_parallel_associations_in_worker_processes(start_server, tmp_path, dcmtk_env):
    server = start_server(PACS_DICOM_WORKERS="2")
    health = httpx.get(server.http + "/healthz").json()
    assert health["dicom_workers"] == 2
    workers = _children(server.proc.pid)
    assert len(workers) == 2

    # Four associations at once, four studies: each stored exactly once, and each study
    # reaches the main process's linker (no order has these accession numbers).
    folders = []
    for n in range(4):
        study = Spec(accession=f"W-ACC-{n}", patient_id=f"BN-P{n}")
        folders.append(_study_folder(tmp_path / f"study{n}", [
            Spec(accession=study.accession, patient_id=study.patient_id,
                 study_uid=study.study_uid, series_uid=study.series_uid, instance_number=i + 1)
            for i in range(15)]))
    assert _storescu_at_once(server.dicom_port, folders, dcmtk_env) == [0] * 4
    found = httpx.get(server.http + "/dicomweb/studies?AccessionNumber=W-ACC-*").json()
    assert sorted(s["00201208"]["Value"][0] for s in found) == [15] * 4

    def queued() -> set[str]:
        rows = httpx.get(server.http + "/api/emr/unmatched").json()
        return {row["accession_number"] for row in rows}

    _wait(lambda: queued() == {f"W-ACC-{n}" for n in range(4)}, what="the unmatched queue")

    # A worker killed in the middle of nothing: the other one serves, a new one replaces it.
    os.kill(workers[0], signal.SIGKILL)
    assert _store(server.dicom_port, [dataset(Spec(accession="W-ACC-9"))]) == [0]
    _wait(lambda: len(_children(server.proc.pid)) == 2 and workers[0] not in
          _children(server.proc.pid), what="a replacement worker")
    _wait(lambda: server.log().count("ready (pid") >= 3, what="the replacement to be ready")
    assert "ended unexpectedly" in server.log()
    statuses = []
    for _ in range(4):  # whichever worker takes each association, it stores
        statuses += _store(server.dicom_port, [dataset(Spec(accession="W-ACC-10"))])
    assert statuses == [0] * 4
    assert httpx.get(server.http + "/healthz").json()["status"] == "ok"


def _associations_per_worker(workers: list[int], port: int) -> list[int]:
    """How many established connections on ``port`` each worker process holds."""
    established = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            established.add(f"socket:[{fields[9]}]")
    counts = []
    for pid in workers:
        fds = Path(f"/proc/{pid}/fd")
        counts.append(sum(os.readlink(fd) in established for fd in fds.iterdir()))
    return counts


def test_associations_go_to_the_least_busy_worker(start_server):
    """Every worker wakes for a new connection; the one serving fewer associations takes it,
    whether they arrive one by one or at once."""
    server = start_server(PACS_DICOM_WORKERS="2")
    workers = _children(server.proc.pid)
    _wait(lambda: server.log().count("ready (pid") == 2, what="both workers to accept")
    opened = []
    try:
        for n in range(6):
            opened.append(client.associate(server.dicom_port, [build_context(CTImageStorage)]))
            _wait(lambda n=n: sum(_associations_per_worker(workers, server.dicom_port)) == n + 1,
                  timeout=10, what="the association to be served")
            counts = _associations_per_worker(workers, server.dicom_port)
            assert max(counts) - min(counts) <= 1, counts
        for assoc in opened[:4]:  # the two left may be on one worker
            assoc.release()
        opened = opened[4:]
        _wait(lambda: sum(_associations_per_worker(workers, server.dicom_port)) == 2,
              timeout=10, what="the releases")
        with ThreadPoolExecutor(max_workers=6) as pool:
            opened += pool.map(lambda _: client.associate(
                server.dicom_port, [build_context(CTImageStorage)]), range(6))
        _wait(lambda: sum(_associations_per_worker(workers, server.dicom_port)) == 8,
              timeout=10, what="the associations opened at once")
        counts = _associations_per_worker(workers, server.dicom_port)
        assert max(counts) - min(counts) <= 2, counts  # ties are taken by either
    finally:
        for assoc in opened:
            assoc.release()


def test_workers_end_with_the_main_process(start_server, tmp_path):
    server = start_server(PACS_DICOM_WORKERS="2")
    workers = _children(server.proc.pid)
    assert len(workers) == 2
    # Keep an association open while the main process is killed.
    assoc = client.associate(server.dicom_port, [build_context(CTImageStorage)])
    try:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        _wait(lambda: not any(_alive(pid) for pid in workers), timeout=10,
              what="the workers to end")
    finally:
        assoc.abort()
    # Nothing holds the port: the server starts again on it and serves.
    server.start()
    assert client.echo(server.dicom_port) == 0
    assert _store(server.dicom_port, [dataset(Spec())]) == [0]


def test_graceful_stop_ends_every_worker(start_server):
    server = start_server(PACS_DICOM_WORKERS="3")
    workers = _children(server.proc.pid)
    assert len(workers) == 3
    assert server.stop() == 0
    assert not any(_alive(pid) for pid in workers)
    assert "did not stop in time" not in server.log()
    assert "ended unexpectedly" not in server.log()


def test_postgres_connections_stay_within_the_configured_budget(start_server, fresh_postgres_url,
                                                                dcmtk_env, tmp_path):
    """Every process opens at most its share of ``database_connections`` (named, so a DBA can
    tell them apart): parallel associations beyond it wait for a connection, none fails."""
    server = start_server(PACS_DICOM_WORKERS="2", PACS_DATABASE_URL=fresh_postgres_url,
                          PACS_DATABASE_CONNECTIONS="16")
    folders = []
    for n in range(12):
        study = Spec(patient_id=f"BN-C{n}")
        folders.append(_study_folder(tmp_path / f"study{n}", [
            Spec(patient_id=study.patient_id, study_uid=study.study_uid,
                 series_uid=study.series_uid, instance_number=i + 1) for i in range(10)]))
    prefix = f"pacs-{server.proc.pid}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"))
    seen: dict[str, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with admin.connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT application_name, count(*) FROM pg_stat_activity"
                    " WHERE application_name LIKE :prefix GROUP BY application_name"),
                    {"prefix": prefix + "%"})
                for name, count in rows:
                    seen[name] = max(seen.get(name, 0), count)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        exit_codes = _storescu_at_once(server.dicom_port, folders, dcmtk_env)
    finally:
        done.set()
        watcher.join()
        admin.dispose()
    assert exit_codes == [0] * 12
    found = httpx.get(server.http + "/dicomweb/studies?PatientID=BN-C*").json()
    assert sorted(s["00201208"]["Value"][0] for s in found) == [10] * 12
    # 16 = 8 for the main process + 4 for each of the two workers.
    workers = {name: count for name, count in seen.items() if "-dicom-" in name}
    assert len(workers) == 2 and max(workers.values()) <= 4, seen
    assert seen.get(prefix, 0) <= 8, seen
