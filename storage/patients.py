"""Patient records corrected after the images arrived: demographics updates, merges, studies
moved to the right patient.

The hospital record (EMR) is the authority on who a patient is; modalities often get it wrong
(typed names, emergency "UNKNOWN^PATIENT" IDs). These edits change the index only: the
patient row that C-FIND and QIDO-RS answer from, and the patient attributes in each instance's
stored DICOM JSON, which WADO-RS metadata returns. The stored files keep what the modality
sent, as acquired (retrieving a whole file gives the original header).

An index patient is the EMR's patient when the PatientID is the same and the issuer is the
same or absent on one side: most modalities send no IssuerOfPatientID.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from storage.archive import Archive
from storage.errors import NotFound
from storage.index import (
    instances,
    patients,
    retry_on_conflict,
    series,
    studies,
    utc_now,
)
from storage.names import casefold_person_name, fold_person_name


@dataclasses.dataclass(frozen=True)
class Demographics:
    """Who a patient is, as the EMR says. Empty fields leave what is stored unchanged."""

    patient_id: str
    issuer: str = ""
    name: str = ""  # PN
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""


def same_patient(patient_id: str, issuer: str, other_id: str, other_issuer: str) -> bool:
    """Whether two PatientID/issuer pairs name one patient: the same ID, and the same issuer
    or none on one side (the rule of this module)."""
    return patient_id == other_id and (issuer == other_issuer or not issuer or not other_issuer)


def correct_patient(archive: Archive, who: Demographics, *, study_uid: str | None = None
                    ) -> int:
    """Copy the EMR's demographics onto the index patient(s) with this ID, and into the stored
    metadata of their studies (only ``study_uid``'s, when given); instances changed.

    Only what differs is written: a study whose instances already say the same costs one read
    of their metadata."""
    with archive.index.write_core() as conn:
        pks = _patient_pks(conn, who.patient_id, who.issuer)
        values = _patient_values(who)
        if values:
            for pk in pks:
                conn.execute(patients.update().where(
                    patients.c.pk == pk,
                    sa.or_(*(patients.c[k].is_distinct_from(v) for k, v in values.items())))
                    .values(**values, updated_at=utc_now()))
        study_pks = _study_pks(conn, pks)
        if study_uid is not None:
            study_pks = [pk for (pk,) in conn.execute(sa.select(studies.c.pk).where(
                studies.c.study_instance_uid == study_uid, studies.c.pk.in_(study_pks or [-1])))]
        return _rewrite_headers(conn, study_pks, who)


def merge_patient(archive: Archive, prior_id: str, prior_issuer: str, into: Demographics) -> int:
    """Move every study of the prior patient to ``into`` (ADT merge); studies moved."""
    return retry_on_conflict(lambda: _merge(archive, prior_id, prior_issuer, into))


def _merge(archive: Archive, prior_id: str, prior_issuer: str, into: Demographics) -> int:
    with archive.index.write_core() as conn:
        prior = [pk for pk in _patient_pks(conn, prior_id, prior_issuer)
                 if pk not in _patient_pks(conn, into.patient_id, into.issuer)]
        study_pks = _study_pks(conn, prior)
        if study_pks:
            _move_studies(conn, study_pks, into)
    archive.forget_cached_parents()
    return len(study_pks)


def reassign_study(archive: Archive, study_uid: str, to: Demographics) -> None:
    """Put one study under the patient ``to`` (creating the index patient if needed)."""
    retry_on_conflict(lambda: _reassign(archive, study_uid, to))


def _reassign(archive: Archive, study_uid: str, to: Demographics) -> None:
    with archive.index.write_core() as conn:
        study_pk = conn.execute(sa.select(studies.c.pk).where(
            studies.c.study_instance_uid == study_uid)).scalar()
        if study_pk is None:
            raise NotFound(f"no study {study_uid}")
        _move_studies(conn, [study_pk], to)
    archive.forget_cached_parents()


# ---------------------------------------------------------------------------- internals




def _patient_pks(conn: Connection, patient_id: str, issuer: str) -> list[int]:
    condition = patients.c.patient_id == patient_id
    if issuer:
        condition = sa.and_(condition, patients.c.issuer_of_patient_id.in_((issuer, "")))
    return [pk for (pk,) in conn.execute(sa.select(patients.c.pk).where(condition))]


def _study_pks(conn: Connection, patient_pks: list[int]) -> list[int]:
    if not patient_pks:
        return []
    return [pk for (pk,) in conn.execute(
        sa.select(studies.c.pk).where(studies.c.patient_pk.in_(patient_pks)))]


def _patient_values(who: Demographics) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if who.name:
        values.update(patient_name=who.name, patient_name_ci=casefold_person_name(who.name),
                      patient_name_fold=fold_person_name(who.name))
    if who.birth_date:
        values["patient_birth_date"] = who.birth_date
    if who.sex:
        values["patient_sex"] = who.sex
    return values


def _target_patient(conn: Connection, who: Demographics) -> int:
    """The index patient ``who`` names (the same issuer first, then one without an issuer),
    created with no studies yet if there is none."""
    found = conn.execute(
        sa.select(patients.c.pk).where(patients.c.pk.in_(
            _patient_pks(conn, who.patient_id, who.issuer) or [-1]))
        .order_by((patients.c.issuer_of_patient_id == who.issuer).desc(), patients.c.pk)
    ).scalar()
    now = utc_now()
    if found is not None:
        conn.execute(patients.update().where(patients.c.pk == found)
                     .values(**_patient_values(who), updated_at=now))
        return found
    return conn.execute(patients.insert().values(
        patient_id=who.patient_id, issuer_of_patient_id=who.issuer, **_patient_values(who),
        created_at=now, updated_at=now).returning(patients.c.pk)).scalar_one()


def _move_studies(conn: Connection, study_pks: list[int], to: Demographics) -> None:
    """Re-parent studies, keep every counter right, drop patients left with no study."""
    target = _target_patient(conn, to)
    now = utc_now()
    for study_pk in study_pks:
        source, num_series, num_instances = conn.execute(sa.select(
            studies.c.patient_pk, studies.c.num_series, studies.c.num_instances)
            .where(studies.c.pk == study_pk)).one()
        if source == target:
            continue
        conn.execute(studies.update().where(studies.c.pk == study_pk)
                     .values(patient_pk=target, updated_at=now))
        for pk, sign in ((source, -1), (target, 1)):
            conn.execute(patients.update().where(patients.c.pk == pk).values(
                num_studies=patients.c.num_studies + sign,
                num_series=patients.c.num_series + sign * num_series,
                num_instances=patients.c.num_instances + sign * num_instances,
                updated_at=now))
        conn.execute(patients.delete().where(patients.c.pk == source,
                                             patients.c.num_studies <= 0))
    _rewrite_headers(conn, study_pks, to)


# The patient module's attributes, as the stored DICOM JSON holds them.
_NAME, _ID, _ISSUER, _BIRTH_DATE, _SEX = "00100010", "00100020", "00100021", "00100030", \
    "00100040"


def _rewrite_headers(conn: Connection, study_pks: list[int], who: Demographics) -> int:
    """Put the EMR's patient attributes into the stored DICOM JSON of the studies' instances
    (those that differ); how many changed."""
    if not study_pks:
        return 0
    changed = 0
    rows = conn.execute(
        sa.select(instances.c.pk, instances.c.header)
        .select_from(instances.join(series, instances.c.series_pk == series.c.pk))
        .where(series.c.study_pk.in_(study_pks))).all()
    for pk, header in rows:
        attributes = json.loads(header)
        attributes[_ID] = {"vr": "LO", "Value": [who.patient_id]}
        if who.issuer:
            attributes[_ISSUER] = {"vr": "LO", "Value": [who.issuer]}
        if who.name:
            attributes[_NAME] = {"vr": "PN", "Value": [{"Alphabetic": who.name}]}
        if who.birth_date:
            attributes[_BIRTH_DATE] = {"vr": "DA", "Value": [who.birth_date]}
        if who.sex:
            attributes[_SEX] = {"vr": "CS", "Value": [who.sex]}
        ordered = dict(sorted(attributes.items()))  # DICOM JSON keeps tag order
        text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
        if text != header:
            conn.execute(instances.update().where(instances.c.pk == pk).values(header=text))
            changed += 1
    return changed
