"""Process wiring: one archive, the DICOM server (in worker processes when there are several
cores, see ``pacs.dimse.workers``), the HTTP server and the EMR links."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import socket
import threading
from types import FrameType

import sqlalchemy as sa
import uvicorn

from emr.service import EmrService
from pacs.access import AccessPolicy, server_secret
from pacs.dimse.server import DicomServer, configure_libraries
from pacs.dimse.workers import DicomWorkers
from pacs.http import build_app
from pacs.settings import Settings
from storage.archive import Archive, open_archive
from storage.completion import StudyCompletion
from storage.index import shares, studies
from storage.shares import AUTOMATIC_SHARE, AutomaticShareExists, ShareError, ShareStore
from viewer.share_api import public_base

log = logging.getLogger("pacs")
AUTO_SHARE = AUTOMATIC_SHARE  # created_by of the shares made when a study is complete
AUTO_SHARE_LOOKBACK = dt.timedelta(days=7)


def archive_for(settings: Settings) -> Archive:
    """The archive the settings describe (creates folders and migrates the index)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_archive(settings.resolved_database_url, settings.resolved_storage_url,
                        duplicate_policy=settings.duplicate_policy,
                        accept_conflicting_patient_id=settings.accept_conflicting_patient_id,
                        connections=settings.database_connection_shares()[0],
                        name=f"pacs-{os.getpid()}")


class CannotListen(OSError):
    """A listening address the settings name cannot be used: taken (another pacs serve,
    Orthanc on 11112...), not an address of this machine, a port below 1024 without the
    right, a host name that does not resolve."""

    def __init__(self, settings_names: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"{settings_names} ({host}:{port}): {reason}")


def check_listening_addresses(settings: Settings) -> None:
    """``CannotListen`` naming the settings of the first listening address that cannot be
    used, before anything is opened or started: the listeners fail later on their own (the
    DICOM one in worker processes), in words that do not say which setting to change. Bound
    as the listeners bind (SO_REUSEADDR: a port left in TIME_WAIT by a stopped server is
    free)."""
    listeners = [("PACS_DICOM_HOST/PACS_DICOM_PORT", settings.dicom_host, settings.dicom_port),
                 ("PACS_HTTP_HOST/PACS_HTTP_PORT", settings.http_host, settings.http_port)]
    if settings.hl7_port:
        listeners.append(("PACS_HL7_HOST/PACS_HL7_PORT", settings.hl7_host, settings.hl7_port))
    for names, host, port in listeners:
        # As the listeners bind: IPv6 for an address with ':', else IPv4 (uvicorn, socketserver).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            reason = ("the address is in use (another pacs serve, or Orthanc?)"
                      if exc.errno == errno.EADDRINUSE else
                      "the host name does not resolve" if isinstance(exc, socket.gaierror) else
                      f"cannot listen there ({exc.strerror or exc})")
            raise CannotListen(names, host, port, reason) from None


def warn_without_public_url(settings: Settings) -> None:
    """A WARNING when results go to the EMR but ``public_url`` is not set: their viewer and
    DICOMweb links are then built from the listen address (``http://0.0.0.0:8042``), which
    no doctor's browser reaches."""
    if settings.emr_results_to and not settings.public_url:
        log.warning("PACS_PUBLIC_URL is not set: the links in results sent to the EMR "
                    "(PACS_EMR_RESULTS_TO) will point to %s, the listen address; set "
                    "PACS_PUBLIC_URL to the address doctors use (e.g. https://pacs.benhvien.vn)",
                    public_base(settings))


class _HttpServer(uvicorn.Server):
    """uvicorn's server without its re-raising of SIGTERM / SIGINT once it has stopped: that
    would end the process before ``PacsServer.run`` stops the DICOM workers, the outbox and
    the index; ``pacs serve`` then exits normally instead."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


class PacsServer:
    """Everything ``pacs serve`` runs. ``run`` blocks until SIGTERM or SIGINT."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.archive = archive_for(settings)
        self.completion = StudyCompletion(self.archive, settings.study_complete_seconds)
        self.emr = EmrService(self.archive, settings, self.completion)
        configure_libraries()  # pydicom's settings hold for DICOMweb too, workers or not
        workers = settings.resolved_dicom_workers
        self.dicom: DicomServer | DicomWorkers = (
            DicomWorkers(settings, self.archive, workers, on_performed=self.emr.step_performed)
            if workers > 1 else DicomServer(settings, self.archive, self.emr.worklist))
        self.shares = ShareStore(self.archive.index, server_secret(settings),
                                 pin_max_attempts=settings.share_pin_max_attempts)
        self.access = AccessPolicy(settings, self.shares, server_secret(settings))
        if settings.share_on_complete:
            self.completion.subscribe(self._share_completed_study,
                                      owed=self._studies_without_auto_share)
        self.reconcile_state = "pending" if settings.reconcile_on_start else "disabled"

    def _reconcile(self) -> None:
        self.reconcile_state = "running"
        try:
            report = self.archive.reconcile()
        except Exception:
            log.exception("start-up reconciliation failed")
            self.reconcile_state = "failed"
            return
        log.info("reconciliation done: %d orphan blob(s), %d re-indexed", report.blobs_seen,
                 report.reindexed)
        self.reconcile_state = "done"

    def _studies_without_auto_share(self) -> list[str]:
        """Studies of the last ``AUTO_SHARE_LOOKBACK`` with no automatic share: a stop during
        their quiet period, however long, still shares them (older ones were there before the
        feature was turned on)."""
        since = dt.datetime.now(dt.UTC) - AUTO_SHARE_LOOKBACK
        shared = sa.select(shares.c.pk).where(
            shares.c.study_instance_uid == studies.c.study_instance_uid,
            shares.c.created_by == AUTO_SHARE)
        with self.archive.index.read() as conn:
            return [uid for (uid,) in conn.execute(
                sa.select(studies.c.study_instance_uid).where(
                    studies.c.updated_at >= since, ~sa.exists(shared)))]

    def _share_completed_study(self, study_uid: str) -> None:
        """The automatic share of a complete study: one per study, whatever arrives later and
        however many nodes complete it at once (the index refuses a second one)."""
        if self.shares.list(study_uid=study_uid, created_by=AUTO_SHARE, limit=1):
            return  # the usual case, answered without hashing a PIN for nothing
        pin = self.settings.share_on_complete_pin or None
        for attempt in (pin, "generated"):  # no birth date known: a generated PIN instead
            try:
                share, _ = self.shares.create(
                    study_uid, days=self.settings.share_days, pin=attempt,
                    allow_download=self.settings.share_on_complete_download,
                    created_by=AUTO_SHARE)
                break
            except AutomaticShareExists:
                return  # another node completed the study at the same moment and made it
            except ShareError:
                if attempt == "generated":
                    raise
        log.info("study %s complete: share %d created", study_uid, share.id)

    def run(self) -> None:
        warn_without_public_url(self.settings)
        log.info("archive: index %s, blobs %s",
                 self.archive.index.engine.url.render_as_string(hide_password=True),
                 self.archive.blobs.describe())
        self.dicom.start()
        self.emr.start()
        self.completion.start()
        if self.settings.reconcile_on_start:
            threading.Thread(target=self._reconcile, name="reconcile", daemon=True).start()
        config = uvicorn.Config(build_app(self), host=self.settings.http_host,
                                port=self.settings.http_port, log_level="warning",
                                access_log=False, lifespan="off", proxy_headers=True,
                                forwarded_allow_ips=self.settings.trusted_proxy_networks())
        http = _HttpServer(config)
        log.info("HTTP listening on http://%s:%d", self.settings.http_host,
                 self.settings.http_port)
        try:
            http.run()  # returns on SIGTERM / SIGINT (uvicorn installs the handlers)
        finally:
            log.info("shutting down")
            self.dicom.stop()
            self.completion.stop()
            self.emr.stop()
            self.archive.close()
