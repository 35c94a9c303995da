"""Key images of a study: what its Key Object Selection documents point at.

Read from the index only (each KOS's stored DICOM JSON), never from the files. A KOS lists its
references twice: in the evidence (CurrentRequestedProcedureEvidenceSequence > series > SOP
instances) and as IMAGE items of its content tree. The content tree gives the order the author
chose; the evidence completes it. Only references to images the study holds are kept, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from storage.attributes import Level
from storage.index import Index
from storage.query import Query, find

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"

# DICOM JSON keys (tags) read from a KOS.
_EVIDENCE = "0040A375"  # CurrentRequestedProcedureEvidenceSequence
_REFERENCED_SERIES = "00081115"  # ReferencedSeriesSequence
_REFERENCED_SOP = "00081199"  # ReferencedSOPSequence
_REFERENCED_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
_REFERENCED_FRAMES = "00081160"  # ReferencedFrameNumber
_CONTENT = "0040A730"  # ContentSequence
_VALUE_TYPE = "0040A040"  # ValueType


@dataclass(frozen=True)
class KeyImage:
    """One image a KOS selected; ``frame`` is 1-based, None for the whole instance."""

    series_instance_uid: str
    sop_instance_uid: str
    frame: int | None = None


def key_images(index: Index, study_uid: str) -> list[KeyImage]:
    """The key images of a study, in the order its KOS documents give them ([] when none)."""
    documents = find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid,
                                                   "SOPClassUID": KEY_OBJECT_SELECTION},
                                  with_header=True))
    if not documents:
        return []
    # The study's images (instances with Rows): sop -> (series, number of frames).
    images = {
        row["SOPInstanceUID"]: (row["SeriesInstanceUID"], row["NumberOfFrames"] or 1)
        for row in find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid}))
        if row["Rows"]
    }
    chosen: list[KeyImage] = []
    seen: set[tuple[str, int | None]] = set()
    for document in documents:  # in the order they were stored
        header = json.loads(document["_header"] or "{}")
        for sop_uid, frame in _references(header):
            found = images.get(sop_uid)
            if found is None or (sop_uid, frame) in seen:
                continue
            series_uid, frames = found
            if frame is not None and not 1 <= frame <= frames:
                continue
            seen.add((sop_uid, frame))
            chosen.append(KeyImage(series_uid, sop_uid, frame))
    return chosen


def _references(header: dict[str, Any]) -> Iterator[tuple[str, int | None]]:
    """(SOP Instance UID, frame) referenced by a KOS: content order first, then the evidence."""
    yield from _content_references(_items(header, _CONTENT))
    for series in _items(header, _EVIDENCE):
        for referenced in _items(series, _REFERENCED_SERIES):
            yield from _sop_references(_items(referenced, _REFERENCED_SOP))


def _content_references(items: list[dict[str, Any]]) -> Iterator[tuple[str, int | None]]:
    for item in items:
        if _first(item, _VALUE_TYPE) == "IMAGE":
            yield from _sop_references(_items(item, _REFERENCED_SOP))
        yield from _content_references(_items(item, _CONTENT))  # nested containers


def _sop_references(items: list[dict[str, Any]]) -> Iterator[tuple[str, int | None]]:
    for item in items:
        sop_uid = _first(item, _REFERENCED_SOP_INSTANCE)
        if not sop_uid:
            continue
        frames = [int(f) for f in _values(item, _REFERENCED_FRAMES) if _is_int(f)]
        if not frames:
            yield str(sop_uid), None
        for frame in frames:
            yield str(sop_uid), frame


def _items(obj: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return [v for v in _values(obj, tag) if isinstance(v, dict)]


def _values(obj: dict[str, Any], tag: str) -> list[Any]:
    element = obj.get(tag)
    return list(element.get("Value") or []) if isinstance(element, dict) else []


def _first(obj: dict[str, Any], tag: str) -> Any:
    values = _values(obj, tag)
    return values[0] if values else None


def _is_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True
