"""MLLP, the framing HL7 v2 travels in over TCP: ``<VT> message <FS><CR>``.

A threaded server that hands each framed message to a callback and writes back the answer it
returns (an ACK), and a client ``send`` for one message and its answer. Messages carry patient
names and IDs: nothing here logs message content, only sizes, peers and (at DEBUG) control IDs.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
import traceback
from collections.abc import Callable

__all__ = ["MAX_MESSAGE_BYTES", "FrameReader", "FrameTooLarge", "MllpError", "MllpServer",
           "NotMllp", "frame", "send"]

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
MIB = 1024 * 1024
# Orders and ADT are a few kB; 4 MiB leaves room for long free text. Each connection may hold
# this much while its frame arrives, and the port takes connections from anyone.
MAX_MESSAGE_BYTES = 4 * MIB


class MllpError(OSError):
    """The peer could not be reached, did not answer in time, or answered without MLLP framing."""


class NotMllp(MllpError):
    """The peer sent something other than MLLP frames (e.g. an HTTP request)."""


class FrameTooLarge(MllpError):
    """A message grew past the size limit before its end block arrived."""


def frame(message: bytes) -> bytes:
    """``message`` wrapped in MLLP start and end blocks."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class FrameReader:
    """Cuts a byte stream into MLLP messages.

    Between frames only white space is tolerated (some senders end frames with CR LF); any
    other byte outside a frame raises ``NotMllp`` and the connection is closed. Skipping it
    instead would let a web page make a browser on the hospital network send an HL7 message:
    an HTTP POST to this port with a frame in its body is otherwise a valid message."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._in_frame = False

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data``; FrameTooLarge if the current one is too big."""
        self._buffer += data
        messages = []
        while self._buffer:
            if not self._in_frame:
                start = self._buffer.find(START_BLOCK)
                skipped = len(self._buffer) if start < 0 else start
                # White space is the tail of an end block (CR, or CR LF), not noise.
                if bytes(self._buffer[:skipped]).strip(b" \t\r\n"):
                    raise NotMllp("bytes outside an MLLP frame")
                if start < 0:
                    self._buffer.clear()
                    break
                del self._buffer[: start + 1]
                self._in_frame = True
            end = self._buffer.find(END_BLOCK)
            if end < 0:
                if len(self._buffer) > self.max_message_bytes:
                    raise FrameTooLarge(f"message exceeds {self.max_message_bytes} bytes")
                break
            message = bytes(self._buffer[:end])
            # The CR after FS is left in the buffer and dropped as "outside a frame" next time:
            # waiting for it would hang on senders that end frames with FS alone.
            del self._buffer[: end + 1]
            self._in_frame = False
            restart = message.rfind(START_BLOCK)
            if restart >= 0:  # the sender gave up on a frame and began again
                log.debug("dropped %d bytes of an abandoned MLLP frame", restart)
                message = message[restart + 1 :]
            if len(message) > self.max_message_bytes:
                raise FrameTooLarge(f"message exceeds {self.max_message_bytes} bytes")
            messages.append(message)
        return messages


def _control_id(message: bytes) -> str:
    """MSH-10 for DEBUG logs: the one field that identifies a message without naming anyone."""
    first = message.split(b"\r", 1)[0].split(b"\n", 1)[0]
    fields = first.split(first[3:4]) if first.startswith(b"MSH") and len(first) > 3 else []
    return fields[9].decode("ascii", "replace")[:40] if len(fields) > 9 else "?"


class _Connection(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        sock.settimeout(owner.idle_timeout)
        reader = FrameReader(owner.max_message_bytes)
        log.debug("HL7 MLLP connection from %s", peer)
        try:
            while True:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    log.debug("HL7 MLLP connection from %s idle for %ss, closing", peer,
                              owner.idle_timeout)
                    return
                if not data:
                    return
                for message in reader.feed(data):
                    if not self._answer(sock, peer, message, owner.handle):
                        return
        except FrameTooLarge:
            log.warning("HL7 message from %s larger than %d bytes, closing the connection",
                        peer, owner.max_message_bytes)
        except NotMllp:
            log.warning("connection from %s to the HL7 port sent something other than MLLP "
                        "frames; closed", peer)
        except OSError as exc:
            log.info("HL7 MLLP connection from %s failed: %s", peer, exc)
        finally:
            log.debug("HL7 MLLP connection from %s closed", peer)

    @staticmethod
    def _answer(
        sock: socket.socket, peer: str, message: bytes, handle: Callable[[bytes], bytes]
    ) -> bool:
        """Hand one message to the application and send its answer; False to close."""
        log.debug("HL7 message %s (%d bytes) from %s", _control_id(message), len(message), peer)
        try:
            answer = handle(message)
        except Exception as exc:  # the server must outlive any handler bug
            # Only the type: exception texts may quote the message (patient data).
            log.error("HL7 handler failed on a %d-byte message from %s (%s); closing the"
                      " connection without an answer", len(message), peer, type(exc).__name__)
            # Frames without the exception text, for the same reason.
            log.debug("handler traceback:\n%s", "".join(traceback.format_tb(exc.__traceback__)))
            return False
        if answer:
            sock.sendall(frame(answer))
        return True


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: MllpServer) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self._refused_logged = -60.0  # when a refusal was last logged (monotonic seconds)
        super().__init__(address, _Connection)

    def verify_request(self, request: socket.socket, client_address: object) -> bool:
        """Take the connection if a place is free (it is then counted, in the accepting
        thread, so a burst of connections cannot all pass the check at once)."""
        with self.lock:
            if len(self.connections) < self.owner.max_connections:
                self.connections.add(request)
                return True
            now = time.monotonic()
            speak = now - self._refused_logged > 60  # a flood must not flood the log too
            if speak:
                self._refused_logged = now
        if speak:
            log.warning("HL7 connection from %s refused: %d connections are open already "
                        "(hl7_max_connections)", client_address[0],  # type: ignore[index]
                        self.owner.max_connections)
        return False

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections.discard(request)


class MllpServer:
    """An MLLP listener: each message goes to ``handle``, whose return value (an ACK) is sent.

    One thread per connection; messages on a connection are handled one at a time, in order.
    ``handle`` should always return an answer; if it raises, the connection is closed (the
    sender will resend) and the server carries on. A message over ``max_message_bytes`` closes
    its connection; a connection silent for ``idle_timeout`` seconds is closed. Beyond
    ``max_connections`` open at once a new connection is closed at once: each may hold a
    frame of up to ``max_message_bytes`` while it arrives, and the port takes anyone's."""

    def __init__(
        self,
        host: str,
        port: int,
        handle: Callable[[bytes], bytes],
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        idle_timeout: float = 300.0,
        max_connections: int = 64,
    ) -> None:
        self.host = host
        self.port = port
        self.handle = handle
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: _TcpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound: the real port when 0 was asked for."""
        if self._server is None:
            return self.host, self.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve in a background thread; returns at once."""
        if self._server is not None:
            return
        self._server = _TcpServer((self.host, self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="mllp-server", daemon=True
        )
        self._thread.start()
        log.info("HL7 MLLP listening on %s:%d", *self.address)

    def stop(self) -> None:
        """Stop listening and close open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.lock:
            connections = list(server.connections)
        for sock in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("HL7 MLLP listener on %s:%d stopped", self.host, self.port)

    def __enter__(self) -> MllpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def send(host: str, port: int, message: str, *, timeout: float = 10.0) -> str:
    """Send one message (UTF-8) and return the framed answer, decoded as UTF-8 (else latin-1).

    ``timeout`` bounds the whole exchange. MllpError on connection failure, timeout, or a
    connection closed before a complete answer."""
    deadline = time.monotonic() + timeout
    reader = FrameReader(MAX_MESSAGE_BYTES)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(frame(message.encode("utf-8")))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                data = sock.recv(65536)
                if not data:
                    raise MllpError(f"{host}:{port} closed the connection without an answer")
                answers = reader.feed(data)
                if answers:
                    break
    except MllpError:
        raise
    except TimeoutError:
        raise MllpError(f"no answer from {host}:{port} within {timeout}s") from None
    except OSError as exc:
        raise MllpError(f"cannot exchange with {host}:{port}: {exc}") from exc
    try:
        return answers[0].decode("utf-8")
    except UnicodeDecodeError:
        return answers[0].decode("latin-1")
