"""Searches while the EMR posts a burst of large FHIR ServiceRequests.

    .venv/bin/python bench/fhir_burst.py [REQUESTS]

Starts its own server (data under .bench-pacs/, HTTP 127.0.0.1:18152, no DICOM workers, no
HL7), times QIDO-RS ``/studies`` idle, then again while REQUESTS (default 16) ServiceRequests
of about 1 MB each (the most ``/fhir`` takes: 4,950 notes) are posted at once. Prints the
search latency in both cases and the burst's duration and status codes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PORT = 18152
BASE = f"http://127.0.0.1:{PORT}"


def service_request(number: int) -> bytes:
    return json.dumps({
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "identifier": [{"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "system": "urn:bench", "value": f"BURST{number}"}],
        "code": {"text": "CT sọ não"}, "subject": {"reference": "#p"},
        "contained": [{"resourceType": "Patient", "id": "p",
                       "identifier": [{"system": "urn:pacs:mrn", "value": f"B{number}"}],
                       "name": [{"text": "Nguyễn Văn An"}]}],
        "note": [{"text": "x" * 190} for _ in range(4950)]}).encode()


def search_times(client: httpx.Client, stop: threading.Event | None, count: int) -> list[float]:
    times: list[float] = []
    while (stop is None and len(times) < count) or (stop is not None and not stop.is_set()):
        started = time.perf_counter()
        client.get(f"{BASE}/dicomweb/studies?limit=10").raise_for_status()
        times.append(time.perf_counter() - started)
    return times


def burst(requests: int) -> None:
    bodies = [service_request(number) for number in range(requests)]
    codes: list[int] = []

    def post(body: bytes) -> None:
        with httpx.Client(timeout=300) as client:
            codes.append(client.post(f"{BASE}/fhir/ServiceRequest", content=body, headers={
                "Content-Type": "application/fhir+json"}).status_code)

    with httpx.Client(timeout=60) as client:
        idle = search_times(client, None, 20)
        stop = threading.Event()
        during: list[float] = []
        searcher = threading.Thread(target=lambda: during.extend(search_times(client, stop, 0)))
        searcher.start()
        started = time.perf_counter()
        posters = [threading.Thread(target=post, args=(body,)) for body in bodies]
        for thread in posters:
            thread.start()
        for thread in posters:
            thread.join()
        elapsed = time.perf_counter() - started
        stop.set()
        searcher.join()
    print(f"QIDO idle: median {statistics.median(idle) * 1000:.1f} ms")
    print(f"QIDO during {requests} ServiceRequests of {len(bodies[0]) // 1024} KiB: "
          f"n={len(during)} mean {statistics.mean(during) * 1000:.1f} ms, "
          f"median {statistics.median(during) * 1000:.1f} ms, max {max(during) * 1000:.0f} ms")
    print(f"burst: {elapsed:.1f} s, status codes {sorted(set(codes))}")


def main(requests: int) -> None:
    home = ROOT / ".bench-pacs"
    home.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=home, prefix="fhir-burst-"))
    env = dict(os.environ, PACS_DATA_DIR=str(work), PACS_HTTP_PORT=str(PORT),
               PACS_DICOM_PORT="14352", PACS_DICOM_HOST="127.0.0.1", PACS_HL7_PORT="0",
               PACS_DICOM_WORKERS="1")
    with open(work / "serve.log", "wb") as log:
        server = subprocess.Popen([str(ROOT / ".venv/bin/pacs"), "serve"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{BASE}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"the server did not start; see {work}/serve.log")
        burst(requests)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
