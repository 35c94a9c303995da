"""HTTP requests with one deadline for the whole exchange, for the outbox's FHIR sends.

httpx's timeouts bound each network operation, not the request: a receiver that sends a
byte every few seconds keeps a request, and its destination's outbox worker, forever. Here
every connect, read and write gets what is left of one deadline (``httpcore``'s network
backend interface, which httpx is built on), so an attempt ends at ``timeout`` seconds
whatever the peer does, like ``emr.mllp.send``. No proxy is used: results go to the
hospital's EMR, on its network.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
import typing

import httpcore

__all__ = ["Answer", "DeadlineExceeded", "request"]

MAX_ANSWER_BYTES = 64 * 1024  # kept of an answer's body: enough for an OperationOutcome


class DeadlineExceeded(TimeoutError):
    """The exchange did not finish within its deadline."""


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    text: str  # the body, at most MAX_ANSWER_BYTES of it, decoded as UTF-8

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300


def request(method: str, url: str, body: bytes, headers: dict[str, str], *,
            timeout: float) -> Answer:
    """Send one request and read its answer within ``timeout`` seconds in all.

    ``DeadlineExceeded`` when time runs out; ``httpcore`` errors (``ConnectError``...) when
    the exchange fails."""
    deadline = time.monotonic() + timeout
    backend = _DeadlineBackend(deadline)
    try:
        with httpcore.ConnectionPool(network_backend=backend,
                                     ssl_context=ssl.create_default_context()) as pool, \
                pool.stream(method, url, headers=list(headers.items()), content=body,
                            extensions={"timeout": _timeouts(timeout)}) as response:
            kept = bytearray()
            for chunk in response.iter_stream():
                if len(kept) < MAX_ANSWER_BYTES:
                    kept += chunk[:MAX_ANSWER_BYTES - len(kept)]
            return Answer(response.status, kept.decode("utf-8", "replace"))
    except httpcore.TimeoutException:
        raise DeadlineExceeded(f"no complete answer from {url} within {timeout:g} s") \
            from None


def _timeouts(timeout: float) -> dict[str, float]:
    return {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}


def _left(deadline: float, timeout: float | None) -> float:
    """What an operation may take: its own timeout, capped by what is left of the deadline
    (``httpcore.TimeoutException`` once nothing is)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the exchange's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation ends by the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(self._deadline, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(self._deadline, timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        secured = self._stream.start_tls(ssl_context, server_hostname,
                                         _left(self._deadline, timeout))
        return _DeadlineStream(secured, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own backend, its connections bounded by the deadline."""

    def __init__(self, deadline: float) -> None:
        self._backend = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable | None = None) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, _left(self._deadline, timeout),
                                           local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable | None = None
                            ) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(path, _left(self._deadline, timeout),
                                                   socket_options)
        return _DeadlineStream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(self._deadline - time.monotonic(), 0)))
