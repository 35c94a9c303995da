"""The patient's digital film: ``/s/{token}``, the page a share link or QR code opens.

Mobile first and without a build step: one HTML page (``viewer/static/patient.js`` and
``patient.css``) showing server-rendered JPEGs from ``/dicomweb/…/rendered``, so a phone on
a slow connection gets the first image after one small page and one image. When the share
has no PIN, the page arrives with the study and a share session already in it and the first
image's URL in an ``<img>``; with a PIN, the page asks for it and ``POST
/api/s/{token}/session`` answers with the same data.

Everything here reads the index only. Access rules are not decided here but in
``pacs.access``; this module turns a token (and PIN) into a share session.

A share counts as *opened* (``Share.opened_count``, the "open" entries of its access log)
when a session is granted: on the page of a share without a PIN, after the PIN with one. A
HEAD (a chat app's link preview) or a page still asking for the PIN opens nothing, and a
reload keeps its session: the page's session comes back in a cookie limited to the page's
path, and the script keeps a PIN session in ``sessionStorage``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from pacs.access import principal_of
from storage.attributes import Level
from storage.names import display_date, display_person_name
from storage.query import Query, find
from storage.shares import PinOutcome, Share, ShareState, is_well_formed
from viewer.share_api import BadRequest, json_body

log = logging.getLogger("pacs.viewer")

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
# Window presets (center, width) for CT, applied by the server through /rendered.
CT_PRESETS = [
    ("Mặc định", None),
    ("Mô mềm", (40, 400)),
    ("Phổi", (-600, 1500)),
    ("Xương", (400, 1800)),
    ("Não", (40, 80)),
]
_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                 "X-Robots-Tag": "noindex, nofollow", "X-Content-Type-Options": "nosniff"}
# The page's session, sent back on a reload of that page only (Path=/s/TOKEN).
SESSION_COOKIE = "pacs_share_session"


def patient_routes(server) -> list[Route]:
    """``/s/{token}`` and its session API, for ``pacs.http``."""
    shares = server.shares
    policy = server.access
    settings = server.settings

    async def page(request: Request) -> Response:
        token = request.path_params["token"]
        share = await run_in_threadpool(shares.by_token, token)
        refused = _refusal(share)
        if refused:
            return refused
        if request.method == "HEAD" or share.has_pin:
            # A link preview, or a page that asks for the PIN first: nothing opened yet.
            return HTMLResponse(_page_html(settings.site_name, token, None),
                                headers=_PAGE_HEADERS)
        reused = policy.reusable_session(request.cookies.get(SESSION_COOKIE, ""), share)
        initial = await _session(share, principal_of(request).address, reused)
        if initial is None:
            return _error_page(404, "Ca chụp không còn trong hệ thống",
                               "Ca chụp của liên kết này không còn được lưu. Vui lòng "
                               "liên hệ bệnh viện.")
        response = HTMLResponse(_page_html(settings.site_name, token, initial),
                                headers=_PAGE_HEADERS)
        if reused is None:
            _keep_session(response, request, token, initial)
        return response

    async def page_with_slash(request: Request) -> Response:
        """``/s/TOKEN/`` (a slash added by hand or by a messaging app): the page."""
        token = request.path_params["token"]
        if not is_well_formed(token):
            return _refusal(None)
        return RedirectResponse(f"/s/{token}", status_code=308, headers=_PAGE_HEADERS)

    async def open_session(request: Request) -> Response:
        token = request.path_params["token"]
        share = await run_in_threadpool(shares.by_token, token)
        refused = _refusal(share, as_json=True)
        if refused:
            return refused
        try:
            body = await json_body(request, empty={})
        except BadRequest as exc:
            return _json_error(exc.status, str(exc))
        pin = body.get("pin") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(pin, str | None):
            return _json_error(400, 'pin: must be a string, in a JSON object {"pin": "1234"}')
        address = principal_of(request).address
        checked = await run_in_threadpool(shares.check_pin, share, pin)
        if checked.outcome is not PinOutcome.OK:
            if checked.outcome in (PinOutcome.WRONG, PinOutcome.LOCKED):
                action = "pin-wrong" if checked.outcome is PinOutcome.WRONG else "pin-locked"
                await run_in_threadpool(shares.record, share.id, action, address=address)
                policy.forget(share.id)
            return _pin_refusal(checked)
        session = await _session(share, address)
        if session is None:
            return _json_error(404, "Ca chụp không còn trong hệ thống / the study is no "
                                    "longer archived")
        return JSONResponse(session, headers=_PAGE_HEADERS)

    async def _session(share: Share, address: str,
                       reused: tuple[str, dt.datetime] | None = None) -> dict[str, Any] | None:
        """The page's data with a session: ``reused``, else a new one, which counts as an
        opening of the share."""
        study = await run_in_threadpool(study_summary, server.archive.index,
                                        share.study_instance_uid)
        if study is None:
            return None
        if reused is not None:
            grant, until = reused
        else:
            grant, until = policy.open_session(share)
            await run_in_threadpool(shares.record, share.id, "open", address=address,
                                    session=grant.split(".")[1])
        study["site_name"] = settings.site_name
        return {
            "access_token": grant,
            "session_expires_at": until.isoformat(timespec="seconds"),
            "share_expires_at": share.expires_at.isoformat(timespec="seconds"),
            "allow_download": share.allow_download,
            "viewer_url": "/ohif/viewer?StudyInstanceUIDs="
                          f"{quote(share.study_instance_uid)}&token={quote(grant)}",
            "study": study,
        }

    return [
        Route("/s/{token}", page, methods=["GET"]),
        Route("/s/{token}/", page_with_slash, methods=["GET"]),
        Route("/api/s/{token}/session", open_session, methods=["POST"]),
    ]


def _keep_session(response: Response, request: Request, token: str,
                  session: dict[str, Any]) -> None:
    """Send the page's session back as a cookie of that page alone, so a reload reuses it."""
    until = dt.datetime.fromisoformat(session["session_expires_at"])
    seconds = int((until - dt.datetime.now(dt.UTC)).total_seconds())
    response.set_cookie(SESSION_COOKIE, session["access_token"], max_age=max(seconds, 0),
                        path=f"/s/{token}", secure=request.url.scheme == "https",
                        httponly=True, samesite="lax")


# ---------------------------------------------------------------------------- the study


def study_summary(index, study_uid: str) -> dict[str, Any] | None:
    """What the patient page shows, from the index: who, what, and each series' images in
    display order, key images (from Key Object Selection documents) first."""
    rows = find(index, Query(Level.INSTANCE, {"StudyInstanceUID": study_uid}))
    if not rows:
        return None
    first = rows[0]
    by_series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("Rows"):
            by_series.setdefault(row["SeriesInstanceUID"], []).append(row)
    series = []
    for uid, members in sorted(by_series.items(), key=lambda kv: _number(
            kv[1][0].get("SeriesNumber"))):
        members.sort(key=lambda r: (_number(r.get("InstanceNumber")), r["_instances_pk"]))
        modality = members[0].get("Modality") or ""
        series.append({
            "uid": uid,
            "number": members[0].get("SeriesNumber"),
            "modality": modality,
            "description": members[0].get("SeriesDescription") or "",
            "images": [[r["SOPInstanceUID"], int(r.get("NumberOfFrames") or 1)]
                       for r in members],
            "presets": [[name, window] for name, window in CT_PRESETS]
            if modality == "CT" else [[CT_PRESETS[0][0], None]],
        })
    return {
        "study_instance_uid": study_uid,
        "patient_name": display_person_name(first.get("PatientName")),
        "patient_birth_date": display_date(first.get("PatientBirthDate")),
        "patient_sex": {"M": "Nam", "F": "Nữ"}.get(first.get("PatientSex") or "", ""),
        "study_date": display_date(first.get("StudyDate")),
        "study_description": first.get("StudyDescription") or "",
        "accession_number": first.get("AccessionNumber") or "",
        "modalities": sorted({s["modality"] for s in series if s["modality"]}),
        "key_images": _key_images(index, study_uid, by_series),
        "series": series,
    }


def _key_images(index, study_uid: str, by_series: dict[str, list[dict[str, Any]]]
                ) -> list[list[Any]]:
    """[series UID, SOP Instance UID, frame] of each key image (none without a KOS)."""
    from viewer.keyimages import key_images

    present = {r["SOPInstanceUID"] for members in by_series.values() for r in members}
    return [[k.series_instance_uid, k.sop_instance_uid, k.frame or 1]
            for k in key_images(index, study_uid) if k.sop_instance_uid in present]


def _number(value: Any) -> tuple[int, int]:
    try:
        return (0, int(value))
    except (TypeError, ValueError):
        return (1, 0)


# ---------------------------------------------------------------------------- refusals


def _refusal(share: Share | None, *, as_json: bool = False) -> Response | None:
    """The answer for a token that opens nothing, or None when the share is usable."""
    if share is None:
        status, title, text = 404, "Liên kết không tồn tại", (
            "Liên kết hoặc mã QR không đúng. Vui lòng kiểm tra lại, hoặc liên hệ bệnh viện.")
    else:
        state = share.state()
        if state is ShareState.ACTIVE:
            return None
        if state is ShareState.EXPIRED:
            status, title, text = 410, "Liên kết đã hết hạn", (
                f"Liên kết này đã hết hạn ngày {_day(share.expires_at)}. Vui lòng liên hệ bệnh "
                "viện để được cấp liên kết mới.")
        elif state is ShareState.REVOKED:
            status, title, text = 410, "Liên kết đã bị thu hồi", (
                "Bệnh viện đã thu hồi liên kết này. Vui lòng liên hệ bệnh viện nếu bạn vẫn cần "
                "xem ảnh.")
        else:
            status, title, text = 423, "Liên kết đã bị khoá", (
                "Mã PIN đã bị nhập sai quá nhiều lần nên liên kết bị khoá. Vui lòng liên hệ "
                "bệnh viện để mở khoá.")
    if as_json:
        return _json_error(status, f"{title}. {text}")
    return _error_page(status, title, text)


def _pin_refusal(checked) -> Response:
    if checked.outcome is PinOutcome.MALFORMED:  # (not counted as a miss)
        return _json_error(400, "Mã PIN gồm 4 đến 8 chữ số 0-9 / the PIN is 4 to 8 digits "
                                "0-9", pin_required=True, attempts_left=checked.attempts_left)
    if checked.outcome is PinOutcome.NEEDED:
        return _json_error(401, "Vui lòng nhập mã PIN / a PIN is needed", pin_required=True,
                           attempts_left=checked.attempts_left)
    if checked.outcome is PinOutcome.WAIT:
        return _json_error(429, f"Vui lòng thử lại sau {checked.retry_after} giây / try again "
                                f"in {checked.retry_after} s", pin_required=True,
                           retry_after=checked.retry_after,
                           attempts_left=checked.attempts_left,
                           headers={"Retry-After": str(checked.retry_after)})
    if checked.outcome is PinOutcome.LOCKED:
        return _json_error(423, "Mã PIN sai quá nhiều lần; liên kết đã bị khoá. Vui lòng liên "
                                "hệ bệnh viện / too many wrong PINs: the link is locked")
    return _json_error(403, f"Mã PIN không đúng; còn {checked.attempts_left} lần thử / wrong "
                            "PIN", pin_required=True, attempts_left=checked.attempts_left,
                       retry_after=checked.retry_after)


def _json_error(status: int, message: str, headers: dict[str, str] | None = None,
                **extra: Any) -> JSONResponse:
    return JSONResponse({"status": status, "message": message, **extra}, status_code=status,
                        headers={**_PAGE_HEADERS, **(headers or {})})


def _day(moment: dt.datetime) -> str:
    return moment.astimezone().strftime("%d/%m/%Y")


# ---------------------------------------------------------------------------- HTML


def _error_page(status: int, title: str, text: str) -> HTMLResponse:
    body = (f'<main class="message"><h1>{html.escape(title)}</h1>'
            f"<p>{html.escape(text)}</p></main>")
    return HTMLResponse(_shell(title, body), status_code=status, headers=_PAGE_HEADERS)


def _page_html(site_name: str, token: str, initial: dict[str, Any] | None) -> str:
    first_image = ""
    if initial is not None:
        # The first image's URL right in the HTML: the browser fetches it while the script
        # is still on its way.
        url = first_image_url(initial)
        if url:
            first_image = f'<link rel="preload" as="image" href="{html.escape(url)}">'
    data = json.dumps({"token": token, "site_name": site_name, "session": initial},
                      ensure_ascii=False).replace("</", "<\\/")
    body = (f'<div id="app" data-site="{html.escape(site_name)}">'
            '<p class="loading">Đang tải ảnh…</p></div>'
            f'<script id="share-data" type="application/json">{data}</script>'
            '<script src="/static/patient.js" defer></script>')
    return _shell(f"Ảnh chụp – {site_name}", body, head=first_image)


def first_image_url(session: dict[str, Any], size: int = 512) -> str | None:
    """The URL of the image the page shows first (a key image, else the middle of the first
    series), the same one ``patient.js`` asks for."""
    study = session["study"]
    if study["key_images"]:
        series_uid, sop, frame = study["key_images"][0]
    elif study["series"]:
        series = study["series"][0]
        series_uid = series["uid"]
        sop, frame = series["images"][len(series["images"]) // 2][0], 1
    else:
        return None
    return (f"/dicomweb/studies/{study['study_instance_uid']}/series/{series_uid}/instances/"
            f"{sop}/frames/{frame}/rendered?viewport={size},{size}&quality=85"
            f"&access_token={quote(session['access_token'])}")


def _shell(title: str, body: str, head: str = "") -> str:
    return ('<!doctype html><html lang="vi"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1,'
            'viewport-fit=cover"><meta name="robots" content="noindex">'
            f"<title>{html.escape(title)}</title>"
            '<link rel="stylesheet" href="/static/patient.css">'
            f"{head}</head><body>{body}</body></html>")


__all__ = ["CT_PRESETS", "first_image_url", "patient_routes", "study_summary"]
