"""Modality Performed Procedure Steps: what the modality says it did (N-CREATE, N-SET)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import sqlalchemy as sa

from storage.index import Index, performed_steps

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)


class StepError(ValueError):
    """An MPPS request that cannot be applied; ``kind`` says why (one of the constants below,
    which the DIMSE side turns into its status)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


DUPLICATE, UNKNOWN, FINAL, INVALID = "duplicate", "unknown", "final", "invalid"


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

    def update(self, sop_uid: str, changes: dict[str, Any], *, status: str | None
               ) -> PerformedStep:
        """Apply an N-SET; only a step still IN PROGRESS may change (PS3.4 F.7.2.2)."""
        if status is not None and status not in STATUSES:
            raise StepError(INVALID, f"unknown step status {status!r}")
        with self.index.write_core() as conn:
            row = conn.execute(sa.select(performed_steps).where(
                performed_steps.c.sop_instance_uid == sop_uid)).first()
            if row is None:
                raise StepError(UNKNOWN,
                                f"no performed procedure step {sop_uid}")
            if row.status != IN_PROGRESS:
                raise StepError(FINAL,
                                f"the step is {row.status} already and cannot change")
            attributes = {**_loads(row.attributes), **changes}
            new_status = status or row.status
            conn.execute(performed_steps.update().where(performed_steps.c.pk == row.pk)
                         .values(status=new_status, attributes=_dumps(attributes),
                                 updated_at=dt.datetime.now(dt.UTC)))
        return PerformedStep(sop_uid, new_status, row.study_instance_uid, row.order_pk,
                             attributes)


def _dumps(attributes: dict[str, Any]) -> str:
    return json.dumps(attributes, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str) -> dict[str, Any]:
    return json.loads(text)
