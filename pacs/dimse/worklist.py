"""Modality Worklist (C-FIND SCP) and Modality Performed Procedure Step (N-CREATE / N-SET SCP).

Thin translations between DIMSE and ``emr``: the worklist answers from the scheduled orders,
an MPPS moves its order along (IN PROGRESS, then COMPLETED or DISCONTINUED). Answers are
encoded in UTF-8 (ISO_IR 192), so Vietnamese names reach the modality intact; a modality that
only knows ASCII still gets the unaccented parts right.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import evt

from emr import performed
from emr.coding import dicom_designator
from emr.model import OrderStatus
from emr.orders import OrderStore, StoredOrder, UnknownOrder
from emr.performed import COMPLETED, DISCONTINUED, IN_PROGRESS, PerformedSteps, StepError
from pacs.dimse import fastfind, status
from pacs.dimse.compat import pynetdicom_supported
from pacs.dimse.identifiers import read_unlabelled_as_utf8
from storage.errors import InvalidQuery
from storage.query import NameMatching

log = logging.getLogger("pacs.dimse.worklist")

_MAX_WORKLIST_ANSWERS = 1000
# Matching keys of the identifier's top level, and of its Scheduled Procedure Step item.
_TOP_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "AccessionNumber",
             "RequestedProcedureID", "StudyInstanceUID", "ReferringPhysicianName",
             "RequestedProcedurePriority")
_STEP_KEYS = ("ScheduledStationAETitle", "Modality", "ScheduledProcedureStepStartDate",
              "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID",
              "ScheduledProcedureStepStatus", "ScheduledStationName")
# Our order status as the worklist's Scheduled Procedure Step Status (PS3.3 C.4.10).
_STEP_STATUS = {OrderStatus.SCHEDULED: "SCHEDULED", OrderStatus.IN_PROGRESS: "STARTED",
                OrderStatus.COMPLETED: "COMPLETED", OrderStatus.DISCONTINUED: "DISCONTINUED",
                OrderStatus.CANCELLED: "CANCELLED"}
_STATUS_OF_STEP = {v: k.value for k, v in _STEP_STATUS.items()}

# PS3.4 F.7.2.2.4 (Table F.7.2-2): the Error ID (0000,0903) of an N-SET of a step no longer
# IN PROGRESS.
NO_LONGER_UPDATABLE_ERROR_ID = 0xA710

_STEP_ERROR_STATUS = {performed.DUPLICATE: status.DUPLICATE_SOP_INSTANCE,
                      performed.UNKNOWN: status.NO_SUCH_OBJECT_INSTANCE,
                      performed.FINAL: status.PROCESSING_FAILURE,
                      performed.INVALID: status.INVALID_ATTRIBUTE_VALUE,
                      performed.MISSING: status.MISSING_ATTRIBUTE,
                      performed.MISSING_VALUE: status.MISSING_ATTRIBUTE_VALUE,
                      performed.NOT_SETTABLE: status.INVALID_ATTRIBUTE_VALUE}
_STEP_ERROR_ID = {performed.FINAL: NO_LONGER_UPDATABLE_ERROR_ID}
# Called when a modality reports a step: (order or None, study UID, MPPS status).
PerformedListener = Callable[[StoredOrder | None, str, str], None]


SPECIFIC_CHARACTER_SET = 0x00080005


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[: status.ERROR_COMMENT_LIMIT]
    return ds


def _step_failure(exc: StepError) -> Dataset:
    """The MPPS failure status for ``exc``: its code, Error Comment, Error ID where PS3.4
    gives one, and the Attribute Identifier List (0000,1005) of the attributes at fault."""
    answer = _status(_STEP_ERROR_STATUS[exc.kind], str(exc))
    if exc.kind in _STEP_ERROR_ID:
        answer.ErrorID = _STEP_ERROR_ID[exc.kind]
    if exc.attributes:
        answer.AttributeIdentifierList = list(exc.attributes)
    return answer


def allow_attribute_list_in_n_create_answers() -> None:
    """Let N-CREATE answers carry the Attribute Identifier List (0000,1005).

    PS3.4 F.7.2.1.3 wants it with 0x0106 (a status other than IN PROGRESS) and PS3.7 C.4 with
    0x0120, but pynetdicom 3.0 knows it only for N-SET and N-GET answers: its N-CREATE
    primitive and command set lack the element. They get it here (idempotent); on another
    pynetdicom release the answers go without it."""
    if not pynetdicom_supported("the N-CREATE Attribute Identifier List",
                                "MPPS N-CREATE failures name no attributes"):
        return
    from pynetdicom import dimse_messages, dimse_primitives

    keywords = dimse_messages._COMMAND_SET_KEYWORDS["N-CREATE-RSP"]
    if "AttributeIdentifierList" not in keywords:
        dimse_messages._COMMAND_SET_KEYWORDS["N-CREATE-RSP"] = (*keywords,
                                                                "AttributeIdentifierList")
    primitive = dimse_primitives.N_CREATE
    if "AttributeIdentifierList" not in primitive.STATUS_OPTIONAL_KEYWORDS:
        primitive.AttributeIdentifierList = None  # as N_SET has it: a plain attribute
        primitive.STATUS_OPTIONAL_KEYWORDS = (*primitive.STATUS_OPTIONAL_KEYWORDS,
                                              "AttributeIdentifierList")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def worklist_keys(identifier: Dataset) -> dict[str, str]:
    """The matching keys of a worklist identifier (keyword -> DICOM match value)."""
    keys = {k: _text(identifier.get(k)) for k in _TOP_KEYS if k in identifier}
    steps = identifier.get("ScheduledProcedureStepSequence")
    if steps:
        keys.update({k: _text(steps[0].get(k)) for k in _STEP_KEYS if k in steps[0]})
    if "ScheduledProcedureStepStatus" in keys:  # worklist words to our order statuses
        keys["ScheduledProcedureStepStatus"] = "\\".join(
            _STATUS_OF_STEP.get(v.strip().upper(), v)
            for v in keys["ScheduledProcedureStepStatus"].split("\\"))
    return {k: v for k, v in keys.items() if v not in ("", "*")}


# What the worklist can say about an order, as keyword -> value (a sequence: a list of such
# dicts). Plain dicts rather than data sets: an answer is then built from the few keys the
# modality asked for, which is most of the cost of a worklist with many matches.
WorklistValues = dict[str, Any]


def worklist_item(stored: StoredOrder) -> WorklistValues:
    """Everything the worklist can say about one order (cut to the requested keys later)."""
    order, patient = stored.order, stored.order.patient
    code = [{"CodeValue": order.procedure_code[:16],
             "CodingSchemeDesignator": dicom_designator(order.procedure_code_system),
             "CodeMeaning": (order.procedure_description or order.procedure_code)[:64]}] \
        if order.procedure_code else []
    step = {
        "Modality": order.modality,
        "ScheduledStationAETitle": order.station_ae_title,
        "ScheduledStationName": order.station_name[:16],
        "ScheduledProcedureStepStartDate": order.scheduled_date,
        "ScheduledProcedureStepStartTime": order.scheduled_time,
        "ScheduledPerformingPhysicianName": order.performing_physician,
        "ScheduledProcedureStepDescription": order.procedure_description[:64],
        "ScheduledProtocolCodeSequence": code,
        "ScheduledProcedureStepID": order.scheduled_step_id,
        "ScheduledProcedureStepStatus": _STEP_STATUS[order.status],
    }
    return {
        "AccessionNumber": order.accession_number,
        "ReferringPhysicianName": order.referring_physician,
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "IssuerOfPatientID": patient.issuer,
        "PatientBirthDate": patient.birth_date,
        "PatientSex": patient.sex,
        "OtherPatientIDsSequence": [
            {"PatientID": value, "IssuerOfPatientID": issuer, "TypeOfPatientID": "TEXT"}
            for value, issuer in ((patient.cccd, "CCCD"), (patient.bhyt, "BHYT")) if value],
        "PatientAddress": patient.address[:64],
        "PatientTelephoneNumbers": patient.phone[:16],
        "StudyInstanceUID": order.study_instance_uid,
        "RequestedProcedureID": order.requested_procedure_id,
        "RequestedProcedureDescription": order.procedure_description[:64],
        "RequestedProcedureCodeSequence": code,
        "RequestedProcedurePriority": order.priority,
        "ReasonForTheRequestedProcedure": order.reason[:64],
        "PlacerOrderNumberImagingServiceRequest": order.placer_order_number[:64],
        "FillerOrderNumberImagingServiceRequest": order.filler_order_number[:64],
        "ScheduledProcedureStepSequence": [step],
    }


# An answer as (tag, VR, value); a sequence's value is a list of items, each such a list.
Elements = list[tuple[int, str, Any]]


def requested_only(values: WorklistValues, identifier: Dataset, *,
                   charset: bool = True) -> Elements:
    """The answer to ``identifier``: the keys it asks for, with the order's ``values``
    (PS3.4 C.2.2.1.2); a sequence asked for with an empty item (or none) comes whole."""
    answer: Elements = [(SPECIFIC_CHARACTER_SET, "CS", "ISO_IR 192")] if charset else []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword == "SpecificCharacterSet":
            continue
        value = values.get(keyword)
        tag = int(element.tag)
        if element.VR != "SQ":
            answer.append((tag, element.VR, value or None))
            continue
        asked = element.value[0] if element.value and len(element.value[0]) else None
        answer.append((tag, "SQ", [
            requested_only(item, asked, charset=False) if asked is not None else _whole(item)
            for item in value or []]))
    return answer


def _whole(values: WorklistValues) -> Elements:
    return [(tag_for_keyword(keyword), "SQ", [_whole(v) for v in value])
            if isinstance(value, list) else
            (tag_for_keyword(keyword), dictionary_VR(keyword), value or None)
            for keyword, value in values.items()]


def as_dataset(elements: Elements) -> Dataset:
    """The answer as a pydicom data set (transfer syntaxes the fast encoder does not do)."""
    ds = Dataset()
    for tag, vr, value in elements:
        if vr == "SQ":
            ds.add_new(tag, vr, Sequence([as_dataset(item) for item in value]))
        else:
            ds.add_new(tag, vr, value)
    return ds


class WorklistHandlers:
    """C-FIND on the Modality Worklist model, and the MPPS N-CREATE / N-SET."""

    def __init__(self, orders: OrderStore, steps: PerformedSteps, name_matching: NameMatching,
                 on_performed: PerformedListener | None = None) -> None:
        self.orders = orders
        self.steps = steps
        self.name_matching = name_matching
        self.on_performed = on_performed
        allow_attribute_list_in_n_create_answers()

    def bindings(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_CREATE, self.on_n_create), (evt.EVT_N_SET, self.on_n_set)]

    # ------------------------------------------------------------------ worklist

    def on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        try:
            identifier = event.identifier
            read_unlabelled_as_utf8(identifier)
            keys = worklist_keys(identifier)
            found = self.orders.worklist(keys, self.name_matching,
                                         limit=_MAX_WORKLIST_ANSWERS + 1)
        except InvalidQuery as exc:
            yield _status(status.QR_IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        except Exception:
            log.exception("worklist query failed")
            yield _status(status.QR_UNABLE_TO_PROCESS, "Internal error while searching"), None
            return
        if len(found) > _MAX_WORKLIST_ANSWERS:
            log.warning("worklist query matched more than %d orders; answering the first",
                        _MAX_WORKLIST_ANSWERS)
            found = found[:_MAX_WORKLIST_ANSWERS]
        answers = (requested_only(worklist_item(stored), identifier) for stored in found)
        yield from fastfind.answer_find(
            event, ((elements, True, lambda e=elements: as_dataset(e)) for elements in answers),
            cancel=status.CANCEL, success=status.SUCCESS)

    # ------------------------------------------------------------------ MPPS

    def on_n_create(self, event: evt.Event) -> tuple[Any, Dataset | None]:
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        if not sop_uid:
            return _status(status.MISSING_ATTRIBUTE, "Affected SOP Instance UID is required"), \
                None
        try:
            attributes = event.attribute_list
            performed.check_create(attributes)
            scheduled = attributes.ScheduledStepAttributesSequence
            accession = _text(scheduled[0].get("AccessionNumber"))
            study_uid = _text(scheduled[0].get("StudyInstanceUID"))
            order = self._order(accession)
            self.steps.create(sop_uid, attributes.to_json_dict(), status=IN_PROGRESS,
                              study_uid=study_uid, order_pk=order.pk if order else None)
        except StepError as exc:
            return _step_failure(exc), None
        except Exception:
            log.exception("MPPS N-CREATE failed")
            return _status(status.PROCESSING_FAILURE, "Internal error"), None
        self._performed(order, study_uid, IN_PROGRESS)
        return _status(status.SUCCESS), attributes

    def on_n_set(self, event: evt.Event) -> tuple[Any, Dataset | None]:
        sop_uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            changes = event.modification_list
            step = self.steps.update(sop_uid, changes)
        except StepError as exc:
            return _step_failure(exc), None
        except Exception:
            log.exception("MPPS N-SET failed")
            return _status(status.PROCESSING_FAILURE, "Internal error"), None
        if step.status in (COMPLETED, DISCONTINUED):
            order = self.orders.get_by_pk(step.order_pk) if step.order_pk else None
            self._performed(order, step.study_instance_uid, step.status)
        return _status(status.SUCCESS), changes

    def _order(self, accession: str) -> StoredOrder | None:
        if not accession:
            return None
        try:
            return self.orders.get(accession)
        except UnknownOrder:
            return None

    def _performed(self, order: StoredOrder | None, study_uid: str, step_status: str) -> None:
        if order is not None:
            new = {IN_PROGRESS: OrderStatus.IN_PROGRESS, COMPLETED: OrderStatus.COMPLETED,
                   DISCONTINUED: OrderStatus.DISCONTINUED}[step_status]
            if order.status is not OrderStatus.CANCELLED:
                self.orders.set_status(order.order.accession_number, new)
        if self.on_performed is not None:
            try:
                self.on_performed(order, study_uid, step_status)
            except Exception:
                log.exception("MPPS listener failed")
