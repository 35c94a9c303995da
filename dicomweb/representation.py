"""How one representation of a resource goes out over HTTP: DICOM JSON gzipped when the client
takes it (RFC 9110 12.5.3 weights), an ETag per content coding and If-None-Match (8.8.3,
13.1.2), and a single byte range of bulk data (14.1-14.4). Used by ``dicomweb.app``."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

DICOM_JSON = "application/dicom+json"
GZIP_MIN_BYTES = 1024


def json_response(request: Request, value: Any, *, status_code: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """``value`` as DICOM JSON (UTF-8, compact), see ``json_bytes_response``."""
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return json_bytes_response(request, body, status_code=status_code, headers=headers)


def json_bytes_response(request: Request, body: bytes, *, status_code: int = 200,
                        headers: dict[str, str] | None = None,
                        etag: str | None = None) -> Response:
    """``body`` as DICOM JSON, gzipped when the client takes it; with ``etag``, answered 304
    when the client's If-None-Match holds the ETag of the representation it would get."""
    headers = dict(headers or {})
    headers["Vary"] = "Accept-Encoding"
    gzipped = len(body) >= GZIP_MIN_BYTES and _takes_gzip(request.headers.get("accept-encoding"))
    if etag is not None:
        # RFC 9110 8.8.3: each content coding is another representation, with its own ETag.
        headers["ETag"] = _coded_etag(etag, "gzip") if gzipped else etag
        if _none_match_fails(request.headers.get("if-none-match"), headers["ETag"]):
            # RFC 9110 15.4.5: the ETag, Vary and Cache-Control a 200 would have carried.
            return Response(status_code=304, headers=headers)
    if gzipped:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, status_code=status_code, media_type=DICOM_JSON, headers=headers)


def _takes_gzip(header: str | None) -> bool:
    """Whether ``Accept-Encoding: header`` makes gzip the coding to send (RFC 9110 12.5.3): gzip
    (or x-gzip, or ``*``) weighted above 0 and not below identity. A weight that is not a
    qvalue makes its entry count for nothing; no header: identity."""
    weights: dict[str, float] = {}
    for entry in (header or "").split(","):
        coding, *parameters = (piece.strip() for piece in entry.split(";"))
        weight: float | None = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = None
                if weight is not None and not 0 <= weight <= 1:  # also NaN
                    weight = None
        if coding and weight is not None:
            weights.setdefault(coding.lower(), weight)
    any_other = weights.get("*")
    gzip_weight = weights.get("gzip", weights.get("x-gzip", any_other)) or 0
    identity_weight = weights.get("identity", any_other)
    return gzip_weight > 0 and (identity_weight is None or gzip_weight >= identity_weight)


def _coded_etag(etag: str, coding: str) -> str:
    """The ETag of the ``coding`` content coding of the representation tagged ``etag``."""
    return f'{etag[:-1]}-{coding}"'


_ENTITY_TAG = re.compile(r'(?:W/)?("[^"]*")')


def _none_match_fails(header: str | None, etag: str) -> bool:
    """Whether ``If-None-Match: header`` is false for an existing representation tagged
    ``etag`` (RFC 9110 13.1.2): ``*``, or one of its entity tags equal to ``etag`` in the weak
    comparison (``W/`` ignored on both sides)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag == opaque for tag in _ENTITY_TAG.findall(header))


def ranged_response(request: Request, data: bytes) -> Response:
    """``data`` as application/octet-stream, honouring a ``Range`` of one byte range."""
    answer = range_answer(request, len(data))
    if isinstance(answer, Response):
        return answer
    status, headers, (start, end) = answer
    return Response(data[start:end], status_code=status, media_type="application/octet-stream",
                    headers=headers)


def range_answer(request: Request, size: int
                 ) -> Response | tuple[int, dict[str, str], tuple[int, int]]:
    """How to answer for ``size`` bytes of octets given the request's ``Range``: the 416
    response, or (status, headers, (start, stop)) of the bytes to send."""
    headers = {"Accept-Ranges": "bytes"}
    # RFC 9110 13.1.5: an If-Range validator must match the current one for the Range to
    # apply; bulk data is sent without validators, so none can.
    header = None if "if-range" in request.headers else request.headers.get("range")
    try:
        wanted = _byte_range(header, size)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    if wanted is None:
        return 200, headers, (0, size)
    start, end = wanted
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, headers, (start, end + 1)


class RangeNotSatisfiable(ValueError):
    """No byte asked for by a Range header is in the representation (HTTP 416)."""


_RANGE_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of the one range ``Range: header`` asks of ``size`` bytes; None to
    send them all: no header, or one to ignore (RFC 9110 14.2) for another range unit, a
    syntactically invalid range-spec (14.1.1: ``bytes=5-3``, ``bytes=abc``, ``bytes=5``), or
    several ranges. ``RangeNotSatisfiable`` when the range starts past the end."""
    if not header:
        return None
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    matches = [_RANGE_SPEC.fullmatch(spec) for spec in specs]
    if not matches or None in matches:
        return None
    for match in matches:
        first, last, _ = match.groups()
        if first is not None and last and _position(last) < _position(first):
            return None
    if len(matches) > 1:  # allowed to be served whole; nothing here asks for several
        return None
    first, last, suffix = matches[0].groups()
    if suffix is not None:
        if _position(suffix) == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - _position(suffix), 0), size - 1
    if _position(first) >= size:
        raise RangeNotSatisfiable
    return _position(first), min(_position(last), size - 1) if last else size - 1


def _position(digits: str) -> int:
    """A byte position's digits as a number; past 30 digits, one larger than any size (int()
    refuses thousands of digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 30 else 10**30
