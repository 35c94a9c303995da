"""Transfer syntax conversion for WADO-RS, with pydicom and the pylibjpeg / pyjpegls codecs.

Instances are archived as received. A client that asks for another transfer syntax gets the
instance (or frame) converted here: decompressed to Explicit VR Little Endian, or compressed to
one of the lossless syntaxes the installed encoders produce. What cannot be produced raises
``NotTranscodable`` (HTTP 406 at the edge).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

EXPLICIT_LE = str(ExplicitVRLittleEndian)
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
        _to_native(ds, source)
        if target in ENCODABLE:
            if "PixelData" not in ds:
                raise NotTranscodable(f"{_name(target)} needs pixel data; the instance has none")
            ds.compress(target)
        else:
            ds.file_meta.TransferSyntaxUID = UID(target)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True,
                   implicit_vr=target == str(ImplicitVRLittleEndian), little_endian=True)
        return out.getvalue()
    except NotTranscodable:
        raise
    except Exception as exc:  # codec missing, corrupt pixel data, unsupported photometric...
        raise NotTranscodable(
            f"cannot convert {_name(source)} to {_name(target)}: {exc}") from exc


def _to_native(ds: Dataset, source: str) -> None:
    """Make ``ds`` an Explicit VR Little Endian data set with native pixel data."""
    if "PixelData" in ds and UID(source).is_compressed:
        ds.decompress()  # sets Explicit VR Little Endian
        return
    if source == str(ExplicitVRBigEndian) and "PixelData" in ds:
        pixels = ds.pixel_array
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


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
