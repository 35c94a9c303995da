"""C-FIND round trip on one open association, with a client whose own overhead is small.

    .venv/bin/python bench/find_latency.py --port 14252 --aet PACS --patient-id PID0001001
    .venv/bin/python bench/find_latency.py --port 14242 --aet ORTHANC --patient-id PID0001001

The shared harness times C-FIND with findscu (a process start per query, ~20 ms of the ~30) and
with stock pynetdicom, whose reactor loops poll with 1 ms sleeps: both floors hide most of the
server's own time. This client is pynetdicom with this project's event-driven reactor
(``pacs.dimse.reactor``; ``--stock`` for plain pynetdicom). Run it against each server loaded
with the harness's ``many`` data set (2,000 studies), one after the other, same session.
Prints the median and minimum of ``--reps`` study-level queries by Patient ID (the first five
left out) and the number of matches.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

RETURN_KEYS = ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
               "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances", "ReferringPhysicianName", "StudyID")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="PACS")
    parser.add_argument("--patient-id", required=True)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--stock", action="store_true", help="plain pynetdicom reactor")
    args = parser.parse_args()
    if not args.stock:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pacs.dimse.server import configure_libraries
        configure_libraries()
    import pydicom
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    def nodelay(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE("BENCHSCU")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", args.port, ae_title=args.aet,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise SystemExit("association rejected")
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.SpecificCharacterSet = "ISO_IR 192"
    for keyword in RETURN_KEYS:
        setattr(query, keyword, "")
    query.PatientID = args.patient_id
    times, matches = [], 0
    try:
        for _ in range(args.reps):
            started = time.perf_counter()
            matches = sum(1 for status, _ in assoc.send_c_find(query, FIND)
                          if status and status.Status in (0xFF00, 0xFF01))
            times.append((time.perf_counter() - started) * 1000)
    finally:
        assoc.release()
    client = "stock pynetdicom" if args.stock else "pynetdicom + pacs reactor"
    print(f"{args.aet}: {matches} match(es), median {statistics.median(times[5:]):.2f} ms, "
          f"min {min(times):.2f} ms ({args.reps} queries, {client})")


if __name__ == "__main__":
    main()
