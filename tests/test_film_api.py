"""Film sheets over HTTP, automatic shares of complete studies, and what going paperless saved
(JSON, admin page, Prometheus metrics), against a running server."""

from __future__ import annotations

import io
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import PacsProcess, stow
from tests.factory import Spec, ct_series, instance

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    server = PacsProcess(tmp_path_factory.mktemp("film") / "data", env={
        "PACS_SITE_NAME": "Bệnh viện Đa khoa Tỉnh",
        "PACS_STUDY_COMPLETE_SECONDS": "1",
        "PACS_SHARE_ON_COMPLETE": "true",
        "PACS_SHARE_ON_COMPLETE_PIN": "birth-year",
        "PACS_FILM_LAYOUT": "3x4",
        "PACS_FILM_IMAGES_PER_SERIES": "8",
        "PACS_FILM_SHEET_PRICE_VND": "50000",
        "PACS_FILM_SHEETS_PER_STUDY": "CT:3,*:1",
    })
    server.start()
    ct = Spec(patient_name="Phạm^Văn Đức", patient_id="BN-FILM", birth_date="19650302")
    assert stow(server.http, ct_series(ct, 16, size=64)).status_code == 200
    xray = Spec(patient_name="Võ^Thị Mai", patient_id="BN-XQ", modality="DX", birth_date="",
                study_description="X-quang ngực thẳng", accession="ACC-XQ")
    assert stow(server.http, [instance(xray)]).status_code == 200
    yield server, ct, xray
    server.stop()


def _auto_share(server, study_uid: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = httpx.get(server.http + "/api/shares", params={"study": study_uid}).json()
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no automatic share for {study_uid}:\n{server.log()[-2000:]}")


def test_a_complete_study_is_shared_once_automatically(site):
    server, ct, _ = site
    share = _auto_share(server, ct.study_uid)
    assert share["created_by"] == "auto" and share["pin"] == "birth-year"
    slip = httpx.get(f"{server.http}/api/shares/{share['id']}/slip")
    assert "1965" in slip.text and "Phạm Văn Đức" in slip.text
    # More images later: the study completes again, and keeps its one automatic share.
    more = instance(Spec(**{**ct.__dict__, "sop_uid": Spec().sop_uid, "instance_number": 99}))
    assert stow(server.http, [more]).status_code == 200
    time.sleep(3)
    shares = httpx.get(server.http + "/api/shares", params={"study": ct.study_uid}).json()
    assert [s["id"] for s in shares] == [share["id"]]


def test_a_study_pending_completion_at_a_long_stop_is_shared_after_the_start(start_server,
                                                                           tmp_path):
    """The auto-share's pending studies lived in memory and only those changed within three
    quiet periods of the start were looked at again: a longer stop, no share."""
    first = start_server(tmp_path / "data", PACS_STUDY_COMPLETE_SECONDS="600",
                         PACS_SHARE_ON_COMPLETE="true")
    study = Spec(patient_id="BN-STOP")
    assert stow(first.http, [instance(study)]).status_code == 200
    first.stop()
    time.sleep(3.5)  # more than three quiet periods of the server that comes back
    again = start_server(tmp_path / "data", PACS_STUDY_COMPLETE_SECONDS="1",
                         PACS_SHARE_ON_COMPLETE="true")
    assert _auto_share(again, study.study_uid)["created_by"] == "auto"


def test_film_pdf_has_the_layout_and_is_stored_back_into_the_study(site):
    server, ct, _ = site
    pdf = httpx.get(f"{server.http}/api/studies/{ct.study_uid}/film.pdf", timeout=60)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    reader = PdfReader(io.BytesIO(pdf.content))
    # 8 evenly spaced slices of the series (per_series setting) on 3x4 sheets: one page.
    assert len(reader.pages) == 1
    assert len(reader.pages[0].images) == 8
    assert "Phạm Văn Đức" in reader.pages[0].extract_text()
    png = httpx.get(f"{server.http}/api/studies/{ct.study_uid}/film.png",
                    params={"layout": "2x2"}, timeout=60)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    stored = httpx.post(f"{server.http}/api/studies/{ct.study_uid}/film", timeout=60)
    assert stored.status_code == 201, stored.text
    found = httpx.get(f"{server.http}/dicomweb/studies/{ct.study_uid}/instances",
                      params={"SOPClassUID": ENCAPSULATED_PDF}).json()
    assert [i["00080018"]["Value"][0] for i in found] == [stored.json()["sop_instance_uid"]]
    # The stored film is not itself put on the next film.
    again = PdfReader(io.BytesIO(httpx.get(
        f"{server.http}/api/studies/{ct.study_uid}/film.pdf", timeout=60).content))
    assert len(again.pages[0].images) == 8


def test_film_requests_with_bad_parameters_get_clear_errors(site):
    server, ct, _ = site
    base = f"{server.http}/api/studies/{ct.study_uid}"
    for params in ({"layout": "big"}, {"layout": "40x40"}, {"window": "x"},
                   {"per_series": "0"}, {"per_series": "1000"}, {"per_series": "１"}):
        response = httpx.get(base + "/film.pdf", params=params)
        assert response.status_code == 400, params
        assert response.json()["message"]
    assert httpx.get(base + "/film.png", params={"sheet": "9"}).status_code == 400
    bad_sheet = httpx.get(base + "/film.png", params={"sheet": "abc"})
    assert bad_sheet.status_code == 400 and "sheet" in bad_sheet.json()["message"]
    assert httpx.get(base + "/film.gif").status_code == 404
    assert httpx.get(f"{server.http}/api/studies/1.2.3.4/film.pdf").status_code == 404


def test_shares_without_downloads_cannot_retrieve_dicom_files(site):
    server, ct, _ = site
    made = httpx.post(server.http + "/api/shares", json={"study_instance_uid": ct.study_uid})
    grant = httpx.post(f"{server.http}/api/s/{made.json()['token']}/session").json()
    auth = {"Authorization": "Bearer " + grant["access_token"]}
    study = f"{server.http}/dicomweb/studies/{ct.study_uid}"
    assert httpx.get(study, headers=auth).status_code == 403
    assert httpx.get(study + "/metadata", headers=auth).status_code == 200  # the viewer's need
    film = httpx.get(f"{server.http}/api/studies/{ct.study_uid}/film.pdf", headers=auth)
    assert film.status_code == 200
    allowed = httpx.post(server.http + "/api/shares", json={
        "study_instance_uid": ct.study_uid, "allow_download": True}).json()
    grant = httpx.post(f"{server.http}/api/s/{allowed['token']}/session").json()
    zipped = httpx.get(f"{server.http}/api/studies/{ct.study_uid}/download",
                       params={"format": "dicom", "access_token": grant["access_token"]},
                       timeout=60)
    assert zipped.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()
    assert "DICOMDIR" in names and sum(n.startswith("DICOM/") for n in names) >= 16
    log = httpx.get(f"{server.http}/api/shares/{allowed['id']}").json()["accesses"]
    assert "download-dicom" in {a["action"] for a in log}


@pytest.mark.parametrize("params, named", [
    ({"window": "nan,nan"}, "window"), ({"window": "40,nan"}, "window"),
    ({"window": "nan,400"}, "window"), ({"window": "40,inf"}, "window"),
    ({"window": "-inf,400"}, "window"), ({"window": "1e308,1e308"}, "window"),
    ({"layout": "\uff14x\uff15"}, "layout"), ({"per_series": "101"}, "per_series"),
])
def test_film_parameters_that_are_not_usable_numbers_are_400_naming_them(site, params, named):
    # float() takes "nan" and "inf": such windows made blank films, and POST stored one.
    server, ct, _ = site
    base = f"{server.http}/api/studies/{ct.study_uid}"

    answers = [httpx.get(base + "/film.pdf", params=params), httpx.get(base + "/film.png",
                                                                       params=params),
               httpx.post(base + "/film", params=params)]

    for answer in answers:
        assert answer.status_code == 400, (answer.request.url, answer.text)
        assert answer.json()["message"].startswith(named + ":")


def test_storing_the_same_film_again_answers_the_instance_already_stored(site):
    server, ct, _ = site
    url = f"{server.http}/api/studies/{ct.study_uid}/film"

    first = httpx.post(url, params={"window": "60,360"}, timeout=60)
    again = httpx.post(url, params={"window": "60,360"}, timeout=60)

    assert first.status_code == 201 and first.json()["stored"] is True
    assert again.status_code == 200 and again.json()["stored"] is False
    assert again.json()["sop_instance_uid"] == first.json()["sop_instance_uid"]
    found = httpx.get(f"{server.http}/dicomweb/studies/{ct.study_uid}/instances",
                      params={"SOPInstanceUID": first.json()["sop_instance_uid"]}).json()
    assert len(found) == 1


def test_films_stored_at_once_get_distinct_instance_numbers(site):
    server, ct, _ = site
    url = f"{server.http}/api/studies/{ct.study_uid}/film"
    windows = ["70,700", "80,800", "90,900"]

    with ThreadPoolExecutor(len(windows)) as pool:
        answers = list(pool.map(lambda w: httpx.post(url, params={"window": w}, timeout=60),
                                windows))

    assert [a.status_code for a in answers] == [201] * len(windows)
    films = httpx.get(f"{server.http}/dicomweb/studies/{ct.study_uid}/instances",
                      params={"SOPClassUID": ENCAPSULATED_PDF, "includefield": "00200013"}
                      ).json()
    numbers = [f["00200013"]["Value"][0] for f in films]
    assert len(numbers) == len(set(numbers)) >= len(windows)


def test_a_zip_is_sent_as_it_is_made_and_head_makes_none(site):
    # The whole ZIP was written to /tmp before its first byte, and HEAD built it too.
    server, ct, _ = site
    made = httpx.post(server.http + "/api/shares", json={
        "study_instance_uid": ct.study_uid, "allow_download": True}).json()
    grant = httpx.post(f"{server.http}/api/s/{made['token']}/session").json()["access_token"]
    url = f"{server.http}/api/studies/{ct.study_uid}/download"
    log = lambda: {a["action"] for a in httpx.get(  # noqa: E731
        f"{server.http}/api/shares/{made['id']}").json()["accesses"]}

    head = httpx.head(url, params={"format": "dicom", "access_token": grant})

    assert head.status_code == 200 and head.headers["content-type"] == "application/zip"
    assert "attachment" in head.headers["content-disposition"]
    assert "download-dicom" not in log()  # nothing was made, nothing downloaded
    with httpx.stream("GET", url, params={"format": "dicom", "access_token": grant},
                      timeout=60) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # sent as it is made
        assert response.headers.get("transfer-encoding") == "chunked"
        body = response.read()
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert names[-1] == "DICOMDIR" and sum(n.startswith("DICOM/") for n in names) >= 16
    assert "download-dicom" in log()


def test_statistics_count_studies_delivered_and_the_saving(site):
    server, ct, xray = site
    _auto_share(server, ct.study_uid)
    _auto_share(server, xray.study_uid)  # no birth date: a generated PIN instead
    stats = httpx.get(server.http + "/api/stats/film").json()
    assert stats["studies_delivered"] == 2
    assert stats["by_modality"]["CT"] == {"studies": 1, "sheets": 3, "saving_vnd": 150000}
    assert stats["by_modality"]["DX"] == {"studies": 1, "sheets": 1, "saving_vnd": 50000}
    assert stats["sheets_avoided"] == 4 and stats["saving_vnd"] == 200000
    future = httpx.get(server.http + "/api/stats/film", params={"from": "2999-01-01"}).json()
    assert future["studies_delivered"] == 0
    assert httpx.get(server.http + "/api/stats/film", params={"from": "yesterday"}
                     ).status_code == 400
    metrics = httpx.get(server.http + "/metrics")
    assert metrics.status_code == 200
    assert 'pacs_film_sheets_avoided{modality="CT"} 3.0' in metrics.text
    assert "pacs_film_saving_vnd" in metrics.text and "pacs_studies 2.0" in metrics.text
    admin = httpx.get(server.http + "/admin")
    assert admin.status_code == 200 and "200.000 ₫" in admin.text



def test_statistics_from_the_first_or_to_the_last_day_a_date_names_are_answered(start_server):
    """Review: 500 for these days (local midnight of 0001-01-01 in Hà Nội is in year 0 UTC; the
    day after 9999-12-31 is none)."""
    server = start_server(TZ="Asia/Ho_Chi_Minh")
    assert stow(server.http, [instance(Spec(patient_id="BN-DAYS"))]).status_code == 200
    expected = [
        ({"from": "0001-01-01"}, 1),  # from the first day a date names: from the start
        ({"to": "9999-12-31"}, 1),  # to the last: open-ended
        ({"from": "0001-01-01", "to": "9999-12-31"}, 1),
        ({"to": "0001-01-01"}, 0),
        ({"from": "9999-12-31"}, 0),
    ]

    answers = [httpx.get(server.http + "/api/stats/film", params=params)
               for params, _ in expected]

    for (params, archived), response in zip(expected, answers, strict=True):
        assert response.status_code == 200, (params, response.text)
        figures = response.json()
        assert figures["studies_archived"] == archived, params
        assert (figures["since"], figures["until"]) == (params.get("from"), params.get("to"))
        assert figures["timezone"].startswith("+07:")
