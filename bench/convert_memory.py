"""Memory of converting a compressed multi-frame instance to Explicit VR Little Endian.

    .venv/bin/python bench/convert_memory.py [FRAMES]
    .venv/bin/python bench/convert_memory.py server [--root DIR] [--frames N] [--clients N]

Makes an RLE Lossless instance of FRAMES (default 300) 512x512 16-bit frames, then measures
the resident memory added while it is converted (sampled every 5 ms): all frames at once
(``dicomweb.transcode.transcode``, which C-MOVE/C-GET fallbacks use) and streamed a frame at a
time as WADO-RS sends it (``transcode.convert``). Each in a fresh process.

``server`` starts ``pacs serve`` from the source tree ``--root`` (default this checkout; give
a copy of another revision to compare) on loopback with an empty data folder, stores one RLE
instance of noise (``--frames``, default 200: about 108 MB stored, 105 MB decoded) and
measures the server's resident memory at the peak (sampled every 20 ms) while ``--clients``
(12) requests run at once: the instance as ``application/dicom`` (decoded to Explicit VR
Little Endian) read by curl at 10 MB/s each, then one uncompressed frame each. Then the time
of every frame in one request, of one frame, and of the whole instance; last, ``--clients``
requests at once for an uncompressed instance of half as many frames as RLE Lossless, an
encoding, which takes the whole instance in memory.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _instance(frames: int, noise: bool = False, syntax: str = "1.2.840.10008.1.2.5") -> bytes:
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from tests.factory import dataset, part10

    ds = dataset()
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    if noise:  # RLE cannot shrink it: the stored file is as big as the decoded pixels
        pixels = np.random.default_rng(0).integers(0, 4096, size=(frames, 512, 512),
                                                   dtype=np.uint16)
    else:
        yy, xx = np.mgrid[0:512, 0:512]
        pixels = np.stack([((xx + yy + n) % 4096).astype(np.uint16) for n in range(frames)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
        return part10(ds)
    ds.compress(RLELossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return part10(ds, RLELossless)


def measure(way: str, frames: int) -> None:
    from dicomweb import transcode

    data = _instance(frames)
    peak, stop = [_rss_mb()], threading.Event()
    start = peak[0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.perf_counter()
    if way == "whole":
        size = len(transcode.transcode(data, "1.2.840.10008.1.2.1"))
    else:
        size = sum(len(chunk) for chunk in
                   transcode.convert(data, "1.2.840.10008.1.2.1").chunks)
    elapsed = time.perf_counter() - began
    stop.set()
    sampler.join()
    print(f"{way:8} {frames} frames: RLE {len(data) / 1e6:.0f} MB -> {size / 1e6:.0f} MB in "
          f"{elapsed:.2f} s, +{peak[0] - start:.0f} MB resident at the peak")


# ---------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class _Peak:
    """The peak resident memory of process ``pid`` while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> _Peak:
        self.start = _server_rss_mb(self.pid)
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _server_rss_mb(self.pid))
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _curl(url: str, accept: str, rate: str | None = None) -> tuple[str, float, int]:
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total} "
               "%{size_download}", "-H", f"Accept: {accept}", url]
    if rate:
        command[1:1] = ["--limit-rate", rate]
    code, elapsed, size = subprocess.run(command, capture_output=True, text=True,
                                         check=True).stdout.split()
    return code, float(elapsed), int(size)


def _at_once(count: int, work) -> list:
    results: list = [None] * count

    def run(n: int) -> None:
        results[n] = work(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _stow(base: str, data: bytes, ds) -> str:
    """Store one Part 10 file by STOW-RS; its WADO-RS URL."""
    import httpx

    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    stored = httpx.post(base + "/studies", content=body, timeout=120, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert stored.status_code == 200, stored.text
    return (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def serve(root: Path, frames: int, clients: int) -> None:
    import httpx
    import pydicom

    data = _instance(frames, noise=True)
    ds = pydicom.dcmread(__import__("io").BytesIO(data), stop_before_pixels=True)
    home = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "PACS_DATA_DIR": str(home / "data"),
           "PACS_DICOM_HOST": "127.0.0.1", "PACS_DICOM_PORT": str(_free_port()),
           "PACS_HTTP_HOST": "127.0.0.1", "PACS_HTTP_PORT": str(port),
           "PACS_HL7_HOST": "127.0.0.1", "PACS_HL7_PORT": str(_free_port())}
    with open(home / "pacs.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "pacs.cli", "serve"], cwd=root,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/dicomweb"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        url = _stow(base, data, ds)
        print(f"server from {root}: RLE {len(data) / 1e6:.0f} MB, {frames} frames "
              f"512x512x16 bit; {clients} requests at once")
        time.sleep(1)
        idle = _server_rss_mb(server.pid)
        with _Peak(server.pid) as peak:
            answers = _at_once(clients, lambda n: _curl(url, "application/dicom", "10M"))
        times = sorted(elapsed for _, elapsed, _ in answers)
        print(f"  instance, application/dicom at 10 MB/s: {idle:.0f} MB idle, peak "
              f"{peak.peak:.0f} MB (+{peak.peak - idle:.0f}); status "
              f"{sorted({code for code, _, _ in answers})}, {answers[0][2] / 1e6:.0f} MB each, "
              f"{times[0]:.1f}-{times[-1]:.1f} s")
        time.sleep(1)
        idle = _server_rss_mb(server.pid)
        octets = 'multipart/related; type="application/octet-stream"'
        with _Peak(server.pid) as peak:
            answers = _at_once(clients, lambda n: _curl(f"{url}/frames/{n + 1}", octets))
        times = sorted(elapsed for _, elapsed, _ in answers)
        print(f"  one uncompressed frame each: {idle:.0f} MB idle, peak {peak.peak:.0f} MB "
              f"(+{peak.peak - idle:.0f}); status {sorted({c for c, _, _ in answers})}, "
              f"{times[0]:.2f}-{times[-1]:.2f} s")
        every = ",".join(str(n) for n in range(1, frames + 1))
        idle = _server_rss_mb(server.pid)
        with _Peak(server.pid) as peak:
            code, elapsed, size = _curl(f"{url}/frames/{every}", octets)
        print(f"  frames 1..{frames} in one request: {code}, {size / 1e6:.0f} MB in "
              f"{elapsed:.2f} s, peak {peak.peak:.0f} MB (+{peak.peak - idle:.0f})")
        code, elapsed, size = _curl(f"{url}/frames/{frames // 2}", octets)
        print(f"  frame {frames // 2} alone: {code} in {elapsed:.2f} s")
        code, elapsed, size = _curl(url, "application/dicom")
        print(f"  the whole instance decoded, one request: {code}, {size / 1e6:.0f} MB in "
              f"{elapsed:.2f} s")
        # Encoding (here to RLE Lossless) takes the whole instance in memory.
        native = _instance(frames // 2, noise=True, syntax="1.2.840.10008.1.2.1")
        ds = pydicom.dcmread(__import__("io").BytesIO(native), stop_before_pixels=True)
        url = _stow(base, native, ds)
        time.sleep(1)
        idle = _server_rss_mb(server.pid)
        rle = "application/dicom; transfer-syntax=1.2.840.10008.1.2.5"
        with _Peak(server.pid) as peak:
            answers = _at_once(clients, lambda n: _curl(url, rle, "10M"))
        times = sorted(elapsed for _, elapsed, _ in answers)
        print(f"  uncompressed {len(native) / 1e6:.0f} MB instance as RLE Lossless at 10 MB/s: "
              f"{idle:.0f} MB idle, peak {peak.peak:.0f} MB (+{peak.peak - idle:.0f}); status "
              f"{sorted({code for code, _, _ in answers})}, {answers[0][2] / 1e6:.0f} MB each, "
              f"{times[0]:.1f}-{times[-1]:.1f} s")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        parser = argparse.ArgumentParser(prog="convert_memory.py server")
        parser.add_argument("--root", type=Path, default=ROOT)
        parser.add_argument("--frames", type=int, default=200)
        parser.add_argument("--clients", type=int, default=12)
        options = parser.parse_args(sys.argv[2:])
        serve(options.root.resolve(), options.frames, options.clients)
    elif len(sys.argv) > 2:
        measure(sys.argv[1], int(sys.argv[2]))
    else:
        count = sys.argv[1] if len(sys.argv) > 1 else "300"
        for way in ("whole", "streamed"):
            subprocess.run([sys.executable, __file__, way, count], check=True)
