"""The patient's digital film page on a phone: headless Chromium at 390x844 opens a share
link, sees the first image, swipes to another slice, switches a window preset, and a doctor
opens the full viewer from it. The browser is a stranger to the server (not on its staff
network), as a patient's phone is. Screenshots go to test-output/patient/.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from pacs.settings import Settings
from storage.archive import open_archive
from tests.conftest import CANVAS_PIXELS, PacsProcess, stow
from tests.factory import Spec, ct_series, dataset, instance, key_object_selection
from viewer.ohif import installed_version
from viewer.patient import first_image_url, study_summary

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "patient"
STAFF = {"X-Forwarded-For": "10.99.0.5"}
SLICES = 30
# Non-black pixels of the page's image and a hash of them, read through a canvas.
IMAGE_PIXELS = """() => {
  const i = document.getElementById('image');
  if (!i || !i.complete || !i.naturalWidth) return null;
  const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
  const x = c.getContext('2d'); x.drawImage(i, 0, 0);
  const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0, h = 0;
  for (let k = 0; k < d.length; k += 16) { if (d[k] > 10) n++; h = (h * 31 + d[k]) | 0; }
  return [n, h, i.dataset.index, i.getAttribute('src')];
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    server = PacsProcess(tmp_path_factory.mktemp("patient") / "data", env={
        "PACS_STAFF_NETWORKS": "10.99.0.0/16", "PACS_SITE_NAME": "Bệnh viện Đa khoa Tỉnh"})
    server.start()
    spec = Spec(patient_name="Lê^Thị Hồng Nhung", patient_id="BN-PHONE",
                study_description="CT ngực liều thấp")
    stored = stow(server.http, ct_series(spec, SLICES, size=256), STAFF)
    assert stored.status_code == 200, stored.text
    yield server, spec
    server.stop()


def _share(server, spec, **body) -> dict:
    response = httpx.post(server.http + "/api/shares", headers=STAFF,
                          json={"study_instance_uid": spec.study_uid, **body})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def phone(browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 390, "height": 844},
                                  device_scale_factor=3, is_mobile=True, has_touch=True,
                                  locale="vi-VN")
    yield context.new_page()
    context.close()


def _image(page, *, unlike: list | None = None, timeout: float = 30) -> list:
    """The shown image's pixels once it is loaded, not blank and (if given) not ``unlike``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pixels = page.evaluate(IMAGE_PIXELS)
        if pixels and pixels[0] > 100 and (unlike is None or pixels[:2] != unlike[:2]):
            return pixels
        time.sleep(0.05)
    page.screenshot(path=str(SHOTS / "failed.png"))
    raise AssertionError(f"no (new) image on the page: {page.evaluate(IMAGE_PIXELS)}")


def test_phone_opens_the_link_swipes_and_switches_presets(site, phone):
    server, spec = site
    made = _share(server, spec)
    started = time.monotonic()
    phone.goto(made["url"])
    first = _image(phone)
    first_image_seconds = time.monotonic() - started
    assert phone.locator("header h1").inner_text() == "Lê Thị Hồng Nhung"
    assert "CT ngực liều thấp" in phone.locator("header").inner_text()
    phone.screenshot(path=str(SHOTS / "phone-first-image.png"))

    stage = phone.locator("#stage").bounding_box()
    y = stage["y"] + stage["height"] / 2
    phone.mouse.move(stage["x"] + stage["width"] * 0.8, y)
    phone.mouse.down()
    for step in range(1, 11):  # a swipe to the left: forward through the slices
        phone.mouse.move(stage["x"] + stage["width"] * (0.8 - 0.05 * step), y)
    phone.mouse.up()
    swiped = _image(phone, unlike=first)
    assert int(swiped[2]) > int(first[2]), "swiping left did not move forward"
    assert phone.locator("#stage .top span").nth(1).inner_text() == \
        f"{int(swiped[2]) + 1}/{SLICES}"
    phone.screenshot(path=str(SHOTS / "phone-swiped.png"))

    phone.get_by_role("button", name="Phổi").click()
    lung = _image(phone, unlike=swiped)
    assert "window=-600,1500" in lung[3] and lung[2] == swiped[2]
    phone.screenshot(path=str(SHOTS / "phone-lung-window.png"))

    phone.locator("#stage").evaluate("() => 0")  # the page still answers
    slider = phone.locator("input[type=range]")
    slider.fill("0")
    assert _image(phone, unlike=lung)[2] == "0"
    (SHOTS / "timings.txt").write_text(f"first image {first_image_seconds:.2f} s\n")


def test_pin_is_asked_before_anything_is_shown(site, phone):
    server, spec = site
    made = _share(server, spec, pin="birth-year")  # Spec's birth date: 1980
    phone.goto(made["url"])
    phone.wait_for_selector("input[type=password]")
    assert "Lê" not in phone.content()
    phone.fill("input[type=password]", "1999")
    phone.get_by_role("button", name="Xem ảnh").click()
    phone.wait_for_selector("text=Mã PIN không đúng")
    phone.screenshot(path=str(SHOTS / "phone-wrong-pin.png"))
    time.sleep(2.2)  # the wait after a first miss
    phone.fill("input[type=password]", "1980")
    phone.get_by_role("button", name="Xem ảnh").click()
    _image(phone)
    assert phone.locator("header h1").inner_text() == "Lê Thị Hồng Nhung"


def test_doctor_opens_the_full_viewer_limited_to_the_study(site, browser):
    if installed_version(Settings().resolved_ohif_dir) is None:
        pytest.fail("the OHIF Viewer is not installed: run scripts/setup.sh (pacs install-ohif)")
    server, spec = site
    made = _share(server, spec)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    try:
        page.goto(made["url"])
        _image(page)
        with context.expect_page() as opened:
            page.get_by_text("Trình xem chuyên sâu").click()
        viewer = opened.value
        deadline = time.monotonic() + 60
        pixels = None
        while time.monotonic() < deadline:
            pixels = viewer.evaluate(CANVAS_PIXELS)
            if pixels and pixels[0] > 500:
                break
            time.sleep(0.2)
        viewer.screenshot(path=str(SHOTS / "doctor-viewer.png"))
        assert pixels and pixels[0] > 500, "OHIF showed no image with the share's session"
        assert "token=" not in viewer.url  # OHIF took the session out of the address bar
    finally:
        context.close()


def test_page_data_puts_key_images_first_and_series_in_order(tmp_path):
    archive = open_archive(f"sqlite:///{tmp_path}/i.sqlite", f"file://{tmp_path}/blobs")
    study = Spec(patient_name="Đặng^Văn Minh", birth_date="19520709", sex="M")
    second = Spec(**{**study.__dict__, "series_uid": Spec().series_uid, "series_number": 2,
                     "series_description": "Phổi 1mm"})
    for spec in (second, study):  # stored out of order
        for n in (3, 1, 2):
            archive.store(instance(Spec(**{**spec.__dict__, "sop_uid": Spec().sop_uid,
                                          "instance_number": n})))
    marked = dataset(Spec(**{**second.__dict__, "sop_uid": Spec().sop_uid,
                             "instance_number": 7}))
    archive.store(instance(Spec(**{**second.__dict__, "sop_uid": marked.SOPInstanceUID,
                                   "instance_number": 7})))
    archive.store(key_object_selection(study, content=[marked], evidence=[marked]))

    summary = study_summary(archive.index, study.study_uid)
    archive.close()

    assert summary["patient_name"] == "Đặng Văn Minh"
    assert summary["patient_birth_date"] == "09/07/1952" and summary["patient_sex"] == "Nam"
    assert [s["number"] for s in summary["series"]] == [1, 2]  # the KOS is not a series here
    assert [len(s["images"]) for s in summary["series"]] == [3, 4]
    assert summary["series"][0]["presets"][2] == ["Phổi", (-600, 1500)]
    assert summary["key_images"] == [[second.series_uid, marked.SOPInstanceUID, 1]]
    session = {"study": summary, "access_token": "T"}
    assert marked.SOPInstanceUID in first_image_url(session)  # the page opens on it
