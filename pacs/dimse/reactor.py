"""Event-driven waits for pynetdicom's two reactor loops.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever it
found nothing to do, and the association thread sleeps 1 ms before every check for a DIMSE
message. Each request therefore waits up to ~2 ms twice (request in, response out) for no
reason. Measured here against a bare pynetdicom SCP: C-ECHO on an open association 4.5 ms, and
close to 1 ms per CT slice of pure sleeping during ingest.

``install()`` replaces the two sleeps with waits that end as soon as there is work:
- the DUL thread waits in ``select`` on its socket plus a wake-up socket pair, which
  ``send_pdu`` and ``kill_dul`` write to;
- the association thread waits on an event the DUL thread sets after each state-machine step
  (which is when DIMSE messages, release and abort requests reach the association's queues).
Both waits time out after ``IDLE_WAIT`` so the timers (ARTIM, network timeout) still run.
Unlike pynetdicom's loop, the association thread also stops waiting on a pause another thread
never lifted once the connection is gone, and leaves the association paused and killed however
its loop ends, so no sender waits for it forever.

``install()`` also bounds what one PDU may make a connection hold in memory (``_read_pdu``):
pynetdicom read as many bytes as a PDU header declared, and one unauthenticated connection
declaring 4 GiB and sending filler held it all until the socket closed.

The loops are pynetdicom's own, copied with only the waits changed; ``install`` checks the
pynetdicom version it was written against and leaves pynetdicom untouched otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

from pacs.dimse.compat import pynetdicom_supported
from pacs.dimse.status import CANNOT_UNDERSTAND

log = logging.getLogger("pacs.dimse")
_DUL_LOG = logging.getLogger("pynetdicom.dul")

IDLE_WAIT = 0.05  # seconds; bounds how late timers are checked, not request latency

# Largest A-ASSOCIATE-RQ/AC/RJ, A-RELEASE or A-ABORT PDU read. A request with 128 presentation
# contexts of ten transfer syntaxes each is about 100 KB; user identity and extended negotiation
# items add at most a few hundred KB more in practice.
MAX_CONTROL_PDU_LENGTH = 1024 * 1024
# Largest P-DATA-TF read when we announce no maximum (Maximum Length Received 0, i.e.
# PACS_DICOM_MAX_PDU=0): the most a data set may inflate to in the archive.
MAX_UNLIMITED_PDATA_LENGTH = 256 * 1024 * 1024
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
              0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
_INVALID_PDU_PARAMETER_VALUE = 0x06  # A-ABORT reason, PS3.8 Table 9-26
_P_DATA_TF = 0x04

_installed = False
_original_send_pdu = DULServiceProvider.send_pdu
_original_kill_dul = DULServiceProvider.kill_dul
_original_stop_dul = DULServiceProvider.stop_dul


def install() -> bool:
    """Patch pynetdicom's reactor loops (once). Returns whether the patch is active."""
    global _installed
    if _installed:
        return True
    if not pynetdicom_supported("event-driven reactor", "DIMSE latency will be higher"):
        return False
    DULServiceProvider.run_reactor = _dul_run_reactor
    DULServiceProvider.send_pdu = _dul_send_pdu
    DULServiceProvider.kill_dul = _dul_kill_dul
    DULServiceProvider.stop_dul = _dul_stop_dul
    DULServiceProvider._read_pdu_data = _read_pdu
    Association._run_reactor = _association_run_reactor
    Association.kill = _association_kill
    _installed = True
    return True


# ---------------------------------------------------------------- DUL thread


def _wake_pair(dul: DULServiceProvider) -> tuple[socket.socket, socket.socket]:
    pair = getattr(dul, "_pacs_wake", None)
    if pair is None:
        pair = socket.socketpair()
        for end in pair:
            end.setblocking(False)
        dul._pacs_wake = pair
    return pair


def _wake(dul: DULServiceProvider) -> None:
    pair = getattr(dul, "_pacs_wake", None)
    if pair is not None:
        # Nothing to do when the buffer is full (already signalled) or the pair is closed.
        with contextlib.suppress(BlockingIOError, OSError):
            pair[1].send(b"\0")


def _dul_send_pdu(self: DULServiceProvider, primitive) -> None:
    _original_send_pdu(self, primitive)
    # Wake the DUL thread only when it sleeps in select: a wake-up byte per PDU cost a system
    # call each, and each one handed the GIL to the DUL thread (a 512 KB slice to a peer with
    # 16 KB PDUs is 32 PDUs). The DUL thread sets the flag before it last checks its queue,
    # and this reads it after queueing, so one of the two always sees the other.
    if getattr(self, "_pacs_waiting", True):
        _wake(self)


def _dul_kill_dul(self: DULServiceProvider) -> None:
    _original_kill_dul(self)
    _wake(self)


def _dul_stop_dul(self: DULServiceProvider) -> bool:
    """pynetdicom's stop_dul, waking the reactor so it sees the kill flag at once."""
    if self.state_machine.current_state != "Sta1":
        return False
    self._kill_thread = True
    _wake(self)
    self.join()
    return True


def _dul_idle_wait(self: DULServiceProvider) -> None:
    """Wait until the peer sends data, a primitive is queued, or IDLE_WAIT passes."""
    wake_read, _ = _wake_pair(self)
    self._pacs_waiting = True
    try:
        _wait_for_work(self, wake_read)
    finally:
        self._pacs_waiting = False


def _wait_for_work(self: DULServiceProvider, wake_read: socket.socket) -> None:
    if not self.to_provider_queue.empty():
        return
    readable = [wake_read]
    sock = getattr(self.socket, "socket", None) if self.socket is not None else None
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            if sock.fileno() >= 0:
                readable.append(sock)
        except OSError:
            pass
    try:
        select.select(readable, [], [], IDLE_WAIT)
    except (OSError, ValueError):
        return  # socket closed under us: the loop's own checks handle it
    try:
        while wake_read.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom's DULServiceProvider.run_reactor with the idle sleep made event-driven."""
    self._idle_timer.start()
    _wake_pair(self)
    idle = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                _dul_idle_wait(self)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("Exception in DUL.run(), aborting association")
                log.exception(exc)
                _abort_broken(self)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            try:
                self.state_machine.do_action(event)
            except Exception as exc:
                # What the peer sent cannot be acted on (an A-ASSOCIATE-RQ with an even
                # presentation context ID...). pynetdicom let the DUL thread die here and the
                # association thread wait for the request until its ACSE timeout: 30 s of no
                # answer, holding one of the association slots (a few dozen such requests
                # locked every modality out).
                log.warning("association with %s aborted: %s", _peer_of(self), exc)
                _abort_broken(self)
                return
            _signal_association(self.assoc)
            idle = False
    finally:
        _signal_association(self.assoc)
        for end in getattr(self, "_pacs_wake", ()):
            end.close()


def pdu_length_limit(self: DULServiceProvider, pdu_type: int) -> int:
    """The largest PDU length field (bytes after the 6-byte header) we read for ``pdu_type``.

    A P-DATA-TF may be as long as the Maximum Length Received we announced (PS3.8 D.1: it
    bounds the PDU's variable field); every other PDU is small whatever its contents.
    """
    if pdu_type != _P_DATA_TF:
        return MAX_CONTROL_PDU_LENGTH
    assoc = self.assoc
    announced = None
    with contextlib.suppress(Exception):  # unreadable: as if we had announced no maximum
        local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        announced = local.maximum_length
    return announced or MAX_UNLIMITED_PDATA_LENGTH


def _read_pdu(self: DULServiceProvider) -> None:
    """pynetdicom's DULServiceProvider._read_pdu_data, refusing a PDU longer than we accept.

    pynetdicom read whatever length the header declared, so a peer that declared 4 GiB and
    sent filler made the connection hold it all. A PDU past the limit is answered with an
    A-ABORT (service-provider, invalid PDU parameter value; PS3.8 9.3.1, 9.3.8) and the
    connection closed, after reading only its header. The rest is pynetdicom's, messages
    included.
    """
    try:
        raw = self.socket.recv(6)
    except (OSError, TimeoutError) as exc:
        _DUL_LOG.error("Connection closed before the entire PDU was received")
        _DUL_LOG.exception(exc)
        self.event_queue.put("Evt17")
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", raw)
    except struct.error:
        self.event_queue.put("Evt17")  # the peer closed the connection
        return
    if pdu_type not in _PDU_NAMES:
        _DUL_LOG.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return
    limit = pdu_length_limit(self, pdu_type)
    if pdu_length > limit:
        log.warning("association with %s aborted: its %s PDU declares %d bytes, more than the "
                    "%d accepted", _peer_of(self), _PDU_NAMES[pdu_type], pdu_length, limit)
        _abort_broken(self, reason=_INVALID_PDU_PARAMETER_VALUE, close=True)
        return
    try:
        raw += self.socket.recv(pdu_length)  # read in steps of 4 KB, never allocated up front
    except (OSError, TimeoutError) as exc:
        _DUL_LOG.error("Connection closed before the entire PDU was received")
        _DUL_LOG.exception(exc)
        self.event_queue.put("Evt17")
        return
    if len(raw) != 6 + pdu_length:
        _DUL_LOG.error(f"The received PDU is shorter than expected ({len(raw)} of "
                       f"{6 + pdu_length} bytes received)")
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(raw)
    except Exception as exc:
        _DUL_LOG.error("Unable to decode the received PDU data")
        _DUL_LOG.exception(exc)
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


def _abort_broken(self: DULServiceProvider, *, reason: int = 0x00, close: bool = False) -> None:
    """Abort after a failure in the DUL thread: A-ABORT to the peer (with ``reason``), the
    association marked aborted, and a thread waiting for the peer's request woken (as if it
    had timed out). With ``close``, the connection is closed at once too (the peer may still
    be sending, and nothing more of it is read)."""
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = reason
    with contextlib.suppress(Exception):  # the socket may be gone already
        self.socket.send(abort_pdu.encode())
    if close:
        with contextlib.suppress(Exception):
            self.socket.close()
    self.assoc.is_aborted = True
    self.assoc.is_established = False
    self.assoc._kill = True
    self._kill_thread = True
    self.to_user_queue.put(None)
    _signal_association(self.assoc)


def _peer_of(self: DULServiceProvider) -> str:
    with contextlib.suppress(Exception):
        host, port = self.socket.socket.getpeername()[:2]
        return f"{host}:{port}"
    return "a peer"


# ---------------------------------------------------------------- association thread


def _activity(assoc: Association) -> threading.Event:
    event = getattr(assoc, "_pacs_activity", None)
    if event is None:
        event = assoc._pacs_activity = threading.Event()
    return event


def _signal_association(assoc: Association) -> None:
    _activity(assoc).set()


def _idle(assoc: Association) -> threading.Event:
    event = getattr(assoc, "_pacs_idle", None)
    if event is None:
        event = assoc._pacs_idle = threading.Event()
    return event


def wait_until_idle(assoc: Association, timeout: float) -> bool:
    """Wait until the association has finished serving its current request.

    pynetdicom lets another thread send on an association while a request is being served
    (``_is_paused`` is True then, so handlers can send), and the two messages' PDUs then
    interleave. A thread that answers later (a Storage Commitment report) waits for this first.
    """
    if not _installed:
        time.sleep(min(timeout, 0.2))
        return True
    return _idle(assoc).wait(timeout)


def _answer_malformed_store(assoc: Association, msg, context_id: int) -> bool:
    """Refuse a C-STORE request that lacks a required field, instead of ignoring it.

    pynetdicom drops such a request ("Received unexpected C-STORE service message") and the
    sender waits for an answer until its timeout, a minute for many modalities.
    """
    if not isinstance(msg, C_STORE) or msg.MessageIDBeingRespondedTo is not None \
            or msg.MessageID is None or msg.is_valid_request:
        return False
    missing = [k for k in msg.REQUEST_KEYWORDS if getattr(msg, k) is None]
    log.warning("C-STORE request without %s refused", ", ".join(missing))
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg.MessageID
    rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
    rsp.Status = CANNOT_UNDERSTAND
    rsp.ErrorComment = f"Request lacks {', '.join(missing)}"[:64]
    assoc.dimse.send_msg(rsp, context_id)
    return True


def _association_kill(self: Association) -> None:
    """pynetdicom's Association.kill, polling for the DUL's end every 0.5 ms instead of 10 ms
    (the DUL reaches its idle state just after the release confirmation is queued)."""
    _signal_association(self)
    self._reactor_checkpoint.set()
    self._kill = True
    self.is_established = False
    self._is_paused = True
    while self.dul.is_alive() and not self.dul.stop_dul():
        time.sleep(0.0005)


def _association_run_reactor(self: Association) -> None:
    """pynetdicom's Association._run_reactor with the 1 ms sleep replaced by a wait for the DUL.

    However the loop ends (release, abort, a dead DUL, an exception in a handler), the
    association is left paused and killed: a thread waiting to send on it (``send_*()``,
    ``release()``, a Storage Commitment report) waits for ``_is_paused`` and must not wait
    for a reactor that is gone.
    """
    idle = _idle(self)
    try:
        _serve_until_closed(self)
    except Exception:
        log.exception("association reactor failed: aborting the association")
        with contextlib.suppress(Exception):
            self.abort()
    finally:
        self._is_paused = True
        idle.set()
        if not self._kill:
            self.kill()


def _wait_for_checkpoint(self: Association) -> bool:
    """Wait while another thread has paused the reactor; False when the DUL ended meanwhile.

    A thread that paused the reactor and then failed before un-pausing it, or whose
    association the peer or the network ended, would otherwise leave the reactor blocked
    here for good, holding its thread and never noticing the association is gone.
    """
    while not self._reactor_checkpoint.wait(IDLE_WAIT):
        if self._kill or not self.dul.is_alive() or self.dul.state_machine.current_state == "Sta1":
            return False  # Sta1: the connection is closed (aborted, or timed out by the DUL)
    return True


def _serve_until_closed(self: Association) -> None:
    activity = _activity(self)
    idle = _idle(self)
    self._is_paused = False
    while not self._kill:
        # While idle the reactor counts as paused: send_*() and release() from another thread
        # wait for that before touching the queues, and must not wait out the idle timeout.
        self._is_paused = True
        idle.set()
        activity.wait(IDLE_WAIT)
        activity.clear()
        if not _wait_for_checkpoint(self):
            return
        if not self.dimse.msg_queue.empty():
            idle.clear()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # A send_*() on another thread paused us after the wait above returned and before
            # we cleared _is_paused: the response it waits for is its to read, not ours
            # (pynetdicom's own loop has this race; served here it was dropped as
            # "unexpected" and the sender waited out the DIMSE timeout).
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg and _answer_malformed_store(self, msg, context_id):
            pass
        elif msg:
            self._serve_request(msg, context_id)
            if not self.dimse.msg_queue.empty():
                activity.set()  # more already queued: no wait on the next turn

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.debug("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            return

        if not self.dul.is_alive():
            return

        if self.dul.idle_timer_expired():
            # Routine: modalities often leave an association open when they are done.
            log.info("association with %s idle for %g s: %s", _peer_of(self.dul),
                     self.network_timeout or 0, "releasing" if
                     self.network_timeout_response == "A-RELEASE" else "aborting")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                if _wait_for_checkpoint(self):
                    self.release()
            else:
                self.abort()
            return
