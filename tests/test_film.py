"""Digital film: which images go on it, how the sheets look (PNG and PDF), and how it is archived.

A synthetic CT series (64x64 slices, axial, window 40/400, a disc that grows from slice to slice)
in a SQLite + files archive; Key Object Selection documents built with pydicom.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pypdf
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from storage.archive import Archive, StoreOutcome, open_archive
from storage.attributes import Level
from storage.errors import NotFound
from storage.query import Query, find
from tests.factory import Spec, dataset, key_object_selection, part10
from viewer import film
from viewer.film import (
    ENCAPSULATED_PDF_STORAGE,
    FILM_HEIGHT_MM,
    FILM_WIDTH_MM,
    FilmError,
    FilmRequest,
    NoImagesToFilm,
    choose_images,
    evenly_spaced,
    film_series_uid,
    orientation_letters,
    render_film_pdf,
    render_film_png,
    render_film_sheet_png,
    store_film,
)
from viewer.film_canvas import PngCanvas
from viewer.keyimages import KeyImage, key_images

SITE = "Bệnh viện Đa khoa Tỉnh Quảng Ngãi"
SMALL = {"dpi": 50}  # sheets of 689x847 pixels: enough to check the layout, quick to encode


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    archive = open_archive(f"sqlite:///{tmp_path}/i.sqlite", f"file://{tmp_path}/blobs")
    yield archive
    archive.close()


def store_ct_series(archive: Archive, study: Spec, slices: int = 30, *, series_number: int = 1,
                    description: str = "Bụng 5mm", frames: int = 1) -> list[Dataset]:
    """Store an axial CT series of ``slices`` instances; the stored data sets, in order."""
    series_uid = Spec().series_uid
    yy, xx = np.mgrid[0:64, 0:64]
    stored = []
    for n in range(slices):
        ds = dataset(Spec(**{**study.__dict__, "series_uid": series_uid, "sop_uid": Spec().sop_uid,
                             "series_number": series_number, "series_description": description,
                             "instance_number": n + 1, "rows": 64, "columns": 64,
                             "frames": frames}))
        disc = (yy - 32) ** 2 + (xx - 32) ** 2 < (2 + n) ** 2  # every slice looks different
        ds.PixelData = np.tile(np.where(disc, 1024 + 60, 24).astype(np.uint16),
                               (frames, 1)).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-32, -32, -5.0 * n]
        archive.store(part10(ds))
        stored.append(ds)
    return stored


def numbers(images) -> list[int]:
    return [image.instance_number for image in images]


# ---------------------------------------------------------------------------- choosing


def test_film_takes_evenly_spaced_slices_from_each_series_in_series_order(archive):
    study = Spec()
    store_ct_series(archive, study, 30, series_number=2, description="Bụng 5mm")
    store_ct_series(archive, study, 4, series_number=1, description="Định vị")

    chosen = choose_images(archive.index, study.study_uid, per_series=6)

    assert [(image.series_number, image.instance_number) for image in chosen[:4]] == [
        (1, 1), (1, 2), (1, 3), (1, 4)]  # a short series goes on whole
    ct = numbers(chosen[4:])
    assert len(ct) == 6
    assert ct[0] == 1 and ct[-1] == 30
    gaps = [b - a for a, b in zip(ct, ct[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 1, ct


def test_evenly_spaced_indices():
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(5, 20) == [0, 1, 2, 3, 4]
    assert evenly_spaced(9, 1) == [4]


def test_frames_of_a_multiframe_instance_count_as_slices(archive):
    study = Spec()
    store_ct_series(archive, study, 1, frames=10)

    chosen = choose_images(archive.index, study.study_uid, per_series=4)

    assert [image.frame for image in chosen] == [1, 4, 7, 10]


def test_key_object_selection_makes_exactly_its_images_the_film(archive):
    study = Spec()
    slices = store_ct_series(archive, study, 30)
    marked = [slices[24], slices[2], slices[13]]  # the radiologist's order
    elsewhere = dataset(Spec(patient_id="BN0002"))  # an image of another study
    archive.store(key_object_selection(
        study, content=marked, evidence=sorted(marked, key=lambda d: d.InstanceNumber)
        + [elsewhere, slices[2]]))

    keys = key_images(archive.index, study.study_uid)
    chosen = choose_images(archive.index, study.study_uid, per_series=20)

    assert keys == [KeyImage(d.SeriesInstanceUID, d.SOPInstanceUID, None) for d in marked]
    assert numbers(chosen) == [25, 3, 14]


def test_key_frames_of_a_multiframe_image_are_its_tiles(archive):
    study = Spec()
    (cine,) = store_ct_series(archive, study, 1, frames=10)
    archive.store(key_object_selection(study, [cine], [cine], frames=[7, 3, 12]))

    chosen = choose_images(archive.index, study.study_uid)

    assert [image.frame for image in chosen] == [7, 3]  # frame 12 does not exist


def test_a_study_without_key_object_selection_has_no_key_images(archive):
    study = Spec()
    store_ct_series(archive, study, 3)

    assert key_images(archive.index, study.study_uid) == []


def test_a_study_without_images_is_a_clear_error(archive):
    study = Spec()
    archive.store(key_object_selection(study, content=[], evidence=[]))  # no pixel data

    with pytest.raises(NoImagesToFilm, match="no images") as raised:
        render_film_pdf(archive, study.study_uid, FilmRequest(**SMALL))
    assert isinstance(raised.value, ValueError)
    assert study.study_uid in str(raised.value)
    with pytest.raises(NotFound):
        render_film_png(archive, Spec().study_uid)


# ---------------------------------------------------------------------------- sheets


def test_pdf_has_one_image_per_tile_on_each_page(archive):
    study = Spec()
    store_ct_series(archive, study, 30)

    pdf = render_film_pdf(archive, study.study_uid,
                          FilmRequest(columns=4, rows=5, per_series=30, **SMALL))

    pages = pypdf.PdfReader(io.BytesIO(pdf)).pages
    assert [len(page.images) for page in pages] == [20, 10]
    width, height = (float(side) * 25.4 / 72 for side in pages[0].mediabox[2:])
    assert (round(width), round(height)) == (FILM_WIDTH_MM, FILM_HEIGHT_MM)


def test_pdf_text_shows_the_patient_in_vietnamese(archive):
    study = Spec(patient_name="Nguyễn^Văn An", patient_id="BN0042")
    store_ct_series(archive, study, 5)

    pdf = render_film_pdf(archive, study.study_uid, FilmRequest(site_name=SITE, **SMALL))

    text = pypdf.PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    for expected in ("Nguyễn Văn An", "BN0042", SITE, "01/01/1980", "15/03/2024",
                     "CT bụng có cản quang", "ACC0001", "1/1", "Im 5", "C 40  W 400"):
        assert expected in text


def test_the_window_asked_for_is_used_and_shown(archive):
    study = Spec()
    store_ct_series(archive, study, 2)

    pdf = render_film_pdf(archive, study.study_uid, FilmRequest(window=(-600, 1500), **SMALL))

    assert "C -600  W 1500" in pypdf.PdfReader(io.BytesIO(pdf)).pages[0].extract_text()


def test_png_sheets_follow_the_layout(archive):
    study = Spec()
    store_ct_series(archive, study, 30)
    request = FilmRequest(columns=3, rows=2, per_series=8, **SMALL)

    sheets = render_film_png(archive, study.study_uid, request)

    assert len(sheets) == 2  # 8 images, 6 tiles a sheet
    for png in sheets:
        with Image.open(io.BytesIO(png)) as sheet:
            assert sheet.format == "PNG"
            assert sheet.size == request.sheet_pixels
            assert sheet.width / sheet.height == pytest.approx(35 / 43, abs=0.01)
            assert sheet.getpixel((sheet.width - 2, sheet.height - 2)) == (0, 0, 0)
    with Image.open(io.BytesIO(sheets[1])) as second:
        grey = np.asarray(second.convert("L"))
    height, width = grey.shape
    body = grey[height // 8:]  # below the header
    assert body[:, : width // 3].max() > 100 and body[:, width // 3: 2 * width // 3].max() > 100
    assert body[:, 2 * width // 3 + 2:].max() < 100  # tile 9 of the sheet is left empty
    assert grey[3 * height // 5:].max() < 100  # and so is the second row


def test_one_png_sheet_is_drawn_alone_and_is_that_sheet_of_the_film(archive, monkeypatch):
    # film.png?sheet=N drew every sheet of the film, and held them all, to return one (a
    # 1x1 film of a 600-slice study: 349 s of CPU and +680 MB for one 1.8 MB PNG).
    study = Spec()
    store_ct_series(archive, study, 12)
    request = FilmRequest(columns=2, rows=2, per_series=12, **SMALL)
    whole = render_film_png(archive, study.study_uid, request)
    drawn = []
    real_new_sheet = PngCanvas.new_sheet
    monkeypatch.setattr(PngCanvas, "new_sheet",
                        lambda canvas: drawn.append(1) or real_new_sheet(canvas))

    second = render_film_sheet_png(archive, study.study_uid, request, 2)

    assert len(whole) == 3 and len(drawn) == 1
    assert second == whole[1]
    with pytest.raises(FilmError, match="^sheet: 4 is not between 1 and 3"):
        render_film_sheet_png(archive, study.study_uid, request, 4)


def test_a_film_larger_than_its_bounds_is_refused_naming_the_parameters(archive, monkeypatch):
    study = Spec()
    store_ct_series(archive, study, 12)
    monkeypatch.setattr(film, "MAX_SHEETS", 5)

    with pytest.raises(FilmError) as raised:
        render_film_pdf(archive, study.study_uid, FilmRequest(columns=1, rows=2, per_series=12,
                                                              **SMALL))

    assert str(raised.value).startswith("layout, per_series: this film would have 12 images "
                                        "on 6 sheets")
    # A larger layout of the same images fits.
    render_film_pdf(archive, study.study_uid, FilmRequest(columns=2, rows=2, per_series=12,
                                                          **SMALL))
    with pytest.raises(FilmError, match="^per_series: 101"):
        FilmRequest(per_series=101)


@pytest.mark.parametrize("window", [(float("nan"), 400.0), (40.0, float("nan")),
                                    (40.0, float("inf")), (float("-inf"), 400.0),
                                    (1e308, 1e308), (40.0, 0.0)])
def test_a_window_that_is_not_finite_and_positive_is_refused(window):
    # NaN passed every comparison: window=nan,nan made blank films, and one was stored.
    with pytest.raises(FilmError, match="^window: "):
        FilmRequest(window=window)


def test_orientation_letters_name_the_patient_directions_at_each_edge():
    def letters(cosines):
        return orientation_letters({"00200037": {"vr": "DS", "Value": cosines}})

    assert letters([1, 0, 0, 0, 1, 0]) == ("A", "P", "R", "L")  # axial
    assert letters([1, 0, 0, 0, 0, -1]) == ("H", "F", "R", "L")  # coronal
    assert letters([0, 1, 0, 0, 0, -1]) == ("H", "F", "A", "P")  # sagittal
    assert letters([0.866, 0.5, 0, 0, 0, -1])[3] == "LP"  # oblique: larger component first
    assert orientation_letters({}) is None


# ---------------------------------------------------------------------------- archiving


def test_a_stored_film_is_an_encapsulated_pdf_of_the_study(archive):
    study = Spec()
    store_ct_series(archive, study, 6)
    pdf = render_film_pdf(archive, study.study_uid, FilmRequest(site_name=SITE, **SMALL))

    other = render_film_pdf(archive, study.study_uid,
                            FilmRequest(site_name=SITE, window=(400, 1800), **SMALL))

    shown = choose_images(archive.index, study.study_uid)
    first = store_film(archive, study.study_uid, pdf, site_name=SITE, sources=shown)
    second = store_film(archive, study.study_uid, other, site_name=SITE)

    assert first.sop_class_uid == ENCAPSULATED_PDF_STORAGE
    assert first.study_instance_uid == study.study_uid
    assert first.series_instance_uid == second.series_instance_uid \
        == film_series_uid(study.study_uid)
    assert first.sop_instance_uid != second.sop_instance_uid
    rows = find(archive.index, Query(Level.INSTANCE, {"StudyInstanceUID": study.study_uid,
                                                      "SOPClassUID": ENCAPSULATED_PDF_STORAGE}))
    assert sorted(r["SOPInstanceUID"] for r in rows) == sorted(
        [first.sop_instance_uid, second.sop_instance_uid])
    assert {r["Modality"] for r in rows} == {"DOC"}
    assert {r["PatientName"] for r in rows} == {"Nguyễn^Văn An"}
    stored = pydicom.dcmread(io.BytesIO(archive.blobs.get(rows[0]["_blob_key"])))
    assert stored.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert stored.EncapsulatedDocument[: stored.EncapsulatedDocumentLength] == pdf
    assert stored.DocumentTitle == "Phim số / Digital film"
    assert stored.SpecificCharacterSet == "ISO_IR 192"
    assert stored.AccessionNumber == study.accession
    first_stored = pydicom.dcmread(io.BytesIO(archive.blobs.get(next(
        r["_blob_key"] for r in rows if r["SOPInstanceUID"] == first.sop_instance_uid))))
    sources = first_stored.SourceInstanceSequence  # the film says which images it shows
    assert [s.ReferencedSOPInstanceUID for s in sources] == [i.sop_instance_uid for i in shown]
    assert {s.ReferencedSOPClassUID for s in sources} == {CTImageStorage}
    assert sorted(r["InstanceNumber"] for r in rows) == [1, 2]
    # The films are not images: a new film of the study shows the same CT slices.
    assert numbers(choose_images(archive.index, study.study_uid)) == [1, 2, 3, 4, 5, 6]


def test_storing_the_same_film_again_keeps_one_instance(archive):
    # A second click on "store the film" (or a retry) archived a second, identical PDF that
    # every viewer then listed twice.
    study = Spec()
    store_ct_series(archive, study, 4)
    first_pdf = render_film_pdf(archive, study.study_uid, FilmRequest(**SMALL))
    time.sleep(1.1)  # the PDF's creation date, to the second, differs
    again_pdf = render_film_pdf(archive, study.study_uid, FilmRequest(**SMALL))

    first = store_film(archive, study.study_uid, first_pdf)
    again = store_film(archive, study.study_uid, again_pdf)

    assert again.sop_instance_uid == first.sop_instance_uid
    assert again.outcome is StoreOutcome.DUPLICATE_KEPT
    films = find(archive.index, Query(Level.INSTANCE, {
        "StudyInstanceUID": study.study_uid, "SOPClassUID": ENCAPSULATED_PDF_STORAGE}))
    assert [(r["SOPInstanceUID"], r["InstanceNumber"]) for r in films] == [
        (first.sop_instance_uid, 1)]


def test_films_stored_at_once_get_distinct_instance_numbers(archive):
    study = Spec()
    store_ct_series(archive, study, 3)
    pdfs = [render_film_pdf(archive, study.study_uid,
                            FilmRequest(window=(40, 100 + 100 * n), **SMALL)) for n in range(4)]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda pdf: store_film(archive, study.study_uid, pdf), pdfs))

    films = find(archive.index, Query(Level.INSTANCE, {
        "StudyInstanceUID": study.study_uid, "SOPClassUID": ENCAPSULATED_PDF_STORAGE}))
    assert sorted(r["InstanceNumber"] for r in films) == [1, 2, 3, 4]
