"""Stored instances handed to pynetdicom for C-GET / C-MOVE without re-encoding."""

from __future__ import annotations

import io

import pydicom
from pydicom.filereader import read_dataset

from pacs.dimse import passthrough
from storage.parsing import parse_instance
from tests.factory import Spec, dataset, part10


def _stored(ds: pydicom.Dataset) -> passthrough.StoredDataset:
    parsed = parse_instance(part10(ds))
    return passthrough.StoredDataset(parsed.data, parsed.sop_class_uid,
                                     parsed.sop_instance_uid, parsed.transfer_syntax)


def _decode(body: bytes, implicit: bool) -> pydicom.Dataset:
    return read_dataset(io.BytesIO(body), implicit, True)


def test_explicit_little_endian_goes_out_byte_for_byte():
    stored = _stored(dataset(Spec(patient_name="Nguyễn^Văn An")))
    body = passthrough._encode(stored, False, True)
    assert stored._pacs_data.endswith(body)
    assert _decode(body, False).PatientName == "Nguyễn^Văn An"


def test_other_encodings_are_decoded_and_encoded_again():
    stored = _stored(dataset(Spec()))
    body = passthrough._encode(stored, True, True)  # the peer accepted Implicit VR only
    assert not stored._pacs_data.endswith(body)
    assert _decode(body, True).SOPInstanceUID == stored.SOPInstanceUID
