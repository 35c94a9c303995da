"""Accept header negotiation for DICOMweb (PS3.18 8.7): media types and transfer syntaxes."""

from __future__ import annotations

from dataclasses import dataclass

from dicomweb.multipart import parse_content_type, split_outside_quotes

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DICOM = "application/dicom"  # a PS3.10 file; alone (single part) only for one instance

# Media type of a frame (or of bulk pixel data) in each compressed transfer syntax
# (PS3.18 Table 8.7.3-2), for labelling parts and for matching Accept.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg", "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4", "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4", "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
}


class NotAcceptable(ValueError):
    """No representation the client accepts can be produced (HTTP 406)."""


@dataclass(frozen=True)
class Accepted:
    """One entry of an Accept header."""

    media_type: str  # e.g. "multipart/related", "application/dicom+json", "*/*"
    part_type: str | None  # the ``type`` parameter of multipart/related
    transfer_syntax: str | None  # the ``transfer-syntax`` parameter ("*": as stored)
    quality: float

    @property
    def is_wildcard(self) -> bool:
        """Whether this entry is ``*/*``: any media type, single part or multipart."""
        return self.media_type in ("*/*", "*")

    @property
    def is_multipart(self) -> bool:
        """Whether this entry asks for multipart/related, by name or as ``multipart/*``."""
        return not self.is_wildcard and range_matches(self.media_type, "multipart/related")

    def matches(self, media_type: str) -> bool:
        """Whether this entry accepts ``media_type`` (wildcards allowed on either side)."""
        return range_matches(self.media_type, media_type)

    def part_matches(self, media_type: str) -> bool:
        """Whether a part of ``media_type`` is acceptable in the multipart answer this entry
        asks for (its ``type`` parameter, a media range too; none given: any type)."""
        return self.part_type is None or range_matches(self.part_type, media_type)


def accept_ranges(header: str | None) -> list[Accepted]:
    """Every entry of an Accept header in its order, those weighted 0 (refusals) included; no
    header means ``*/*``, an unreadable weight counts as 1."""
    entries = []
    for item in split_outside_quotes(header or "*/*", ","):
        media_type, params = parse_content_type(item)
        if not media_type:
            continue
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        part_type = params.get("type")
        entries.append(Accepted(media_type, part_type.lower() if part_type else None,
                                params.get("transfer-syntax"), quality))
    return entries


def parse_accept(header: str | None) -> list[Accepted]:
    """The acceptable entries of an Accept header, best first (no header means ``*/*``)."""
    ranked = sorted(enumerate(accept_ranges(header)), key=lambda e: (-e[1].quality, e[0]))
    return [entry for _, entry in ranked if entry.quality > 0]


def range_matches(media_range: str, media_type: str) -> bool:
    """Whether the media range of an Accept entry includes ``media_type`` (RFC 9110 12.5.1):
    ``*/*`` every type, ``type/*`` every subtype of ``type``, else the same type (both in lower
    case, as ``accept_ranges`` gives them). A bare ``*``, sent by some clients, is ``*/*``."""
    if media_range in ("*/*", "*") or media_type in ("*/*", "*"):
        return True
    kind, _, sub = media_range.partition("/")
    wanted_kind, _, wanted_sub = media_type.partition("/")
    return kind == wanted_kind and sub in ("*", wanted_sub)


def wants_json(accept: list[Accepted]) -> bool:
    """Whether a DICOM JSON answer is acceptable (QIDO-RS, metadata)."""
    return any(a.matches("application/dicom+json") or a.matches("application/json")
               for a in accept)
