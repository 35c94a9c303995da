"""The pages people open: the start page, OHIF at ``/ohif/``, and the launch links the EMR uses.

* ``/`` — a small page of our own (Vietnamese and English): server status and a link to the
  study list.
* ``/ohif/…`` — the installed OHIF build (``viewer.ohif``): hashed bundles cached for a year,
  pre-gzipped text assets, ``application/wasm``, and ``index.html`` for the viewer's own routes.
* ``/IHEInvokeImageDisplay`` (IHE Invoke Image Display), ``/studies/{uid}`` and
  ``/accession/{number}`` — redirect to the viewer for that study, or a clear page when there
  is no such study.
* ``/favicon.ico`` — the icon browsers ask every page for (public), so that each visit to a
  share page does not end in a 404 in the log.
"""

from __future__ import annotations

import html
import mimetypes
import re
from pathlib import Path
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from pacs import __version__
from storage.attributes import Level
from storage.errors import InvalidQuery
from storage.parsing import is_valid_uid
from storage.query import NameMatching, Query, find
from viewer.ohif import BASE, OHIF_VERSION, app_config_js, installed_version

_HASHED = re.compile(r"[.-][0-9a-f]{16,}\.|^[0-9a-f]{16,}\.")
_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript",
          ".css": "text/css", ".json": "application/json", ".svg": "image/svg+xml",
          ".woff2": "font/woff2", ".html": "text/html; charset=utf-8", ".ico": "image/x-icon"}
STATIC_DIR = Path(__file__).parent / "static"  # our own pages' scripts and styles
_NO_CACHE = "no-cache"
_FOREVER = "public, max-age=31536000, immutable"


def viewer_routes(server) -> list[Route]:
    """Routes of the pages, for ``pacs.http`` to mount at the root."""
    settings = server.settings
    ohif_dir = settings.resolved_ohif_dir

    async def start_page(request: Request) -> HTMLResponse:
        installed = installed_version(ohif_dir)
        dicom_up = server.dicom.running
        rows = [
            ("Máy chủ DICOM / DICOM server",
             f"{settings.ae_title} @ cổng {settings.dicom_port}" if dicom_up
             else "đang khởi động / starting"),
            ("DICOMweb", "/dicomweb"),
            ("Trình xem OHIF / OHIF viewer",
             f"{installed}" if installed else "chưa cài / not installed: pacs install-ohif"),
            ("Phiên bản / version", __version__),
        ]
        table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                        for k, v in rows)
        link = (f'<p><a class="button" href="{BASE}">Danh sách ca chụp / Study list</a> '
                '<a class="button" href="/admin">Phim số / Digital film</a></p>'
                if installed else '<p><a class="button" href="/admin">Phim số / Digital film'
                                  '</a></p>')
        return HTMLResponse(_page("PACS", f"<h1>{html.escape(settings.site_name)}</h1>"
                                          f"{link}<table>{table}</table>"))

    async def ohif_config(request: Request) -> Response:
        return Response(app_config_js(site_name=settings.site_name),
                        media_type="text/javascript", headers={"Cache-Control": _NO_CACHE})

    async def ohif_file(request: Request) -> Response:
        if installed_version(ohif_dir) is None:
            return HTMLResponse(_page(
                "OHIF", "<h1>Trình xem chưa được cài đặt / The viewer is not installed</h1>"
                        "<p>Chạy / run: <code>pacs install-ohif</code> "
                        f"(OHIF {OHIF_VERSION}, npm).</p>"), status_code=503)
        relative = request.path_params.get("path", "")
        if "\0" in relative:
            return Response("not found", status_code=404, media_type="text/plain")
        path = (ohif_dir / relative).resolve()
        if ohif_dir not in path.parents or not path.is_file() or path.name.endswith(".gz"):
            if "." in relative.rsplit("/", 1)[-1]:
                return Response("not found", status_code=404, media_type="text/plain")
            path = ohif_dir / "index.html"  # a route of the viewer itself
        return _static(request, path)

    async def favicon(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon",
                            headers={"Cache-Control": "public, max-age=86400"})

    async def invoke_image_display(request: Request) -> Response:
        """IHE Invoke Image Display (ITI/RAD-106): requestType=STUDY or PATIENT."""
        params = request.query_params
        kind = params.get("requestType", "STUDY").upper()
        if kind == "PATIENT":
            patient_id, issuer = _patient_cx(params.get("patientID", ""))
            if not patient_id:
                return _not_found("patientID là bắt buộc / patientID is required", 400)
            if not _names_one(patient_id) or not _names_one(issuer or "-"):
                return _not_found(_NOT_ONE.format(name="patientID"), 400)
            keys = {"PatientID": patient_id}
            if issuer:  # of that issuer, or of none (a modality that sent no issuer)
                keys["IssuerOfPatientID"] = issuer + "\\"
            found = await _find(server, Level.STUDY, keys)
            if not found:
                return _not_found(f"Không có ca chụp nào của bệnh nhân / no study for patient "
                                  f"{patient_id}")
            return RedirectResponse(f"{BASE}?mrn={quote(patient_id)}", status_code=302)
        if kind != "STUDY":
            return _not_found(f"requestType {kind!r} không hỗ trợ / not supported "
                              "(STUDY, PATIENT)", 400)
        if params.get("studyUID"):
            uids = [u.strip() for u in re.split(r"[,\\]", params["studyUID"]) if u.strip()]
            if not uids or not all(is_valid_uid(uid) for uid in uids):
                return _not_found("studyUID: một hoặc nhiều UID, cách nhau bởi dấu phẩy / one "
                                  "or more UIDs, separated by commas", 400)
            return await _open_studies(server, {"StudyInstanceUID": "\\".join(uids)})
        if params.get("accessionNumber"):
            if not _names_one(params["accessionNumber"]):
                return _not_found(_NOT_ONE.format(name="accessionNumber"), 400)
            return await _open_studies(server, {"AccessionNumber": params["accessionNumber"]})
        return _not_found("studyUID hoặc accessionNumber là bắt buộc / studyUID or "
                          "accessionNumber is required", 400)

    async def study_link(request: Request) -> Response:
        uid = request.path_params["uid"]
        if not is_valid_uid(uid):
            return _not_found(f"{uid!r} không phải là UID / is not a UID", 400)
        return await _open_studies(server, {"StudyInstanceUID": uid})

    async def accession_link(request: Request) -> Response:
        number = request.path_params["number"]
        if not _names_one(number):
            return _not_found(_NOT_ONE.format(name="accession number"), 400)
        return await _open_studies(server, {"AccessionNumber": number})

    return [
        Route("/", start_page, name="start_page"),
        Route(BASE + "app-config.js", ohif_config),
        Route(BASE.rstrip("/"), ohif_file),
        Route(BASE + "{path:path}", ohif_file),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/IHEInvokeImageDisplay", invoke_image_display),
        Route("/studies/{uid}", study_link),
        Route("/accession/{number:path}", accession_link),  # an accession may hold "/"
    ]


# Launch links name one study or patient, but are looked up through the query path, where an
# empty value or a wildcard matches many and "\\" separates a list.
_NOT_ONE = ("{name}: một giá trị, không có * ? \\ / one value, without the characters "
            "* ? \\")


def _names_one(value: str) -> bool:
    return bool(value.strip()) and not any(c in value for c in "*?\\")


def _patient_cx(value: str) -> tuple[str, str]:
    """(ID, issuer namespace) of an IID ``patientID``: an HL7 CX value (``ID^^^ISSUER`` or
    ``ID^^^&OID&ISO``, as IHE IID asks), or a bare ID. The index knows an issuer by its
    namespace (Issuer of Patient ID); one given only by its universal ID is not checked."""
    components = value.strip().split("^")
    authority = components[3] if len(components) > 3 else ""
    return components[0].strip(), authority.split("&")[0].strip()


async def _find(server, level: Level, keys: dict[str, str]) -> list[dict]:
    query = Query(level, keys, NameMatching.EXACT, limit=50)
    try:
        return await run_in_threadpool(find, server.archive.index, query)
    except InvalidQuery:
        return []


async def _open_studies(server, keys: dict[str, str]) -> Response:
    found = await _find(server, Level.STUDY, keys)
    if not found:
        what = ", ".join(f"{k} {v}" for k, v in keys.items())
        return _not_found(f"Không tìm thấy ca chụp / no study found: {what}")
    uids = ",".join(row["StudyInstanceUID"] for row in found)
    return RedirectResponse(f"{BASE}viewer?StudyInstanceUIDs={quote(uids, safe=',')}",
                            status_code=302)


def _static(request: Request, path: Path) -> Response:
    suffix = path.suffix.lower()
    media_type = _TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or \
        "application/octet-stream"
    cache = _FOREVER if _HASHED.search(path.name) else _NO_CACHE
    headers = {"Cache-Control": cache, "Vary": "Accept-Encoding"}
    packed = path.with_name(path.name + ".gz")
    if "gzip" in request.headers.get("accept-encoding", "") and packed.exists():
        headers["Content-Encoding"] = "gzip"
        return FileResponse(packed, media_type=media_type, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)


def _not_found(message: str, status: int = 404) -> HTMLResponse:
    body = (f"<h1>{'Không tìm thấy / Not found' if status == 404 else 'Yêu cầu sai / Bad request'}"
            f"</h1><p>{html.escape(message)}</p><p><a href=\"{BASE}\">Danh sách ca chụp / "
            "Study list</a></p>")
    return HTMLResponse(_page("PACS", body), status_code=status)


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:44rem;margin:2rem auto;"
          "padding:0 1rem;color:#111}th{text-align:left;padding:.3rem 1rem .3rem 0;"
          "font-weight:600}td{padding:.3rem 0}a.button{display:inline-block;background:#0b5cad;"
          "color:#fff;padding:.6rem 1rem;border-radius:.4rem;text-decoration:none}"
          "code{background:#eee;padding:0 .3rem}")


def _page(title: str, body: str) -> str:
    return ('<!doctype html><html lang="vi"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>")
