"""What the EMR is told about a study: ``StudyResult`` built from the index and the study's
order, and the links that open it (viewer, IHE Invoke Image Display, DICOMweb)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from emr.model import PatientInfo, ResultInstance, ResultSeries, StudyResult
from emr.orders import StoredOrder
from storage.archive import Archive
from storage.attributes import Level
from storage.errors import NotFound
from storage.query import NameMatching, Query, find


def study_links(base: str, study_uid: str) -> dict[str, str]:
    """The URLs of a study under the server's public address ``base``."""
    base = base.rstrip("/")
    return {"viewer_url": f"{base}/studies/{quote(study_uid)}",
            "iid_url": f"{base}/IHEInvokeImageDisplay?requestType=STUDY&studyUID="
                       f"{quote(study_uid)}",
            "wado_rs_url": f"{base}/dicomweb"}


def study_result(archive: Archive, study_uid: str, *, base: str,
                 order: StoredOrder | None = None) -> StudyResult:
    """The study as the EMR is told about it (``NotFound`` if it is not archived).

    The patient is the order's (the EMR's own record, with national ID and insurance number)
    when the study is linked, else the index's."""
    rows = find(archive.index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid},
                                     NameMatching.EXACT))
    if not rows:
        raise NotFound(f"no study {study_uid}")
    first = rows[0]
    patient = order.order.patient if order is not None else PatientInfo(
        patient_id=first["PatientID"] or "", issuer=first["IssuerOfPatientID"] or "",
        name=first["PatientName"] or "", birth_date=first["PatientBirthDate"] or "",
        sex=first["PatientSex"] or "")
    grouped: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for row in sorted(rows, key=lambda r: (r["SeriesNumber"] or 0, r["_series_pk"],
                                           r["InstanceNumber"] or 0, r["_instances_pk"])):
        grouped.setdefault(row["SeriesInstanceUID"], []).append(row)
    series = tuple(
        ResultSeries(
            series_instance_uid=uid, modality=members[0]["Modality"] or "",
            number=members[0]["SeriesNumber"], description=members[0]["SeriesDescription"] or "",
            body_part=members[0]["BodyPartExamined"] or "",
            instances=tuple(ResultInstance(m["SOPClassUID"], m["SOPInstanceUID"],
                                           m["InstanceNumber"]) for m in members))
        for uid, members in grouped.items())
    modalities = tuple(dict.fromkeys(s.modality for s in series if s.modality))
    return StudyResult(
        study_instance_uid=study_uid, patient=patient,
        accession_number=(order.order.accession_number if order is not None
                          else first["AccessionNumber"] or ""),
        order=order.order if order is not None else None,
        study_id=first["StudyID"] or "", study_date=first["StudyDate"] or "",
        study_time=(first["StudyTime"] or "").split(".")[0],
        description=first["StudyDescription"] or "", modalities=modalities,
        number_of_series=len(series), number_of_instances=len(rows),
        referring_physician=first["ReferringPhysicianName"] or "",
        series=series, **study_links(base, study_uid))
