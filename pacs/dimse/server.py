"""The DICOM application entity: presentation contexts, access rules, and the listening server."""

from __future__ import annotations

import logging
import socket
import threading

import pynetdicom.acse
from pydicom import config as pydicom_config
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacs.dimse import commands, passthrough, reactor
from pacs.dimse.commitment import StorageCommitment
from pacs.dimse.compat import pynetdicom_supported
from pacs.dimse.handlers import DimseHandlers, refuse_bad_move_identifiers_first
from pacs.dimse.workers import AcceptLoad
from pacs.dimse.worklist import WorklistHandlers
from pacs.settings import Settings
from storage.archive import Archive
from storage.parsing import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_known_transfer_syntax,
)

log = logging.getLogger("pacs.dimse")

QUERY_RETRIEVE_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


def configure_libraries() -> None:
    """Process-wide settings of pydicom and pynetdicom this server relies on."""
    # Storage contexts are accepted for every storage (and unknown or private) SOP class, with
    # the first transfer syntax the requestor proposed that the archive can read: images are
    # stored as sent. The C-STORE handler then refuses what it cannot archive with a status
    # that says why. Without a list of ~170 storage contexts pynetdicom also stops copying that
    # list for every association.
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    if pynetdicom_supported("storage transfer syntax negotiation",
                            "a storage context may be accepted with a syntax we cannot read"):
        pynetdicom.acse.negotiate_unrestricted = negotiate_readable_syntaxes
    # pynetdicom's standard handlers format a log line for every PDU and DIMSE message even
    # when the log level drops them (a third of the CPU of a small C-STORE), and at DEBUG they
    # print identifiers, i.e. patient data. Off unless the server runs at DEBUG.
    if logging.getLogger("pynetdicom").getEffectiveLevel() > logging.DEBUG:
        _config.LOG_HANDLER_LEVEL = "none"
    # Never format query identifiers and C-FIND answers for the log: they hold patient names
    # and IDs, and pynetdicom builds the text (slowly) even when INFO is not logged.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pydicom re-validates every value it reads or writes (UIDs by regex, lengths...). DIMSE
    # command sets and C-FIND answers are built from values this server already checked, and
    # the validation cost more than the rest of a C-ECHO. The archive validates what it needs.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    reactor.install()
    commands.install()
    passthrough.install()
    refuse_bad_move_identifiers_first()


def negotiate_readable_syntaxes(rq_contexts: list[PresentationContext],
                                ac_contexts: list[PresentationContext], roles=None):
    """pynetdicom's unrestricted storage negotiation, offered only the transfer syntaxes the
    archive can read (PS3.8 9.3.2.2: the acceptor picks one it supports).

    pynetdicom accepted a storage context with the first syntax proposed, known or not: with
    [1.2.3.4.5.6, Explicit VR Little Endian] proposed, 1.2.3.4.5.6 was accepted and every
    C-STORE on it then failed. Now the first proposed syntax we know is chosen (the requestor's
    order of preference), and a context proposing none is rejected with result 4, transfer
    syntaxes not supported. Other contexts are negotiated against our supported ones as before.
    """
    readable_contexts, unreadable_ids = [], set()
    for context in rq_contexts:
        readable = [ts for ts in context.transfer_syntax if is_known_transfer_syntax(ts)]
        if not readable:
            unreadable_ids.add(context.context_id)
            readable_contexts.append(context)  # for its abstract syntax's verdict, changed below
        elif len(readable) == len(context.transfer_syntax):
            readable_contexts.append(context)
        else:
            copy = PresentationContext()
            copy.context_id = context.context_id
            copy.abstract_syntax = context.abstract_syntax
            copy.transfer_syntax = readable
            readable_contexts.append(copy)
    result, reply_roles = negotiate_unrestricted(readable_contexts, ac_contexts, roles)
    for context in result:
        if context.context_id in unreadable_ids and context.result == 0x00:
            context.result = 0x04  # transfer syntaxes not supported
    accepted = {context.abstract_syntax for context in result if context.result == 0x00}
    return result, [role for role in reply_roles if role.sop_class_uid in accepted]


def build_ae(settings: Settings) -> AE:
    """The application entity with every context this server accepts."""
    configure_libraries()
    ae = AE(ae_title=settings.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.dicom_max_pdu
    ae.network_timeout = settings.dicom_network_timeout
    ae.acse_timeout = 30
    ae.dimse_timeout = max(30.0, settings.dicom_network_timeout)
    ae.require_called_aet = settings.require_called_ae_title
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for model in QUERY_RETRIEVE_MODELS:
        ae.add_supported_context(model)
    ae.add_supported_context(StorageCommitmentPushModel)
    ae.add_supported_context(ModalityWorklistInformationFind)
    ae.add_supported_context(ModalityPerformedProcedureStep)
    # Outgoing associations (C-MOVE) get their contexts per request; C-ECHO for diagnostics.
    ae.add_requested_context(Verification)
    return ae


class _ServingHandler(RequestHandler):
    """pynetdicom's connection handler, returning only once its association has ended, so the
    server's thread for a connection lives exactly as long as the association."""

    def _create_association(self):
        self.association = super()._create_association()
        return self.association

    def handle(self) -> None:
        super().handle()
        self.association.join()


class SharedSocketServer(ThreadedAssociationServer):
    """A pynetdicom server accepting on a listening socket made by another process and shared
    by several (``pacs.dimse.workers``); with ``load``, the worker serving the fewest
    associations takes a new connection."""

    daemon_threads = True  # a connection's thread never holds up the process's exit

    def __init__(self, *args, listener: socket.socket, load: AcceptLoad | None = None,
                 **kwargs) -> None:
        self._listener = listener
        self._load = load
        super().__init__(*args, **kwargs)
        if load is not None:
            self.RequestHandlerClass = _ServingHandler

    def server_bind(self) -> None:
        self.socket.close()  # the one socketserver made; the shared one replaces it
        self.socket = self._listener
        # Every worker wakes for a new connection and one wins it: the others must not block
        # in accept(), which socketserver then treats as a request that did not come.
        self.socket.settimeout(0)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def get_request(self):
        if self._load is not None:
            self._load.defer(self.socket)
        return super().get_request()

    def process_request(self, request, client_address) -> None:
        if self._load is None:
            super().process_request(request, client_address)
            return
        self._load.started()
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._load.ended()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self._load is not None:
                self._load.ended()

    def server_close(self) -> None:
        if self._load is not None:
            self._load.closed()
        # Close this process's handle only: shutdown() would stop the socket for every worker.
        self.socket.close()


class DicomServer:
    """The listening DICOM server (one thread per association), bound to the archive.

    With ``listener`` it accepts on that already listening socket (a DICOM worker process)
    instead of binding the configured address itself.
    """

    worker_processes = 0  # runs in the calling process

    def __init__(self, settings: Settings, archive: Archive,
                 worklist: WorklistHandlers | None = None, *,
                 listener: socket.socket | None = None, load: AcceptLoad | None = None) -> None:
        self.settings = settings
        self.archive = archive
        self.ae = build_ae(settings)
        self.handlers = DimseHandlers(archive, settings, worklist)
        self.commitment = StorageCommitment(archive, settings, settings.ae_title)
        self._listener = listener
        self._load = load
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Start accepting associations (returns at once; the server runs in threads)."""
        address = (self.settings.dicom_host, self.settings.dicom_port)
        handlers = [*self.handlers.bindings(), (evt.EVT_N_ACTION, self.commitment.on_n_action)]
        if self.handlers.worklist is not None:
            handlers += self.handlers.worklist.bindings()
        if self._listener is None:
            self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
            log.info("DICOM %s listening on %s:%d", self.settings.ae_title, *self.address)
            return
        server = self.ae.make_server(address, evt_handlers=handlers,
                                     server_class=SharedSocketServer, listener=self._listener,
                                     load=self._load)
        self.ae._servers.append(server)  # as start_server does: ae.shutdown() stops it
        threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True).start()
        self._server = server
        if self._load is not None:
            self._load.accepting()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the DICOM server is not running")
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop listening and end the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self.commitment.close()
