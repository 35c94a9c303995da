"""Transfer syntax conversion for WADO-RS, with pydicom and the pylibjpeg / pyjpegls codecs.

Instances are archived as received. A client that asks for another transfer syntax gets the
instance (or frame) converted here: decompressed to Explicit VR Little Endian, or compressed to
one of the lossless syntaxes the installed encoders produce. It is the same instance in another
encoding: its SOP Instance UID stays (pydicom's ``compress`` and ``decompress`` would make up a
new one unless told not to). What cannot be produced raises ``NotTranscodable`` (HTTP 406 at
the edge).

Two ways. ``convert_stored`` reads a stored instance by byte range, never whole: its header,
then its pixel data a piece at a time (a compressed frame at a time by the offsets recorded at
ingest, decoded as it is sent), so a conversion holds one frame whatever the instance's size.
It covers the common conversions: compressed to uncompressed, Implicit to Explicit VR Little
Endian and back, and instances without pixel data. The rest (encoding to a compressed syntax,
big endian or deflated sources, frames without offsets) go through ``convert``, which takes
the whole Part 10 file in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder, get_encoder, pack_bits
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomweb.byteorder import WORD_SIZES, swap_words

UNCOMPRESSED = frozenset({str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)})
# What the installed encoders can write, lossless only: a viewer asking for these gets the
# same pixels, only smaller.
ENCODABLE = frozenset({str(RLELossless), str(JPEGLSLossless), str(JPEG2000Lossless)})
_JPEG = "1.2.840.10008.1.2.4."
# Compressed syntaxes that only hold lossy pixel data (PS3.5 A.4, PS3.6 Table A-1): JPEG
# processes other than the lossless ones, JPEG-LS near-lossless, MPEG-2/4 and HEVC video, JPEG
# XL recompressing a (lossy) JPEG. The server has the pixels only in that form; decoding them
# would not bring back what was lost (PS3.18 8.7.3.4).
LOSSY = frozenset(_JPEG + n for n in (
    "50", "51", "52", "53", "54", "55", "56", "59", "60", "61", "62", "63", "64", "81",
    "100", "100.1", "101", "101.1", "102", "102.1", "103", "103.1", "104", "104.1", "105",
    "105.1", "106", "106.1", "107", "108", "111"))
# Lossless or lossy as the encoder was set (JPEG 2000, HTJ2K, JPEG XL): the instance's Lossy
# Image Compression (0028,2110) says which.
LOSSLESS_OR_LOSSY = frozenset(_JPEG + n for n in ("91", "93", "112", "203"))
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # (Float, Double Float) Pixel Data
_NATIVE_VRS = {0x7FE00008: "OF", 0x7FE00009: "OD"}
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_PIECE = 1 << 20  # uncompressed pixel data is sent in pieces of this many bytes
_IMAGE_PIXEL = (0x00280002, 0x00280004, 0x00280006, 0x00280010, 0x00280011, 0x00280100,
                0x00280101, 0x00280102, 0x00280103)


class NotTranscodable(ValueError):
    """The instance cannot be delivered in the requested transfer syntax."""


class PixelDataTooLarge(NotTranscodable):
    """Decoded, the pixel data would not fit a DICOM value (PS3.18 8.7.3.4 lets such an
    instance go as stored when no transfer syntax was asked for)."""


def is_lossy(syntax: str) -> bool:
    """Whether pixel data in ``syntax`` can only be lossy compressed."""
    return syntax in LOSSY


def declares_lossy(ds: Dataset) -> bool:
    """Whether ``ds`` says its pixel data went through lossy compression (0028,2110)."""
    return str(ds.get("LossyImageCompression", "")).strip() == "01"


def is_compressed(syntax: str) -> bool:
    """Whether pixel data in ``syntax`` are encapsulated, a syntax pydicom does not know (JPEG
    XL, say) included."""
    try:
        return UID(syntax).is_compressed
    except ValueError:  # not a transfer syntax pydicom knows
        return True


def can_decode(syntax: str) -> bool:
    """Whether pixel data in ``syntax`` can be decoded here (an installed codec has it)."""
    if not is_compressed(syntax):
        return True
    try:
        return get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        return False


def can_produce(source: str, target: str) -> bool:
    """Whether ``source`` can be turned into ``target`` here (before trying)."""
    if source == target:
        return True
    if target in ENCODABLE:
        return get_encoder(target).is_available and can_decode(source)
    return target in UNCOMPRESSED and can_decode(source)


@dataclasses.dataclass(frozen=True)
class Converted:
    """An instance in another transfer syntax: its length, its bytes as they are made, and
    the syntax they are in (Explicit VR Little Endian for an instance without pixel data asked
    for in a compressed syntax, which only pixel data can have, PS3.5 A.4)."""

    length: int
    chunks: Iterable[bytes]
    syntax: str


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
    chunks. The data set (with the compressed pixel data) is held until the last chunk."""
    ds = pydicom.dcmread(BytesIO(data))
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return Converted(len(data), [data], target)
    if not can_produce(source, target):
        raise NotTranscodable(f"cannot convert {_name(source)} to {_name(target)}")
    try:
        if (target == str(ExplicitVRLittleEndian) and "PixelData" in ds
                and is_compressed(source) and ds.get("BitsAllocated") != 1):
            frames = _in_slot(get_decoder(ds.file_meta.TransferSyntaxUID).iter_array(
                ds, as_rgb=True), slot, _name(source))
            first = next(frames)  # started, the decoder holds the pixel data itself
            trailing = Dataset()
            for tag in [tag for tag in sorted(ds.keys()) if tag > 0x7FE00010]:
                trailing[tag] = ds.get_item(tag)  # as read, not decoded
                del ds[tag]
            del ds.PixelData
            return _decoded(ds, target, itertools.chain([first], frames),
                            _encoded(trailing, False))
        with slot():
            whole, made = _whole(ds, target)
        return Converted(len(whole), [whole], made)
    except NotTranscodable:
        raise
    except Exception as exc:  # codec missing, corrupt pixel data, unsupported photometric...
        raise NotTranscodable(
            f"cannot convert {_name(source)} to {_name(target)}: {exc}") from exc


def _whole(ds: Dataset, target: str) -> tuple[bytes, str]:
    """``ds`` converted in memory, all frames at once, and the syntax it is in."""
    _to_native(ds)
    if target in ENCODABLE and "PixelData" not in ds:
        target = str(ExplicitVRLittleEndian)  # PS3.5 A.4: no Pixel Data, nothing to encode
    if target in ENCODABLE:
        ds.compress(target, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = UID(target)
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True,
                     implicit_vr=target == str(ImplicitVRLittleEndian), little_endian=True)
    return out.getvalue(), target


def _in_slot(frames: Iterator, slot: Callable[[], AbstractContextManager],
             source: str) -> Iterator:
    """Decoded ``frames`` of a ``source`` instance, each decoded inside a ``slot()``."""
    for number in itertools.count(1):
        with slot():
            try:
                frame = next(frames)
            except StopIteration:
                return
            except Exception as exc:  # the codec's: corrupt data, unsupported...
                raise NotTranscodable(f"cannot convert {source}: frame {number}: {exc}"
                                      ) from exc
        yield frame


def _decoded(header: Dataset, target: str, frames: Iterator[tuple[np.ndarray, dict]],
             trailing: bytes) -> Converted:
    """An uncompressed instance made of ``header`` (the data set before the pixel data, which
    this adjusts), the decoded ``frames`` as they come (a frame that cannot be decoded raises
    ``NotTranscodable``), and the ``trailing`` elements (encoded in ``target``) that followed
    the pixel data: padding, signatures."""
    source = _name(str(header.file_meta.TransferSyntaxUID))
    frame_count = int(header.get("NumberOfFrames") or 1)
    first, image_pixel = next(frames)
    frame_size = first.nbytes
    value_length = frame_size * frame_count
    if value_length + 1 >= _UNDEFINED:
        raise PixelDataTooLarge(f"cannot convert {source}: decoded, the pixel data would be "
                                f"{value_length} bytes, more than a DICOM value can hold")
    bits_allocated = int(header.BitsAllocated)
    # What ``decompress`` changes besides the pixels (pydicom.pixels.utils.decompress).
    header.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if int(image_pixel["samples_per_pixel"]) > 1:
        header.PlanarConfiguration = int(image_pixel["planar_configuration"])
    if "NumberOfFrames" in header or frame_count > 1:
        header.NumberOfFrames = frame_count
    padding = b"\0" * (value_length % 2)
    head = _header_bytes(header, target) + _element_head(
        0x7FE00010, "OB" if bits_allocated <= 8 else "OW", value_length + len(padding), target)

    def chunks() -> Iterator[bytes]:
        yield head
        yield little_endian(first)
        sent = 1
        for frame, _ in frames:
            if frame.nbytes != frame_size:
                raise NotTranscodable(f"cannot convert {source}: frame {sent + 1} decodes to "
                                      f"{frame.nbytes} bytes, frame 1 to {frame_size}")
            yield little_endian(frame)
            sent += 1
        if sent != frame_count:
            raise NotTranscodable(f"cannot convert {source}: {sent} frames decoded of the "
                                  f"{frame_count} declared")
        yield padding + trailing

    length = len(head) + value_length + len(padding) + len(trailing)
    return Converted(length, chunks(), target)


# ---------------------------------------------------------------------------- by byte range


@dataclasses.dataclass(frozen=True)
class PixelElement:
    """Where the top-level pixel data element of a stored file is."""

    tag: int
    vr: str | None  # as written; None for implicit VR
    length: int  # of the value; 0xFFFFFFFF when encapsulated
    value_start: int

    @property
    def end(self) -> int | None:
        """Where the elements after it start; for encapsulated pixel data see
        ``StoredInstance.encapsulated_end``."""
        return None if self.length == _UNDEFINED else self.value_start + self.length


class StoredInstance:
    """A stored Part 10 file read by byte range, never whole: ``read(offset, length)``, its
    ``size``, its transfer ``syntax`` and the byte ranges of each frame recorded at ingest
    (``[offset, length, ...]`` per frame, the fragments of a compressed one)."""

    def __init__(self, read: Callable[[int, int], bytes], size: int, syntax: str,
                 frames: list[list[int]] | None = None) -> None:
        self.read, self.size, self.syntax, self.frames = read, size, syntax, frames

    @functools.cached_property
    def _parsed(self) -> tuple[Dataset, PixelElement | None]:
        reader = io.BufferedReader(_RangeReader(self.read, self.size), 256 * 1024)
        header = pydicom.dcmread(reader, stop_before_pixels=True)
        return header, self._pixel_element(reader.tell())

    @property
    def header(self) -> Dataset:
        """The data set (file meta included) up to the top-level pixel data, not included."""
        return self._parsed[0]

    @property
    def pixel(self) -> PixelElement | None:
        """The pixel data element, or None when the instance has none."""
        return self._parsed[1]

    def frame(self, index: int) -> bytes:
        """The stored bytes of frame ``index`` (0-based): its fragments, joined."""
        ranges = self.frames[index]
        pieces = [self.read(ranges[i], ranges[i + 1]) for i in range(0, len(ranges), 2)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _pixel_element(self, at: int) -> PixelElement | None:
        head = self.read(at, 12) if at + 8 <= self.size else b""
        if len(head) < 8:
            return None
        group, element = struct.unpack_from("<HH", head)
        tag = group << 16 | element
        if tag not in _PIXEL_TAGS:
            return None
        vr: str | None = None
        if self.syntax == str(ImplicitVRLittleEndian):
            (length,), value_start = struct.unpack_from("<I", head, 4), at + 8
        elif head[4:6].decode("latin-1") in _LONG_VRS:
            vr = head[4:6].decode("latin-1")
            (length,), value_start = struct.unpack_from("<I", head, 8), at + 12
        else:
            vr = head[4:6].decode("latin-1")
            (length,), value_start = struct.unpack_from("<H", head, 6), at + 8
        return PixelElement(tag, vr, length, value_start)

    def encapsulated_end(self) -> int | None:
        """Past the sequence delimiter that follows the last fragment of the last frame."""
        if not self.frames:
            return None
        last = max(ranges[i] + ranges[i + 1] for ranges in self.frames
                   for i in range(0, len(ranges), 2))
        return last + 8 if self.read(last, 8) == _SEQUENCE_DELIMITER else None


class _RangeReader(io.RawIOBase):
    """A read-only file over ``read(offset, length)``, for pydicom."""

    name = "<stored instance>"  # pydicom names the data set's file after its source

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read, self._size, self._position = read, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), max(0, self._size - self._position))
        data = self._read(self._position, wanted) if wanted else b""
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)


def convert_stored(stored: StoredInstance, target: str,
                   slot: Callable[[], AbstractContextManager] = contextlib.nullcontext
                   ) -> Converted | None:
    """``stored`` in transfer syntax ``target``, read by byte range as the chunks are taken,
    each decode inside a ``slot()``; None when it can only be converted whole (``convert``).

    Uncompressed pixel data is copied a piece at a time; compressed frames are read and
    decoded one at a time (the first one here, so an instance that cannot be decoded raises
    ``NotTranscodable`` before anything is sent). What is held is the header and one frame."""
    source = stored.syntax
    if not can_produce(source, target):
        raise NotTranscodable(f"cannot convert {_name(source)} to {_name(target)}")
    if source in (str(DeflatedExplicitVRLittleEndian), str(ExplicitVRBigEndian)):
        return None  # the pixel data cannot be found, or sent, without reading all before it
    header, pixel = stored.header, stored.pixel
    if target in ENCODABLE and (pixel is None or pixel.tag != 0x7FE00010):
        target = str(ExplicitVRLittleEndian)  # PS3.5 A.4: encapsulated only with Pixel Data
    if target not in UNCOMPRESSED:
        return None  # compressing takes the whole pixel data
    if pixel is None:  # the header is the whole data set
        body = _header_bytes(header, target)
        return Converted(len(body), [body], target)
    end = stored.encapsulated_end() if pixel.end is None else pixel.end
    if end is None or end > stored.size:
        return None  # the frames' fragments are not known
    trailing = _trailing(stored, end, target)
    if pixel.length != _UNDEFINED:  # native pixel data: the same bytes in either syntax
        return _native(stored, pixel, target, trailing)
    frame_count = int(header.get("NumberOfFrames") or 1)
    if (header.get("BitsAllocated") == 1 or frame_count < 1
            or len(stored.frames or ()) != frame_count):
        return None  # packed bits cross frames; or the frames' fragments are not known
    decode, name = frame_decoder(header), _name(source)

    def frames() -> Iterator[tuple[np.ndarray, dict]]:
        for index in range(frame_count):
            fragments = stored.frame(index)  # outside the slot (for CPU); storage errors as such
            with slot():
                try:
                    frame = decode(fragments)
                except Exception as exc:  # the codec's: corrupt data, unsupported...
                    raise NotTranscodable(f"cannot convert {name}: frame {index + 1}: {exc}"
                                          ) from exc
            yield frame

    return _decoded(header, target, frames(), trailing)


def _native(stored: StoredInstance, pixel: PixelElement, target: str,
            trailing: bytes) -> Converted:
    header = stored.header
    vr = pixel.vr or _NATIVE_VRS.get(pixel.tag) or (
        "OW" if int(header.get("BitsAllocated") or 8) > 8 else "OB")
    head = _header_bytes(header, target) + _element_head(pixel.tag, vr, pixel.length, target)

    def chunks() -> Iterator[bytes]:
        yield head
        for offset in range(pixel.value_start, pixel.value_start + pixel.length, _PIECE):
            wanted = min(_PIECE, pixel.value_start + pixel.length - offset)
            piece = stored.read(offset, wanted)
            if len(piece) != wanted:
                raise NotTranscodable(f"the stored file ends inside its pixel data, at "
                                      f"{offset + len(piece)} of {stored.size} bytes")
            yield piece
        yield trailing

    return Converted(len(head) + pixel.length + len(trailing), chunks(), target)


def _trailing(stored: StoredInstance, start: int, target: str) -> bytes:
    """The elements after the pixel data (padding, signatures), encoded as in ``target``."""
    raw = stored.read(start, stored.size - start) if start < stored.size else b""
    implicit = stored.syntax == str(ImplicitVRLittleEndian)
    if not raw or implicit == (target == str(ImplicitVRLittleEndian)):
        return raw
    return _encoded(read_dataset(BytesIO(raw), implicit, True), target == str(
        ImplicitVRLittleEndian))


def _encoded(elements: Dataset, implicit: bool) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, elements)
    return out.getvalue()


def _header_bytes(header: Dataset, target: str) -> bytes:
    """``header`` (no pixel data) as the start of a Part 10 file in ``target``."""
    header.file_meta.TransferSyntaxUID = UID(target)
    out = BytesIO()
    pydicom.dcmwrite(out, header, enforce_file_format=True,
                     implicit_vr=target == str(ImplicitVRLittleEndian), little_endian=True)
    return out.getvalue()


def _element_head(tag: int, vr: str, length: int, target: str) -> bytes:
    if target == str(ImplicitVRLittleEndian):
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)


def frame_decoder(header: Dataset) -> Callable[[bytes], tuple[np.ndarray, dict]]:
    """A decoder of the compressed frames of an instance whose data set (up to its pixel data)
    is ``header``: ``decode(fragments)`` gives the frame as an array (colour as RGB) and
    pydicom's description of it, or raises what the codec raises. ``NotTranscodable`` when no
    codec here decodes the instance's syntax."""
    one = Dataset()
    for tag in _IMAGE_PIXEL:  # copies: converting, the header takes the decoded colours
        if tag in header:
            one.add_new(tag, header[tag].VR, header[tag].value)
    one.file_meta = pydicom.dataset.FileMetaDataset()
    one.file_meta.TransferSyntaxUID = header.file_meta.TransferSyntaxUID
    source = _name(str(header.file_meta.TransferSyntaxUID))
    if not can_decode(str(header.file_meta.TransferSyntaxUID)):
        raise NotTranscodable(f"cannot decode {source}: no codec for it is installed")
    decoder = get_decoder(header.file_meta.TransferSyntaxUID)

    def decode(fragments: bytes) -> tuple[np.ndarray, dict]:
        one.PixelData = pydicom.encaps.encapsulate([fragments])
        try:
            return decoder.as_array(one, as_rgb=True)
        finally:
            del one.PixelData

    return decode


# ---------------------------------------------------------------------------- helpers


def little_endian(frame: np.ndarray) -> bytes:
    """A decoded frame as native little-endian pixel bytes."""
    return np.ascontiguousarray(frame).astype(frame.dtype.newbyteorder("<"),
                                              copy=False).tobytes()


def _to_native(ds: Dataset) -> None:
    """Make ``ds`` (read from a Part 10 file) an Explicit VR Little Endian data set with native
    pixel data, all frames at once; the same instance. Raises what pydicom's codecs raise."""
    source = str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" in ds and is_compressed(source):
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


def _swap_binary_values(ds: Dataset) -> None:
    """Big to little endian for the raw binary values pydicom leaves as bytes (pydicom converts
    numbers it decodes, such as US and FL, by itself). Pixel Data follows Bits Allocated."""
    for elem in ds.iterall():
        size = WORD_SIZES.get(elem.VR)
        if elem.tag == 0x7FE00010:
            size = _pixel_word_size(ds, elem.VR)
        if size and size > 1 and isinstance(elem.value, bytes) and len(elem.value) % size == 0:
            elem.value = swap_words(elem.value, size)


def _pixel_word_size(ds: Dataset, vr: str) -> int:
    """Bytes per word of Big Endian Pixel Data: its pixels' (Bits Allocated), or, 8-bit in OW,
    16-bit words holding two pixels each, swapped as pydicom reads them (PS3.5 7.3)."""
    bits = int(ds.get("BitsAllocated") or 8)
    return 2 if bits == 8 and vr == "OW" else bits // 8


def _pack_single_bits(ds: Dataset) -> None:
    """1-bit images (segmentations) decompressed one byte per pixel: pack them (PS3.5 8.1.1)."""
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) \
        * int(ds.get("NumberOfFrames") or 1)
    if len(ds.PixelData) >= pixels:  # unpacked: one byte per pixel
        ds.PixelData = pack_bits(np.frombuffer(ds.PixelData[:pixels], np.uint8))


def native_frame(ds: Dataset, index: int) -> bytes:
    """Frame ``index`` (0-based) of the data set ``ds`` (pixel data included) as native
    little-endian pixel bytes.

    Uncompressed pixel data give the stored frame's bytes, only swapped to little endian (PS3.18
    8.7.3.5, PS3.5 8.2): the stored Planar Configuration and Photometric Interpretation, the
    bits above Bits Stored as they are, a 1-bit frame packed and started on a byte, which is
    what the metadata describes. Compressed pixel data are decoded as ``frame_decoder`` does."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        if not 0 <= index < frames:
            raise NotTranscodable(f"frame {index + 1} does not exist ({frames} frames)")
        if not is_compressed(str(ds.file_meta.TransferSyntaxUID)):
            return _stored_frame(ds, index)
        pixels = pydicom.pixels.pixel_array(ds, index=index)
    except NotTranscodable:
        raise
    except Exception as exc:
        raise NotTranscodable(f"cannot decode frame {index + 1}: {exc}") from exc
    return little_endian(pixels)


def _stored_frame(ds: Dataset, index: int) -> bytes:
    """Frame ``index`` of the uncompressed pixel data of ``ds``, in little endian byte order."""
    keyword = next(k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
    element = ds[keyword]
    value = element.value
    bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword) or int(
        ds.BitsAllocated)
    frame_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * bits
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":  # 2 chroma samples per 2 pixels
        frame_bits = frame_bits * 2 // 3
    start, end = index * frame_bits, (index + 1) * frame_bits
    if end > len(value) * 8:
        raise NotTranscodable(f"the pixel data ends inside frame {index + 1}: {len(value)} "
                              f"bytes, {(end + 7) // 8} needed")
    if start % 8 or end % 8:  # 1-bit frames that share bytes (PS3.5 8.1.1): re-pack this one
        bits_of = np.unpackbits(np.frombuffer(value, np.uint8, (end + 7) // 8 - start // 8,
                                              start // 8), bitorder="little")
        return np.packbits(bits_of[start % 8:start % 8 + frame_bits],
                           bitorder="little").tobytes()
    if ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian:
        return bytes(value[start // 8:end // 8])
    if bits == 8 and element.VR == "OW":  # 16-bit words: a frame may start inside one
        first = start // 8 - start // 8 % 2
        words = swap_words(bytes(value[first:end // 8 + end // 8 % 2]), 2)
        return words[start // 8 - first:][:frame_bits // 8]
    return swap_words(bytes(value[start // 8:end // 8]), bits // 8)


def _name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid
