"""DIMSE command sets encoded directly, without building a pydicom Dataset.

pynetdicom turns every response primitive into a DIMSE message by setting attributes on a
pydicom ``Dataset`` and encoding it: about 0.35 ms of CPU per C-STORE response here, a tenth of
all the work the server does for a small instance. A command set is a handful of Implicit VR
Little Endian elements of three VRs, so this module writes them with ``struct``.

``install()`` makes pynetdicom send this way the messages a PACS sends most: C-STORE responses
(ingest), C-STORE requests with their data set plus C-GET/C-MOVE responses without an
identifier (retrieve), and the responses that are only a status (C-ECHO, the final C-FIND) —
when nothing unusual is in them (no Offending Element, no handler bound to ``EVT_DIMSE_SENT``,
a command that fits one PDU). Anything else still goes through pynetdicom.
``pacs.dimse.fastfind`` uses the same encoders for pending C-FIND responses.

Such a message reaches the DUL as its P-DATA-TF PDUs already encoded (``EncodedPData``,
``send_pdvs``), written to the socket at once: pynetdicom's DUL would build, encode and send
each PDU in turn, and a CT slice for a peer taking 16 KB PDUs is 32 of them (C-GET and C-MOVE
of a 300-slice CT: 0.65–0.73 s before, 0.47–0.54 s after).

The mirror for the message received most, the C-STORE request: its command set is read with
``struct`` and its data set fragments gathered as they come (``_receive_primitive``), instead of
a pydicom Dataset per command and a second pass to copy it onto the primitive. A command in
several fragments, another command, or a handler bound to ``EVT_DIMSE_RECV`` goes through
pynetdicom as before.
"""

from __future__ import annotations

import functools
import struct
import threading
from io import BytesIO

from pydicom.uid import UID
from pynetdicom import _config, evt, fsm
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from pacs.dimse.compat import pynetdicom_supported

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RSP = 0x8010
C_FIND_RSP = 0x8020
C_ECHO_RSP = 0x8030
C_MOVE_RSP = 0x8021
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0001

_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_ELEMENT_HEADER = struct.Struct("<HHI")
_PDATA_HEADER = struct.Struct(">BBIIB")
# Per PDV item: length (4) + context ID (1) + message control header (1).
PDV_OVERHEAD = 6

_installed = False
_original_send_msg = DIMSEServiceProvider.send_msg
_original_socket_send = AssociationSocket.send
_original_receive_primitive = DIMSEServiceProvider.receive_primitive


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


def store_request(*, sop_class_uid: str, message_id: int, priority: int,
                  sop_instance_uid: str, move_originator_ae: str | None = None,
                  move_originator_id: int | None = None) -> bytes:
    """The encoded command set of a C-STORE-RQ (a data set follows)."""
    parts = [uid_element(0x00000002, sop_class_uid), us_element(0x00000100, C_STORE_RQ),
             us_element(0x00000110, message_id), us_element(0x00000700, priority),
             us_element(0x00000800, DATA_SET_PRESENT), uid_element(0x00001000, sop_instance_uid)]
    if move_originator_ae:
        parts.append(text_element(0x00001030, move_originator_ae))
    if move_originator_id is not None:
        parts.append(us_element(0x00001031, move_originator_id))
    return command_set(*parts)


def retrieve_response(*, command_field: int, sop_class_uid: str | None, message_id: int,
                      status: int, counts: tuple[int | None, int | None, int | None,
                                                 int | None]) -> bytes:
    """The encoded command set of a C-GET-RSP or C-MOVE-RSP without an identifier."""
    parts = []
    if sop_class_uid:
        parts.append(uid_element(0x00000002, sop_class_uid))
    parts += [us_element(0x00000100, command_field), us_element(0x00000120, message_id),
              us_element(0x00000800, NO_DATA_SET), us_element(0x00000900, status)]
    for tag, count in zip((0x00001020, 0x00001021, 0x00001022, 0x00001023), counts,
                          strict=True):
        if count is not None:
            parts.append(us_element(tag, count))
    return command_set(*parts)


def status_response(*, command_field: int, sop_class_uid: str | None, message_id: int,
                    status: int) -> bytes:
    """The encoded command set of a response that is only a status (C-ECHO-RSP, the final
    C-FIND-RSP)."""
    parts = [uid_element(0x00000002, sop_class_uid)] if sop_class_uid else []
    parts += [us_element(0x00000100, command_field), us_element(0x00000120, message_id),
              us_element(0x00000800, NO_DATA_SET), us_element(0x00000900, status)]
    return command_set(*parts)


def install() -> bool:
    """Send plain C-STORE responses with ``store_response`` (once). Whether it is active."""
    global _installed
    if _installed:
        return True
    if not pynetdicom_supported("direct command encoding", "DIMSE messages cost more CPU"):
        return False
    DIMSEServiceProvider.send_msg = _send_msg
    DIMSEServiceProvider.receive_primitive = _receive_primitive
    AssociationSocket.send = _locked_send
    for action in ("DT-1", "AR-7"):
        description, _, next_state = fsm.ACTIONS[action]
        fsm.ACTIONS[action] = (description, functools.partial(_send_p_data,
                                                              next_state=next_state), next_state)
    _installed = True
    return True


def _send_msg(self: DIMSEServiceProvider, primitive, context_id: int) -> None:
    if not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        encoded = _encode_simple(primitive)
        if encoded is not None and send_message(self, context_id, *encoded):
            return
    _original_send_msg(self, primitive, context_id)


def send_message(dimse: DIMSEServiceProvider, context_id: int, command: bytes,
                 data_set: bytes | None) -> bool:
    """Send an encoded DIMSE message, cut to the peer's maximum PDU length; False (nothing
    sent) when the command set does not fit one PDU."""
    limit = dimse.maximum_pdu_size
    room = (limit - PDV_OVERHEAD) if limit else 0
    if room and len(command) > room:
        return False
    _queue(dimse, context_id, command, data_set, room)
    return True


def _encode_simple(primitive) -> tuple[bytes, bytes | None] | None:
    """(command set, data set) of the messages sent often, or None for pynetdicom to do it."""
    kind = type(primitive)
    responding = primitive.MessageIDBeingRespondedTo
    if kind is C_STORE and responding is not None:
        if primitive.Status is None or primitive.OffendingElement is not None:
            return None
        return store_response(
            sop_class_uid=primitive.AffectedSOPClassUID, message_id=responding,
            status=primitive.Status, sop_instance_uid=primitive.AffectedSOPInstanceUID,
            error_comment=primitive.ErrorComment), None
    if kind is C_STORE:  # a request: a C-GET or C-MOVE sub-operation
        if (primitive.MessageID is None or primitive.AffectedSOPClassUID is None
                or primitive.AffectedSOPInstanceUID is None or primitive.DataSet is None
                or primitive._dataset_path is not None):
            return None
        return store_request(
            sop_class_uid=primitive.AffectedSOPClassUID, message_id=primitive.MessageID,
            priority=primitive.Priority, sop_instance_uid=primitive.AffectedSOPInstanceUID,
            move_originator_ae=primitive.MoveOriginatorApplicationEntityTitle,
            move_originator_id=primitive.MoveOriginatorMessageID), \
            primitive.DataSet.getvalue()
    if kind in (C_FIND, C_ECHO) and responding is not None:
        if (primitive.Status is None or getattr(primitive, "Identifier", None) is not None
                or getattr(primitive, "OffendingElement", None) is not None
                or primitive.ErrorComment):
            return None
        return status_response(
            command_field=C_FIND_RSP if kind is C_FIND else C_ECHO_RSP,
            sop_class_uid=primitive.AffectedSOPClassUID, message_id=responding,
            status=primitive.Status), None
    if kind in (C_GET, C_MOVE) and responding is not None:
        if (primitive.Status is None or primitive.Identifier is not None
                or primitive.OffendingElement is not None or primitive.ErrorComment):
            return None
        return retrieve_response(
            command_field=C_GET_RSP if kind is C_GET else C_MOVE_RSP,
            sop_class_uid=primitive.AffectedSOPClassUID, message_id=responding,
            status=primitive.Status,
            counts=(primitive.NumberOfRemainingSuboperations,
                    primitive.NumberOfCompletedSuboperations,
                    primitive.NumberOfFailedSuboperations,
                    primitive.NumberOfWarningSuboperations)), None
    return None


class EncodedPData(P_DATA):
    """The P-DATA-TF PDUs of one whole DIMSE message, already encoded: the DUL writes them to
    the socket at once (``_send_p_data``) instead of building, encoding and sending each PDU
    (a 512 KB CT slice is 32 PDUs for a peer that takes 16 KB)."""

    def __init__(self, encoded: bytes | bytearray) -> None:
        super().__init__()
        self.encoded = encoded


def _queue(dimse: DIMSEServiceProvider, context_id: int, command: bytes,
           data_set: bytes | None, room: int) -> None:
    """Hand the message to the DUL as P-DATA PDUs of one PDV each, as pynetdicom cuts them."""
    send_pdvs(dimse.assoc, context_id, [
        (bytes([control | (0x02 if start + size >= len(payload) else 0x00)]),
         view[start:start + size])
        for control, payload in ((0x01, command), (0x00, data_set)) if payload is not None
        for size, view in [(room or len(payload) or 1, memoryview(payload))]
        for start in range(0, max(len(payload), 1), size)
    ])


def send_pdvs(assoc, context_id: int, pdvs: list[tuple[bytes, bytes | memoryview]]) -> None:
    """Send PDVs (message control header, fragment), in order, as P-DATA-TF PDUs of one PDV
    each: written to the socket by the calling thread when nothing is waiting to be sent
    before them (``_write_now``), else handed to the DUL as one ``EncodedPData``; as one
    P-DATA each when a handler is bound to ``EVT_PDU_SENT`` (it expects every PDU)."""
    if assoc.get_handlers(evt.EVT_PDU_SENT):
        for header, fragment in pdvs:
            pdata = P_DATA()
            pdata.presentation_data_value_list = [[context_id, header + bytes(fragment)]]
            assoc.dul.send_pdu(pdata)
        return
    encoded = bytearray()
    for header, fragment in pdvs:
        # P-DATA-TF: type 04, reserved, length; one PDV item: length, context ID, control.
        encoded += _PDATA_HEADER.pack(0x04, 0, len(fragment) + PDV_OVERHEAD,
                                      len(fragment) + 2, context_id)
        encoded += header
        encoded += fragment
    if not _write_now(assoc.dul, encoded):
        assoc.dul.send_pdu(EncodedPData(encoded))


# States in which the DUL sends a P-DATA request as it comes (DT-1, AR-7), changing nothing.
_SENDING_STATES = frozenset({"Sta6", "Sta8"})
_LOCK_CREATION = threading.Lock()


def _write_lock(transport: AssociationSocket) -> threading.RLock:
    """The lock every write to this association's socket takes (created on first use)."""
    lock = getattr(transport, "_pacs_write_lock", None)
    if lock is None:
        with _LOCK_CREATION:
            lock = getattr(transport, "_pacs_write_lock", None)
            if lock is None:
                lock = transport._pacs_write_lock = threading.RLock()
    return lock


def _write_now(dul: DULServiceProvider, encoded: bytearray) -> bool:
    """Write P-DATA-TF PDUs from the calling thread; False (nothing written) to leave them to
    the DUL instead.

    The DUL thread's P-DATA action would write them without changing state, so the only
    difference is who writes: here, without handing the GIL to the DUL thread and back (two
    thread switches per message, about 0.1 ms of a C-FIND's or a C-STORE's round trip). Only
    when the DUL's queue is empty (under the write lock, which the DUL's P-DATA action holds
    from taking a PDU off the queue to writing it), so no message overtakes an earlier one.
    """
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None or dul.assoc.get_handlers(evt.EVT_DATA_SENT):
        return False
    with _write_lock(transport):
        if not dul.to_provider_queue.empty() \
                or dul.state_machine.current_state not in _SENDING_STATES:
            return False
        _sendall(transport, sock, encoded)
    return True


def _send_p_data(dul: DULServiceProvider, next_state: str) -> str:
    """pynetdicom's DT-1 / AR-7 (send a P-DATA request), writing an ``EncodedPData`` as is."""
    transport = dul.socket
    with _write_lock(transport):
        primitive = dul.to_provider_queue.get(False)
        if not isinstance(primitive, EncodedPData):
            dul._send(P_DATA_TF(primitive))
            return next_state
        sock = getattr(transport, "socket", None)
        if sock is None:
            return next_state  # closed meanwhile; the state machine hears of it
        if dul.assoc.get_handlers(evt.EVT_DATA_SENT):
            transport.send(bytes(primitive.encoded))  # pynetdicom's send: tells the handlers
            return next_state
        _sendall(transport, sock, primitive.encoded)
    return next_state


def _sendall(transport: AssociationSocket, sock, encoded: bytearray) -> None:
    """Write ``encoded`` in one call, without copies (pynetdicom's send slices what is left
    after each partial write); a failure closes the transport as pynetdicom's send reports it."""
    try:
        sock.sendall(encoded)
    except OSError:
        transport.event_queue.put("Evt17")


def _locked_send(self: AssociationSocket, bytestream: bytes) -> None:
    """pynetdicom's AssociationSocket.send under the write lock: the DUL's own PDUs
    (A-ABORT, A-RELEASE) never land in the middle of a message another thread writes."""
    with _write_lock(self):
        _original_socket_send(self, bytestream)


# ---------------------------------------------------------------------- receiving


class _StoreInProgress:
    """A C-STORE request whose command has been read and whose data set is arriving."""

    __slots__ = ("request", "context_id", "chunks")

    def __init__(self, request: C_STORE, context_id: int) -> None:
        self.request = request
        self.context_id = context_id
        self.chunks: list[bytes] = []


def _receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
    store: _StoreInProgress | None = getattr(self, "_pacs_store", None)
    if store is None:
        if (self.message is not None or _config.STORE_RECV_CHUNKED_DATASET
                or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)):
            _original_receive_primitive(self, primitive)
            return
        values = primitive.presentation_data_value_list
        context_id, first = values[0]
        fields = _command_fields(first) if first and first[0] & 0x03 == 0x03 else None
        if fields is not None and len(values) == 1:
            response = _store_response(fields)
            if response is not None:  # a C-STORE sub-operation of a C-GET or C-MOVE answered
                response._context_id = context_id
                self.msg_queue.put((context_id, response))
                return
        request = _store_request(fields) if fields is not None else None
        if request is None:  # anything else: pynetdicom decodes it
            _original_receive_primitive(self, primitive)
            return
        store = self._pacs_store = _StoreInProgress(request, context_id)
        values = values[1:]
    else:
        values = primitive.presentation_data_value_list
    for context_id, data in values:
        if not data or data[0] & 0x01 or context_id != store.context_id:
            # A command before the data set ended, or another context: not a valid message.
            self._pacs_store = None
            self.dul.event_queue.put("Evt19")
            return
        store.chunks.append(data[1:])
        if data[0] & 0x02:  # the last fragment
            self._pacs_store = None
            request = store.request
            request.DataSet = BytesIO(b"".join(store.chunks))
            request._context_id = store.context_id
            request._dataset_path = None
            request._dataset_file = None
            self.msg_queue.put((store.context_id, request))
            return


def _command_fields(command: bytes) -> dict[int, bytes] | None:
    """The elements of an encoded command set (after the control header) by element number,
    or None when it is not a well-formed group 0000."""
    fields: dict[int, bytes] = {}
    view = memoryview(command)
    offset, end = 1, len(command)
    try:
        while offset < end:
            group, elem, length = _ELEMENT_HEADER.unpack_from(view, offset)
            offset += 8
            if group != 0x0000 or offset + length > end:
                return None
            fields[elem] = bytes(view[offset:offset + length])
            offset += length
        if len(fields[0x0100]) != 2 or len(fields[0x0800]) != 2:
            return None
    except (KeyError, struct.error):
        return None
    return fields


# What the fast paths read; a command with anything else (an Offending Element, an Error ID...)
# goes to pynetdicom, which knows every command element.
_STORE_REQUEST_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000,
                                     0x1030, 0x1031))
_STORE_RESPONSE_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x0902,
                                      0x1000))


def _store_request(fields: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE request primitive of a command, or None when it is another command or
    anything in it is unexpected."""
    try:
        if (_US.unpack(fields[0x0100])[0] != C_STORE_RQ
                or _US.unpack(fields[0x0800])[0] == NO_DATA_SET
                or not fields.keys() <= _STORE_REQUEST_ELEMENTS):
            return None
        request = C_STORE()
        request.MessageID = _US.unpack(fields[0x0110])[0]
        # Set past pynetdicom's setters, which check the UID's syntax by regular expression
        # (a tenth of this function's caller): the archive checks the UIDs it stores itself.
        request._affected_sop_class_uid = UID(_text(fields[0x0002])) or None
        request._affected_sop_instance_uid = UID(_text(fields[0x1000])) or None
        if request._affected_sop_class_uid is None or request._affected_sop_instance_uid is None:
            return None
        request.Priority = _US.unpack(fields[0x0700])[0]
        if 0x1030 in fields:
            request.MoveOriginatorApplicationEntityTitle = _text(fields[0x1030]) or None
        if 0x1031 in fields:
            request.MoveOriginatorMessageID = _US.unpack(fields[0x1031])[0]
    except (KeyError, struct.error, ValueError, TypeError, UnicodeDecodeError):
        return None  # pynetdicom reports it its own way
    return request


def _store_response(fields: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE response primitive of a command (no data set), or None."""
    try:
        if (_US.unpack(fields[0x0100])[0] != C_STORE_RSP
                or _US.unpack(fields[0x0800])[0] != NO_DATA_SET
                or not fields.keys() <= _STORE_RESPONSE_ELEMENTS):
            return None
        response = C_STORE()
        response.MessageIDBeingRespondedTo = _US.unpack(fields[0x0120])[0]
        response.Status = _US.unpack(fields[0x0900])[0]
        if 0x0002 in fields:
            response._affected_sop_class_uid = UID(_text(fields[0x0002])) or None
        if 0x1000 in fields:
            response._affected_sop_instance_uid = UID(_text(fields[0x1000])) or None
        if 0x0902 in fields:
            response.ErrorComment = fields[0x0902].decode("ascii", "replace").strip("\0 ")
    except (KeyError, struct.error, ValueError, TypeError):
        return None
    return response


def _text(raw: bytes) -> str:
    return raw.decode("ascii").strip("\0 ")
