"""HL7 v2 (2.3–2.5.1) from the HIS: orders and patients in (the messages this server sends
are built in ``emr.hl7_out``).

Inbound: ORM^O01 and OMI^O23 (IHE Radiology Scheduled Workflow, as Vietnamese HIS send them),
ADT^A01/A04/A05/A08/A28/A31 (patient registration and updates) and ADT^A40 (merge), and the
ACKs of the EMR to our results.

The text itself (character sets, segments, unescaping, the MSH, ACKs) is read by
``emr.hl7_segments``; this module says what the segments of each message mean.

Field choices that are not obvious from the standard are written next to the code; the order
mapping follows the IHE RAD-4 / dcm4chee-arc tables (OBR-18 accession, OBR-19 requested
procedure, OBR-20 step, OBR-24 modality, OBR-34 performing, ZDS-1 or IPC-3 study UID).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from emr.hl7_segments import (
    Ack,
    Field,
    Header,
    Hl7Error,
    Segment,
    decode,
    header_of,
    parse_ack,
    parse_header,
    part,
    positions,
    read_ack,
    segments_of,
    sequence_error,
)
from emr.model import (
    LOCAL_TIMEZONE,
    Order,
    OrderControl,
    OrderStatus,
    PatientInfo,
    PatientMerge,
    PatientUpdate,
    one_line,
)

__all__ = [
    "Ack",
    "Header",
    "Hl7Error",
    "decode",
    "parse_ack",
    "parse_header",
    "parse_inbound",
    "read_ack",
]


# ------------------------------------------------------------------ inbound messages

_ORDER_TYPES = {("ORM", "O01"), ("OMI", "O23")}
_REGISTRATION_TRIGGERS = {"A01", "A04", "A05", "A08", "A28", "A31"}


def parse_inbound(text: str) -> tuple[Header, Order | PatientUpdate | PatientMerge]:
    """An inbound order or ADT message as model objects, with its header (for the ACK).

    Raises Hl7Error: AR for what we cannot read or do not take (broken MSH, wrong segment
    order, unsupported type), AE for readable messages whose content we cannot use."""
    segments = segments_of(text)
    header = header_of(segments[0])
    try:
        return header, _inbound_body(header, segments)
    except Hl7Error as exc:
        exc.header = exc.header or header
        raise


def _inbound_body(
    header: Header, segments: list[Segment]
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



def _only_pid(segments: list[Segment], kind: str) -> Segment:
    pids = positions(segments, "PID")
    if not pids:
        raise sequence_error(f"{kind} without PID segment", "PID")
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


def _identifiers(segment: Segment, field: int) -> list[_Cx]:
    """CX repetitions (id^check digit^scheme^authority^type), the authority's namespace ID or,
    if only that is given, its universal ID."""
    out = []
    for rep in segment.repetitions(field):
        if part(rep, 1):
            authority = part(rep, 4, 1) or part(rep, 4, 2)
            out.append(_Cx(part(rep, 1), authority, part(rep, 5).upper()))
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


def _patient(pid: Segment) -> PatientInfo:
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
        birth_date=_local(pid.value(7), "PID-7")[0],
        sex=_sex(pid.value(8)),
        cccd=cccd,
        bhyt=next((cx.id for cx in ids if cx.is_bhyt and cx is not mrn), ""),
        address=_address(pid.repetitions(11)),
        phone=_phone(pid.repetitions(13)) or _phone(pid.repetitions(14)),
    )


# What DICOM person names use to separate their parts (^) and groups (=). HL7 carries a ^
# inside a name part escaped (\S\) and = as it is; in a PN either would split the name.
_PN_SEPARATORS = ("^", "=")


def _pn(where: str, family: str, given: str, middle: str, prefix: str, suffix: str) -> str:
    r"""The parts of an HL7 name as a DICOM PN; AE when a part holds ``^`` or ``=``, which
    would move the rest of the name into another part (``Trần\S\X^Thị`` is not
    ``Trần^X^Thị``), as a backslash is refused for the DICOM value delimiter."""
    for value in (family, given, middle, prefix, suffix):
        separator = next((c for c in _PN_SEPARATORS if c in value), None)
        if separator is not None:
            sent = " (sent escaped as \\S\\)" if separator == "^" else ""
            raise Hl7Error(
                "AE",
                f"{where}: a name part contains {separator!r}{sent}, which separates the parts"
                " of a DICOM person name; send the name without it (tên chứa ký tự phân cách)",
                where,
                error_code="102",
            )
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def _xpn_to_pn(pid: Segment) -> str:
    """PID-5 XPN family^given^second^suffix^prefix (the legal name, type L, if several) to PN."""
    reps = pid.repetitions(5)
    if not reps:
        return ""
    rep = next((r for r in reps if part(r, 7).upper() == "L"), reps[0])
    return _pn("PID-5", part(rep, 1), part(rep, 2), part(rep, 3), part(rep, 5), part(rep, 4))


def _xcn_to_pn(segment: Segment, field: int) -> str:
    """XCN id^family^given^second^suffix^prefix (first repetition) to PN."""
    reps = segment.repetitions(field)
    if not reps:
        return ""
    r = reps[0]
    return _pn(f"{segment.name}-{field}", part(r, 2), part(r, 3), part(r, 4), part(r, 6),
               part(r, 5))


def _ndl_to_pn(segment: Segment, field: int) -> str:
    """NDL (OBR-32..35): its first component is a CNN whose parts are subcomponents."""
    reps = segment.repetitions(field)
    if not reps:
        return ""
    r = reps[0]
    return _pn(f"{segment.name}-{field}", part(r, 1, 2), part(r, 1, 3), part(r, 1, 4),
               part(r, 1, 6), part(r, 1, 5))


# DTM: YYYYMMDD[HH[MM[SS[.S...]]]][+/-ZZZZ]; the fraction of a second is not kept.
_DTM = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2})?)?)?(?:\.\d*)?([+-].*)?")
_OFFSET = re.compile(r"([+-])([01]\d|2[0-3])([0-5]\d)")


def _local(value: str, where: str) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS) of a DT/DTM in the server's local time (``emr.model.LOCAL_TIMEZONE``,
    as for FHIR): a time with an offset (``20261206070000+0000``) is converted, the date with
    it; one without is taken as local. Partial dates (year only) give nothing, DICOM DA cannot
    hold them. A day or time that does not exist is passed on as it is, for
    ``emr.orders.check_order`` to refuse; an offset that is not one is refused here (AE)."""
    match = _DTM.match(value)
    if match is None:
        return "", ""
    date, time, offset = match.groups()
    if not time:
        return date, ""
    time = time.ljust(6, "0")
    if not offset:
        return date, time
    zone = _OFFSET.fullmatch(offset.strip())
    if zone is None:
        raise Hl7Error("AE", f"{where}: time-zone offset {offset!r} is not +/-HHMM"
                       " (múi giờ sai)", where, error_code="102")
    sign, hours, minutes = zone.groups()
    shift = timedelta(hours=int(hours), minutes=int(minutes)) * (-1 if sign == "-" else 1)
    try:
        moment = datetime.strptime(date + time, "%Y%m%d%H%M%S").replace(tzinfo=timezone(shift))
    except ValueError:
        return date, time
    try:
        moment = moment.astimezone(LOCAL_TIMEZONE)
    except OverflowError:  # 00010101000000+0100 is in year 0 here
        raise Hl7Error("AE", f"{where}: outside the years 1-9999 in local time"
                       f" ({LOCAL_TIMEZONE})", where, error_code="102") from None
    # Not strftime: its %Y writes year 1 as "1" on Linux, not the "0001" of DICOM DA.
    return f"{moment.year:04d}{moment:%m%d}", f"{moment:%H%M%S}"


def _sex(value: str) -> str:
    # Table 0001: A (ambiguous) is "other" in DICOM; U (unknown) and N (not applicable) are not.
    code = value[:1].upper()
    if code in {"M", "F", "O"}:
        return code
    return "O" if code == "A" else ""


def _address(reps: Field) -> str:
    """XAD street^other designation^city^state or province^zip^country as one readable line."""
    if not reps:
        return ""
    rep = reps[0]
    # SAD: street address & street name & dwelling number; the first is the whole line.
    street = part(rep, 1, 1) or " ".join(p for p in (part(rep, 1, 3), part(rep, 1, 2)) if p)
    parts = [street, *(part(rep, n) for n in (2, 3, 4, 5))]
    country = part(rep, 6)
    if country.upper() not in {"", "VN", "VNM"}:  # a domestic address reads better without it
        parts.append(country)
    return ", ".join(line for line in map(one_line, parts) if line)


def _phone(reps: Field) -> str:
    """XTN: the 2.3 formatted number, else 2.5 unformatted (12), else area code + local (6, 7)."""
    for rep in reps:
        number = part(rep, 1) or part(rep, 12) or (part(rep, 6) + part(rep, 7))
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


def _order(segments: list[Segment], kind: str) -> Order:
    pid_at, orc_at = positions(segments, "PID"), positions(segments, "ORC")
    obr_at, ipc_at = positions(segments, "OBR"), positions(segments, "IPC")
    if not pid_at:
        raise sequence_error(f"{kind} without PID segment", "PID")
    if not orc_at:
        raise sequence_error(f"{kind} without ORC segment", "ORC")
    if not obr_at:
        raise sequence_error(f"{kind} without OBR segment", "OBR")
    if pid_at[-1] > orc_at[0]:
        raise sequence_error("PID after ORC: the patient must come before the order", "PID")
    if obr_at[0] < orc_at[0]:
        raise sequence_error("OBR before ORC: each OBR must follow its ORC", "OBR")
    if ipc_at and ipc_at[0] < obr_at[0]:
        raise sequence_error("IPC before OBR: IPC must follow the OBR it details", "IPC")
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
    ipc = segments[ipc_at[0]] if ipc_at else Segment("IPC", [])
    zds = next((s for s in segments if s.name == "ZDS"), Segment("ZDS", []))
    pv1 = next((s for s in segments if s.name == "PV1"), Segment("PV1", []))
    tq1 = next((s for s in segments if s.name == "TQ1"), Segment("TQ1", []))

    control, status = _control(orc)
    # Not OBR-20 (filler field 1, the scheduled step ID in IHE): HIS number steps 1, 2...
    # per order, and two orders taking step "1" as accession would become one.
    accession = ipc.value(1) or obr.value(18) or orc.value(3) or obr.value(3)
    if not accession:
        raise Hl7Error(
            "AE",
            "no accession number: IPC-1, OBR-18, or the filler order number ORC-3/OBR-3"
            " (thiếu số accession)",
            "OBR-18",
            error_code="101",
        )
    scheduled_date, scheduled_time = _scheduled(obr, tq1, orc)
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
        scheduled_date=scheduled_date,
        scheduled_time=scheduled_time,
        procedure_code=code,
        procedure_code_system=system,
        procedure_description=description,
        reason=one_line(obr.value(31, 2) or obr.value(31, 1) or obr.value(13)),
        priority=_priority(tq1.value(9) or obr.value(27, 6) or orc.value(7, 6) or obr.value(5)),
        referring_physician=(
            _xcn_to_pn(orc, 12) or _xcn_to_pn(obr, 16) or _xcn_to_pn(pv1, 8)
        ),
        performing_physician=_ndl_to_pn(obr, 34),
        study_instance_uid=_study_uid(ipc, zds),
        source="hl7",
    )


def _scheduled(obr: Segment, tq1: Segment, orc: Segment) -> tuple[str, str]:
    """Local date and time of the start: OBR-36, else TQ1-7, else the quantity/timing start
    (OBR-27.4, ORC-7.4)."""
    for segment, field, component in ((obr, 36, 1), (tq1, 7, 1), (obr, 27, 4), (orc, 7, 4)):
        if value := segment.value(field, component):
            return _local(value, f"{segment.name}-{field}")
    return "", ""


def _control(orc: Segment) -> tuple[OrderControl, OrderStatus]:
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


def _procedure(obr: Segment) -> tuple[str, str, str]:
    """(code, text, coding system): OBR-4 (or its alternate triplet 4-6), else OBR-44."""
    for field, first in ((4, 1), (4, 4), (44, 1)):
        code, text = obr.value(field, first), one_line(obr.value(field, first + 1))
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


def _study_uid(ipc: Segment, zds: Segment) -> str:
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


def _merge(segments: list[Segment]) -> PatientMerge:
    pid = _only_pid(segments, "ADT^A40")
    mrg_at = positions(segments, "MRG")
    if not mrg_at:
        raise sequence_error("ADT^A40 without MRG segment", "MRG")
    if mrg_at[0] < positions(segments, "PID")[0]:
        raise sequence_error("MRG before PID: MRG must follow the surviving patient's PID",
                              "MRG")
    mrg = segments[mrg_at[0]]
    prior = _primary(_identifiers(mrg, 1) or _identifiers(mrg, 4))  # MRG-4: withdrawn prior ID
    if prior is None:
        raise Hl7Error("AE", "MRG-1 prior patient identifier is empty (thiếu mã bệnh nhân cũ)",
                       "MRG-1", error_code="101")
    # A prior that is the surviving patient itself is refused by EmrService.merge_patients,
    # for every way a merge comes in.
    return PatientMerge(patient=_patient(pid), prior_patient_id=prior.id,
                        prior_issuer=prior.authority)
