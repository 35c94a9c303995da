"""How the HTTP side answers what goes wrong: the archive's errors and HTTPExceptions as
statuses with a message (``error_handlers``, in the format a route's prefix asks for), anything
unexpected as a 500 logged without its text (``ContainErrors``, which may quote patient data),
a request body that stops arriving as 408 (``BodyIdleTimeout``), and the path as the log may
show it (``loggable_path``)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from dicomweb import qido, render
from dicomweb.media import NotAcceptable
from dicomweb.multipart import (
    BodyTooLarge,
    MultipartError,
)
from dicomweb.transcode import NotTranscodable
from pacs.access import ErrorBodies
from pacs.http_input import under_prefix
from pacs.logs import ANSWER_CUT_SHORT
from storage.errors import InvalidQuery, NotFound, StorageUnavailable

log = logging.getLogger("pacs.dicomweb")


class UnsupportedMediaType(ValueError):
    """The request body is not of a type this route accepts (HTTP 415)."""


class BodyTimeout(Exception):
    """The request body stopped arriving (HTTP 408)."""


_STATUSES: list[tuple[type[BaseException], int]] = [
    (qido.BadQueryParameter, 400), (InvalidQuery, 400), (MultipartError, 400),
    (render.CannotRender, 422),
    (NotFound, 404), (NotAcceptable, 406), (NotTranscodable, 406), (BodyTooLarge, 413),
    (UnsupportedMediaType, 415), (StorageUnavailable, 503), (BodyTimeout, 408),
]




def error_handlers(bodies: ErrorBodies | None = None) -> dict[Any, Any]:
    """Starlette ``exception_handlers`` answering the archive's errors and HTTPExceptions (an
    unknown path, a wrong method) with their status, in the format of ``bodies``."""
    async def handler(request: Request, exc: Exception) -> Response:
        return await _error_response(request, exc, bodies)
    return {**{kind: handler for kind, _ in _STATUSES}, HTTPException: handler}


async def _error_response(request: Request, exc: Exception,
                          bodies: ErrorBodies | None = None) -> Response:
    """Every failure as a body with a message; never a crash, never a stack trace."""
    headers = {}
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
        headers.update(exc.headers or {})  # Allow, for a 405
    else:
        status = next((code for kind, code in _STATUSES if isinstance(exc, kind)), 500)
        message = str(exc) if status != 500 else "internal error; see the server log"
    if status == 500:
        # The exception's own text may quote data (a database error quotes its parameters,
        # a validation error its input: patient names); at ERROR only what failed and where.
        log.error("HTTP %s %s failed: %s at %s", request.method, loggable_path(request.scope),
                  type(exc).__name__, _where(exc))
        log.debug("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    elif status == 503:
        log.error("HTTP %s %s: %s", request.method, loggable_path(request.scope), message)
    if status == 408:  # the rest of the body may still come: the connection cannot go on
        headers["Connection"] = "close"
    body = under_prefix(bodies or {}, request.scope.get("path", ""))
    response = (body(status, message) if body is not None else
                JSONResponse({"status": status, "message": message}, status_code=status))
    response.headers.update(headers)
    return response


# Path parameters whose values may be logged: UIDs and formats. The others (an accession
# number, a share link's token, a FHIR id) identify a patient or unlock a study.
_LOGGABLE_PARAMETERS = frozenset({"study", "series", "instance", "frames", "uid", "kind"})


def loggable_path(scope) -> str:
    """The request's path for the log: parameters other than UIDs named, not given."""
    path = scope.get("path", "")
    for name, value in (scope.get("path_params") or {}).items():
        if name not in _LOGGABLE_PARAMETERS and str(value):
            path = path.replace(f"/{value}", f"/{{{name}}}")
    return path


def _where(exc: BaseException) -> str:
    """File and line where ``exc`` was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({code.co_name})"


class BodyIdleTimeout:
    """ASGI middleware: while a request's body is arriving, each part of it must come within
    ``seconds`` of the last, or the request fails with ``BodyTimeout`` (answered 408; the
    server then closes the connection, the body being unread). Only the body: waiting for
    the client to disconnect during a long answer is not limited."""

    def __init__(self, app, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                with anyio.fail_after(self.seconds):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(f"no part of the request body came for {self.seconds:g} s"
                                  ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, timed_receive, send)


class ContainErrors:
    """ASGI middleware: an unexpected exception becomes ``_error_response``'s 500, logged
    once, and the connection stays open for the client's next request.

    Starlette's own last-resort handler answers too, but then re-raises, so the server logs
    the traceback again and drops the connection; a client reusing it sees it reset. After
    the answer has started, closing the connection is the only way to tell the client that
    the body is cut short: the exception is logged in one line and the answer left unfinished,
    which the server then closes.
    """

    def __init__(self, app, bodies: ErrorBodies | None = None) -> None:
        self.app = app
        self.bodies = bodies

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            log.info("HTTP %s %s: the client went away while sending its request",
                     scope.get("method"), loggable_path(scope))
        except Exception as exc:
            if started:
                # The answer is under way: all that is left is to cut it short, which the server
                # does (closing the connection) when the app returns without finishing it. One
                # line, where re-raising logged a traceback. (Starlette wraps an exception it
                # has a handler for, but too late to use, in a RuntimeError.)
                if isinstance(exc, RuntimeError) and exc.__cause__ is not None:
                    exc = exc.__cause__
                log.warning("HTTP %s %s cut short: %s at %s", scope.get("method"),
                            loggable_path(scope), type(exc).__name__, _where(exc))
                log.debug("HTTP %s %s cut short", scope.get("method"), scope.get("path"),
                          exc_info=exc)
                ANSWER_CUT_SHORT.set(True)  # so uvicorn's line without a cause is left out
                return
            response = await _error_response(Request(scope), exc, self.bodies)
            await response(scope, receive, send)
