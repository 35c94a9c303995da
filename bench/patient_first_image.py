"""The patient's page on a phone: time from opening a share link to the first image, and bytes.

  .venv/bin/python bench/patient_first_image.py [--slices 300] [--size 512] [--runs 3]

Starts its own `pacs serve` (temporary data folder, loopback, free ports), stores a synthetic
CT series (Vietnamese name; `--slices` slices of `--size` pixels, 16-bit, ~0.5 MB each at
512), makes a share link, and opens it in headless Debian Chromium emulating a phone
(390x844, 3x pixels, touch) with a fresh profile each run, under network conditions set
through the DevTools protocol:

* `loopback`: no throttling;
* `slow-4g`: 1.6 Mbit/s down, 750 kbit/s up, 150 ms round trip, CPU slowed 4x (Lighthouse's
  mobile profile);
* `slow-3g`: 400 kbit/s down and up, 2 s round trip, CPU slowed 4x (DevTools' "Slow 3G").

"First image": the page's <img> is decoded and has non-black pixels. Bytes: what Chromium
received (headers and bodies) until then. "Next slice": after the first image, the time a
one-slice swipe takes to show the next image (the page preloads neighbours).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.factory import Spec, ct_series  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CONDITIONS = {
    "loopback": None,
    "slow-4g": {"latency": 150, "down": 1.6e6, "up": 750e3, "cpu": 4},
    "slow-3g": {"latency": 2000, "down": 400e3, "up": 400e3, "cpu": 4},
}
IMAGE = """() => { const i = document.getElementById('image');
  if (!i || !i.complete || !i.naturalWidth) return null;
  const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
  const x = c.getContext('2d'); x.drawImage(i, 0, 0);
  const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let k = 0; k < d.length; k += 16) if (d[k] > 10) n++;
  return [n, i.dataset.index]; }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    http_port = free_port()
    env = {**os.environ, "PACS_DATA_DIR": str(data_dir), "PACS_HTTP_PORT": str(http_port),
           "PACS_DICOM_PORT": str(free_port()), "PACS_DICOM_HOST": "127.0.0.1",
           "PACS_HTTP_HOST": "127.0.0.1", "PACS_HL7_PORT": "0",
           "PACS_SITE_NAME": "Bệnh viện Đa khoa Tỉnh"}
    proc = subprocess.Popen([sys.executable, "-m", "pacs.cli", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("pacs serve did not start")


def store_study(base: str, slices: int, size: int) -> str:
    spec = Spec(patient_name="Nguyễn^Thị Hồng Nhung", patient_id="BENCH-PHONE",
                study_description="CT ngực liều thấp")
    datas = ct_series(spec, slices, size=size)
    for start in range(0, len(datas), 50):
        body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + d + b"\r\n"
                        for d in datas[start:start + 50]) + b"--b--\r\n"
        response = httpx.post(base + "/dicomweb/studies", content=body, timeout=300, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
        response.raise_for_status()
    return spec.study_uid


def one_run(browser, url: str, condition: dict | None) -> dict:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=3,
                                  is_mobile=True, has_touch=True, locale="vi-VN")
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    if condition:
        cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": condition["latency"],
            "downloadThroughput": condition["down"] / 8, "uploadThroughput": condition["up"] / 8})
        cdp.send("Emulation.setCPUThrottlingRate", {"rate": condition["cpu"]})
    received = {"bytes": 0}
    cdp.on("Network.loadingFinished",
           lambda event: received.__setitem__("bytes", received["bytes"]
                                              + event["encodedDataLength"]))
    start = time.perf_counter()
    page.goto(url, wait_until="commit")
    first, shown = None, None
    while time.perf_counter() - start < 120:
        shown = page.evaluate(IMAGE)
        if shown and shown[0] > 100:
            first = time.perf_counter() - start
            break
        time.sleep(0.01)
    bytes_first = received["bytes"]
    next_slice = None
    if first is not None:
        page.wait_for_timeout(1500)  # neighbours preloading, as a patient looks at the image
        swiped = time.perf_counter()
        page.locator("button[aria-label='Ảnh sau']").click()
        while time.perf_counter() - swiped < 60:
            now = page.evaluate(IMAGE)
            if now and now[1] != shown[1] and now[0] > 100:
                next_slice = time.perf_counter() - swiped
                break
            time.sleep(0.01)
    context.close()
    return {"first_image_s": first, "bytes_to_first_image": bytes_first,
            "next_slice_s": next_slice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/patient-first-image.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacs-bench-phone-") as folder:
        proc, base = start_server(Path(folder) / "data")
        try:
            study = store_study(base, args.slices, args.size)
            share = httpx.post(base + "/api/shares", json={"study_instance_uid": study}).json()
            results = {}
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS)
                for name, condition in CONDITIONS.items():
                    runs = [one_run(browser, share["url"], condition) for _ in range(args.runs)]
                    firsts = [r["first_image_s"] for r in runs if r["first_image_s"] is not None]
                    results[name] = {"runs": runs, "median_first_image_s":
                                     statistics.median(firsts) if firsts else None}
                browser.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    report = {"slices": args.slices, "size": args.size, "conditions": CONDITIONS,
              "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
