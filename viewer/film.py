"""Digital film: a study's images laid out as film sheets (PNG or PDF) and archived as a PDF.

Which images: the study's key images (``viewer.keyimages``) when it has any; otherwise, for each
image series in series-number order, ``per_series`` evenly spaced slices (frames count as
slices). The sheet is a 35 x 43 cm film, portrait, black, with a header naming the site, the
patient and the study, and ``columns x rows`` tiles, each labelled with its series, image number,
window and orientation letters.

The same drawing code feeds two canvases: Pillow (one PNG per sheet, ``dpi`` pixels per inch)
and fpdf2 (one PDF page per sheet, 350 x 430 mm, each tile its own JPEG image, text as text).
Tiles are rendered at their size on the sheet, a sheet at a time, by ``export.render_frames``:
each instance is read once for all its tiles on the sheet (frames of a multi-frame one), and
decoded a frame at a time in the server's decode slots, so a film never holds more than one
instance's bytes. A PNG is one sheet: only that sheet is drawn. Text is set in DejaVu Sans
(Debian ``fonts-dejavu-core``), which has every Vietnamese glyph.

``store_film`` archives a PDF as an Encapsulated PDF instance of the study, in a series of its
own whose UID follows from the study UID, so every film of a study lands in one series. The
instance's UID follows from the study and the PDF's content, so storing the same film twice
keeps one instance.

A film request is bounded (``MAX_PER_SERIES``, ``MAX_SHEETS``, ``MAX_IMAGES``, 12 x 12 tiles):
its work grows with the sheets and tiles it asks for, and anyone holding a share may ask.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import re
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomweb.render import CannotRender, RenderOptions
from dicomweb.render import check_window as render_check_window
from pacs import __version__
from storage.archive import Archive, StoreOutcome, StoreResult
from storage.attributes import Level
from storage.errors import NotFound
from storage.index import Index
from storage.names import display_date, display_person_name
from storage.query import Query, find
from viewer.export import render_frames
from viewer.film_canvas import (
    FILM_HEIGHT_MM,
    FILM_WIDTH_MM,
    Canvas,
    PdfCanvas,
    PngCanvas,
    px,
)
from viewer.keyimages import key_images

log = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
FILM_TITLE = "Phim số / Digital film"
FILM_SERIES_NUMBER = 9900
# Bounds of one film: images per series, sheets, images in all (a 1x1 layout of a 600-slice
# study was 600 sheets; the PDF takes them all). A default film (4x5, 20 per series) of a
# study with 40 image series still fits.
MAX_PER_SERIES = 100
MAX_SHEETS = 40
MAX_IMAGES = 800

_MARGIN, _HEADER, _GAP = 8.0, 34.0, 1.5  # mm


class FilmError(ValueError):
    """A film cannot be made from what was asked (the message says why)."""


class NoImagesToFilm(FilmError):
    """The study has nothing to put on a film: no instance with pixels."""


@dataclass(frozen=True)
class FilmRequest:
    """How to lay a film out. Defaults match ``Settings.film_layout`` and friends."""

    site_name: str = "PACS"
    columns: int = 4
    rows: int = 5
    per_series: int = 20  # slices per series when the study has no key images
    window: tuple[float, float] | None = None  # (center, width) for every tile; None: the file's
    dpi: int = 150  # PNG sheet resolution, and the resolution of the tiles embedded in the PDF

    def __post_init__(self) -> None:
        if not (1 <= self.columns <= 12 and 1 <= self.rows <= 12):
            raise FilmError(f"layout: {self.columns}x{self.rows}: columns and rows must be "
                            "1 to 12")
        if not 1 <= self.per_series <= MAX_PER_SERIES:
            raise FilmError(f"per_series: {self.per_series} is not a number of images from 1 "
                            f"to {MAX_PER_SERIES}")
        if not 30 <= self.dpi <= 600:
            raise FilmError(f"dpi: {self.dpi} must be between 30 and 600")
        if self.window is not None:
            check_window(*self.window)

    @property
    def tiles_per_sheet(self) -> int:
        return self.columns * self.rows

    @property
    def sheet_pixels(self) -> tuple[int, int]:
        """(width, height) of a PNG sheet."""
        return px(FILM_WIDTH_MM, self.dpi), px(FILM_HEIGHT_MM, self.dpi)


@dataclass(frozen=True)
class FilmImage:
    """One tile of a film: an image (``frame`` 1-based, None for a single-frame instance)."""

    series_instance_uid: str
    sop_instance_uid: str
    frame: int | None
    blob_key: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    number_of_frames: int
    sop_class_uid: str = ""


def check_window(center: float, width: float) -> None:
    """``FilmError`` naming ``window`` unless (center, width) is a window ``/rendered`` would
    take (``dicomweb.render.check_window``)."""
    try:
        render_check_window(center, width)
    except ValueError as exc:
        raise FilmError(str(exc)) from None


# ---------------------------------------------------------------------------- choosing


def film_series_uid(study_uid: str) -> str:
    """UID of the series that holds a study's films (the same for every film of the study)."""
    return generate_uid(entropy_srcs=[study_uid, "digital film series"])


def choose_images(index: Index, study_uid: str, per_series: int = 20) -> list[FilmImage]:
    """The images of a study's film: its key images, else ``per_series`` per image series."""
    return _choose(index, study_uid, per_series)[0]


def _choose(index: Index, study_uid: str, per_series: int
            ) -> tuple[list[FilmImage], dict[str, Any], bool]:
    """The film's images, one index row of the study (for the patient and study header) and
    whether the images are the study's key images."""
    rows = find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid}))
    if not rows:
        raise NotFound(f"no study {study_uid} in the archive")
    films = film_series_uid(study_uid)
    images = [r for r in rows if r["Rows"] and r["SeriesInstanceUID"] != films]
    if not images:
        raise NoImagesToFilm(f"study {study_uid} has no images to put on a film "
                             f"({len(rows)} instances, none with pixel data)")
    by_sop = {r["SOPInstanceUID"]: r for r in images}
    chosen: list[FilmImage] = []
    for key in key_images(index, study_uid):
        row = by_sop.get(key.sop_instance_uid)
        if row is not None:
            # A whole multi-frame instance marked as key: its first frame stands for it.
            frame = key.frame or (1 if (row["NumberOfFrames"] or 1) > 1 else None)
            chosen.append(_film_image(row, frame))
    if chosen:
        return list(dict.fromkeys(chosen)), rows[0], True
    for series_rows in _image_series(images):
        slices = [(row, frame) for row in series_rows for frame in _frames(row)]
        chosen.extend(_film_image(*slices[i]) for i in evenly_spaced(len(slices), per_series))
    return chosen, rows[0], False


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices of ``range(total)`` spread evenly, first and last included (all if
    there are fewer; the middle one for a count of 1)."""
    if total <= count:
        return list(range(total))
    if count == 1:
        return [(total - 1) // 2]
    step = (total - 1) / (count - 1)
    return [math.floor(i * step + 0.5) for i in range(count)]


def _image_series(images: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Image rows grouped by series: series by number, instances by number (then by arrival)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in images:
        groups.setdefault(row["SeriesInstanceUID"], []).append(row)
    ordered = sorted(groups.values(), key=lambda g: (*_number_key(g[0]["SeriesNumber"]),
                                                     g[0]["_series_pk"]))
    return [sorted(g, key=lambda r: (*_number_key(r["InstanceNumber"]), r["_instances_pk"]))
            for g in ordered]


def _number_key(number: int | None) -> tuple[bool, int]:
    return number is None, number or 0


def _frames(row: dict[str, Any]) -> list[int | None]:
    count = row["NumberOfFrames"] or 1
    return [None] if count == 1 else list(range(1, count + 1))


def _film_image(row: dict[str, Any], frame: int | None) -> FilmImage:
    return FilmImage(row["SeriesInstanceUID"], row["SOPInstanceUID"], frame, row["_blob_key"],
                     row["SeriesNumber"], row["SeriesDescription"] or "", row["InstanceNumber"],
                     row["NumberOfFrames"] or 1, row["SOPClassUID"] or "")


# ---------------------------------------------------------------------------- rendering


def render_film_png(archive: Archive, study_uid: str,
                    request: FilmRequest = FilmRequest()) -> list[bytes]:
    """The film of a study as PNG images, one per sheet."""
    canvas = PngCanvas(request.dpi)
    _draw_film(archive, study_uid, request, canvas)
    return canvas.finish()


def render_film_sheet_png(archive: Archive, study_uid: str, request: FilmRequest,
                          sheet: int) -> bytes:
    """Sheet ``sheet`` (1-based) of the film as a PNG; only that sheet is drawn.

    ``FilmError`` naming ``sheet`` when the film has no such sheet."""
    canvas = PngCanvas(request.dpi)
    _draw_film(archive, study_uid, request, canvas, only_sheet=sheet)
    return canvas.finish()[0]


def render_film_pdf(archive: Archive, study_uid: str,
                    request: FilmRequest = FilmRequest()) -> bytes:
    """The film of a study as a PDF, one 350 x 430 mm page per sheet."""
    canvas = PdfCanvas(request.dpi, FILM_TITLE)
    _draw_film(archive, study_uid, request, canvas)
    return canvas.finish()


def film_size(images: Sequence[FilmImage], request: FilmRequest, *,
              key_images_chosen: bool = False) -> int:
    """The number of sheets ``images`` take; ``FilmError`` naming the parameters when the film
    would be larger than ``MAX_SHEETS`` sheets or ``MAX_IMAGES`` images."""
    sheets = math.ceil(len(images) / request.tiles_per_sheet)
    if sheets <= MAX_SHEETS and len(images) <= MAX_IMAGES:
        return sheets
    names = "layout" if key_images_chosen else "layout, per_series"
    fewer = "" if key_images_chosen else " or fewer images per series (per_series)"
    raise FilmError(f"{names}: this film would have {len(images)} images on {sheets} sheets "
                    f"of {request.columns}x{request.rows}; a film has at most {MAX_IMAGES} "
                    f"images and {MAX_SHEETS} sheets: ask for a larger layout{fewer}")


def _draw_film(archive: Archive, study_uid: str, request: FilmRequest, canvas: Canvas, *,
               only_sheet: int | None = None) -> None:
    images, study, from_key_images = _choose(archive.index, study_uid, request.per_series)
    sheets = film_size(images, request, key_images_chosen=from_key_images)
    if only_sheet is not None and not 1 <= only_sheet <= sheets:
        raise FilmError(f"sheet: {only_sheet} is not between 1 and {sheets}")
    per_sheet = request.tiles_per_sheet
    numbers = range(sheets) if only_sheet is None else [only_sheet - 1]
    for number in numbers:
        tiles = images[number * per_sheet:(number + 1) * per_sheet]
        headers = _headers(archive.index, study_uid, [t.sop_instance_uid for t in tiles])
        boxes = [_tile_box(request, position) for position in range(len(tiles))]
        windows = [request.window or file_window(headers.get(t.sop_instance_uid, {}), t.frame)
                   for t in tiles]
        pictures = _render_tiles(archive, canvas, tiles, windows, boxes)
        canvas.new_sheet()
        _draw_header(canvas, request, study, number + 1, sheets)
        for tile, window, box, picture in zip(tiles, windows, boxes, pictures, strict=True):
            _draw_tile(canvas, tile, headers.get(tile.sop_instance_uid, {}), window, box,
                       picture)


def _render_tiles(archive: Archive, canvas: Canvas, tiles: list[FilmImage],
                  windows: list[tuple[float, float] | None],
                  boxes: list[tuple[float, float, float, float]]) -> list[bytes | None]:
    """Each tile's picture at its size on the sheet (None: it cannot be shown). The tiles of
    one instance are rendered from one reading of it (frames of a multi-frame instance)."""
    pictures: list[bytes | None] = [None] * len(tiles)
    by_blob: dict[str, list[int]] = {}
    for position, tile in enumerate(tiles):
        by_blob.setdefault(tile.blob_key, []).append(position)
    for blob_key, positions in by_blob.items():
        wanted = []
        for position in positions:
            _, _, w, h = boxes[position]
            viewport = (px(w - 1, canvas.dpi), px(h - 1, canvas.dpi))
            options = RenderOptions(canvas.media_type, 90, windows[position], viewport)
            wanted.append(((tiles[position].frame or 1) - 1, options))
        try:
            for position, (_, picture) in zip(positions, render_frames(archive, blob_key,
                                                                       wanted), strict=False):
                pictures[position] = picture
        except CannotRender as exc:
            tile = tiles[positions[0]]
            log.warning("film: %s frame %s not shown: %s", tile.sop_instance_uid, tile.frame,
                        exc)
    return pictures


def _headers(index: Index, study_uid: str, sop_uids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored DICOM JSON of a sheet's instances (never the whole study's at once)."""
    if not sop_uids:
        return {}
    rows = find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid,
                                              "SOPInstanceUID": "\\".join(set(sop_uids))},
                             with_header=True))
    return {r["SOPInstanceUID"]: json.loads(r["_header"] or "{}") for r in rows}


def _draw_header(canvas: Canvas, request: FilmRequest, study: dict[str, Any], sheet: int,
                 sheets: int) -> None:
    left, right = _MARGIN, FILM_WIDTH_MM - _MARGIN
    width = right - left
    title = f"{FILM_TITLE}  ·  Tờ/Sheet {sheet}/{sheets}"
    canvas.text(right, _MARGIN + 8, title, 6.0, anchor="rs")
    site = _fit(canvas, _clean(request.site_name), 8.0, width - canvas.text_width(title, 6.0) - 10,
                bold=True)
    canvas.text(left, _MARGIN + 8, site, 8.0, anchor="ls", bold=True)

    name = _fit(canvas, _clean(display_person_name(study["PatientName"])), 6.5, width * 0.5,
                bold=True)
    canvas.text(left, _MARGIN + 18, name, 6.5, anchor="ls", bold=True)
    details = "    ".join((
        f"Mã BN/ID: {_clean(study['PatientID'])}",
        f"Ngày sinh/DOB: {display_date(study['PatientBirthDate'])}",
        f"Giới/Sex: {_SEXES.get(study['PatientSex'] or '', _clean(study['PatientSex']))}",
    ))
    x = left + canvas.text_width(name, 6.5, bold=True) + 8
    canvas.text(x, _MARGIN + 18, _fit(canvas, details, 5.0, right - x), 5.0, anchor="ls")

    line = "    ".join(part for part in (
        f"Ngày chụp/Study date: {display_date(study['StudyDate'])}",
        _clean(study["StudyDescription"]),
        f"Số phiếu/Accession: {_clean(study['AccessionNumber'])}",
    ) if part)
    canvas.text(left, _MARGIN + 27, _fit(canvas, line, 5.0, width), 5.0, anchor="ls")
    canvas.line(left, _MARGIN + _HEADER - 3, right, _MARGIN + _HEADER - 3, 110)


def _tile_box(request: FilmRequest, position: int) -> tuple[float, float, float, float]:
    """(x, y, width, height) of tile ``position`` (row by row) on a sheet."""
    top = _MARGIN + _HEADER
    width = (FILM_WIDTH_MM - 2 * _MARGIN - (request.columns - 1) * _GAP) / request.columns
    height = (FILM_HEIGHT_MM - top - _MARGIN - (request.rows - 1) * _GAP) / request.rows
    row, column = divmod(position, request.columns)
    return _MARGIN + column * (width + _GAP), top + row * (height + _GAP), width, height


def _draw_tile(canvas: Canvas, tile: FilmImage, header: dict[str, Any],
               window: tuple[float, float] | None, box: tuple[float, float, float, float],
               picture: bytes | None) -> None:
    x, y, w, h = box
    canvas.frame(x, y, w, h, 60)
    if picture is None:
        canvas.text(x + w / 2, y + h / 2, "Không hiển thị được / cannot display", 3.0,
                    anchor="mm", grey=180)
    else:
        with Image.open(io.BytesIO(picture)) as opened:
            iw, ih = (side * 25.4 / canvas.dpi for side in opened.size)
        canvas.image(x + (w - iw) / 2, y + (h - ih) / 2, iw, ih, picture,
                     f"{tile.sop_instance_uid}/{tile.frame or 1}")

    size = min(max(min(w, h) * 0.05, 2.0), 4.5)
    pad = 0.3 * size
    half = w / 2 - size
    series = f"Se {tile.series_number if tile.series_number is not None else '-'}"
    if tile.series_description:
        series += f" · {_clean(tile.series_description)}"
    image = f"Im {tile.instance_number if tile.instance_number is not None else '-'}"
    if tile.frame is not None:
        image += f" · Fr {tile.frame}/{tile.number_of_frames}"
    canvas.text(x + pad, y + pad, _fit(canvas, series, size, half), size)
    canvas.text(x + pad, y + pad + 1.2 * size, _fit(canvas, image, size, half), size)
    shown = f"C {window[0]:g}  W {window[1]:g}" if window else "C/W auto"
    canvas.text(x + pad, y + h - pad, _fit(canvas, shown, size, half), size, anchor="ld")

    letters = orientation_letters(header, tile.frame)
    if letters is not None:
        top, bottom, left, right = letters
        big = size * 1.2
        canvas.text(x + w / 2, y + pad, top, big, anchor="ma", grey=230)
        canvas.text(x + w / 2, y + h - pad, bottom, big, anchor="md", grey=230)
        canvas.text(x + pad, y + h / 2, left, big, anchor="lm", grey=230)
        canvas.text(x + w - pad, y + h / 2, right, big, anchor="rm", grey=230)


# ---------------------------------------------------------------------------- header values


_SEXES = {"M": "Nam / M", "F": "Nữ / F", "O": "Khác / O"}
_PATIENT_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z of the patient (LPS)




def orientation_letters(header: dict[str, Any], frame: int | None = None
                        ) -> tuple[str, str, str, str] | None:
    """Patient directions at the (top, bottom, left, right) edges of an image, from its
    Image Orientation (Patient); None when unknown.

    The row direction points from the left edge to the right one, the column direction from the
    top down. Each is named by its patient axes, largest component first (``L``, ``LP``...).
    """
    cosines = _orientation(header, frame)
    if cosines is None:
        return None
    row, column = cosines[:3], cosines[3:]
    return (_direction([-c for c in column]), _direction(column),
            _direction([-c for c in row]), _direction(row))


def _direction(vector: Sequence[float]) -> str:
    axes = sorted(range(3), key=lambda i: -abs(vector[i]))
    return "".join(_PATIENT_AXES[i][0 if vector[i] > 0 else 1] for i in axes
                   if abs(vector[i]) > 1e-4)


def _orientation(header: dict[str, Any], frame: int | None) -> list[float] | None:
    for source in (header, *_functional_groups(header, frame, "00209116")):
        values = _json_values(source, "00200037")
        if len(values) == 6:
            try:
                return [float(v) for v in values]
            except (TypeError, ValueError):
                return None
    return None


def file_window(header: dict[str, Any], frame: int | None = None) -> tuple[float, float] | None:
    """The first Window Center/Width an instance's DICOM JSON gives (None: none usable)."""
    for source in (header, *_functional_groups(header, frame, "00289132")):
        centers, widths = _json_values(source, "00281050"), _json_values(source, "00281051")
        if centers and widths:
            try:
                center, width = float(centers[0]), float(widths[0])
            except (TypeError, ValueError):
                continue
            if width > 0:
                return center, width
    return None


def _functional_groups(header: dict[str, Any], frame: int | None,
                       macro: str) -> Iterator[dict[str, Any]]:
    """Items of a functional group macro (enhanced multi-frame): the frame's own, then shared."""
    per_frame = _json_values(header, "52009230")
    if frame is not None and 0 < frame <= len(per_frame) and isinstance(per_frame[frame - 1],
                                                                         dict):
        yield from _json_values(per_frame[frame - 1], macro)
    for shared in _json_values(header, "52009229")[:1]:
        if isinstance(shared, dict):
            yield from _json_values(shared, macro)


def _json_values(obj: dict[str, Any], tag: str) -> list[Any]:
    element = obj.get(tag)
    return list(element.get("Value") or []) if isinstance(element, dict) else []


def _clean(text: Any) -> str:
    # NFC: decomposed accents (e + combining marks) would print as separate glyphs.
    return unicodedata.normalize("NFC", str(text or "")).strip()


def _fit(canvas: Canvas, text: str, size: float, width: float, *, bold: bool = False) -> str:
    """``text``, shortened with an ellipsis to fit ``width`` mm."""
    if canvas.text_width(text, size, bold=bold) <= width:
        return text
    while text and canvas.text_width(text + "…", size, bold=bold) > width:
        text = text[:-1]
    return text.rstrip() + "…" if text else ""


# ---------------------------------------------------------------------------- archiving


# Patient and General Study module attributes copied from an instance of the study.
_COPIED = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "PatientAge", "PatientSize", "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
# Type 2: present even when the study has no value.
_REQUIRED_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                   "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def film_dataset(index: Index, study_uid: str, pdf: bytes, *, site_name: str = "PACS",
                 title: str = FILM_TITLE, sources: list[FilmImage] | None = None) -> Dataset:
    """An Encapsulated PDF instance of ``pdf`` in the study's film series; its SOP Instance
    UID is ``film_instance_uid`` and its Instance Number follows the films already stored.
    ``sources``, the images on the film, go in its Source Instance Sequence."""
    if not pdf.startswith(b"%PDF-"):
        raise FilmError("the film document is not a PDF (it does not start with %PDF-)")
    rows = find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid}, with_header=True,
                             limit=1))
    if not rows:
        raise NotFound(f"no study {study_uid} in the archive")
    header = json.loads(rows[0]["_header"] or "{}")
    wanted = {f"{tag_for_keyword(keyword):08X}" for keyword in _COPIED}
    ds = Dataset.from_json({t: v for t, v in header.items() if t in wanted},
                           bulk_data_uri_handler=lambda *_: b"")
    for keyword in _REQUIRED_EMPTY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = study_uid

    series_uid = film_series_uid(study_uid)
    earlier = find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid,
                                                 "SeriesInstanceUID": series_uid}))
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = film_instance_uid(study_uid, pdf)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = FILM_SERIES_NUMBER
    ds.SeriesDescription = title
    ds.Manufacturer = "pacs"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = site_name
    ds.ConversionType = "WSD"  # workstation
    # The highest number so far, not the count: a film deleted from the series would make the
    # count give the number of a film still there.
    ds.InstanceNumber = max((r["InstanceNumber"] or 0 for r in earlier), default=0) + 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.BurnedInAnnotation = "YES"  # the sheets show the patient's name and ID
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(pdf)  # the value is padded to an even length
    referenced = []
    for image in dict.fromkeys((i.sop_class_uid, i.sop_instance_uid) for i in sources or ()):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image
        referenced.append(item)
    if referenced:  # Type 1C: the document shows these instances
        ds.SourceInstanceSequence = referenced
    return ds


# Parts of a PDF fpdf2 takes from the clock: the creation date and the file ID made from it.
_CLOCK_PARTS = re.compile(rb"/CreationDate \(D:[0-9Z+'-]*\)"
                          rb"|/ID \[<[0-9A-Fa-f]*><[0-9A-Fa-f]*>\]")
# Films are numbered and stored one at a time, so that two stored at once get distinct
# Instance Numbers: in this process by this lock, between nodes by ``_numbering_films``.
_FILM_STORES = threading.Lock()


def film_fingerprint(pdf: bytes) -> str:
    """SHA-256 of a film's content: the PDF without the parts that change with the clock
    alone, so the same film made again has the same fingerprint."""
    return hashlib.sha256(_CLOCK_PARTS.sub(b"", pdf)).hexdigest()


def film_instance_uid(study_uid: str, pdf: bytes) -> str:
    """The SOP Instance UID of a stored film: the same study and film content, the same UID."""
    return generate_uid(entropy_srcs=[study_uid, "digital film", film_fingerprint(pdf)])


def store_film(archive: Archive, study_uid: str, pdf: bytes, *, site_name: str = "PACS",
               title: str = FILM_TITLE, sources: list[FilmImage] | None = None) -> StoreResult:
    """Archive a film PDF as an Encapsulated PDF instance of the study (``Archive.store``).

    Storing the same film again (a second click, a retry) stores nothing: the answer is the
    instance already there, with the outcome ``DUPLICATE_KEPT``."""
    with _numbering_films(archive.index, study_uid):
        existing = find(archive.index, Query(Level.INSTANCE, {
            "StudyInstanceUID": study_uid,
            "SOPInstanceUID": film_instance_uid(study_uid, pdf)}, limit=1))
        if existing:
            row = existing[0]
            return StoreResult(StoreOutcome.DUPLICATE_KEPT, row["SOPClassUID"],
                               row["SOPInstanceUID"], study_uid, row["SeriesInstanceUID"],
                               row["_transfer_syntax_uid"])
        ds = film_dataset(archive.index, study_uid, pdf, site_name=site_name, title=title,
                          sources=sources)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return archive.store(out.getvalue())


@contextlib.contextmanager
def _numbering_films(index: Index, study_uid: str) -> Iterator[None]:
    """The right to number and store a film of ``study_uid``: one thread of this process at a
    time and, on PostgreSQL, one node at a time (a session advisory lock, on a connection of
    its own, held from reading the study's last number until the film's row is committed)."""
    with _FILM_STORES:
        if index.is_sqlite:  # the nodes of one SQLite file are this process
            yield
            return
        digest = hashlib.sha256(f"film\0{study_uid}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        with index.engine.connect() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_lock(key)))
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                    conn.commit()
                except sa.exc.DBAPIError:
                    conn.invalidate()  # the session ends, and its lock with it
