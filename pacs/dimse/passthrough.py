"""Stored instances sent to C-GET / C-MOVE peers as stored, without decoding and re-encoding.

pynetdicom sends a C-STORE sub-operation from a pydicom ``Dataset``: the archive would read the
stored file into a Dataset and pynetdicom would encode it back into the same bytes, about 2 ms
of CPU for a 512 KB CT slice, the larger part of a C-MOVE's time. ``StoredDataset`` carries the
stored bytes with just the attributes pynetdicom looks at (SOP Class/Instance UID, the transfer
syntax); ``install()`` makes pynetdicom's encoder hand those bytes over unchanged when the
presentation context uses the stored transfer syntax, and decode-and-encode only when it does
not (e.g. a peer that accepted Implicit VR Little Endian only).
"""

from __future__ import annotations

from io import BytesIO

import pynetdicom
import pynetdicom.association
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from pacs.dimse.compat import pynetdicom_supported
from storage import rawread

_installed = False
_original_encode = pynetdicom.association.encode


class StoredDataset(Dataset):
    """A stored Part 10 instance, standing in for its decoded data set."""

    def __init__(self, data: bytes, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
        self._pacs_data = data

    def stored_body(self) -> bytes:
        """The data set's bytes after the preamble and File Meta, as stored."""
        data = self._pacs_data
        start = 132 if data[128:132] == b"DICM" else 0
        if data[start:start + 2] == b"\x02\x00":
            _, start = rawread.read_file_meta(data, start)
        return data[start:]

    def decoded(self) -> Dataset:
        return dcmread(BytesIO(self._pacs_data))


def install() -> bool:
    """Let pynetdicom send ``StoredDataset`` bytes as they are (once). Whether it is active."""
    global _installed
    if _installed:
        return True
    if not pynetdicom_supported("pass-through of stored instances",
                                "C-GET/C-MOVE re-encode every instance"):
        return False
    pynetdicom.association.encode = _encode
    _installed = True
    return True


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    if isinstance(ds, StoredDataset):
        stored = ds.file_meta.TransferSyntaxUID
        if (not deflated and not stored.is_deflated and stored.is_implicit_VR == is_implicit_vr
                and stored.is_little_endian == is_little_endian):
            try:
                return ds.stored_body()
            except rawread.UnusualEncoding:
                pass
        ds = ds.decoded()
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)
