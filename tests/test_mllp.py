"""MLLP server and client over real loopback sockets; every wait is bounded."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from emr import hl7_out, hl7v2
from emr.mllp import (
    MAX_MESSAGE_BYTES,
    MIB,
    FrameReader,
    FrameTooLarge,
    MllpError,
    MllpServer,
    frame,
    send,
)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
TIMEOUT = 2.0


def hl7_message(control_id: str, name: str = "Nguyễn^Văn An") -> bytes:
    return (f"MSH|^~\\&|HIS|BV|PACS|BV|20240512||ADT^A08|{control_id}|P|2.5.1||||||UNICODE UTF-8"
            f"\rPID|1||BN0001^^^BV^MR||{name}\r").encode()


def echo_ack(message: bytes) -> bytes:
    """Answer with the message's control ID, which is all these tests need to check order."""
    control_id = message.split(b"\r")[0].split(b"|")[9]
    return b"MSH|^~\\&|PACS||HIS||20240512||ACK|1|P|2.5.1\rMSA|AA|" + control_id + b"\r"


@pytest.fixture
def serve() -> Iterator[Callable[..., MllpServer]]:
    servers: list[MllpServer] = []

    def start(handle: Callable[[bytes], bytes] = echo_ack, **options: object) -> MllpServer:
        server = MllpServer("127.0.0.1", 0, handle, **options)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def connect(server: MllpServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    reader, answers = FrameReader(1024 * 1024), []
    while len(answers) < count:
        data = sock.recv(65536)
        if not data:
            break
        answers += reader.feed(data)
    return answers


def is_closed(sock: socket.socket) -> bool:
    """True if the peer closed (or reset) the connection within TIMEOUT."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# ------------------------------------------------------------------ server


def test_server_binds_port_zero_to_a_real_port(serve: Callable[..., MllpServer]) -> None:
    server = serve()

    host, port = server.address

    assert host == "127.0.0.1" and port > 0


def test_server_answers_several_messages_on_one_connection_in_order(
    serve: Callable[..., MllpServer],
) -> None:
    server = serve()

    with connect(server) as sock:
        sock.sendall(b"".join(frame(hl7_message(f"C{n}")) for n in range(5)))
        answers = read_answers(sock, 5)

    assert [a.split(b"MSA|AA|")[1].strip() for a in answers] == [b"C0", b"C1", b"C2", b"C3",
                                                                 b"C4"]


def test_server_serves_two_connections_at_once(serve: Callable[..., MllpServer]) -> None:
    # Each handler waits until the other connection's handler is running too: a server that
    # served one connection at a time would break the barrier instead.
    both_inside = threading.Barrier(2, timeout=TIMEOUT)

    def handle(message: bytes) -> bytes:
        both_inside.wait()
        return echo_ack(message)

    server = serve(handle)
    with connect(server) as first, connect(server) as second:
        first.sendall(frame(hl7_message("FIRST")))
        second.sendall(frame(hl7_message("SECOND")))

        assert b"FIRST" in read_answers(first, 1)[0]
        assert b"SECOND" in read_answers(second, 1)[0]


def test_server_closes_a_connection_that_sends_anything_but_frames(
    serve: Callable[..., MllpServer],
) -> None:
    # An HTTP request carrying a frame in its body (what a web page can make a browser send)
    # must not be taken for an HL7 message.
    server = serve()
    body = frame(hl7_message("FROM-A-BROWSER"))
    request = (b"POST / HTTP/1.1\r\nHost: pacs:2575\r\nContent-Type: text/plain\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    with connect(server) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # closed, no ACK

    with connect(server) as sock:  # the server still serves frames, CR LF after them too
        sock.sendall(frame(hl7_message("AFTER")) + b"\n" + frame(hl7_message("NEXT")))
        answers = read_answers(sock, 2)
    assert b"MSA|AA|AFTER" in answers[0] and b"MSA|AA|NEXT" in answers[1]


def test_server_accepts_a_frame_split_across_many_packets(
    serve: Callable[..., MllpServer],
) -> None:
    server = serve()
    framed = frame(hl7_message("SPLIT"))

    with connect(server) as sock:
        for i in range(0, len(framed), 7):
            sock.sendall(framed[i : i + 7])
            time.sleep(0.001)
        answers = read_answers(sock, 1)

    assert b"MSA|AA|SPLIT" in answers[0]


def test_oversized_message_closes_its_connection_and_server_keeps_serving(
    serve: Callable[..., MllpServer],
) -> None:
    server = serve(max_message_bytes=1024)

    with connect(server) as big:
        big.sendall(VT + b"MSH|" + b"x" * 4096)
        assert is_closed(big)

    with connect(server) as other:
        other.sendall(frame(hl7_message("SMALL")))
        assert b"MSA|AA|SMALL" in read_answers(other, 1)[0]


def test_by_default_a_frame_over_4_mib_closes_its_connection_and_one_just_under_is_answered(
    serve: Callable[..., MllpServer],
) -> None:
    # Fuzzing: frames up to 16 MiB were taken, from anyone on the network; real orders and ADT
    # are a few kB.
    server = serve()
    fits = hl7_message("FITS") + b"NTE|1||" + b"x" * (MAX_MESSAGE_BYTES - 1024) + b"\r"

    with connect(server) as big:
        with contextlib.suppress(OSError):  # the server may close while we still write
            big.sendall(VT + hl7_message("BIG") + b"x" * (4 * MIB))
        assert is_closed(big)

    with connect(server) as other:
        other.sendall(frame(fits))
        assert b"MSA|AA|FITS" in read_answers(other, 1)[0]


def test_handler_exception_closes_the_connection_and_server_survives(
    serve: Callable[..., MllpServer],
) -> None:
    def handle(message: bytes) -> bytes:
        if b"|BOOM|" in message:
            raise RuntimeError("handler bug")
        return echo_ack(message)

    server = serve(handle)
    with connect(server) as failing:
        failing.sendall(frame(hl7_message("BOOM")))
        assert is_closed(failing)

    assert "MSA|AA|FINE" in send(*server.address, hl7_message("FINE").decode(), timeout=TIMEOUT)


def test_server_closes_idle_connections(serve: Callable[..., MllpServer]) -> None:
    server = serve(idle_timeout=0.2)

    with connect(server) as sock:
        started = time.monotonic()
        assert is_closed(sock)

    assert time.monotonic() - started < TIMEOUT


def test_connections_beyond_the_limit_are_closed_and_a_freed_place_serves_again(
        serve: Callable[..., MllpServer], caplog: pytest.LogCaptureFixture) -> None:
    # Each connection may hold a 4 MiB frame while it arrives: 200 idle connections with a
    # frame begun held 2.4 GB.
    server = serve(max_connections=2)
    first, second = connect(server), connect(server)
    first.sendall(VT + b"MSH|")  # a frame begun, never ended
    with caplog.at_level(logging.WARNING, logger="emr.mllp"):
        for _ in range(3):
            with connect(server) as refused:
                assert is_closed(refused)
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1  # once, not a flood
    with second:
        second.sendall(frame(hl7_message("KEPT")))
        assert b"MSA|AA|KEPT" in read_answers(second, 1)[0]
    first.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:  # the server notices the closed ones, then takes more
        with contextlib.suppress(MllpError):
            if "MSA|AA|AGAIN" in send(*server.address, hl7_message("AGAIN").decode(),
                                      timeout=TIMEOUT):
                break
        time.sleep(0.05)
    else:
        raise AssertionError("no place freed")


def test_stop_closes_open_connections(serve: Callable[..., MllpServer]) -> None:
    server = serve()
    sock = connect(server)

    server.stop()

    with sock:
        assert is_closed(sock)
    with pytest.raises(MllpError):
        send(*server.address, hl7_message("LATE").decode(), timeout=TIMEOUT)


def test_server_never_logs_message_content(
    serve: Callable[..., MllpServer], caplog: pytest.LogCaptureFixture
) -> None:
    def handle(message: bytes) -> bytes:
        raise ValueError(f"cannot store {message.decode()}")  # a careless handler

    server = serve(handle)
    caplog.set_level(logging.DEBUG, logger="emr.mllp")

    with connect(server) as sock:
        sock.sendall(frame(hl7_message("PRIVATE", name="Trần^Thị Bích")))
        assert is_closed(sock)

    assert "PRIVATE" in caplog.text  # the control ID, at DEBUG
    assert "Trần" not in caplog.text
    assert "BN0001" not in caplog.text


def acknowledge(message: bytes) -> bytes:
    """What the PACS answers, without applying anything: the ACK of reading the message."""
    try:
        header, _ = hl7v2.parse_inbound(hl7v2.decode(message))
    except hl7v2.Hl7Error as exc:
        return hl7_out.ack(exc.header, exc.ack_code, exc.reason, error_location=exc.error_location,
                           error_code=exc.error_code).encode()
    return hl7_out.ack(header, "AA").encode()


# Review: an enhanced-mode sender (MSH-15 AL, MSH-16 NE) got AA, and MSH-5 of the ACK lost the
# universal ID of its MSH-3.
def test_an_enhanced_mode_sender_gets_one_accept_ack_per_message_addressed_to_it_whole(
    serve: Callable[..., MllpServer],
) -> None:
    server = serve(acknowledge)

    def enhanced(control_id: str, charset: str = "UNICODE UTF-8") -> bytes:
        return (f"MSH|^~\\&|HIS&1.2.840.9.1&ISO|BV|PACS|BV|20240512||ADT^A08|{control_id}|P|2.5"
                f"|||AL|NE|VNM|{charset}\rPID|1||BN0001^^^BV^MR||Lê^Hà\r").encode()

    with connect(server) as sock:
        sock.sendall(frame(enhanced("E1")) + frame(enhanced("E2", charset="8859/1")))
        answers = [a.decode().split("\r") for a in read_answers(sock, 2)]
        sock.sendall(frame(enhanced("E3")))
        answers += [a.decode().split("\r") for a in read_answers(sock, 1)]

    assert [a[1].split("|")[:3] for a in answers] == [
        ["MSA", "CA", "E1"], ["MSA", "CR", "E2"], ["MSA", "CA", "E3"]]  # E2: UTF-8 as 8859/1
    assert all(a[0].split("|")[4] == "HIS&1.2.840.9.1&ISO" for a in answers)


# ------------------------------------------------------------------ client


def test_send_returns_the_decoded_answer_with_vietnamese_intact(
    serve: Callable[..., MllpServer],
) -> None:
    server = serve(lambda message: message)  # echo the message back

    answer = send(*server.address, hl7_message("UTF8").decode(), timeout=TIMEOUT)

    assert "Nguyễn^Văn An" in answer


def test_send_to_a_closed_port_raises_quickly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()

    with pytest.raises(MllpError):
        send("127.0.0.1", port, hl7_message("NOBODY").decode(), timeout=TIMEOUT)

    assert time.monotonic() - started < 1.0


@pytest.fixture
def silent_server() -> Iterator[tuple[str, int]]:
    """Accepts connections, reads, and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(5)
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            accepted.append(conn)
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()
    listener.close()
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()


def test_send_times_out_when_the_server_never_answers(silent_server: tuple[str, int]) -> None:
    started = time.monotonic()

    with pytest.raises(MllpError, match="no answer"):
        send(*silent_server, hl7_message("SILENCE").decode(), timeout=0.5)

    assert 0.4 < time.monotonic() - started < 2.0


def test_send_raises_when_the_server_closes_without_answering(
    serve: Callable[..., MllpServer],
) -> None:
    def handle(message: bytes) -> bytes:
        raise RuntimeError("no answer")

    server = serve(handle)

    with pytest.raises(MllpError, match="closed the connection|cannot exchange"):
        send(*server.address, hl7_message("X").decode(), timeout=TIMEOUT)


# ------------------------------------------------------------------ framing


def test_frame_reader_ends_a_frame_at_fs_even_without_the_cr() -> None:
    reader = FrameReader(1024)

    assert reader.feed(VT + b"one" + FS) == [b"one"]
    assert reader.feed(CR + VT + b"two" + FS + CR) == [b"two"]


def test_frame_reader_drops_an_abandoned_frame_when_a_new_one_starts() -> None:
    reader = FrameReader(1024)

    assert reader.feed(VT + b"half a mess" + VT + b"whole" + FS + CR) == [b"whole"]


def test_frame_reader_refuses_a_frame_over_the_limit() -> None:
    reader = FrameReader(10)

    with pytest.raises(FrameTooLarge):
        reader.feed(VT + b"x" * 11)
