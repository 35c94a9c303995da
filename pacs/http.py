"""The HTTP side of the process: health now; DICOMweb, viewer and EMR routes mount here."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pacs import __version__


def build_app(server) -> Starlette:
    """The ASGI app for a running ``pacs.app.PacsServer``."""

    async def healthz(request: Request) -> JSONResponse:
        dicom_up = server.dicom.running
        body = {
            "status": "ok" if dicom_up else "starting",
            "version": __version__,
            "ae_title": server.settings.ae_title,
            "dicom_port": server.dicom.address[1] if dicom_up else None,
            "reconcile": server.reconcile_state,
        }
        return JSONResponse(body, status_code=200 if dicom_up else 503)

    return Starlette(routes=[Route("/healthz", healthz)])
