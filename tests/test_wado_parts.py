"""WADO-RS instance parts (``dicomweb.wado.instance_parts``) from each blob store: from S3 the
instances are read a few ahead, from files streamed; either way every part carries its own
instance, whatever the writer skips."""

from __future__ import annotations

import pytest

from dicomweb import wado
from storage.attributes import Level
from storage.query import Query, find
from tests.factory import Spec, instance


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
