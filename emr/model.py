"""What the EMR side talks about, independent of how it travels (HL7 v2, FHIR, JSON).

The HL7 and FHIR modules turn messages into these and these into messages; ``emr.orders``
keeps them in the index database. Text is Unicode (Vietnamese as is); person names are in the
DICOM PN form ``Family^Given^Middle^Prefix^Suffix``; dates ``YYYYMMDD``, times ``HHMMSS``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta, timezone

# The hospital's time: times the EMR sends without an offset are in it, and those with one are
# converted to it (Asia/Ho_Chi_Minh, no daylight saving time).
LOCAL_TIMEZONE = timezone(timedelta(hours=7), "ICT")


def one_line(text: str) -> str:
    """Free text (a reason, a procedure, an address) as one line, as DICOM LO holds it: HL7
    breaks it with ``\\.br\\``, ``\\X0D0A\\`` or a raw LF, FHIR strings with line breaks and
    tabs. Identifiers and names are not made one line: a control character there is refused
    (``emr.orders.check_order``)."""
    return " ".join(text.split())


class OrderStatus(enum.StrEnum):
    """Where an order is, in the words of the worklist (Scheduled Procedure Step Status)."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"  # the modality started it (MPPS) or images arrived
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"  # stopped at the modality (MPPS DISCONTINUED)
    CANCELLED = "CANCELLED"  # withdrawn by the EMR


class OrderControl(enum.StrEnum):
    """What an order message asks for."""

    NEW = "new"  # create (or, if it exists already, the same as UPDATE: idempotent)
    UPDATE = "update"  # change details or status of an existing order
    CANCEL = "cancel"  # withdraw it


@dataclass(frozen=True)
class PatientInfo:
    """A patient as the EMR knows them. ``patient_id`` is the hospital's MRN (the DICOM
    PatientID); ``cccd`` the national ID (Căn cước công dân, 12 digits) and ``bhyt`` the
    health-insurance card number (15 characters), when given."""

    patient_id: str
    issuer: str = ""  # assigning authority of the MRN (IssuerOfPatientID)
    name: str = ""  # PN: Family^Given^Middle^Prefix^Suffix
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F or O
    cccd: str = ""
    bhyt: str = ""
    address: str = ""
    phone: str = ""


@dataclass(frozen=True)
class Order:
    """An imaging order (a requested procedure with its one scheduled step).

    ``accession_number`` identifies it everywhere (DICOM AccessionNumber, HL7 filler order
    number or OBR-18, FHIR ServiceRequest identifier); it is required."""

    accession_number: str
    patient: PatientInfo
    control: OrderControl = OrderControl.NEW
    status: OrderStatus = OrderStatus.SCHEDULED
    placer_order_number: str = ""  # the EMR's own order number (ORC-2)
    filler_order_number: str = ""  # (ORC-3); the accession number when none is given
    requested_procedure_id: str = ""
    scheduled_step_id: str = ""
    modality: str = ""  # CT, MR, CR, DX, US...
    station_ae_title: str = ""  # the modality expected to do it (ScheduledStationAETitle)
    station_name: str = ""
    scheduled_date: str = ""  # YYYYMMDD
    scheduled_time: str = ""  # HHMMSS
    procedure_code: str = ""
    procedure_code_system: str = ""  # DICOM coding scheme designator or FHIR system
    procedure_description: str = ""
    reason: str = ""
    priority: str = ""  # DICOM RequestedProcedurePriority: STAT, HIGH, ROUTINE, MEDIUM, LOW
    referring_physician: str = ""  # PN
    performing_physician: str = ""  # PN
    body_part: str = ""
    study_instance_uid: str = ""  # given to the modality through the worklist
    source: str = ""  # "hl7", "fhir" or "api"


@dataclass(frozen=True)
class PatientUpdate:
    """Registration or new demographics of a patient (ADT^A01/A04/A08)."""

    patient: PatientInfo


@dataclass(frozen=True)
class PatientMerge:
    """``prior_patient_id`` is merged into ``patient`` (ADT^A40); the prior ID stops existing."""

    patient: PatientInfo
    prior_patient_id: str
    prior_issuer: str = ""


@dataclass(frozen=True)
class ResultInstance:
    sop_class_uid: str
    sop_instance_uid: str
    number: int | None = None


@dataclass(frozen=True)
class ResultSeries:
    series_instance_uid: str
    modality: str = ""
    number: int | None = None
    description: str = ""
    body_part: str = ""  # BodyPartExamined
    instances: tuple[ResultInstance, ...] = ()


@dataclass(frozen=True)
class StudyResult:
    """A complete study as it is reported to the EMR: what it is, whose, which order, and where
    to see it."""

    study_instance_uid: str
    patient: PatientInfo
    accession_number: str = ""
    order: Order | None = None  # the order it is linked to, if any
    study_id: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS
    description: str = ""
    modalities: tuple[str, ...] = ()
    number_of_series: int = 0
    number_of_instances: int = 0
    referring_physician: str = ""
    viewer_url: str = ""  # the study in the viewer (the stable /studies/{uid} link)
    iid_url: str = ""  # IHE Invoke Image Display URL
    wado_rs_url: str = ""  # DICOMweb base, e.g. https://pacs.example/dicomweb
    series: tuple[ResultSeries, ...] = field(default_factory=tuple)
    status: str = "available"  # FHIR ImagingStudy.status
