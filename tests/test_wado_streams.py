"""Retrieval answers whose client goes away mid-answer: what they hold (a whole-instance
conversion's slot and bytes) is let go at once, not at the next garbage collection. The app
runs in this process (uvicorn on loopback) so the slots can be watched."""

from __future__ import annotations

import gc
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn

from dicomweb import slots
from dicomweb.app import build_dicomweb
from pacs.settings import Settings
from storage.archive import open_archive
from tests.conftest import free_port
from tests.factory import Spec, dataset, part10
from tests.test_emr import wait_for

RLE = "1.2.840.10008.1.2.5"


@pytest.fixture
def served(tmp_path):
    archive = open_archive(f"sqlite:///{tmp_path / 'index.sqlite'}", f"file://{tmp_path / 'b'}")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        build_dicomweb(archive, Settings(data_dir=tmp_path)), host="127.0.0.1", port=port,
        log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the server")
    yield archive, port
    server.should_exit = True
    thread.join(10)
    archive.close()


def test_a_client_gone_mid_answer_gives_its_conversion_slot_back_at_once(served):
    archive, port = served
    ds = dataset(Spec(rows=512, columns=512, frames=24))
    noise = np.random.default_rng(7).integers(0, 4096, (24, 512, 512), dtype=np.uint16)
    ds.PixelData = noise.tobytes()  # RLE of noise: as large as the instance (12 MB)
    archive.store(part10(ds))
    free = slots.WHOLE_INSTANCE_SLOTS._value
    path = (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    gc.disable()  # what is freed must be freed without it
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: pacs\r\nAccept: application/dicom; "
                           f"transfer-syntax={RLE}\r\n\r\n".encode("ascii"))
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
            assert slots.WHOLE_INSTANCE_SLOTS._value == free - 1  # the answer is under way
        wait_for(lambda: slots.WHOLE_INSTANCE_SLOTS._value == free, timeout=10,
                 what="the slot given back")
    finally:
        gc.enable()
