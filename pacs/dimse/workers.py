"""DICOM worker processes: the DICOM server in several processes sharing one listening port.

pynetdicom and the ingest path are Python, so parallel associations in one process take turns
under one interpreter lock, on one core. ``pacs serve`` therefore binds the DICOM port once and
starts ``dicom_workers`` processes that accept on that socket, each with its own DICOM server
and archive handle on the shared index database and blob store. The worker serving the fewest
associations takes the next one (``AcceptLoad``): left to whichever wakes first, four
associations opened at once went three to one worker in 3 of 10 runs here, and the busy
worker's core then did three quarters of the work. SQLite writers of all processes take one
file lock (``storage.index``); the ingest path's memory of series' parents checks itself
against the index, so moves and deletions made elsewhere need no message.

What a worker does that the main process must know travels back over a pipe: every store
(``Archive.notify_stored``: study completion, linking to orders and automatic shares run in the
main process) and MPPS completions (``EmrService.step_performed``). A worker that dies is
replaced; the workers die with the main process, even when it is killed (``PR_SET_PDEATHSIG``),
so a restarted server finds the port free and no old worker accepting on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from pacs.settings import Settings
from storage.archive import Archive

log = logging.getLogger("pacs.dimse")

# Called in the main process with (Study Instance UID, MPPS status) when a modality completes
# or discontinues a procedure step on a worker.
PerformedListener = Callable[[str, str], None]

_STOP = "stop"
NOT_ACCEPTING = 1 << 30  # a worker's load while it is not accepting (starting, or gone)
ACCEPT_DEFERRAL = 0.05  # seconds a busier worker leaves a new connection to a less busy one
_PR_SET_PDEATHSIG = 1
_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before replacing a worker that died


@dataclasses.dataclass
class _Worker:
    number: int
    process: BaseProcess
    conn: Connection
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.monotonic)
    # Relays the worker's events, and is the only thread that waits for the process to end
    # (two threads waiting for one child race, and one of them sees it still running).
    relay: threading.Thread | None = None


class AcceptLoad:
    """How many associations each worker serves, in memory all workers share, so that the
    least busy worker takes the next connection.

    Every worker wakes for a new connection on the shared socket. One that serves more
    associations than another leaves it, for up to ``ACCEPT_DEFERRAL``, to the less busy one
    (which accepts at once), checking every millisecond whether it has been taken; after that
    it accepts it itself, so a stuck worker delays a connection by that much and no more.
    Each worker writes only its own count.
    """

    def __init__(self, counts, number: int) -> None:
        self._counts = counts
        self._number = number
        self._serving = 0
        self._lock = threading.Lock()

    def accepting(self) -> None:
        """This worker accepts connections from now on."""
        with self._lock:
            self._counts[self._number] = self._serving

    def closed(self) -> None:
        """This worker accepts no more connections."""
        with self._lock:
            self._counts[self._number] = NOT_ACCEPTING

    def started(self) -> None:
        self._change(1)

    def ended(self) -> None:
        self._change(-1)

    def _change(self, by: int) -> None:
        with self._lock:
            self._serving += by
            if self._counts[self._number] != NOT_ACCEPTING:
                self._counts[self._number] = self._serving

    def others_less_busy(self) -> bool:
        mine = self._counts[self._number]
        return any(count < mine for number, count in enumerate(self._counts)
                   if number != self._number)

    def defer(self, listener: socket.socket) -> None:
        """Return when this worker should accept the waiting connection (or it is gone)."""
        deadline = time.monotonic() + ACCEPT_DEFERRAL
        while self.others_less_busy() and time.monotonic() < deadline:
            time.sleep(0.001)
            try:
                if not select.select([listener], [], [], 0)[0]:
                    return  # another worker took it: accept() finds nothing, as it would
            except (OSError, ValueError):
                return  # the socket was closed: the server is stopping


class DicomWorkers:
    """The DICOM server of ``pacs serve`` as ``count`` worker processes on one port.

    Same interface as ``pacs.dimse.server.DicomServer``: ``start``, ``running``, ``address``,
    ``stop``.
    """

    def __init__(self, settings: Settings, archive: Archive, count: int,
                 on_performed: PerformedListener | None = None) -> None:
        if count < 1:
            raise ValueError("at least one DICOM worker is needed")
        self.settings = settings
        self.archive = archive
        self.count = count
        self.on_performed = on_performed
        self._listener: socket.socket | None = None
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # Workers are started by one long-lived thread only: a child's parent-death signal
        # fires when the *thread* that started it ends.
        self._spawn_requests: queue.Queue[int | None] = queue.Queue()
        self._supervisor: threading.Thread | None = None
        self._context = multiprocessing.get_context("spawn")
        self._load = self._context.RawArray("i", [NOT_ACCEPTING] * count)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Bind the DICOM port and start the workers (returns before they are ready)."""
        self._listener = _listen(self.settings.dicom_host, self.settings.dicom_port)
        for number in range(self.count):
            self._spawn_requests.put(number)
        self._supervisor = threading.Thread(target=self._supervise, name="dicom-workers",
                                            daemon=True)
        self._supervisor.start()
        log.info("DICOM %s listening on %s:%d (%d worker processes)", self.settings.ae_title,
                 *self.address, self.count)

    @property
    def worker_processes(self) -> int:
        return self.count

    @property
    def running(self) -> bool:
        """Whether associations are being accepted (at least one worker is ready)."""
        return self.ready_workers() > 0

    def ready_workers(self) -> int:
        """Workers that accept associations. A worker's relay thread lives exactly as long as
        its pipe is open, i.e. as the worker; asking the process itself would reap it."""
        with self._lock:
            return sum(worker.ready.is_set() and worker.relay is not None
                       and worker.relay.is_alive() for worker in self._workers.values())

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the DICOM server is not running")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def stop(self, timeout: float = 20.0) -> None:
        """Ask every worker to stop (open associations are ended), then close the port."""
        self._stopping.set()
        self._spawn_requests.put(None)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            with contextlib.suppress(OSError):  # gone already
                worker.conn.send(_STOP)
        deadline = time.monotonic() + timeout
        for worker in workers:
            if worker.relay is None:
                continue
            worker.relay.join(max(0.1, deadline - time.monotonic()))
            if worker.relay.is_alive():  # the worker has not ended: its pipe is still open
                log.warning("DICOM worker %d did not stop in time; killing it", worker.number)
                worker.process.kill()
                worker.relay.join(10)
        if self._supervisor is not None:
            self._supervisor.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        failures: dict[int, int] = {}
        while True:
            number = self._spawn_requests.get()
            if number is None or self._stopping.is_set():
                return
            with self._lock:
                previous = self._workers.get(number)
            if previous is not None:  # a replacement: wait a little longer after each crash
                quick = time.monotonic() - previous.started < 60
                failures[number] = failures.get(number, 0) + 1 if quick else 0
                delay = _RESTART_DELAYS[min(failures[number], len(_RESTART_DELAYS) - 1)]
                if self._stopping.wait(delay):
                    return
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, name=f"pacs-dicom-{number}",
            args=(number, self.settings, self._listener, self._load, theirs, os.getpid()),
            daemon=True)
        process.start()
        theirs.close()
        worker = _Worker(number, process, ours)
        worker.relay = threading.Thread(target=self._listen_to, args=(worker,),
                                        name=f"dicom-worker-{number}", daemon=True)
        with self._lock:
            self._workers[number] = worker
        worker.relay.start()

    def _listen_to(self, worker: _Worker) -> None:
        """Relay one worker's events until it ends; replace it unless the server is stopping."""
        try:
            while True:
                kind, *payload = worker.conn.recv()
                if kind == "stored":
                    self.archive.notify_stored(payload[0])
                elif kind == "performed":
                    if self.on_performed is not None:
                        try:
                            self.on_performed(*payload)
                        except Exception:
                            log.exception("MPPS listener failed")
                elif kind == "ready":
                    worker.ready.set()
                    log.info("DICOM worker %d ready (pid %d)", worker.number,
                             worker.process.pid)
        except (EOFError, OSError):
            pass
        worker.conn.close()
        worker.process.join(10)
        self._load[worker.number] = NOT_ACCEPTING  # it may have died with associations open
        if not self._stopping.is_set():
            log.error("DICOM worker %d ended unexpectedly (exit code %s); starting another",
                      worker.number, worker.process.exitcode)
            self._spawn_requests.put(worker.number)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


# ---------------------------------------------------------------------- in the worker


class _Stopped(Exception):
    """SIGTERM reached a worker."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Stopped


def _die_with_parent(parent_pid: int) -> None:
    """Be killed when the main process ends, however it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe's end below still stops the worker
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _worker_main(number: int, settings: Settings, listener: socket.socket, load_counts,
                 conn: Connection, parent_pid: int) -> None:
    """A worker process: one DICOM server on the shared socket, events sent to the parent."""
    _die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches every process of the group: the main process decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from emr.orders import OrderStore
    from emr.performed import PerformedSteps
    from pacs.dimse.server import DicomServer
    from pacs.dimse.worklist import WorklistHandlers
    from pacs.logs import configure_logging
    from storage.archive import open_archive
    from storage.query import NameMatching

    configure_logging(settings.log_level)
    send_lock = threading.Lock()

    def send(*message: object) -> None:
        with send_lock:
            conn.send(message)

    archive = open_archive(settings.resolved_database_url, settings.resolved_storage_url,
                           duplicate_policy=settings.duplicate_policy, migrate=False,
                           accept_conflicting_patient_id=settings.accept_conflicting_patient_id,
                           connections=settings.database_connection_shares()[1],
                           name=f"pacs-{parent_pid}-dicom-{number}")
    archive.subscribe(lambda result: send("stored", result))
    worklist = WorklistHandlers(
        OrderStore(archive.index), PerformedSteps(archive.index),
        NameMatching(settings.person_name_matching),
        on_performed=lambda _order, study_uid, step_status: send("performed", study_uid,
                                                                  step_status))
    server = DicomServer(settings, archive, worklist, listener=listener,
                         load=AcceptLoad(load_counts, number))
    try:
        server.start()
        send("ready")
        while conn.recv() != _STOP:
            pass
    except (EOFError, OSError, _Stopped):
        pass  # the main process is gone or wants us gone
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        server.stop()
        archive.close()
    log.debug("DICOM worker %d stopped", number)


__all__ = ["AcceptLoad", "DicomWorkers", "PerformedListener"]
