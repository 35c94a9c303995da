"""HL7 v2 messages this server sends: ACKs of what the HIS sent, and ORU^R01 telling the EMR
that a study's images are available (after IHE RAD-128 "Imaging Results Available").

Built here rather than with ``python-hl7``, which turns non-ASCII into ``\\Xhh\\`` when escaping.
Everything is ``UNICODE UTF-8``.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets

from emr.coding import v2_system
from emr.hl7_segments import DEFAULT_VERSION, ERROR_CODES, UTF8, Header, escape
from emr.model import PatientInfo, StudyResult

__all__ = ["ack", "control_id_of", "oru_content", "oru_message"]

# ------------------------------------------------------------------ building messages


def _components(*values: str) -> str:
    return "^".join(escape(v) for v in values).rstrip("^")


def _hd(value: str) -> str:
    """An HD given as ``namespace^universal id^type``: its ``^`` are meant as separators."""
    return _components(*value.split("^"))


def _segment(name: str, *fields: str) -> str:
    return "|".join((name, *fields)).rstrip("|") + "\r"


def _timestamp() -> str:
    return dt.datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")


def _new_control_id() -> str:
    # 20 characters, the MSH-10 limit in 2.5: time for humans, randomness for uniqueness.
    return dt.datetime.now().strftime("%Y%m%d%H%M%S") + secrets.token_hex(3).upper()


def _msh(
    *,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    message_type: str,
    control_id: str,
    processing_id: str = "P",
    version: str = DEFAULT_VERSION,
) -> str:
    """MSH with ``sending`` and ``receiving`` (application, facility) as HL7 text already."""
    fields = [*sending, *receiving, _timestamp(), "", message_type, escape(control_id),
              escape(processing_id), escape(version), "", "", "", "", "", UTF8]
    return "MSH|^~\\&|" + "|".join(fields) + "\r"


def ack(
    header: Header | None,
    code: str,
    text: str = "",
    *,
    error_location: str = "",
    error_code: str = "",
    sending_application: str = "PACS",
    sending_facility: str = "",
) -> str:
    """An ACK for a received message: AA (accepted), AE (error) or AR (rejected).

    MSH swaps the original sender and receiver (MSH-3/4 echoed whole into MSH-5/6) and keeps
    its version (2.5.1 if unknown). For AE and AR an ERR segment carries the location (ERR-2),
    the table 0357 code (ERR-3), severity E (ERR-4) and ``text`` (ERR-8); versions before 2.5
    also get the old ERR-1. ``header`` may be None when not even the MSH could be read: MSA-2
    is then empty. MSH-4 defaults to the facility the message was addressed to. A sender in
    enhanced mode that wants no application ACK for this outcome gets the accept ACK instead
    (:func:`_answer_code`)."""
    if code not in {"AA", "AE", "AR", "CA", "CE", "CR"}:
        raise ValueError(f"acknowledgment code must be AA, AE, AR, CA, CE or CR, not {code!r}")
    header = header or Header()
    code = _answer_code(header, code)
    version = header.version or DEFAULT_VERSION
    segments = [
        _msh(
            sending=(_hd(sending_application),
                     _hd(sending_facility) if sending_facility else header.receiving_facility),
            receiving=(header.sending_application, header.sending_facility),
            message_type=_components("ACK", header.trigger, "ACK" if header.trigger else ""),
            control_id=_new_control_id(),
            processing_id=header.processing_id or "P",
            version=version,
        ),
        _segment("MSA", escape(code), escape(header.control_id), escape(text)),
    ]
    if code in {"AE", "AR", "CE", "CR"}:
        segments.append(_err(error_location, error_code or "207", text, version))
    return "".join(segments)


# Enhanced acknowledgment mode (HL7 2.5 §2.9.3): the accept ACK for each application ACK.
_ACCEPT_CODES = {"AA": "CA", "AE": "CE", "AR": "CR"}


def _answer_code(header: Header, code: str) -> str:
    """The code to answer with: the application ACK (AA/AE/AR), unless the sender is in
    enhanced mode (MSH-15 or MSH-16 valued) and MSH-16 asks for no application ACK after this
    outcome (NE never, ER only on errors, SU only on success); then the accept ACK (CA/CE/CR).

    Enhanced mode proper is two ACKs: the accept ACK on the connection, the application ACK
    later as a message of its own. We answer each message once, on its connection: when the
    sender wants both, the application ACK (which says more) is the answer."""
    if not (header.accept_ack_type or header.application_ack_type):
        return code  # original mode
    wanted = header.application_ack_type
    if (wanted == "NE" or (wanted == "ER" and code == "AA")
            or (wanted == "SU" and code != "AA")):
        return _ACCEPT_CODES.get(code, code)
    return code


def _err(location: str, error_code: str, text: str, version: str) -> str:
    match = re.fullmatch(r"([A-Z][A-Z0-9]{2})(?:-(\d+))?", location.strip().upper())
    segment_id, field = match.groups() if match else ("", None)
    erl = _components(segment_id, "1" if segment_id else "", field or "")
    code = _components(error_code, ERROR_CODES.get(error_code, ""), "HL70357")
    eld = ""
    if _version_tuple(version) < (2, 5):  # ERR-1 (ELD) is what 2.3/2.4 receivers read
        eld = "^".join((escape(segment_id), "1" if segment_id else "", field or "",
                        "&".join(escape(v) for v in (error_code,
                                                       ERROR_CODES.get(error_code, ""),
                                                       "HL70357"))))
    return _segment("ERR", eld, erl, code, "E", "", "", "", escape(text))


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3]) or (2, 5, 1)


# ------------------------------------------------------------------ ORU: images available

# OBX-3 codes. The study UID uses the DICOM code IHE RAD-128 prescribes; DICOM has no codes
# for links or counts, so those are local ("99" prefix: a local coding system in HL7).
_OBX_STUDY = ("113014", "DICOM Study", "DCM")
_OBX_VIEWER = ("VIEWER", "Study viewer link", "99PACS")
_OBX_IID = ("IID", "Invoke Image Display link", "99PACS")
_OBX_SERIES = ("NSERIES", "Number of Study Related Series", "99PACS")
_OBX_INSTANCES = ("NINSTANCES", "Number of Study Related Instances", "99PACS")

_HL7_PRIORITY = {"STAT": ("S", "Stat"), "HIGH": ("A", "ASAP"), "MEDIUM": ("T", "Timing critical"),
                 "ROUTINE": ("R", "Routine"), "LOW": ("R", "Routine")}
_NON_ACQUISITION = {"KO", "PR", "SR", "SEG", "REG", "DOC", "RWV", "PLAN"}


def oru_message(
    result: StudyResult,
    *,
    sending_application: str = "PACS",
    sending_facility: str = "",
    receiving_application: str = "",
    receiving_facility: str = "",
    control_id: str | None = None,
) -> str:
    """ORU^R01 (2.5.1, UNICODE UTF-8) telling the EMR that a study's images are available.

    Modelled on IHE RAD-128 "Imaging Results Available": ORC-1 RE with ORC-5 CM (the imaging
    procedure is done), OBR-25 R ("results stored, not yet verified": images, no signed report,
    so an EMR must not file it as a final result), OBR-18 the accession number, OBX 1 the Study
    Instance UID (113014^DICOM Study^DCM, status O as in RAD-128), then RP links to the viewer
    and IID URL and NM counts of series and instances (status F)."""
    if not result.patient.patient_id:
        raise ValueError("StudyResult.patient has no patient_id: PID-3 is required")
    order = result.order
    accession = result.accession_number or (order.accession_number if order else "")
    placer = order.placer_order_number if order else ""
    filler = (order.filler_order_number if order else "") or accession
    observed = _dtm(result.study_date, result.study_time)
    referring = result.referring_physician or (order.referring_physician if order else "")
    code, text, system = _result_procedure(result)
    priority = _HL7_PRIORITY.get(order.priority if order else "", ("R", "Routine"))
    now = _timestamp()
    segments = [
        _msh(
            sending=(_hd(sending_application), _hd(sending_facility)),
            receiving=(_hd(receiving_application), _hd(receiving_facility)),
            message_type="ORU^R01^ORU_R01",
            control_id=control_id or _new_control_id(),
        ),
        _pid(result.patient),
        _segment("PV1", "1", "U"),  # patient class unknown: the PACS does not know the visit
        _segment("ORC", "RE", escape(placer), escape(filler), "", "CM", "", "", "", now,
                 "", "", _xcn(referring)),
        _obr(
            placer=placer,
            filler=filler,
            service=_components(code, text, system),
            observed=observed,
            ordering=_xcn(referring),
            accession=accession,
            requested_procedure=order.requested_procedure_id if order else "",
            status_changed=now,
            modality=_result_modality(result),
            reason=_components("", order.reason) if order and order.reason else "",
            procedure=_components(code, text, system) if code else "",
        ),
        _segment("TQ1", "1", "", "", "", "", "", observed, "",
                 _components(*priority, "HL70485")),
    ]
    observations: list[tuple[str, tuple[str, str, str], str, str]] = [
        ("ST", _OBX_STUDY, escape(result.study_instance_uid), "O"),
    ]
    for ident, url in ((_OBX_VIEWER, result.viewer_url), (_OBX_IID, result.iid_url)):
        if url:  # RP: pointer^application^type of data (0191 IM)^subtype (0291 HTML)
            observations.append(("RP", ident, _components(url, sending_application.split("^")[0],
                                                          "IM", "HTML"), "F"))
    observations.append(("NM", _OBX_SERIES, str(result.number_of_series), "F"))
    observations.append(("NM", _OBX_INSTANCES, str(result.number_of_instances), "F"))
    for n, (value_type, ident, value, status) in enumerate(observations, start=1):
        segments.append(_segment("OBX", str(n), value_type, _components(*ident), "", value,
                                 "", "", "", "", "", status))
    return "".join(segments)


def _pid(patient: PatientInfo) -> str:
    ids = ["^".join((escape(patient.patient_id), "", "", _authority(patient.issuer), "MR"))]
    if patient.cccd:
        ids.append(_components(patient.cccd, "", "", "CCCD", "NI"))
    if patient.bhyt:
        ids.append(_components(patient.bhyt, "", "", "BHYT", "HC"))
    return _segment("PID", "1", "", "~".join(ids), "", _pn_to_xpn(patient.name), "",
                    escape(patient.birth_date), escape(patient.sex), "", "",
                    escape(patient.address), "", escape(patient.phone))


def _authority(issuer: str) -> str:
    """CX-4 (HD) of an issuer: its namespace, or an OID or URI (an issuer that came as CX-4's
    universal ID, or as a FHIR identifier system) as the universal ID with its type:
    ``&1.2.840.9.1&ISO``, where it was sent as the namespace."""
    if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        return f"&{issuer}&ISO"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", issuer):
        return f"&{escape(issuer)}&URI"
    return escape(issuer)


def _pn_parts(pn: str) -> list[str]:
    # Only the alphabetic group: ideographic/phonetic groups (after '=') have no place in XPN.
    return (pn.split("=")[0].split("^") + [""] * 5)[:5]


def _pn_to_xpn(pn: str) -> str:
    family, given, middle, prefix, suffix = _pn_parts(pn)
    return _components(family, given, middle, suffix, prefix)


def _xcn(pn: str) -> str:
    if not pn:
        return ""
    family, given, middle, prefix, suffix = _pn_parts(pn)
    return _components("", family, given, middle, suffix, prefix)


def _obr(
    *,
    placer: str,
    filler: str,
    service: str,
    observed: str,
    ordering: str,
    accession: str,
    requested_procedure: str,
    status_changed: str,
    modality: str,
    reason: str,
    procedure: str,
) -> str:
    fields = [""] * 45  # fields[n] is OBR-n
    fields[1] = "1"
    fields[2], fields[3], fields[4] = escape(placer), escape(filler), service
    fields[7], fields[16] = observed, ordering
    fields[18], fields[19] = escape(accession), escape(requested_procedure)
    fields[22], fields[24], fields[25] = status_changed, escape(modality), "R"
    fields[31], fields[44] = reason, procedure
    return _segment("OBR", *fields[1:])


def _dtm(date: str, time: str) -> str:
    """DICOM DA + TM to an HL7 DTM (local time of the modality, so no offset is claimed)."""
    if not re.fullmatch(r"\d{8}", date):
        return ""
    return date + re.sub(r"\D", "", time.split(".")[0])[:6]


def _result_procedure(result: StudyResult) -> tuple[str, str, str]:
    """OBR-4 is required: the order's procedure, else the study description as text only."""
    order = result.order
    if order and (order.procedure_code or order.procedure_description):
        system = v2_system(order.procedure_code_system) if order.procedure_code else ""
        return order.procedure_code, order.procedure_description, system
    return "", result.description or " ".join(result.modalities) or "Imaging study", ""


# Where a message we build says when it was made, by (segment, field number): MSH-7 and
# MSH-10 (the control ID holds the time), ORC-9 and OBR-22. Everything else is what it says.
_MOMENT_FIELDS = {"MSH": (7, 10), "ORC": (9,), "OBR": (22,)}


def oru_content(message: str) -> str:
    """What an ORU built here says about its study, without when it was built: two results
    of a study are the same result when this is equal (the outbox sends it once)."""
    segments = []
    for segment in message.split("\r"):
        fields = segment.split("|")
        # MSH-1 is the separator itself, so MSH-n is fields[n - 1]; elsewhere fields[n].
        shift = 1 if fields[0] == "MSH" else 0
        for number in _MOMENT_FIELDS.get(fields[0], ()):
            if number - shift < len(fields):
                fields[number - shift] = ""
        segments.append("|".join(fields))
    return "\r".join(segments)


def control_id_of(message: str) -> str:
    """MSH-10 of a message built here (what the receiver's ACK must quote in MSA-2)."""
    fields = message.split("\r", 1)[0].split("|")
    return fields[9] if len(fields) > 9 else ""


def _result_modality(result: StudyResult) -> str:
    if result.order and result.order.modality:
        return result.order.modality
    acquired = [m for m in result.modalities if m not in _NON_ACQUISITION]
    return (acquired or list(result.modalities) or [""])[0]
