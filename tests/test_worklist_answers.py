"""Worklist answers hold what the modality asked for (PS3.4 C.2.2.1.2), nothing else."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from pydicom.dataset import Dataset

from emr.model import Order, OrderStatus, PatientInfo
from emr.orders import StoredOrder
from pacs.dimse.worklist import as_dataset, requested_only, worklist_item, worklist_keys

NOW = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
ORDER = StoredOrder(1, Order(
    accession_number="A1", status=OrderStatus.IN_PROGRESS, modality="CT",
    station_ae_title="CT01", scheduled_date="20261204", scheduled_time="0900",
    procedure_code="CT001", procedure_description="CT bụng", study_instance_uid="1.2.3",
    patient=PatientInfo("BN1", name="Nguyễn^Văn An", cccd="079088001234", bhyt="DN47979")),
    1, NOW, NOW)


def identifier(**top) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in top.items():
        setattr(ds, keyword, value)
    return ds


def test_answer_holds_the_requested_keys_only_in_utf8():
    step = Dataset()
    step.Modality = ""
    step.ScheduledProcedureStepStatus = ""
    asked = identifier(PatientName="", AccessionNumber="", PatientWeight="",
                       ScheduledProcedureStepSequence=[step])

    answer = as_dataset(requested_only(worklist_item(ORDER), asked))

    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == "Nguyễn^Văn An" and answer.AccessionNumber == "A1"
    assert answer.PatientWeight is None  # asked for, unknown here: present and empty
    assert "PatientID" not in answer and "StudyInstanceUID" not in answer
    (item,) = answer.ScheduledProcedureStepSequence
    assert set(item.dir()) == {"Modality", "ScheduledProcedureStepStatus"}
    assert item.ScheduledProcedureStepStatus == "STARTED"  # the worklist's word


def test_a_sequence_asked_with_an_empty_item_comes_whole():
    asked = identifier(OtherPatientIDsSequence=[], ScheduledProcedureStepSequence=[Dataset()])

    answer = as_dataset(requested_only(worklist_item(ORDER), asked))

    others = {(o.IssuerOfPatientID, o.PatientID) for o in answer.OtherPatientIDsSequence}
    assert others == {("CCCD", "079088001234"), ("BHYT", "DN47979")}
    (step,) = answer.ScheduledProcedureStepSequence
    assert step.ScheduledStationAETitle == "CT01" and step.ScheduledProcedureStepStartTime \
        == "0900"
    assert step.ScheduledProtocolCodeSequence[0].CodeValue == "CT001"


def test_matching_keys_come_from_the_top_level_and_the_step_item():
    step = Dataset()
    step.ScheduledStationAETitle = "CT01"
    step.ScheduledProcedureStepStartDate = "20261201-20261210"
    step.ScheduledProcedureStepStatus = "STARTED"
    step.Modality = ""
    asked = identifier(PatientName="nguyen*", PatientID="*", AccessionNumber="",
                       ScheduledProcedureStepSequence=[step])

    keys = worklist_keys(asked)

    assert keys == {"PatientName": "nguyen*", "ScheduledStationAETitle": "CT01",
                    "ScheduledProcedureStepStartDate": "20261201-20261210",
                    "ScheduledProcedureStepStatus": "IN PROGRESS"}


# Review: the worklist wrote an order's coding system as it came: a FHIR order's
# http://loinc.org became the Coding Scheme Designator "http://loinc.org" (cut to 16
# characters), where DICOM wants LN.
@pytest.mark.parametrize(("system", "designator"), [
    ("http://loinc.org", "LN"), ("http://snomed.info/sct", "SCT"), ("LN", "LN"), ("", "L"),
    ("http://hospital.example/very/long/code/system", "L"),
])
def test_the_protocol_code_carries_a_dicom_coding_scheme_designator(system, designator):
    order = dataclasses.replace(ORDER, order=dataclasses.replace(
        ORDER.order, procedure_code_system=system))
    asked = identifier(RequestedProcedureCodeSequence=[])

    answer = as_dataset(requested_only(worklist_item(order), asked))

    (code,) = answer.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("CT001", designator)
