"""Values taken from HTTP requests, read the same way by every route."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from starlette.requests import Request

from dicomweb.multipart import BodyTooLarge

T = TypeVar("T")

_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")

JsonLocation = tuple[str | int, ...]  # keys and indexes from the top of a JSON value


class JsonTooLarge(ValueError):
    """A JSON body larger, in values rather than bytes, than a route reads; ``location`` is
    the container where the limit was passed."""

    def __init__(self, message: str, location: JsonLocation) -> None:
        super().__init__(message)
        self.location = location


class TooManyJsonValues(JsonTooLarge):
    """More values in all (objects, arrays, strings, numbers...) than a route reads."""


class JsonNestedTooDeep(JsonTooLarge):
    """Containers nested deeper than a route reads."""


def whole_number(text: str | None) -> int | None:
    """``text`` as a whole number written with the ASCII digits 0-9 (at most 19 of them), else
    None. ``int()`` and ``str.isdigit()`` also take other scripts' digits (full-width ``１``),
    signs, spaces and underscores; a number in a URL is none of those."""
    return int(text) if text is not None and _WHOLE_NUMBER.fullmatch(text) else None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body; ``BodyTooLarge`` once it passes ``max_bytes`` (before reading any of
    it when Content-Length says so), so a large body is never held whole."""
    declared = whole_number(request.headers.get("content-length"))
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; ``ValueError`` saying why when it is not JSON we can read
    (nesting deeper than the parser recurses raises RecursionError, not ValueError). What the
    JSON costs the code that reads it grows with its values, not its bytes (a pydantic model
    keeps an error per array item): see :func:`check_json_size`."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the body is not valid JSON: nested too deeply") from None
    except ValueError:  # UnicodeDecodeError too
        raise ValueError("the body is not valid JSON") from None


def check_json_size(value: Any, *, max_values: int | None = None,
                    max_depth: int | None = None) -> None:
    """``TooManyJsonValues`` when ``value`` holds more than ``max_values`` values in all,
    ``JsonNestedTooDeep`` when it nests containers more than ``max_depth`` deep (the outermost
    is depth 1). Walks without recursing, and stops where a limit is passed."""
    values = 1
    pending: list[tuple[Any, JsonLocation]] = [(value, ())]
    while pending:
        container, location = pending.pop()
        if not isinstance(container, dict | list):
            continue
        if max_depth is not None and len(location) >= max_depth:
            raise JsonNestedTooDeep(f"values are nested more than {max_depth} deep", location)
        values += len(container)
        if max_values is not None and values > max_values:
            raise TooManyJsonValues(f"the body holds more than {max_values} values", location)
        items = container.items() if isinstance(container, dict) else enumerate(container)
        pending.extend((item, (*location, key)) for key, item in items
                       if isinstance(item, dict | list))


def under_prefix(table: Mapping[str, T], path: str) -> T | None:
    """The value of ``table`` (path prefix -> value) whose prefix ``path`` is under, if any:
    ``/fhir`` takes ``/fhir`` and ``/fhir/Patient``, not ``/fhirx``."""
    return next((value for prefix, value in table.items()
                 if path == prefix or path.startswith(prefix + "/")), None)
