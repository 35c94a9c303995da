"""Transfer syntax conversion for WADO-RS, with pydicom and the pylibjpeg / pyjpegls codecs.

Instances are archived as received. A client that asks for another transfer syntax gets the
instance (or frame) converted here: decompressed to Explicit VR Little Endian, or compressed to
one of the lossless syntaxes the installed encoders produce. It is the same instance in another
encoding: its SOP Instance UID stays (pydicom's ``compress`` and ``decompress`` would make up a
new one unless told not to). What cannot be produced raises ``NotTranscodable`` (HTTP 406 at
the edge).
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder, pack_bits
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


@dataclasses.dataclass(frozen=True)
class Converted:
    """An instance in another transfer syntax: its length, and its bytes as they are made."""

    length: int
    chunks: Iterable[bytes]


def transcode(data: bytes, target: str) -> bytearray:
    """The Part 10 ``data`` re-encoded in transfer syntax ``target``, whole: gathered into
    one buffer of the known length as it is made (a join, or bytes of it, would hold every
    frame twice)."""
    converted = convert(data, target)
    out = bytearray(converted.length)
    at = 0
    for chunk in converted.chunks:
        out[at:at + len(chunk)] = chunk
        at += len(chunk)
    if at != converted.length:
        raise NotTranscodable(f"cannot convert to {_name(target)}: {at} bytes made of the "
                              f"{converted.length} announced")
    return out


def convert(data: bytes, target: str,
            slot: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Converted:
    """The Part 10 ``data`` in transfer syntax ``target``, each decode inside a ``slot()``.

    Compressed pixel data going to Explicit VR Little Endian (the DICOMweb default, and what
    C-MOVE peers that take nothing compressed get) is decoded a frame at a time as the chunks
    are read: a 300-frame instance took 2.5 times its decoded size in memory at once. The first
    frame is decoded here, so an instance that cannot be decoded at all raises
    ``NotTranscodable`` before anything is sent; a later frame that fails raises it from the
    chunks."""
    ds = pydicom.dcmread(BytesIO(data))
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return Converted(len(data), [data])
    if not can_produce(source, target):
        raise NotTranscodable(f"cannot convert {_name(source)} to {_name(target)}")
    try:
        if (target == str(ExplicitVRLittleEndian) and "PixelData" in ds
                and UID(source).is_compressed and ds.get("BitsAllocated") != 1):
            return _decoded_frame_by_frame(ds, slot)
        with slot():
            whole = _whole(ds, target)
        return Converted(len(whole), [whole])
    except NotTranscodable:
        raise
    except Exception as exc:  # codec missing, corrupt pixel data, unsupported photometric...
        raise NotTranscodable(
            f"cannot convert {_name(source)} to {_name(target)}: {exc}") from exc


def _whole(ds: Dataset, target: str) -> bytes:
    """``ds`` converted in memory, all frames at once."""
    _to_native(ds)
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


def _decoded_frame_by_frame(ds: Dataset, slot: Callable[[], AbstractContextManager]
                            ) -> Converted:
    """Compressed ``ds`` as Explicit VR Little Endian, its frames decoded as they are sent:
    the data set as pydicom's ``decompress`` leaves it, then the Pixel Data element's header,
    the frames, and the elements that followed the pixel data (padding, signatures)."""
    source = _name(str(ds.file_meta.TransferSyntaxUID))
    frame_count = int(ds.get("NumberOfFrames") or 1)
    frames = get_decoder(ds.file_meta.TransferSyntaxUID).iter_array(ds, as_rgb=True)
    with slot():
        first, image_pixel = next(frames)
    frame_size = first.nbytes
    value_length = frame_size * frame_count
    if value_length + 1 >= 2**32 - 1:
        raise NotTranscodable(f"cannot convert {source}: decoded, the pixel data would be "
                              f"{value_length} bytes, more than a DICOM value can hold")
    trailing = Dataset()
    for tag in [tag for tag in sorted(ds.keys()) if tag > 0x7FE00010]:  # as read, not decoded
        trailing[tag] = ds.get_item(tag)
        del ds[tag]
    bits_allocated = int(ds.BitsAllocated)
    del ds.PixelData
    # What ``decompress`` changes besides the pixels (pydicom.pixels.utils.decompress).
    ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if int(image_pixel["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
    if "NumberOfFrames" in ds or frame_count > 1:
        ds.NumberOfFrames = frame_count
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = BytesIO()
    pydicom.dcmwrite(head, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    padding = b"\0" * (value_length % 2)
    head.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB" if bits_allocated <= 8 else b"OW",
                           0, value_length + len(padding)))
    tail = DicomBytesIO()
    tail.is_little_endian, tail.is_implicit_VR = True, False
    write_dataset(tail, trailing)

    def chunks() -> Iterator[bytes]:
        yield head.getvalue()
        yield _little_endian(first)
        sent = 1
        while True:
            with slot():
                try:
                    frame, _ = next(frames)
                except StopIteration:
                    break
                except Exception as exc:
                    raise NotTranscodable(
                        f"cannot convert {source}: frame {sent + 1}: {exc}") from exc
            if frame.nbytes != frame_size:
                raise NotTranscodable(f"cannot convert {source}: frame {sent + 1} decodes to "
                                      f"{frame.nbytes} bytes, frame 1 to {frame_size}")
            yield _little_endian(frame)
            sent += 1
        if sent != frame_count:
            raise NotTranscodable(f"cannot convert {source}: {sent} frames decoded of the "
                                  f"{frame_count} declared")
        yield padding + tail.getvalue()

    length = len(head.getvalue()) + value_length + len(padding) + len(tail.getvalue())
    return Converted(length, chunks())


def _little_endian(frame: np.ndarray) -> bytes:
    return np.ascontiguousarray(frame).astype(frame.dtype.newbyteorder("<"),
                                              copy=False).tobytes()


def _to_native(ds: Dataset) -> None:
    """Make ``ds`` (read from a Part 10 file) an Explicit VR Little Endian data set with native
    pixel data, all frames at once; the same instance. Raises what pydicom's codecs raise."""
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
