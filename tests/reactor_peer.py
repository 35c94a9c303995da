"""A Verification SCP on this server's reactor with one fault injected, run in its own process
by tests/test_dimse_reactor.py (installing the reactor patches pynetdicom process-wide, and the
tests' own pynetdicom clients must stay stock).

Usage: ``python -m tests.reactor_peer MODE``; prints the port, then answers each ``count`` line
on stdin with the number of associations still being served.
  raise  every request makes the reactor itself raise (a bug we have not found yet)
  pause  the C-ECHO handler pauses the reactor and nothing un-pauses it (a thread that
         meant to send on the association and failed half-way)
  serve  no fault: a plain SCP (what a peer's malformed PDUs meet)
"""

from __future__ import annotations

import sys

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from pacs.dimse import reactor


def _raise(*_args) -> None:
    raise RuntimeError("injected reactor fault")


def main(mode: str) -> None:
    reactor.install()
    ae = AE("REACTOR")
    ae.add_supported_context(Verification)
    ae.network_timeout = 30

    def on_established(event: evt.Event) -> None:
        if mode == "raise":
            event.assoc._serve_request = _raise

    def on_echo(event: evt.Event) -> int:
        if mode == "pause":
            event.assoc._reactor_checkpoint.clear()
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_ESTABLISHED, on_established),
                                           (evt.EVT_C_ECHO, on_echo)])
    print(server.server_address[1], flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                print(len(ae.active_associations), flush=True)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
