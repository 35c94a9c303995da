"""The HTTP access gate (``pacs.access``) attacked from outside, against a real server.

A share of study A must never give anything of study B, a stranger nothing but the public
pages, and a share no staff action. Each test is one family of attacks; the first ones are
weaknesses a review found and that were closed.

The server trusts ``X-Forwarded-For`` from loopback (the reverse proxy on the same host), and
its staff network is 10.99.0.0/16: plain loopback requests are strangers, requests the
"proxy" marks ``X-Forwarded-For: 10.99.0.5`` are staff.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import PacsProcess, stow
from tests.factory import Spec, ct_series, instance

STAFF = {"X-Forwarded-For": "10.99.0.5"}
MAX_PIN_ATTEMPTS = 3
# What study B holds that a share of study A, or a stranger, must never see.
B_PATIENT_ID = "BN-B-SECRET"
B_ACCESSION = "ACC-B-SECRET"
B_DESCRIPTION = "MRI sọ não bí mật"
B_TEXT = (B_PATIENT_ID, B_ACCESSION, B_DESCRIPTION, "Bí Mật")
A_PATIENT_ID = "BN-A-0001"


@dataclass
class Site:
    server: PacsProcess
    a: Spec  # the shared study: 3 CT slices
    a_instances: list[str]
    a_other: Spec  # another study of A's patient
    b: Spec  # another patient's study: 1 MR image
    token: str  # share of A without downloads
    grant: str  # a session of it
    share_id: int
    grant_download: str  # a session of a share of A that allows downloads

    @property
    def http(self) -> str:
        return self.server.http

    @property
    def b_uids(self) -> tuple[str, str, str]:
        return self.b.study_uid, self.b.series_uid, self.b.sop_uid

    def get(self, path: str, grant: str | None = None, **kwargs) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if grant:
            headers["Authorization"] = "Bearer " + grant
        return httpx.get(self.http + path, headers=headers, timeout=30, **kwargs)


def _share(http: str, study_uid: str, **body) -> dict:
    response = httpx.post(http + "/api/shares", json={"study_instance_uid": study_uid, **body},
                          headers=STAFF, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def _open(http: str, token: str, pin: str | None = None) -> httpx.Response:
    return httpx.post(f"{http}/api/s/{token}/session", json={"pin": pin} if pin else {},
                      timeout=30)


def _grant(http: str, token: str) -> str:
    response = _open(http, token)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    server = PacsProcess(tmp_path_factory.mktemp("gate") / "data", env={
        "PACS_STAFF_NETWORKS": "10.99.0.0/16",
        "PACS_SHARE_PIN_MAX_ATTEMPTS": str(MAX_PIN_ATTEMPTS),
        "PACS_PUBLIC_URL": "",
    })
    server.start()
    try:
        a = Spec(patient_name="Lê^Văn An", patient_id=A_PATIENT_ID, accession="ACC-A",
                 study_description="CT ngực")
        a_other = Spec(patient_name="Lê^Văn An", patient_id=A_PATIENT_ID,
                       accession="ACC-A-OLD", study_description="CT bụng cũ")
        b = Spec(patient_name="Trần^Thị Bí Mật", patient_id=B_PATIENT_ID, birth_date="19700101",
                 accession=B_ACCESSION, study_description=B_DESCRIPTION,
                 series_description="T2 bí mật", modality="MR", rows=32, columns=32)
        assert stow(server.http, ct_series(a, 3, size=32), STAFF).status_code == 200
        assert stow(server.http, [instance(a_other), instance(b)], STAFF).status_code == 200
        found = httpx.get(f"{server.http}/dicomweb/studies/{a.study_uid}/instances",
                          headers=STAFF).json()
        made = _share(server.http, a.study_uid)
        with_download = _share(server.http, a.study_uid, allow_download=True)
        _share(server.http, b.study_uid)  # B is shared too: its share must stay out of reach
        yield Site(server, a, [item["00080018"]["Value"][0] for item in found], a_other, b,
                   made["token"], _grant(server.http, made["token"]), made["id"],
                   _grant(server.http, with_download["token"]))
    finally:
        server.stop()


def _assert_nothing_of_b(site: Site, response: httpx.Response, *, uids: bool = True) -> None:
    body = response.content.decode("utf-8", errors="replace")
    secrets = list(B_TEXT) + (list(site.b_uids) if uids else [])
    leaked = [s for s in secrets if s in body]
    assert not leaked, f"{response.request.method} {response.request.url}: {leaked}"


# ---------------------------------------------------------------------------- holes


def test_bulkdata_byte_range_cannot_return_the_whole_file_without_downloads(site):
    # ``/bulkdata/{offset}-{length}`` is a STUDY read for the gate; if any byte range of the
    # stored blob were served, ``bulkdata/0-<size>`` would be the whole Part 10 file, and a
    # share whose link does not allow downloads would download every instance anyway. Only
    # the ranges the instance's metadata names are served.
    series, sop = site.a.series_uid, site.a_instances[0]
    stored = site.get("/wado", headers=STAFF, params={
        "requestType": "WADO", "studyUID": site.a.study_uid, "seriesUID": series,
        "objectUID": sop, "contentType": "application/dicom"}).content
    assert stored[128:132] == b"DICM"
    base = f"/dicomweb/studies/{site.a.study_uid}/series/{series}/instances/{sop}"
    assert site.get(base, site.grant).status_code == 403  # the ordinary download: refused

    whole = site.get(f"{base}/bulkdata/0-{len(stored)}", site.grant)

    got_the_file = whole.status_code == 200 and whole.content[128:132] == b"DICM"
    assert not got_the_file, "a share without downloads read the stored file as bulk data"
    # What the viewer needs stays available: the pixel data by its element path.
    assert site.get(f"{base}/bulkdata/path/7FE00010", site.grant).status_code == 200


def test_pin_limit_holds_against_concurrent_guesses(site):
    # If the share's state were read before the PIN is checked and a miss counted only
    # afterwards, guesses sent at once would all be tried (~40 PINs against a limit of 3
    # here) and a 4-digit or birth-year PIN would fall to one burst of requests.
    made = _share(site.http, site.a.study_uid, pin="7391")
    guesses = [f"{n:04d}" for n in range(1000, 1039)] + ["7391"]
    start = threading.Barrier(len(guesses))

    def guess(pin: str) -> httpx.Response:
        with httpx.Client(base_url=site.http, timeout=60) as client:
            client.get("/healthz")  # connected beforehand: the guesses leave together
            start.wait()
            return client.post(f"/api/s/{made['token']}/session", json={"pin": pin})

    with ThreadPoolExecutor(len(guesses)) as pool:
        answers = list(pool.map(guess, guesses))

    shown = httpx.get(f"{site.http}/api/shares/{made['id']}", headers=STAFF).json()
    accepted = answers[-1].status_code == 200
    assert shown["pin_failures"] <= MAX_PIN_ATTEMPTS, \
        f"{shown['pin_failures']} wrong PINs were tried; the limit is {MAX_PIN_ATTEMPTS}"
    assert not (accepted and shown["state"] == "locked"), \
        "the right PIN opened a session of a share that the same burst had locked"


def test_study_search_does_not_reveal_the_patients_other_studies(site):
    # A share's QIDO search is narrowed to its study, but the patient-level counts
    # (NumberOfPatientRelatedStudies/Series/Instances, via includefield=all or by name) are
    # the patient's whole record: they would tell the holder of a link that the patient has
    # other studies here, and how large they are.
    response = site.get("/dicomweb/studies", site.grant, params={"includefield": "all"})

    assert response.status_code == 200
    (answer,) = response.json()
    assert answer["0020000D"]["Value"] == [site.a.study_uid]
    for tag, own_count in (("00201200", 1), ("00201202", 1), ("00201204", 3)):
        value = answer.get(tag, {}).get("Value", [own_count])[0]
        assert value <= own_count, f"{tag}: {value} counts studies other than the shared one"


@pytest.mark.parametrize("where", ["header", "query"])
def test_credential_with_non_ascii_bytes_is_refused_with_401(site, where):
    # hmac.compare_digest raises TypeError on non-ASCII text: a forged credential must get
    # 401, not a 500 with a traceback.
    forged = "1.abcdef.9999999999.\u00e9\u00e9\u00e9"
    url = f"/dicomweb/studies/{site.a.study_uid}/metadata"
    if where == "header":
        response = site.get(url, headers={"Authorization": b"Bearer " + forged.encode("latin-1")})
    else:
        response = site.get(url, params={"access_token": forged})

    assert response.status_code == 401


def test_cross_site_post_from_a_staff_browser_is_refused(site):
    # Staff are recognised by address alone, with no credential, so any web page opened on a
    # staff workstation could send "simple" cross-site POSTs (text/plain bodies) and act as
    # staff: create shares, revoke or unlock every share by its small sequential id, store
    # films. The browser marks such requests with Origin / Sec-Fetch-Site.
    victim = _share(site.http, site.a.study_uid)
    cross_site = {**STAFF, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site",
                  "Content-Type": "text/plain"}

    revoke = httpx.post(f"{site.http}/api/shares/{victim['id']}/revoke", headers=cross_site)
    create = httpx.post(site.http + "/api/shares", headers=cross_site,
                        content=f'{{"study_instance_uid": "{site.a.study_uid}"}}')

    assert revoke.status_code == 403, "a cross-site page revoked a share"
    assert create.status_code == 403, "a cross-site page created a share"
    assert httpx.get(f"{site.http}/api/shares/{victim['id']}", headers=STAFF).json()["state"] \
        == "active"
    # The server's own pages (same origin) and tools that are not browsers still work.
    same_origin = {**STAFF, "Origin": site.http, "Sec-Fetch-Site": "same-origin"}
    assert httpx.post(site.http + "/api/shares", headers=same_origin,
                      json={"study_instance_uid": site.a.study_uid}).status_code == 201
    assert httpx.post(f"{site.http}/api/shares/{victim['id']}/revoke",
                      headers=STAFF).status_code == 200


# A TLS proxy in front (nginx's default ``proxy_set_header Host $proxy_host``): the browser's
# Origin is the public name, the Host the server sees is the upstream's address.
_PUBLIC = "https://anh.benhvien.vn"
_FROM_THE_PUBLIC_PAGE = {"X-Forwarded-For": "203.0.113.9", "Origin": _PUBLIC,
                         "Sec-Fetch-Site": "same-origin"}


def _enter_pin(http: str, token: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{http}/api/s/{token}/session", json={"pin": "2468"}, headers=headers,
                      timeout=30)


def test_pin_entry_through_a_tls_proxy_that_names_the_public_host(site):
    # Every PIN POST behind such a proxy was 403 "from another site".
    made = _share(site.http, site.a.study_uid, pin="2468")
    forwarded = {**_FROM_THE_PUBLIC_PAGE, "X-Forwarded-Host": "anh.benhvien.vn",
                 "X-Forwarded-Proto": "https"}

    entered = _enter_pin(site.http, made["token"], forwarded)
    other_site = _enter_pin(site.http, made["token"], {
        **forwarded, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    other_origin = _enter_pin(site.http, made["token"], {
        **forwarded, "Origin": "https://evil.example", "Sec-Fetch-Site": "same-site"})

    assert entered.status_code == 200, entered.text
    assert other_site.status_code == 403 and other_origin.status_code == 403


def test_pin_entry_from_the_public_url_and_forwarded_names_only_from_trusted_proxies(
        start_server):
    server = start_server(PACS_PUBLIC_URL=_PUBLIC + "/", PACS_TRUSTED_PROXIES="192.0.2.10")
    spec = Spec(patient_id="BN-PROXY")
    assert stow(server.http, [instance(spec)]).status_code == 200  # loopback: staff here
    made = httpx.post(server.http + "/api/shares", json={
        "study_instance_uid": spec.study_uid, "pin": "2468"}).json()

    from_public = _enter_pin(server.http, made["token"], _FROM_THE_PUBLIC_PAGE)
    # Loopback is no trusted proxy here: the names it forwards are not this server's.
    claimed = _enter_pin(server.http, made["token"], {
        **_FROM_THE_PUBLIC_PAGE, "Origin": "https://evil.example",
        "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"})

    assert from_public.status_code == 200, from_public.text
    assert claimed.status_code == 403


# ---------------------------------------------------------------------------- paths


@pytest.mark.parametrize("template", [
    "/dicomweb/studies/{a}%2F..%2F{b}/metadata",
    "/dicomweb/studies/{a}/..%2F{b}/metadata",
    "/dicomweb/studies/{a}/%2e%2e/{b}/metadata",
    "/dicomweb/studies/{a}/../../dicomweb/studies/{b}/metadata",
    "/dicomweb/studies/{a}/series/..%2F..%2F{b}",
    "/dicomweb/studies/{a}%2Fseries%2F{bs}/metadata",
    "/api/studies/{a}%2F..%2F{b}/film.png",
])
def test_encoded_slash_or_dots_cannot_reach_another_study(site, template):
    path = template.format(a=site.a.study_uid, b=site.b.study_uid, bs=site.b.series_uid)
    # httpx would normalise dot segments: send the path as written.
    url = httpx.URL(site.http).copy_with(raw_path=path.encode())
    response = httpx.get(url, headers={"Authorization": "Bearer " + site.grant})

    assert response.status_code in (403, 404)
    _assert_nothing_of_b(site, response, uids=False)


@pytest.mark.parametrize("template", [
    "/dicomweb//studies/{b}/metadata", "//dicomweb/studies/{b}/metadata",
    "/DICOMWEB/studies/{b}/metadata", "/dicomweb/Studies/{b}/metadata",
    "/dicomweb/studies/{b}/metadata/", "/Wado", "/dicomweb/studies/", "/api/studies/{a}/download/",
])
def test_double_slashes_case_variants_and_trailing_slashes_are_not_share_routes(site, template):
    path = template.format(a=site.a.study_uid, b=site.b.study_uid)
    url = httpx.URL(site.http).copy_with(raw_path=path.encode())
    response = httpx.get(url, headers={"Authorization": "Bearer " + site.grant})

    assert response.status_code == 403
    _assert_nothing_of_b(site, response)


def test_trailing_slash_redirect_comes_back_through_the_gate(site):
    series = f"/dicomweb/studies/{site.a.study_uid}/series/{site.a.series_uid}"
    redirected = site.get(series + "/", site.grant)  # a STUDY read by its pattern...
    assert redirected.status_code == 307 and not redirected.content
    again = httpx.get(redirected.headers["location"],
                      headers={"Authorization": "Bearer " + site.grant})
    assert again.status_code == 403  # ...whose target is a download: decided again


@pytest.mark.parametrize("study", ["{a}\\{b}", "{a},{b}", "*", "{a}*", "{a} ", "{a}%00"])
def test_uid_lists_and_wildcards_in_the_study_path_are_refused(site, study):
    uid = study.format(a=site.a.study_uid, b=site.b.study_uid)
    for suffix in ("/metadata", "/series", "/thumbnail", ""):
        response = site.get(f"/dicomweb/studies/{uid}{suffix}", site.grant_download)
        assert response.status_code == 403, suffix
        _assert_nothing_of_b(site, response, uids=False)
    film = site.get(f"/api/studies/{uid}/film.png", site.grant_download)
    assert film.status_code == 403


# ------------------------------------------------------------------- hierarchy below A


_BELOW_SERIES = ["", "/metadata", "/rendered", "/thumbnail", "/instances",
                 "/instances/{i}", "/instances/{i}/metadata", "/instances/{i}/frames/1",
                 "/instances/{i}/frames/1/rendered", "/instances/{i}/frames/1/thumbnail",
                 "/instances/{i}/rendered", "/instances/{i}/thumbnail",
                 "/instances/{i}/bulkdata/path/7FE00010", "/instances/{i}/bulkdata/0-128"]


@pytest.mark.parametrize("below", _BELOW_SERIES)
def test_another_studys_series_below_the_own_study_finds_nothing(site, below):
    _, b_series, b_sop = site.b_uids
    template = f"/dicomweb/studies/{site.a.study_uid}/series/{{s}}{below}"
    real = site.get(template.format(s=b_series, i=b_sop), site.grant_download)
    made_up = site.get(template.format(s="1.2.3.999", i="1.2.3.998"), site.grant_download)

    assert real.status_code in (204, 404)
    _assert_nothing_of_b(site, real, uids=False)
    # Not even an oracle: B's real UIDs get the answer made-up ones get.
    assert real.status_code == made_up.status_code
    assert real.text.replace(b_series, "S").replace(b_sop, "I") == \
        made_up.text.replace("1.2.3.999", "S").replace("1.2.3.998", "I")


@pytest.mark.parametrize("series", ["*", "{as_}\\{bs}", "{as_},{bs}", "%3F*"])
def test_wildcards_and_lists_below_the_own_study_stay_in_it(site, series):
    uid = series.format(as_=site.a.series_uid, bs=site.b.series_uid)
    response = site.get(f"/dicomweb/studies/{site.a.study_uid}/series/{uid}/metadata",
                        site.grant)

    assert response.status_code in (200, 400, 404)
    if response.status_code == 200:
        assert {item["0020000D"]["Value"][0] for item in response.json()} == \
            {site.a.study_uid}
    _assert_nothing_of_b(site, response, uids=False)


def test_whole_instance_retrieval_needs_downloads_at_every_level(site):
    base = f"/dicomweb/studies/{site.a.study_uid}"
    series = f"{base}/series/{site.a.series_uid}"
    for path in (base, series, f"{series}/instances/{site.a_instances[0]}"):
        for method in ("GET", "HEAD"):
            response = httpx.request(method, site.http + path,
                                     headers={"Authorization": "Bearer " + site.grant})
            assert response.status_code == 403, (method, path)
        allowed = site.get(path, site.grant_download,
                           headers={"Accept": "multipart/related; type=application/dicom"})
        assert allowed.status_code == 200, path
    assert site.get(f"/api/studies/{site.a.study_uid}/download", site.grant,
                    params={"format": "jpeg"}).status_code == 403


# ---------------------------------------------------------------------------- searches


@pytest.mark.parametrize(("path", "params"), [
    ("/dicomweb/studies", [("StudyInstanceUID", "{b}")]),
    ("/dicomweb/studies", [("StudyInstanceUID", "{a}"), ("StudyInstanceUID", "{b}")]),
    ("/dicomweb/studies", [("StudyInstanceUID", "{a}\\{b}")]),
    ("/dicomweb/studies", [("StudyInstanceUID", "*")]),
    ("/dicomweb/studies", [("0020000d", "{b}")]),
    ("/dicomweb/studies", [("PatientID", B_PATIENT_ID)]),
    ("/dicomweb/studies", [("PatientName", "tran*"), ("fuzzymatching", "true")]),
    ("/dicomweb/studies", [("AccessionNumber", "ACC-B*"), ("includefield", "all")]),
    ("/dicomweb/studies", [("limit", "1"), ("offset", "1")]),
    ("/dicomweb/series", [("0020000D", "{b}"), ("includefield", "00081030")]),
    ("/dicomweb/series", [("SeriesInstanceUID", "{bs}")]),
    ("/dicomweb/series", [("Modality", "MR")]),
    ("/dicomweb/instances", [("SOPInstanceUID", "{bi}")]),
    ("/dicomweb/instances", [("limit", "5000"), ("includefield", "all")]),
    ("/dicomweb/studies/{a}/series", [("StudyInstanceUID", "{b}")]),
    ("/dicomweb/studies/{a}/instances", [("SeriesInstanceUID", "{bs}")]),
    ("/dicomweb/studies/{a}/series/{bs}/instances", []),
])
def test_searches_stay_in_the_own_study_whatever_they_ask(site, path, params):
    values = {"a": site.a.study_uid, "b": site.b.study_uid, "bs": site.b.series_uid,
              "bi": site.b.sop_uid}
    response = site.get(path.format(**values), site.grant,
                        params=[(k, v.format(**values)) for k, v in params])

    assert response.status_code in (200, 204, 400)
    if response.status_code == 200:
        assert {item["0020000D"]["Value"][0] for item in response.json()} <= \
            {site.a.study_uid}
    _assert_nothing_of_b(site, response, uids=response.status_code != 400)


# ---------------------------------------------------------------------------- WADO-URI


def _wado_uri(site: Site, query: str, grant: str | None = None,
              path: str = "/wado") -> httpx.Response:
    return site.get(f"{path}?requestType=WADO&{query}", grant or site.grant)


@pytest.mark.parametrize("query", [
    "studyUID={b}&seriesUID={bs}&objectUID={bi}",
    "studyUID={a}&studyUID={b}&seriesUID={bs}&objectUID={bi}",
    "studyUID={b}&studyUID={a}&seriesUID={bs}&objectUID={bi}",
    "studyUID={a}%5C{b}&seriesUID={bs}&objectUID={bi}",
    "studyUID={a},{b}&seriesUID={bs}&objectUID={bi}",
    "studyUID={a};studyUID={b}&seriesUID={bs}&objectUID={bi}",
    "stud%79UID={b}&studyUID={a}&seriesUID={bs}&objectUID={bi}",
    "studyUID={a}&seriesUID={bs}&objectUID={bi}",
    "studyUID={a}&seriesUID=*&objectUID={bi}",
])
def test_wado_uri_reads_the_same_study_as_the_gate(site, query):
    filled = query.format(a=site.a.study_uid, b=site.b.study_uid, bs=site.b.series_uid,
                          bi=site.b.sop_uid)
    for path in ("/wado", "/dicomweb/wado"):
        response = _wado_uri(site, filled, site.grant_download, path)
        # 400: a UID parameter that is not one UID ("*", a list) is refused before any lookup.
        assert response.status_code in (400, 403, 404), (path, response.status_code)
        _assert_nothing_of_b(site, response, uids=False)


@pytest.mark.parametrize("content_type", [
    "application/dicom", "application%2Fdicom", "image/jpeg,application/dicom",
    "image/jpeg&contentType=application/dicom", "+application/dicom",
    "application/dicom;q=1",
])
def test_wado_uri_dicom_needs_downloads_however_it_is_spelled(site, content_type):
    query = (f"studyUID={site.a.study_uid}&seriesUID={site.a.series_uid}"
             f"&objectUID={site.a_instances[0]}&contentType={content_type}")
    for path in ("/wado", "/dicomweb/wado"):
        response = _wado_uri(site, query, path=path)
        assert response.status_code in (403, 406), (path, response.status_code)
        assert b"DICM" not in response.content


def test_wado_uri_use_is_in_the_shares_access_log(site):
    # WADO-RS left an entry in the share's access log; the same reads through WADO-URI none.
    made = _share(site.http, site.a.study_uid, allow_download=True)
    grant = _grant(site.http, made["token"])
    query = (f"studyUID={site.a.study_uid}&seriesUID={site.a.series_uid}"
             f"&objectUID={site.a_instances[0]}")

    picture = _wado_uri(site, query, grant, "/wado")
    whole = _wado_uri(site, query + "&contentType=application/dicom", grant, "/dicomweb/wado")

    assert picture.status_code == 200 and whole.status_code == 200
    log = httpx.get(f"{site.http}/api/shares/{made['id']}", headers=STAFF).json()["accesses"]
    assert {(a["action"], a["detail"]) for a in log} >= {
        ("view", site.a.series_uid), ("retrieve-dicom", site.a.series_uid)}


def test_wado_uri_renders_the_own_study(site):
    query = (f"studyUID={site.a.study_uid}&seriesUID={site.a.series_uid}"
             f"&objectUID={site.a_instances[0]}")
    response = _wado_uri(site, query + "&contentType=application/dicom&contentType=image/jpeg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"


# ---------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "PATCH", "TRACE", "PROPFIND",
                                    "POST", "DELETE"])
def test_unusual_methods_on_the_own_study_are_staff_only(site, method):
    for path in (f"/dicomweb/studies/{site.a.study_uid}/series/{site.a.series_uid}",
                 f"/dicomweb/studies/{site.b.study_uid}/metadata"):
        response = httpx.request(method, site.http + path,
                                 headers={"Authorization": "Bearer " + site.grant})
        assert response.status_code == 403, (method, path)


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/shares"), ("GET", "/api/shares"), ("GET", "/api/shares/{id}"),
    ("DELETE", "/api/shares/{id}"), ("POST", "/api/shares/{id}/revoke"),
    ("POST", "/api/shares/{id}/unlock"), ("GET", "/api/shares/{id}/slip"),
    ("GET", "/api/shares/{id}/qr.png"), ("POST", "/api/studies/{a}/film"),
    ("POST", "/dicomweb/studies"), ("POST", "/dicomweb/studies/{a}"),
    ("DELETE", "/dicomweb/studies/{a}"), ("GET", "/admin"), ("GET", "/metrics"),
    ("GET", "/api/stats/film"), ("GET", "/"), ("GET", "/studies/{a}"),
    ("GET", "/accession/ACC-A"), ("GET", "/IHEInvokeImageDisplay?studyUID={a}"),
])
def test_a_share_cannot_do_staff_actions_on_its_own_study(site, method, path):
    url = site.http + path.format(a=site.a.study_uid, id=site.share_id)
    response = httpx.request(method, url, headers={"Authorization": "Bearer " + site.grant},
                             json={"study_instance_uid": site.a.study_uid})
    assert response.status_code == 403
    shown = httpx.get(f"{site.http}/api/shares/{site.share_id}", headers=STAFF).json()
    assert shown["state"] == "active"


# ---------------------------------------------------------------------------- credentials


def test_credentials_cannot_be_mixed_to_widen_a_share(site):
    series = f"/dicomweb/studies/{site.a.study_uid}/series/{site.a.series_uid}"
    b_metadata = f"/dicomweb/studies/{site.b.study_uid}/metadata"
    bearer = "Bearer " + site.grant
    # Two Authorization headers: the first bearer decides, the second adds nothing.
    two = httpx.get(site.http + series, headers=[
        ("Authorization", bearer), ("Authorization", "Bearer " + site.grant_download)])
    assert two.status_code == 403
    # A header credential and a query credential: the header decides.
    mixed = site.get(series, site.grant, params={"access_token": site.grant_download})
    assert mixed.status_code == 403
    # A share credential from a staff address is a share, not staff.
    from_staff = site.get(b_metadata, site.grant, headers=STAFF)
    assert from_staff.status_code == 403
    # A bad credential from a staff address never falls back to staff.
    for bad in ({"Authorization": "Bearer x.y.z"}, {"Authorization": "Bearer " + site.grant[:-1]}):
        assert site.get(b_metadata, headers={**STAFF, **bad}).status_code == 401
    assert site.get(b_metadata, headers=STAFF, params={"access_token": "x"}).status_code == 401


@pytest.mark.parametrize(("where", "value"), [
    ("query", "access_token="), ("query", "access_token"), ("query", "a=1&access_token=&b=2"),
    ("query", "access%5Ftoken="), ("header", "Bearer"), ("header", "BEARER"),
])
def test_an_empty_credential_is_refused_not_taken_for_none(site, where, value):
    # Present but empty is present and not valid: from a staff address it must not fall back
    # to staff (docs/sharing.md), nor from elsewhere to the public routes' rights.
    url = f"{site.http}/dicomweb/studies/{site.b.study_uid}/metadata"
    if where == "query":
        response = httpx.get(url + "?" + value, headers=STAFF)
    else:
        response = httpx.get(url, headers={**STAFF, "Authorization": value})

    assert response.status_code == 401
    assert B_PATIENT_ID not in response.text


def test_forged_grants_are_refused(site):
    share_id, session, expires, signature = site.grant.split(".")
    url = f"/dicomweb/studies/{site.a.study_uid}/metadata"
    forgeries = [
        f"{share_id}.{session}.{int(expires) + 10**6}.{signature}",
        f"{int(share_id) + 1}.{session}.{expires}.{signature}",
        f"0{share_id}.{session}.{expires}.{signature}",
        f"{share_id}.{session}x.{expires}.{signature}",
        f"{share_id}.{session}.{expires}.{signature}.extra",
        f"{share_id}.{session}.{expires}.",
        f"\u0661.{session}.{expires}.{signature}",  # an Arabic-Indic digit one
        f"{share_id}.{session}.{expires}.{signature.lower()}",
        "", ".", "...",
    ]
    for forged in forgeries:
        response = site.get(url, params={"access_token": forged})
        assert response.status_code == 401, forged
        assert A_PATIENT_ID not in response.text


def test_revoked_and_expired_share_sessions_are_refused_at_once(site):
    revoked = _share(site.http, site.a.study_uid)
    revoked_grant = _grant(site.http, revoked["token"])
    expiring = _share(site.http, site.a.study_uid)
    site.server.set_share_time(expiring["id"], "expires_at",
                               dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5))
    expiring_grant = _grant(site.http, expiring["token"])  # its session ends with the share
    url = f"/dicomweb/studies/{site.a.study_uid}/metadata"
    assert site.get(url, revoked_grant).status_code == 200  # now in the policy's cache

    httpx.delete(f"{site.http}/api/shares/{revoked['id']}", headers=STAFF)
    assert site.get(url, revoked_grant).status_code == 401  # the revoke cleared the cache
    time.sleep(1.6)
    assert site.get(url, expiring_grant).status_code == 401
    assert site.get(url, site.grant).status_code == 200  # other shares unaffected


# ---------------------------------------------------------------------------- strangers


@pytest.mark.parametrize("path", [
    "/ohif/", "/ohif/viewer?StudyInstanceUIDs={b}", "/ohif/app-config.js",
    "/ohif/..%2F..%2Fpacs%2Fsettings.py", "/ohif/%2e%2e/%2e%2e/README.md", "/ohif/..",
    "/ohif/../api/shares", "/static/..%2F..%2Fpacs%2Faccess.py", "/static/../patient.py",
    "/dicomweb/openapi.json", "/healthz", "/favicon.ico",
    "/s/{token}%0A", "/s/{token}%2F..%2F..%2Fapi%2Fshares", "/s/..%2Fapi%2Fshares",
    "/s/" + "A" * 22, "/s/{token}/../../api/shares",
])
def test_public_routes_reveal_no_patient_data(site, path):
    filled = path.format(b=site.b.study_uid, token=site.token)
    url = httpx.URL(site.http).copy_with(raw_path=filled.encode())
    response = httpx.get(url, timeout=30)

    assert response.status_code in (200, 401, 404, 503)
    body = response.content.decode("utf-8", errors="replace")
    for secret in (*B_TEXT, A_PATIENT_ID, "Lê Văn An", "Lê^Văn An", site.a.study_uid):
        assert secret not in body, (path, secret)


def test_a_share_link_with_a_slash_added_leads_to_the_page(site):
    # /s/TOKEN/ (a slash added by a messaging app) was a 401 "sign in" page.
    slashed = httpx.get(f"{site.http}/s/{site.token}/", headers={"X-Forwarded-For":
                                                                 "203.0.113.9"})

    assert slashed.status_code == 308
    assert slashed.headers["location"] == f"/s/{site.token}"
    assert httpx.get(site.http + slashed.headers["location"]).status_code == 200
    assert httpx.get(f"{site.http}/s/{'A' * 22}/").status_code in (308, 404)
    assert httpx.get(f"{site.http}/s/not-a-token/").status_code == 404


def test_the_favicon_browsers_ask_for_is_there(site):
    icon = httpx.get(site.http + "/favicon.ico")

    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file


@pytest.mark.parametrize("token", ["{token}%0A", "{token}=", "{token}.", "%20{token}",
                                   "{token}{token}", "%2E%2E"])
def test_odd_tokens_open_no_session(site, token):
    filled = token.format(token=site.token)
    url = httpx.URL(site.http).copy_with(raw_path=f"/api/s/{filled}/session".encode())
    response = httpx.post(url, json={})
    assert response.status_code in (404, 405)
    assert "access_token" not in response.text and A_PATIENT_ID not in response.text


def test_strangers_reach_no_study_route(site):
    a, b = site.a.study_uid, site.b.study_uid
    for path in (f"/dicomweb/studies/{a}/metadata", f"/dicomweb/studies/{a}/thumbnail",
                 f"/dicomweb/studies/{a}/series", "/dicomweb/studies", "/dicomweb/series",
                 f"/wado?requestType=WADO&studyUID={b}&seriesUID=*&objectUID=*",
                 f"/api/studies/{a}/film.png", f"/api/studies/{a}/download", "/metrics"):
        response = site.get(path)
        assert response.status_code == 401, path
        assert "Bí Mật" not in response.text and A_PATIENT_ID not in response.text


def test_a_fhir_client_outside_the_staff_networks_is_refused_in_fhir(site):
    # It got the sign-in HTML page meant for browsers.
    for path in ("/fhir/Patient?identifier=BN-A-0001", "/fhir/metadata"):
        refused = site.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["content-type"].startswith("application/fhir+json")
        assert refused.json()["resourceType"] == "OperationOutcome"
        assert refused.json()["issue"][0]["code"] == "login"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert site.get("/fhir/metadata", site.grant).json()["issue"][0]["code"] == "forbidden"


# ---------------------------------------------------------------------------- the proxy


@pytest.mark.parametrize(("headers", "staff"), [
    ([("X-Forwarded-For", "10.99.0.5, 203.0.113.9")], False),  # the proxy appended the client
    ([("X-Forwarded-For", "10.99.0.5"), ("X-Forwarded-For", "203.0.113.9")], False),
    ([("Forwarded", "for=10.99.0.5")], False),
    ([("X-Real-IP", "10.99.0.5")], False),
    ([("X-Forwarded-For", "::ffff:10.99.0.5")], False),
    ([("X-Forwarded-For", "203.0.113.9, 10.99.0.5")], True),  # a staff client behind it
])
def test_the_client_address_is_the_one_the_proxy_appended(site, headers, staff):
    response = httpx.get(site.http + "/dicomweb/studies", headers=headers)
    assert response.status_code == (200 if staff else 401)


def test_every_share_request_is_logged_with_the_proxied_address(site):
    made = _share(site.http, site.a.study_uid)
    httpx.get(f"{site.http}/s/{made['token']}", headers={"X-Forwarded-For": "203.0.113.77"})
    refused = site.get(f"/dicomweb/studies/{site.b.study_uid}/metadata", site.grant)
    assert refused.status_code == 403
    assert f"share {site.share_id} refused: GET /dicomweb/studies/{site.b.study_uid}/metadata" \
        in site.server.log()
    # Paths naming a patient or an order are logged without the name (no route has read them
    # yet, so the gate cannot know which segment is which).
    for path in (f"/fhir/Patient/{A_PATIENT_ID}", "/api/orders/ACC-A", "/accession/ACC-A"):
        assert site.get(path, site.grant).status_code == 403
    log = site.server.log()
    assert A_PATIENT_ID not in log and "ACC-A" not in log
    assert f"share {site.share_id} refused: GET /fhir/Patient/…" in log
    shown = httpx.get(f"{site.http}/api/shares/{made['id']}", headers=STAFF).json()
    assert {a["address"] for a in shown["accesses"] if a["action"] == "open"} == \
        {"203.0.113.77"}


def test_share_page_session_names_only_its_own_study(site):
    session = _open(site.http, site.token).json()
    assert session["study"]["study_instance_uid"] == site.a.study_uid
    assert re.search(re.escape(site.b.study_uid), str(session)) is None


_UNPARSEABLE_FORWARDED = [
    [("X-Forwarded-For", "")], [("X-Forwarded-For", "garbage, ,,")],
    [("X-Forwarded-For", ",")], [("X-Forwarded-For", "203.0.113.9,")],
    [("X-Forwarded-For", ", 127.0.0.1")], [("X-Forwarded-For", "127.0.0.1, unknown")],
    [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "")],
    [("X-Forwarded-For", "[::1")], [("X-Forwarded-For", "127.0.0.1:x:y")],
]


def test_a_proxy_missing_from_trusted_proxies_makes_nobody_staff(start_server):
    # A reverse proxy inside the hospital that nobody listed: its address is staff, and every
    # request it forwarded from the internet was staff too.
    server = start_server(PACS_TRUSTED_PROXIES="192.0.2.10")
    staff_only = server.http + "/api/shares"
    assert httpx.get(staff_only).status_code == 200  # loopback, not forwarded: staff
    for forwarded in ("203.0.113.9", "127.0.0.1, 203.0.113.9", "garbage"):
        response = httpx.get(staff_only, headers={"X-Forwarded-For": forwarded})
        assert response.status_code == 401, forwarded
    assert httpx.get(staff_only, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    assert server.log().count("is not in trusted_proxies") == 1


def test_a_proxy_given_as_a_network_and_ipv6_clients_behind_it(start_server):
    # A network written with host bits (127.0.0.5/8) was no network at all to uvicorn, which
    # then ignored X-Forwarded-Proto; an IPv6 client spelled in capitals behind a trusted
    # proxy was taken for a stranger forwarding requests.
    server = start_server(PACS_TRUSTED_PROXIES="127.0.0.5/8",
                          PACS_STAFF_NETWORKS="2001:db8:1::/64")
    spec = Spec(patient_id="BN-V6")
    assert stow(server.http, [instance(spec)], headers={
        "X-Forwarded-For": "2001:db8:1::7"}).status_code == 200
    for client in ("2001:DB8:1::7", "2001:db8:1:0:0:0:0:7", "[2001:db8:1::7]:51234"):
        found = httpx.get(server.http + "/dicomweb/studies", params={"PatientID": "BN-V6"},
                          headers={"X-Forwarded-For": client, "X-Forwarded-Proto": "https"})
        assert found.status_code == 200, client
        assert found.json()[0]["00081190"]["Value"][0].startswith("https://"), client
    assert "not in trusted_proxies" not in server.log()
    assert httpx.get(server.http + "/dicomweb/studies", headers={
        "X-Forwarded-For": "2001:db8:2::7"}).status_code == 401  # outside the staff network


def test_an_unparseable_forwarded_address_gets_none_of_the_proxys_rights(start_server):
    # Loopback is both staff and a trusted proxy by default (the proxy on the same host). A
    # forwarded address that is not one must make the client unknown, not the proxy itself.
    server = start_server()
    studies = server.http + "/api/shares"  # staff only
    assert httpx.get(studies).status_code == 200  # the control: loopback is staff here

    answers = {str(h): httpx.get(studies, headers=h).status_code for h in _UNPARSEABLE_FORWARDED}

    assert answers == {str(h): 401 for h in _UNPARSEABLE_FORWARDED}
    # A client the proxy names, even one that is itself a trusted proxy, is still decided
    # by its address.
    assert httpx.get(studies, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    assert httpx.get(studies, headers={"X-Forwarded-For": "203.0.113.9, 127.0.0.1:5000"}
                     ).status_code == 401
    assert httpx.get(studies, headers={"X-Forwarded-For": "::1, [::1]:443"}).status_code == 200
