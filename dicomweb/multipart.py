"""multipart/related (RFC 2387) as DICOMweb uses it: a streaming writer and a streaming reader.

The writer turns an iterator of parts (each an iterator of byte chunks) into the body of a
response without holding more than one chunk; the reader splits a request body into parts as it
arrives, holding one part at a time (a STOW-RS request may carry a whole study).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

CRLF = b"\r\n"


class MultipartError(ValueError):
    """The body is not well-formed multipart/related."""


def new_boundary() -> str:
    return "pacs-" + secrets.token_hex(16)


def content_type(media_type: str, boundary: str, *, transfer_syntax: str | None = None) -> str:
    """The Content-Type of a multipart/related response whose parts are ``media_type``."""
    value = f'multipart/related; type="{media_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


@dataclass
class Part:
    """One part to send: its headers and its body as chunks."""

    content_type: str
    chunks: Iterable[bytes]
    headers: dict[str, str] = field(default_factory=dict)


def write_parts(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related message, chunk by chunk."""
    for part in parts:
        yield _head(part, boundary)
        yield from part.chunks
        yield CRLF
    yield _closing(boundary)


def body_length(parts: list[Part], boundary: str) -> int | None:
    """Length of ``write_parts(parts, boundary)`` when every part declares Content-Length."""
    try:
        sizes = [int(part.headers["Content-Length"]) for part in parts]
    except (KeyError, ValueError):
        return None
    return sum(len(_head(part, boundary)) + size + len(CRLF) for part, size in
               zip(parts, sizes, strict=True)) + len(_closing(boundary))


def _head(part: Part, boundary: str) -> bytes:
    lines = [b"--" + boundary.encode("ascii"),
             b"Content-Type: " + part.content_type.encode("ascii")]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in part.headers.items()]
    return CRLF.join(lines) + CRLF + CRLF


def _closing(boundary: str) -> bytes:
    return b"--" + boundary.encode("ascii") + b"--" + CRLF


def coalesce(chunks: Iterable[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """``chunks`` regrouped into pieces of about ``size`` bytes.

    A streamed response costs a hop to a worker thread per piece; part headers and separators
    are tens of bytes, so without this a series of 512 KB slices needs three hops per slice.
    """
    pending: list[bytes] = []
    pending_size = 0
    for chunk in chunks:
        if pending_size + len(chunk) > size and pending:
            yield b"".join(pending)
            pending, pending_size = [], 0
        if len(chunk) >= size:
            yield chunk
            continue
        pending.append(chunk)
        pending_size += len(chunk)
    if pending:
        yield b"".join(pending)


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Media type (lower case) and parameters (names lower case, quotes removed)."""
    media_type, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for item in split_outside_quotes(rest, ";"):
        name, sep, raw = item.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        params[name.strip().lower()] = raw
    return media_type.strip().lower(), params


def split_outside_quotes(text: str, separator: str) -> list[str]:
    """``text`` split on ``separator`` where it is not inside double quotes, items stripped."""
    items, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


@dataclass
class ReceivedPart:
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


async def read_parts(stream: AsyncIterator[bytes], boundary: str, *,
                     max_bytes: int) -> AsyncIterator[ReceivedPart]:
    """Parts of a multipart body as it streams in.

    Raises ``MultipartError`` for a malformed body and ``BodyTooLarge`` once more than
    ``max_bytes`` arrived (parts before that point have already been yielded).
    """
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type has no usable boundary parameter")
    delimiter = CRLF + b"--" + boundary.encode("latin-1")
    buffer = bytearray(CRLF)  # so the first delimiter looks like every other one
    received = 0
    started = finished = False
    search_from = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise BodyTooLarge(max_bytes)
        if finished:
            continue  # epilogue: ignored
        buffer += chunk
        while True:
            found = buffer.find(delimiter, search_from)
            if found < 0:
                search_from = max(0, len(buffer) - len(delimiter))
                break
            after = found + len(delimiter)
            if len(buffer) < after + 2:
                search_from = found
                break  # need to see whether "--" or CRLF follows
            if started:
                yield _parse_part(bytes(buffer[:found]))
            elif buffer[:found].strip():
                pass  # a preamble: allowed, ignored
            started = True
            tail = bytes(buffer[after:after + 2])
            if tail == b"--":
                finished = True
                del buffer[:]
                break
            line_end = buffer.find(CRLF, after)
            if line_end < 0:
                search_from = found
                break  # transport padding not complete yet
            del buffer[:line_end + 2]
            search_from = 0
    if not started:
        raise MultipartError(f"no part delimited by boundary {boundary!r} in the body")
    if not finished:
        raise MultipartError("the body ended before the closing boundary (truncated?)")


def _parse_part(raw: bytes) -> ReceivedPart:
    head_end = raw.find(CRLF + CRLF)
    if raw.startswith(CRLF):  # a part with no headers at all
        return ReceivedPart({}, raw[2:])
    if head_end < 0:
        raise MultipartError("a part has no blank line after its headers")
    headers: dict[str, str] = {}
    for line in raw[:head_end].split(CRLF):
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return ReceivedPart(headers, raw[head_end + 4:])


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit
