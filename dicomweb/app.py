"""The DICOMweb app (PS3.18), mounted by ``pacs serve`` at ``/dicomweb``.

The route table below is the whole service; each handler translates HTTP to a call into
``storage`` (through ``dicomweb.qido``, ``wado``, ``stow``); the archive's errors become HTTP
statuses in ``dicomweb.errors``. Blocking work (index queries, blob reads, parsing) runs in the
thread pool.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dicomweb import qido, render, slots, stow, wado
from dicomweb.byteorder import EXPLICIT_BIG_ENDIAN
from dicomweb.errors import BodyTimeout, ContainErrors, UnsupportedMediaType, error_handlers
from dicomweb.media import Accepted, NotAcceptable, parse_accept, range_matches, wants_json
from dicomweb.multipart import (
    BodyTooLarge,
    MultipartError,
    Part,
    body_length,
    coalesce,
    content_type,
    new_boundary,
    parse_content_type,
    read_parts,
    write_parts,
)
from dicomweb.openapi import openapi_document
from dicomweb.representation import (
    DICOM_JSON,
    json_bytes_response,
    json_response,
    range_answer,
    ranged_response,
)
from pacs.access import study_scope
from pacs.http_input import whole_number
from pacs.routes import merged_by_path
from pacs.settings import Settings
from storage.archive import Archive
from storage.attributes import Level
from storage.parsing import require_uid
from storage.query import NameMatching, find

log = logging.getLogger("pacs.dicomweb")

STOW_THREADS = 8  # parts stored at once, all STOW-RS requests together
# Bulk values larger than this (the pixel data of a long cine, a tomosynthesis) are streamed
# from the blob rather than read whole; smaller ones are read whole, then sent.
STREAMED_BULK = 16 << 20


# NumberOfPatientRelatedStudies/Series/Instances: they count the patient's whole record.
_PATIENT_RECORD_COUNTS = ("00201200", "00201202", "00201204")


def build_dicomweb(archive: Archive, settings: Settings) -> Starlette:
    """The DICOMweb ASGI app over ``archive``."""
    default_matching = NameMatching(settings.person_name_matching)
    # Threads storing STOW-RS parts, all requests together. Without a limit of their own they
    # took the threads every request shares (40): a few large uploads and searches, metadata
    # and frames waited for a store to finish.
    stow_threads = anyio.CapacityLimiter(STOW_THREADS)

    public_url = settings.public_url.rstrip("/")

    def base_url(request: Request) -> str:
        """Absolute URL of this app, for the URLs inside answers."""
        if public_url:
            return public_url + "/dicomweb"
        url = request.url.replace(path=request.scope.get("root_path", ""), query="",
                                  fragment="")
        host = request.headers.get("host", "")
        server = request.scope.get("server")
        # Some clients (dicomweb-client) send Host without the port; without a proxy in
        # between, the port the request came in on is the one to give back.
        if host and ":" not in host.rsplit("]", 1)[-1] and server and \
                server[1] not in (80, 443) and "x-forwarded-host" not in request.headers:
            url = url.replace(port=server[1])
        return str(url).rstrip("/")

    # ------------------------------------------------------------------ QIDO-RS

    async def search(request: Request, level: Level, scope: dict[str, str]) -> Response:
        accept = parse_accept(_accept(request))
        if not wants_json(accept):
            raise NotAcceptable(f"search results are available as {DICOM_JSON}")
        parsed = qido.parse_qido(level, request.query_params.multi_items(), scope=scope,
                                 default_matching=default_matching)
        own_study = study_scope(request)
        others_only = False
        if own_study is not None:  # a share link searches its own study, nothing else
            asked = parsed.query.keys.get("StudyInstanceUID", "").replace(",", "\\")
            others_only = bool(asked.strip()) and own_study not in {
                uid.strip() for uid in asked.split("\\")}
            parsed.query = dataclasses.replace(
                parsed.query, keys={**parsed.query.keys, "StudyInstanceUID": own_study})
        rows = [] if others_only else await run_in_threadpool(find, archive.index, parsed.query)
        limit = (parsed.query.limit or 1) - 1
        if len(rows) > limit:
            rows = rows[:limit]
            parsed.warnings.append("there are more results than were returned; "
                                   "use offset to page through them")
        base = base_url(request)
        answers = [qido.answer_json(row, parsed, _retrieve_url(base, level, row))
                   for row in rows]
        if withheld := qido.withheld_bulk_data(rows):
            parsed.warnings.append(f"{', '.join(withheld)}: bulk data is not returned by "
                                   "searches; it is in the instances' metadata")
        if own_study is not None:  # the patient's other studies are not the link's to tell
            for answer in answers:
                for tag in _PATIENT_RECORD_COUNTS:
                    answer.pop(tag, None)
        headers = {"Warning": ", ".join(f'299 pacs "{w}"' for w in parsed.warnings)} \
            if parsed.warnings else {}
        if not answers and not parsed.warnings:
            return Response(status_code=204)
        return json_response(request, answers, headers=headers)

    async def search_studies(request: Request) -> Response:
        return await search(request, Level.STUDY, {})

    async def search_series(request: Request) -> Response:
        return await search(request, Level.SERIES, _path_uids(request))

    async def search_instances(request: Request) -> Response:
        return await search(request, Level.INSTANCE, _path_uids(request))

    # ------------------------------------------------------------------ WADO-RS

    async def retrieve(request: Request) -> Response:
        target = _target(request)
        rows = await run_in_threadpool(wado.instance_rows, archive, target)
        media = wado.choose_instance_media(parse_accept(_accept(request)), target.level, rows)
        syntax = media.syntax
        # An instance alone is refused (406) when it cannot be converted, before any byte;
        # in a study or series, one that cannot be decoded goes as stored, labelled so.
        parts = wado.instance_parts(archive, rows, syntax, fall_back=not target.instance)
        if media.single_part:
            return _single_part(await run_in_threadpool(next, parts))
        label = None if syntax == "*" else wado.common_syntax(rows, syntax)
        if all(wado.part_syntax(row, syntax) == row["_transfer_syntax_uid"] for row in rows):
            parts = list(parts)  # lazily opened as stored: the length is known up front
        elif target.instance:
            parts = iter([await run_in_threadpool(next, parts)])
        else:
            label = None  # a part may go as stored after all
        # The syntax all parts share, if they do (an SR asked for in RLE goes uncompressed).
        return _multipart(parts, "application/dicom", label)

    async def metadata(request: Request) -> Response:
        accept = parse_accept(_accept(request))
        if not wants_json(accept):
            raise NotAcceptable(f"metadata is available as {DICOM_JSON}")
        target = _target(request)
        rows = await run_in_threadpool(wado.instance_rows, archive, target, with_header=True)
        # Built even for a 304: whether it would be gzipped (its length) picks the ETag.
        body = wado.metadata_json(rows, base_url(request))
        return json_bytes_response(request, body, etag=wado.metadata_etag(rows),
                                   headers={"Cache-Control": "private, no-cache"})

    async def frames(request: Request) -> Response:
        target = _target(request)
        try:
            numbers = wado.parse_frame_list(request.path_params["frames"])
        except ValueError as exc:
            raise HTTPException(400, f"frames: {exc}") from None
        rows = await run_in_threadpool(wado.instance_rows, archive, target)
        row = rows[0]
        media, syntax = wado.choose_frame_syntax(parse_accept(_accept(request)),
                                                 row["_transfer_syntax_uid"])
        frames = wado.frame_bytes(archive, row, numbers, syntax)
        first = await run_in_threadpool(next, frames)  # 404, 406 before any byte
        part_type = f"{media}; transfer-syntax={syntax}"
        parts = (Part(part_type, [frame], {"Content-Length": str(len(frame))})
                 for frame in itertools.chain([first], frames))  # one frame held at a time
        return _multipart(parts, media, syntax)

    async def bulkdata(request: Request) -> Response:
        rows = await run_in_threadpool(wado.instance_rows, archive, _target(request),
                                       with_header=True)
        row, spec = rows[0], request.path_params["spec"]
        accept = parse_accept(_accept(request))
        multipart = any(_multipart_entry(a) for a in accept) and not any(
            a.matches("application/octet-stream") for a in accept)
        # PS3.18 10.4.3.3.5: a part names the URI the metadata gave for the value.
        location = f"{wado.instance_url(base_url(request), row)}/bulkdata/{spec}"
        span = None if row["_transfer_syntax_uid"] == EXPLICIT_BIG_ENDIAN else \
            await run_in_threadpool(wado.bulk_span, archive, row, spec)
        if span is not None and span[1] > STREAMED_BULK:  # pixel data of a long cine, say
            return _streamed_bulk(request, row["_blob_key"], span, multipart, location)
        # PS3.18 8.7.3.3: uncompressed bulk data is sent in Little Endian byte order.
        data = await run_in_threadpool(wado.little_endian_bulk_bytes, archive, row, spec)
        if multipart:
            part = Part("application/octet-stream", [data],
                        {"Content-Location": location, "Content-Length": str(len(data))})
            return _multipart([part], "application/octet-stream", None)
        return ranged_response(request, data)

    def _streamed_bulk(request: Request, key: str, span: tuple[int, int], multipart: bool,
                       location: str) -> Response:
        """A bulk value read from the blob as it is sent (little endian as stored)."""
        offset, length = span
        if multipart:
            part = Part("application/octet-stream",
                        wado.blob_chunks(archive, key, offset, length),
                        {"Content-Location": location, "Content-Length": str(length)})
            return _multipart([part], "application/octet-stream", None)
        answer = range_answer(request, length)
        if isinstance(answer, Response):
            return answer
        status, headers, (start, stop) = answer
        headers["Content-Length"] = str(stop - start)
        return _ClosingStream(wado.blob_chunks(archive, key, offset + start, stop - start),
                              status_code=status, media_type="application/octet-stream",
                              headers=headers)

    # ------------------------------------------------------------------ rendered

    cache = render.RenderCache()

    async def rendered(request: Request) -> Response:
        return await _render(request, thumbnail=False)

    async def thumbnail(request: Request) -> Response:
        return await _render(request, thumbnail=True)

    async def _render(request: Request, *, thumbnail: bool) -> Response:
        media_type, multipart = _rendered_type(request)
        try:
            options = render.parse_options(request.query_params, media_type,
                                           thumbnail=thumbnail)
            numbers = wado.parse_frame_list(request.path_params["frames"]) \
                if "frames" in request.path_params else None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        target = _target(request)
        if target.instance is None and not multipart:  # the representative image only
            key, frame = await run_in_threadpool(wado.representative, archive, target)
            chosen = [(key, frame)]
        else:
            rows = await run_in_threadpool(wado.instance_rows, archive, target)
            if numbers is not None:
                wado.check_frames_exist(rows[0], numbers)
                chosen = [(rows[0]["_blob_key"], n - 1) for n in numbers]
            elif not target.instance:
                chosen = [(row["_blob_key"], 0) for row in wado.image_rows(rows)]
            else:
                frames = int(rows[0].get("NumberOfFrames") or 1)
                chosen = [(rows[0]["_blob_key"], frames // 2 if thumbnail else 0)]
        images = [await run_in_threadpool(_rendered_image, key, frame, options)
                  for key, frame in chosen]
        headers = {"Cache-Control": "private, max-age=3600"}
        if multipart or len(images) > 1:
            return _multipart(iter(Part(media_type, [image]) for image in images),
                              media_type, None)
        return Response(images[0], media_type=media_type, headers=headers)

    def _rendered_image(blob_key: str, frame: int, options: render.RenderOptions) -> bytes:
        cache_key = (blob_key, frame, options)
        image = cache.get(cache_key)
        if image is None:
            with slots.DECODE_SLOTS:  # before reading: the slots bound what is held whole
                image = render.render_frame(wado.read_blob(archive, blob_key), frame, options)
            cache.put(cache_key, image)
        return image

    # ------------------------------------------------------------------ WADO-URI

    async def wado_uri(request: Request) -> Response:
        """PS3.18 9: ``/wado?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=``."""
        params = request.query_params
        if params.get("requestType") != "WADO":
            raise HTTPException(400, "requestType: must be WADO")
        missing = [n for n in ("studyUID", "seriesUID", "objectUID") if not params.get(n)]
        if missing:
            raise HTTPException(400, f"{missing[0]}: required")
        target = wado.Target(params["studyUID"], params["seriesUID"], params["objectUID"])
        rows = await run_in_threadpool(wado.instance_rows, archive, target)
        row = rows[0]
        media_type = _wado_uri_media(params.get("contentType"), image=bool(row.get("Rows")))
        if media_type == "application/dicom":
            # Without transferSyntax: Explicit VR Little Endian (PS3.18 9.4.2.4), except pixel
            # data the server has only lossy compressed, as WADO-RS decides (wado.part_syntax).
            # A value that is not a UID is a bad parameter (400); a UID this server cannot
            # produce is not acceptable (406), both as 9.4.2.4 says. "*" (WADO-RS's "as
            # stored", which some clients send here too) is taken.
            syntax = params.get("transferSyntax") or None
            if syntax not in (None, "*"):
                require_uid(syntax, "transferSyntax")
            wado.check_transcodable(rows, syntax)
            part = await run_in_threadpool(next, wado.instance_parts(archive, rows, syntax))
            return _single_part(part, media_type="application/dicom")
        number = whole_number(params.get("frameNumber", "1"))
        if not number:
            raise HTTPException(400, f"frameNumber: {params['frameNumber']!r} is not a frame "
                                     "number (1, 2...)")
        wado.check_frames_exist(row, [number])
        frame = number - 1
        try:
            options = render.parse_options(_wado_uri_render_params(params), media_type)
        except ValueError as exc:  # named as WADO-URI names it
            name, colon, reason = str(exc).partition(":")
            raise HTTPException(400, _WADO_URI_NAMES.get(name, name) + colon + reason) from None
        image = await run_in_threadpool(_rendered_image, row["_blob_key"], frame, options)
        return Response(image, media_type=media_type)

    # ------------------------------------------------------------------ STOW-RS

    async def store(request: Request) -> Response:
        media, params = parse_content_type(request.headers.get("content-type", ""))
        if media != "multipart/related" or params.get("type", "application/dicom").lower() \
                != "application/dicom":
            raise UnsupportedMediaType(
                'STOW-RS accepts multipart/related; type="application/dicom" bodies')
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.stow_max_bytes:
            raise BodyTooLarge(settings.stow_max_bytes)
        study_uid = request.path_params.get("study")
        if study_uid is not None:
            require_uid(study_uid, "study UID")
        base = base_url(request)
        outcome = stow.StowOutcome()
        window = stow.StoreWindow(outcome)
        broken: MultipartError | BodyTooLarge | BodyTimeout | None = None
        try:
            async for part in read_parts(request.stream(), params.get("boundary", ""),
                                         max_bytes=settings.stow_max_bytes):
                part_media, _ = parse_content_type(part.content_type or "application/dicom")
                if part_media != "application/dicom":
                    window.add_result(stow.failed_part(
                        part.body, stow.CANNOT_UNDERSTAND,
                        f"part of type {part_media!r} is not application/dicom"))
                    continue
                await window.store(part.body, functools.partial(
                    anyio.to_thread.run_sync, functools.partial(
                        stow.store_part, archive, part.body, study_uid=study_uid, base=base),
                    limiter=stow_threads))
        except (MultipartError, BodyTooLarge, BodyTimeout) as exc:
            broken = exc
        finally:
            await window.drain()
            outcome.finish()
        headers = {}
        if broken is not None:
            if not outcome.stored:
                raise broken  # 400, 413 or 408: nothing of the request was kept
            # Some instances are stored: 202 says which (PS3.18 gives 400, 413 and 408 for a
            # request nothing of which was stored), and why the rest of the body was not read.
            outcome.interrupted(stow.OUT_OF_RESOURCES if isinstance(broken, BodyTooLarge)
                                else stow.CANNOT_UNDERSTAND, str(broken))
            text = str(broken).replace('"', "'").encode("ascii", "replace").decode()
            headers = {"Warning": f'299 pacs "{text}"', "Connection": "close"}
        if not outcome.stored and not outcome.failed:
            raise MultipartError("the request holds no DICOM instance")
        study = study_uid or (next(iter(outcome.study_uids))
                              if len(outcome.study_uids) == 1 else None)
        body = outcome.response_json(f"{base}/studies/{study}" if study else None)
        return json_response(request, body, status_code=outcome.http_status, headers=headers)

    # ------------------------------------------------------------------ DELETE

    async def delete(request: Request) -> Response:
        target = _target(request)
        await run_in_threadpool(wado.instance_rows, archive, target)  # checks the hierarchy
        uid = target.instance or target.series or target.study
        count = await run_in_threadpool(archive.delete, target.level, uid)
        log.info("DICOMweb: deleted %s (%d instance(s))", target.describe(), count)
        return Response(status_code=204)

    # ------------------------------------------------------------------ routes

    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    routes = [
        Route("/studies", search_studies, methods=["GET"]),
        Route("/studies", store, methods=["POST"]),
        Route("/series", search_series, methods=["GET"]),
        Route("/instances", search_instances, methods=["GET"]),
        Route(study, retrieve, methods=["GET"]),
        Route(study, store, methods=["POST"]),
        Route(study, delete, methods=["DELETE"]),
        Route(study + "/metadata", metadata, methods=["GET"]),
        Route(study + "/series", search_series, methods=["GET"]),
        Route(study + "/instances", search_instances, methods=["GET"]),
        Route(series, retrieve, methods=["GET"]),
        Route(series, delete, methods=["DELETE"]),
        Route(series + "/metadata", metadata, methods=["GET"]),
        Route(series + "/instances", search_instances, methods=["GET"]),
        Route(instance, retrieve, methods=["GET"]),
        Route(instance, delete, methods=["DELETE"]),
        Route(instance + "/metadata", metadata, methods=["GET"]),
        Route(instance + "/frames/{frames}", frames, methods=["GET"]),
        Route(instance + "/bulkdata/{spec:path}", bulkdata, methods=["GET"]),
        Route(study + "/rendered", rendered, methods=["GET"]),
        Route(series + "/rendered", rendered, methods=["GET"]),
        Route(instance + "/rendered", rendered, methods=["GET"]),
        Route(instance + "/frames/{frames}/rendered", rendered, methods=["GET"]),
        Route(study + "/thumbnail", thumbnail, methods=["GET"]),
        Route(series + "/thumbnail", thumbnail, methods=["GET"]),
        Route(instance + "/thumbnail", thumbnail, methods=["GET"]),
        Route(instance + "/frames/{frames}/thumbnail", thumbnail, methods=["GET"]),
    ]
    handlers = error_handlers()  # and anything else: ContainErrors

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    routes += [Route("/wado", wado_uri, methods=["GET"]),
               Route("/openapi.json", openapi, methods=["GET"])]
    app = Starlette(routes=merged_by_path(routes), middleware=[Middleware(ContainErrors)],
                    exception_handlers=handlers)
    app.state.wado_uri = wado_uri  # also served at /wado, where WADO-URI clients look
    return app


# ---------------------------------------------------------------------------- helpers


def _path_uids(request: Request) -> dict[str, str]:
    names = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}
    return {names[k]: require_uid(v, f"{k} UID") for k, v in request.path_params.items()
            if k in names}


def _target(request: Request) -> wado.Target:
    params = request.path_params
    return wado.Target(params["study"], params.get("series"), params.get("instance"))


def _wado_uri_media(content_type: str | None, *, image: bool) -> str:
    """The media type a WADO-URI request gets: the first of ``contentType`` (media types or
    ranges, best first by q-value, as in an Accept header) this server makes for the
    object; without it, JPEG for an image and the DICOM file for any other object."""
    offered = ["image/jpeg", "image/png", "application/dicom"] if image \
        else ["application/dicom"]
    if not (content_type or "").strip():
        return offered[0]
    for entry in parse_accept(content_type):
        if media_type := next((m for m in offered if entry.matches(m)), None):
            return media_type
    raise NotAcceptable(f"contentType: {content_type!r}; available for this "
                        f"{'image' if image else 'object'}: {', '.join(offered)}")


# WADO-RS rendering parameters by their WADO-URI names, for refusals.
_WADO_URI_NAMES = {"quality": "imageQuality", "window": "windowCenter,windowWidth",
                   "viewport": "rows,columns"}


def _wado_uri_render_params(params) -> dict[str, str]:
    """WADO-URI's rendering parameters in the form of WADO-RS's."""
    out: dict[str, str] = {}
    if "imageQuality" in params:
        out["quality"] = params["imageQuality"]
    if ("windowCenter" in params) != ("windowWidth" in params):
        raise HTTPException(400, "windowCenter, windowWidth: the two go together")
    if "windowCenter" in params:
        out["window"] = f"{params['windowCenter']},{params['windowWidth']}"
    if "rows" in params or "columns" in params:
        out["viewport"] = f"{params.get('columns', params.get('rows'))}," \
                          f"{params.get('rows', params.get('columns'))}"
    return out


def _accept(request: Request) -> str | None:
    """What the request accepts: the ``accept`` query parameter, which wins over the header
    (PS3.18 8.3.3.1: a link or an ``<img>`` cannot set headers), else the Accept header."""
    return request.query_params.get("accept") or request.headers.get("accept")


def _rendered_type(request: Request) -> tuple[str, bool]:
    """(image media type, whether a multipart answer was asked for) for /rendered requests.

    The ``accept`` query parameter (PS3.18 8.3.3.1) wins over the header, so a plain
    ``<img src=...>`` can choose PNG; a browser's ``image/avif,image/webp,*/*`` gets JPEG.
    """
    for entry in parse_accept(_accept(request)):
        multipart = _multipart_entry(entry)
        inner = entry.part_type if multipart else entry.media_type
        for media_type in render.RENDERED_TYPES:
            if inner == media_type:
                return media_type, multipart
        if inner is None or range_matches(inner, "image/jpeg"):
            return "image/jpeg", multipart and inner is not None
    raise NotAcceptable("rendered images are available as image/jpeg or image/png")


def _multipart_entry(entry: Accepted) -> bool:
    """Whether an Accept entry asks for multipart/related, by name or as ``multipart/*``."""
    return entry.is_multipart


def _retrieve_url(base: str, level: Level, row: dict[str, Any]) -> str:
    url = f"{base}/studies/{row['StudyInstanceUID']}"
    if level.value >= Level.SERIES.value:
        url += f"/series/{row['SeriesInstanceUID']}"
    if level is Level.INSTANCE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def _multipart(parts: Iterator[Part] | list[Part], media_type: str,
               syntax: str | None) -> Response:
    """A streamed multipart/related response; with a Content-Length when the parts give one
    (instances as stored), which spares chunked transfer encoding."""
    boundary = new_boundary()
    headers = {}
    if isinstance(parts, list) and (length := body_length(parts, boundary)) is not None:
        headers["Content-Length"] = str(length)
    return _ClosingStream(coalesce(write_parts(parts, boundary)),
                          media_type=content_type(media_type, boundary, transfer_syntax=syntax),
                          headers=headers)


def _single_part(part: Part, media_type: str | None = None) -> Response:
    """One part as the whole body (a single part media type), streamed, with its length."""
    return _ClosingStream(coalesce(part.chunks), media_type=media_type or part.content_type,
                          headers={"Content-Length": part.headers["Content-Length"]})


class _ClosingStream(StreamingResponse):
    """A body of chunks made in the thread pool, closed however the answer ends. When the
    client goes away mid-answer, the stopped response's traceback keeps the chunks in a
    reference cycle until a garbage collection: closed here, what they hold (a conversion's
    slot and bytes, an open blob) goes at once."""

    def __init__(self, chunks: Iterator[bytes], **options: Any) -> None:
        super().__init__(iterate_in_threadpool(chunks), **options)
        self._chunks = chunks

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Not running: a chunk being made in a thread is waited for before cancelling.
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
