"""HL7 v2 text, from bytes to unescaped segments: character sets (MSH-18), the checks of MSH-1
and MSH-2, splitting with ``python-hl7``, unescaping, the header, and the ACKs we receive.

Unescaping is done here, because python-hl7 logs field contents (patient data) when an escape
sequence is malformed. What inbound messages mean is ``emr.hl7v2``; what we send,
``emr.hl7_out``.

The HL7 port takes messages from anyone on the network, and splitting builds Python objects
for every separator (python-hl7's and ours: 500-700 bytes and 5-10 µs each, 2 KB and 30 µs a
segment). A message is therefore counted before it is split (``MAX_SEGMENTS``,
``MAX_SEPARATORS``, ``MAX_ESCAPES``): a 1 MiB frame of ``~`` took 833 MB and 11 s.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass

import hl7

DEFAULT_VERSION = "2.5.1"
UTF8 = "UNICODE UTF-8"

# What a message may hold: real ORM/OMI/ADT have tens of segments and a few hundred separators;
# these leave room for long NTE/OBX lists. The worst message within them (a 4 MiB frame at every
# limit) took the server about 1 s and 90 MiB at peak (docs/emr.md, Size limits).
MAX_SEGMENTS = 5_000
MAX_SEPARATORS = 50_000  # field, repetition, component and subcomponent separators together
MAX_ESCAPES = 100_000  # escape characters (two per escape sequence)

# HL7 table 0357 (message error condition codes), used in ERR-3.
ERROR_CODES = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}


class Hl7Error(ValueError):
    """A message we will not accept; ``ack_code`` says how to answer: AE (error) or AR (reject).

    ``error_location`` is ``SEG-n`` (e.g. ``MSH-9``) and goes to ERR-2; ``error_code`` is from
    HL7 table 0357 and goes to ERR-3. ``header`` is what could be read of the MSH, so that the
    ACK can carry the original control ID even when parsing failed."""

    def __init__(
        self,
        ack_code: str,
        reason: str,
        error_location: str = "",
        *,
        error_code: str = "",
        header: Header | None = None,
    ) -> None:
        super().__init__(reason)
        self.ack_code = ack_code
        self.reason = reason
        self.error_location = error_location
        self.error_code = error_code or "207"
        self.header = header


@dataclass(frozen=True)
class Header:
    """The MSH of a received message.

    HD fields (MSH-3 to MSH-6) are kept as HL7 text in the standard encoding characters
    (``^``, ``&``, values escaped), whole: an ACK echoes them as the sender wrote them, universal
    ID included (``HIS&1.2.840.9.1&ISO``), whatever separators the sender used."""

    control_id: str = ""  # MSH-10
    message_type: str = ""  # MSH-9.1, e.g. ORM
    trigger: str = ""  # MSH-9.2, e.g. O01
    structure: str = ""  # MSH-9.3, e.g. ORM_O01
    sending_application: str = ""  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    version: str = ""  # MSH-12
    charset: str = ""  # MSH-18
    processing_id: str = ""  # MSH-11: P, D or T
    accept_ack_type: str = ""  # MSH-15, table 0155: AL, NE, ER, SU; set in enhanced mode
    application_ack_type: str = ""  # MSH-16, table 0155


# ------------------------------------------------------------------ bytes to text

# HL7 table 0211, plus labels found in the field. UTF-16/32 are absent on purpose: they are
# not ASCII-compatible, so neither MLLP framing nor this MSH-18 sniffing can work with them.
_CHARSETS = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    # Not in table 0211, but sent by real systems.
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO-8859-1": "iso8859-1",
    "WINDOWS-1258": "cp1258",
    "CP1258": "cp1258",
}


def decode(data: bytes) -> str:
    """Bytes of one message to text, honouring MSH-18; segments end up separated by ``\\r``.

    Without MSH-18 we try UTF-8 first (Vietnamese HIS often send it unlabelled) and fall back to
    latin-1, which cannot fail. Bytes that are invalid in a declared charset are rejected (AR)
    rather than guessed, so that names are never silently garbled; so is UTF-8 labelled as
    Latin-1 or WINDOWS-1258 (``_check_not_utf8``). Values are NFC-normalised when the message is
    split (:func:`segments_of`)."""
    data = data.removeprefix(codecs.BOM_UTF8)
    label = _raw_msh18(data)
    if not label:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        _check_size(text)
        return _normalise(text)
    codec = _CHARSETS.get(label)
    if codec is None:
        raise Hl7Error(
            "AR",
            f"unsupported character set {label!r} in MSH-18; send UNICODE UTF-8"
            " (bảng mã không hỗ trợ, hãy dùng UNICODE UTF-8)",
            "MSH-18",
            error_code="103",
            header=_scrape_header(data.decode("latin-1")),
        )
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise Hl7Error(
            "AR",
            f"bytes not valid in the declared character set {label} (MSH-18) at byte"
            f" {exc.start} (dữ liệu không đúng bảng mã khai báo)",
            "MSH-18",
            error_code="102",
            header=_scrape_header(data.decode("latin-1")),
        ) from None
    _check_not_utf8(data, label, codec)
    _check_size(text)
    return _normalise(text)


# Single-byte charsets UTF-8 gets mislabelled as here: every byte is a character in them, so
# UTF-8 decodes without error, into mojibake ("Lê" becomes "LÃª"). Their real text is
# practically never valid UTF-8 (an accented capital followed by a symbol such as "°"); in
# Latin-2 or Cyrillic it can be ("ÓŁ" in 8859/2 is valid UTF-8), so those are not checked.
_MISLABELLED_UTF8 = frozenset({"iso8859-1", "iso8859-15", "cp1258"})


def _check_not_utf8(data: bytes, label: str, codec: str) -> None:
    """Refuse (AR) a message labelled Latin-1 or WINDOWS-1258 whose bytes are UTF-8.

    Only when they hold multi-byte sequences and are valid UTF-8 as a whole: ASCII is the same
    in every charset, and real Latin-1 or WINDOWS-1258 text is almost never valid UTF-8."""
    if codec not in _MISLABELLED_UTF8 or data.isascii():
        return
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return
    raise Hl7Error(
        "AR",
        f"MSH-18 declares {label}, but the bytes look like UTF-8; send MSH-18 UNICODE UTF-8,"
        f" or the text in {label} (MSH-18 khai báo {label} nhưng dữ liệu có vẻ là UTF-8;"
        " hãy khai báo UNICODE UTF-8)",
        "MSH-18",
        error_code="102",
        header=_scrape_header(data.decode("latin-1")),
    )


def _raw_msh18(data: bytes) -> str:
    """MSH-18 read from the raw bytes: the MSH fields are ASCII in every charset we accept."""
    start = data.find(b"MSH")
    if start < 0:
        return ""
    end = min((i for i in (data.find(b"\r", start), data.find(b"\n", start)) if i >= 0),
              default=len(data))
    return _msh18(data[start:end].decode("ascii", "replace"))


def _msh18(line: str) -> str:
    """The first repetition of MSH-18 in an MSH line, upper case; empty if there is none."""
    if not line.startswith("MSH") or len(line) < 8:
        return ""
    fields = line.split(line[3])
    if len(fields) < 18:
        return ""
    repetition = fields[1][1:2] or "~"  # MSH-2 is component, repetition, escape, subcomponent
    return fields[17].split(repetition)[0].strip().upper()


def _check_size(text: str) -> None:
    """Refuse (AR) a message with more segments, separators or escapes than the limits allow.

    Counted on the text as it came, before anything is split: counting is cheap at any size,
    splitting is what costs."""
    text = text.lstrip(_LEADING)
    if _ends_segments_with_cr(text):
        segments = text.count("\r")
    else:
        segments = text.count("\r") + text.count("\n") - text.count("\r\n")
    start = text[:8]
    separators = escapes = 0
    if start.startswith("MSH") and len(start) == 8:
        # MSH-1 and MSH-2: field, component, repetition, escape, subcomponent.
        marks = {c for c in start[3:8] if not (c.isalnum() or c.isspace())}
        escape = start[6]
        separators = sum(text.count(c) for c in marks - {escape})
        escapes = text.count(escape) if escape in marks else 0
    for count, limit, what in ((segments, MAX_SEGMENTS, "segments"),
                               (separators, MAX_SEPARATORS, "separators (field, repetition,"
                                " component, subcomponent)"),
                               (escapes, MAX_ESCAPES, "escape characters")):
        if count > limit:
            raise Hl7Error(
                "AR",
                f"message too large to process: {count} {what}, at most {limit} are accepted;"
                " nothing was applied (bản tin quá lớn)",
                "",
                error_code="207",
                header=_scrape_header(text[:4096]),
            )


_LEADING = "\ufeff \t\r\n"  # what may come before the MSH: a BOM, blank lines


def _ends_segments_with_cr(text: str) -> bool:
    """Whether the message ends its segments with CR, as HL7 says (2.5 §2.7), or CR LF: the
    first line break, at the end of the MSH, tells. Then a lone LF is data (free text typed
    on two lines), not a segment break; a message whose MSH ends with a lone LF has its
    segments separated by LF, and there every line break is one."""
    first = _LINE_BREAK.search(text)
    return first is not None and first.group() == "\r"


_LINE_BREAK = re.compile(r"[\r\n]")


def _normalise(text: str) -> str:
    """Segments separated by ``\\r`` whatever the sender used (``\\r``, ``\\n``, ``\\r\\n``);
    in a message of CR-ended segments, an LF that does not follow a CR stays in its field
    (line breaks after the last segment end it, whichever they are)."""
    text = text.strip(_LEADING).replace("\r\n", "\r")
    if not _ends_segments_with_cr(text):
        text = text.replace("\n", "\r")
    return "".join(line + "\r" for line in text.split("\r") if line.strip())


# ------------------------------------------------------------------ parsing

# One field: repetitions of components of subcomponents, all unescaped.
Field = list[list[list[str]]]


@dataclass
class Segment:
    name: str
    fields: list[Field]  # fields[n] is SEG-n; fields[0] holds the name

    def repetitions(self, field: int) -> Field:
        return self.fields[field] if 0 < field < len(self.fields) else []

    def value(self, field: int, component: int = 1, subcomponent: int = 1) -> str:
        reps = self.repetitions(field)
        return part(reps[0], component, subcomponent) if reps else ""


def part(repetition: list[list[str]], component: int, subcomponent: int = 1) -> str:
    if component > len(repetition) or subcomponent > len(repetition[component - 1]):
        return ""
    return repetition[component - 1][subcomponent - 1]


def _check_msh(text: str) -> None:
    if not text.startswith("MSH"):
        raise Hl7Error(
            "AR",
            "message does not start with an MSH segment (bản tin phải bắt đầu bằng MSH)",
            "MSH",
            error_code="100",
        )
    if len(text) < 9 or text[3] != "|":
        raise Hl7Error(
            "AR",
            "MSH-1 field separator must be '|' (ký tự phân cách trường phải là '|')",
            "MSH-1",
            error_code="102",
            header=_scrape_header(text),
        )
    end = text.find("|", 4)
    encoding = text[4:end] if end > 0 else ""
    # 4 characters (component, repetition, escape, subcomponent); 2.7 adds a 5th (truncation).
    if not (
        4 <= len(encoding) <= 5
        and len(set(encoding)) == len(encoding)
        and not any(c.isalnum() or c.isspace() for c in encoding)
    ):
        raise Hl7Error(
            "AR",
            f"MSH-2 encoding characters {encoding!r} are not 4 distinct separators like"
            " '^~\\&' (MSH-2 sai)",
            "MSH-2",
            error_code="102",
            header=_scrape_header(text),
        )


def segments_of(text: str) -> list[Segment]:
    """Split one message into segments with unescaped values; AR when it is not HL7 or larger
    than the limits (``check_size``)."""
    _check_size(text)
    text = _normalise(text)
    _check_msh(text)
    try:
        message = hl7.parse(text.rstrip("\r"))
    except Exception as exc:  # python-hl7 raises assorted errors on malformed input
        raise Hl7Error(
            "AR",
            f"not a parseable HL7 v2 message ({type(exc).__name__})",
            "MSH",
            error_code="102",
            header=_scrape_header(text),
        ) from None
    separators = str(message.separators)  # segment, field, repetition, component, subcomponent
    label = _msh18(text.split("\r", 1)[0])
    unescape = _Unescaper(str(message.esc), separators[1], separators[2], separators[3],
                          separators[4], _CHARSETS.get(label))
    segments: list[Segment] = []
    for raw in message:
        name = str(raw[0]).strip().upper()
        fields: list[Field] = [[[[name]]]]
        for number, field in enumerate(raw[1:], start=1):
            if name == "MSH" and number <= 2:  # the separators themselves, never unescaped
                fields.append([[[str(field)]]])
                continue
            try:
                fields.append([[[unescape(s) for s in _children(component)]
                                 for component in _children(repetition)]
                                for repetition in _children(field)])
            except UnicodeDecodeError:
                raise Hl7Error(
                    "AR",
                    f"a hex escape (\\X..\\) in {name}-{number} holds bytes not valid in the"
                    f" declared character set {label} (MSH-18) (dữ liệu"
                    " không đúng bảng mã khai báo)",
                    f"{name}-{number}",
                    error_code="102",
                    header=header_of(segments[0]) if segments else _scrape_header(text),
                ) from None
        segments.append(Segment(name, fields))
    if any(s.name == "MSH" for s in segments[1:]):
        raise Hl7Error(
            "AR",
            "more than one MSH: send one message per MLLP frame, batches are not supported",
            "MSH",
            error_code="100",
            header=header_of(segments[0]),
        )
    return segments


def _children(node: object) -> list:
    """python-hl7 stores a part without separators as a plain string one level up."""
    return [node] if isinstance(node, str) else list(node)


class _Unescaper:
    """HL7 escape sequences (2.5 §2.7) back to text; formatting ones collapse to nothing.

    Hex escapes (``\\Xhh..\\``) are bytes in the message's character set (``codec``): bytes
    not valid in it raise UnicodeDecodeError, as they would in plain text. Without MSH-18 they
    are read like the text: UTF-8, else Latin-1."""

    def __init__(self, esc: str, field: str, repetition: str, component: str, sub: str,
                 codec: str | None = None) -> None:
        self.esc = esc
        self.codec = codec
        self.map = {"F": field, "R": repetition, "S": component, "T": sub, "E": esc,
                    ".br": "\n", ".sp": "\n"}

    def __call__(self, value: str) -> str:
        """One value as text, NFC-normalised: WINDOWS-1258 and some UTF-8 senders decompose
        Vietnamese letters (``Nguyê\\u0303n``), and the index, the worklist and the results
        compare and send names composed."""
        value = value.strip()
        if value == '""':  # the HL7 null ("delete this value") reads as empty here
            return ""
        if self.esc in value:
            value = self._unescape(value)
        return unicodedata.normalize("NFC", value)

    def _unescape(self, value: str) -> str:
        out, i = [], 0
        while i < len(value):
            start = value.find(self.esc, i)
            end = value.find(self.esc, start + 1) if start >= 0 else -1
            if end < 0:  # no (complete) escape left: keep the rest as it is
                out.append(value[i:])
                break
            out.append(value[i:start])
            out.append(self._sequence(value[start + 1 : end]))
            i = end + 1
        return "".join(out).strip()

    def _sequence(self, code: str) -> str:
        if code in self.map:
            return self.map[code]
        if code[:1] == "X" and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", code[1:]):
            raw = bytes.fromhex(code[1:])
            if self.codec is not None:
                return raw.decode(self.codec)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        return ""  # highlighting, charset switches (\C..\, \M..\), local \Z..\


def escape(value: str) -> str:
    """Text to an HL7 value with the standard delimiters ``|^~\\&``; line breaks as hex
    escapes, other control characters as spaces."""
    value = value.replace("\\", "\\E\\")
    for char, code in (("|", "F"), ("^", "S"), ("&", "T"), ("~", "R")):
        value = value.replace(char, f"\\{code}\\")
    value = value.replace("\r", "\\X0D\\").replace("\n", "\\X0A\\")
    return "".join(c if c >= " " else " " for c in value)


def _encoded(repetition: list[list[str]]) -> str:
    """One repetition as HL7 text in the standard delimiters, components and subcomponents
    kept."""
    return "^".join("&".join(escape(s) for s in component).rstrip("&")
                    for component in repetition).rstrip("^")


def header_of(msh: Segment) -> Header:
    def hd(field: int) -> str:
        reps = msh.repetitions(field)
        return _encoded(reps[0]) if reps else ""

    return Header(
        control_id=msh.value(10),
        message_type=msh.value(9, 1).upper(),
        trigger=msh.value(9, 2).upper(),
        structure=msh.value(9, 3).upper(),
        sending_application=hd(3),
        sending_facility=hd(4),
        receiving_application=hd(5),
        receiving_facility=hd(6),
        version=msh.value(12),
        charset=msh.value(18),
        processing_id=msh.value(11),
        accept_ack_type=msh.value(15).upper(),
        application_ack_type=msh.value(16).upper(),
    )


def _scrape_header(text: str) -> Header | None:
    """Best effort for a broken MSH: enough to address the ACK and quote MSH-10."""
    first = text.lstrip("\ufeff \t\r\n").replace("\n", "\r").split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return None
    fields = first.split(first[3])
    if len(fields) < 10:
        return None

    def get(n: int) -> str:  # MSH-n is fields[n - 1]: MSH-1 is the separator itself
        return fields[n - 1].split("^")[0].strip() if n - 1 < len(fields) else ""

    def hd(n: int) -> str:
        """Whole when MSH-2 is the standard ``^~\\&``: the field is then HL7 text as an ACK
        writes it; else (the separators may be what is broken) its first part, escaped."""
        sent = fields[n - 1].split("~")[0].strip() if n - 1 < len(fields) else ""
        if fields[1] == "^~\\&" and sent.isascii() and sent.isprintable():
            return sent
        return escape(get(n).split("&")[0])

    return Header(
        control_id=get(10),
        message_type=get(9),
        sending_application=hd(3),
        sending_facility=hd(4),
        receiving_application=hd(5),
        receiving_facility=hd(6),
        version=get(12),
        processing_id=get(11),
        accept_ack_type=get(15).upper(),
        application_ack_type=get(16).upper(),
    )


def parse_header(text: str) -> Header:
    """The MSH of ``text``; Hl7Error (AR) when there is no usable one."""
    return header_of(segments_of(text)[0])


def positions(segments: list[Segment], name: str) -> list[int]:
    """Indexes of the segments called ``name``."""
    return [i for i, s in enumerate(segments) if s.name == name]


def sequence_error(reason: str, location: str) -> Hl7Error:
    """The AR for a segment missing or out of order."""
    return Hl7Error("AR", f"{reason} (sai thứ tự hoặc thiếu segment)", location, error_code="100")


@dataclass(frozen=True)
class Ack:
    """A received ACK: MSA-1 code, MSA-2 (the control ID of the message it answers), text."""

    code: str
    control_id: str
    text: str


def read_ack(text: str) -> Ack:
    """A received ACK; its text is MSA-3, else ERR-8, else ERR-3's text."""
    segments = segments_of(text)
    header = header_of(segments[0])
    msa = next((s for s in segments if s.name == "MSA"), None)
    if header.message_type != "ACK" or msa is None:
        raise Hl7Error("AR", f"expected an ACK with an MSA segment, got {header.message_type}"
                       f"^{header.trigger}", "MSH-9", error_code="200", header=header)
    code = msa.value(1).upper()
    if code not in {"AA", "AE", "AR", "CA", "CE", "CR"}:
        raise Hl7Error("AR", f"MSA-1 acknowledgment code {code!r} is not one of AA/AE/AR/CA/"
                       "CE/CR", "MSA-1", error_code="103", header=header)
    err = next((s for s in segments if s.name == "ERR"), Segment("ERR", []))
    return Ack(code, msa.value(2),
               msa.value(3) or err.value(8) or err.value(3, 2) or err.value(1, 4, 2))


def parse_ack(text: str) -> tuple[str, str]:
    """(MSA-1 code, text) of a received ACK (see :func:`read_ack`)."""
    ack = read_ack(text)
    return ack.code, ack.text
