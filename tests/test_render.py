"""Rendered-image options (``dicomweb.render.parse_options``): what a bad parameter is told."""

from __future__ import annotations

import pytest

from dicomweb.render import parse_options


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
