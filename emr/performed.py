"""Modality Performed Procedure Steps: what the modality says it did (N-CREATE, N-SET).

What a request must and must not hold follows PS3.4 Table F.7.2-1: an N-CREATE carries every
Type 1 attribute with a value and the status IN PROGRESS; an N-SET changes only attributes the
table allows in N-SET (the patient, the scheduled step and the start are the N-CREATE's), and
only while the step is IN PROGRESS (F.7.2.2.3); the N-SET that makes it COMPLETED or
DISCONTINUED leaves a value in every attribute of the table's "Final State" column (the end
date and time), sent then or before. A refused N-SET changes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import sqlalchemy as sa
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from storage.index import Index, performed_steps

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)


class StepError(ValueError):
    """An MPPS request that cannot be applied; ``kind`` says why (one of the constants below,
    which the DIMSE side turns into its status), ``attributes`` the tags at fault."""

    def __init__(self, kind: str, message: str, attributes: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.attributes = attributes


DUPLICATE, UNKNOWN, FINAL, INVALID = "duplicate", "unknown", "final", "invalid"
MISSING, MISSING_VALUE, NOT_SETTABLE = "missing", "missing value", "not settable"
# PS3.4 F.7.2.2.4 (Table F.7.2-2): the words of a failure to update a step no longer IN PROGRESS.
NO_LONGER_UPDATABLE = "Performed Procedure Step Object may no longer be updated"

# PS3.4 Table F.7.2-1: Type 1 in N-CREATE (1/1), at the top level and in each Scheduled Step
# Attributes item.
_CREATE_REQUIRED = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID",
                    "PerformedStationAETitle", "PerformedProcedureStepStartDate",
                    "PerformedProcedureStepStartTime", "PerformedProcedureStepStatus",
                    "Modality")
_SCHEDULED_STEP_REQUIRED = ("StudyInstanceUID",)
# PS3.4 Table F.7.2-1: "Not allowed" in N-SET (everything of the scheduled step, the patient,
# the visit, where and when the step started, and the modality).
_NOT_SETTABLE = frozenset({
    "ScheduledStepAttributesSequence", "PatientName", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientSex", "ReferencedPatientSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "IssuerOfServiceEpisodeIDSequence", "ServiceEpisodeDescription",
    "PerformedProcedureStepID", "PerformedStationAETitle", "PerformedStationName",
    "PerformedLocation", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "Modality", "StudyID",
})
STATUS_TAG = 0x00400252  # Performed Procedure Step Status
# PS3.4 Table F.7.2-1: 3/1 in N-SET and Type 1 in the "Final State" column, i.e. with a value
# once the status is COMPLETED or DISCONTINUED (its Note 1), with the words of the Error
# Comment (LO, 64 characters: the tags say which). Note 2 also wants a Performed Series
# Sequence item by then; that is not checked here.
_FINAL_REQUIRED = {"PerformedProcedureStepEndDate": "End Date (0040,0250)",
                   "PerformedProcedureStepEndTime": "End Time (0040,0251)"}


def check_create(attributes: Dataset) -> None:
    """Refuse an N-CREATE without a Type 1 attribute (``MISSING``), with one empty
    (``MISSING_VALUE``), or whose status is not IN PROGRESS (``INVALID``), naming them."""
    absent, empty = _required(attributes, _CREATE_REQUIRED)
    for item in attributes.get("ScheduledStepAttributesSequence") or []:
        item_absent, item_empty = _required(item, _SCHEDULED_STEP_REQUIRED)
        absent += [k for k in item_absent if k not in absent]
        empty += [k for k in item_empty if k not in empty]
    if absent:
        raise StepError(MISSING, "missing Type 1 attribute(s): " + ", ".join(absent),
                        _tags(absent))
    if empty:
        raise StepError(MISSING_VALUE, "Type 1 attribute(s) without a value: "
                        + ", ".join(empty), _tags(empty))
    status = str(attributes.PerformedProcedureStepStatus).strip().upper()
    if status != IN_PROGRESS:
        raise StepError(INVALID, f"a new performed procedure step must be IN PROGRESS, not "
                        f"{status[:16]!r}", (STATUS_TAG,))


def check_set(changes: Dataset) -> None:
    """Refuse an N-SET of attributes PS3.4 does not allow in N-SET (``NOT_SETTABLE``: they
    stay as the N-CREATE gave them) or of an unknown status (``INVALID``)."""
    refused = [e.keyword for e in changes if e.keyword in _NOT_SETTABLE]
    if refused:
        raise StepError(NOT_SETTABLE, "not allowed in N-SET: " + ", ".join(refused),
                        _tags(refused))
    if "PerformedProcedureStepStatus" in changes:
        status = str(changes.PerformedProcedureStepStatus or "").strip().upper()
        if status not in STATUSES:
            raise StepError(INVALID, f"unknown step status {status[:16]!r}", (STATUS_TAG,))


def check_final(status: str, attributes: dict[str, Any]) -> None:
    """Refuse to make a step COMPLETED or DISCONTINUED while an attribute Table F.7.2-1 makes
    Type 1 in the final state has no value in ``attributes`` (DICOM JSON, the stored step with
    the N-SET applied). ``MISSING_VALUE`` whether it is empty or absent: PS3.7 gives N-SET no
    "missing attribute" status, and what the step lacks is a value."""
    if status not in (COMPLETED, DISCONTINUED):
        return
    lacking = [k for k in _FINAL_REQUIRED if not _json_value(attributes.get(_json_key(k)))]
    if lacking:
        raise StepError(MISSING_VALUE, f"{status} needs "
                        + ", ".join(_FINAL_REQUIRED[k] for k in lacking), _tags(lacking))


def _json_key(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def _json_value(element: dict[str, Any] | None) -> bool:
    """Whether a DICOM JSON element holds a value (not absent, empty, or only spaces)."""
    values = (element or {}).get("Value") or []
    return any(v is not None and (not isinstance(v, str) or v.strip()) for v in values)


def _required(attributes: Dataset, keywords: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(absent, present without a value) among ``keywords``."""
    absent = [k for k in keywords if k not in attributes]
    empty = [k for k in keywords if k in attributes and _empty(attributes[k].value)]
    return absent, empty


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or \
        (not isinstance(value, str) and hasattr(value, "__len__") and len(value) == 0)


def _tags(keywords: list[str]) -> tuple[int, ...]:
    return tuple(int(tag_for_keyword(k)) for k in keywords)


@dataclasses.dataclass(frozen=True)
class PerformedStep:
    sop_instance_uid: str
    status: str
    study_instance_uid: str
    order_pk: int | None
    attributes: dict[str, Any]  # DICOM JSON


class PerformedSteps:
    """The MPPS instances received, in the index database."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def create(self, sop_uid: str, attributes: dict[str, Any], *, status: str,
               study_uid: str, order_pk: int | None) -> PerformedStep:
        if status != IN_PROGRESS:
            raise StepError(INVALID,
                            "a new performed procedure step must be IN PROGRESS")
        now = dt.datetime.now(dt.UTC)
        with self.index.write_core() as conn:
            exists = conn.execute(sa.select(performed_steps.c.pk).where(
                performed_steps.c.sop_instance_uid == sop_uid)).first()
            if exists:
                raise StepError(DUPLICATE,
                                f"performed procedure step {sop_uid} exists already")
            conn.execute(performed_steps.insert().values(
                sop_instance_uid=sop_uid, status=status, study_instance_uid=study_uid,
                order_pk=order_pk, attributes=_dumps(attributes), created_at=now,
                updated_at=now))
        return PerformedStep(sop_uid, status, study_uid, order_pk, attributes)

    def update(self, sop_uid: str, changes: Dataset) -> PerformedStep:
        """Apply an N-SET: ``UNKNOWN`` for a step never created, ``FINAL`` for one no longer
        IN PROGRESS (PS3.4 F.7.2.2), :func:`check_set` for what it may change, then
        :func:`check_final` for a step it ends. A refusal leaves the stored step as it was."""
        with self.index.write_core() as conn:
            row = conn.execute(sa.select(performed_steps).where(
                performed_steps.c.sop_instance_uid == sop_uid)).first()
            if row is None:
                raise StepError(UNKNOWN,
                                f"no performed procedure step {sop_uid}")
            if row.status != IN_PROGRESS:
                raise StepError(FINAL, NO_LONGER_UPDATABLE)
            check_set(changes)
            attributes = {**_loads(row.attributes), **changes.to_json_dict()}
            new_status = str(changes.get("PerformedProcedureStepStatus") or "").strip().upper() \
                or row.status
            check_final(new_status, attributes)
            conn.execute(performed_steps.update().where(performed_steps.c.pk == row.pk)
                         .values(status=new_status, attributes=_dumps(attributes),
                                 updated_at=dt.datetime.now(dt.UTC)))
        return PerformedStep(sop_uid, new_status, row.study_instance_uid, row.order_pk,
                             attributes)


def _dumps(attributes: dict[str, Any]) -> str:
    return json.dumps(attributes, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str) -> dict[str, Any]:
    return json.loads(text)
