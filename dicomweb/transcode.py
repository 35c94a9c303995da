"""Transfer syntax conversion for WADO-RS, with pydicom and the pylibjpeg / pyjpegls codecs.

Instances are archived as received. A client that asks for another transfer syntax gets the
instance (or frame) converted here: decompressed to Explicit VR Little Endian, or compressed to
one of the lossless syntaxes the installed encoders produce. It is the same instance in another
encoding: its SOP Instance UID stays (pydicom's ``compress`` and ``decompress`` would make up a
new one unless told not to). What cannot be produced raises ``NotTranscodable`` (HTTP 406 at
the edge).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

UNCOMPRESSED = frozenset({str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)})
# What the installed encoders can write, lossless only: a viewer asking for these gets the
# same pixels, only smaller.
ENCODABLE = frozenset({str(RLELossless), str(JPEGLSLossless), str(JPEG2000Lossless)})


class NotTranscodable(ValueError):
    """The instance cannot be delivered in the requested transfer syntax."""


def can_produce(source: str, target: str) -> bool:
    """Whether ``transcode`` can turn ``source`` into ``target`` (before trying)."""
    return source == target or target in UNCOMPRESSED or target in ENCODABLE


def transcode(data: bytes, target: str) -> bytes:
    """The Part 10 ``data`` re-encoded in transfer syntax ``target``."""
    ds = pydicom.dcmread(BytesIO(data))
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return data
    if not can_produce(source, target):
        raise NotTranscodable(f"cannot convert {_name(source)} to {_name(target)}")
    try:
        to_native(ds)
        if target in ENCODABLE:
            if "PixelData" not in ds:
                raise NotTranscodable(f"{_name(target)} needs pixel data; the instance has none")
            ds.compress(target, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = UID(target)
        out = BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True,
                         implicit_vr=target == str(ImplicitVRLittleEndian), little_endian=True)
        return out.getvalue()
    except NotTranscodable:
        raise
    except Exception as exc:  # codec missing, corrupt pixel data, unsupported photometric...
        raise NotTranscodable(
            f"cannot convert {_name(source)} to {_name(target)}: {exc}") from exc


def to_native(ds: Dataset) -> None:
    """Make ``ds`` (read from a Part 10 file) an Explicit VR Little Endian data set with native
    pixel data, the same instance: for WADO-RS, and for C-MOVE / C-GET peers that take no
    compressed syntax. Raises what pydicom's codecs raise."""
    source = str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" in ds and UID(source).is_compressed:
        ds.decompress(generate_instance_uid=False)  # sets Explicit VR Little Endian
        if ds.get("BitsAllocated") == 1:
            _pack_single_bits(ds)
        return
    if source == str(ExplicitVRBigEndian):
        _swap_binary_values(ds)  # which decodes every element: none is left raw, big endian
        # pynetdicom refuses to send a data set read as big endian under a little-endian
        # syntax. (Raw elements of an Implicit VR source must keep theirs, to be decoded.)
        ds.set_original_encoding(False, True, ds.original_character_set)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


_WORD_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _swap_binary_values(ds: Dataset) -> None:
    """Big to little endian for the raw binary values pydicom leaves as bytes (pydicom converts
    numbers it decodes, such as US and FL, by itself). Pixel Data follows Bits Allocated."""
    for elem in ds.iterall():
        size = _WORD_SIZES.get(elem.VR)
        if elem.tag == 0x7FE00010:
            size = int(ds.get("BitsAllocated") or 8) // 8
        if size and size > 1 and isinstance(elem.value, bytes) and len(elem.value) % size == 0:
            elem.value = np.frombuffer(elem.value, f">u{size}").astype(f"<u{size}").tobytes()


def _pack_single_bits(ds: Dataset) -> None:
    """1-bit images (segmentations) decompressed one byte per pixel: pack them (PS3.5 8.1.1)."""
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) \
        * int(ds.get("NumberOfFrames") or 1)
    if len(ds.PixelData) >= pixels:  # unpacked: one byte per pixel
        ds.PixelData = pack_bits(np.frombuffer(ds.PixelData[:pixels], np.uint8))


def native_frame(data: bytes, index: int) -> bytes:
    """Frame ``index`` (0-based) of an instance as native little-endian pixel bytes."""
    ds = pydicom.dcmread(BytesIO(data))
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        if not 0 <= index < frames:
            raise NotTranscodable(f"frame {index + 1} does not exist ({frames} frames)")
        pixels = pydicom.pixels.pixel_array(ds, index=index)
    except NotTranscodable:
        raise
    except Exception as exc:
        raise NotTranscodable(f"cannot decode frame {index + 1}: {exc}") from exc
    return np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<"),
                                               copy=False).tobytes()


def _name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid
