"""Memory of converting a compressed multi-frame instance to Explicit VR Little Endian.

    .venv/bin/python bench/convert_memory.py [FRAMES]

Makes an RLE Lossless instance of FRAMES (default 300) 512x512 16-bit frames, then measures
the resident memory added while it is converted (sampled every 5 ms): all frames at once
(``dicomweb.transcode.transcode``, which C-MOVE/C-GET fallbacks use) and streamed a frame at a
time as WADO-RS sends it (``transcode.convert``). Each in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _instance(frames: int) -> bytes:
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from tests.factory import dataset, part10

    ds = dataset()
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    yy, xx = np.mgrid[0:512, 0:512]
    pixels = np.stack([((xx + yy + n) % 4096).astype(np.uint16) for n in range(frames)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
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


if __name__ == "__main__":
    if len(sys.argv) > 2:
        measure(sys.argv[1], int(sys.argv[2]))
    else:
        count = sys.argv[1] if len(sys.argv) > 1 else "300"
        for way in ("whole", "streamed"):
            subprocess.run([sys.executable, __file__, way, count], check=True)
