"""EMR load: HL7 orders in over MLLP, then Modality Worklist queries against many orders.

Starts ``pacs serve`` on loopback (SQLite, a temporary folder), sends ORDERS ORM^O01 messages
over one MLLP connection (the ``hl7`` package's client), then times worklist C-FINDs the way a
modality asks (its station AE title and today's date; and a name search without accents), from
pynetdicom (in this process) and from DCMTK's findscu (process start included). Orders are
spread over 30 days and 10 stations (~33 per station and day).
Usage::

    .venv/bin/python bench/emr_worklist.py [--orders 10000] [--out bench/results/emr-worklist.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from hl7.client import MLLPClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

ROOT = Path(__file__).resolve().parents[1]
STATIONS = [f"CT{n:02d}" for n in range(1, 6)] + [f"MR{n:02d}" for n in range(1, 6)]
FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng"]
GIVEN = ["Văn An", "Thị Bình", "Minh Châu", "Quốc Dũng", "Thu Hà", "Đức Long"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def order_message(n: int, day: dt.date) -> str:
    station = STATIONS[(n // 30) % len(STATIONS)]  # days cycle over n, stations over n // 30
    name = f"{FAMILY[n % len(FAMILY)]}^{GIVEN[(n // 10) % len(GIVEN)]}"
    when = day.strftime("%Y%m%d") + f"{8 + n % 10:02d}00"
    accession = f"B{n:07d}"
    return "\r".join([
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|{when}||ORM^O01|M{n}|P|2.3.1||||||UNICODE UTF-8",
        f"PID|1||BN{n:07d}^^^BVDK^MR||{name}||19800101|M",
        f"ORC|NW|P{accession}|{accession}||SC||^^^{when}^^R",
        f"OBR|1|P{accession}|{accession}|CT001^Chụp CT^L||||||||||||||{accession}|RP{n}|"
        f"SPS{n}|{station}|||{station[:2]}|||^^^{when}^^R",
    ]) + "\r"


def worklist_query(port: int, **keys: str) -> tuple[float, int]:
    """Seconds for one worklist C-FIND (association included) and the number of answers."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = keys.get("PatientName", "")
    ds.PatientID = ""
    ds.AccessionNumber = ""
    step = Dataset()
    step.ScheduledStationAETitle = keys.get("station", "")
    step.ScheduledProcedureStepStartDate = keys.get("date", "")
    step.Modality = ""
    ds.ScheduledProcedureStepSequence = [step]
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    answers = 0
    for status, _answer in assoc.send_c_find(ds, ModalityWorklistInformationFind):
        if status and status.Status == 0xFF00:
            answers += 1
    assoc.release()
    return time.perf_counter() - started, answers


def findscu_query(port: int, **keys: str) -> float:
    """Seconds for DCMTK findscu -W (process start included) with the same keys."""
    step = "ScheduledProcedureStepSequence[0]."
    args = ["findscu", "-W", "-aec", "PACS", "-k", "SpecificCharacterSet=ISO_IR 192",
            "-k", f"PatientName={keys.get('PatientName', '')}", "-k", "PatientID",
            "-k", "AccessionNumber",
            "-k", f"{step}ScheduledStationAETitle={keys.get('station', '')}",
            "-k", f"{step}ScheduledProcedureStepStartDate={keys.get('date', '')}",
            "-k", f"{step}Modality", "127.0.0.1", str(port)]
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-emr-") as tmp:
        http_port, dicom_port, hl7_port = free_port(), free_port(), free_port()
        env = {**os.environ, "PACS_DATA_DIR": str(Path(tmp) / "data"),
               "PACS_HTTP_HOST": "127.0.0.1", "PACS_HTTP_PORT": str(http_port),
               "PACS_DICOM_HOST": "127.0.0.1", "PACS_DICOM_PORT": str(dicom_port),
               "PACS_HL7_HOST": "127.0.0.1", "PACS_HL7_PORT": str(hl7_port),
               "PACS_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen([sys.executable, "-m", "pacs.cli", "serve"], env=env, cwd=ROOT)
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            today = dt.date.today()
            started = time.perf_counter()
            with MLLPClient("127.0.0.1", hl7_port) as client:
                for n in range(args.orders):
                    day = today + dt.timedelta(days=n % 30)
                    answer = client.send_message(order_message(n, day))
                    assert b"MSA|AA" in answer, answer
            load_seconds = time.perf_counter() - started
            queries = {
                "station and today": {"station": "CT01", "date": today.strftime("%Y%m%d")},
                "name without accents": {"PatientName": "nguyen van*"},
                "station, next 7 days": {
                    "station": "MR03", "date": f"{today:%Y%m%d}-"
                    f"{today + dt.timedelta(days=6):%Y%m%d}"},
            }
            timings = {}
            for label, keys in queries.items():
                runs = [worklist_query(dicom_port, **keys) for _ in range(10)]
                dcmtk = [findscu_query(dicom_port, **keys) for _ in range(5)]
                timings[label] = {"answers": runs[0][1],
                                  "pynetdicom_median_ms": round(
                                      statistics.median(r[0] for r in runs) * 1000, 1),
                                  "findscu_median_ms": round(statistics.median(dcmtk) * 1000,
                                                             1)}
        finally:
            proc.terminate()
            proc.wait(30)
    result = {"orders": args.orders, "hl7_orders_per_second": round(args.orders / load_seconds),
              "hl7_ms_per_order": round(load_seconds / args.orders * 1000, 2),
              "worklist_queries": timings, "date": dt.date.today().isoformat(),
              "machine": "2 cores, SQLite index, one MLLP connection"}
    print(json.dumps(result, ensure_ascii=False, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
