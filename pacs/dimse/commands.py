"""DIMSE command sets encoded directly, without building a pydicom Dataset.

pynetdicom turns every response primitive into a DIMSE message by setting attributes on a
pydicom ``Dataset`` and encoding it: about 0.35 ms of CPU per C-STORE response here, a tenth of
all the work the server does for a small instance. A command set is a handful of Implicit VR
Little Endian elements of three VRs, so this module writes them with ``struct``.

``install()`` makes pynetdicom send C-STORE responses this way when nothing unusual is in them
(no Offending Element, no handler bound to ``EVT_DIMSE_SENT``, a command that fits one PDU);
anything else still goes through pynetdicom. ``pacs.dimse.fastfind`` uses the same encoders for
pending C-FIND responses.
"""

from __future__ import annotations

import logging
import struct

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("pacs.dimse")

SUPPORTED_VERSIONS = ("3.0.",)
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0001

_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_ELEMENT_HEADER = struct.Struct("<HHI")
# Per PDV item: length (4) + context ID (1) + message control header (1).
PDV_OVERHEAD = 6

_installed = False
_original_send_msg = DIMSEServiceProvider.send_msg


def element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element (``value`` already padded to even length)."""
    return _ELEMENT_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def uid_element(tag: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    return element(tag, raw + b"\0" if len(raw) % 2 else raw)


def us_element(tag: int, value: int) -> bytes:
    return element(tag, _US.pack(value))


def text_element(tag: int, text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return element(tag, raw + b" " if len(raw) % 2 else raw)


def command_set(*elements: bytes) -> bytes:
    """The command set of ``elements`` (in tag order) behind its Command Group Length."""
    body = b"".join(elements)
    return element(0x00000000, _UL.pack(len(body))) + body


def store_response(*, sop_class_uid: str | None, message_id: int, status: int,
                   sop_instance_uid: str | None, error_comment: str | None = None) -> bytes:
    """The encoded command set of a C-STORE-RSP."""
    parts = []
    if sop_class_uid:
        parts.append(uid_element(0x00000002, sop_class_uid))
    parts += [us_element(0x00000100, C_STORE_RSP), us_element(0x00000120, message_id),
              us_element(0x00000800, NO_DATA_SET), us_element(0x00000900, status)]
    if error_comment:
        parts.append(text_element(0x00000902, error_comment[:64]))
    if sop_instance_uid:
        parts.append(uid_element(0x00001000, sop_instance_uid))
    return command_set(*parts)


def install() -> bool:
    """Send plain C-STORE responses with ``store_response`` (once). Whether it is active."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(SUPPORTED_VERSIONS):
        log.warning("pynetdicom %s: direct C-STORE response encoding not installed (written "
                    "for %s)", pynetdicom.__version__, SUPPORTED_VERSIONS)
        return False
    DIMSEServiceProvider.send_msg = _send_msg
    _installed = True
    return True


def _send_msg(self: DIMSEServiceProvider, primitive, context_id: int) -> None:
    if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        command = store_response(
            sop_class_uid=primitive.AffectedSOPClassUID,
            message_id=primitive.MessageIDBeingRespondedTo, status=primitive.Status,
            sop_instance_uid=primitive.AffectedSOPInstanceUID,
            error_comment=primitive.ErrorComment)
        limit = self.maximum_pdu_size
        if not limit or len(command) + PDV_OVERHEAD <= limit:
            pdata = P_DATA()
            pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
            self.dul.send_pdu(pdata)
            return
    _original_send_msg(self, primitive, context_id)
