"""WADO-RS instances without a server: the representation an Accept header chooses
(``dicomweb.wado.choose_instance_media``), and the parts (``instance_parts``) from each blob
store: from S3 the instances are read a few ahead, from files streamed; either way every part
carries its own instance, whatever the writer skips."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames

from dicomweb import transcode, wado
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
