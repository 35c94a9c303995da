"""Stored instances sent to C-GET / C-MOVE peers as stored, without decoding and re-encoding.

pynetdicom sends a C-STORE sub-operation from a pydicom ``Dataset``: the archive would read the
stored file into a Dataset and pynetdicom would encode it back into the same bytes, about 2 ms
of CPU for a 512 KB CT slice, the larger part of a C-MOVE's time. ``StoredDataset`` carries the
stored bytes with just the attributes pynetdicom looks at (SOP Class/Instance UID, the transfer
syntax); ``install()`` makes pynetdicom's encoder hand those bytes over unchanged when the
presentation context uses the stored transfer syntax, and decode-and-encode only when it does
not (e.g. a peer that accepted Implicit VR Little Endian only). When no conversion is needed,
``send_c_store`` itself is short-cut: the request's command set is encoded directly
(``pacs.dimse.commands``) and the stored bytes go out as they are.
"""

from __future__ import annotations

import time
from io import BytesIO

import pynetdicom
import pynetdicom.association
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association

from pacs.dimse import commands, status
from pacs.dimse.compat import pynetdicom_supported
from storage import rawread

_installed = False
_original_encode = pynetdicom.association.encode
_original_send_c_store = Association.send_c_store
_MOVE_ORIGINATOR = "_pacs_move_originator"


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


class FailedSubOperation(Dataset):
    """An instance that cannot be sent (its blob is unreadable, the peer takes no syntax it
    could be sent in): yielded in its place, it is counted as a failed sub-operation and listed
    in the Failed SOP Instance UID List, without a C-STORE. The handler logs why."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid


def set_move_originator(sub_association: Association, ae_title: str) -> None:
    """Name ``ae_title``, the AE that asked for a C-MOVE, as the originator of the C-STOREs
    sent over its ``sub_association``."""
    setattr(sub_association, _MOVE_ORIGINATOR, ae_title)


def install() -> bool:
    """Let pynetdicom send ``StoredDataset`` bytes as they are (once). Whether it is active."""
    global _installed
    if _installed:
        return True
    if not pynetdicom_supported("pass-through of stored instances",
                                "C-GET/C-MOVE re-encode every instance"):
        return False
    pynetdicom.association.encode = _encode
    Association.send_c_store = _send_c_store
    _installed = True
    return True


def _send_c_store(self: Association, dataset, msg_id: int = 1, priority: int = 2,
                  originator_aet: str | None = None, originator_id: int | None = None
                  ) -> Dataset:
    """pynetdicom's ``send_c_store``, for a ``StoredDataset`` the peer takes as stored: the
    command set encoded directly and the stored bytes sent as they are, without the request
    primitive, its UID checks and the encoder in between (a C-GET or C-MOVE sub-operation).
    Anything else, or when the stored bytes need converting, is pynetdicom's; a
    ``FailedSubOperation`` is answered here as refused (0xA700), and nothing is sent.

    Either way the Move Originator AE Title is the C-MOVE requester's (``set_move_originator``):
    pynetdicom names our own AE there, which a destination matching incoming images to the
    C-MOVE it asked for (PS3.7 9.3.1.1) cannot use."""
    if isinstance(dataset, FailedSubOperation):
        # As if the peer had refused it. pynetdicom was given a data set it could not send,
        # and logged an ERROR about a missing (0002,0010) that said nothing of the reason.
        refused = Dataset()
        refused.Status = status.OUT_OF_RESOURCES
        return refused
    originator_aet = getattr(self, _MOVE_ORIGINATOR, originator_aet)
    if (isinstance(dataset, StoredDataset) and self.is_established
            and not self.get_handlers(evt.EVT_DIMSE_SENT)):
        sop_class, stored = UID(dataset.SOPClassUID), dataset.file_meta.TransferSyntaxUID
        context = self._get_valid_context(sop_class, stored, "scu", allow_conversion=True)
        try:
            body = (dataset.stored_body() if context.transfer_syntax[0] == stored
                    and not stored.is_deflated else None)
        except rawread.UnusualEncoding:
            body = None
        if body is not None:
            command = commands.store_request(
                sop_class_uid=sop_class, message_id=msg_id, priority=priority,
                sop_instance_uid=str(dataset.SOPInstanceUID), move_originator_ae=originator_aet,
                move_originator_id=originator_id)
            # As pynetdicom does: hold the reactor so that the response comes to us.
            self._reactor_checkpoint.clear()
            while not self._is_paused:
                time.sleep(0.0001)
            try:
                sent = commands.send_message(self.dimse, context.context_id, command, body)
                if sent:
                    _, response = self.dimse.get_msg(block=True)
            finally:
                self._reactor_checkpoint.set()
            if sent:
                if response is None:
                    self._handle_no_response()
                    return Dataset()
                return self._check_received_status(response)
    return _original_send_c_store(self, dataset, msg_id, priority, originator_aet,
                                  originator_id)


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
