"""Rendered images (PS3.18 10.4.1.1.3 and 10.7 thumbnails): one frame to JPEG or PNG.

Grey-scale frames go through the Modality LUT (rescale), then a window: the one asked for (with
its function, LINEAR, LINEAR_EXACT or SIGMOID, PS3.18 8.3.5.1.3), else the file's first Window
Center/Width, else its VOI LUT, else the frame's own pixel range.
MONOCHROME1 is inverted so that what a radiologist expects to be dark is dark. Colour frames
(RGB, YBR after decoding, PALETTE COLOR) are shown as colour, scaled to 8 bits.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

RENDERED_TYPES = ("image/jpeg", "image/png")
THUMBNAIL_SIZE = 200  # pixels on the longer side, unless the request gives a viewport
_MAX_SIDE = 8192
# A window beyond this is no window of any real image (and 1e308 overflows the arithmetic).
MAX_WINDOW = 1e9
# The VOI LUT functions of the ``window`` parameter (PS3.18 8.3.5.1.3, PS3.3 C.11.2.1.3).
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class CannotRender(ValueError):
    """The instance has no image to render (no pixel data, undecodable, bad parameters)."""


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    quality: int = 90  # JPEG only
    window: tuple[float, float] | None = None  # (center, width)
    viewport: tuple[int, int] | None = None  # fit within (columns, rows), keeping the aspect
    invert: bool = False  # for ``window=...,...,`` functions we do not support: ignored
    window_function: str = "LINEAR"  # of ``window``, one of ``WINDOW_FUNCTIONS``


def parse_options(params, media_type: str, *, thumbnail: bool = False) -> RenderOptions:
    """Options from query parameters ``quality``, ``window``, ``viewport``
    (``ValueError`` names the parameter)."""
    quality = 90
    if "quality" in params:
        try:
            quality = int(params["quality"])
        except ValueError:
            raise ValueError(f"quality: {params['quality']!r} is not an integer") from None
        if not 1 <= quality <= 100:
            raise ValueError(f"quality: {quality} is not between 1 and 100")
    window, function = None, "LINEAR"
    if "window" in params:
        center, width, function = parse_window_with_function(params["window"])
        window = (center, width)
    viewport = (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
    if "viewport" in params:
        parts = params["viewport"].split(",")
        try:
            columns, rows = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise ValueError(f"viewport: {params['viewport']!r} is not columns,rows") from None
        if not (0 < columns <= _MAX_SIDE and 0 < rows <= _MAX_SIDE):
            raise ValueError(f"viewport: each side must be between 1 and {_MAX_SIDE}")
        viewport = (columns, rows)
    return RenderOptions(media_type, quality, window, viewport, window_function=function)


def parse_window_with_function(text: str, functions: tuple[str, ...] = WINDOW_FUNCTIONS
                               ) -> tuple[float, float, str]:
    """``window=CENTER,WIDTH[,FUNCTION]`` (PS3.18 8.3.5.1.3) as (center, width, function), the
    function LINEAR when not given; ``ValueError`` naming ``window`` for a function not in
    ``functions``, more values, or an unusable window (``check_window``)."""
    parts = text.split(",")
    try:
        if len(parts) > 3:
            raise ValueError
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise ValueError(f"window: {text[:40]!r} is not center,width[,function] "
                         "(e.g. 40,400,LINEAR)") from None
    function = parts[2].strip().upper() if len(parts) == 3 else "LINEAR"
    if function not in functions:
        raise ValueError(f"window: the function {parts[2][:20]!r} is not one of "
                         f"{', '.join(functions)}")
    check_window(center, width)
    return center, width, function


def parse_window(text: str) -> tuple[float, float]:
    """``window=CENTER,WIDTH[,LINEAR]`` as (center, width), for what draws linear windows only
    (the film): another function is refused rather than drawn as LINEAR; ``ValueError`` naming
    ``window``."""
    center, width, _ = parse_window_with_function(text, ("LINEAR",))
    return center, width


def check_window(center: float, width: float) -> None:
    """``ValueError`` naming ``window`` unless (center, width) is a usable window: finite
    numbers (NaN passed a width check and made every image blank), a positive width, both
    within ``MAX_WINDOW``. The film takes the same windows."""
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"window: {center:g},{width:g}: center and width must be numbers, "
                         "not nan or inf")
    if width <= 0:
        raise ValueError("window: the width must be positive")
    if abs(center) > MAX_WINDOW or width > MAX_WINDOW:
        raise ValueError(f"window: center and width must be within ±{MAX_WINDOW:g}")


def render_frame(data: bytes, index: int, options: RenderOptions) -> bytes:
    """Frame ``index`` (0-based) of the Part 10 ``data`` as an encoded image."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise CannotRender(f"the instance cannot be read: {exc}") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise CannotRender("the instance has no pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if not 0 <= index < frames:
        raise CannotRender(f"frame {index + 1} does not exist ({frames} frames)")
    try:
        pixels = pydicom.pixels.pixel_array(ds, index=index)
    except Exception as exc:
        raise CannotRender(f"the pixel data cannot be decoded: {exc}") from exc
    return picture_of(ds, pixels, options)


def picture_of(ds, pixels: np.ndarray, options: RenderOptions) -> bytes:
    """One decoded frame (``pixels``) of ``ds`` as the encoded image ``options`` ask for."""
    try:
        image = _to_8bit(ds, pixels, options.window, options.window_function)
    except CannotRender:
        raise
    except Exception as exc:  # a value the LUTs cannot take, a missing attribute...
        raise CannotRender(f"the pixel data cannot be decoded: {exc}") from exc
    picture = Image.fromarray(image)
    if options.viewport:
        picture = _fit(picture, options.viewport)
    out = io.BytesIO()
    if options.media_type == "image/png":
        picture.save(out, "PNG", compress_level=3)
    else:
        picture.save(out, "JPEG", quality=options.quality)
    return out.getvalue()


def _to_8bit(ds, pixels: np.ndarray, window: tuple[float, float] | None,
             function: str = "LINEAR") -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        return _scale(pixels, 0, float(pixels.max() or 1))
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):  # colour (YBR decoded to RGB)
        bits = int(ds.get("BitsStored") or 8)
        return _scale(pixels[..., :3], 0, float((1 << bits) - 1))
    if pixels.ndim != 2:
        raise CannotRender(f"frames of shape {pixels.shape} cannot be shown as an image")
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if window is None:
        window, function = _file_window(ds), "LINEAR"
    if window is not None:
        image = _WINDOWS[function](values, *window)
    elif "VOILUTSequence" in ds:
        image = apply_voi_lut(pixels, ds).astype(np.float32)
        image = _scale(image, float(image.min()), float(image.max()))
    else:
        image = _scale(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        image = 255 - image
    return image


def _file_window(ds) -> tuple[float, float] | None:
    """The first Window Center/Width of the file, also from enhanced multi-frame groups."""
    for source in (ds, *_functional_group_items(ds)):
        center, width = source.get("WindowCenter"), source.get("WindowWidth")
        if center is not None and width is not None:
            try:
                center = float(center[0] if isinstance(center, pydicom.multival.MultiValue)
                               else center)
                width = float(width[0] if isinstance(width, pydicom.multival.MultiValue)
                              else width)
            except (TypeError, ValueError):
                continue
            if width > 0:
                return center, width
    return None


def _functional_group_items(ds):
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(group, [])[:1]:
            yield from item.get("FrameVOILUTSequence", [])


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear window, to 0..255."""
    low = center - 0.5 - (width - 1) / 2
    scaled = (values - low) / max(width - 1, 1) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _linear_exact_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 LINEAR_EXACT window, to 0..255."""
    scaled = ((values - center) / width + 0.5) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _sigmoid_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 SIGMOID window, to 0..255."""
    exponent = np.clip(-4.0 * (values.astype(np.float64) - center) / width, -50.0, 50.0)
    return np.clip(255.0 / (1.0 + np.exp(exponent)), 0, 255).astype(np.uint8)


_WINDOWS = {"LINEAR": _linear_window, "LINEAR_EXACT": _linear_exact_window,
            "SIGMOID": _sigmoid_window}


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low if high > low else 1.0
    return np.clip((values.astype(np.float32) - low) / span * 255.0, 0, 255).astype(np.uint8)


def _fit(picture: Image.Image, viewport: tuple[int, int]) -> Image.Image:
    columns, rows = viewport
    scale = min(columns / picture.width, rows / picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS if scale < 1 else
                          Image.Resampling.BILINEAR)


class RenderCache:
    """Rendered images by key, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)
