"""HL7 v2 (2.3–2.5.1) from the HIS: orders and patients in (the messages this server sends
are built in ``emr.hl7_out``).

Inbound: ORM^O01 and OMI^O23 (IHE Radiology Scheduled Workflow, as Vietnamese HIS send them),
ADT^A01/A04/A05/A08/A28/A31 (patient registration and updates) and ADT^A40 (merge), and the
ACKs of the EMR to our results.

Parsing splits with ``python-hl7``; unescaping is done here, because the library logs field
contents (patient data) when an escape sequence is malformed.

Field choices that are not obvious from the standard are written next to the code; the order
mapping follows the IHE RAD-4 / dcm4chee-arc tables (OBR-18 accession, OBR-19 requested
procedure, OBR-20 step, OBR-24 modality, OBR-34 performing, ZDS-1 or IPC-3 study UID).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import hl7

from emr.model import (
    Order,
    OrderControl,
    OrderStatus,
    PatientInfo,
    PatientMerge,
    PatientUpdate,
)

__all__ = [
    "Header",
    "Hl7Error",
    "decode",
    "parse_ack",
    "parse_header",
    "parse_inbound",
]

DEFAULT_VERSION = "2.5.1"
UTF8 = "UNICODE UTF-8"

# HL7 table 0357 (message error condition codes), used in ERR-3.
ERROR_CODES = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
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
    """The MSH of a received message. HD fields keep their components joined by ``^``."""

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
    rather than guessed, so that names are never silently garbled."""
    data = data.removeprefix(codecs.BOM_UTF8)
    label = _raw_msh18(data)
    if not label:
        try:
            return _normalise(data.decode("utf-8"))
        except UnicodeDecodeError:
            return _normalise(data.decode("latin-1"))
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
        return _normalise(data.decode(codec))
    except UnicodeDecodeError as exc:
        raise Hl7Error(
            "AR",
            f"bytes not valid in the declared character set {label} (MSH-18) at byte"
            f" {exc.start} (dữ liệu không đúng bảng mã khai báo)",
            "MSH-18",
            error_code="102",
            header=_scrape_header(data.decode("latin-1")),
        ) from None


def _raw_msh18(data: bytes) -> str:
    """MSH-18 read from the raw bytes: the MSH fields are ASCII in every charset we accept."""
    start = data.find(b"MSH")
    if start < 0 or len(data) < start + 8:
        return ""
    end = min((i for i in (data.find(b"\r", start), data.find(b"\n", start)) if i >= 0),
              default=len(data))
    fields = data[start:end].split(data[start + 3 : start + 4])
    if len(fields) < 18:
        return ""
    repetition = fields[1][1:2] or b"~"  # MSH-2 is component, repetition, escape, subcomponent
    first = fields[17].split(repetition)[0]
    return first.decode("ascii", "replace").strip().upper()


def _normalise(text: str) -> str:
    """Segments separated by ``\\r`` whatever the sender used (``\\r``, ``\\n``, ``\\r\\n``)."""
    text = text.lstrip("\ufeff \t\r\n")
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return "".join(line + "\r" for line in lines if line.strip())


# ------------------------------------------------------------------ parsing

# One field: repetitions of components of subcomponents, all unescaped.
_Field = list[list[list[str]]]


@dataclass
class _Segment:
    name: str
    fields: list[_Field]  # fields[n] is SEG-n; fields[0] holds the name

    def repetitions(self, field: int) -> _Field:
        return self.fields[field] if 0 < field < len(self.fields) else []

    def value(self, field: int, component: int = 1, subcomponent: int = 1) -> str:
        reps = self.repetitions(field)
        return _part(reps[0], component, subcomponent) if reps else ""


def _part(repetition: list[list[str]], component: int, subcomponent: int = 1) -> str:
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


def _segments(text: str) -> list[_Segment]:
    """Split one message into segments with unescaped values; AR when it is not HL7."""
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
    unescape = _Unescaper(str(message.esc), separators[1], separators[2], separators[3],
                          separators[4])
    segments = []
    for raw in message:
        name = str(raw[0]).strip().upper()
        fields: list[_Field] = [[[[name]]]]
        for number, field in enumerate(raw[1:], start=1):
            if name == "MSH" and number <= 2:  # the separators themselves, never unescaped
                fields.append([[[str(field)]]])
            else:
                fields.append([[[unescape(s) for s in _children(component)]
                                 for component in _children(repetition)]
                                for repetition in _children(field)])
        segments.append(_Segment(name, fields))
    if any(s.name == "MSH" for s in segments[1:]):
        raise Hl7Error(
            "AR",
            "more than one MSH: send one message per MLLP frame, batches are not supported",
            "MSH",
            error_code="100",
            header=_header(segments[0]),
        )
    return segments


def _children(node: object) -> list:
    """python-hl7 stores a part without separators as a plain string one level up."""
    return [node] if isinstance(node, str) else list(node)


class _Unescaper:
    """HL7 escape sequences (2.5 §2.7) back to text; formatting ones collapse to nothing."""

    def __init__(self, esc: str, field: str, repetition: str, component: str, sub: str) -> None:
        self.esc = esc
        self.map = {"F": field, "R": repetition, "S": component, "T": sub, "E": esc,
                    ".br": "\n", ".sp": "\n"}

    def __call__(self, value: str) -> str:
        value = value.strip()
        if value == '""':  # the HL7 null ("delete this value") reads as empty here
            return ""
        if self.esc not in value:
            return value
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
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        return ""  # highlighting, charset switches (\C..\, \M..\), local \Z..\


def _header(msh: _Segment) -> Header:
    def hd(field: int) -> str:
        reps = msh.repetitions(field)
        return "^".join(c[0] if c else "" for c in reps[0]).rstrip("^") if reps else ""

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

    return Header(
        control_id=get(10),
        message_type=get(9),
        sending_application=get(3),
        sending_facility=get(4),
        receiving_application=get(5),
        receiving_facility=get(6),
        version=get(12),
        processing_id=get(11),
    )


def parse_header(text: str) -> Header:
    """The MSH of ``text``; Hl7Error (AR) when there is no usable one."""
    return _header(_segments(text)[0])


# ------------------------------------------------------------------ inbound messages

_ORDER_TYPES = {("ORM", "O01"), ("OMI", "O23")}
_REGISTRATION_TRIGGERS = {"A01", "A04", "A05", "A08", "A28", "A31"}


def parse_inbound(text: str) -> tuple[Header, Order | PatientUpdate | PatientMerge]:
    """An inbound order or ADT message as model objects, with its header (for the ACK).

    Raises Hl7Error: AR for what we cannot read or do not take (broken MSH, wrong segment
    order, unsupported type), AE for readable messages whose content we cannot use."""
    segments = _segments(text)
    header = _header(segments[0])
    try:
        return header, _inbound_body(header, segments)
    except Hl7Error as exc:
        exc.header = exc.header or header
        raise


def _inbound_body(
    header: Header, segments: list[_Segment]
) -> Order | PatientUpdate | PatientMerge:
    if not header.message_type:
        raise Hl7Error("AR", "MSH-9 message type is empty (thiếu loại bản tin)", "MSH-9",
                       error_code="101")
    if not header.control_id:
        raise Hl7Error("AR", "MSH-10 message control ID is empty (thiếu mã bản tin)", "MSH-10",
                       error_code="101")
    kind = f"{header.message_type}^{header.trigger}"
    if (header.message_type, header.trigger) in _ORDER_TYPES:
        return _order(segments, kind)
    if header.message_type == "ADT" and header.trigger in _REGISTRATION_TRIGGERS:
        return PatientUpdate(_patient(_only_pid(segments, kind)))
    if header.message_type == "ADT" and header.trigger == "A40":
        return _merge(segments)
    known_type = header.message_type in {"ADT", "ORM", "OMI"}
    raise Hl7Error(
        "AR",
        f"unsupported message type {kind}; accepted: ORM^O01, OMI^O23, ADT^A01/A04/A05/A08/"
        f"A28/A31/A40 (loại bản tin không được hỗ trợ)",
        "MSH-9",
        error_code="201" if known_type else "200",
    )


def _positions(segments: list[_Segment], name: str) -> list[int]:
    return [i for i, s in enumerate(segments) if s.name == name]


def _sequence_error(reason: str, location: str) -> Hl7Error:
    return Hl7Error("AR", f"{reason} (sai thứ tự hoặc thiếu segment)", location, error_code="100")


def _only_pid(segments: list[_Segment], kind: str) -> _Segment:
    pids = _positions(segments, "PID")
    if not pids:
        raise _sequence_error(f"{kind} without PID segment", "PID")
    if len(pids) > 1:
        raise Hl7Error("AE", f"{kind} with {len(pids)} PID segments; send one patient per"
                       " message (mỗi bản tin một bệnh nhân)", "PID", error_code="207")
    return segments[pids[0]]


# --- patient

# PID-3 identifier type codes (HL7 table 0203, and what Vietnamese HIS use).
_MRN_TYPES = ("MR", "PI")
_CCCD_TYPES = {"NI", "NN", "NNVNM", "CCCD", "CMND"}
_BHYT_TYPES = {"HC", "BHYT", "INS", "NH", "NHI"}


@dataclass(frozen=True)
class _Cx:
    id: str
    authority: str
    type: str

    @property
    def is_cccd(self) -> bool:
        return self.type in _CCCD_TYPES or "CCCD" in self.authority

    @property
    def is_bhyt(self) -> bool:
        return self.type in _BHYT_TYPES or any(a in self.authority for a in ("BHYT", "BHXH"))


def _identifiers(segment: _Segment, field: int) -> list[_Cx]:
    """CX repetitions (id^check digit^scheme^authority^type), the authority's namespace ID or,
    if only that is given, its universal ID."""
    out = []
    for rep in segment.repetitions(field):
        if _part(rep, 1):
            authority = _part(rep, 4, 1) or _part(rep, 4, 2)
            out.append(_Cx(_part(rep, 1), authority, _part(rep, 5).upper()))
    return out


def _primary(ids: list[_Cx]) -> _Cx | None:
    """The MRN: type MR, else PI, else the first identifier that is not a CCCD or BHYT number,
    else the first of all."""
    for wanted in _MRN_TYPES:
        for cx in ids:
            if cx.type == wanted:
                return cx
    plain = [cx for cx in ids if not (cx.is_cccd or cx.is_bhyt)]
    return (plain or ids or [None])[0]


def _patient(pid: _Segment) -> PatientInfo:
    # PID-2 (external ID, withdrawn after 2.3.1) is where some old HIS still put the MRN.
    ids = _identifiers(pid, 3) or _identifiers(pid, 2)
    mrn = _primary(ids)
    if mrn is None:
        raise Hl7Error("AE", "no patient identifier in PID-3 (thiếu mã bệnh nhân PID-3)",
                       "PID-3", error_code="101")
    cccd = next((cx.id for cx in ids if cx.is_cccd and cx is not mrn), "")
    # PID-19 (SSN) only when it has the shape of a CCCD (12 digits): in 2.3-era messages the
    # field is used for many things, and a wrong national ID is worse than none.
    if not cccd and re.fullmatch(r"\d{12}", pid.value(19)):
        cccd = pid.value(19)
    return PatientInfo(
        patient_id=mrn.id,
        issuer=mrn.authority,
        name=_xpn_to_pn(pid),
        birth_date=_date(pid.value(7)),
        sex=_sex(pid.value(8)),
        cccd=cccd,
        bhyt=next((cx.id for cx in ids if cx.is_bhyt and cx is not mrn), ""),
        address=_address(pid.repetitions(11)),
        phone=_phone(pid.repetitions(13)) or _phone(pid.repetitions(14)),
    )


def _pn(family: str, given: str, middle: str, prefix: str, suffix: str) -> str:
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def _xpn_to_pn(pid: _Segment) -> str:
    """PID-5 XPN family^given^second^suffix^prefix (the legal name, type L, if several) to PN."""
    reps = pid.repetitions(5)
    if not reps:
        return ""
    rep = next((r for r in reps if _part(r, 7).upper() == "L"), reps[0])
    return _pn(_part(rep, 1), _part(rep, 2), _part(rep, 3), _part(rep, 5), _part(rep, 4))


def _xcn_to_pn(segment: _Segment, field: int) -> str:
    """XCN id^family^given^second^suffix^prefix (first repetition) to PN."""
    reps = segment.repetitions(field)
    if not reps:
        return ""
    r = reps[0]
    return _pn(_part(r, 2), _part(r, 3), _part(r, 4), _part(r, 6), _part(r, 5))


def _ndl_to_pn(segment: _Segment, field: int) -> str:
    """NDL (OBR-32..35): its first component is a CNN whose parts are subcomponents."""
    reps = segment.repetitions(field)
    if not reps:
        return ""
    r = reps[0]
    return _pn(_part(r, 1, 2), _part(r, 1, 3), _part(r, 1, 4), _part(r, 1, 6), _part(r, 1, 5))


def _date(value: str) -> str:
    """YYYYMMDD from a DT/DTM; partial dates (year only) are dropped, DICOM DA cannot hold them."""
    digits = value[:8]
    return digits if re.fullmatch(r"\d{8}", digits) else ""


def _time(value: str) -> str:
    """HHMMSS from a DTM (YYYYMMDDHH[MM[SS]]...); the time-zone offset is ignored."""
    match = re.match(r"\d{8}(\d{2,6})", value)
    return match.group(1).ljust(6, "0")[:6] if match else ""


def _sex(value: str) -> str:
    # Table 0001: A (ambiguous) is "other" in DICOM; U (unknown) and N (not applicable) are not.
    code = value[:1].upper()
    if code in {"M", "F", "O"}:
        return code
    return "O" if code == "A" else ""


def _address(reps: _Field) -> str:
    """XAD street^other designation^city^state or province^zip^country as one readable line."""
    if not reps:
        return ""
    rep = reps[0]
    # SAD: street address & street name & dwelling number; the first is the whole line.
    street = _part(rep, 1, 1) or " ".join(p for p in (_part(rep, 1, 3), _part(rep, 1, 2)) if p)
    parts = [street, *(_part(rep, n) for n in (2, 3, 4, 5))]
    country = _part(rep, 6)
    if country.upper() not in {"", "VN", "VNM"}:  # a domestic address reads better without it
        parts.append(country)
    return ", ".join(p for p in parts if p)


def _phone(reps: _Field) -> str:
    """XTN: the 2.3 formatted number, else 2.5 unformatted (12), else area code + local (6, 7)."""
    for rep in reps:
        number = _part(rep, 1) or _part(rep, 12) or (_part(rep, 6) + _part(rep, 7))
        if number:
            return number
    return ""


# --- order

# ORC-1 (table 0119) to what the message asks of us.
_CANCEL_CONTROLS = {"CA", "OC", "DC", "OD", "CR"}
_UPDATE_CONTROLS = {"XO", "XX", "SC"}

# ORC-5 (table 0038). SC is "in process, scheduled": the order is scheduled, not started.
_ORDER_STATUS = {
    "SC": OrderStatus.SCHEDULED,
    "IP": OrderStatus.IN_PROGRESS,
    "A": OrderStatus.IN_PROGRESS,  # some, but not all, results available
    "CM": OrderStatus.COMPLETED,
    "CA": OrderStatus.CANCELLED,
    "DC": OrderStatus.DISCONTINUED,
}

# TQ-6 / TQ1-9 priority (table 0027/0485) to DICOM Requested Procedure Priority, as IHE RAD
# maps it (Pre-op and Callback are urgent, hence HIGH).
_PRIORITY = {"S": "STAT", "A": "HIGH", "R": "ROUTINE", "P": "HIGH", "C": "HIGH", "T": "MEDIUM"}

# DICOM modality defined terms accepted from IPC-5 / OBR-24.
_MODALITIES = frozenset({
    "AR", "AU", "BDUS", "BI", "BMD", "CR", "CT", "DG", "DX", "ECG", "EPS", "ES", "GM", "HD",
    "IO", "IVOCT", "IVUS", "KER", "LEN", "LS", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM",
    "OPT", "OPV", "OSS", "OT", "PT", "PX", "RF", "RG", "SM", "SRF", "TG", "US", "VA", "XA", "XC",
})
# OBR-24 holds HL7 table 0074 (diagnostic service section); the sections that name a modality.
_SECTION_MODALITY = {"NMR": "MR", "NMS": "NM", "RUS": "US", "VUS": "US", "OUS": "US",
                     "CUS": "US", "XRC": "XA"}

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_AE_TITLE = re.compile(r"(?=.*[A-Z])[A-Z0-9_.-]{2,16}")


def _order(segments: list[_Segment], kind: str) -> Order:
    pid_at, orc_at = _positions(segments, "PID"), _positions(segments, "ORC")
    obr_at, ipc_at = _positions(segments, "OBR"), _positions(segments, "IPC")
    if not pid_at:
        raise _sequence_error(f"{kind} without PID segment", "PID")
    if not orc_at:
        raise _sequence_error(f"{kind} without ORC segment", "ORC")
    if not obr_at:
        raise _sequence_error(f"{kind} without OBR segment", "OBR")
    if pid_at[-1] > orc_at[0]:
        raise _sequence_error("PID after ORC: the patient must come before the order", "PID")
    if obr_at[0] < orc_at[0]:
        raise _sequence_error("OBR before ORC: each OBR must follow its ORC", "OBR")
    if ipc_at and ipc_at[0] < obr_at[0]:
        raise _sequence_error("IPC before OBR: IPC must follow the OBR it details", "IPC")
    if len(pid_at) > 1:
        raise Hl7Error("AE", f"{kind} with {len(pid_at)} PID segments; send one patient per"
                       " message (mỗi bản tin một bệnh nhân)", "PID", error_code="207")
    if len(orc_at) > 1 or len(obr_at) > 1:
        # Silently taking the first would lose the other procedures.
        raise Hl7Error(
            "AE",
            f"{kind} carries {max(len(orc_at), len(obr_at))} orders; send one ORC/OBR per"
            " message (mỗi bản tin một chỉ định)",
            "ORC",
            error_code="207",
        )
    pid, orc, obr = segments[pid_at[0]], segments[orc_at[0]], segments[obr_at[0]]
    # OMI requires IPC, but an OMI without it still has everything in OBR: take it from there.
    # Several IPC are several steps of one procedure; the model holds one, the first.
    ipc = segments[ipc_at[0]] if ipc_at else _Segment("IPC", [])
    zds = next((s for s in segments if s.name == "ZDS"), _Segment("ZDS", []))
    pv1 = next((s for s in segments if s.name == "PV1"), _Segment("PV1", []))
    tq1 = next((s for s in segments if s.name == "TQ1"), _Segment("TQ1", []))

    control, status = _control(orc)
    accession = ipc.value(1) or obr.value(18) or orc.value(3) or obr.value(3) or obr.value(20)
    if not accession:
        raise Hl7Error(
            "AE",
            "no accession number: OBR-18, IPC-1 or ORC-3/OBR-20 filler order number"
            " (thiếu số accession)",
            "OBR-18",
            error_code="101",
        )
    scheduled = obr.value(36) or tq1.value(7) or obr.value(27, 4) or orc.value(7, 4)
    code, description, system = _procedure(obr)
    return Order(
        accession_number=accession,
        patient=_patient(pid),
        control=control,
        status=status,
        placer_order_number=orc.value(2) or obr.value(2),
        filler_order_number=orc.value(3) or obr.value(3),
        requested_procedure_id=ipc.value(2) or obr.value(19),
        scheduled_step_id=ipc.value(4) or obr.value(20),
        modality=_modality(ipc.value(5)) or _modality(obr.value(24)),
        station_ae_title=ipc.value(9) or _ae_title(obr.value(21)),
        station_name=ipc.value(7),
        scheduled_date=_date(scheduled),
        scheduled_time=_time(scheduled),
        procedure_code=code,
        procedure_code_system=system,
        procedure_description=description,
        reason=obr.value(31, 2) or obr.value(31, 1) or obr.value(13),
        priority=_priority(tq1.value(9) or obr.value(27, 6) or orc.value(7, 6) or obr.value(5)),
        referring_physician=(
            _xcn_to_pn(orc, 12) or _xcn_to_pn(obr, 16) or _xcn_to_pn(pv1, 8)
        ),
        performing_physician=_ndl_to_pn(obr, 34),
        study_instance_uid=_study_uid(ipc, zds),
        source="hl7",
    )


def _control(orc: _Segment) -> tuple[OrderControl, OrderStatus]:
    code, status = orc.value(1).upper(), orc.value(5).upper()
    if not code:
        raise Hl7Error("AE", "ORC-1 order control is empty (thiếu ORC-1)", "ORC-1",
                       error_code="101")
    if code == "NW":
        return OrderControl.NEW, OrderStatus.SCHEDULED
    if code in _CANCEL_CONTROLS:
        return OrderControl.CANCEL, OrderStatus.CANCELLED
    if code in _UPDATE_CONTROLS:
        return OrderControl.UPDATE, _ORDER_STATUS.get(status, OrderStatus.SCHEDULED)
    raise Hl7Error(
        "AE",
        f"unsupported order control {code!r} in ORC-1; accepted: NW, XO, XX, SC, CA, OC, DC, OD"
        " (mã ORC-1 không hỗ trợ)",
        "ORC-1",
        error_code="103",
    )


def _procedure(obr: _Segment) -> tuple[str, str, str]:
    """(code, text, coding system): OBR-4 (or its alternate triplet 4-6), else OBR-44."""
    for field, first in ((4, 1), (4, 4), (44, 1)):
        code, text = obr.value(field, first), obr.value(field, first + 1)
        if code or text:
            return code, text, obr.value(field, first + 2)
    return "", "", ""


def _modality(value: str) -> str:
    code = value.strip().upper()
    code = _SECTION_MODALITY.get(code, code)
    return code if code in _MODALITIES else ""


def _ae_title(value: str) -> str:
    """OBR-21 (filler field 2) if it looks like an AE title; some HIS put the modality's there."""
    return value if _AE_TITLE.fullmatch(value) else ""


def _priority(value: str) -> str:
    code = value.strip().upper()
    return _PRIORITY.get({"STAT": "S", "ASAP": "A", "ROUTINE": "R"}.get(code, code), "")


def _study_uid(ipc: _Segment, zds: _Segment) -> str:
    for segment, field in ((ipc, 3), (zds, 1)):
        uid = segment.value(field)
        if uid:
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise Hl7Error("AE", f"{segment.name}-{field} is not a valid DICOM UID"
                               " (Study Instance UID sai)", f"{segment.name}-{field}",
                               error_code="102")
            return uid
    return ""


# --- merge


def _merge(segments: list[_Segment]) -> PatientMerge:
    pid = _only_pid(segments, "ADT^A40")
    mrg_at = _positions(segments, "MRG")
    if not mrg_at:
        raise _sequence_error("ADT^A40 without MRG segment", "MRG")
    if mrg_at[0] < _positions(segments, "PID")[0]:
        raise _sequence_error("MRG before PID: MRG must follow the surviving patient's PID",
                              "MRG")
    mrg = segments[mrg_at[0]]
    prior = _primary(_identifiers(mrg, 1) or _identifiers(mrg, 4))  # MRG-4: withdrawn prior ID
    if prior is None:
        raise Hl7Error("AE", "MRG-1 prior patient identifier is empty (thiếu mã bệnh nhân cũ)",
                       "MRG-1", error_code="101")
    patient = _patient(pid)
    if (prior.id, prior.authority) == (patient.patient_id, patient.issuer):
        raise Hl7Error("AE", "MRG-1 names the surviving patient itself (gộp bệnh nhân vào chính"
                       " nó)", "MRG-1", error_code="207")
    return PatientMerge(patient=patient, prior_patient_id=prior.id, prior_issuer=prior.authority)


def parse_ack(text: str) -> tuple[str, str]:
    """(MSA-1 code, text) of a received ACK; the text is MSA-3, else ERR-8, else ERR-3's text."""
    segments = _segments(text)
    header = _header(segments[0])
    msa = next((s for s in segments if s.name == "MSA"), None)
    if header.message_type != "ACK" or msa is None:
        raise Hl7Error("AR", f"expected an ACK with an MSA segment, got {header.message_type}"
                       f"^{header.trigger}", "MSH-9", error_code="200", header=header)
    code = msa.value(1).upper()
    if code not in {"AA", "AE", "AR", "CA", "CE", "CR"}:
        raise Hl7Error("AR", f"MSA-1 acknowledgment code {code!r} is not one of AA/AE/AR/CA/"
                       "CE/CR", "MSA-1", error_code="103", header=header)
    err = next((s for s in segments if s.name == "ERR"), _Segment("ERR", []))
    return code, msa.value(3) or err.value(8) or err.value(3, 2) or err.value(1, 4, 2)
