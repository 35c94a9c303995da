"""Staff side of share links: ``/api/shares`` (create, list, show, revoke, unlock), the QR
code of a share and the printable result slip handed to the patient.

Only staff reach these routes (``pacs.access`` decides). The token of a share is shown in
the answer that creates it; the QR code and the slip derive it again from the server secret
(``storage.shares``), so a slip can be reprinted.
"""

from __future__ import annotations

import html
import io
from typing import Any

import segno
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from pacs.access import principal_of
from pacs.http_input import BodyTooLarge, parse_json, read_body, whole_number
from storage.attributes import Level
from storage.errors import NotFound
from storage.names import display_date, display_person_name
from storage.parsing import is_valid_uid
from storage.query import NameMatching, Query, find
from storage.shares import MAX_ID, Share, ShareError, ShareStore

# Modalities of objects that are not pictures: reports, key object selections, presentation
# states, documents (the stored films among them), registrations, segmentations, RT plans.
NOT_IMAGING = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "FID", "RTSTRUCT", "RTPLAN",
                         "RTRECORD", "PLAN", "AU"})


def imaging_modalities(modalities_in_study: str | None) -> list[str]:
    """The modalities of a study's pictures, from its Modalities in Study (``CT\\SR\\KO``)."""
    return [m for m in (modalities_in_study or "").split("\\") if m and m not in NOT_IMAGING]


def share_url(base: str, token: str) -> str:
    """The link printed on the slip and in the QR code."""
    return f"{base.rstrip('/')}/s/{token}"


def public_base(settings, request: Request | None = None) -> str:
    """Where patients reach this server: ``public_url``, else the request's own address."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    if request is not None:
        return str(request.base_url).rstrip("/")
    return f"http://{settings.http_host}:{settings.http_port}"


def create_share(store: ShareStore, settings, study_uid: str, *, days: float | None = None,
                 pin: str | None = None, allow_download: bool = False, created_by: str = "",
                 base: str) -> dict[str, Any]:
    """Create a share and describe it with its link (the only time the token is returned)."""
    share, token = store.create(study_uid, days=settings.share_days if days is None else days,
                                pin=pin,
                                allow_download=allow_download, created_by=created_by)
    return {**share.summary(), "token": token, "url": share_url(base, token),
            "pin_value": store.pin_of(share),
            "qr_png": f"/api/shares/{share.id}/qr.png", "qr_svg": f"/api/shares/{share.id}/qr.svg",
            "slip": f"/api/shares/{share.id}/slip"}


def share_api_routes(server) -> list[Route]:
    store: ShareStore = server.shares
    settings = server.settings

    async def create(request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":  # (a form or text/plain body is what CSRF sends)
            return _error(415, "the body must be application/json")
        try:
            body = await json_body(request)
            fields = share_fields(body)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        created_by = fields.get("created_by") or f"api {principal_of(request).address}"
        try:
            answer = await run_in_threadpool(
                create_share, store, settings, fields["study_instance_uid"],
                days=fields.get("days"), pin=fields.get("pin"),
                allow_download=fields.get("allow_download", False), created_by=created_by,
                base=public_base(settings, request))
        except ShareError as exc:
            return _error(400, str(exc))
        except NotFound as exc:
            return _error(404, str(exc))
        return JSONResponse(answer, status_code=201,
                            headers={"Location": f"/api/shares/{answer['id']}",
                                     "Cache-Control": "no-store"})

    async def listing(request: Request) -> Response:
        params = request.query_params
        try:
            limit = _whole_number(params, "limit", default=100, low=1, high=1000, clamp=True)
            offset = _whole_number(params, "offset", default=0, low=0, high=MAX_ID)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        found = await run_in_threadpool(store.list, study_uid=params.get("study"),
                                        limit=limit, offset=offset)
        return JSONResponse([share.summary() for share in found])

    async def show(request: Request) -> Response:
        share = await _share(request)
        accesses = await run_in_threadpool(store.accesses, share.id)
        return JSONResponse({**share.summary(), "accesses": accesses})

    async def revoke(request: Request) -> Response:
        share = await _share(request)
        share = await run_in_threadpool(store.revoke, share.id)
        server.access.forget(share.id)
        return JSONResponse(share.summary())

    async def unlock(request: Request) -> Response:
        share = await _share(request)
        share = await run_in_threadpool(store.unlock, share.id)
        server.access.forget(share.id)
        return JSONResponse(share.summary())

    async def qr_png(request: Request) -> Response:
        return await _qr(request, "png", "image/png")

    async def qr_svg(request: Request) -> Response:
        return await _qr(request, "svg", "image/svg+xml")

    async def _qr(request: Request, kind: str, media_type: str) -> Response:
        share = await _share(request)
        url = share_url(public_base(settings, request), _token(store, share))
        try:
            scale = _whole_number(request.query_params, "scale", default=8, low=1, high=40,
                                  clamp=True)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        out = io.BytesIO()
        code = segno.make(url, error="m")
        if kind == "png":
            code.save(out, kind="png", scale=scale, border=4)
        else:
            code.save(out, kind="svg", scale=scale, border=4, xmldecl=False)
        return Response(out.getvalue(), media_type=media_type,
                        headers={"Cache-Control": "no-store"})

    async def slip(request: Request) -> Response:
        share = await _share(request)
        url = share_url(public_base(settings, request), _token(store, share))
        study = await run_in_threadpool(_study_row, server.archive.index,
                                        share.study_instance_uid)
        pin = await run_in_threadpool(store.pin_of, share)
        return HTMLResponse(slip_html(settings.site_name, share, url, study, pin),
                            headers={"Cache-Control": "no-store"})

    async def _share(request: Request) -> Share:
        return await run_in_threadpool(store.get, share_id(request.path_params["id"]))

    return [
        Route("/api/shares", create, methods=["POST"]),
        Route("/api/shares", listing, methods=["GET"]),
        Route("/api/shares/{id}", show, methods=["GET"]),
        Route("/api/shares/{id}", revoke, methods=["DELETE"]),
        Route("/api/shares/{id}/revoke", revoke, methods=["POST"]),
        Route("/api/shares/{id}/unlock", unlock, methods=["POST"]),
        Route("/api/shares/{id}/qr.png", qr_png, methods=["GET"]),
        Route("/api/shares/{id}/qr.svg", qr_svg, methods=["GET"]),
        Route("/api/shares/{id}/slip", slip, methods=["GET"]),
    ]


# ---------------------------------------------------------------------------- request checks


class BadRequest(ValueError):
    """A request body or parameter that cannot be used; the message names the field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


MAX_BODY_BYTES = 1 << 20  # a share's body is a few hundred bytes
_CREATE_FIELDS = ("study_instance_uid", "days", "pin", "allow_download", "created_by")


async def json_body(request: Request, *, empty: Any = None) -> Any:
    """The request's body as JSON (``empty`` for no body at all).

    ``BadRequest`` (413) past ``MAX_BODY_BYTES``, (400) for a body that is not JSON or nests
    deeper than Python's parser recurses (``[[[[…`` raises RecursionError, not ValueError)."""
    try:
        raw = await read_body(request, MAX_BODY_BYTES)
    except BodyTooLarge:
        raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes", 413) from None
    if not raw.strip():
        if empty is None:
            raise BadRequest("the body is empty: a JSON object is expected")
        return empty
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def share_fields(body: Any) -> dict[str, Any]:
    """The fields of ``POST /api/shares``, each of the type it must have; absent or null ones
    left out. ``BadRequest`` names the first field that is wrong or unknown (a misspelt
    ``"PIN"`` would otherwise make a share without a PIN)."""
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"study_instance_uid": ...}')
    unknown = sorted(set(body) - set(_CREATE_FIELDS))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (known: {', '.join(_CREATE_FIELDS)})")
    fields = {k: v for k, v in body.items() if v is not None}
    if not is_valid_uid(fields.get("study_instance_uid")):
        raise BadRequest("study_instance_uid: required, a UID (digits and dots, at most 64 "
                         "characters)")
    days = fields.get("days", 1)  # (its range is the store's to check)
    if isinstance(days, bool) or not isinstance(days, int | float):  # (true would be 1 day)
        raise BadRequest("days: must be a number")
    if not isinstance(fields.get("pin", ""), str):
        raise BadRequest("pin: must be a string: 4 to 8 digits (0-9), 'generated' or "
                         "'birth-year'")
    # A JSON boolean only: bool("false") is True, and a share would allow downloads.
    if not isinstance(fields.get("allow_download", False), bool):
        raise BadRequest("allow_download: must be true or false (a JSON boolean)")
    created_by = fields.get("created_by", "")
    if not isinstance(created_by, str) or len(created_by) > 200 \
            or not _is_unicode_text(created_by):
        raise BadRequest("created_by: must be a string of at most 200 characters (Unicode "
                         "text: no lone surrogates such as \\ud800)")
    return fields


def _is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be stored: JSON's ``\\ud800`` escapes make strings with lone
    surrogates, which no database encoding takes (a 500 when the share was written)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def share_id(text: str) -> int:
    """The share id in a path; ``NotFound`` unless ASCII digits of an id that can exist
    (``int`` would take "１", and the database overflows past 2^63 - 1)."""
    if text.isascii() and text.isdigit() and len(text) <= 19 and 0 < int(text) <= MAX_ID:
        return int(text)
    raise NotFound(f"no share {text!r}")


def _whole_number(params, name: str, *, default: int, low: int, high: int,
                  clamp: bool = False) -> int:
    """Query parameter ``name`` as a whole number in [low, high] (above ``high`` taken as
    ``high`` with ``clamp``); ``BadRequest`` naming it otherwise."""
    text = params.get(name)
    if text is None:
        return default
    value = whole_number(text)
    if value is None:
        if not (text.isascii() and text.isdigit()):
            raise BadRequest(f"{name}: must be a whole number (digits 0-9), not {text[:40]!r}")
        value = high + 1  # more than 19 digits
    if clamp and value > high:
        return high
    if not low <= value <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}")
    return value


def _token(store: ShareStore, share: Share) -> str:
    try:
        return store.token_of(share)
    except ShareError as exc:
        raise NotFound(str(exc)) from None


def _study_row(index, study_uid: str) -> dict[str, Any]:
    rows = find(index, Query(Level.STUDY, {"StudyInstanceUID": study_uid}, NameMatching.EXACT,
                             limit=1))
    return rows[0] if rows else {}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


def slip_html(site_name: str, share: Share, url: str, study: dict[str, Any],
              pin: str | None) -> str:
    """The result slip: an A5 page with the QR code, link, PIN and study, in Vietnamese."""
    qr = io.BytesIO()
    segno.make(url, error="m").save(qr, kind="svg", scale=5, border=2, xmldecl=False,
                                    svgns=True)
    if not share.has_pin:
        pin_text = "Không cần mã PIN"
    elif pin:
        pin_text = pin
    else:
        pin_text = "đã được cung cấp riêng cho người bệnh"
    rows = [
        ("Họ và tên", display_person_name(study.get("PatientName")) or "—"),
        ("Ngày sinh", display_date(study.get("PatientBirthDate")) or "—"),
        ("Mã người bệnh", study.get("PatientID") or "—"),
        ("Ngày chụp", display_date(study.get("StudyDate")) or "—"),
        ("Loại chụp", ", ".join(imaging_modalities(study.get("ModalitiesInStudy"))) or "—"),
        ("Mô tả", study.get("StudyDescription") or "—"),
        ("Mã chỉ định", study.get("AccessionNumber") or "—"),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    # The moment the link stops working, to the minute, in the server's time zone: "đến hết
    # ngày" (to the end of the day) promised hours the share does not have.
    expires = share.expires_at.astimezone().strftime("%H:%M ngày %d/%m/%Y")
    return f"""<!doctype html><html lang="vi"><head><meta charset="utf-8">
<title>Phiếu xem ảnh – {html.escape(site_name)}</title>
<style>
@page {{ size: A5 portrait; margin: 10mm }}
body {{ font-family: "DejaVu Sans", system-ui, sans-serif; color: #000; max-width: 128mm;
        margin: 0 auto; font-size: 11pt }}
h1 {{ font-size: 14pt; margin: 0 0 1mm; text-align: center; text-transform: uppercase }}
h2 {{ font-size: 13pt; margin: 2mm 0 4mm; text-align: center }}
table {{ width: 100%; border-collapse: collapse; margin-bottom: 4mm }}
th {{ text-align: left; font-weight: normal; color: #333; width: 35%; padding: 1mm 0 }}
td {{ font-weight: bold; padding: 1mm 0 }}
.qr {{ text-align: center }} .qr svg {{ width: 55mm; height: 55mm }}
.url {{ text-align: center; font-family: "DejaVu Sans Mono", monospace; font-size: 9.5pt;
        word-break: break-all; margin: 2mm 0 }}
.pin {{ text-align: center; font-size: 13pt; margin: 3mm 0 }}
.pin b {{ font-size: 16pt; letter-spacing: 1mm }}
.note {{ font-size: 9pt; color: #222 }}
@media screen {{ body {{ margin: 1rem auto; padding: 1rem; border: 1px solid #ccc }} }}
</style></head><body>
<h1>{html.escape(site_name)}</h1>
<h2>PHIẾU XEM ẢNH CHỤP (PHIM SỐ)</h2>
<table>{table}</table>
<div class="qr">{qr.getvalue().decode()}</div>
<p class="url">{html.escape(url)}</p>
<p class="pin">Mã PIN: <b>{html.escape(pin_text)}</b></p>
<p class="note">Quét mã QR bằng camera điện thoại, hoặc nhập đường dẫn trên vào trình duyệt, để
xem ảnh chụp. Có thể đưa mã này cho bác sĩ ở cơ sở y tế khác khi được chuyển tuyến.
Liên kết có hiệu lực đến <b>{expires}</b>. Không chia sẻ phiếu này với người khác.</p>
</body></html>"""


__all__ = ["NOT_IMAGING", "BadRequest", "create_share", "imaging_modalities", "json_body",
           "public_base", "share_api_routes", "share_fields", "share_id", "share_url", "slip_html"]
