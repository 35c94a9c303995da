"""Study-level files people take away: the film sheet (PDF, PNG, or stored back into the study
as an Encapsulated PDF) and the downloads (a DICOM media ZIP with a DICOMDIR, a ZIP of JPEGs).

Staff reach all of it; a share reaches its own study's film and, when it allows downloads,
the ZIPs (``pacs.access`` decides). Uses by a share go to its access log.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tempfile
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pacs.access import principal_of
from pacs.http_input import whole_number
from storage.parsing import is_valid_uid
from viewer.export import write_dicom_zip, write_jpeg_zip
from viewer.film import (
    FilmError,
    FilmRequest,
    NoImagesToFilm,
    choose_images,
    render_film_pdf,
    render_film_png,
    store_film,
)
from viewer.film_canvas import FilmFontMissing

# Images per series on a film (a sheet of a 300-slice series at 1,000 was 19 MB of PDF).
MAX_PER_SERIES = 100


def study_api_routes(server) -> list[Route]:
    archive = server.archive
    settings = server.settings
    policy = server.access

    def film_request(request: Request) -> FilmRequest:
        params = request.query_params
        columns, rows = settings.film_grid
        layout = params.get("layout")
        if layout:
            match = re.fullmatch(r"(\d{1,2})x(\d{1,2})", layout.lower())
            if not match:
                raise FilmError(f"layout: {layout!r} is not COLUMNSxROWS, e.g. 4x5")
            columns, rows = int(match.group(1)), int(match.group(2))
        window = None
        if params.get("window"):
            try:
                center, width = (float(v) for v in params["window"].split(",")[:2])
            except ValueError:
                raise FilmError(f"window: {params['window']!r} is not center,width") from None
            window = (center, width)
        per_series = settings.film_images_per_series
        if "per_series" in params:
            per_series = whole_number(params["per_series"]) or 0
            if not 1 <= per_series <= MAX_PER_SERIES:
                raise FilmError(f"per_series: {params['per_series']!r} is not a number of "
                                f"images from 1 to {MAX_PER_SERIES}")
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
                sheets = await run_in_threadpool(render_film_png, archive, study_uid, options)
                if not 1 <= sheet <= len(sheets):
                    raise FilmError(f"sheet: {sheet} is not between 1 and {len(sheets)}")
                body, media_type = sheets[sheet - 1], "image/png"
        except ValueError as exc:
            return _film_error(exc)
        except FilmFontMissing as exc:
            return _error(503, str(exc))
        await policy.record_use(principal_of(request), "film", kind)
        return Response(body, media_type=media_type, headers={
            "Cache-Control": "private, no-cache",
            "Content-Disposition": f'inline; filename="phim-so.{kind}"'})

    async def store(request: Request) -> Response:
        """Make the film and keep it in the study, where viewers and the EMR see it."""
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
        return JSONResponse({"study_instance_uid": study_uid,
                             "series_instance_uid": result.series_instance_uid,
                             "sop_instance_uid": result.sop_instance_uid,
                             "bytes": len(pdf)}, status_code=201)

    async def download(request: Request) -> Response:
        study_uid = request.path_params["study"]
        if not is_valid_uid(study_uid):  # "*" or "" would match every study
            return _error(400, f"study UID: {study_uid!r} is not a UID")
        kind = request.query_params.get("format", "dicom")
        if kind not in ("dicom", "jpeg"):
            return _error(400, f"format: {kind!r} must be dicom or jpeg")
        folder = Path(tempfile.mkdtemp(prefix="pacs-export-"))
        path = folder / "study.zip"
        writer = write_dicom_zip if kind == "dicom" else write_jpeg_zip
        try:
            await run_in_threadpool(writer, archive, study_uid, path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        await policy.record_use(principal_of(request), f"download-{kind}")
        name = f"anh-chup-{'dicom' if kind == 'dicom' else 'jpeg'}-{dt.date.today():%Y%m%d}.zip"
        return FileResponse(path, media_type="application/zip", filename=name,
                            headers={"Cache-Control": "no-store"},
                            background=BackgroundTask(shutil.rmtree, folder, True))

    return [
        Route("/api/studies/{study}/film.{kind:str}", film, methods=["GET"]),
        Route("/api/studies/{study}/film", store, methods=["POST"]),
        Route("/api/studies/{study}/download", download, methods=["GET"]),
    ]


def _film_error(exc: ValueError) -> Response:
    return _error(422 if isinstance(exc, NoImagesToFilm) else 400, str(exc))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


__all__ = ["study_api_routes"]
