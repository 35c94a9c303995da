"""The doctors' viewer: OHIF served at /ohif/, the start page and the EMR launch links.

Browser tests drive Debian's headless Chromium with Playwright against a server on loopback
holding a small CT series with a Vietnamese name. Screenshots go to test-output/viewer/.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from pacs.settings import Settings
from tests.conftest import CANVAS_PIXELS, PacsProcess, stow
from tests.factory import Spec, ct_series, dataset, part10
from viewer.ohif import OhifInstallError, installed_version, rewrite_for_base

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "viewer"
SLICES = 24
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if installed_version(Settings().resolved_ohif_dir) is None:
        pytest.fail("the OHIF Viewer is not installed: run scripts/setup.sh (pacs install-ohif)")
    server = PacsProcess(tmp_path_factory.mktemp("viewer") / "data",
                         env={"PACS_SITE_NAME": "Bệnh viện Đa khoa Tỉnh"})
    server.start()
    spec = Spec(patient_name="Nguyễn^Văn An", patient_id="CCCD001203004567",
                accession="ACC-VIEW-1", study_description="CT bụng")
    assert stow(server.http, ct_series(spec, SLICES)).status_code == 200
    other = Spec(patient_name="Trần^Thị Bình", patient_id="BN-OTHER", accession="ACC-VIEW-2",
                 extra={"IssuerOfPatientID": "BV-X"})
    assert stow(server.http, [part10(dataset(other))]).status_code == 200
    yield server, spec
    server.stop()


@pytest.fixture
def page(browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


def _wait_for_image(page, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pixels = page.evaluate(CANVAS_PIXELS)
        if pixels and pixels[0] > 500:
            return pixels
        time.sleep(0.1)
    page.screenshot(path=str(SHOTS / "no-image.png"))
    raise AssertionError("the viewer showed no image")


# ---------------------------------------------------------------------------- browser


def test_study_list_shows_vietnamese_name_and_finds_it_without_diacritics(site, page):
    server, _ = site
    page.goto(server.http + "/ohif/")
    page.wait_for_selector("text=Nguyễn, Văn An", timeout=60_000)
    assert page.locator("text=Trần, Thị Bình").count() == 1
    page.screenshot(path=str(SHOTS / "study-list.png"))
    patient_filter = page.locator("input").first
    patient_filter.fill("nguyen van")
    # The list reloads from QIDO-RS (fuzzy matching): only the study of Nguyễn Văn An is left.
    page.wait_for_function("() => document.body.innerText.includes('Nguyễn, Văn An') && "
                           "!document.body.innerText.includes('Trần, Thị Bình')",
                           timeout=30_000)
    page.screenshot(path=str(SHOTS / "study-list-search.png"))


def test_iid_link_opens_the_study_renders_an_image_and_scrolls(site, page):
    server, spec = site
    page.goto(f"{server.http}/IHEInvokeImageDisplay?requestType=STUDY&studyUID={spec.study_uid}")
    assert "/ohif/viewer" in page.url and spec.study_uid in page.url
    first = _wait_for_image(page)
    page.screenshot(path=str(SHOTS / "viewer.png"))
    viewport = page.locator("canvas").first.bounding_box()
    page.mouse.move(viewport["x"] + viewport["width"] / 2, viewport["y"] + viewport["height"] / 2)
    for _ in range(8):
        page.mouse.wheel(0, 120)
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while page.evaluate(CANVAS_PIXELS) == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.evaluate(CANVAS_PIXELS) != first, "scrolling did not change the slice"
    page.screenshot(path=str(SHOTS / "viewer-scrolled.png"))


def test_short_links_open_the_same_study(site, page):
    server, spec = site
    for link in (f"/studies/{spec.study_uid}", f"/accession/{spec.accession}"):
        page.goto(server.http + link)
        assert spec.study_uid in page.url, link
    _wait_for_image(page)


# ---------------------------------------------------------------------------- HTTP


def test_launch_links_for_unknown_studies_get_a_clear_page(site):
    server, spec = site
    for link in ("/IHEInvokeImageDisplay?requestType=STUDY&studyUID=1.2.3.4",
                 "/IHEInvokeImageDisplay?requestType=STUDY&accessionNumber=NOPE",
                 "/studies/1.2.3.4", "/accession/NOPE"):
        response = httpx.get(server.http + link)
        assert response.status_code == 404, link
        assert "Không tìm thấy" in response.text and "not found" in response.text.lower()
    bad = httpx.get(server.http + "/IHEInvokeImageDisplay?requestType=SERIES")
    assert bad.status_code == 400
    patient = httpx.get(server.http + "/IHEInvokeImageDisplay?requestType=PATIENT&patientID="
                        + spec.patient_id)
    assert patient.status_code == 302
    assert patient.headers["location"] == f"/ohif/?mrn={spec.patient_id}"


def test_an_accession_number_holding_a_slash_has_its_link(site):
    server, _ = site
    spec = Spec(patient_id="BN-SLASH", accession="CT/2026/7")
    assert stow(server.http, [part10(dataset(spec))]).status_code == 200

    for path in ("/accession/CT/2026/7", "/accession/CT%2F2026%2F7"):
        response = httpx.get(server.http + path)
        assert response.status_code in (302, 303, 307), (path, response.text[:200])
        assert spec.study_uid in response.headers["location"]


def test_iid_patient_id_in_hl7_cx_form_is_matched_with_its_issuer(site):
    # IHE IID sends patientID as an HL7 CX value; it was matched literally, and found nothing.
    server, spec = site
    for cx, expected in ((f"{spec.patient_id}^^^BVDKT", spec.patient_id),  # no issuer stored
                         (f"{spec.patient_id}^^^&1.2.840.9.1&ISO", spec.patient_id),
                         ("BN-OTHER^^^BV-X", "BN-OTHER"), ("BN-OTHER^^^BV-Y", None)):
        response = httpx.get(server.http + "/IHEInvokeImageDisplay",
                             params={"requestType": "PATIENT", "patientID": cx})
        if expected is None:
            assert response.status_code == 404, cx
        else:
            assert response.status_code == 302, (cx, response.text[:200])
            assert response.headers["location"] == f"/ohif/?mrn={expected}"


def test_ohif_is_served_under_ohif_with_caching_and_compression(site):
    server, _ = site
    index = httpx.get(server.http + "/ohif/viewer?StudyInstanceUIDs=1.2.3")  # a viewer route
    assert index.status_code == 200 and 'window.PUBLIC_URL="/ohif/"' in index.text
    assert not re.search(r'(?:src|href)="/(?!ohif/)', index.text)
    bundle = re.search(r'src="/ohif/(app\.bundle\.[0-9a-f]+\.js)"', index.text).group(1)
    js = httpx.get(f"{server.http}/ohif/{bundle}", headers={"Accept-Encoding": "gzip"})
    assert js.headers["content-encoding"] == "gzip"
    assert "immutable" in js.headers["cache-control"]
    wasm = next(p.name for p in Settings().resolved_ohif_dir.glob("*.wasm"))
    assert httpx.get(f"{server.http}/ohif/{wasm}").headers["content-type"] == "application/wasm"
    config = httpx.get(server.http + "/ohif/app-config.js").text
    assert "routerBasename" in config and '"/ohif"' in config
    assert '"supportsFuzzyMatching": true' in config and '"Bệnh viện Đa khoa Tỉnh"' in config
    assert httpx.get(server.http + "/ohif/missing.js").status_code == 404
    start = httpx.get(server.http + "/")
    assert "Bệnh viện Đa khoa Tỉnh" in start.text and 'href="/ohif/"' in start.text


def test_installer_fails_loudly_when_the_build_changes(tmp_path):
    (tmp_path / "index.html").write_text('<script src="/app.js"></script>')  # no PUBLIC_URL
    with pytest.raises(OhifInstallError, match="PUBLIC_URL"):
        rewrite_for_base(tmp_path)


def test_rendered_thumbnail_is_what_the_study_browser_shows(site):
    server, spec = site
    series = httpx.get(f"{server.http}/dicomweb/studies/{spec.study_uid}/series").json()
    uid = series[0]["0020000E"]["Value"][0]
    thumb = httpx.get(f"{server.http}/dicomweb/studies/{spec.study_uid}/series/{uid}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"


def test_mpr_works_without_the_left_out_parts(site, page):
    # ort/ (AI segmentation) and the microscopy viewer are not installed; MPR must still work.
    server, spec = site
    page.goto(f"{server.http}/ohif/viewer?StudyInstanceUIDs={spec.study_uid}"
              "&hangingprotocolId=mpr")
    script = """() => [...document.querySelectorAll('canvas')].filter(c => c.width > 100)
      .map(c => { const t = document.createElement('canvas'); t.width = c.width;
        t.height = c.height; const x = t.getContext('2d'); x.drawImage(c, 0, 0);
        const d = x.getImageData(0, 0, t.width, t.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 16) if (d[i] > 10) n++; return n; })"""
    deadline = time.monotonic() + 60
    counts: list[int] = []
    while time.monotonic() < deadline:
        counts = page.evaluate(script)
        if len(counts) >= 3 and all(n > 100 for n in counts[:3]):
            break
        time.sleep(0.2)
    page.screenshot(path=str(SHOTS / "mpr.png"))
    assert len(counts) >= 3 and all(n > 100 for n in counts[:3]), counts
