"""Where film sheets are drawn: Pillow (one PNG per sheet) or fpdf2 (one PDF page per sheet,
each tile its own JPEG image, text as text). ``viewer.film`` draws on either through
``Canvas``, in millimetres on a 35 x 43 cm portrait film.

Text is set in DejaVu Sans (Debian ``fonts-dejavu-core``), which has every Vietnamese glyph.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Protocol

from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont

from pacs import __version__

FILM_WIDTH_MM, FILM_HEIGHT_MM = 350.0, 430.0  # a 35 x 43 cm (14 x 17 in) film, portrait
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_REGULAR = FONT_DIR / "DejaVuSans.ttf"
FONT_BOLD = FONT_DIR / "DejaVuSans-Bold.ttf"
# DejaVu Sans, as fractions of the em: ascender above and descender below the baseline.
_ASCENT, _DESCENT = 0.928, 0.236


class FilmFontMissing(RuntimeError):
    """The TrueType font the film's Vietnamese text needs is not installed."""


class Canvas(Protocol):
    """Where a film is drawn; positions and sizes in millimetres, ``anchor`` as Pillow's."""

    dpi: int
    media_type: str

    def new_sheet(self) -> None: ...

    def text(self, x: float, y: float, text: str, size: float, *, anchor: str = "la",
             bold: bool = False, grey: int = 255) -> None: ...

    def text_width(self, text: str, size: float, *, bold: bool = False) -> float: ...

    def frame(self, x: float, y: float, w: float, h: float, grey: int) -> None: ...

    def line(self, x1: float, y1: float, x2: float, y2: float, grey: int) -> None: ...

    def image(self, x: float, y: float, w: float, h: float, data: bytes, name: str) -> None: ...


def px(mm: float, dpi: int) -> int:
    return max(1, round(mm * dpi / 25.4))


def fonts() -> tuple[Path, Path]:
    for path in (FONT_REGULAR, FONT_BOLD):
        if not path.is_file():
            raise FilmFontMissing(f"the film font {path} is missing; install the Debian package "
                                  "fonts-dejavu-core (apt-get install fonts-dejavu-core)")
    return FONT_REGULAR, FONT_BOLD




class PngCanvas:
    """Sheets drawn with Pillow, each encoded to PNG when the next one starts."""

    media_type = "image/png"

    def __init__(self, dpi: int) -> None:
        self.dpi = dpi
        self._regular, self._bold = fonts()
        self._fonts: dict[tuple[bool, int], ImageFont.FreeTypeFont] = {}
        self._sheets: list[bytes] = []
        self._sheet: Image.Image | None = None
        self._draw: ImageDraw.ImageDraw | None = None

    def new_sheet(self) -> None:
        self._encode()
        size = (px(FILM_WIDTH_MM, self.dpi), px(FILM_HEIGHT_MM, self.dpi))
        self._sheet = Image.new("RGB", size, (0, 0, 0))
        self._draw = ImageDraw.Draw(self._sheet)

    def finish(self) -> list[bytes]:
        self._encode()
        return self._sheets

    def _encode(self) -> None:
        if self._sheet is not None:
            out = io.BytesIO()
            self._sheet.save(out, "PNG", dpi=(self.dpi, self.dpi))
            self._sheets.append(out.getvalue())
            self._sheet = self._draw = None

    def _font(self, size: float, bold: bool) -> ImageFont.FreeTypeFont:
        key = (bold, max(1, round(size * self.dpi / 25.4)))
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(self._bold if bold else self._regular),
                                                  key[1])
        return self._fonts[key]

    def _xy(self, x: float, y: float) -> tuple[float, float]:
        return x * self.dpi / 25.4, y * self.dpi / 25.4

    def text(self, x: float, y: float, text: str, size: float, *, anchor: str = "la",
             bold: bool = False, grey: int = 255) -> None:
        self._draw.text(self._xy(x, y), text, fill=(grey,) * 3, font=self._font(size, bold),
                        anchor=anchor)

    def text_width(self, text: str, size: float, *, bold: bool = False) -> float:
        return self._font(size, bold).getlength(text) * 25.4 / self.dpi

    def frame(self, x: float, y: float, w: float, h: float, grey: int) -> None:
        self._draw.rectangle((*self._xy(x, y), *self._xy(x + w, y + h)), outline=(grey,) * 3)

    def line(self, x1: float, y1: float, x2: float, y2: float, grey: int) -> None:
        self._draw.line((*self._xy(x1, y1), *self._xy(x2, y2)), fill=(grey,) * 3,
                        width=max(1, round(self.dpi / 100)))

    def image(self, x: float, y: float, w: float, h: float, data: bytes, name: str) -> None:
        with Image.open(io.BytesIO(data)) as picture:
            left, top = self._xy(x, y)
            self._sheet.paste(picture.convert("RGB"), (round(left), round(top)))


class PdfCanvas:
    """Pages drawn with fpdf2: tiles as JPEG images, text as text in embedded DejaVu Sans."""

    media_type = "image/jpeg"

    def __init__(self, dpi: int, title: str = "") -> None:
        self.dpi = dpi
        regular, bold = fonts()
        self._pdf = FPDF(orientation="P", unit="mm", format=(FILM_WIDTH_MM, FILM_HEIGHT_MM))
        self._pdf.set_auto_page_break(False)
        self._pdf.set_margins(0, 0, 0)
        self._pdf.add_font("DejaVu", "", str(regular))
        self._pdf.add_font("DejaVu", "B", str(bold))
        self._pdf.set_title(title)
        self._pdf.set_creator(f"pacs {__version__}")

    def new_sheet(self) -> None:
        self._pdf.add_page()
        self._pdf.set_fill_color(0)
        self._pdf.rect(0, 0, FILM_WIDTH_MM, FILM_HEIGHT_MM, style="F")

    def finish(self) -> bytes:
        return bytes(self._pdf.output())

    def _font(self, size: float, bold: bool) -> None:
        self._pdf.set_font("DejaVu", "B" if bold else "", size * 72 / 25.4)

    def text(self, x: float, y: float, text: str, size: float, *, anchor: str = "la",
             bold: bool = False, grey: int = 255) -> None:
        self._font(size, bold)
        width = self._pdf.get_string_width(text)
        x -= {"l": 0.0, "m": width / 2, "r": width}[anchor[0]]
        # fpdf2 places text by its baseline; Pillow's vertical anchors, in DejaVu's metrics.
        y += {"a": _ASCENT, "m": (_ASCENT - _DESCENT) / 2, "s": 0.0, "d": -_DESCENT}[anchor[1]] \
            * size
        self._pdf.set_text_color(grey)
        self._pdf.text(x, y, text)

    def text_width(self, text: str, size: float, *, bold: bool = False) -> float:
        self._font(size, bold)
        return self._pdf.get_string_width(text)

    def frame(self, x: float, y: float, w: float, h: float, grey: int) -> None:
        self._pdf.set_draw_color(grey)
        self._pdf.set_line_width(0.2)
        self._pdf.rect(x, y, w, h)

    def line(self, x1: float, y1: float, x2: float, y2: float, grey: int) -> None:
        self._pdf.set_draw_color(grey)
        self._pdf.set_line_width(0.3)
        self._pdf.line(x1, y1, x2, y2)

    def image(self, x: float, y: float, w: float, h: float, data: bytes, name: str) -> None:
        self._pdf.image(io.BytesIO(_jpeg_with_comment(data, name)), x, y, w, h)


def _jpeg_with_comment(data: bytes, comment: str) -> bytes:
    """The JPEG with a comment segment naming the tile after its JFIF header.

    fpdf2 embeds byte-identical images once; the comment keeps each tile its own image even when
    two slices look the same (blank slices), so every tile is one image of its page.
    """
    if data[:2] != b"\xff\xd8":
        return data
    position = 2
    if data[2:4] == b"\xff\xe0":  # JFIF APP0 must stay right after SOI
        position = 4 + struct.unpack(">H", data[4:6])[0]
    text = comment.encode("ascii", "replace")[:1000]
    return data[:position] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[position:]


__all__ = ["FILM_HEIGHT_MM", "FILM_WIDTH_MM", "Canvas", "FilmFontMissing", "PdfCanvas",
           "PngCanvas", "fonts", "px"]
