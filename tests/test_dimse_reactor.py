"""The event-driven reactor (pacs/dimse/reactor.py) never leaves an association hanging.

Each test runs a Verification SCP on the reactor in its own process (tests/reactor_peer.py)
with one fault injected, and checks what the peer sees and that the association's thread ends.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

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
