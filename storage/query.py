"""The one implementation of DICOM attribute matching (PS3.4 C.2.2.2), for C-FIND and QIDO-RS.

Queries run on the index only; no stored file is ever opened. Supported per key:
single value, universal (empty or ``*``), wildcards ``*`` and ``?``, date and time ranges
(``A-B``, ``A-``, ``-B``), lists of values separated by ``\\`` (UIDs and strings), and for person
names case-insensitive matching always plus accent-insensitive matching by mode (see
``NameMatching``), each component group of the query (alphabetic ``=`` ideographic ``=``
phonetic) matching the same group of the stored name and an empty one any. Keys the index has
no column for are return keys only: their values come from the stored DICOM JSON of a
representative instance.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import json
import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from storage.attributes import (
    BY_KEYWORD,
    INTEGER_VRS,
    IndexedAttribute,
    Level,
    level_attributes,
)
from storage.errors import InvalidQuery
from storage.index import TABLES, Index, instances, patients, series, studies
from storage.names import casefold_person_name, fold_person_name, has_diacritics


class NameMatching(enum.Enum):
    """How person names match. All modes ignore case; they differ on accents."""

    EXACT = "exact"  # accents must match: "Nguyễn*" finds Nguyễn, not Nguyên
    FUZZY = "fuzzy"  # accents and đ/Đ ignored: "nguyen van an" finds "Nguyễn^Văn An"
    AUTO = "auto"  # FUZZY when the query has no diacritics, else EXACT


@dataclasses.dataclass(frozen=True)
class Query:
    """A search: level, matching keys (keyword -> DICOM match value) and paging."""

    level: Level
    keys: dict[str, str]
    name_matching: NameMatching = NameMatching.AUTO
    limit: int | None = None
    offset: int = 0
    # Tags (8 hex digits) wanted in the results that are not index columns.
    extra_tags: frozenset[str] = frozenset()
    # INSTANCE level: also return each instance's stored DICOM JSON text as ``_header``.
    with_header: bool = False


_LEVEL_TABLES = {
    Level.PATIENT: (patients,),
    Level.STUDY: (studies, patients),
    Level.SERIES: (series, studies, patients),
    Level.INSTANCE: (instances, series, studies, patients),
}
_UID_COLUMNS = {"StudyInstanceUID": (Level.STUDY, studies.c.study_instance_uid),
                "SeriesInstanceUID": (Level.SERIES, series.c.series_instance_uid),
                "SOPInstanceUID": (Level.INSTANCE, instances.c.sop_instance_uid)}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LIKE_ESCAPE = "\\"


def find(index: Index, query: Query) -> list[dict[str, Any]]:
    """Rows matching ``query``: dicts of keyword -> value, plus ``_pk``-style internal keys.

    Each row holds every indexed attribute of the query level and the levels above it (so a
    SERIES row carries the study's and the patient's attributes), ``_extra`` with the DICOM JSON
    of the requested ``extra_tags``, and for INSTANCE rows the storage fields ``_blob_key``,
    ``_transfer_syntax_uid``, ``_size`` and ``_frames``.
    """
    statement = _statement(query)
    with index.read() as conn:
        rows = [_row(query.level, r) for r in conn.execute(statement).mappings()]
        if query.extra_tags and rows:
            _add_extra(conn, query.level, rows, query.extra_tags)
    return rows


def _statement(query: Query) -> sa.Select:
    tables = _LEVEL_TABLES[query.level]
    statement = _select_level(query.level, query.with_header)
    conditions = [
        condition
        for keyword, value in query.keys.items()
        if (condition := _condition(keyword, value, query)) is not None
    ]
    if conditions:
        statement = statement.where(*conditions)
    statement = statement.order_by(tables[0].c.pk)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    if query.offset:
        statement = statement.offset(query.offset)
    return statement


@functools.cache
def _select_level(level: Level, with_header: bool) -> sa.Select:
    """The columns and joins of a query at ``level`` (built once: a statement is immutable, and
    building it took a third of a one-match C-FIND's time in the server)."""
    tables = _LEVEL_TABLES[level]
    joined: sa.FromClause = tables[0]
    for child, parent in zip(tables, tables[1:], strict=False):
        key = {series: "study_pk", studies: "patient_pk", instances: "series_pk"}[child]
        joined = joined.join(parent, child.c[key] == parent.c.pk)
    columns = [_labelled(table, level, with_header=with_header) for table in tables]
    return sa.select(*[c for group in columns for c in group]).select_from(joined)


def _labelled(table: sa.Table, level: Level, *, with_header: bool) -> list[sa.ColumnElement]:
    """The columns of ``table`` a result row needs, labelled ``table.column``."""
    skip = {"created_at"} | ({"frames"} if level is not Level.INSTANCE else set())
    if not (with_header and table is instances):
        skip.add("header")
    return [c.label(f"{table.name}.{c.name}") for c in table.columns if c.name not in skip]


@functools.cache
def _row_names(level: Level) -> tuple[tuple[str, str], ...]:
    """(name in a result row, label of its column) of every indexed attribute at ``level``."""
    names = []
    for table in _LEVEL_TABLES[level]:
        table_level = next(lv for lv, t in TABLES.items() if t is table)
        for attribute in level_attributes(table_level):
            name = f"{attribute.sequence}.{attribute.keyword}" if attribute.sequence \
                else attribute.keyword
            names.append((name, f"{table.name}.{attribute.column}"))
        names.append((f"_{table.name}_pk", f"{table.name}.pk"))
    return tuple(names)


def _row(level: Level, mapping: Any) -> dict[str, Any]:
    """keyword -> value for each indexed attribute present in a result row."""
    row: dict[str, Any] = {name: mapping[label] for name, label in _row_names(level)}
    if level is Level.INSTANCE:
        for name in ("blob_key", "transfer_syntax_uid", "size", "frames", "sha256"):
            row[f"_{name}"] = mapping[f"instances.{name}"]
        if "instances.header" in mapping:
            row["_header"] = mapping["instances.header"]
        row["_stored_at"] = mapping["instances.stored_at"]
    for table in _LEVEL_TABLES[level]:
        row[f"_{table.name}_updated_at"] = mapping.get(f"{table.name}.updated_at")
    return row


# ---------------------------------------------------------------------------- matching


def _condition(keyword: str, value: str | None, query: Query) -> sa.ColumnElement | None:
    """The SQL condition for one matching key, or None for universal / return-only keys."""
    value = (value or "").strip()
    if value in ("", "*"):
        return None
    if keyword == "ModalitiesInStudy":
        return _modalities_in_study(value) if query.level is not Level.PATIENT else None
    if keyword in _UID_COLUMNS:
        level, column = _UID_COLUMNS[keyword]
        # Below the level asked for, a UID matches nothing of it (the table is not even
        # joined): ignored, as C-FIND ignores other keys of lower levels. QIDO-RS refuses it.
        return None if level.value > query.level.value else _uid_list(column, keyword, value)
    attribute = BY_KEYWORD.get(keyword)
    if attribute is None or attribute.aggregate or attribute.level.value > query.level.value:
        return None  # not matchable here: a return key only
    column = TABLES[attribute.level].c[attribute.column]
    if attribute.vr == "UI":
        return _uid_list(column, keyword, value)
    if attribute.vr == "DA":
        return _range(column, keyword, value, _date_bound)
    if attribute.vr == "TM":
        return _range(column, keyword, value, _time_bound)
    if attribute.vr == "PN":
        return match_person_name(attribute, value, query.name_matching)
    if attribute.vr in INTEGER_VRS:
        return _integers(column, keyword, value)
    return text_condition(column, value, keyword=keyword)


def match_person_name(attribute: IndexedAttribute, value: str,
                      mode: NameMatching) -> sa.ColumnElement:
    """Condition for a PN key: case-insensitive always, accent-insensitive per ``mode``."""
    table = TABLES[attribute.level]
    return name_condition(table.c[attribute.column + "_ci"],
                          table.c[attribute.column + "_fold"], value, mode,
                          keyword=attribute.keyword)


# The same matching rules for tables other than the four levels (the worklist's orders).


def name_condition(casefolded: sa.ColumnElement, folded: sa.ColumnElement, value: str,
                   mode: NameMatching, *, keyword: str = "PatientName") -> sa.ColumnElement:
    """A PN match on a name's case-folded and accent-folded columns: one name, or a list
    (``\\``-separated) of names any of which may match, each folded on its own terms."""
    names = [name for name in alternatives(keyword, value) if name.strip()]
    if not names:
        return sa.true()
    return sa.or_(*(_one_name(casefolded, folded, name, mode) for name in names))


def _one_name(casefolded: sa.ColumnElement, folded: sa.ColumnElement, value: str,
              mode: NameMatching) -> sa.ColumnElement:
    """One name of the query: each of its component groups (PS3.5 6.2.1: alphabetic,
    ideographic, phonetic; representations of the same name) matches the same group of the
    stored name, judged on its own terms; a group the query leaves empty or ``*`` matches
    whatever is there, so ``Phạm^Thị Hoa`` finds ``Phạm^Thị Hoa=范^氏花``, and so does
    ``=范^氏花``."""
    conditions = []
    for number, group in enumerate(value.split("=")[:_GROUPS], start=1):
        fuzzy = mode is NameMatching.FUZZY or (mode is NameMatching.AUTO
                                               and not has_diacritics(group))
        if fuzzy:  # components become spaces: empty trailing ones vanish
            pattern = fold_person_name(group)
        else:
            # Empty trailing components say nothing ("Trần^Thị Bình^^^" is "Trần^Thị Bình"), on
            # either side: the query's are dropped here, the stored name's in _group_match.
            pattern = casefold_person_name(group).strip().rstrip("^")
        if pattern.strip("*"):
            conditions.append(_group_match(folded if fuzzy else casefolded, number, pattern,
                                           trailing_carets=not fuzzy))
    return sa.and_(*conditions) if conditions else sa.true()


_GROUPS = 3  # a PN value has at most three component groups


class _NameGroup(FunctionElement):
    """Component group ``number`` (1-based) of a PN text column: '' when the value has none."""

    type = sa.Text()
    inherit_cache = True

    def __init__(self, column: sa.ColumnElement, number: int) -> None:
        # A literal, not a bound parameter: the SQL differs by group and is cached by its text.
        super().__init__(column, sa.literal_column(str(number)))


@compiles(_NameGroup, "postgresql")
def _name_group_postgresql(element: _NameGroup, compiler: Any, **kw: Any) -> str:
    column, number = element.clauses.clauses
    return f"split_part({compiler.process(column, **kw)}, '=', {int(number.name)})"


@compiles(_NameGroup)
def _name_group_default(element: _NameGroup, compiler: Any, **kw: Any) -> str:
    # SQLite has no split_part: skip a group at a time, up to the next '=' (or the end).
    column, number = element.clauses.clauses
    rest: sa.ColumnElement = column
    for _ in range(int(number.name) - 1):
        rest = sa.func.substr(rest, sa.func.instr(rest.concat(sa.literal_column("'='")),
                                                  sa.literal_column("'='")) + 1)
    group = sa.func.substr(rest, 1, sa.func.instr(rest.concat(sa.literal_column("'='")),
                                                  sa.literal_column("'='")) - 1)
    return compiler.process(group, **kw)


def _group_match(column: sa.ColumnElement, number: int, pattern: str, *,
                 trailing_carets: bool) -> sa.ColumnElement:
    """``pattern`` (single value or wildcards) against group ``number`` of a PN ``column``;
    ``trailing_carets``: the stored group may end in empty components, which say nothing."""
    prefix = re.split(r"[*?]", pattern, maxsplit=1)[0]  # holds no '=': groups were split on it
    if number == 1 and pattern != prefix and pattern.rstrip("*") == prefix:
        return _string(column, pattern)  # "nguyen*": the whole value starts so, or its group
    group: sa.ColumnElement = _NameGroup(column, number)
    if trailing_carets and not pattern.endswith("*"):
        group = sa.func.rtrim(group, sa.literal_column("'^'"))
    condition = _string(group, pattern)
    if number == 1 and prefix:
        # The same prefix of the whole value: a range of the column's pattern index, so the
        # group is computed only for the names that start that way.
        condition = sa.and_(column.like(_like_escaped(prefix) + "%", escape=_LIKE_ESCAPE),
                            condition)
    return condition


def text_condition(column: sa.ColumnElement, value: str, *, keyword: str = "value"
                   ) -> sa.ColumnElement:
    """Single value, wildcard, or ``\\``-separated list match of a text column."""
    return sa.or_(*(_string(column, v) for v in alternatives(keyword, value)))


# Values of a list match made of alternatives (text, names, modalities; UIDs and numbers are
# matched with IN, at any length). SQLite parses N alternatives N deep and refuses a query past
# 1000: a list of 500 answered 500.
MAX_ALTERNATIVES = 100


def alternatives(keyword: str, value: str) -> list[str]:
    """The values of a ``\\``-separated list match; ``InvalidQuery`` past ``MAX_ALTERNATIVES``."""
    values = value.split("\\")
    if len(values) > MAX_ALTERNATIVES:
        raise InvalidQuery(keyword, f"a list of {len(values)} values; at most "
                                    f"{MAX_ALTERNATIVES} are matched at once")
    return values


def date_condition(column: sa.ColumnElement, keyword: str, value: str) -> sa.ColumnElement:
    """Single date or range (``A-B``, ``A-``, ``-B``) of a YYYYMMDD column."""
    return _range(column, keyword, value, _date_bound)


def time_condition(column: sa.ColumnElement, keyword: str, value: str) -> sa.ColumnElement:
    """Single time or range of an HHMMSS column."""
    return _range(column, keyword, value, _time_bound)


def _string(column: sa.ColumnElement, value: str) -> sa.ColumnElement:
    """Single value or wildcard match (``*`` any run of characters, ``?`` one character)."""
    if "*" not in value and "?" not in value:
        return column == value
    if value.strip("*") == "":
        return sa.true()
    return column.like(_like_escaped(value).replace("*", "%").replace("?", "_"),
                       escape=_LIKE_ESCAPE)


def _like_escaped(value: str) -> str:
    """``value`` with LIKE's own wildcards ``%`` and ``_`` (and the escape) made literal."""
    return (value.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2).replace("%", _LIKE_ESCAPE + "%")
            .replace("_", _LIKE_ESCAPE + "_"))


def _uid_list(column: sa.ColumnElement, keyword: str, value: str) -> sa.ColumnElement:
    uids = [u.strip() for u in value.replace(",", "\\").split("\\") if u.strip()]
    for uid in uids:
        if not re.fullmatch(r"[0-9.]{1,64}", uid):
            raise InvalidQuery(keyword, f"{uid!r} is not a UID")
    return column == uids[0] if len(uids) == 1 else column.in_(uids)


_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")  # IS: within every database's 64-bit integers


def _integers(column: sa.ColumnElement, keyword: str, value: str) -> sa.ColumnElement:
    items = [v.strip() for v in value.split("\\")]
    if not all(_INTEGER.fullmatch(item) for item in items):
        raise InvalidQuery(keyword, f"{value!r} is not an integer (or a \\-separated list)")
    numbers = [int(item) for item in items]
    return column == numbers[0] if len(numbers) == 1 else column.in_(numbers)


def _range(column: sa.ColumnElement, keyword: str, value: str, bound) -> sa.ColumnElement:
    """Single value or range ``A-B``, ``A-``, ``-B`` of dates or times (compared as text)."""
    if "-" not in value:
        low = bound(keyword, value, upper=False)
        high = bound(keyword, value, upper=True)
        return column == low if low == high else sa.and_(column >= low, column <= high)
    if value.count("-") != 1:
        raise InvalidQuery(keyword, f"{value!r} is not a single value or a range A-B")
    start, end = (v.strip() for v in value.split("-"))
    if not start and not end:
        raise InvalidQuery(keyword, "a range needs at least one end")
    conditions = []
    if start:
        conditions.append(column >= bound(keyword, start, upper=False))
    if end:
        conditions.append(column <= bound(keyword, end, upper=True))
    if start and end and bound(keyword, start, upper=False) > bound(keyword, end, upper=True):
        raise InvalidQuery(keyword, f"range {value!r} ends before it starts")
    return sa.and_(*conditions)


def _date_bound(keyword: str, value: str, *, upper: bool) -> str:
    text = value.replace(".", "").strip()  # accept the old YYYY.MM.DD form
    try:
        if not _DATE.match(text):
            raise ValueError
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))  # a day that exists
    except ValueError:
        raise InvalidQuery(keyword, f"{value!r} is not a date (YYYYMMDD)") from None
    return text


def _time_bound(keyword: str, value: str, *, upper: bool) -> str:
    text = value.replace(":", "").strip()
    if not _TIME.match(text) or int(text[0:2]) > 23 or int(text[2:4] or 0) > 59 \
            or int(text[4:6] or 0) > 60:
        raise InvalidQuery(keyword, f"{value!r} is not a time (HHMMSS.FFFFFF)")
    whole, _, fraction = text.partition(".")
    if upper:  # "10" means up to 10:59:59.999999
        return whole + "595959"[len(whole):] + "." + fraction.ljust(6, "9")
    return whole.ljust(6, "0") + ("." + fraction if fraction else "")


def _modalities_in_study(value: str) -> sa.ColumnElement:
    """Studies with at least one series of one of the given modalities."""
    wanted = [v.strip() for v in alternatives("ModalitiesInStudy", value) if v.strip()]
    other = series.alias("modality_series")
    matches = sa.or_(*(_string(other.c.modality, m) for m in wanted))
    return sa.exists().where(other.c.study_pk == studies.c.pk, matches)


# ---------------------------------------------------------------------------- return keys


def _add_extra(conn: Connection, level: Level, rows: list[dict[str, Any]],
               tags: Iterable[str]) -> None:
    """Attach the DICOM JSON of ``tags`` from a representative instance of each row."""
    wanted = set(tags)
    if level is Level.INSTANCE:
        pks = [row["_instances_pk"] for row in rows]
        owner = instances.c.pk
        query = sa.select(owner, instances.c.header).where(owner.in_(pks))
    else:
        owner_column = {Level.SERIES: instances.c.series_pk,
                        Level.STUDY: series.c.study_pk,
                        Level.PATIENT: studies.c.patient_pk}[level]
        first = (sa.select(owner_column.label("owner"), sa.func.min(instances.c.pk).label("pk"))
                 .select_from(instances.join(series, instances.c.series_pk == series.c.pk)
                              .join(studies, series.c.study_pk == studies.c.pk))
                 .where(owner_column.in_([row[f"_{_table_name(level)}_pk"] for row in rows]))
                 .group_by(owner_column).subquery())
        owner = first.c.owner
        query = sa.select(first.c.owner, instances.c.header).join(
            instances, instances.c.pk == first.c.pk)
    headers = {pk: header for pk, header in conn.execute(query)}
    for row in rows:
        header = headers.get(row[f"_{_table_name(level)}_pk"])
        parsed = json.loads(header) if header else {}
        row["_extra"] = {tag: parsed[tag] for tag in wanted if tag in parsed}


def _table_name(level: Level) -> str:
    return TABLES[level].name



# ---------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """An instance with pixels, as much as rendering needs to pick and read it."""

    blob_key: str
    number_of_frames: int


def image_instances(index: Index, study_uid: str, series_uid: str | None = None
                    ) -> list[StoredImage]:
    """The image instances of a study or series (they have Rows), in display order: series
    by number, then instances by number. Lighter than ``find`` for choosing a thumbnail."""
    statement = (
        sa.select(instances.c.blob_key, instances.c.number_of_frames)
        .select_from(instances.join(series, instances.c.series_pk == series.c.pk)
                     .join(studies, series.c.study_pk == studies.c.pk))
        .where(studies.c.study_instance_uid == study_uid, instances.c.pixel_rows.is_not(None))
        .order_by(series.c.series_number, series.c.pk, instances.c.instance_number,
                  instances.c.pk)
    )
    if series_uid is not None:
        statement = statement.where(series.c.series_instance_uid == series_uid)
    with index.read() as conn:
        return [StoredImage(key, frames or 1) for key, frames in conn.execute(statement)]
