"""Orders and the EMR's patients, kept in the index database.

Every way an order arrives (HL7 v2, FHIR ServiceRequest, the JSON API) ends in
``OrderStore.apply``, which is idempotent: the same message twice changes nothing. Patients
are created with their first order if the EMR never registered them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any

import sqlalchemy as sa
from pydicom.uid import generate_uid
from sqlalchemy.engine import Connection

from emr.model import Order, OrderControl, OrderStatus, PatientInfo
from storage.errors import NotFound
from storage.index import (
    Index,
    emr_patients,
    orders,
    retry_on_conflict,
    stored_utc,
    study_links,
    utc_now,
)
from storage.names import casefold_person_name, fold_person_name
from storage.parsing import is_valid_uid
from storage.query import (
    NameMatching,
    date_condition,
    name_condition,
    text_condition,
    time_condition,
)

# Orders the worklist shows when the query does not name a status.
WORKLIST_STATUSES = (OrderStatus.SCHEDULED,)
_ORDER_FIELDS = tuple(f.name for f in dataclasses.fields(Order)
                      if f.name not in ("accession_number", "patient", "control", "status"))


@dataclasses.dataclass(frozen=True)
class StoredOrder:
    """An order as the database holds it: the order, its key and when it last changed."""

    pk: int
    order: Order
    patient_pk: int
    created_at: dt.datetime
    updated_at: dt.datetime
    created: bool = False  # made by the call that answered it (``OrderStore.apply``)

    @property
    def status(self) -> OrderStatus:
        return self.order.status


class OrderRefusal(Exception):
    """What every refusal of an order or patient says besides its text, for the ways in to
    answer with: ``field`` is the value at fault as ``emr.model`` names it
    (``accession_number``, ``patient.birth_date``; "" when none is), ``error_code`` the HL7
    table 0357 condition (ERR-3)."""

    error_code = "207"  # Application internal error

    def __init__(self, message: str, *, field: str = "", error_code: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.error_code = error_code or self.error_code


class UnknownOrder(OrderRefusal, NotFound):
    """A message refers to an order this server never received."""

    error_code = "204"  # Unknown key identifier


class UnknownPatient(OrderRefusal, NotFound):
    """A merge names a prior patient that neither the EMR sent nor the archive has images of."""

    error_code = "204"


class InvalidOrder(OrderRefusal, ValueError):
    """An order or patient that cannot be kept as it is (a value too long for DICOM...)."""

    error_code = "102"  # Data type error


class OrderConflict(OrderRefusal, ValueError):
    """A change that would attribute an order, or images already linked to it, to someone
    else."""


class DuplicateOrder(OrderConflict):
    """A new order whose accession number is that of an order of another patient."""

    error_code = "205"  # Duplicate key identifier


class CancelRefused(OrderConflict):
    """A cancel of an order whose images are linked already: the procedure was done."""


class InvalidMerge(InvalidOrder):
    """A merge that cannot be done as asked: the prior and surviving patient are one patient,
    or the surviving patient was merged into the prior one before (an unmerge)."""

    error_code = "207"


# Longest values DICOM can carry (PS3.5 VRs) for what goes to the worklist, and column sizes.
# Free text (descriptions, reason, address: LO) has no limit here: the worklist cuts it to 64,
# as HIS procedure names and reasons are often longer (the JSON API takes 64).
_ORDER_LIMITS = {"accession_number": 16, "requested_procedure_id": 16,
                 "scheduled_step_id": 16, "station_ae_title": 16, "station_name": 16,
                 "modality": 16, "priority": 16, "body_part": 16, "study_instance_uid": 64,
                 "placer_order_number": 64, "filler_order_number": 64, "procedure_code": 64,
                 "procedure_code_system": 256}
_PATIENT_LIMITS = {"patient_id": 64, "issuer": 64, "birth_date": 8, "sex": 4, "cccd": 32,
                   "bhyt": 32, "phone": 64}
# Values the worklist matches on: a wildcard in them could never be asked for exactly.
_ORDER_KEYS = ("accession_number", "requested_procedure_id", "scheduled_step_id",
               "station_ae_title")
_ORDER_NAMES = ("referring_physician", "performing_physician")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _invalid(field: str, problem: str, error_code: str = "") -> InvalidOrder:
    """``InvalidOrder`` for the value ``field`` (``patient.sex``), worded ``patient sex: …``."""
    return InvalidOrder(f"{field.replace('.', ' ')}: {problem}", field=field,
                        error_code=error_code)


def _check_text(field: str, value: str, limit: int | None, *, key: bool = False) -> None:
    """Refuse what no DICOM string can hold: control characters, the value delimiter ``\\``,
    more than ``limit`` characters; for a key also the wildcards ``*`` and ``?``."""
    if _CONTROL.search(value):
        raise _invalid(field, "must not contain control characters")
    if "\\" in value:
        raise _invalid(field, "must not contain a backslash (the DICOM value delimiter)")
    if key and ("*" in value or "?" in value):
        raise _invalid(field, "must not contain * or ? (wildcards in DICOM queries)")
    if limit is not None and len(value) > limit:
        raise _invalid(field, f"at most {limit} characters (DICOM)")


def _check_person_name(field: str, value: str) -> None:
    """PN: at most three component groups (``=``) of at most 64 characters each."""
    _check_text(field, value, None)
    groups = value.split("=")
    if len(groups) > 3:
        raise _invalid(field, "at most three component groups (DICOM PN)")
    if any(len(group) > 64 for group in groups):
        raise _invalid(field, "at most 64 characters per component group (DICOM PN)")


def valid_date(value: str) -> bool:
    """Whether ``value`` is a DICOM DA that is a real day (``19880230`` is not)."""
    if not re.fullmatch(r"[0-9]{8}", value):
        return False
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


def valid_time(value: str) -> bool:
    """Whether ``value`` is a DICOM TM (HH[MM[SS[.F]]]) that is a real time of day."""
    match = re.fullmatch(r"([0-9]{2})(([0-9]{2})(([0-9]{2})(\.[0-9]{1,6})?)?)?", value)
    return bool(match) and int(match.group(1)) <= 23 and int(match.group(3) or 0) <= 59 \
        and int(match.group(5) or 0) <= 60  # 60: a leap second


def hhmmss(value: str) -> str:
    """A DICOM TM of hours or hours and minutes as HHMMSS (``0830`` is ``083000``): the
    worklist compares times as text, so every stored time has seconds."""
    whole, dot, fraction = value.partition(".")
    if re.fullmatch(r"[0-9]{2}|[0-9]{4}", whole):
        whole = whole.ljust(6, "0")
    return whole + dot + fraction


def check_patient(patient: PatientInfo) -> None:
    """Refuse a patient whose values do not fit (``InvalidOrder``, naming the field)."""
    if not patient.patient_id.strip():
        raise InvalidOrder("patient_id: required (the hospital's MRN)", field="patient.patient_id",
                           error_code="101")
    for name, value in dataclasses.asdict(patient).items():
        if name == "name":
            _check_person_name("patient.name", value)
        else:
            _check_text(f"patient.{name}", value, _PATIENT_LIMITS.get(name),
                        key=name == "patient_id")
    if patient.birth_date and not valid_date(patient.birth_date):
        raise _invalid("patient.birth_date", "not a real date (YYYYMMDD)")


def check_order(order: Order) -> None:
    """Refuse an order whose values do not fit what the worklist must send."""
    if not order.accession_number.strip():
        raise _invalid("accession_number", "required", "101")  # Required field missing
    for field in dataclasses.fields(Order):
        value = getattr(order, field.name)
        if not isinstance(value, str) or field.name == "source":
            continue
        if field.name in _ORDER_NAMES:
            _check_person_name(field.name, value)
        else:
            _check_text(field.name, value, _ORDER_LIMITS.get(field.name),
                        key=field.name in _ORDER_KEYS)
    if order.scheduled_date and not valid_date(order.scheduled_date):
        raise _invalid("scheduled_date", "not a real date (YYYYMMDD)")
    if order.scheduled_time and not valid_time(order.scheduled_time):
        raise _invalid("scheduled_time", "not a real time of day (HHMMSS)")
    if order.study_instance_uid and not is_valid_uid(order.study_instance_uid):
        raise _invalid("study_instance_uid", "not a DICOM UID (digits and dots, at most 64)")
    check_patient(order.patient)


class OrderStore:
    """Orders and EMR patients over the index database."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # ------------------------------------------------------------------ patients

    def save_patient(self, patient: PatientInfo) -> int:
        """Create or update a patient (fields left empty keep what is stored); its key."""
        check_patient(patient)
        return retry_on_conflict(lambda: self._save_patient(patient))

    def _save_patient(self, patient: PatientInfo) -> int:
        with self.index.write_core() as conn:
            return _save_patient(conn, patient)

    def merge_patient(self, prior_id: str, prior_issuer: str, into: PatientInfo) -> int:
        """Merge the prior patient record into ``into`` (ADT^A40): its orders move; orders
        moved. The prior record stays, marked as merged, for the history."""
        check_patient(into)
        return retry_on_conflict(lambda: self._merge_patient(prior_id, prior_issuer, into))

    def _merge_patient(self, prior_id: str, prior_issuer: str, into: PatientInfo) -> int:
        with self.index.write_core() as conn:
            prior = _find_patient(conn, prior_id, prior_issuer)
            named = _find_patient(conn, into.patient_id, into.issuer)
            if prior is not None and named is not None and prior in _merges(conn, named)[1:]:
                # Merging back would leave the first merge's orders and images where they
                # are, under a patient now marked merged away: refused rather than half done.
                raise InvalidMerge(
                    "the surviving patient was itself merged into the prior patient before;"
                    " undoing a merge is not supported: correct the records in the HIS and"
                    " the studies by hand; nothing was merged")
            target = _save_patient(conn, into)
            if prior is None:
                # Known from the archive's images only: recorded as merged all the same, so
                # the A40 sent again (its ACK lost) finds it and is answered AA again.
                now = utc_now()
                conn.execute(emr_patients.insert().values(
                    patient_id=prior_id, issuer=prior_issuer, merged_into_pk=target,
                    created_at=now, updated_at=now))
                return 0
            if prior == target:
                return 0
            moved = conn.execute(orders.update().where(orders.c.patient_pk == prior)
                                 .values(patient_pk=target, updated_at=utc_now())).rowcount
            conn.execute(emr_patients.update().where(emr_patients.c.pk == prior)
                         .values(merged_into_pk=target, updated_at=utc_now()))
            return moved

    def knows_patient(self, patient_id: str, issuer: str = "") -> bool:
        """Whether the EMR ever sent this patient (merged away or not)."""
        with self.index.read() as conn:
            return _find_patient(conn, patient_id, issuer) is not None

    def patient(self, pk: int) -> PatientInfo:
        with self.index.read() as conn:
            row = conn.execute(sa.select(emr_patients).where(emr_patients.c.pk == pk)).first()
        if row is None:
            raise NotFound(f"no patient {pk}")
        return _patient_info(row)

    def surviving_patient(self, patient: PatientInfo) -> PatientInfo:
        """The record ``patient`` was merged into (ADT^A40), through successive merges, as
        stored; ``patient`` itself when it was never merged away."""
        with self.index.read() as conn:
            pk = _find_patient(conn, patient.patient_id, patient.issuer)
            survivor = _surviving(conn, pk) if pk is not None else None
            if survivor is None or survivor == pk:
                return patient
            return _patient_info(conn.execute(sa.select(emr_patients).where(
                emr_patients.c.pk == survivor)).one())

    def merged_into(self, pk: int) -> int | None:
        """The patient a merged-away record now belongs to (None if it was not merged)."""
        with self.index.read() as conn:
            return conn.execute(sa.select(emr_patients.c.merged_into_pk)
                                .where(emr_patients.c.pk == pk)).scalar()

    def find_patients(self, *, patient_id: str = "", issuer: str | None = None, cccd: str = "",
                      bhyt: str = "", merged: bool = False, limit: int | None = 100
                      ) -> list[tuple[int, PatientInfo]]:
        """Patients by MRN (optionally with issuer), national ID or insurance number; those
        merged away (ADT^A40) too when ``merged``."""
        conditions = [] if merged else [emr_patients.c.merged_into_pk.is_(None)]
        if patient_id:
            conditions.append(emr_patients.c.patient_id == patient_id)
            if issuer is not None:
                conditions.append(emr_patients.c.issuer == issuer)
        if cccd:
            conditions.append(emr_patients.c.cccd == cccd)
        if bhyt:
            conditions.append(emr_patients.c.bhyt == bhyt)
        statement = (sa.select(emr_patients).where(*conditions)
                     .order_by(emr_patients.c.pk).limit(limit))
        with self.index.read() as conn:
            return [(row.pk, _patient_info(row)) for row in conn.execute(statement)]

    # ------------------------------------------------------------------ orders

    def apply(self, order: Order) -> StoredOrder:
        """Create, update or cancel an order as ``order.control`` says (idempotent); the
        order as stored, ``created`` if this call made it.

        NEW for an existing accession number of the same patient updates it, of another
        patient raises ``DuplicateOrder`` (only an UPDATE moves an order to another patient,
        and only while no images are linked to it: ``OrderConflict``); UPDATE of an unknown
        order creates it (the EMR knows best); CANCEL of an unknown order raises
        ``UnknownOrder``."""
        if order.control is not OrderControl.CANCEL:
            check_order(order)
        created = retry_on_conflict(lambda: self._apply(order))
        return dataclasses.replace(self.get(order.accession_number), created=created)

    def _apply(self, order: Order) -> bool:
        with self.index.write_core() as conn:
            existing = conn.execute(sa.select(orders).where(
                orders.c.accession_number == order.accession_number)).first()
            if order.control is OrderControl.CANCEL:
                if existing is None:
                    raise UnknownOrder(f"no order with accession number "
                                       f"{order.accession_number} to cancel",
                                       field="accession_number")
                _check_cancellable(conn, existing)
                conn.execute(orders.update().where(orders.c.pk == existing.pk).values(
                    status=OrderStatus.CANCELLED.value, updated_at=utc_now()))
                return False
            patient_pk = _save_patient(conn, order.patient)
            if existing is None:
                _insert_order(conn, order, patient_pk)
                return True
            if existing.patient_pk != patient_pk:
                _check_movable(conn, existing, order)
            if order.control is OrderControl.UPDATE and order.status is OrderStatus.CANCELLED:
                _check_cancellable(conn, existing)  # XO with ORC-5 CA cancels too
            _update_order(conn, existing, order, patient_pk)
            return False

    def normalise_scheduled_times(self) -> int:
        """Give seconds to stored scheduled times without them (``0830``, kept so before
        times were normalised on input), which worklist time matching could not find; how
        many orders changed."""
        with self.index.write_core() as conn:
            changed = 0
            for width in (2, 4):
                changed += conn.execute(
                    orders.update().where(sa.func.length(orders.c.scheduled_time) == width)
                    .values(scheduled_time=orders.c.scheduled_time + "0" * (6 - width))
                ).rowcount
        return changed

    def set_status(self, accession_number: str, status: OrderStatus) -> StoredOrder:
        with self.index.write_core() as conn:
            count = conn.execute(orders.update()
                                 .where(orders.c.accession_number == accession_number)
                                 .values(status=status.value, updated_at=utc_now())).rowcount
        if not count:
            raise UnknownOrder(f"no order with accession number {accession_number}")
        return self.get(accession_number)

    def get(self, accession_number: str) -> StoredOrder:
        found = self._select(orders.c.accession_number == accession_number)
        if not found:
            raise UnknownOrder(f"no order with accession number {accession_number}")
        return found[0]

    def by_accessions(self, accession_numbers: set[str]) -> dict[str, StoredOrder]:
        """The orders with these accession numbers (one query for many studies)."""
        if not accession_numbers:
            return {}
        found = self._select(orders.c.accession_number.in_(sorted(accession_numbers)))
        return {stored.order.accession_number: stored for stored in found}

    def get_by_pk(self, pk: int) -> StoredOrder:
        found = self._select(orders.c.pk == pk)
        if not found:
            raise UnknownOrder(f"no order {pk}")
        return found[0]

    def find_for_procedure(self, patient_id: str, requested_procedure_id: str
                           ) -> StoredOrder | None:
        """The order of a patient with this Requested Procedure ID (when a study has no
        accession number)."""
        found = self._select(emr_patients.c.patient_id == patient_id,
                             orders.c.requested_procedure_id == requested_procedure_id)
        return found[0] if len(found) == 1 else None

    def list(self, *, status: str = "", patient_id: str = "", date: str = "",
             limit: int = 100, offset: int = 0) -> list[StoredOrder]:
        conditions = []
        if status:
            conditions.append(orders.c.status == status)
        if patient_id:
            conditions.append(emr_patients.c.patient_id == patient_id)
        if date:
            conditions.append(date_condition(orders.c.scheduled_date, "date", date))
        return self._select(*conditions, limit=limit, offset=offset)

    def worklist(self, keys: dict[str, str], name_matching: NameMatching,
                 limit: int | None = None) -> list[StoredOrder]:
        """Orders matching Modality Worklist keys (keyword -> DICOM match value).

        An order the EMR did not assign to a station matches every ScheduledStationAETitle:
        most HIS do not know the modalities' AE titles."""
        conditions: list[Any] = []
        status = keys.get("ScheduledProcedureStepStatus", "").strip()
        if status:
            conditions.append(text_condition(orders.c.status, status))
        else:
            conditions.append(orders.c.status.in_([s.value for s in WORKLIST_STATUSES]))
        for keyword, value in keys.items():
            value = value.strip()
            if value in ("", "*") or keyword == "ScheduledProcedureStepStatus":
                continue
            if keyword == "ScheduledStationAETitle":
                conditions.append(sa.or_(text_condition(orders.c.station_ae_title, value),
                                         orders.c.station_ae_title == ""))
            elif keyword == "ScheduledProcedureStepStartDate":
                conditions.append(date_condition(orders.c.scheduled_date, keyword, value))
            elif keyword == "ScheduledProcedureStepStartTime":
                conditions.append(time_condition(orders.c.scheduled_time, keyword, value))
            elif keyword == "PatientName":
                conditions.append(name_condition(emr_patients.c.name_ci,
                                                 emr_patients.c.name_fold, value, name_matching))
            elif keyword in _WORKLIST_TEXT_KEYS:
                conditions.append(text_condition(_WORKLIST_TEXT_KEYS[keyword], value))
        return self._select(*conditions, limit=limit)

    def _select(self, *conditions: Any, limit: int | None = None,
                offset: int = 0) -> list[StoredOrder]:
        statement = (sa.select(orders, *[c.label(f"p__{c.name}")
                                         for c in emr_patients.columns])
                     .join(emr_patients, orders.c.patient_pk == emr_patients.c.pk)
                     .where(*conditions)
                     .order_by(orders.c.scheduled_date, orders.c.scheduled_time, orders.c.pk))
        if limit is not None:
            statement = statement.limit(limit)
        if offset:
            statement = statement.offset(offset)
        with self.index.read() as conn:
            return [_stored_order(row) for row in conn.execute(statement).mappings()]


_WORKLIST_TEXT_KEYS = {
    "Modality": orders.c.modality,
    "AccessionNumber": orders.c.accession_number,
    "PatientID": emr_patients.c.patient_id,
    "IssuerOfPatientID": emr_patients.c.issuer,
    "RequestedProcedureID": orders.c.requested_procedure_id,
    "ScheduledProcedureStepID": orders.c.scheduled_step_id,
    "StudyInstanceUID": orders.c.study_instance_uid,
    "ScheduledStationName": orders.c.station_name,
    "ReferringPhysicianName": orders.c.referring_physician,
    "RequestedProcedurePriority": orders.c.priority,
}


# ---------------------------------------------------------------------------- rows


def _check_movable(conn: Connection, existing: Any, order: Order) -> None:
    """Refuse moving an order to another patient unless the EMR said so (an UPDATE: a NEW
    reusing another patient's accession number is more likely a mix-up than a correction),
    and always once images are linked to it: they would be reported as someone else's."""
    if order.control is OrderControl.NEW:
        raise DuplicateOrder(
            f"accession number {order.accession_number} is an order of another patient "
            "already; a new order needs an accession number of its own (to move the order "
            "to this patient, send an update: HL7 XO, or the JSON API's control update)",
            field="accession_number")
    if _has_linked_studies(conn, existing.pk):
        raise OrderConflict(
            f"order {order.accession_number} has images linked already; it cannot move to "
            "another patient (cancel it and order again, or correct the patient with ADT)",
            field="patient.patient_id")


def _check_cancellable(conn: Connection, existing: Any) -> None:
    """``CancelRefused`` for an order with linked images: the procedure was done, and the
    results already sent (or owed) name it; a cancel would leave them pointing at nothing."""
    if OrderStatus(existing.status) is OrderStatus.CANCELLED:
        return  # the same cancel again
    if _has_linked_studies(conn, existing.pk):
        raise CancelRefused(
            f"order {existing.accession_number} cannot be cancelled: its images are in the "
            "PACS and linked to it (the procedure was done); correct the order (XO) instead,"
            " or have staff link the study to the right order first", field="control")


def _has_linked_studies(conn: Connection, order_pk: int) -> bool:
    return conn.execute(sa.select(study_links.c.pk).where(
        study_links.c.order_pk == order_pk, study_links.c.state == "linked").limit(1)
    ).first() is not None


def _find_patient(conn: Connection, patient_id: str, issuer: str) -> int | None:
    """The patient with this MRN: the same issuer, or either side without one."""
    condition = emr_patients.c.patient_id == patient_id
    if issuer:
        condition = sa.and_(condition, emr_patients.c.issuer.in_((issuer, "")))
    return conn.execute(
        sa.select(emr_patients.c.pk).where(condition)
        .order_by((emr_patients.c.issuer == issuer).desc(), emr_patients.c.pk)).scalar()


def _merges(conn: Connection, pk: int) -> list[int]:
    """``pk`` and the records it was merged into, in turn, up to the one that survives."""
    chain = [pk]
    for _ in range(32):  # merges never loop, but a bound costs nothing
        merged_into = conn.execute(sa.select(emr_patients.c.merged_into_pk)
                                   .where(emr_patients.c.pk == chain[-1])).scalar()
        if merged_into is None or merged_into in chain:
            break
        chain.append(merged_into)
    return chain


def _surviving(conn: Connection, pk: int) -> int:
    """The record ``pk`` was merged into, through successive merges; ``pk`` if none."""
    return _merges(conn, pk)[-1]


def _patient_values(patient: PatientInfo) -> dict[str, Any]:
    """The non-empty fields of ``patient`` as column values."""
    values = {name: getattr(patient, name) for name in
              ("name", "birth_date", "sex", "cccd", "bhyt", "address", "phone")
              if getattr(patient, name)}
    if patient.name:
        values.update(name_ci=casefold_person_name(patient.name),
                      name_fold=fold_person_name(patient.name))
    return values


def _save_patient(conn: Connection, patient: PatientInfo) -> int:
    if not patient.patient_id:
        raise ValueError("a patient needs an ID (the MRN)")
    now = utc_now()
    pk = _find_patient(conn, patient.patient_id, patient.issuer)
    if pk is not None:
        survivor = _surviving(conn, pk)
        if survivor != pk:
            # A record merged away (ADT^A40) that the HIS still names: what comes for it goes
            # to the surviving patient, whose details this message does not describe.
            return survivor
    values = _patient_values(patient)
    if pk is None:
        return conn.execute(emr_patients.insert().values(
            patient_id=patient.patient_id, issuer=patient.issuer, **values,
            created_at=now, updated_at=now).returning(emr_patients.c.pk)).scalar_one()
    if patient.issuer:
        values["issuer"] = patient.issuer
    if not values:  # only the MRN: nothing to change
        return pk
    current = conn.execute(sa.select(*[emr_patients.c[k] for k in values])
                           .where(emr_patients.c.pk == pk)).one()
    if tuple(current) != tuple(values.values()):
        conn.execute(emr_patients.update().where(emr_patients.c.pk == pk)
                     .values(**values, updated_at=now))
    return pk


def _insert_order(conn: Connection, order: Order, patient_pk: int) -> None:
    now = utc_now()
    values = {name: getattr(order, name) for name in _ORDER_FIELDS}
    # The worklist hands these to the modality, which copies them into the images: a study
    # made from this order then carries them and links by itself.
    values["scheduled_time"] = hhmmss(order.scheduled_time)
    values["study_instance_uid"] = order.study_instance_uid or generate_uid()
    values["requested_procedure_id"] = order.requested_procedure_id or order.accession_number
    values["scheduled_step_id"] = order.scheduled_step_id or order.accession_number
    values["filler_order_number"] = order.filler_order_number or order.accession_number
    conn.execute(orders.insert().values(
        accession_number=order.accession_number, patient_pk=patient_pk,
        status=order.status.value, **values, created_at=now, updated_at=now))


def _update_order(conn: Connection, existing: Any, order: Order, patient_pk: int) -> None:
    """Apply a repeated NEW or an UPDATE: given fields replace stored ones."""
    values: dict[str, Any] = {name: getattr(order, name) for name in _ORDER_FIELDS
                              if getattr(order, name)}
    if "scheduled_time" in values:
        values["scheduled_time"] = hhmmss(values["scheduled_time"])
    values["patient_pk"] = patient_pk
    status = OrderStatus(existing.status)
    if order.control is OrderControl.NEW:
        if status is OrderStatus.CANCELLED:  # ordered again after a cancel
            values["status"] = OrderStatus.SCHEDULED.value
    elif order.status is not OrderStatus.SCHEDULED:  # an update that names a new status
        values["status"] = order.status.value
    changed = {k: v for k, v in values.items() if getattr(existing, k) != v}
    if changed:
        conn.execute(orders.update().where(orders.c.pk == existing.pk)
                     .values(**changed, updated_at=utc_now()))


def _patient_info(row: Any, prefix: str = "") -> PatientInfo:
    get = (lambda name: row[prefix + name]) if prefix else (lambda name: getattr(row, name))
    return PatientInfo(patient_id=get("patient_id"), issuer=get("issuer"), name=get("name"),
                       birth_date=get("birth_date"), sex=get("sex"), cccd=get("cccd"),
                       bhyt=get("bhyt"), address=get("address"), phone=get("phone"))


def _stored_order(row: Any) -> StoredOrder:
    patient = _patient_info(row, "p__")
    order = Order(accession_number=row["accession_number"], patient=patient,
                  status=OrderStatus(row["status"]),
                  **{name: row[name] for name in _ORDER_FIELDS})
    return StoredOrder(row["pk"], order, row["patient_pk"], stored_utc(row["created_at"]),
                       stored_utc(row["updated_at"]))


def order_json(stored: StoredOrder) -> dict[str, Any]:
    """An order for the JSON API (DICOM forms of names and dates, as stored)."""
    order = stored.order
    body = {"id": stored.pk, "accession_number": order.accession_number,
            "status": order.status.value,
            **{name: getattr(order, name) for name in _ORDER_FIELDS},
            "patient": dataclasses.asdict(order.patient),
            "created_at": stored.created_at.isoformat(timespec="seconds"),
            "updated_at": stored.updated_at.isoformat(timespec="seconds")}
    return body

