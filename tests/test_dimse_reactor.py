"""The event-driven reactor (pacs/dimse/reactor.py) never leaves an association hanging.

Each test runs a Verification SCP on the reactor in its own process (tests/reactor_peer.py)
with one fault injected, and checks what the peer sees and that the association's thread ends.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs.dimse.reactor import MAX_CONTROL_PDU_LENGTH

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def _peer(mode: str) -> Iterator[tuple[int, subprocess.Popen]]:
    process = subprocess.Popen([sys.executable, "-m", "tests.reactor_peer", mode], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield int(process.stdout.readline()), process
    finally:
        process.kill()
        process.wait(timeout=10)


def _served(process: subprocess.Popen) -> int:
    process.stdin.write("count\n")
    process.stdin.flush()
    return int(process.stdout.readline())


def _wait_until_none_served(process: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (served := _served(process)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return served


def _associate(port: int, *, timeout: float = 20):
    ae = AE("TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    return assoc


def test_a_failing_reactor_aborts_its_association_and_the_server_goes_on() -> None:
    with _peer("raise") as (port, process):
        for _ in range(2):  # the second association: the server still accepts and fails cleanly
            assoc = _associate(port)
            started = time.monotonic()
            answer = assoc.send_c_echo()
            assert "Status" not in answer  # no response: the association was aborted ...
            assert time.monotonic() - started < 5  # ... at once, not after the DIMSE timeout
            assoc.join(timeout=5)  # the requestor's own reactor sees the A-ABORT
            assert assoc.is_aborted
        assert _wait_until_none_served(process, timeout=5) == 0


def test_a_reactor_paused_for_good_ends_with_its_connection() -> None:
    with _peer("pause") as (port, process):
        assoc = _associate(port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.abort()  # the peer gives up on it (a release would go unanswered)
        assert _wait_until_none_served(process, timeout=5) == 0


# A-ABORT PDU: type 7, length 4, source 2 (service provider), reason 6 (invalid PDU parameter
# value), PS3.8 9.3.8.
_ABORT_INVALID_PARAMETER = bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, 6])
_FILLER = bytes(8 * 1024)  # less than any declared length below: the rest never comes


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the peer sends until it closes the connection, and how long that took (bounded)."""
    started = time.monotonic()
    received = b""
    sock.settimeout(0.5)
    while time.monotonic() - started < timeout:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started


@pytest.mark.parametrize("declared", [MAX_CONTROL_PDU_LENGTH + 1, 0xFFFFFFF0])
def test_an_association_request_longer_than_any_is_aborted_after_its_header(declared) -> None:
    # pynetdicom read as many bytes as the header declared: one unauthenticated connection
    # declaring 4 GiB and sending filler held a worker's memory until it closed.
    with _peer("serve") as (port, process):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, declared))
            with suppress(BrokenPipeError, ConnectionResetError):  # closed already
                sock.sendall(_FILLER)
            answer, waited = _read_until_closed(sock, timeout=10)
        assert answer == _ABORT_INVALID_PARAMETER
        assert waited < 5
        assert _wait_until_none_served(process, timeout=5) == 0
        assoc = _associate(port)  # the server goes on
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


@pytest.mark.parametrize("past_maximum", [1, 0xFFFFFFF0 - 16382])
def test_a_p_data_pdu_longer_than_our_maximum_is_aborted_after_its_header(past_maximum) -> None:
    with _peer("serve") as (port, process):
        assoc = _associate(port)
        announced = assoc.acceptor.maximum_length  # 16382, pynetdicom's default
        assert announced == 16382
        sock = assoc.dul.socket.socket
        sock.sendall(struct.pack(">BBL", 0x04, 0, announced + past_maximum))
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(_FILLER)
        assoc.join(timeout=5)  # the requestor's own reactor reads the A-ABORT
        assert not assoc.is_alive()
        assert assoc.is_aborted
        assert _wait_until_none_served(process, timeout=5) == 0
        assoc = _associate(port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

