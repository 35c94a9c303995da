"""The whole public corpus through DICOMweb: STOW-RS in, WADO-RS out.

Every file the archive accepts comes back with the same data set when asked for as stored
(``transfer-syntax=*``); asked for in the default Explicit VR Little Endian, instances in the
lossless syntaxes come back with the same pixel values, and those in lossy ones as stored
(PS3.18 8.7.3.4). Every file it refuses is listed in the FailedSOPSequence with a reason.
Counts are by SOP Instance UID (the first stored wins).
"""

from __future__ import annotations

import io
import logging
import warnings

import httpx
import numpy as np
import pydicom
import pytest

from dicomweb import transcode
from storage.errors import InvalidInstance
from storage.parsing import parse_instance
from tests.compare import DECOMPRESSED_PIXEL_MODULE, assert_same_data_set
from tests.conftest import corpus_files

LOSSLESS = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}
BOUNDARY = "corpus-boundary"


def _body(parts: list[bytes]) -> bytes:
    chunks = []
    for data in parts:
        chunks.append(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks += [data, b"\r\n"]
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


def _parts(response: httpx.Response) -> list[bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    pieces = response.content.split(b"--" + boundary.encode())[1:-1]
    return [piece.split(b"\r\n\r\n", 1)[1][:-2] for piece in pieces]


def _pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    try:
        return ds.pixel_array
    except Exception:
        return None


@pytest.mark.slow
def test_corpus_stow_then_wado_round_trip(corpus, start_server, tmp_path):
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    accepted, refused = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in corpus_files(corpus):
            data = path.read_bytes()
            try:
                accepted.append((data, parse_instance(data)))
            except InvalidInstance:
                refused.append(data)
    server = start_server(tmp_path / "data")
    base = server.http + "/dicomweb"
    with httpx.Client(timeout=120) as http:
        stored, failed, collided = {}, 0, []
        batch = [data for data, _ in accepted] + refused
        for start in range(0, len(batch), 40):
            response = http.post(base + "/studies", content=_body(batch[start:start + 40]),
                                 headers={"Content-Type": 'multipart/related; '
                                          f'type="application/dicom"; boundary={BOUNDARY}'})
            assert response.status_code in (200, 202, 409), response.text
            body = response.json()
            for item in body.get("00081198", {}).get("Value", []):
                if item["00081197"]["Value"] == [0xA900]:  # the UID of another object
                    collided.append(item["00081155"]["Value"][0])  # (test files reuse UIDs)
                else:
                    failed += 1
            for item in body.get("00081199", {}).get("Value", []):
                stored[item["00081155"]["Value"][0]] = item["00081190"]["Value"][0]
        assert failed == len(refused)
        winners: dict[str, tuple[bytes, object]] = {}
        for data, parsed in accepted:
            winners.setdefault(parsed.sop_instance_uid, (data, parsed))
        assert set(stored) == set(winners)
        for uid in collided:  # refused, not kept as a duplicate: another object than the first
            assert len({(p.sop_class_uid, p.study_instance_uid, p.series_instance_uid)
                        for _, p in accepted if p.sop_instance_uid == uid}) > 1, uid

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transcoded = lossy = 0
            for uid, (_data, parsed) in winners.items():
                original = pydicom.dcmread(io.BytesIO(parsed.data), force=True)
                as_stored = http.get(stored[uid], headers={
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
                assert as_stored.status_code == 200, uid
                received = pydicom.dcmread(io.BytesIO(_parts(as_stored)[0]))
                assert received.file_meta.TransferSyntaxUID == parsed.transfer_syntax
                assert_same_data_set(received, original, uid)
                if transcode.is_lossy(parsed.transfer_syntax):
                    default = http.get(stored[uid])  # no syntax asked for: as received
                    assert default.status_code == 200, (uid, default.text[:200])
                    assert _parts(default) == _parts(as_stored), uid
                    label = f"transfer-syntax={parsed.transfer_syntax}\r\n".encode()
                    assert label in default.content[:300], uid
                    lossy += 1
                if parsed.transfer_syntax not in LOSSLESS or "PixelData" not in original:
                    continue
                expected = _pixels(original)
                if expected is None:
                    continue  # pydicom itself cannot decode the original
                default = http.get(stored[uid])
                assert default.status_code == 200, (uid, default.text[:200])
                explicit = pydicom.dcmread(io.BytesIO(_parts(default)[0]))
                assert explicit.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
                assert np.array_equal(explicit.pixel_array, expected), uid
                # The same instance, only decompressed: pydicom's decompress made up a new SOP
                # Instance UID, so a client pulling a study got copies it could not match.
                assert explicit.file_meta.MediaStorageSOPInstanceUID == uid
                assert_same_data_set(explicit, original, uid, ignore=DECOMPRESSED_PIXEL_MODULE)
                transcoded += 1
            assert transcoded > 20
            assert lossy > 10
