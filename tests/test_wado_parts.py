"""WADO-RS instances without a server: the representation an Accept header chooses
(``dicomweb.wado.choose_instance_media``), and the parts (``instance_parts``) from each blob
store: from S3 the instances are read a few ahead, from files streamed; either way every part
carries its own instance, whatever the writer skips."""

from __future__ import annotations

import pytest

from dicomweb import wado
from dicomweb.media import NotAcceptable, parse_accept
from storage.attributes import Level
from storage.query import Query, find
from tests.factory import Spec, instance

DICOM_PARTS = 'multipart/related; type="application/dicom"'
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
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
