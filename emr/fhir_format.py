"""Which FHIR format a request asks for and which it sends (FHIR R4 http.html#mime-type).

This server reads and writes FHIR JSON only (its CapabilityStatement says ``format: [json]``).
A request that takes nothing else (``_format=xml``, ``Accept: application/fhir+xml``) is
refused 406 and a body in another format 415, rather than answered in JSON the client did not
ask for and may not be able to read; the refusal itself is an OperationOutcome in JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

from dicomweb.media import accept_ranges
from dicomweb.multipart import parse_content_type
from emr.fhir import FhirError

FHIR_JSON = "application/fhir+json"
# FHIR JSON by any of its names: R4's, plain JSON, and DSTU2's, which older clients still send.
JSON_MEDIA_TYPES = (FHIR_JSON, "application/json", "application/json+fhir")
_JSON_FORMATS = {"json", *JSON_MEDIA_TYPES}  # what _format takes for JSON
_ONLY_JSON = f"this server reads and writes FHIR JSON only ({FHIR_JSON})"


def check_response_format(formats: Iterable[str], accept: str | None) -> None:
    """``FhirError`` 406 unless the request accepts FHIR JSON: every ``_format`` given names
    JSON, or (without ``_format``, which overrides Accept) the Accept header allows it. A
    blank ``_format`` is no ``_format``; no Accept header is ``*/*``.

    The Accept header allows FHIR JSON when the most specific range matching one of its names
    weighs it above 0 (RFC 9110 12.5.1: ``application/fhir+json;q=0, */*`` refuses it), unless
    a range names ``application/fhir+json``, the type of every answer, with q=0."""
    formats = [value for value in formats if value.strip()]
    if formats:
        refused = [value for value in formats if _format_media_type(value) not in _JSON_FORMATS]
        if refused:
            raise FhirError(406, "not-supported", f"{_ONLY_JSON}; _format={refused[0][:64]} "
                            "cannot be answered (use _format=json)", "_format")
        return
    ranges = _media_ranges(accept)
    answered, specific = _quality(ranges, FHIR_JSON)
    if specific and not answered > 0:  # the type of every answer, refused by its own name
        raise FhirError(406, "not-supported", f"{_ONLY_JSON}; the Accept header refuses "
                        f"{FHIR_JSON} (q=0)")
    if not any(_quality(ranges, media_type)[0] > 0 for media_type in JSON_MEDIA_TYPES):
        raise FhirError(406, "not-supported", f"{_ONLY_JSON}; the Accept header allows none "
                        f"of {', '.join(JSON_MEDIA_TYPES)}")


def check_body_format(content_type: str | None) -> None:
    """``FhirError`` 415 unless a request body is FHIR JSON (a body without Content-Type is
    read as JSON)."""
    if not content_type or not content_type.strip():
        return
    media_type, _ = parse_content_type(content_type)
    if media_type not in JSON_MEDIA_TYPES:
        raise FhirError(415, "not-supported", f"{_ONLY_JSON}; a body of type "
                        f"{media_type[:64]} cannot be read (send Content-Type: {FHIR_JSON})")


def _media_ranges(accept: str | None) -> list[tuple[str, float]]:
    """The media ranges of an Accept header with their weights, q=0 included: RFC 9110 12.5.1
    reads those as refusals that a less specific range (``*/*``) does not override, so not
    ``parse_accept``, which drops them."""
    return [("*/*" if entry.media_type == "*" else entry.media_type, entry.quality)
            for entry in accept_ranges(accept)]


def _quality(ranges: list[tuple[str, float]], media_type: str) -> tuple[float, bool]:
    """The weight the most specific matching range gives ``media_type`` (0 when none
    matches; the highest of equally specific ones), and whether that range names it."""
    kind = media_type.split("/")[0]
    specificity = {media_type: 3, f"{kind}/*": 2, "*/*": 1}
    matching = [(specificity[pattern], quality) for pattern, quality in ranges
                if pattern in specificity]
    if not matching:
        return 0.0, False
    best, quality = max(matching)
    return quality, best == 3


def _format_media_type(value: str) -> str:
    """A ``_format`` value as a media type without parameters, lower case; a ``+`` sent
    unencoded arrives as a space (``application/fhir json``) and is put back."""
    media_type, _ = parse_content_type(value)
    return media_type.replace(" ", "+")
