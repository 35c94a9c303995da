"""Rendered-image options (``dicomweb.render.parse_options``): what a bad parameter is told."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomweb.render import parse_options, parse_window, picture_of


@pytest.mark.parametrize(("params", "named"), [
    ({"window": "nan,nan"}, "window"),  # passed, and every image came out blank
    ({"window": "40,nan"}, "window"),
    ({"window": "40,inf"}, "window"),
    ({"window": "-inf,400"}, "window"),
    ({"window": "1e308,1e308"}, "window"),  # overflowed the arithmetic
    ({"window": "40"}, "window"),
    ({"window": "40,0"}, "window"),
    ({"quality": "0"}, "quality"),
    ({"quality": "high"}, "quality"),
    ({"viewport": "0,10"}, "viewport"),
    ({"viewport": "10"}, "viewport"),
])
def test_bad_parameters_are_refused_naming_them(params, named):
    with pytest.raises(ValueError, match=f"^{named}"):
        parse_options(params, "image/jpeg")


def test_good_parameters_are_taken():
    options = parse_options({"window": "40,400,LINEAR", "quality": "75", "viewport": "256,128"},
                            "image/png")
    assert (options.window, options.quality, options.viewport) == ((40.0, 400.0), 75, (256, 128))


@pytest.mark.parametrize("window", [
    "40,400,FOO",  # PS3.18 8.3.5.1.3: LINEAR, LINEAR_EXACT or SIGMOID; FOO was drawn as LINEAR
    "40,400,LINEAR,extra",
    "40,400,SIGMOID,LINEAR",
    "40,400,",
])
def test_a_window_with_an_unknown_function_or_more_values_is_refused(window):
    with pytest.raises(ValueError, match="^window: .*(LINEAR, LINEAR_EXACT, SIGMOID|center,wid)"):
        parse_options({"window": window}, "image/jpeg")


@pytest.mark.parametrize(("window", "function"), [
    ("40,400", "LINEAR"), ("40,400,LINEAR", "LINEAR"), ("40,400,LINEAR_EXACT", "LINEAR_EXACT"),
    ("40,400,SIGMOID", "SIGMOID"), ("40,400,sigmoid", "SIGMOID"),
])
def test_the_window_functions_of_ps3_18_are_taken(window, function):
    options = parse_options({"window": window}, "image/png")
    assert (options.window, options.window_function) == ((40.0, 400.0), function)


def test_the_film_window_refuses_a_function_it_would_draw_as_linear():
    assert parse_window("40,400,LINEAR") == (40.0, 400.0)
    with pytest.raises(ValueError, match="^window: .*SIGMOID.* is not one of LINEAR$"):
        parse_window("40,400,SIGMOID")


def _grey_ramp(values: list[int]) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 1, len(values), 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


@pytest.mark.parametrize(("function", "expected"), [
    # PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped
    ("LINEAR", [0, 0, 128, 193, 255, 255]),
    # C.11.2.1.3.1: ((x - c) / w + 0.5) * 255, clipped
    ("LINEAR_EXACT", [0, 0, 127, 191, 255, 255]),
    # C.11.2.1.3.2: 255 / (1 + exp(-4 (x - c) / w))
    ("SIGMOID", [0, 30, 127, 186, 224, 255]),
])
def test_each_window_function_draws_its_formula(function, expected):
    values = [-1000, -50, 0, 25, 50, 1000]
    ds = _grey_ramp(values)
    options = parse_options({"window": f"0,100,{function}"}, "image/png")

    png = picture_of(ds, np.array([values], dtype=np.int16), options)

    assert list(np.asarray(Image.open(io.BytesIO(png)))[0]) == expected
