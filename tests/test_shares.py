"""Share links: life cycle, PINs, the access log, QR codes and slips, and the guarantee that a
share of study A never returns any byte of study B.

The server runs as it would facing the internet behind a reverse proxy on the same host:
its staff network is 10.99.0.0/16, so plain loopback requests are strangers (they reach only
what a share opens) and requests the "proxy" marks ``X-Forwarded-For: 10.99.0.5`` are staff.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
import zxingcpp
from PIL import Image
from starlette.routing import Mount

from pacs.settings import load_settings
from storage.shares import Share
from tests.conftest import PacsProcess, stow
from tests.factory import Spec, ct_series, instance
from viewer.share_api import slip_html

STAFF = {"X-Forwarded-For": "10.99.0.5"}
STRANGER = {"X-Forwarded-For": "203.0.113.7"}  # a phone on the internet, through the proxy
PATIENT = "Nguyễn^Thị Hồng Nhung"
PATIENT_ID = "BN-SHARE-01"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    server = PacsProcess(tmp_path_factory.mktemp("shares") / "data", env={
        "PACS_STAFF_NETWORKS": "10.99.0.0/16",
        "PACS_SHARE_PIN_MAX_ATTEMPTS": "3",
        "PACS_SITE_NAME": "Bệnh viện Đa khoa Tỉnh",
        "PACS_PUBLIC_URL": "",
        "TZ": "ICT-7",  # Vietnam (UTC+7), written the POSIX way: no time zone data needed
    })
    server.start()
    study_a = Spec(patient_name=PATIENT, patient_id=PATIENT_ID, birth_date="19870412",
                   accession="ACC-A", study_description="CT ngực không cản quang")
    study_b = Spec(patient_name=PATIENT, patient_id=PATIENT_ID, birth_date="19870412",
                   accession="ACC-B", study_description="MRI sọ não bí mật",
                   series_description="T2 bí mật", modality="MR")
    assert stow(server.http, ct_series(study_a, 12, size=64), STAFF).status_code == 200
    b_uids = []
    for n in range(3):
        spec = Spec(**{**study_b.__dict__, "sop_uid": Spec().sop_uid, "instance_number": n + 1,
                       "rows": 32, "columns": 32})
        b_uids.append(spec.sop_uid)
        assert stow(server.http, [instance(spec)], STAFF).status_code == 200
    yield server, study_a, study_b, b_uids
    server.stop()


def _share(server, study_uid: str, **body) -> dict:
    response = httpx.post(server.http + "/api/shares", json={"study_instance_uid": study_uid,
                                                            **body}, headers=STAFF)
    assert response.status_code == 201, response.text
    return response.json()


def _session(server, token: str, pin: str | None = None) -> httpx.Response:
    return httpx.post(f"{server.http}/api/s/{token}/session", json={"pin": pin} if pin else {})


def _grant(server, token: str, pin: str | None = None) -> str:
    response = _session(server, token, pin)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


# ---------------------------------------------------------------------------- life cycle


def test_strangers_reach_nothing_without_a_share(site):
    server, study_a, _, _ = site
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{study_a.study_uid}/metadata",
                 "/api/shares", "/", f"/studies/{study_a.study_uid}"):
        response = httpx.get(server.http + path)
        assert response.status_code == 401, path
        assert PATIENT_ID not in response.text and "Nguyễn" not in response.text
    assert httpx.get(server.http + "/healthz").status_code == 200
    assert httpx.get(server.http + "/dicomweb/studies", headers=STAFF).status_code == 200


def test_share_page_shows_the_study_in_vietnamese(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    assert made["url"].endswith("/s/" + made["token"])
    page = httpx.get(made["url"])
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "Nguyễn Thị Hồng Nhung" in page.text  # PN shown as written, not "Nguyễn^Thị…"
    assert "CT ngực không cản quang" in page.text
    # The first image is announced in the page itself, and it loads with the page's session.
    first = re.search(r'rel="preload" as="image" href="([^"]+)"', page.text).group(1)
    image = httpx.get(server.http + first.replace("&amp;", "&"))
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (512, 512)


def test_revoked_share_closes_the_page_and_its_sessions(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    grant = _grant(server, made["token"])
    metadata = f"{server.http}/dicomweb/studies/{study_a.study_uid}/metadata"
    assert httpx.get(metadata, headers={"Authorization": "Bearer " + grant}).status_code == 200
    revoked = httpx.delete(f"{server.http}/api/shares/{made['id']}", headers=STAFF)
    assert revoked.json()["state"] == "revoked"
    page = httpx.get(made["url"])
    assert page.status_code == 410 and "thu hồi" in page.text
    assert "Nguyễn" not in page.text
    assert httpx.get(metadata, headers={"Authorization": "Bearer " + grant}).status_code == 401
    assert _session(server, made["token"]).status_code == 410


def test_expired_share_shows_a_vietnamese_page_and_no_data(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    assert httpx.get(made["url"]).status_code == 200
    server.set_share_time(made["id"], "expires_at", dt.datetime.now(dt.UTC))
    page = httpx.get(made["url"])
    assert page.status_code == 410 and "hết hạn" in page.text
    assert "Nguyễn" not in page.text and study_a.study_uid not in page.text


@pytest.mark.parametrize("token", ["x", "A" * 22, "<img src=x onerror=alert(1)>", "Zm9v" * 8])
def test_malformed_or_unknown_tokens_get_a_clear_page(site, token):
    server = site[0]
    page = httpx.get(f"{server.http}/s/{token}")
    assert page.status_code == 404
    assert "Liên kết không tồn tại" in page.text and "<img src=x" not in page.text
    assert _session(server, token).status_code == 404


def test_forged_or_tampered_sessions_are_refused(site):
    server, study_a, _, _ = site
    grant = _grant(server, _share(server, study_a.study_uid)["token"])
    share_id, session, expires, signature = grant.split(".")
    url = f"{server.http}/dicomweb/studies/{study_a.study_uid}/metadata"
    for forged in (f"{share_id}.{session}.{int(expires) + 86400}.{signature}",
                   f"{int(share_id) + 1}.{session}.{expires}.{signature}",
                   "garbage", grant[:-2]):
        assert httpx.get(url, params={"access_token": forged}).status_code == 401
    # A bad credential never falls back to the network's rights, even from staff.
    response = httpx.get(url, headers={**STAFF, "Authorization": "Bearer garbage"})
    assert response.status_code == 401


def test_share_creation_rejects_bad_requests(site):
    server, study_a, _, _ = site
    post = lambda body: httpx.post(server.http + "/api/shares", json=body, headers=STAFF)  # noqa: E731
    assert post({"study_instance_uid": "1.2.3.4.5.6.7"}).status_code == 404
    assert post({}).status_code == 400
    assert post({"study_instance_uid": study_a.study_uid, "days": 0}).status_code == 400
    assert post({"study_instance_uid": study_a.study_uid, "days": "x"}).status_code == 400
    bad_pin = post({"study_instance_uid": study_a.study_uid, "pin": "12ab"})
    assert bad_pin.status_code == 400 and "pin" in bad_pin.json()["message"]
    raw = httpx.post(server.http + "/api/shares", content=b"{not json",
                     headers={**STAFF, "Content-Type": "application/json"})
    assert raw.status_code == 400
    as_text = httpx.post(server.http + "/api/shares",
                         headers={**STAFF, "Content-Type": "text/plain"},
                         content=f'{{"study_instance_uid": "{study_a.study_uid}"}}')
    assert as_text.status_code == 415 and "application/json" in as_text.json()["message"]


def _shares_of(server, study_uid: str) -> list[dict]:
    return httpx.get(server.http + "/api/shares", params={"study": study_uid, "limit": "1000"},
                     headers=STAFF).json()


@pytest.mark.parametrize("flag", ["false", "true", 0, 1, "", [], {}])
def test_share_with_a_download_flag_that_is_not_a_json_boolean_is_refused(site, flag):
    # bool("false") is True: the share would have allowed downloads.
    server, study_a, _, _ = site
    before = len(_shares_of(server, study_a.study_uid))

    response = httpx.post(server.http + "/api/shares", headers=STAFF, json={
        "study_instance_uid": study_a.study_uid, "allow_download": flag})

    assert response.status_code == 400
    assert "allow_download" in response.json()["message"]
    assert len(_shares_of(server, study_a.study_uid)) == before  # no share, so no downloads


def test_share_download_flag_false_gives_a_share_without_downloads(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, allow_download=False)
    grant = _grant(server, made["token"])

    response = httpx.get(f"{server.http}/api/studies/{study_a.study_uid}/download",
                         params={"format": "jpeg", "access_token": grant})

    assert made["allow_download"] is False and response.status_code == 403


@pytest.mark.parametrize(("field", "value"), [
    ("study_instance_uid", 123), ("study_instance_uid", ["1.2.3"]), ("study_instance_uid", ""),
    ("study_instance_uid", "1.2.3*"), ("study_instance_uid", "1." * 40 + "1"),
    ("days", True), ("days", "30"), ("days", -1), ("days", 10**400), ("days", 3651),
    ("days", 1e-12), ("days", 0.04),  # expired, or nearly, before anyone could open it
    ("pin", 1234), ("pin", True), ("pin", ["1234"]),
    ("created_by", 5), ("created_by", "x" * 201), ("created_by", {"name": "x"}),
    ("PIN", "1234"), ("allow_downloads", True),  # misspelt: the share would lack them
])
def test_share_creation_names_the_field_that_is_wrong(site, field, value):
    server, study_a, _, _ = site
    body = {"study_instance_uid": study_a.study_uid, field: value}

    response = httpx.post(server.http + "/api/shares", headers=STAFF, json=body)

    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith(field + ":")


@pytest.mark.parametrize("field", ["created_by", "pin"])
def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(site, field):
    # JSON's "\\ud800" escape makes a string no database takes: it was a 500.
    server, study_a, _, _ = site
    body = f'{{"study_instance_uid": "{study_a.study_uid}", "{field}": "\\ud800"}}'

    response = httpx.post(server.http + "/api/shares", content=body.encode(),
                          headers={**STAFF, "Content-Type": "application/json"})

    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith(field + ":")


def test_share_days_that_are_not_finite_are_refused(site):
    server, study_a, _, _ = site
    for days in ("NaN", "Infinity", "1e999"):
        response = httpx.post(server.http + "/api/shares", headers={
            **STAFF, "Content-Type": "application/json"},
            content=f'{{"study_instance_uid": "{study_a.study_uid}", "days": {days}}}')
        assert response.status_code == 400 and "days" in response.json()["message"], days


@pytest.mark.parametrize("pin", ["\uff11\uff12\uff13\uff14", "\u0661\u0662\u0663\u0664",
                                 "12\u00b934", "1234\n", " 1234", "12345678\u0669"])
def test_pin_with_digits_other_than_0_to_9_is_refused_at_creation(site, pin):
    # \d, str.isdigit and int() take full-width or Arabic-Indic digits: the patient typing
    # 1234 would never match "１２３４" and would lock the link trying.
    server, study_a, _, _ = site

    response = httpx.post(server.http + "/api/shares", headers=STAFF,
                          json={"study_instance_uid": study_a.study_uid, "pin": pin})

    assert response.status_code == 400 and response.json()["message"].startswith("pin:")


def test_pin_attempt_with_other_digits_is_refused_without_using_an_attempt(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, pin="1234")

    for attempt in ("\uff11\uff12\uff13\uff14", "\u0661\u0662\u0663\u0664", "12a4"):
        response = _session(server, made["token"], attempt)
        assert response.status_code == 400, attempt
        assert response.json()["pin_required"] is True
    as_number = httpx.post(f"{server.http}/api/s/{made['token']}/session", json={"pin": 1234})

    assert as_number.status_code == 400 and "pin" in as_number.json()["message"]
    shown = httpx.get(f"{server.http}/api/shares/{made['id']}", headers=STAFF).json()
    assert shown["pin_failures"] == 0 and shown["state"] == "active"
    assert _session(server, made["token"], "1234").status_code == 200


_NESTED = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_bodies_are_a_400_not_a_500(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, pin="generated")
    json_headers = {"Content-Type": "application/json"}

    create = httpx.post(server.http + "/api/shares", content=_NESTED,
                        headers={**STAFF, **json_headers})
    session = httpx.post(f"{server.http}/api/s/{made['token']}/session", content=_NESTED,
                         headers=json_headers)
    nested_pin = httpx.post(f"{server.http}/api/s/{made['token']}/session", headers=json_headers,
                            content='{"pin": ' + _NESTED + "}")

    assert create.status_code == 400
    assert session.status_code == 400
    assert nested_pin.status_code == 400
    assert httpx.get(f"{server.http}/api/shares/{made['id']}",
                     headers=STAFF).json()["pin_failures"] == 0


def test_a_body_larger_than_a_share_needs_is_refused(site):
    server, study_a, _, _ = site
    big = json.dumps({"study_instance_uid": study_a.study_uid, "created_by": "x" * 2**21})

    response = httpx.post(server.http + "/api/shares", content=big,
                          headers={**STAFF, "Content-Type": "application/json"})

    assert response.status_code == 413


# ---------------------------------------------------------------------------- ids, paging


_FULL_WIDTH = {ord("0") + n: 0xFF10 + n for n in range(10)}  # "1" -> "１"


@pytest.mark.parametrize(("method", "suffix"), [
    ("GET", ""), ("DELETE", ""), ("POST", "/revoke"), ("POST", "/unlock"),
    ("GET", "/qr.png"), ("GET", "/qr.svg"), ("GET", "/slip"),
])
def test_share_ids_that_cannot_exist_are_404(site, method, suffix):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    for share_id in ("999999999999999999999999999999", "9223372036854775808", "0", "-1",
                     "+" + str(made["id"]), str(made["id"]).translate(_FULL_WIDTH),
                     "\u0661", str(made["id"]) + "\u00b2"):
        response = httpx.request(method, f"{server.http}/api/shares/{share_id}{suffix}",
                                 headers=STAFF)
        assert response.status_code == 404, (share_id, response.text)
    # The full-width spelling of its id did not touch the share.
    assert httpx.get(f"{server.http}/api/shares/{made['id']}",
                     headers=STAFF).json()["state"] == "active"


@pytest.mark.parametrize(("path", "params", "named"), [
    ("/api/shares", {"offset": "99999999999999999999999"}, "offset"),
    ("/api/shares", {"offset": "9223372036854775808"}, "offset"),
    ("/api/shares", {"offset": "-1"}, "offset"),
    ("/api/shares", {"limit": "-1"}, "limit"),  # SQLite: a negative LIMIT is none, all shares
    ("/api/shares", {"limit": "0"}, "limit"),
    ("/api/shares", {"limit": "\uff11"}, "limit"),
    ("/api/shares", {"limit": "1e3"}, "limit"),
    ("/api/shares", {"limit": " 5"}, "limit"),
    ("/api/stats/film", {"from": "2021-01-01", "to": "2020-01-01"}, "from"),
    ("/api/stats/film", {"from": "20210101"}, "from"),
    ("/api/stats/film", {"to": "2021-W01-1"}, "to"),
    ("/api/stats/film", {"from": "\uff12\uff10\uff12\uff11-01-01"}, "from"),
    ("/api/stats/film", {"to": "2021-02-30"}, "to"),
])
def test_share_paging_and_film_figure_ranges_out_of_bounds_are_400_naming_them(
        site, path, params, named):
    server = site[0]

    response = httpx.get(server.http + path, params=params, headers=STAFF)

    assert response.status_code == 400
    assert response.json()["message"].startswith(named + ":")


def test_share_listing_pages(site):
    server, study_a, _, _ = site
    _share(server, study_a.study_uid)
    _share(server, study_a.study_uid)
    listing = lambda **p: httpx.get(server.http + "/api/shares", params=p,  # noqa: E731
                                    headers=STAFF)
    first_two = listing(limit="2").json()
    assert len(first_two) == 2 and first_two[0]["id"] > first_two[1]["id"]
    assert listing(limit="1", offset="1").json()[0]["id"] == first_two[1]["id"]
    assert len(listing(limit="5000").json()) <= 1000  # at most 1000 at a time
    assert listing(offset="9223372036854775807").json() == []


@pytest.mark.parametrize("kind", ["exe", "pdf", "PNG", "svgz", "png.exe"])
def test_qr_code_is_only_png_or_svg(site, kind):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)

    response = httpx.get(f"{server.http}/api/shares/{made['id']}/qr.{kind}", headers=STAFF)

    assert response.status_code == 404
    assert "svg" not in response.headers.get("content-type", "")


# ---------------------------------------------------------------------------- figures


def test_film_figures_for_one_day(site):
    server = site[0]
    response = httpx.get(server.http + "/api/stats/film", headers=STAFF,
                         params={"from": "2021-01-01", "to": "2021-01-01"})
    assert response.status_code == 200 and response.json()["shares_created"] == 0


def _figures(server, **params) -> dict:
    response = httpx.get(server.http + "/api/stats/film", params=params, headers=STAFF)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_revoked_share_delivers_no_study_and_saves_no_film(site):
    # A share made by mistake and revoked at once counted as a study delivered digitally.
    server, _, _, _ = site
    study = Spec(patient_name="Lý^Thị Thu", patient_id="BN-REVOKED", modality="DX")
    assert stow(server.http, [instance(study)], STAFF).status_code == 200
    before = _figures(server)

    made = _share(server, study.study_uid)
    httpx.delete(f"{server.http}/api/shares/{made['id']}", headers=STAFF)
    after = _figures(server)

    for figure in ("studies_delivered", "studies_opened", "sheets_avoided", "saving_vnd"):
        assert after[figure] == before[figure], figure
    assert after["shares_created"] == before["shares_created"] + 1
    assert after["shares_revoked"] == before["shares_revoked"] + 1


def test_figures_for_a_day_are_for_that_day_in_the_servers_time_zone(site):
    # A share made at 03:00 on 14 June in Vietnam (20:00 UTC on the 13th) was counted on
    # the 13th; and the studies archived ignored the days asked for.
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    server.set_share_time(made["id"], "created_at",
                          dt.datetime(2020, 6, 13, 20, 0, tzinfo=dt.UTC))

    on_the_14th = _figures(server, **{"from": "2020-06-14", "to": "2020-06-14"})
    on_the_13th = _figures(server, **{"from": "2020-06-13", "to": "2020-06-13"})

    assert on_the_14th["shares_created"] == 1 and on_the_14th["timezone"] == "+07:00"
    assert on_the_13th["shares_created"] == 0
    assert on_the_14th["studies_archived"] == 0  # archived today, not in 2020
    assert _figures(server, **{"from": dt.date.today().isoformat()})["studies_archived"] >= 2


# ---------------------------------------------------------------------------- opening


def _opens(server, share_id: int) -> tuple[int, int]:
    """(opened_count, "open" entries of the access log) of a share."""
    shown = httpx.get(f"{server.http}/api/shares/{share_id}", headers=STAFF).json()
    return shown["opened_count"], sum(a["action"] == "open" for a in shown["accesses"])


def test_a_pin_share_is_opened_by_its_pin_not_by_loading_or_previewing_its_page(site):
    # Every GET or HEAD of /s/TOKEN counted as an open, also on a PIN share whose PIN was
    # never entered (a chat app's link preview is a HEAD).
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, pin="generated")

    assert httpx.head(made["url"], headers=STRANGER).status_code == 200
    for _ in range(3):
        assert httpx.get(made["url"], headers=STRANGER).status_code == 200
    unopened = _opens(server, made["id"])
    _grant(server, made["token"], made["pin_value"])

    assert unopened == (0, 0)
    assert _opens(server, made["id"]) == (1, 1)


def test_a_page_reload_keeps_its_session_and_is_not_a_new_open(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    session_of = lambda page: json.loads(re.search(  # noqa: E731
        r'<script id="share-data" type="application/json">(.*?)</script>', page.text
    ).group(1))["session"]["access_token"]

    assert httpx.head(made["url"], headers=STRANGER).status_code == 200
    previewed = _opens(server, made["id"])
    with httpx.Client(headers=STRANGER) as phone:
        first = phone.get(made["url"])
        reloaded = phone.get(made["url"])
    with httpx.Client(headers=STRANGER) as other_phone:
        elsewhere = other_phone.get(made["url"])

    assert previewed == (0, 0)
    assert session_of(reloaded) == session_of(first)
    assert session_of(elsewhere) != session_of(first)
    assert _opens(server, made["id"]) == (2, 2)
    cookie = first.headers["set-cookie"]
    assert f"Path=/s/{made['token']}" in cookie and "HttpOnly" in cookie


# ---------------------------------------------------------------------------- PIN


def test_pin_guessing_is_slowed_then_locked_and_staff_can_unlock(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, pin="generated")
    pin = made["pin_value"]
    assert re.fullmatch(r"\d{6}", pin)
    wrong = "000000" if pin != "000000" else "111111"
    page = httpx.get(made["url"])
    assert page.status_code == 200 and "Nguyễn" not in page.text  # nothing before the PIN
    assert _session(server, made["token"]).status_code == 401
    first = _session(server, made["token"], wrong)
    assert first.status_code == 403 and first.json()["attempts_left"] == 2
    too_soon = _session(server, made["token"], pin)  # even the right PIN waits its turn
    assert too_soon.status_code == 429 and int(too_soon.headers["retry-after"]) >= 1
    time.sleep(first.json()["retry_after"] + 0.2)
    second = _session(server, made["token"], wrong)
    assert second.status_code == 403 and second.json()["attempts_left"] == 1
    time.sleep(second.json()["retry_after"] + 0.2)
    assert _session(server, made["token"], wrong).status_code == 423
    assert _session(server, made["token"], pin).status_code == 423  # locked: no more tries
    locked_page = httpx.get(made["url"])
    assert locked_page.status_code == 423 and "khoá" in locked_page.text
    unlocked = httpx.post(f"{server.http}/api/shares/{made['id']}/unlock", headers=STAFF)
    assert unlocked.json()["state"] == "active"
    assert _session(server, made["token"], pin).status_code == 200


def test_birth_year_pin(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, pin="birth-year")
    assert _session(server, made["token"], "1987").status_code == 200


# ---------------------------------------------------------------------------- isolation


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: values[m.group(1)], template)


def _route_templates(tmp_path) -> list[tuple[str, set[str]]]:
    """Every route the HTTP server has, with its methods, read from its own route table."""
    from emr.service import EmrService
    from pacs.access import AccessPolicy
    from pacs.http import build_app
    from storage.archive import open_archive
    from storage.shares import ShareStore

    class Server:  # just enough of pacs.app.PacsServer to build the route table
        settings = load_settings(environ={})
        archive = open_archive(f"sqlite:///{tmp_path}/routes.sqlite", f"file://{tmp_path}/b")
        shares = ShareStore(archive.index, b"k")
        access = AccessPolicy(settings, shares, b"k")
        emr = EmrService(archive, settings)  # not started: only its routes are wanted
        dicom = None

    routes: list[tuple[str, set[str]]] = []

    def walk(prefix: str, entries) -> None:
        for route in entries:
            if isinstance(route, Mount):
                if route.routes:
                    walk(prefix + route.path, route.routes)
                else:
                    routes.append((prefix + route.path + "/{path}", {"GET"}))
            else:
                routes.append((prefix + route.path, set(route.methods or {"GET"})))

    walk("", build_app(Server()).routes)
    Server.archive.close()
    return routes


_B_SCOPED = ("{study}", "{series}", "{instance}", "{uid}", "{number}", "{accession}", "{id}")


def test_a_share_of_study_a_never_returns_any_byte_of_study_b(site, tmp_path):
    server, study_a, study_b, b_uids = site
    made = _share(server, study_a.study_uid, allow_download=True)
    grant = _grant(server, made["token"])
    other = _share(server, study_b.study_uid)  # study B has shares too: ids must not leak
    b_values = {"study": study_b.study_uid, "series": study_b.series_uid, "instance": b_uids[0],
                "uid": study_b.study_uid, "number": "ACC-B", "accession": "ACC-B", "frames": "1",
                "spec": "7FE00010",
                "token": made["token"], "id": str(other["id"]), "kind": "png",
                "path": "index.html"}
    wado_b = {"requestType": "WADO", "studyUID": study_b.study_uid,
              "seriesUID": study_b.series_uid, "objectUID": b_uids[0], "format": "dicom"}
    secrets_of_b = [study_b.study_uid, study_b.series_uid, *b_uids, "bí mật", "ACC-B"]
    checked = 0
    for template, methods in _route_templates(tmp_path):
        url = server.http + _fill(template, b_values)
        b_scoped = any(k in template for k in _B_SCOPED) or template.endswith("/wado")
        for method in sorted(methods - {"HEAD"}):
            for headers, params in (({"Authorization": "Bearer " + grant}, wado_b),
                                    ({}, {**wado_b, "access_token": grant})):
                response = httpx.request(method, url, headers=headers, params=params,
                                         timeout=30)
                checked += 1
                body = response.content.decode("utf-8", errors="replace")
                leaked = [s for s in secrets_of_b if s in body]
                assert not leaked, f"{method} {template}: {leaked} in the answer"
                if b_scoped or method in ("POST", "DELETE", "PUT") and "/api/s/" not in url:
                    assert response.status_code in (401, 403, 404, 405), \
                        f"{method} {template}: {response.status_code}"
    assert checked > 60

    # Study A in the path with study B's series or instance below it finds nothing.
    mixed = {**b_values, "study": study_a.study_uid}
    for template, methods in _route_templates(tmp_path):
        if "{series}" in template and "GET" in methods:
            response = httpx.get(server.http + _fill(template, mixed),
                                 headers={"Authorization": "Bearer " + grant})
            assert response.status_code in (204, 404), template  # empty search or none
            # (A 404 may name the UIDs the request gave; nothing else of study B.)
            assert "bí mật" not in response.text and "ACC-B" not in response.text

    # Searches anywhere in the archive answer with study A only, whatever they ask.
    auth = {"Authorization": "Bearer " + grant}
    for path, params in [("/dicomweb/studies", {}), ("/dicomweb/studies", {"PatientID": "*"}),
                         ("/dicomweb/studies", {"StudyInstanceUID": study_b.study_uid}),
                         ("/dicomweb/series", {"0020000D": study_b.study_uid}),
                         ("/dicomweb/instances", {"limit": "1000"}),
                         ("/dicomweb/studies", {"PatientName": "nguyen*"})]:
        response = httpx.get(server.http + path, params=params, headers=auth)
        assert response.status_code in (200, 204), response.text
        found = {item["0020000D"]["Value"][0] for item in response.json()} \
            if response.status_code == 200 else set()
        assert found <= {study_a.study_uid}, (path, params)
        assert not any(s in response.text for s in secrets_of_b)
        if {"StudyInstanceUID", "0020000D"} & params.keys():  # B only: nothing matches both
            assert response.status_code == 204, (path, params)
    asked = {"StudyInstanceUID": f"{study_b.study_uid}\\{study_a.study_uid}"}
    both = httpx.get(server.http + "/dicomweb/studies", params=asked, headers=auth)
    assert [item["0020000D"]["Value"][0] for item in both.json()] == [study_a.study_uid]

    # The positive control: study A itself is all there.
    base = f"{server.http}/dicomweb/studies/{study_a.study_uid}"
    assert httpx.get(base + "/metadata", headers=auth).status_code == 200
    assert httpx.get(base + "/thumbnail", headers=auth).status_code == 200
    zipped = httpx.get(f"{server.http}/api/studies/{study_a.study_uid}/download",
                       params={"format": "jpeg", "access_token": grant}, timeout=60)
    assert zipped.status_code == 200 and zipped.content[:2] == b"PK"


def test_downloads_need_a_share_that_allows_them(site):
    server, study_a, _, _ = site
    grant = _grant(server, _share(server, study_a.study_uid)["token"])
    response = httpx.get(f"{server.http}/api/studies/{study_a.study_uid}/download",
                         params={"format": "dicom", "access_token": grant})
    assert response.status_code == 403 and "tải về" in response.json()["message"]


# ---------------------------------------------------------------------------- QR, slip, log


def test_qr_code_decodes_to_the_share_link(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    png = httpx.get(f"{server.http}/api/shares/{made['id']}/qr.png", headers=STAFF)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    decoded = zxingcpp.read_barcodes(Image.open(io.BytesIO(png.content)))
    assert [code.text for code in decoded] == [made["url"]]
    svg = httpx.get(f"{server.http}/api/shares/{made['id']}/qr.svg", headers=STAFF)
    assert ET.fromstring(svg.content).tag.endswith("svg")
    # Strangers cannot print other people's slips or codes.
    assert httpx.get(f"{server.http}/api/shares/{made['id']}/qr.png").status_code == 401


def test_result_slip_has_what_the_patient_needs(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid, pin="generated", days=30)
    slip = httpx.get(f"{server.http}/api/shares/{made['id']}/slip", headers=STAFF)
    assert slip.status_code == 200
    text = slip.text
    for expected in ("Bệnh viện Đa khoa Tỉnh", "Nguyễn Thị Hồng Nhung", made["url"],
                     made["pin_value"], "12/04/1987", "CT ngực không cản quang", "<svg",
                     "size: A5"):
        assert expected in text, expected


def test_result_slip_gives_the_moment_the_link_ends_and_only_imaging_modalities():
    # The slip promised "until the end of the day" of a share that ends at the time of day
    # it was made, and listed the film (DOC) and key-object (KO) documents as examinations.
    ends = dt.datetime(2027, 1, 5, 7, 30, tzinfo=dt.UTC)
    share = Share(id=1, study_instance_uid="1.2.3", token_sha256="", nonce="", pin_kind="",
                  pin_hash=None, pin_failures=0, pin_retry_at=None, locked_at=None,
                  allow_download=False, created_by="", created_at=ends, expires_at=ends,
                  revoked_at=None, opened_count=0, first_opened_at=None, last_opened_at=None)

    slip = slip_html("Bệnh viện", share, "https://anh.benhvien.vn/s/x", {
        "ModalitiesInStudy": "CT\\SR\\KO\\DOC\\PR"}, None)

    local = ends.astimezone()
    assert f"đến <b>{local:%H:%M} ngày {local:%d/%m/%Y}</b>" in slip
    assert "hết ngày" not in slip
    assert "<th>Loại chụp</th><td>CT</td>" in slip


def test_every_use_is_logged_and_names_stay_out_of_the_log(site):
    server, study_a, _, _ = site
    made = _share(server, study_a.study_uid)
    page = httpx.get(made["url"], headers={"X-Forwarded-For": "203.0.113.9"})
    first = re.search(r'rel="preload" as="image" href="([^"]+)"', page.text).group(1)
    httpx.get(server.http + first.replace("&amp;", "&"))
    shown = httpx.get(f"{server.http}/api/shares/{made['id']}", headers=STAFF).json()
    actions = {a["action"] for a in shown["accesses"]}
    assert {"open", "view"} <= actions
    opens = [a for a in shown["accesses"] if a["action"] == "open"]
    assert [a["address"] for a in opens] == ["203.0.113.9"]
    assert opens[0]["session"]  # the opening is the session it granted
    assert shown["opened_count"] == 1
    log = server.log()
    assert "Nguyễn" not in log and PATIENT_ID not in log


def test_cli_share_prints_a_working_link(site):
    server, study_a, _, _ = site
    result = subprocess.run([sys.executable, "-m", "pacs.cli", "share", study_a.study_uid,
                             "--days", "3", "--pin", "246810"], env=server.full_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    url = re.search(r"(http://\S+/s/[A-Za-z0-9_-]{22})", result.stdout).group(1)
    assert httpx.get(url).status_code == 200
    assert httpx.post(url.replace("/s/", "/api/s/") + "/session",
                      json={"pin": "246810"}).status_code == 200


def test_film_pdf_and_jpeg_2000_do_not_flood_the_log(site):
    # fontTools.subset logs ~25 lines at INFO for each film PDF (fpdf2 subsets the font),
    # openjpeg one per tile it encodes.
    server, study_a, _, _ = site
    pdf = httpx.get(f"{server.http}/api/studies/{study_a.study_uid}/film.pdf", headers=STAFF,
                    timeout=60)
    j2k = httpx.get(f"{server.http}/dicomweb/studies/{study_a.study_uid}", timeout=60, headers={
        **STAFF, "Accept": 'multipart/related; type="application/dicom"; '
                           "transfer-syntax=1.2.840.10008.1.2.4.90"})

    assert pdf.status_code == 200 and pdf.content[:5] == b"%PDF-"
    assert j2k.status_code == 200 and b"transfer-syntax=1.2.840.10008.1.2.4.90" in j2k.content
    log = server.log()
    assert " fontTools" not in log and " openjpeg" not in log
