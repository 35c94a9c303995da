"""Study-level files people take away: the film sheet (PDF, PNG, or stored back into the study
as an Encapsulated PDF) and the downloads (a DICOM media ZIP with a DICOMDIR, a ZIP of JPEGs).

Staff reach all of it; a share reaches its own study's film and, when it allows downloads,
the ZIPs (``pacs.access`` decides). Uses by a share go to its access log.

A ZIP is sent as it is made (``viewer.export``): its first bytes leave at once, and a client
that leaves stops the work. HEAD answers from the index alone.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator, Generator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dicomweb.render import parse_window
from pacs.access import principal_of
from pacs.http_input import whole_number
from storage.archive import StoreOutcome
from storage.parsing import is_valid_uid
from viewer.export import dicom_zip_chunks, jpeg_zip_chunks, study_instances
from viewer.film import (
    FilmError,
    FilmRequest,
    NoImagesToFilm,
    choose_images,
    render_film_pdf,
    render_film_sheet_png,
    store_film,
)
from viewer.film_canvas import FilmFontMissing


def study_api_routes(server) -> list[Route]:
    archive = server.archive
    settings = server.settings
    policy = server.access

    def film_request(request: Request) -> FilmRequest:
        """The film a request asks for; ``FilmError`` naming the parameter that is wrong."""
        params = request.query_params
        columns, rows = settings.film_grid
        layout = params.get("layout")
        if layout:
            match = re.fullmatch(r"(\d{1,2})x(\d{1,2})", layout.lower())
            if not match or not layout.isascii():
                raise FilmError(f"layout: {layout!r} is not COLUMNSxROWS, e.g. 4x5")
            columns, rows = int(match.group(1)), int(match.group(2))
        window = None
        if params.get("window"):
            window = _window(params["window"])
        per_series = settings.film_images_per_series
        if "per_series" in params:
            per_series = whole_number(params["per_series"]) or 0
            if per_series < 1:
                raise FilmError(f"per_series: {params['per_series']!r} is not a number of "
                                "images (1, 2, 3...)")
        return FilmRequest(site_name=settings.site_name, columns=columns, rows=rows,
                           per_series=per_series, window=window)

    async def film(request: Request) -> Response:
        study_uid = request.path_params["study"]
        if not is_valid_uid(study_uid):  # "*" or "" would match every study
            return _error(400, f"study UID: {study_uid!r} is not a UID")
        kind = request.path_params["kind"]
        if kind not in ("pdf", "png"):
            return _error(404, "the film is available as film.pdf and film.png")
        try:
            options = film_request(request)
            if kind == "pdf":
                pdf = await run_in_threadpool(render_film_pdf, archive, study_uid, options)
                body, media_type = pdf, "application/pdf"
            else:
                sheet = whole_number(request.query_params.get("sheet", "1"))
                if sheet is None:
                    raise FilmError(f"sheet: {request.query_params['sheet']!r} is not a "
                                    "sheet number")
                # Only the sheet asked for is drawn (a sheet is 15 MB of pixels at 150 dpi).
                body = await run_in_threadpool(render_film_sheet_png, archive, study_uid,
                                               options, sheet)
                media_type = "image/png"
        except ValueError as exc:
            return _film_error(exc)
        except FilmFontMissing as exc:
            return _error(503, str(exc))
        await policy.record_use(principal_of(request), "film", kind)
        return Response(body, media_type=media_type, headers={
            "Cache-Control": "private, no-cache",
            "Content-Disposition": f'inline; filename="phim-so.{kind}"'})

    async def store(request: Request) -> Response:
        """Make the film and keep it in the study, where viewers and the EMR see it; the same
        film asked for again is the instance already stored (200 instead of 201)."""
        study_uid = request.path_params["study"]
        if not is_valid_uid(study_uid):  # "*" or "" would match every study
            return _error(400, f"study UID: {study_uid!r} is not a UID")
        try:
            options = film_request(request)
            pdf = await run_in_threadpool(render_film_pdf, archive, study_uid, options)
        except ValueError as exc:
            return _film_error(exc)
        except FilmFontMissing as exc:
            return _error(503, str(exc))
        shown = await run_in_threadpool(choose_images, archive.index, study_uid,
                                        options.per_series)
        result = await run_in_threadpool(lambda: store_film(
            archive, study_uid, pdf, site_name=settings.site_name, sources=shown))
        stored = result.outcome is not StoreOutcome.DUPLICATE_KEPT
        return JSONResponse({"study_instance_uid": study_uid,
                             "series_instance_uid": result.series_instance_uid,
                             "sop_instance_uid": result.sop_instance_uid,
                             "stored": stored, "bytes": len(pdf)},
                            status_code=201 if stored else 200)

    async def download(request: Request) -> Response:
        study_uid = request.path_params["study"]
        if not is_valid_uid(study_uid):  # "*" or "" would match every study
            return _error(400, f"study UID: {study_uid!r} is not a UID")
        kind = request.query_params.get("format", "dicom")
        if kind not in ("dicom", "jpeg"):
            return _error(400, f"format: {kind!r} must be dicom or jpeg")
        rows = await run_in_threadpool(study_instances, archive, study_uid)  # 404 first
        name = f"anh-chup-{kind}-{dt.date.today():%Y%m%d}.zip"
        headers = {"Cache-Control": "no-store",
                   "Content-Disposition": f'attachment; filename="{name}"'}
        if request.method == "HEAD":  # (a link checker, a download manager): nothing made
            # No body and no Content-Length, as the GET: its length is known once it is made.
            return StreamingResponse(iter(()), media_type="application/zip", headers=headers)
        await policy.record_use(principal_of(request), f"download-{kind}")
        chunks = (dicom_zip_chunks if kind == "dicom" else jpeg_zip_chunks)(
            archive, study_uid, rows)
        return StreamingResponse(_as_made(chunks), media_type="application/zip",
                                 headers=headers)

    return [
        Route("/api/studies/{study}/film.{kind:str}", film, methods=["GET"]),
        Route("/api/studies/{study}/film", store, methods=["POST"]),
        Route("/api/studies/{study}/download", download, methods=["GET"]),
    ]


async def _as_made(chunks: Generator[bytes, None, object]) -> AsyncIterator[bytes]:
    """The pieces of an export, each made in a worker thread when the client can take it.

    Nothing is made ahead: when the client leaves, Starlette stops asking (cancelling this
    generator) and ``close`` ends the export where it stands, its temporary file included."""
    try:
        while True:
            piece = await run_in_threadpool(next, chunks, None)
            if piece is None:
                return
            yield piece
    finally:
        chunks.close()


def _window(text: str) -> tuple[float, float]:
    """The ``window`` parameter as ``/rendered`` reads it; ``FilmError`` naming it."""
    try:
        return parse_window(text)
    except ValueError as exc:
        raise FilmError(str(exc)) from None


def _film_error(exc: ValueError) -> Response:
    return _error(422 if isinstance(exc, NoImagesToFilm) else 400, str(exc))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


__all__ = ["study_api_routes"]
