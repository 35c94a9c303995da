"""The EMR's side of the wire in tests: an HL7 listener and a FHIR server on loopback that
record what the PACS sends them, answer as planned per study, and can go down and come back on
the same port."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socketserver
import threading
import time

import hl7

from tests.conftest import free_port

TODAY = dt.date.today().strftime("%Y%m%d")


class _LoopbackPeer:
    """A threaded server on 127.0.0.1 at a fixed port, which can stop and start again."""

    port: int
    _server: socketserver.TCPServer | None = None

    def _serve(self, server_class: type[socketserver.TCPServer], handler: type) -> None:
        server_class.allow_reuse_address = True
        self._server = server_class(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class ProgrammableMllp(_LoopbackPeer):
    """The EMR's HL7 listener. Answers AA, or the code planned for a message that contains a
    given text (an accession number): ``plan["ACC"] = ["AE", "AA"]`` answers AE once, then AA."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[str] = []
        self.plan: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def code_for(self, message: str) -> str:
        with self._lock:
            for key, codes in self.plan.items():
                if key in message and codes:
                    return codes.pop(0) if len(codes) > 1 else codes[0]
        return "AA"

    def start(self) -> ProgrammableMllp:
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while True:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while b"\x1c\r" in buffer:
                        frame, buffer = buffer.split(b"\x1c\r", 1)
                        message = frame.split(b"\x0b", 1)[-1].decode("utf-8")
                        owner.messages.append(message)
                        control = hl7.parse(message).segment("MSH")[10]
                        code = owner.code_for(message)
                        ack = (f"MSH|^~\\&|EMR|BV|PACS||{TODAY}120000||ACK^R01|A{control}|P|"
                               f"2.5.1\rMSA|{code}|{control}|{'' if code == 'AA' else 'nope'}\r")
                        self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")

        self._serve(socketserver.ThreadingTCPServer, Handler)
        return self

    def about(self, accession: str) -> list[str]:
        return [m for m in list(self.messages) if accession in m]


class ProgrammableFhir(_LoopbackPeer):
    """The EMR's FHIR server. ``plan[study_uid]`` lists the answers to successive PUTs of that
    study: an HTTP status (201, 400, 500...) or ``"hang"`` (no answer for ``hang_seconds``).
    Error answers are OperationOutcomes that quote the subject, as real FHIR servers do."""

    def __init__(self, port: int | None = None, hang_seconds: float = 30) -> None:
        self.port = port or free_port()
        self.hang_seconds = hang_seconds
        self.resources: list[dict] = []
        self.paths: list[str] = []
        self.plan: dict[str, list] = {}
        self.hanging = threading.Event()  # set when a PUT is left without an answer
        self._lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def answer_for(self, uid: str):
        with self._lock:
            answers = self.plan.get(uid)
            if not answers:
                return 201
            return answers.pop(0) if len(answers) > 1 else answers[0]

    def start(self) -> ProgrammableFhir:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                resource = json.loads(body)
                answer = owner.answer_for(resource.get("id", ""))
                if answer == "hang":
                    owner.hanging.set()
                    time.sleep(owner.hang_seconds)
                    return
                owner.paths.append(self.path)
                if answer >= 300:
                    display = (resource.get("subject") or {}).get("display", "")
                    outcome = {"resourceType": "OperationOutcome", "issue": [{
                        "severity": "error", "code": "invariant",
                        "diagnostics": f"ImagingStudy.subject.display '{display}' does not "
                                       "match the patient of record"}]}
                    data = json.dumps(outcome, ensure_ascii=False).encode()
                else:
                    owner.resources.append(resource)
                    data = body
                self.send_response(answer)
                self.send_header("Content-Type", "application/fhir+json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self._serve(http.server.ThreadingHTTPServer, Handler)
        return self

    def about(self, uid: str) -> list[dict]:
        return [r for r in list(self.resources) if r.get("id") == uid]
