"""Comparing a data set that went through the server with the original."""

from __future__ import annotations

import pydicom

_BINARY = {"OB", "OW", "UN"}


# What decompressing may change besides the transfer syntax: the pixels, their colour model
# (YBR_FULL_422 comes out RGB), planar configuration, and Number of Frames where it was absent.
DECOMPRESSED_PIXEL_MODULE = frozenset({0x7FE00010, 0x00280004, 0x00280006, 0x00280008})


def assert_same_data_set(received: pydicom.Dataset, original: pydicom.Dataset, name: str,
                         ignore: frozenset[int] = frozenset()):
    """Element by element, ignoring group lengths (retired; pynetdicom drops them on sending),
    Data Set Trailing Padding (which any application may remove, PS3.10 7.2) and the tags in
    ``ignore``."""
    def elements(ds):
        return {e.tag: e for e in ds
                if e.tag.element != 0 and e.tag != 0xFFFCFFFC and e.tag not in ignore}
    mine, theirs = elements(received), elements(original)
    assert mine.keys() == theirs.keys(), name
    for tag, element in theirs.items():
        if element.VR in _BINARY and mine[tag].VR in _BINARY:  # OB/OW/UN: same bytes suffice
            assert mine[tag].value == element.value, f"{name} {tag}"
        else:
            assert mine[tag] == element, f"{name} {tag}"
