"""C-FIND pending responses sent in bulk, bypassing pynetdicom's per-message path.

pynetdicom turns every match into a DIMSE message by building and encoding a command set and an
identifier with pydicom, then hands it to its network thread one at a time: about 0.5 ms per
match here, so 759 matches for ``Nguyễn*`` took 0.4 s. The pending C-FIND-RSP command set is the
same for every match of a request, so this module encodes it once, encodes each identifier
directly (the handful of simple VRs a C-FIND answer uses), and hands the PDUs of many
matches to the network thread at once, to be written together. Each PDU carries one PDV, as
pynetdicom and DCMTK send them: PS3.8 allows several per PDU, but DCMTK 3.6.7's findscu
crashes on C-FIND responses packed that way. The final response is encoded by
``pacs.dimse.commands`` like the other status-only responses. Anything unusual (a
binary value, Big Endian) makes ``encode_identifier`` return None and the caller uses
pynetdicom for that match.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs.dimse.commands import (
    C_FIND_RSP,
    DATA_SET_PRESENT,
    PDV_OVERHEAD,
    command_set,
    element,
    send_pdvs,
    uid_element,
    us_element,
)

PENDING = 0xFF00
_TEXT_PAD = {"UI": b"\0"}
_SHORT_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                             "ST", "TM", "UI"})
_LONG_TEXT_VRS = frozenset({"UC", "UR", "UT"})
_US = struct.Struct("<H")


def pending_command(sop_class_uid: str, message_id: int, pending: int = PENDING) -> bytes:
    """The encoded command set of a pending C-FIND-RSP (Implicit VR Little Endian)."""
    return command_set(
        uid_element(0x00000002, sop_class_uid),
        us_element(0x00000100, C_FIND_RSP),
        us_element(0x00000120, message_id),
        us_element(0x00000800, DATA_SET_PRESENT),
        us_element(0x00000900, pending),
    )


def encode_identifier(elements: Iterable[tuple[int, str, Any]], *, implicit: bool,
                      utf8: bool) -> bytes | None:
    """Encode (tag, VR, value) in Little Endian, or None if a value needs pydicom.

    Values are None/'' (empty), str (several values joined by backslash, PN as
    ``Alphabetic=Ideographic=Phonetic``), int (IS, US) or a list of those; a sequence (SQ) is
    a list of items, each a list of such (tag, VR, value).
    """
    parts = []
    codec = "utf-8" if utf8 else "ascii"
    for tag, vr, value in sorted(elements, key=lambda e: e[0]):
        if vr == "SQ":  # value: a list of items, each a list of (tag, VR, value)
            if isinstance(value, dict):  # a sequence from the stored header (DICOM JSON)
                return None
            encoded = _sequence(tag, value or [], implicit=implicit, utf8=utf8)
            if encoded is None:
                return None
            parts.append(encoded)
            continue
        if vr == "US":
            raw = b"" if value in (None, "") else _US.pack(int(value))
        elif vr in _SHORT_TEXT_VRS or vr in _LONG_TEXT_VRS:
            if value is None:
                text = ""
            elif isinstance(value, list | tuple):
                text = "\\".join("" if v is None else str(v) for v in value)
            else:
                text = str(value)
            try:
                raw = text.encode(codec)
            except UnicodeEncodeError:
                return None
            if len(raw) % 2:
                raw += _TEXT_PAD.get(vr, b" ")
        else:
            return None  # sequences, binary and other VRs: pydicom encodes them
        if implicit:
            parts.append(element(tag, raw))
        elif vr in _LONG_TEXT_VRS:
            parts.append(struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(),
                                     len(raw)) + raw)
        else:
            if len(raw) > 0xFFFF:
                return None
            parts.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(),
                                     len(raw)) + raw)
    return b"".join(parts)


_UNDEFINED = 0xFFFFFFFF
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _sequence(tag: int, items: list, *, implicit: bool, utf8: bool) -> bytes | None:
    """A sequence of undefined length, its items of undefined length (PS3.5 7.5)."""
    header = (struct.pack("<HHI", tag >> 16, tag & 0xFFFF, _UNDEFINED) if implicit
              else struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, b"SQ", _UNDEFINED))
    parts = [header]
    for item in items:
        encoded = encode_identifier(item, implicit=implicit, utf8=utf8)
        if encoded is None:
            return None
        parts += [_ITEM, encoded, _ITEM_END]
    parts.append(_SEQUENCE_END)
    return b"".join(parts)


class PendingSender:
    """Queues pending responses as P-DATA PDUs no bigger than the peer accepts."""

    def __init__(self, assoc, context_id: int, command: bytes, *, batch: int = 64):
        self.assoc = assoc
        self.context_id = context_id
        self.command = command
        peer_max = assoc.requestor.maximum_length or 0  # 0: the peer set no limit
        self.limit = peer_max or 1 << 20
        self.batch = batch
        self._pdvs: list[tuple[bytes, bytes]] = []

    def add(self, identifier: bytes) -> None:
        """Queue one pending response (its command, then its identifier)."""
        for control, payload in ((b"\x03", self.command), (b"\x02", identifier)):
            self._pdvs += self._fragments(control, payload)
        if len(self._pdvs) >= 2 * self.batch:
            self.flush()

    def _fragments(self, control: bytes, payload: bytes) -> list[tuple[bytes, bytes]]:
        """``payload`` split into PDVs that fit a PDU, the last one flagged as last."""
        room = max(self.limit - PDV_OVERHEAD, 64)
        if len(payload) <= room:
            return [(control, payload)]
        not_last = bytes([control[0] & 0x01])
        chunks = [payload[i:i + room] for i in range(0, len(payload), room)]
        return [(control if i == len(chunks) - 1 else not_last, chunk)
                for i, chunk in enumerate(chunks)]

    def flush(self) -> None:
        """Hand the queued PDUs to the network thread, to be written at once."""
        if self._pdvs:
            send_pdvs(self.assoc, self.context_id, self._pdvs)
        self._pdvs = []


# One match: its (tag, VR, value) elements, whether its text is UTF-8, and how to make it a
# pydicom data set when it cannot be encoded here.
Answer = tuple[Iterable[tuple[int, str, Any]], bool, Callable[[], Dataset]]


def answer_find(event: Any, answers: Iterable[Answer], *, cancel: int, success: int,
                pending: int = PENDING) -> Iterator[tuple[int, Dataset | None]]:
    """A C-FIND handler's yields for ``answers``: ``pending`` responses (queued in bulk when
    the transfer syntax allows), then ``success``, or ``cancel`` once the peer cancels."""
    syntax = UID(event.context.transfer_syntax)
    sender = None
    if syntax.is_little_endian and not syntax.is_deflated:
        request = event.request
        sender = PendingSender(event.assoc, event.context.context_id,
                               pending_command(str(request.AffectedSOPClassUID),
                                               request.MessageID, pending))
    for elements, utf8, as_dataset in answers:
        if event.is_cancelled:
            if sender:
                sender.flush()
            yield cancel, None
            return
        encoded = sender and encode_identifier(elements, implicit=syntax.is_implicit_VR,
                                               utf8=utf8)
        if encoded is not None:
            sender.add(encoded)
            continue
        if sender:
            sender.flush()  # keep the order: earlier matches go out first
        yield pending, as_dataset()
    if sender:
        sender.flush()
    yield success, None
