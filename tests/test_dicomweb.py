"""DICOMweb against a running server over loopback, with dicomweb-client and plain HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid
from requests.exceptions import HTTPError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from dicomweb import render, slots, wado
from dicomweb.app import build_dicomweb
from dicomweb.errors import ContainErrors
from pacs.settings import Settings
from storage.archive import open_archive
from tests.conftest import PacsProcess, stow
from tests.factory import Spec, dataset, part10

STOW_LIMIT = 8 * 1024 * 1024
ORIGIN = "https://viewer.example.org"


def as_file(ds: pydicom.Dataset,
            syntax: str = pydicom.uid.ExplicitVRLittleEndian) -> pydicom.Dataset:
    """A dataset with file meta, as dicomweb-client needs for STOW."""
    return pydicom.dcmread(io.BytesIO(part10(ds, syntax)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = PacsProcess(tmp_path_factory.mktemp("dicomweb") / "data", env={
        "PACS_STOW_MAX_BYTES": str(STOW_LIMIT), "PACS_CORS_ALLOWED_ORIGINS": ORIGIN})
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server) -> DICOMwebClient:
    return DICOMwebClient(server.http + "/dicomweb")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http + "/dicomweb", timeout=30) as session:
        yield session


@pytest.fixture(scope="module")
def study(client):
    """One study stored by STOW-RS: a CT series of 3 slices and a 4-frame series."""
    first = Spec(patient_name="Nguyễn^Văn An", patient_id="CCCD001203004567",
                 accession="ACC-DW-1", study_date="20240315")
    ct = [dataset(Spec(**{**first.__dict__, "sop_uid": Spec().sop_uid, "instance_number": n}))
          for n in range(1, 4)]
    multiframe = dataset(Spec(**{**first.__dict__, "sop_uid": Spec().sop_uid,
                                 "series_uid": Spec().series_uid, "series_number": 2,
                                 "modality": "MR", "frames": 4, "rows": 16, "columns": 16}))
    multiframe.RedPaletteColorLookupTableData = bytes(range(256)) * 8  # bulk data (2 KB)
    response = client.store_instances([as_file(ds) for ds in [*ct, multiframe]])
    assert len(response.ReferencedSOPSequence) == 4
    assert "FailedSOPSequence" not in response
    return {"spec": first, "ct": ct, "multiframe": multiframe}


# ---------------------------------------------------------------------------- QIDO-RS


def test_qido_finds_vietnamese_name_without_diacritics_and_returns_exact_name(client, study):
    found = client.search_for_studies(search_filters={"PatientName": "*nguyen*"},
                                      fuzzymatching=True)
    mine = [s for s in found if s["0020000D"]["Value"][0] == study["spec"].study_uid]
    assert len(mine) == 1
    assert mine[0]["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn^Văn An"
    assert mine[0]["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
    assert mine[0]["00080061"]["Value"] == ["CT", "MR"]  # ModalitiesInStudy


def test_qido_matches_by_tag_keyword_wildcard_date_range_and_uid_list(http, study):
    uid = study["spec"].study_uid
    for query in ({"00100020": "CCCD001203004567"}, {"PatientID": "CCCD0012*"},
                  {"StudyDate": "20240301-20240331"}, {"StudyDate": "20240315"},
                  {"AccessionNumber": "ACC-DW-?"},
                  {"StudyInstanceUID": f"1.2.3\\{uid}"}):
        response = http.get("/studies", params=query)
        assert response.status_code == 200, (query, response.text)
        assert uid in [s["0020000D"]["Value"][0] for s in response.json()], query
    repeated = http.get(f"/studies?StudyInstanceUID=1.2.3&StudyInstanceUID={uid}")
    assert [s["0020000D"]["Value"][0] for s in repeated.json()] == [uid]
    assert http.get("/studies", params={"StudyDate": "20230101-20231231",
                                        "PatientID": "CCCD001203004567"}).status_code == 204


def test_qido_includefield_forms(http, study):
    uid = study["spec"].study_uid
    # The OHIF study list request, comma encoded as %2C.
    response = http.get(f"/studies?limit=101&offset=0&fuzzymatching=false"
                        f"&includefield=00081030%2C00080060&StudyInstanceUID={uid}")
    assert response.status_code == 200
    answer = response.json()[0]
    assert answer["00081030"]["Value"] == ["CT bụng có cản quang"]
    # Repeated includefield, by keyword and by tag; a non-indexed attribute from the header.
    answer = http.get(f"/studies/{uid}/instances?includefield=PhotometricInterpretation"
                      f"&includefield=00280100&SeriesInstanceUID={study['ct'][0].SeriesInstanceUID}"
                      ).json()[0]
    assert answer["00280004"]["Value"] == ["MONOCHROME2"]
    assert answer["00280100"]["Value"] == [16]
    everything = http.get(f"/studies?StudyInstanceUID={uid}&includefield=all").json()[0]
    assert everything["00100040"]["Value"] == ["M"]
    assert everything["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries


def test_qido_series_and_instances_at_every_level(client, http, study):
    uid = study["spec"].study_uid
    series = client.search_for_series(uid)
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "MR"]
    ct_series = study["ct"][0].SeriesInstanceUID
    instances = client.search_for_instances(uid, ct_series)
    assert sorted(i["00200013"]["Value"][0] for i in instances) == [1, 2, 3]
    assert "/instances/" in instances[0]["00081190"]["Value"][0]
    all_series = http.get("/series", params={"Modality": "MR",
                                             "StudyInstanceUID": uid}).json()
    assert len(all_series) == 1
    assert all_series[0]["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn^Văn An"
    top = http.get("/instances", params={"SOPInstanceUID": study["multiframe"].SOPInstanceUID})
    assert top.json()[0]["00280008"]["Value"] == [4]  # NumberOfFrames


def test_qido_limit_and_offset_page_through_results(http, study):
    uid = study["spec"].study_uid
    first = http.get(f"/studies/{uid}/instances", params={"limit": 2})
    second = http.get(f"/studies/{uid}/instances", params={"limit": 2, "offset": 2})
    uids = [i["00080018"]["Value"][0] for i in first.json() + second.json()]
    assert len(uids) == 4 and len(set(uids)) == 4
    assert "Warning" in first.headers  # more results than returned


@pytest.mark.parametrize(("query", "parameter"), [
    ("StudyDate=2024", "StudyDate"), ("limit=many", "limit"), ("offset=-1", "offset"),
    ("NoSuchKeyword=1", "NoSuchKeyword"), ("fuzzymatching=maybe", "fuzzymatching"),
    ("StudyInstanceUID=not-a-uid", "StudyInstanceUID"), ("includefield=Bogus", "includefield"),
    ("offset=99999999999999999999999", "offset"), ("limit=%EF%BC%91", "limit"),
])
def test_qido_bad_parameters_get_400_naming_the_parameter(http, query, parameter):
    response = http.get("/studies?" + query)
    assert response.status_code == 400
    assert parameter in response.json()["message"]


# ---------------------------------------------------------------------------- WADO-RS


def test_retrieve_study_series_instance_as_stored_and_default_syntax(client, study):
    spec, ct = study["spec"], study["ct"]
    whole = client.retrieve_study(spec.study_uid)
    assert len(whole) == 4
    series = client.retrieve_series(spec.study_uid, ct[0].SeriesInstanceUID,
                                    media_types=(("application/dicom", "*"),))
    assert sorted(ds.InstanceNumber for ds in series) == [1, 2, 3]
    one = client.retrieve_instance(spec.study_uid, ct[0].SeriesInstanceUID, ct[0].SOPInstanceUID)
    assert one.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert one.PatientName == "Nguyễn^Văn An"
    assert one.PixelData == ct[0].PixelData


def test_series_metadata_from_index_with_etag_and_gzip(client, http, study):
    spec, mf = study["spec"], study["multiframe"]
    metadata = client.retrieve_series_metadata(spec.study_uid, mf.SeriesInstanceUID)
    assert len(metadata) == 1
    assert metadata[0]["7FE00010"]["BulkDataURI"].endswith("/bulkdata/path/7FE00010")
    bulk = metadata[0]["00281201"]["BulkDataURI"]
    assert bulk.startswith("http://127.0.0.1:") and "/bulkdata/" in bulk
    url = f"/studies/{spec.study_uid}/series/{mf.SeriesInstanceUID}/metadata"
    first = http.get(url, headers={"Accept-Encoding": "gzip"})
    assert first.headers["Content-Encoding"] == "gzip"
    again = http.get(url, headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    study_metadata = http.get(f"/studies/{spec.study_uid}/metadata").json()
    assert len(study_metadata) == 4


def test_frames_by_number_in_stored_syntax(client, http, study):
    spec, mf = study["spec"], study["multiframe"]
    frames = client.retrieve_instance_frames(spec.study_uid, mf.SeriesInstanceUID,
                                             mf.SOPInstanceUID, [1, 3])
    size = 16 * 16 * 2
    assert frames == [mf.PixelData[:size], mf.PixelData[2 * size:3 * size]]
    url = (f"/studies/{spec.study_uid}/series/{mf.SeriesInstanceUID}/instances/"
           f"{mf.SOPInstanceUID}/frames/2")
    response = http.get(url, headers={
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert response.status_code == 200
    assert "transfer-syntax=1.2.840.10008.1.2.1" in response.text[:400]
    assert http.get(url[:-1] + "9").status_code == 404


def test_bulkdata_by_uri_and_by_range(client, http, study):
    spec, mf = study["spec"], study["multiframe"]
    metadata = client.retrieve_instance_metadata(spec.study_uid, mf.SeriesInstanceUID,
                                                 mf.SOPInstanceUID)
    uri = metadata["00281201"]["BulkDataURI"]
    assert client.retrieve_bulkdata(uri) == [mf.RedPaletteColorLookupTableData]
    partial = httpx.get(uri, headers={"Accept": "application/octet-stream",
                                      "Range": "bytes=10-19"})
    assert partial.status_code == 206
    assert partial.content == mf.RedPaletteColorLookupTableData[10:20]


def test_unknown_uids_404_and_unacceptable_types_406(http, study):
    spec = study["spec"]
    assert http.get("/studies/1.2.3.4/metadata").status_code == 404
    assert http.get(f"/studies/{spec.study_uid}/series/1.2.3").status_code == 404
    response = http.get(f"/studies/{spec.study_uid}/metadata", headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert "application/dicom+json" in response.json()["message"]


# ---------------------------------------------------------------------------- STOW-RS


def test_stow_duplicate_is_a_warning_and_wrong_study_a_failure(client, http, study):
    ct = study["ct"][0]
    again = client.store_instances([as_file(ct)])
    assert again.ReferencedSOPSequence[0].WarningReason == 0xB007
    other = dataset(Spec())
    with pytest.raises(HTTPError) as error:
        client.store_instances([as_file(other)], study_instance_uid=study["spec"].study_uid)
    assert error.value.response.status_code == 409
    failed = error.value.response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA900]
    assert http.get(f"/studies/{other.StudyInstanceUID}/metadata").status_code == 404


def test_stow_of_another_patients_instance_into_a_study_fails_with_its_reason(client, http,
                                                                            study):
    spec = study["spec"]
    intruder = dataset(Spec(study_uid=spec.study_uid, patient_id="BN-KHAC",
                            patient_name="Đỗ^Văn Khác"))
    with pytest.raises(HTTPError) as error:
        client.store_instances([as_file(intruder)])
    assert error.value.response.status_code == 409
    failed = error.value.response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC001]
    assert http.get(f"/studies/{spec.study_uid}/series/{intruder.SeriesInstanceUID}"
                    "/metadata").status_code == 404


def _reference(sop_class: str, sop_instance: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def test_searches_are_answered_while_many_uploads_are_being_stored(tmp_path):
    """STOW-RS stores on threads of its own: with every store stuck (a slow disk, a locked
    database), uploads wait, and searches still answer."""
    archive = open_archive(f"sqlite:///{tmp_path / 'index.sqlite'}", str(tmp_path / "blobs"))
    archive.store(part10(dataset(Spec(patient_id="BN-SEARCH"))))
    app = build_dicomweb(archive, Settings(data_dir=tmp_path))
    stuck, store = threading.Event(), archive.store
    archive.store = lambda *args, **kwargs: stuck.wait(60) and store(*args, **kwargs)
    uploads = 12  # four parts at a time each: more than all the threads requests share

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pacs",
                                     timeout=90) as client:
            posts = [asyncio.create_task(client.post("/studies", headers={
                "Content-Type": STOW_TYPE}, content=_multipart(
                    [("application/dicom", part10(dataset(Spec()))) for _ in range(4)])))
                for _ in range(uploads)]
            await asyncio.sleep(1)  # every upload read, its stores started
            try:
                search = await asyncio.wait_for(
                    client.get("/studies", params={"PatientID": "BN-SEARCH"}), 20)
            finally:
                stuck.set()
            return search, await asyncio.gather(*posts)

    search, posts = asyncio.run(run())
    assert search.status_code == 200 and len(search.json()) == 1
    assert [post.status_code for post in posts] == [200] * uploads


def test_instances_are_decoded_a_few_at_a_time(tmp_path, monkeypatch):
    """A converted or rendered instance is held in memory decoded (a small deflated file can
    inflate to hundreds of MB): requests beyond a few at once wait instead of adding up."""
    archive = open_archive(f"sqlite:///{tmp_path / 'index.sqlite'}", str(tmp_path / "blobs"))
    spec = Spec(patient_id="BN-DECODE")
    archive.store(part10(dataset(spec)))
    app = build_dicomweb(archive, Settings(data_dir=tmp_path))
    busy, most, lock = 0, 0, threading.Lock()
    real_transcode, real_render = wado.transcode.transcode, render.render_frame

    def counted(work):
        def run(*args, **kwargs):
            nonlocal busy, most
            with lock:
                busy += 1
                most = max(most, busy)
            try:
                time.sleep(0.2)
                return work(*args, **kwargs)
            finally:
                with lock:
                    busy -= 1
        return run

    monkeypatch.setattr(wado.transcode, "transcode", counted(real_transcode))
    monkeypatch.setattr(render, "render_frame", counted(real_render))
    base = f"/studies/{spec.study_uid}/series/{spec.series_uid}/instances/{spec.sop_uid}"

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pacs",
                                     timeout=60) as client:
            asks = [client.get(base, headers={"Accept": f"{DICOM_PARTS}; transfer-syntax="
                                                        "1.2.840.10008.1.2.5"})
                    for _ in range(6)]
            asks += [client.get(f"{base}/rendered", params={"window": f"{n},400"})
                     for n in range(6)]
            return await asyncio.gather(*asks)

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * 12
    assert most == slots.DECODE_SLOTS._initial_value


def test_stow_keeps_the_first_of_one_uid_and_answers_in_the_request_order(http):
    """Parts are stored a few at a time, but the answer follows the request, and of two parts
    with one SOP Instance UID the earlier one is kept (the later is the duplicate warning),
    also when no part between them would hold the later one back."""
    spec = Spec(patient_name="Phạm^Minh Đức", patient_id="BN-STOW-ORDER")
    first = dataset(spec)
    # A header of thousands of elements: slower to read than the later copy's.
    first.ReferencedImageSequence = [_reference(spec.sop_class, f"1.2.3.{n}")
                                     for n in range(10_000)]
    second = dataset(spec)
    second.StudyDescription = "the later copy"
    others = [part10(dataset(Spec(patient_name=spec.patient_name, patient_id=spec.patient_id,
                                  study_uid=spec.study_uid, series_uid=spec.series_uid)))
              for _ in range(5)]
    order = [part10(first), *others[:2], part10(second), *others[2:]]
    response = http.post("/studies", content=_multipart(
        [("application/dicom", data) for data in order]), headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 202  # one warning
    items = response.json()["00081199"]["Value"]
    uids = [pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for data in order]
    assert [item["00081155"]["Value"][0] for item in items] == uids
    assert [("00081196" in item) for item in items] == [False, False, False, True, False,
                                                         False, False]
    kept = http.get(f"/studies/{spec.study_uid}/series/{spec.series_uid}/instances/"
                    f"{spec.sop_uid}/metadata").json()[0]
    assert kept["00081030"]["Value"] == [spec.study_description]


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b""
    for content_type, payload in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def test_stow_bad_input_gets_clear_errors_and_stores_nothing_partial(http):
    good = part10(dataset(Spec(patient_name="Lê^Thị Hoa")))
    mixed = http.post("/studies", content=_multipart([("application/dicom", good),
                                                      ("application/dicom", b"not dicom")]),
                      headers={"Content-Type": STOW_TYPE})
    assert mixed.status_code == 202
    body = mixed.json()
    assert len(body["00081199"]["Value"]) == 1
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    truncated = good[: len(good) // 2]
    response = http.post("/studies", content=_multipart([("application/dicom", truncated)]),
                         headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 409
    in_meta = good[:good.index(b"\x02\x00\x01\x00OB") + 9]  # inside a File Meta header
    response = http.post("/studies", content=_multipart([("application/dicom", in_meta)]),
                         headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert http.post("/studies", content=b"{}",
                     headers={"Content-Type": "application/json"}).status_code == 415
    broken = http.post("/studies", content=b"--b0undary\r\nContent-Type: application/dicom\r\n",
                       headers={"Content-Type": STOW_TYPE})
    assert broken.status_code == 400
    assert "truncated" in broken.json()["message"] or "boundary" in broken.json()["message"]
    too_big = http.post("/studies", content=_multipart([("application/dicom",
                                                         b"\0" * (STOW_LIMIT + 10))]),
                        headers={"Content-Type": STOW_TYPE})
    assert too_big.status_code == 413
    assert http.get("/studies", params={"PatientName": "Lê^Thị Hoa"}).status_code == 200


def test_a_body_that_fails_after_stored_instances_is_answered_202_naming_them(http):
    # It was answered 400 or 413, as if nothing had been stored, while the instances before
    # the failure were stored (PS3.18 gives those codes to a request nothing of which was).
    first, second = (dataset(Spec(patient_name="Lê^Thị Hoa")) for _ in range(2))
    complete = _multipart([("application/dicom", part10(first))])[:-len("--b0undary--\r\n")]
    truncated = complete + b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" \
        + part10(second)[:100]
    too_large = complete + _multipart([("application/dicom", b"\0" * (STOW_LIMIT + 10))])

    for body, reason, words in ((truncated, 0xC000, "truncated"),
                                (too_large, 0xA700, "larger than")):
        # Chunked: a Content-Length past the limit is refused before anything is read.
        response = http.post("/studies", content=iter([body]),
                             headers={"Content-Type": STOW_TYPE})

        assert response.status_code == 202, response.text[:300]
        answer = response.json()
        assert [item["00081155"]["Value"] for item in answer["00081199"]["Value"]] == \
            [[first.SOPInstanceUID]]
        (other,) = answer["0008119A"]["Value"]
        assert other["00081197"]["Value"] == [reason] and words in other["00000902"]["Value"][0]
        assert words in response.headers["Warning"]
        assert "00081198" not in answer  # no instance of its own failed
    assert http.get(f"/studies/{first.StudyInstanceUID}/metadata").status_code == 200
    assert http.get(f"/studies/{second.StudyInstanceUID}/metadata").status_code == 404


def test_refused_parts_are_logged_ten_and_then_counted(server, http):
    # 40,000 tiny refused parts wrote 40,000 WARNING lines.
    parts = [("application/dicom", f"not DICOM {n}".encode()) for n in range(25)]

    response = http.post("/studies", content=_multipart(parts),
                         headers={"Content-Type": STOW_TYPE})

    assert response.status_code == 409 and len(response.json()["00081198"]["Value"]) == 25
    deadline = time.monotonic() + 5
    while "15 more instance(s) refused" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "15 more instance(s) refused in that request" in server.log()


# ---------------------------------------------------------------------------- DELETE, CORS


def test_delete_instance_series_and_study(client, http):
    spec = Spec(patient_name="Phạm^Văn Bảy")
    datasets = [dataset(Spec(**{**spec.__dict__, "sop_uid": Spec().sop_uid}))
                for _ in range(2)]
    client.store_instances([as_file(ds) for ds in datasets])
    base = f"/studies/{spec.study_uid}/series/{spec.series_uid}"
    assert http.delete(f"/studies/1.2.3/series/{spec.series_uid}").status_code == 404
    assert http.delete(f"{base}/instances/{datasets[0].SOPInstanceUID}").status_code == 204
    assert len(http.get(f"/studies/{spec.study_uid}/instances").json()) == 1
    assert http.delete(f"/studies/{spec.study_uid}").status_code == 204
    assert http.get(f"/studies/{spec.study_uid}/metadata").status_code == 404


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/dicomweb/studies", {"GET", "HEAD", "POST"}),
    ("PATCH", "/dicomweb/studies/1.2.3", {"GET", "HEAD", "POST", "DELETE"}),
    ("PUT", "/api/orders", {"GET", "HEAD", "POST"}),
    ("PUT", "/api/shares", {"GET", "HEAD", "POST"}),
])
def test_a_wrong_method_is_answered_405_naming_every_method_of_the_path(
        server, method, path, allowed):
    # The first route of a path answered alone: PUT /studies said "Allow: GET, HEAD".
    response = httpx.request(method, server.http + path)

    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == allowed


def test_cors_preflight_for_authorization_and_accept(http):
    response = http.options("/studies", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization, Accept"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "accept" in allowed
    other = http.options("/studies", headers={"Origin": "https://evil.example",
                                              "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_an_unexpected_error_is_answered_and_logged_once_without_its_message(caplog):
    # Starlette's last-resort handler answers a 500 and re-raises, so the server dropped the
    # connection (a client reusing it saw it reset) and logged the traceback twice, with the
    # exception's message, which can quote a patient's name.
    async def broken(request):
        raise RuntimeError("value 'Nguyễn^Văn An' refused")

    # The path is logged with its parameters named, but for UIDs: an accession number or a
    # share link's token in it identifies a patient or unlocks a study.
    app = Starlette(routes=[Route("/accession/{number}", broken),
                            Route("/studies/{study}/x", broken)],
                    middleware=[Middleware(ContainErrors)])

    async def call(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # raises what escapes the app
        async with httpx.AsyncClient(transport=transport, base_url="http://pacs") as client:
            return await client.get(path)

    with caplog.at_level(logging.INFO):
        response = asyncio.run(call("/accession/ACC-2024-0077"))
        asyncio.run(call("/studies/1.2.3.4/x"))
    assert response.status_code == 500
    assert response.json()["message"] == "internal error; see the server log"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("RuntimeError" in error for error in errors)
    assert "/accession/{number}" in errors[0] and "/studies/1.2.3.4/x" in errors[1]
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pacs"))
    assert "Nguyễn" not in ours and "ACC-2024-0077" not in ours


def test_pixel_data_that_cannot_be_decoded_is_refused_alone_and_sent_as_stored_in_a_series(
        server, http):
    # In a series, such an instance cut the stream, and every instance after it was lost.
    # pydicom logged a traceback per codec plugin, and the server one more for the cut stream.
    spec = Spec(patient_id="BN-CORRUPT")
    undecodable = dataset(spec)
    undecodable.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])  # no valid RLE header
    good = _rle(dataset(dataclasses.replace(spec, sop_uid=generate_uid(), instance_number=2)))
    # Two frames, the second undecodable: found once its first frame has been sent.
    half = _rle(dataset(dataclasses.replace(spec, sop_uid=generate_uid(),
                                            series_uid=generate_uid(), frames=2)))
    first = next(pydicom.encaps.generate_frames(half.PixelData, number_of_frames=2))
    half.PixelData = pydicom.encaps.encapsulate([first, b"\x00" * 64])
    stored = part10(undecodable, pydicom.uid.RLELossless)
    assert stow(server.http, [stored, part10(good, pydicom.uid.RLELossless),
                              part10(half, pydicom.uid.RLELossless)]).status_code == 200
    series = f"/studies/{spec.study_uid}/series/{spec.series_uid}"

    one = http.get(f"{series}/instances/{spec.sop_uid}", headers={"Accept": "application/dicom"})
    whole = http.get(series)

    assert one.status_code == 406 and "cannot convert" in one.json()["message"]
    assert whole.status_code == 200
    parts = {pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID: (headers, body)
             for headers, body in _parts(whole)}  # (stored side by side: in either order)
    (as_stored, stored_body), (converted, converted_body) = \
        parts[spec.sop_uid], parts[good.SOPInstanceUID]
    assert stored_body == stored and _part_syntax(as_stored) == pydicom.uid.RLELossless
    assert _part_syntax(converted) == EXPLICIT
    assert np.array_equal(pydicom.dcmread(io.BytesIO(converted_body)).pixel_array,
                          good.pixel_array)
    assert "transfer-syntax" not in whole.headers["content-type"]  # the parts differ
    assert f"instance {spec.sop_uid} sent as stored" in server.log()
    with pytest.raises(httpx.RemoteProtocolError):  # the body stops short: the client knows
        http.get(f"/studies/{spec.study_uid}/series/{half.SeriesInstanceUID}")
    assert http.get(f"{series}/metadata").status_code == 200  # the server goes on
    deadline = time.monotonic() + 10  # the server logs the cut as the client sees it
    while "cut short: NotTranscodable" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    assert "Traceback" not in log and "cut short: NotTranscodable" in log
    assert "without completing response" not in log  # uvicorn's line, which says no more


def _rle(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(part10(ds)))
    ds.compress(pydicom.uid.RLELossless)
    return ds


def test_an_upload_that_stops_arriving_is_answered_408_and_closed(start_server):
    # A client announcing a large STOW-RS body and then sending nothing held the connection,
    # and the request, for as long as it liked.
    server = start_server(PACS_HTTP_BODY_IDLE_TIMEOUT="1")
    for path, content_type, start in (
            ("/dicomweb/studies", STOW_TYPE, b"--b0undary\r\n"),
            ("/api/orders", "application/json", b'{"accession_number": "A'),
            ("/fhir/ServiceRequest", "application/fhir+json", b"{")):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as sock:
            # (Under the JSON routes' 1 MiB limit, which a larger announced body meets first.)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: pacs\r\nContent-Type: "
                         f"{content_type}\r\nContent-Length: 400000\r\n\r\n".encode() + start)
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), (path, answer[:200])
        assert b"request body" in answer
        assert 0.5 < waited < 15
    # A client that gives up half-way is nobody's error: no ERROR line for it.
    for path, content_type in (("/dicomweb/studies", STOW_TYPE),
                               ("/api/orders", "application/json")):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: pacs\r\nContent-Type: "
                         f"{content_type}\r\nContent-Length: 4000\r\n\r\n{{".encode())
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while server.log().count("went away") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("went away") == 2
    assert " ERROR " not in server.log(), server.log()[-2000:]
    assert httpx.get(server.http + "/healthz").status_code == 200


def test_server_keeps_serving_after_bad_requests(server, http):
    http.get("/studies?StudyDate=xx")
    http.post("/studies", content=b"junk", headers={"Content-Type": STOW_TYPE})
    assert httpx.get(server.http + "/healthz").status_code == 200



# ---------------------------------------------------------------------------- rendered


def _ct_with_window(photometric: str = "MONOCHROME2") -> pydicom.Dataset:
    """16x16 CT: left half stored 1024 (0 HU), right half 2024 (1000 HU); window 40/400."""
    ds = dataset(Spec(rows=16, columns=16, patient_name="Võ^Thị Cúc"))
    pixels = np.full((16, 16), 1024, dtype=np.uint16)
    pixels[:, 8:] = 2024
    ds.PixelData = pixels.tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PhotometricInterpretation = photometric
    return ds


def _first_part(response: httpx.Response) -> bytes:
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(b"--" + boundary.encode())[1]
    return part.split(b"\r\n\r\n", 1)[1][:-2]  # headers off, CRLF before the delimiter off


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def _stored(client, ds) -> str:
    client.store_instances([as_file(ds)])
    return (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def test_rendered_applies_rescale_and_file_window_and_inverts_monochrome1(client, http):
    normal = _png(http.get(_stored(client, _ct_with_window()) + "/rendered",
                           headers={"Accept": "image/png"}).content)
    expected_left = round((0 - (40 - 0.5 - 399 / 2)) / 399 * 255)  # PS3.3 linear window
    assert abs(int(normal[0, 0]) - expected_left) <= 1
    assert normal[0, 15] == 255
    inverted = _png(http.get(_stored(client, _ct_with_window("MONOCHROME1")) + "/rendered",
                             headers={"Accept": "image/png"}).content)
    assert abs(int(inverted[0, 0]) - (255 - expected_left)) <= 1 and inverted[0, 15] == 0
    wide = _png(http.get(_stored(client, _ct_with_window()) + "/rendered",
                         params={"window": "600,1200"}, headers={"Accept": "image/png"}).content)
    assert 200 < wide[0, 15] < 225  # 1000 HU inside a window from 0 to 1200 HU


def test_rendered_for_a_browser_img_request_is_jpeg_and_viewport_scales(client, http):
    url = _stored(client, _ct_with_window())
    response = http.get(url + "/rendered", headers={"Accept": "image/avif,image/webp,*/*"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).format == "JPEG"
    scaled = http.get(url + "/rendered", params={"viewport": "64,32", "accept": "image/png"})
    assert Image.open(io.BytesIO(scaled.content)).size == (32, 32)
    assert http.get(url + "/rendered", params={"quality": "500"}).status_code == 400
    assert http.get(url + "/rendered", headers={"Accept": "application/pdf"}).status_code == 406


def test_rendered_frames_colour_and_thumbnails(client, http, study):
    spec, mf = study["spec"], study["multiframe"]
    frame = http.get(f"/studies/{spec.study_uid}/series/{mf.SeriesInstanceUID}/instances/"
                     f"{mf.SOPInstanceUID}/frames/2/rendered", params={"accept": "image/png"})
    assert _png(frame.content).shape == (16, 16)
    rgb = dataset(Spec(rows=4, columns=4))
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = np.tile(np.array([200, 30, 10], np.uint8), 16).tobytes()
    colour = _png(http.get(_stored(client, rgb) + "/rendered",
                           params={"accept": "image/png"}).content)
    assert tuple(colour[0, 0]) == (200, 30, 10)
    for url in (f"/studies/{spec.study_uid}/thumbnail",
                f"/studies/{spec.study_uid}/series/{mf.SeriesInstanceUID}/thumbnail"):
        thumb = http.get(url, headers={"Accept": "image/jpeg"})
        assert thumb.status_code == 200, url
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 200


def test_rendered_instance_without_pixels_is_refused_clearly(client, http):
    ds = dataset(Spec())
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "SamplesPerPixel", "PhotometricInterpretation", "PixelRepresentation"):
        delattr(ds, keyword)
    url = _stored(client, ds)
    assert http.get(url + "/rendered").status_code == 422
    series = url.rsplit("/instances/", 1)[0]
    response = http.get(series + "/thumbnail")
    assert response.status_code == 404 and "no image" in response.json()["message"]


# ---------------------------------------------------------------------------- WADO-URI


def test_wado_uri_dicom_and_jpeg(server, study):
    spec, ct = study["spec"], study["ct"][0]
    params = {"requestType": "WADO", "studyUID": spec.study_uid,
              "seriesUID": ct.SeriesInstanceUID, "objectUID": ct.SOPInstanceUID}
    for base in (server.http + "/wado", server.http + "/dicomweb/wado"):
        dicom = httpx.get(base, params={**params, "contentType": "application/dicom"})
        assert dicom.headers["content-type"] == "application/dicom"
        assert int(dicom.headers["content-length"]) == len(dicom.content)
        assert pydicom.dcmread(io.BytesIO(dicom.content)).SOPInstanceUID == ct.SOPInstanceUID
        jpeg = httpx.get(base, params=params)
        assert jpeg.headers["content-type"] == "image/jpeg"
    missing = httpx.get(server.http + "/wado", params={**params, "objectUID": ""})
    assert missing.status_code == 400 and "objectUID" in missing.json()["message"]
    unknown = httpx.get(server.http + "/wado", params={**params, "objectUID": "1.2.3"})
    assert unknown.status_code == 404


def test_wado_uri_content_type_is_negotiated_like_accept(server, mixed_study):
    def get(ds: pydicom.Dataset, **more: str) -> httpx.Response:
        return httpx.get(server.http + "/wado", params={
            "requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID, **more})

    ct, sr = mixed_study["ct"], mixed_study["sr"]
    # Media ranges and weights, as in Accept (they were all 406).
    for content_type, expected in (("image/*", "image/jpeg"), ("*/*", "image/jpeg"),
                                   ("image/jpeg;q=0.5, image/png", "image/png"),
                                   ("application/*", "application/dicom"),
                                   ("application/dicom;q=0.1, image/jpeg", "image/jpeg")):
        response = get(ct, contentType=content_type)
        assert response.status_code == 200, (content_type, response.text[:200])
        assert response.headers["content-type"] == expected, content_type
    # A non-image object without a content type, or with any that allows it: the file
    # (without one it was 422 "no pixel data").
    for more in ({}, {"contentType": "*/*"}, {"contentType": "image/jpeg, application/dicom"}):
        response = get(sr, **more)
        assert response.status_code == 200, (more, response.text[:200])
        assert pydicom.dcmread(io.BytesIO(response.content)).SOPInstanceUID == sr.SOPInstanceUID
    refused = get(sr, contentType="image/jpeg")
    assert refused.status_code == 406 and "application/dicom" in refused.json()["message"]
    # Refusals name the WADO-URI parameters (they named WADO-RS's window and viewport).
    alone = get(ct, windowCenter="40")
    assert alone.status_code == 400 and "windowWidth" in alone.json()["message"]
    for more, name in (({"windowCenter": "40", "windowWidth": "-1"}, "windowCenter,windowWidth"),
                       ({"rows": "0"}, "rows,columns"), ({"imageQuality": "200"}, "imageQuality")):
        response = get(ct, **more)
        assert response.status_code == 400 and response.json()["message"].startswith(name), more


@pytest.mark.parametrize("query", [
    "/instances?InstanceNumber=99999999999999999999", "/series?SeriesNumber=-99999999999999999999",
    "/instances?InstanceNumber=1%5C99999999999999999999", "/instances?InstanceNumber=%EF%BC%91",
])
def test_qido_integer_values_beyond_64_bits_are_400(http, study, query):
    response = http.get(query)  # the database's integers overflowed: a 500
    assert response.status_code == 400, response.text
    assert "is not an integer" in response.json()["message"]


@pytest.mark.parametrize("path", [
    "/studies/%20/metadata", "/studies/%2A/metadata", "/studies/%09/metadata", "/studies/%2A",
    "/studies/1.2.3%5C1.2.4/metadata", "/studies/1..2/metadata", "/studies/%2A/series",
    "/studies/%2A/instances", "/studies/%2A/rendered", "/studies/%2A/thumbnail",
])
def test_a_path_that_is_not_one_uid_is_refused_never_matched(http, study, path):
    # Matched as a C-FIND key, a blank or "*" study UID would be every study of every patient
    # (the whole archive in one WADO-RS answer).
    response = http.get(path)
    assert response.status_code == 400, (path, response.status_code, len(response.content))
    assert "is not a UID" in response.json()["message"]


def test_launch_links_film_wado_uri_and_stow_refuse_what_is_not_one_study(server, study):
    spec, ct = study["spec"], study["ct"][0]
    with httpx.Client(base_url=server.http, timeout=30) as web:
        for path in ["/studies/%2A", "/studies/%20", "/accession/%2A", "/accession/%20",
                     "/IHEInvokeImageDisplay?requestType=STUDY&studyUID=,,,",
                     "/IHEInvokeImageDisplay?requestType=STUDY&studyUID=*",
                     "/IHEInvokeImageDisplay?requestType=STUDY&accessionNumber=ACC*",
                     "/IHEInvokeImageDisplay?requestType=PATIENT&patientID=*",
                     "/api/studies/%2A/film.png", "/api/studies/%20/film.pdf",
                     "/wado?requestType=WADO&studyUID=%20&seriesUID=%20&objectUID=%20"
                     "&contentType=application/dicom"]:
            response = web.get(path)
            assert response.status_code == 400, (path, response.status_code)
        film = web.post("/api/studies/%2A/film")  # a film of every patient, stored in none
        assert film.status_code == 400 and "not a UID" in film.json()["message"]
        stow_to = web.post("/dicomweb/studies/abc", content=b"x",
                           headers={"Content-Type": STOW_TYPE})
        assert stow_to.status_code == 400 and "not a UID" in stow_to.json()["message"]
        # The study itself still opens, by UID, by accession number and through IID.
        assert web.get(f"/studies/{spec.study_uid}").status_code == 302
        assert web.get(f"/accession/{spec.accession}").status_code == 302
        assert web.get("/IHEInvokeImageDisplay", params={
            "requestType": "STUDY", "studyUID": spec.study_uid}).status_code == 302
        assert web.get("/wado", params={
            "requestType": "WADO", "studyUID": spec.study_uid, "seriesUID":
            ct.SeriesInstanceUID, "objectUID": ct.SOPInstanceUID, "frameNumber": "0"}
                       ).status_code == 400
        assert web.get("/wado", params={
            "requestType": "WADO", "studyUID": spec.study_uid, "seriesUID":
            ct.SeriesInstanceUID, "objectUID": ct.SOPInstanceUID, "frameNumber": "2"}
                       ).status_code == 404  # one frame


@pytest.mark.parametrize("frames", ["1,1", "2,1,2", "1,,2", "+1", "%201", "1_0", "%D9%A1"])
def test_frame_lists_are_plain_numbers_each_once(http, study, frames):
    # "60" repeated 200 times made a 184 MB answer from a 1 KB URL.
    spec, mf = study["spec"], study["multiframe"]
    base = f"/studies/{spec.study_uid}/series/{mf.SeriesInstanceUID}/instances/{mf.SOPInstanceUID}"
    for path in (f"{base}/frames/{frames}", f"{base}/frames/{frames}/rendered"):
        response = http.get(path)
        assert response.status_code == 400, (path, response.status_code)
        assert "frame" in response.json()["message"]
    assert http.get(f"{base}/frames/5/rendered").status_code == 404  # 4 frames, as /frames/5


def test_bulkdata_by_path_only_for_binary_elements(http, study):
    spec, mf = study["spec"], study["multiframe"]
    base = (f"/studies/{spec.study_uid}/series/{mf.SeriesInstanceUID}/instances/"
            f"{mf.SOPInstanceUID}/bulkdata/path/")
    # A number would have come back as that many zero bytes, a name as a 500.
    for path in ("00280010", "00200013", "00100010", "00100010/0/00100010"):
        response = http.get(base + path)
        assert response.status_code == 404, (path, response.status_code, len(response.content))
    pixels = http.get(base + "7FE00010")
    assert pixels.status_code == 200 and pixels.content == mf.PixelData
    range_without_dash = http.get(base + "7FE00010", headers={"Range": "bytes=5"})
    assert range_without_dash.status_code == 200  # RFC 9110 14.1.1: invalid, ignored
    assert range_without_dash.content == mf.PixelData


def test_openapi_describes_every_route(server):
    from dicomweb.app import build_dicomweb
    from dicomweb.openapi import openapi_document

    document = httpx.get(server.http + "/dicomweb/openapi.json").json()
    assert document == json.loads(json.dumps(openapi_document()))
    app = build_dicomweb(archive=None, settings=Settings())
    for route in app.routes:
        path = route.path.replace(":path}", "}")
        if path == "/openapi.json":
            continue
        assert path in document["paths"], path
        for method in route.methods - {"HEAD"}:
            assert method.lower() in document["paths"][path], (method, path)


def test_retrieve_transcodes_to_lossless_syntaxes_and_refuses_lossy(http, study):
    spec, ct = study["spec"], study["ct"][0]
    url = f"/studies/{spec.study_uid}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    for syntax in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2"):
        response = http.get(url, headers={
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'})
        assert response.status_code == 200, (syntax, response.text[:200])
        assert f"transfer-syntax={syntax}" in response.headers["content-type"]
        received = pydicom.dcmread(io.BytesIO(_first_part(response)))
        assert received.file_meta.TransferSyntaxUID == syntax
        assert received.SOPInstanceUID == ct.SOPInstanceUID  # the same instance, re-encoded
        assert received.file_meta.MediaStorageSOPInstanceUID == ct.SOPInstanceUID
        expected = np.frombuffer(ct.PixelData, np.uint16).reshape(ct.Rows, ct.Columns)
        assert np.array_equal(received.pixel_array, expected), syntax
    lossy = http.get(url, headers={
        "Accept": 'multipart/related; type="application/dicom"; '
                  'transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert lossy.status_code == 406
    assert "transfer-syntax=*" in lossy.json()["message"]


# ---------------------------------------------------------------------------- single part


DICOM_PARTS = 'multipart/related; type="application/dicom"'


def test_instance_asked_as_application_dicom_is_one_part10_file(http, study):
    spec, ct = study["spec"], study["ct"][0]
    url = f"/studies/{spec.study_uid}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"

    response = http.get(url, headers={"Accept": "application/dicom"})

    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == \
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"  # the PS3.18 default
    assert int(response.headers["content-length"]) == len(response.content)
    received = pydicom.dcmread(io.BytesIO(response.content))
    assert received.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert received.SOPInstanceUID == ct.SOPInstanceUID
    assert received.PatientName == "Nguyễn^Văn An"
    assert received.PixelData == ct.PixelData
    # The same file as the one part of the multipart answer.
    multipart = http.get(url, headers={"Accept": f"{DICOM_PARTS}; transfer-syntax=*"})
    assert _first_part(multipart) == response.content


def test_the_accept_query_parameter_wins_over_the_header(http, study):
    """PS3.18 8.3.3.1: a link (a download button, an <img>) cannot set Accept."""
    spec, ct = study["spec"], study["ct"][0]
    url = f"/studies/{spec.study_uid}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}

    file = http.get(url, params={"accept": "application/dicom"}, headers=browser)
    assert file.headers["content-type"].startswith("application/dicom;")
    assert pydicom.dcmread(io.BytesIO(file.content)).SOPInstanceUID == ct.SOPInstanceUID
    found = http.get("/studies", params={"StudyInstanceUID": spec.study_uid,
                                         "accept": "application/dicom+json"}, headers=browser)
    assert found.status_code == 200 and len(found.json()) == 1
    refused = http.get("/studies", params={"accept": "application/xml"})
    assert refused.status_code == 406
    metadata = http.get(f"/studies/{spec.study_uid}/metadata",
                        params={"accept": "image/png"})
    assert metadata.status_code == 406


def test_single_part_instance_honours_transfer_syntax_like_multipart(client, http):
    original = pydicom.dcmread(io.BytesIO(part10(dataset(Spec(rows=16, columns=16)))))
    original.compress(pydicom.uid.RLELossless)
    stored = part10(original, pydicom.uid.RLELossless)
    assert http.post("/studies", content=_multipart([("application/dicom", stored)]),
                     headers={"Content-Type": STOW_TYPE}).status_code == 200
    url = (f"/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}"
           f"/instances/{original.SOPInstanceUID}")
    pixels = original.pixel_array

    as_stored = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert as_stored.status_code == 200
    assert as_stored.headers["content-type"] == \
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.5"
    assert as_stored.content == stored  # byte for byte, as archived
    assert as_stored.headers["content-length"] == str(len(stored))

    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"):  # decoded; re-encoded
        converted = http.get(url, headers={
            "Accept": f"application/dicom; transfer-syntax={syntax}"})
        assert converted.status_code == 200, (syntax, converted.text[:300])
        assert converted.headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        assert int(converted.headers["content-length"]) == len(converted.content)
        received = pydicom.dcmread(io.BytesIO(converted.content))
        assert received.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(received.pixel_array, pixels), syntax

    lossy = http.get(url, headers={
        "Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert lossy.status_code == 406
    assert "transfer-syntax=*" in lossy.json()["message"]


@pytest.mark.parametrize("level", ["study", "series"])
def test_study_or_series_asked_only_as_application_dicom_is_406_naming_multipart(
        http, study, level):
    spec, ct = study["spec"], study["ct"][0]
    url = f"/studies/{spec.study_uid}"
    if level == "series":
        url += f"/series/{ct.SeriesInstanceUID}"

    response = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})

    assert response.status_code == 406
    message = response.json()["message"]
    assert DICOM_PARTS in message and level in message
    # Passed over, not refused: a multipart entry further down the list is served.
    both = http.get(url, headers={"Accept": f"application/dicom, {DICOM_PARTS}; q=0.5"})
    assert both.status_code == 200
    assert both.headers["content-type"].startswith(DICOM_PARTS)


@pytest.mark.parametrize(("accept", "single_part"), [
    (f"{DICOM_PARTS}, application/dicom;q=0.5", False),
    (f"application/dicom;q=0.5, {DICOM_PARTS}", False),
    (f"{DICOM_PARTS};q=0.4, application/dicom", True),
    (f"application/dicom;q=0, {DICOM_PARTS}", False),
    ("application/dicom, */*;q=0.1", True),
    ("*/*", False),  # the default media type is the multipart one
])
def test_accept_weights_choose_between_single_part_and_multipart(http, study, accept,
                                                                 single_part):
    spec, ct = study["spec"], study["ct"][1]
    url = f"/studies/{spec.study_uid}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"

    response = http.get(url, headers={"Accept": accept})

    assert response.status_code == 200, response.text[:300]
    body = response.content if single_part else _first_part(response)
    assert response.headers["content-type"].startswith(
        "application/dicom;" if single_part else DICOM_PARTS)
    assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == ct.SOPInstanceUID


@pytest.mark.parametrize(("path", "status"), [
    ("/studies/abc/metadata", 400), ("/studies/1.2/series/1.3/instances/1.4/frames/x", 400),
    ("/studies/1.2/series/1.3/instances/1.4/frames/0", 400),
    ("/studies/1.2/series/1.3/instances/1.4/bulkdata/../../etc", 400),  # "etc": not a UID
    ("/studies/1.2/series/1.3/instances/1.4/bulkdata/x", 404),
    ("/studies/1.2/thumbnail", 404), ("/nothing-here", 404),
])
def test_odd_urls_get_clear_client_errors(http, path, status):
    response = http.get(path)
    assert response.status_code == status, response.text


# ---------------------------------------------------------------------------- bulk data, byte
# order, content coding, ranges, WADO-URI default syntax


def _store_part10(http, data: bytes) -> None:
    response = http.post("/studies", content=_multipart([("application/dicom", data)]),
                         headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 200, response.text[:300]


def _instance_path(ds: pydicom.Dataset) -> str:
    return (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def _parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of each part of a multipart/related response."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = []
    for raw in response.content.split(b"--" + boundary.encode())[1:-1]:
        head, body = raw[2:].split(b"\r\n\r\n", 1)
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, body[:-2]))
    return parts


@pytest.fixture(scope="module")
def big_endian(http):
    """An Explicit VR Big Endian instance with an OW and an OF bulk value and 16-bit pixels."""
    ds = dataset(Spec(rows=16, columns=16))
    lut = np.arange(2048, dtype=np.uint16)
    points = np.linspace(-1.5, 1.5, 512, dtype=np.float32)
    pixels = np.frombuffer(ds.PixelData, "<u2").copy()
    ds.add_new(0x00281221, "OW", lut.astype(">u2").tobytes())  # Segmented Red Palette LUT
    ds.add_new(0x00660016, "OF", points.astype(">f4").tobytes())  # Point Coordinates Data
    ds.PixelData = pixels.astype(">u2").tobytes()
    _store_part10(http, part10(ds, pydicom.uid.ExplicitVRBigEndian))
    metadata = http.get(f"{_instance_path(ds)}/metadata").json()[0]
    return {"ds": ds, "metadata": metadata, "lut": lut.astype("<u2").tobytes(),
            "points": points.astype("<f4").tobytes(), "pixels": pixels.tobytes()}


def test_qido_leaves_out_bulk_data_it_cannot_give_and_says_so(http, study):
    mf = study["multiframe"]  # RedPaletteColorLookupTableData: 2 KB, bulk data in the index
    for path in (f"/instances?SOPInstanceUID={mf.SOPInstanceUID}",
                 f"/studies/{mf.StudyInstanceUID}/series?SeriesInstanceUID="
                 f"{mf.SeriesInstanceUID}"):
        response = http.get(f"{path}&includefield=00281201&includefield=00280004")

        assert response.status_code == 200, response.text[:300]
        assert "bulk:" not in response.text
        answer = response.json()[0]
        assert "00281201" not in answer  # no internal reference, and no empty value either
        assert answer["00280004"]["Value"] == ["MONOCHROME2"]
        assert "00281201" in response.headers["warning"]


def test_qido_leaves_bulk_data_out_of_sequence_items(http):
    ds = dataset(Spec(rows=16, columns=16))
    icon = pydicom.Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated = 32, 64, 8
    icon.PixelData = bytes(range(256)) * 8  # 2 KB: bulk data
    ds.IconImageSequence = [icon]
    _store_part10(http, part10(ds))

    response = http.get("/instances", params={"SOPInstanceUID": ds.SOPInstanceUID,
                                              "includefield": "IconImageSequence"})

    assert response.status_code == 200 and "bulk:" not in response.text
    item = response.json()[0]["00880200"]["Value"][0]
    assert "7FE00010" not in item
    assert item["00280010"]["Value"] == [32]


def test_bulk_data_of_a_big_endian_instance_comes_little_endian(http, big_endian):
    lut_uri = big_endian["metadata"]["00281221"]["BulkDataURI"]
    points_uri = big_endian["metadata"]["00660016"]["BulkDataURI"]
    octets = {"Accept": "application/octet-stream"}

    lut = httpx.get(lut_uri, headers=octets)
    points = httpx.get(points_uri, headers=octets)
    partial = httpx.get(lut_uri, headers={**octets, "Range": "bytes=2-7"})

    assert lut.status_code == 200 and lut.content[:6] == b"\x00\x00\x01\x00\x02\x00"
    assert lut.content == big_endian["lut"]
    assert points.content == big_endian["points"]  # 4-byte words for OF
    assert partial.status_code == 206 and partial.content == big_endian["lut"][2:8]
    multipart = httpx.get(lut_uri, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'})
    assert _parts(multipart)[0][1] == big_endian["lut"]


def test_bulk_data_by_path_of_a_big_endian_instance_comes_little_endian(http, big_endian):
    base = f"{_instance_path(big_endian['ds'])}/bulkdata/path/"

    lut = http.get(base + "00281221", headers={"Accept": "application/octet-stream"})
    pixels = http.get(base + "7FE00010", headers={"Accept": "application/octet-stream"})

    assert lut.status_code == 200 and lut.content == big_endian["lut"]
    assert pixels.status_code == 200 and pixels.content == big_endian["pixels"]


def test_8_bit_pixel_data_stored_as_ow_big_endian_comes_in_pixel_order(http):
    # Two pixels a 16-bit word: the bytes of each pair were sent swapped (the metadata, and
    # so the byte-order rule, knew the value as OB).
    ds = dataset(Spec(rows=8, columns=8))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    pixels = np.arange(64, dtype=np.uint8)
    ds.PixelData = pixels.reshape(-1, 2)[:, ::-1].tobytes()  # as 16-bit big endian words
    ds["PixelData"].VR = "OW"
    stored = part10(ds, pydicom.uid.ExplicitVRBigEndian)
    assert np.array_equal(pydicom.dcmread(io.BytesIO(stored)).pixel_array.ravel(), pixels)
    _store_part10(http, stored)

    bulk = http.get(f"{_instance_path(ds)}/bulkdata/path/7FE00010",
                    headers={"Accept": "application/octet-stream"})
    frame = http.get(f"{_instance_path(ds)}/frames/1")

    assert bulk.status_code == 200 and bulk.content == pixels.tobytes()
    assert _parts(frame)[0][1] == pixels.tobytes()


def test_bulk_data_multipart_part_names_its_uri_in_content_location(http, study):
    mf = study["multiframe"]
    metadata = http.get(f"{_instance_path(mf)}/metadata").json()[0]
    uri = metadata["00281201"]["BulkDataURI"]

    response = httpx.get(uri, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'})

    assert response.status_code == 200
    [(headers, body)] = _parts(response)
    assert headers["content-location"] == uri
    assert headers["content-type"] == "application/octet-stream"
    assert body == mf.RedPaletteColorLookupTableData
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.parametrize("header", [
    "bytes=5-3", "bytes=abc", "bytes=5", "bytes=", "bytes=1-2,abc", "items=0-1", "bytes=0-1, 4-5",
])
def test_an_invalid_or_unsupported_range_is_ignored_and_the_whole_value_sent(http, study,
                                                                          header):
    mf = study["multiframe"]
    url = f"{_instance_path(mf)}/bulkdata/path/00281201"

    response = http.get(url, headers={"Accept": "application/octet-stream", "Range": header})

    assert response.status_code == 200, (header, response.status_code)
    assert response.content == mf.RedPaletteColorLookupTableData
    assert "content-range" not in response.headers


def test_ranges_past_the_end_are_416_and_if_range_sends_the_whole(http, study):
    mf = study["multiframe"]
    url = f"{_instance_path(mf)}/bulkdata/path/00281201"
    size = len(mf.RedPaletteColorLookupTableData)
    octets = {"Accept": "application/octet-stream"}

    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0",
                   "bytes=" + "9" * 5000 + "-"):
        response = http.get(url, headers={**octets, "Range": header})
        assert response.status_code == 416, header[:40]
        assert response.headers["content-range"] == f"bytes */{size}"
    suffix = http.get(url, headers={**octets, "Range": "bytes=-5"})
    assert suffix.status_code == 206 and suffix.content == mf.RedPaletteColorLookupTableData[-5:]
    assert suffix.headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"
    conditional = http.get(url, headers={**octets, "Range": "bytes=0-9",
                                         "If-Range": '"some-etag"'})
    assert conditional.status_code == 200 and len(conditional.content) == size


def test_metadata_gzip_only_when_acceptable_with_an_etag_per_coding(http, study):
    url = f"/studies/{study['spec'].study_uid}/metadata"

    refused = http.get(url, headers={"Accept-Encoding": "gzip;q=0, identity"})
    plain = http.get(url, headers={"Accept-Encoding": "identity"})
    zipped = http.get(url, headers={"Accept-Encoding": "gzip"})
    preferred = http.get(url, headers={"Accept-Encoding": "gzip;q=0.5, identity"})

    assert "content-encoding" not in refused.headers and len(refused.json()) == 4
    assert "content-encoding" not in preferred.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert refused.headers["etag"] == plain.headers["etag"] == preferred.headers["etag"]
    assert zipped.headers["etag"] == plain.headers["etag"][:-1] + '-gzip"'
    for response in (plain, zipped):
        assert "Accept-Encoding" in response.headers["vary"]


def test_metadata_if_none_match_compares_the_etag_of_the_coding_sent(http, study):
    url = f"/studies/{study['spec'].study_uid}/metadata"
    plain_etag = http.get(url, headers={"Accept-Encoding": "identity"}).headers["etag"]
    gzip_etag = http.get(url, headers={"Accept-Encoding": "gzip"}).headers["etag"]

    def conditional(encoding: str, if_none_match: str) -> httpx.Response:
        return http.get(url, headers={"Accept-Encoding": encoding,
                                      "If-None-Match": if_none_match})

    assert conditional("gzip", plain_etag).status_code == 200  # another representation
    assert conditional("identity", gzip_etag).status_code == 200
    assert conditional("gzip", f'"other", {gzip_etag}').status_code == 304
    assert conditional("identity", f"W/{plain_etag}").status_code == 304  # weak comparison
    everything = conditional("gzip", "*")
    assert everything.status_code == 304 and everything.content == b""
    assert everything.headers["etag"] == gzip_etag
    assert "Accept-Encoding" in everything.headers["vary"]
    assert everything.headers["cache-control"] == "private, no-cache"
    assert "content-encoding" not in everything.headers


def _jpeg_baseline_instance() -> tuple[pydicom.Dataset, bytes]:
    """A lossy JPEG Baseline instance (8-bit grey), as a modality would send it."""
    ds = dataset(Spec(rows=16, columns=16))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    image = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(image, "JPEG")
    ds.PixelData = pydicom.encaps.encapsulate([image.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds, part10(ds, pydicom.uid.JPEGBaseline8Bit)


def test_wado_uri_dicom_defaults_to_explicit_little_endian_except_lossy(server, http):
    rle = pydicom.dcmread(io.BytesIO(part10(dataset(Spec(rows=16, columns=16)))))
    rle.compress(pydicom.uid.RLELossless)
    rle_file = part10(rle, pydicom.uid.RLELossless)
    jpeg, jpeg_file = _jpeg_baseline_instance()
    for data in (rle_file, jpeg_file):
        _store_part10(http, data)

    def wado_uri(ds: pydicom.Dataset, **extra: str) -> httpx.Response:
        return httpx.get(server.http + "/wado", params={
            "requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
            "contentType": "application/dicom", **extra})

    converted = wado_uri(rle)
    as_asked = wado_uri(rle, transferSyntax=pydicom.uid.RLELossless)
    lossy = wado_uri(jpeg)

    assert converted.status_code == 200, converted.text[:300]
    received = pydicom.dcmread(io.BytesIO(converted.content))
    assert received.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert np.array_equal(received.pixel_array, rle.pixel_array)
    assert int(converted.headers["content-length"]) == len(converted.content)
    assert as_asked.content == rle_file
    assert lossy.status_code == 200 and lossy.content == jpeg_file  # as received


def test_multipart_wildcard_accepts_bulk_data_and_rendered_parts(http, study):
    mf = study["multiframe"]
    bulk_url = f"{_instance_path(mf)}/bulkdata/path/00281201"

    bulk = http.get(bulk_url, headers={"Accept": "multipart/*"})
    any_application = http.get(bulk_url, headers={"Accept": "application/*"})
    rendered = http.get(f"{_instance_path(mf)}/rendered",
                        headers={"Accept": 'multipart/*; type="image/png"'})

    assert bulk.status_code == 200 and bulk.headers["content-type"].startswith("multipart/")
    assert _parts(bulk)[0][1] == mf.RedPaletteColorLookupTableData
    assert any_application.headers["content-type"] == "application/octet-stream"
    assert rendered.status_code == 200, rendered.text[:200]
    assert _parts(rendered)[0][0]["content-type"] == "image/png"


# ---------------------------------------------------------------------------- transfer syntaxes
# PS3.18 8.7.3.4: without a transfer syntax asked for, Explicit VR Little Endian, except pixel
# data the server has only lossy compressed, sent as received; each part names its own syntax
# (8.7.8.2 note 1). PS3.5 A.4: the compressed syntaxes are for pixel data only.


def _without_pixel_data(ds: pydicom.Dataset, sop_class: str, modality: str) -> pydicom.Dataset:
    for keyword in ("PixelData", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
                    "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.SOPClassUID, ds.Modality = sop_class, modality
    return ds


@pytest.fixture(scope="module")
def mixed_study(http):
    """A study as a clinic has them: a CT slice, a 3-frame RLE image, a JPEG Baseline image
    (lossy, as the modality sent it) and a Basic Text SR (no pixel data)."""
    spec = Spec(patient_id="BN-MIXED", patient_name="Võ^Thị Mai")

    def member(**more) -> pydicom.Dataset:
        return dataset(Spec(**{**spec.__dict__, "sop_uid": Spec().sop_uid,
                               "series_uid": Spec().series_uid, **more}))

    ct = member(rows=16, columns=16)
    rle = member(rows=16, columns=16, frames=3, modality="MR")
    rle_pixels = np.frombuffer(rle.PixelData, np.uint16).reshape(3, 16, 16)
    rle.file_meta = pydicom.dataset.FileMetaDataset()
    rle.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    rle.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    jpeg = member(rows=16, columns=16, modality="XC")
    jpeg.BitsAllocated, jpeg.BitsStored, jpeg.HighBit = 8, 8, 7
    image = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(image, "JPEG")
    jpeg.PixelData = pydicom.encaps.encapsulate([image.getvalue()])
    jpeg["PixelData"].VR = "OB"
    jpeg.LossyImageCompression = "01"
    sr = _without_pixel_data(member(), "1.2.840.10008.5.1.4.1.1.88.11", "SR")
    files = {ct.SOPInstanceUID: part10(ct), rle.SOPInstanceUID: part10(rle, RLE),
             jpeg.SOPInstanceUID: part10(jpeg, pydicom.uid.JPEGBaseline8Bit),
             sr.SOPInstanceUID: part10(sr)}
    for data in files.values():
        _store_part10(http, data)
    return {"spec": spec, "ct": ct, "rle": rle, "rle_pixels": rle_pixels, "jpeg": jpeg,
            "sr": sr, "files": files}


RLE = pydicom.uid.RLELossless
EXPLICIT = pydicom.uid.ExplicitVRLittleEndian


def _part_syntax(headers: dict[str, str]) -> str:
    return headers["content-type"].split("transfer-syntax=")[1]


@pytest.mark.parametrize("accept", [None, "*/*", DICOM_PARTS])
def test_a_study_with_a_jpeg_baseline_image_and_an_sr_retrieves_whole_by_default(
        http, mixed_study, accept):
    study = mixed_study
    headers = {"Accept": accept} if accept else {}

    response = http.get(f"/studies/{study['spec'].study_uid}", headers=headers)

    assert response.status_code == 200, response.text[:300]
    parts = _parts(response)
    received = {}
    for part_headers, body in parts:
        ds = pydicom.dcmread(io.BytesIO(body))
        assert _part_syntax(part_headers) == ds.file_meta.TransferSyntaxUID  # labelled
        received[ds.SOPInstanceUID] = (ds, body)
    assert received.keys() == study["files"].keys()  # every instance, none cut off
    jpeg_uid = study["jpeg"].SOPInstanceUID
    assert received[jpeg_uid][1] == study["files"][jpeg_uid]  # lossy: as received
    for name in ("ct", "rle", "sr"):
        ds, _ = received[study[name].SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT, name
    rle, _ = received[study["rle"].SOPInstanceUID]
    assert np.array_equal(rle.pixel_array, study["rle_pixels"])
    # The parts differ: the answer as a whole names no one syntax.
    assert "transfer-syntax" not in response.headers["content-type"]


def test_dicomweb_client_retrieves_the_whole_mixed_study(client, mixed_study):
    retrieved = client.retrieve_study(mixed_study["spec"].study_uid)

    syntaxes = {ds.SOPInstanceUID: ds.file_meta.TransferSyntaxUID for ds in retrieved}
    assert syntaxes == {mixed_study["ct"].SOPInstanceUID: EXPLICIT,
                        mixed_study["rle"].SOPInstanceUID: EXPLICIT,
                        mixed_study["jpeg"].SOPInstanceUID: pydicom.uid.JPEGBaseline8Bit,
                        mixed_study["sr"].SOPInstanceUID: EXPLICIT}


def test_a_lossy_instance_alone_comes_as_stored_unless_a_syntax_is_asked_for(http, mixed_study):
    jpeg = mixed_study["jpeg"]
    stored = mixed_study["files"][jpeg.SOPInstanceUID]

    single = http.get(_instance_path(jpeg), headers={"Accept": "application/dicom"})
    multipart = http.get(_instance_path(jpeg), headers={"Accept": DICOM_PARTS})
    decoded = http.get(_instance_path(jpeg), headers={
        "Accept": f"application/dicom; transfer-syntax={EXPLICIT}"})

    assert single.status_code == 200, single.text[:300]
    assert single.headers["content-type"] == \
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert single.content == stored
    assert _parts(multipart)[0][1] == stored
    assert "transfer-syntax=1.2.840.10008.1.2.4.50" in multipart.headers["content-type"]
    assert decoded.status_code == 200  # asked for by name: decoded
    assert pydicom.dcmread(io.BytesIO(decoded.content)).file_meta.TransferSyntaxUID == EXPLICIT


def test_an_sr_asked_for_in_rle_comes_in_explicit_little_endian(http, mixed_study):
    study, asked = mixed_study, f"transfer-syntax={RLE}"

    whole = http.get(f"/studies/{study['spec'].study_uid}",
                     headers={"Accept": f"{DICOM_PARTS}; {asked}"})
    alone = http.get(_instance_path(study["sr"]),
                     headers={"Accept": f"application/dicom; {asked}"})

    assert whole.status_code == 200, whole.text[:300]
    # The parts differ: the answer's Content-Type names no one syntax for them all.
    assert "transfer-syntax" not in whole.headers["content-type"]
    syntaxes = {}
    for part_headers, body in _parts(whole):
        ds = pydicom.dcmread(io.BytesIO(body))
        assert _part_syntax(part_headers) == ds.file_meta.TransferSyntaxUID
        syntaxes[ds.SOPInstanceUID] = ds.file_meta.TransferSyntaxUID
    assert syntaxes == {study["ct"].SOPInstanceUID: RLE, study["rle"].SOPInstanceUID: RLE,
                        study["jpeg"].SOPInstanceUID: RLE, study["sr"].SOPInstanceUID: EXPLICIT}
    assert alone.status_code == 200, alone.text[:300]
    assert alone.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert pydicom.dcmread(io.BytesIO(alone.content)).SOPInstanceUID == study["sr"].SOPInstanceUID


def test_a_study_holding_an_instance_no_codec_here_decodes_is_refused_before_any_byte(http):
    ct = dataset(Spec(patient_id="BN-NOCODEC"))
    multi_component = dataset(Spec(**{**Spec(patient_id="BN-NOCODEC").__dict__,
                                      "study_uid": ct.StudyInstanceUID}))
    multi_component.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    multi_component["PixelData"].VR = "OB"
    no_codec = "1.2.840.10008.1.2.4.92"  # JPEG 2000 Part 2 multi-component, lossless only
    for data in (part10(ct), part10(multi_component, no_codec)):
        _store_part10(http, data)

    refused = http.get(f"/studies/{ct.StudyInstanceUID}")
    as_stored = http.get(f"/studies/{ct.StudyInstanceUID}",
                         headers={"Accept": f"{DICOM_PARTS}; transfer-syntax=*"})

    assert refused.status_code == 406
    assert "transfer-syntax=*" in refused.json()["message"]
    assert as_stored.status_code == 200 and len(_parts(as_stored)) == 2


def test_uncompressed_frames_of_a_compressed_instance_are_labelled_as_asked(http, mixed_study):
    rle, pixels = mixed_study["rle"], mixed_study["rle_pixels"]
    url = f"{_instance_path(rle)}/frames/3,1"
    octets = 'multipart/related; type="application/octet-stream"'

    default = http.get(url, headers={"Accept": octets})
    implicit = http.get(url, headers={"Accept": f"{octets}; transfer-syntax=1.2.840.10008.1.2"})

    for response, syntax in ((default, EXPLICIT), (implicit, "1.2.840.10008.1.2")):
        assert response.status_code == 200, response.text[:300]
        assert "content-length" not in response.headers  # streamed, a frame at a time
        parts = _parts(response)
        assert [body for _, body in parts] == [pixels[2].tobytes(), pixels[0].tobytes()]
        assert {_part_syntax(headers) for headers, _ in parts} == {syntax}


def test_frames_of_an_instance_without_pixel_data_are_404(http, mixed_study):
    no_pixels = _without_pixel_data(dataset(Spec()), "1.2.840.10008.5.1.4.1.1.7", "OT")
    no_pixels.Rows, no_pixels.Columns = 16, 16  # an image module, but no Pixel Data
    _store_part10(http, part10(no_pixels))

    for ds in (no_pixels, mixed_study["sr"]):
        response = http.get(f"{_instance_path(ds)}/frames/1")
        assert response.status_code == 404, response.text[:300]
        assert "no pixel data" in response.json()["message"]


# ---------------------------------------------------------------------------- conformance:
# Pixel Data in metadata (PS3.18 10.4.3.3.2), lower-level attributes at study level
# (10.6.3.3.1), media ranges in Accept (RFC 9110 12.5.1), WADO-URI transferSyntax (9.4.2.4)

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _eight_bit(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(range(ds.Rows * ds.Columns))
    return ds


def test_metadata_names_pixel_data_by_a_bulk_data_uri_that_serves_it(http, study, big_endian):
    mf = study["multiframe"]  # 16-bit, Explicit VR Little Endian
    for url in (f"/studies/{mf.StudyInstanceUID}/metadata",
                f"/studies/{mf.StudyInstanceUID}/series/{mf.SeriesInstanceUID}/metadata",
                f"{_instance_path(mf)}/metadata"):
        mine = [m for m in http.get(url).json()
                if m["00080018"]["Value"] == [mf.SOPInstanceUID]]
        assert mine[0]["7FE00010"] == {
            "vr": "OW",
            "BulkDataURI": f"{http.base_url}{_instance_path(mf)[1:]}/bulkdata/path/7FE00010"}
    metadata = http.get(f"{_instance_path(mf)}/metadata").json()[0]

    pixels = httpx.get(metadata["7FE00010"]["BulkDataURI"])
    big = httpx.get(big_endian["metadata"]["7FE00010"]["BulkDataURI"])

    assert list(metadata)[-1] == "7FE00010"  # in tag order: the last top-level element
    assert pixels.status_code == 200 and pixels.content == mf.PixelData
    assert big_endian["metadata"]["7FE00010"]["vr"] == "OW"
    assert big.status_code == 200 and big.content == big_endian["pixels"]  # little endian


def test_metadata_pixel_data_of_encapsulated_and_deflated_instances(http, mixed_study):
    rle = mixed_study["rle"]
    stored_rle = pydicom.dcmread(io.BytesIO(mixed_study["files"][rle.SOPInstanceUID]))
    deflated = dataset(Spec(rows=16, columns=16))
    _store_part10(http, part10(deflated, pydicom.uid.DeflatedExplicitVRLittleEndian))

    rle_element = http.get(f"{_instance_path(rle)}/metadata").json()[0]["7FE00010"]
    deflated_element = http.get(f"{_instance_path(deflated)}/metadata").json()[0]["7FE00010"]
    sr_metadata = http.get(f"{_instance_path(mixed_study['sr'])}/metadata").json()[0]

    assert rle_element["vr"] == "OB"
    encapsulated = httpx.get(rle_element["BulkDataURI"],
                             headers={"Accept": "application/octet-stream"})
    assert encapsulated.content == stored_rle.PixelData  # as stored: the fragments' items
    assert deflated_element["vr"] == "OW"
    assert httpx.get(deflated_element["BulkDataURI"]).content == deflated.PixelData
    assert not {"7FE00008", "7FE00009", "7FE00010"} & set(sr_metadata)


@pytest.mark.parametrize(("syntax", "vr"), [(pydicom.uid.ExplicitVRLittleEndian, "OB"),
                                            (pydicom.uid.ImplicitVRLittleEndian, "OW")])
def test_metadata_pixel_data_vr_of_eight_bit_pixels_follows_the_transfer_syntax(http, syntax,
                                                                                 vr):
    ds = _eight_bit(dataset(Spec(rows=16, columns=16)))
    _store_part10(http, part10(ds, syntax))

    element = http.get(f"{_instance_path(ds)}/metadata").json()[0]["7FE00010"]

    assert element["vr"] == vr  # PS3.5 8.2: OB only with an explicit VR, at 8 bits or fewer
    assert httpx.get(element["BulkDataURI"]).content == ds.PixelData


@pytest.mark.parametrize(("bits", "keyword", "tag", "vr", "dtype"), [
    (32, "FloatPixelData", "7FE00008", "OF", "<f4"),
    (64, "DoubleFloatPixelData", "7FE00009", "OD", "<f8")])
def test_metadata_float_pixel_data_of_a_parametric_map(http, bits, keyword, tag, vr, dtype):
    ds = dataset(Spec(rows=8, columns=8))
    ds.SOPClassUID, ds.Modality = PARAMETRIC_MAP, "OT"
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = bits
    values = np.linspace(-1.0, 1.0, 64).astype(dtype).tobytes()
    setattr(ds, keyword, values)
    _store_part10(http, part10(ds))

    metadata = http.get(f"{_instance_path(ds)}/metadata").json()[0]

    assert "7FE00010" not in metadata
    assert metadata[tag]["vr"] == vr
    assert httpx.get(metadata[tag]["BulkDataURI"]).content == values


def test_metadata_etag_stays_the_same_for_unchanged_instances(http, study):
    url = f"/studies/{study['spec'].study_uid}/metadata"
    first = http.get(url, headers={"Accept-Encoding": "identity"})

    again = http.get(url, headers={"Accept-Encoding": "identity"})
    revalidated = http.get(url, headers={"Accept-Encoding": "identity",
                                         "If-None-Match": first.headers["etag"]})

    assert again.headers["etag"] == first.headers["etag"] and again.content == first.content
    assert revalidated.status_code == 304


@pytest.fixture(scope="module")
def described_study(http):
    """A study whose instance carries series, instance and Patient Study attributes."""
    ds = dataset(Spec(patient_id="BN-LEVELS", study_description="Chụp phổi",
                      modality="CR", rows=16, columns=16))
    ds.SeriesDescription = "Phổi thẳng"
    ds.PatientWeight = 62.5
    ds.AdditionalPatientHistory = "Ho kéo dài"
    _store_part10(http, part10(ds))
    return ds


def test_study_search_returns_no_series_or_instance_attribute_asked_for(http, described_study):
    ds = described_study
    response = http.get("/studies", params=[
        ("StudyInstanceUID", ds.StudyInstanceUID),
        ("includefield", "0020000E,SeriesDescription,00280004,00080060,InstanceNumber"),
        ("includefield", "PatientWeight"), ("includefield", "00104000"),
        ("SeriesNumber", ""), ("AdditionalPatientHistory", "")])

    assert response.status_code == 200, response.text[:300]
    answer = response.json()[0]
    for tag in ("0020000E", "0008103E", "00280004", "00080060", "00200013", "00200011"):
        assert tag not in answer, tag  # PS3.18 10.6.3.3.1
    assert answer["00101030"] == {"vr": "DS", "Value": [62.5]}  # Patient Study: returned
    assert answer["001021B0"]["Value"] == ["Ho kéo dài"]
    assert answer["00104000"] == {"vr": "LT"}  # Patient Comments: study level, none here
    assert answer["00080061"]["Value"] == ["CR"]
    assert "warning" not in response.headers


def test_study_search_as_ohif_asks_still_gets_what_its_study_list_shows(http, described_study):
    ds = described_study
    response = http.get("/studies", params={
        "StudyInstanceUID": ds.StudyInstanceUID, "limit": 101, "offset": 0,
        "fuzzymatching": "false", "includefield": "00081030,00080060,00080090,00100030"})

    assert response.status_code == 200, response.text[:300]
    answer = response.json()[0]
    assert answer["00081030"]["Value"] == ["Chụp phổi"]
    assert answer["00080061"]["Value"] == ["CR"]  # OHIF falls back on ModalitiesInStudy
    assert answer["00080090"]["Value"] and answer["00100030"]["Value"]
    assert "00080060" not in answer and "warning" not in response.headers


def test_series_and_instance_searches_still_return_what_is_asked_for(http, described_study):
    ds = described_study
    series = http.get(f"/studies/{ds.StudyInstanceUID}/series",
                      params={"includefield": "00081030,PatientWeight"}).json()[0]
    instances = http.get(f"/studies/{ds.StudyInstanceUID}/instances",
                         params={"includefield": "00280004,0008103E"}).json()[0]

    assert series["00081030"]["Value"] == ["Chụp phổi"]
    assert series["00101030"]["Value"] == [62.5]
    assert instances["00280004"]["Value"] == ["MONOCHROME2"]
    assert instances["0008103E"]["Value"] == ["Phổi thẳng"]


def test_study_search_matching_on_an_instance_attribute_says_it_was_neither_done(
        http, described_study):
    response = http.get("/studies", params={"StudyInstanceUID": described_study.StudyInstanceUID,
                                             "PhotometricInterpretation": "MONOCHROME2"})

    assert response.status_code == 200
    assert "00280004" not in response.json()[0]
    assert "neither matched nor returned" in response.headers["warning"]


def test_a_count_given_a_value_is_returned_with_a_warning_not_silently_ignored(
        http, described_study):
    response = http.get("/studies", params={"StudyInstanceUID": described_study.StudyInstanceUID,
                                             "NumberOfStudyRelatedInstances": "999"})

    assert response.status_code == 200  # every study of the UID: the count was not matched
    assert response.json()[0]["00201208"]["Value"] == [1]
    assert "NumberOfStudyRelatedInstances: matching on a count is not supported" in \
        response.headers["warning"]


def test_media_ranges_in_accept_choose_instances_and_frames(http, study):
    mf, ct = study["multiframe"], study["ct"][0]
    instance = _instance_path(mf)
    series = f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
    in_study = len(http.get(f"/studies/{mf.StudyInstanceUID}/instances").json())

    single = http.get(instance, headers={"Accept": "application/*"})
    parts = http.get(instance, headers={"Accept": "multipart/*"})
    whole_series = http.get(series, headers={"Accept": "multipart/*"})
    whole_study = http.get(f"/studies/{mf.StudyInstanceUID}", headers={"Accept": "multipart/*"})
    series_single = http.get(series, headers={"Accept": "application/*"})
    no_text = http.get(instance, headers={"Accept": "text/*"})

    assert single.status_code == 200, single.text[:300]
    assert single.headers["content-type"].startswith("application/dicom;")
    assert pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID == mf.SOPInstanceUID
    assert parts.status_code == 200 and len(_parts(parts)) == 1
    assert parts.headers["content-type"].startswith("multipart/related")
    assert whole_series.status_code == 200 and len(_parts(whole_series)) == 3
    assert whole_study.status_code == 200 and len(_parts(whole_study)) == in_study
    assert series_single.status_code == 406  # a single part is one instance (Table 10.4.4-1)
    assert "multipart/related" in series_single.json()["message"]
    assert no_text.status_code == 406
    size = 16 * 16 * 2
    for accept in ("application/*", "multipart/*", 'multipart/*; type="application/*"'):
        frames = http.get(f"{instance}/frames/2", headers={"Accept": accept})
        assert frames.status_code == 200, (accept, frames.text[:300])
        ((headers, body),) = _parts(frames)
        assert headers["content-type"].startswith("application/octet-stream")
        assert body == mf.PixelData[size:2 * size]


def test_wado_uri_transfer_syntax_that_is_not_a_uid_is_a_bad_request(server, study):
    ct = study["ct"][0]

    def wado_uri(syntax: str) -> httpx.Response:
        return httpx.get(server.http + "/dicomweb/wado", params={
            "requestType": "WADO", "studyUID": ct.StudyInstanceUID,
            "seriesUID": ct.SeriesInstanceUID, "objectUID": ct.SOPInstanceUID,
            "contentType": "application/dicom", "transferSyntax": syntax})

    for invalid in ("jpeg", "**", "1.2.840.10008.1.2.4.50 ", "1..2"):
        response = wado_uri(invalid)
        assert response.status_code == 400, (invalid, response.status_code)
        assert response.json()["message"].startswith("transferSyntax:")
    for unproducible in (pydicom.uid.JPEGBaseline8Bit, "1.2.3.4"):
        assert wado_uri(unproducible).status_code == 406, unproducible
    assert wado_uri(pydicom.uid.ExplicitVRLittleEndian).status_code == 200
    as_stored = wado_uri("*")  # as WADO-RS takes it: the file as stored
    assert as_stored.status_code == 200
    assert pydicom.dcmread(io.BytesIO(as_stored.content)).SOPInstanceUID == ct.SOPInstanceUID


# ---------------------------------------------------------------------------- large bulk data


def test_large_pixel_data_by_its_bulk_data_uri_is_streamed_whole_or_by_range(
        server, http, tmp_path, dcmtk_env):
    """Pixel Data over 16 MiB (a long cine) is read from the blob as it is sent: all of it,
    a byte range of it, or as a multipart part naming its URI, like a small value."""
    ds = dataset(Spec(rows=512, columns=512, frames=40, patient_id="BN-CINE"))
    pixels = np.random.default_rng(11).integers(0, 4096, 40 * 512 * 512, dtype=np.uint16)
    ds.PixelData = pixels.tobytes()  # 20 MiB, past this server's STOW-RS limit: by C-STORE
    path = tmp_path / "cine.dcm"
    path.write_bytes(part10(ds))
    subprocess.run(["storescu", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
                    str(path)], env=dcmtk_env, check=True, capture_output=True, timeout=60)
    metadata = http.get(f"{_instance_path(ds)}/metadata").json()[0]
    uri = metadata["7FE00010"]["BulkDataURI"]
    octets = {"Accept": "application/octet-stream"}

    whole = http.get(uri, headers=octets)
    middle = http.get(uri, headers={**octets, "Range": "bytes=10485760-10485789"})
    past = http.get(uri, headers={**octets, "Range": f"bytes={len(ds.PixelData)}-"})
    part = http.get(uri, headers={"Accept": 'multipart/related; type="application/octet-stream"'})

    assert whole.status_code == 200 and whole.content == ds.PixelData
    assert whole.headers["content-length"] == str(len(ds.PixelData))
    assert middle.status_code == 206 and middle.content == ds.PixelData[10485760:10485790]
    assert middle.headers["content-range"] == f"bytes 10485760-10485789/{len(ds.PixelData)}"
    assert past.status_code == 416
    [(headers, body)] = _parts(part)
    assert body == ds.PixelData and headers["content-location"] == uri
