"""WADO-RS instances without a server: the representation an Accept header chooses
(``dicomweb.wado.choose_instance_media``), and the parts (``instance_parts``) from each blob
store: from S3 the instances are read a few ahead, from files streamed; either way every part
carries its own instance, whatever the writer skips."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pack_bits

from dicomweb import slots, transcode, wado
from dicomweb.byteorder import swap_words
from dicomweb.media import NotAcceptable, parse_accept
from storage.attributes import Level
from storage.query import Query, find
from tests.compare import DECOMPRESSED_PIXEL_MODULE, assert_same_data_set
from tests.factory import Spec, dataset, instance, part10

DICOM_PARTS = 'multipart/related; type="application/dicom"'
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# An uncompressed instance: convertible to RLE, not to lossy JPEG.
ROWS = [{"SOPInstanceUID": "1.2.3", "_transfer_syntax_uid": "1.2.840.10008.1.2.1"}]


@pytest.mark.parametrize(("accept", "level", "syntax", "single_part"), [
    ("application/dicom", Level.INSTANCE, "1.2.840.10008.1.2.1", True),
    (f"application/dicom; transfer-syntax={RLE}", Level.INSTANCE, RLE, True),
    ("application/dicom; transfer-syntax=*", Level.INSTANCE, "*", True),
    (f"{DICOM_PARTS}; transfer-syntax=*", Level.INSTANCE, "*", False),
    (f"{DICOM_PARTS}, application/dicom;q=0.5", Level.INSTANCE, "1.2.840.10008.1.2.1", False),
    (f"{DICOM_PARTS};q=0.5, application/dicom; transfer-syntax=*", Level.INSTANCE, "*", True),
    # A single part entry is passed over for a study or series, not refused.
    (f"application/dicom, {DICOM_PARTS}; transfer-syntax={RLE};q=0.2", Level.SERIES, RLE,
     False),
    ("application/dicom, */*;q=0.1", Level.STUDY, "1.2.840.10008.1.2.1", False),
    (None, Level.STUDY, "1.2.840.10008.1.2.1", False),
])
def test_accept_chooses_single_part_only_for_an_instance(accept, level, syntax, single_part):
    chosen = wado.choose_instance_media(parse_accept(accept), level, ROWS)
    assert chosen == wado.InstanceMedia(syntax, single_part)


@pytest.mark.parametrize(("accept", "syntax", "single_part"), [
    (f"application/dicom; transfer-syntax={JPEG_BASELINE}, "
     "application/dicom; transfer-syntax=*;q=0.5", "*", True),
    (f"{DICOM_PARTS}; transfer-syntax={JPEG_BASELINE}, {DICOM_PARTS}; transfer-syntax={RLE};"
     "q=0.3", RLE, False),
])
def test_an_entry_that_cannot_be_produced_gives_way_to_the_next(accept, syntax, single_part):
    chosen = wado.choose_instance_media(parse_accept(accept), Level.INSTANCE, ROWS)
    assert chosen == wado.InstanceMedia(syntax, single_part)
    with pytest.raises(NotAcceptable, match="cannot be converted"):
        wado.choose_instance_media(parse_accept(f"{DICOM_PARTS}; transfer-syntax="
                                                f"{JPEG_BASELINE}"), Level.INSTANCE, ROWS)


@pytest.mark.parametrize("level", [Level.STUDY, Level.SERIES])
def test_only_single_part_for_a_study_or_series_is_not_acceptable(level):
    with pytest.raises(NotAcceptable, match=f'for a {level.name.lower()} ask for '
                                            'multipart/related; type="application/dicom"'):
        wado.choose_instance_media(parse_accept("application/dicom;q=0.9"), level, ROWS)


@pytest.mark.parametrize("backend_name", ["sqlite-files", "sqlite-s3"])
def test_each_part_carries_its_own_instance(backend_name, make_backend):
    archive = make_backend(backend_name).open()
    try:
        study = Spec()
        datas = {}
        for number in range(1, 8):
            data = instance(Spec(study_uid=study.study_uid, series_uid=study.series_uid,
                                 instance_number=number, rows=64, columns=64))
            datas[archive.store(data).sop_instance_uid] = data
        rows = find(archive.index, Query(Level.INSTANCE, {"StudyInstanceUID": study.study_uid}))
        assert archive.blobs.remote is backend_name.endswith("s3")

        parts = list(wado.instance_parts(archive, rows, "*"))  # as the app does: all at once
        assert len(parts) == 7
        # The writer sends some parts and never gets to others (a client gone, say).
        for index in (0, 1, 4, 6):
            sent = b"".join(parts[index].chunks)
            assert sent == datas[rows[index]["SOPInstanceUID"]]
            assert parts[index].headers["Content-Length"] == str(len(sent))
    finally:
        archive.close()


def _rle_frames(frames: list[bytes]) -> tuple[bytes, np.ndarray]:
    """A 6-frame 8x8 16-bit RLE Lossless instance with Data Set Trailing Padding after its
    pixel data, and its pixels; ``frames`` replaces the encoded fragments when given."""
    ds = dataset()
    pixels = (np.arange(6 * 64, dtype=np.uint16) * 7).reshape(6, 8, 8)
    ds.NumberOfFrames = 6
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.compress(RLE, pixels, generate_instance_uid=False)
    if frames:
        ds.PixelData = encapsulate(frames)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)
    return part10(ds, RLE), pixels


def test_decompressing_decodes_a_frame_at_a_time_as_it_is_sent():
    """Explicit VR Little Endian from compressed (the DICOMweb default) held every frame
    decoded at once, 2.5 times the decoded size; now one frame, decoded as the writer asks."""
    data, pixels = _rle_frames([])
    decodes = []
    converted = transcode.convert(data, EXPLICIT_LE, slot=lambda: _Counting(decodes))
    assert len(decodes) == 1  # the first frame, so an undecodable instance fails up front
    chunks = iter(converted.chunks)
    sent = next(chunks) + next(chunks)  # header, frame 1
    assert len(decodes) == 1
    sent += b"".join(chunks)
    assert len(decodes) == 1 + 6  # the end is found by asking for one more
    assert len(sent) == converted.length
    received = pydicom.dcmread(io.BytesIO(sent))
    original = pydicom.dcmread(io.BytesIO(data))
    assert received.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(received.pixel_array, pixels)
    assert_same_data_set(received, original, "rle", ignore=DECOMPRESSED_PIXEL_MODULE)
    assert received[0xFFFCFFFC].value == b"\0" * 16  # what followed the pixels still does
    assert sent == transcode.transcode(data, EXPLICIT_LE)


def test_a_frame_that_cannot_be_decoded_stops_the_conversion_there():
    good, _ = _rle_frames([])
    fragments = [fragment for fragment in generate_frames(
        pydicom.dcmread(io.BytesIO(good)).PixelData, number_of_frames=6)]
    fragments[3] = b"\x07" + bytes(63)  # an RLE header claiming 7 segments of nothing
    data, _ = _rle_frames(fragments)
    converted = transcode.convert(data, EXPLICIT_LE)
    with pytest.raises(transcode.NotTranscodable, match="frame 4"):
        b"".join(converted.chunks)
    broken_first, _ = _rle_frames([fragments[3], *fragments[1:]])
    with pytest.raises(transcode.NotTranscodable, match="RLE Lossless"):
        transcode.convert(broken_first, EXPLICIT_LE)  # before anything is sent


class _Counting:
    def __init__(self, entered: list) -> None:
        self.entered = entered

    def __enter__(self) -> None:
        self.entered.append(1)

    def __exit__(self, *exc) -> None:
        return None


# ---------------------------------------------------------------------------- transfer syntaxes


SR_ROW = {"SOPInstanceUID": "1.2.9", "_transfer_syntax_uid": EXPLICIT_LE, "_frames": None}


def _row(syntax: str, **more) -> dict:
    return {"SOPInstanceUID": "1.2.4", "_transfer_syntax_uid": syntax, "Rows": 8,
            "_frames": "[[0, 8]]", **more}


@pytest.mark.parametrize(("stored", "asked", "sent"), [
    (JPEG_BASELINE, None, JPEG_BASELINE),  # lossy: the server has nothing better
    ("1.2.840.10008.1.2.4.51", None, "1.2.840.10008.1.2.4.51"),
    ("1.2.840.10008.1.2.4.81", None, "1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
    ("1.2.840.10008.1.2.4.102", None, "1.2.840.10008.1.2.4.102"),  # MPEG-4 video
    ("1.2.840.10008.1.2.4.91", None, None),  # JPEG 2000: its Lossy Image Compression says
    (RLE, None, EXPLICIT_LE),
    ("1.2.840.10008.1.2", None, EXPLICIT_LE),
    (JPEG_BASELINE, EXPLICIT_LE, EXPLICIT_LE),  # asked for: decoded
    (JPEG_BASELINE, "*", JPEG_BASELINE),
])
def test_without_a_syntax_asked_lossy_pixel_data_goes_as_stored(stored, asked, sent):
    assert wado.part_syntax(_row(stored), asked) == sent


def test_pixel_data_too_large_decoded_goes_as_stored_by_default():
    """Review: 8.7.3.4 note 2 and the docs send such an instance as stored by default, but the
    check before sending refused it (406), and with it the whole study."""
    cine = _row(RLE, Rows=1024, Columns=1024, NumberOfFrames=2048, BitsAllocated=16)
    assert wado.part_syntax(cine, None) == RLE
    wado.check_transcodable([cine, _row(RLE)], None)  # no 406
    assert wado.common_syntax([cine, _row(RLE)], None) is None  # parts differ
    with pytest.raises(NotAcceptable, match="cannot be converted"):
        wado.check_transcodable([cine], EXPLICIT_LE)  # asked for by name: refused


def test_an_instance_without_pixel_data_asked_in_a_compressed_syntax_is_explicit_le():
    assert wado.part_syntax(SR_ROW, RLE) == EXPLICIT_LE
    assert wado.part_syntax(_row(EXPLICIT_LE), RLE) == RLE
    wado.check_transcodable([SR_ROW, _row(EXPLICIT_LE)], RLE)  # no 406 for the study
    assert wado.common_syntax([SR_ROW, _row(EXPLICIT_LE)], RLE) is None  # parts differ
    assert wado.common_syntax([_row(EXPLICIT_LE), _row(JPEG_BASELINE)], RLE) == RLE


@pytest.mark.parametrize(("rows", "syntax"), [
    ([_row(JPEG_BASELINE)], JPEG_BASELINE),  # the answer is labelled with what every part is
    ([_row(EXPLICIT_LE), _row(RLE), SR_ROW], EXPLICIT_LE),
    ([_row(JPEG_BASELINE), _row(RLE)], None),  # parts differ: each names its own
])
def test_the_default_answer_names_one_syntax_only_when_every_part_has_it(rows, syntax):
    assert wado.choose_instance_media(parse_accept(None), Level.STUDY, rows) == \
        wado.InstanceMedia(syntax, single_part=False)


def test_a_lossless_syntax_no_codec_here_decodes_is_refused_before_sending():
    jpeg_xl_lossless = _row("1.2.840.10008.1.2.4.110")
    with pytest.raises(NotAcceptable, match="transfer-syntax=\\*"):
        wado.choose_instance_media(parse_accept(None), Level.STUDY,
                                   [_row(EXPLICIT_LE), jpeg_xl_lossless])
    assert wado.choose_instance_media(parse_accept(f"{DICOM_PARTS}; transfer-syntax=*"),
                                      Level.STUDY, [jpeg_xl_lossless]).syntax == "*"


def _rle_instance(frames: int, size: int) -> tuple[bytes, np.ndarray]:
    """An RLE Lossless instance of noise (RLE cannot shrink it)."""
    ds = dataset()
    pixels = np.random.default_rng(1).integers(0, 4096, (frames, size, size), dtype=np.uint16)
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.compress(RLE, pixels, generate_instance_uid=False)
    return part10(ds, RLE), pixels


def _reads(archive) -> list[int]:
    """Lengths of what the blob store is asked for from now on; reading a blob whole fails."""
    lengths, get_range = [], archive.blobs.get_range

    def counted(key: str, offset: int, length: int) -> bytes:
        lengths.append(length)
        return get_range(key, offset, length)

    def whole(key: str) -> bytes:
        raise AssertionError(f"{key} read whole")

    archive.blobs.get_range, archive.blobs.get = counted, whole
    return lengths


def test_a_converted_instance_is_read_a_frame_at_a_time_never_whole(archive):
    data, pixels = _rle_instance(frames=12, size=256)  # 1.6 MB: read by range
    archive.store(data)
    rows = find(archive.index, Query(Level.INSTANCE, {}))
    reads = _reads(archive)

    (part,) = wado.instance_parts(archive, rows, None)
    sent = b"".join(part.chunks)

    assert part.content_type == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert int(part.headers["Content-Length"]) == len(sent)
    assert sent == transcode.transcode(data, EXPLICIT_LE)
    assert np.array_equal(pydicom.dcmread(io.BytesIO(sent)).pixel_array, pixels)
    assert max(reads) <= 256 * 1024 + 256  # the header's buffer, or one frame's fragment


def test_frames_are_decoded_from_their_own_fragments(archive):
    data, pixels = _rle_instance(frames=12, size=256)
    archive.store(data)
    (row,) = find(archive.index, Query(Level.INSTANCE, {}))
    reads = _reads(archive)

    frames = list(wado.frame_bytes(archive, row, [12, 3], EXPLICIT_LE))

    assert frames == [pixels[11].tobytes(), pixels[2].tobytes()]
    assert len(reads) == 1 + 1 + 2  # the header, where the pixel data starts, two frames


def test_a_conversion_that_needs_the_whole_instance_holds_a_slot_until_it_is_sent(archive):
    archive.store(instance(Spec(rows=64, columns=64)))
    rows = find(archive.index, Query(Level.INSTANCE, {}))
    free = slots.WHOLE_INSTANCE_SLOTS._value

    (part,) = wado.instance_parts(archive, rows, RLE)  # encoding: the whole instance
    assert slots.WHOLE_INSTANCE_SLOTS._value == free - 1
    chunks = iter(part.chunks)
    next(chunks)
    assert slots.WHOLE_INSTANCE_SLOTS._value == free - 1
    list(chunks)
    assert slots.WHOLE_INSTANCE_SLOTS._value == free
    assert part.content_type == f"application/dicom; transfer-syntax={RLE}"

    unsent = list(wado.instance_parts(archive, rows, RLE))  # a client gone before the body
    assert slots.WHOLE_INSTANCE_SLOTS._value == free - 1
    del unsent
    assert slots.WHOLE_INSTANCE_SLOTS._value == free


# ---------------------------------------------------------------------------- media ranges
# RFC 9110 12.5.1: type/* is every subtype of type; only */* is any type.


@pytest.mark.parametrize(("accept", "level", "single_part"), [
    ("application/*", Level.INSTANCE, True),
    ("multipart/*", Level.INSTANCE, False),
    ("multipart/*", Level.STUDY, False),
    ('multipart/related; type="application/*"', Level.SERIES, False),
    ("text/*, multipart/*;q=0.5", Level.SERIES, False),
])
def test_media_ranges_choose_the_representation_of_instances(accept, level, single_part):
    chosen = wado.choose_instance_media(parse_accept(accept), level, ROWS)
    assert chosen == wado.InstanceMedia(EXPLICIT_LE, single_part)


@pytest.mark.parametrize("accept", ["application/*", "text/*", 'multipart/*; type="image/*"'])
def test_media_ranges_without_a_producible_type_for_a_series_are_not_acceptable(accept):
    with pytest.raises(NotAcceptable):
        wado.choose_instance_media(parse_accept(accept), Level.SERIES, ROWS)


@pytest.mark.parametrize(("accept", "stored", "chosen"), [
    ("application/*", EXPLICIT_LE, ("application/octet-stream", EXPLICIT_LE)),
    ("multipart/*", EXPLICIT_LE, ("application/octet-stream", EXPLICIT_LE)),
    ("multipart/*; transfer-syntax=*", RLE, ("application/octet-stream", RLE)),
    ('multipart/related; type="image/*"', RLE, ("image/dicom-rle", RLE)),
    ("image/*", JPEG_BASELINE, ("image/jpeg", JPEG_BASELINE)),
])
def test_media_ranges_choose_the_type_of_frames(accept, stored, chosen):
    assert wado.choose_frame_syntax(parse_accept(accept), stored) == chosen


def test_frames_of_a_type_not_in_a_media_range_are_not_acceptable():
    with pytest.raises(NotAcceptable):
        wado.choose_frame_syntax(parse_accept("image/*"), EXPLICIT_LE)


# ---------------------------------------------------------------------------- pixel data bulk


def test_pixel_data_bulk_value_is_read_by_range_alone(archive):
    native = dataset(Spec(rows=64, columns=64, frames=2))
    rle_data, _ = _rle_instance(frames=3, size=32)
    for data in (part10(native), rle_data):
        archive.store(data)
    rows = {row["_transfer_syntax_uid"]: row for row in find(
        archive.index, Query(Level.INSTANCE, {}, with_header=True))}
    reads = _reads(archive)

    native_value = wado.bulk_bytes(archive, rows[EXPLICIT_LE], "path/7FE00010")
    native_reads, reads[:] = list(reads), []
    rle_value = wado.bulk_bytes(archive, rows[RLE], "path/7fe00010")

    assert native_value == native.PixelData
    assert native_reads == [12, len(native.PixelData)]  # its element header, then its value
    assert rle_value == pydicom.dcmread(io.BytesIO(rle_data)).PixelData
    assert len(reads) == 2 and reads[1] == len(rle_value)  # before the table, then the items


def test_whole_instance_conversions_past_the_waiters_allowed_are_refused_at_once():
    """Review: each request waiting for a whole-instance slot held a thread of the pool all
    requests share, up to 120 s; forty of them starved the conversions holding the slots (which
    need the pool to send) and every other route. Past the waiters allowed: 503 at once."""
    import threading
    import time

    held = [slots.whole_instance_slot() for _ in range(slots.WHOLE_INSTANCE_SLOTS._initial_value)]
    got: list[object] = []
    waiters = [threading.Thread(target=lambda: got.append(slots.whole_instance_slot()))
               for _ in range(slots.WHOLE_INSTANCE_WAITERS)]
    try:
        for waiter in waiters:
            waiter.start()
        time.sleep(0.3)  # all waiting now
        started = time.monotonic()
        with pytest.raises(slots.ConversionBusy, match="more are waiting"):
            slots.whole_instance_slot()
        assert time.monotonic() - started < 0.5
    finally:
        for release in held:
            release()
        for _ in waiters:  # each waiter takes a slot as one is given back: give those back too
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
            got.pop()()
        for waiter in waiters:
            waiter.join(10)
    assert slots.WHOLE_INSTANCE_SLOTS._value == slots.WHOLE_INSTANCE_SLOTS._initial_value


# ---------------------------------------------------------------------------- native frames
# PS3.18 8.7.3.5, PS3.5 8.2: a frame in an uncompressed syntax is the stored frame's bytes,
# only in Little Endian byte order; the metadata (Planar Configuration, Photometric
# Interpretation, Bits Allocated 1) describes those bytes, not pydicom's decoded array.
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _stored_frames(make_backend, data: bytes, numbers: list[int]) -> list[bytes]:
    archive = make_backend("sqlite-files").open()
    try:
        archive.store(data)
        (row,) = find(archive.index, Query(Level.INSTANCE, {}))
        return list(wado.frame_bytes(archive, row, numbers, EXPLICIT_LE))
    finally:
        archive.close()


def test_a_frame_of_a_big_endian_planar_rgb_instance_keeps_its_planes(corpus, make_backend):
    path = corpus / "pypi-pydicom-3.0.2" / "test_files" / "ExplVR_BigEnd.dcm"
    ds = pydicom.dcmread(path)
    assert (ds.PlanarConfiguration, ds.BitsAllocated, ds.SamplesPerPixel) == (1, 8, 3)

    (frame,) = _stored_frames(make_backend, path.read_bytes(), [1])

    assert frame == ds.PixelData  # 8-bit: the stored bytes, red plane, green, blue
    assert frame != ds.pixel_array.tobytes()  # not pydicom's pixel-interleaved array


def _planar_rgb(frames: int, rows: int, columns: int, bits: int) -> tuple[Dataset, np.ndarray]:
    """An RGB instance with Planar Configuration 1, and its pixels as (frame, plane, row,
    column)."""
    ds = dataset(Spec(rows=rows, columns=columns, frames=frames))
    dtype = np.uint8 if bits == 8 else np.uint16
    planes = (np.arange(frames * 3 * rows * columns) * 37 % (1 << bits)).astype(dtype).reshape(
        frames, 3, rows, columns)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 1
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.NumberOfFrames = frames
    return ds, planes


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, BIG_ENDIAN, DEFLATED])
@pytest.mark.parametrize("bits", [8, 16])
def test_native_frames_are_the_stored_frames_little_endian_whatever_the_syntax(
        syntax, bits, make_backend):
    ds, planes = _planar_rgb(frames=3, rows=5, columns=7, bits=bits)
    order = ">" if syntax == BIG_ENDIAN else "<"
    ds.PixelData = planes.astype(planes.dtype.newbyteorder(order)).tobytes()
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"

    frames = _stored_frames(make_backend, part10(ds, syntax), [3, 1])

    assert frames == [planes[2].astype(planes.dtype.newbyteorder("<")).tobytes(),
                      planes[0].astype(planes.dtype.newbyteorder("<")).tobytes()]


def test_8_bit_big_endian_frames_in_ow_words_come_back_in_pixel_order(make_backend):
    """Big Endian OW holds 8-bit pixels two to a 16-bit word: each pair is swapped, and a frame
    of odd length starts inside a word."""
    ds, planes = _planar_rgb(frames=3, rows=3, columns=3, bits=8)  # 27 bytes a frame
    stored = planes.tobytes() + b"\0"  # padded to even
    ds.PixelData = swap_words(stored, 2)
    ds["PixelData"].VR = "OW"
    data = part10(ds, BIG_ENDIAN)

    frames = _stored_frames(make_backend, data, [1, 2, 3])
    converted = pydicom.dcmread(io.BytesIO(transcode.transcode(data, EXPLICIT_LE)))

    assert frames == [planes[0].tobytes(), planes[1].tobytes(), planes[2].tobytes()]
    assert converted.PixelData == stored  # the whole instance converted: the same order


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, BIG_ENDIAN, DEFLATED])
def test_a_1_bit_frame_comes_back_packed_from_its_first_pixel(syntax, make_backend):
    """PS3.5 8.1.1: 1-bit frames follow one another bit after bit; a frame asked for is its
    own bits packed from the first byte (not one byte per pixel as pydicom decodes it)."""
    ds = dataset(Spec(rows=3, columns=5, frames=4))  # 15 bits a frame
    pixels = (np.arange(4 * 15) % 3 == 0).astype(np.uint8).reshape(4, 3, 5)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation = 0, 0
    ds.NumberOfFrames = 4
    ds.PixelData = pack_bits(pixels)
    ds["PixelData"].VR = "OB"

    frames = _stored_frames(make_backend, part10(ds, syntax), [2, 4])

    assert frames == [pack_bits(pixels[1], pad=False), pack_bits(pixels[3], pad=False)]
