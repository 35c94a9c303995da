"""The HTTP side of the process: health, DICOMweb at ``/dicomweb``, the viewer and its pages."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dicomweb.app import build_dicomweb
from dicomweb.errors import BodyIdleTimeout, ContainErrors, error_handlers
from emr.http import ERROR_BODIES, emr_routes
from pacs import __version__
from pacs.access import AccessGate
from pacs.routes import merged_by_path
from viewer.patient import patient_routes
from viewer.share_api import share_api_routes
from viewer.stats import stats_routes
from viewer.study_api import study_api_routes
from viewer.web import STATIC_DIR, viewer_routes


def build_app(server) -> Starlette:
    """The ASGI app for a running ``pacs.app.PacsServer``."""

    async def healthz(request: Request) -> JSONResponse:
        dicom_up = server.dicom.running
        body = {
            "status": "ok" if dicom_up else "starting",
            "version": __version__,
            "ae_title": server.settings.ae_title,
            "dicom_port": server.dicom.address[1] if dicom_up else None,
            "dicom_workers": server.dicom.worker_processes,
            "reconcile": server.reconcile_state,
        }
        return JSONResponse(body, status_code=200 if dicom_up else 503)

    middleware = [Middleware(ContainErrors, bodies=ERROR_BODIES),  # outermost: the gate's too
                  Middleware(BodyIdleTimeout, seconds=server.settings.http_body_idle_timeout)]
    origins = list(server.settings.cors_allowed_origins)
    if origins:
        # Viewers served from another origin; preflight answered for the headers they send.
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type", "If-None-Match", "Range"],
            expose_headers=["ETag", "Content-Length", "Content-Range", "Warning"],
            max_age=600))
    # After CORS (preflights carry no credentials), before every route.
    middleware.append(Middleware(AccessGate, policy=server.access, bodies=ERROR_BODIES))
    dicomweb = build_dicomweb(server.archive, server.settings)
    return Starlette(routes=merged_by_path([
        Route("/healthz", healthz),
        Mount("/dicomweb", dicomweb),
        Route("/wado", dicomweb.state.wado_uri),  # WADO-URI, also at /dicomweb/wado
        *viewer_routes(server),
        *patient_routes(server),
        *share_api_routes(server),
        *study_api_routes(server),
        *stats_routes(server),
        *emr_routes(server),
        Mount("/static", GZipMiddleware(StaticFiles(directory=STATIC_DIR), minimum_size=500),
              name="static"),
    ]), middleware=middleware, exception_handlers=error_handlers(ERROR_BODIES))
