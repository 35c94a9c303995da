"""DIMSE event handlers: thin translations between pynetdicom events and the archive.

Each handler takes a pynetdicom event and returns (or yields) DICOM statuses; all the work is in
``storage``. Status codes are named in ``pacs.dimse.status``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicomweb.transcode import NotTranscodable, transcode
from pacs.dimse import fastfind, status
from pacs.dimse.identifiers import (
    IdentifierError,
    build_query,
    build_response,
    parse_identifier,
    response_dataset,
    retrieve_keys,
    unmatched_keys,
)
from pacs.dimse.passthrough import FailedSubOperation, StoredDataset, set_move_originator
from pacs.dimse.worklist import WorklistHandlers
from pacs.settings import Peer, Settings
from storage.archive import Archive, InstanceLocation
from storage.attributes import Level
from storage.errors import (
    ArchiveError,
    InstanceMismatch,
    InvalidInstance,
    InvalidQuery,
    PatientConflict,
    StorageUnavailable,
)
from storage.parsing import part10
from storage.query import NameMatching, Query, find

log = logging.getLogger("pacs.dimse")

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PATIENT_ROOT_RETRIEVE = frozenset({PatientRootQueryRetrieveInformationModelMove,
                                    PatientRootQueryRetrieveInformationModelGet})
# A storage SOP class pynetdicom does not list yet, by its name in pydicom's (newer) dictionary:
# "... Storage", "... Storage - For Presentation", "... Storage - Trial". Not Storage Commitment,
# Stored Print or the Hardcopy classes, whose names end "SOP Class": they hold no images.
_STORAGE_NAME = re.compile(r"\bStorage( - (For Presentation|For Processing|Trial))?$")
_MAX_SUBOPERATIONS = 65535  # Number of ... Suboperations is US


class PeerCannotTake(Exception):
    """The retrieve's peer accepted no presentation context an instance can be sent in."""


def status_dataset(code: int, comment: str | None = None) -> Dataset:
    """A status with an optional ErrorComment (truncated to the 64 characters LO allows)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[: status.ERROR_COMMENT_LIMIT]
    return ds


def set_tcp_nodelay(event: evt.Event) -> None:
    """Disable Nagle's algorithm: without it every DIMSE response can wait ~40 ms for an ACK."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


class DimseHandlers:
    """The handlers bound to the AE, sharing one archive and the settings."""

    def __init__(self, archive: Archive, settings: Settings,
                 worklist: WorklistHandlers | None = None) -> None:
        self.archive = archive
        self.settings = settings
        self.worklist = worklist
        self.name_matching = NameMatching(settings.person_name_matching)

    def bindings(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    # ------------------------------------------------------------------ C-ECHO

    def on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    # ------------------------------------------------------------------ C-STORE

    def on_store(self, event: evt.Event) -> Dataset:
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        if not self._accepts_sop_class(sop_class):
            log.warning("C-STORE from %s refused: SOP Class %s is not a storage class",
                        _peer(event), sop_class)
            return status_dataset(status.SOP_CLASS_NOT_SUPPORTED,
                                  f"SOP Class {sop_class} not supported")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        syntax = str(event.context.transfer_syntax)
        try:
            data = part10(request.DataSet.getvalue(), sop_class, sop_instance, syntax,
                          source_ae_title=event.assoc.requestor.ae_title)
            result = self.archive.store(data, transfer_syntax=syntax,
                                        expected_sop_class_uid=sop_class,
                                        expected_sop_instance_uid=sop_instance)
        except InstanceMismatch as exc:
            log.warning("C-STORE from %s refused: %s", _peer(event), exc)
            return status_dataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc))
        except PatientConflict as exc:
            log.warning("C-STORE from %s refused: %s", _peer(event), exc)
            return status_dataset(status.PATIENT_CONFLICT, str(exc))
        except InvalidInstance as exc:
            log.warning("C-STORE from %s refused: %s", _peer(event), exc)
            return status_dataset(status.CANNOT_UNDERSTAND, str(exc))
        except StorageUnavailable as exc:
            log.error("C-STORE from %s failed: %s", _peer(event), exc)
            return status_dataset(status.OUT_OF_RESOURCES, "Storage failure: " + str(exc))
        except Exception:
            log.exception("C-STORE from %s failed unexpectedly", _peer(event))
            return status_dataset(status.OUT_OF_RESOURCES, "Internal error while storing")
        if result.is_warning:
            return status_dataset(status.WARNING_DUPLICATE_SOP_INSTANCE, result.message)
        return status_dataset(status.SUCCESS)

    def _accepts_sop_class(self, sop_class: str) -> bool:
        from pynetdicom.sop_class import _STORAGE_CLASSES

        if sop_class in _STORAGE_CLASSES.values() or _is_storage_class(UID(sop_class)):
            return True
        # Private classes (unknown to pydicom) when configured; a known class that is not a
        # storage class (Storage Commitment, a worklist...) never: it holds no image.
        return self.settings.accept_unknown_sop_classes and not UID(sop_class).type

    # ------------------------------------------------------------------ C-FIND

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        model = event.request.AffectedSOPClassUID
        if model == ModalityWorklistInformationFind:
            if self.worklist is None:
                yield status_dataset(status.SOP_CLASS_NOT_SUPPORTED, "no worklist here"), None
            else:
                yield from self.worklist.on_find(event)
            return
        try:
            level, keys = parse_identifier(event.identifier)
        except IdentifierError as exc:
            yield status_dataset(status.QR_IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        except Exception as exc:
            yield status_dataset(status.QR_UNABLE_TO_PROCESS,
                                 f"identifier cannot be decoded: {exc}"), None
            return
        if level is Level.PATIENT and model != PatientRootQueryRetrieveInformationModelFind:
            yield status_dataset(status.QR_IDENTIFIER_DOES_NOT_MATCH,
                                 "PATIENT level needs the Patient Root model"), None
            return
        if model not in (PatientRootQueryRetrieveInformationModelFind,
                         StudyRootQueryRetrieveInformationModelFind):
            yield status_dataset(status.SOP_CLASS_NOT_SUPPORTED, "query model not supported"), \
                None
            return
        try:
            rows = find(self.archive.index, build_query(level, keys, self.name_matching))
        except InvalidQuery as exc:
            yield status_dataset(status.QR_IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
            return
        except ArchiveError as exc:
            yield status_dataset(status.QR_UNABLE_TO_PROCESS, str(exc)), None
            return
        except Exception:
            log.exception("C-FIND from %s failed", _peer(event))
            yield status_dataset(status.QR_UNABLE_TO_PROCESS, "Internal error while searching"), \
                None
            return
        yield from self._answer_find(event, level, keys, rows)

    def _answer_find(self, event: evt.Event, level: Level, keys, rows) -> Iterator[Any]:
        """Pending responses for ``rows`` (0xFF01 when a key could not be matched on), then
        success (or cancel)."""
        responses = (build_response(level, keys, row, self.settings.ae_title) for row in rows)
        yield from fastfind.answer_find(
            event, ((r.elements, r.utf8, lambda r=r: response_dataset(r)) for r in responses),
            cancel=status.CANCEL, success=status.SUCCESS,
            pending=status.PENDING_KEYS_NOT_SUPPORTED if unmatched_keys(level, keys)
            else status.PENDING)

    # ------------------------------------------------------------------ C-MOVE / C-GET

    def _locations(self, event: evt.Event) -> tuple[list[InstanceLocation], Dataset | None]:
        """The instances a retrieve identifier names, or a failure status saying why not."""
        try:
            _, unique = retrieve_keys(event.identifier, patient_root=str(
                event.request.AffectedSOPClassUID) in _PATIENT_ROOT_RETRIEVE)
            rows = find(self.archive.index, Query(Level.INSTANCE, unique, NameMatching.EXACT,
                                                  limit=_MAX_SUBOPERATIONS + 1))
        except (IdentifierError, InvalidQuery) as exc:
            return [], status_dataset(status.QR_IDENTIFIER_DOES_NOT_MATCH, str(exc))
        except ArchiveError as exc:
            return [], status_dataset(status.QR_UNABLE_TO_PROCESS, str(exc))
        if len(rows) > _MAX_SUBOPERATIONS:
            return [], status_dataset(status.QR_OUT_OF_RESOURCES,
                                      f"more than {_MAX_SUBOPERATIONS} instances match")
        return [InstanceLocation(r["SOPInstanceUID"], r["SOPClassUID"],
                                 r["_transfer_syntax_uid"], r["_blob_key"], r["_size"])
                for r in rows], None

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self.settings.peer(str(event.move_destination or ""))
        if destination is None:
            log.warning("C-MOVE from %s: unknown destination %r (configure PACS_PEERS)",
                        _peer(event), event.move_destination)
            yield None, None
            return
        locations, failure = self._locations(event)
        # Read by _move_scp_checking_first if the destination cannot be reached.
        setattr(event.request, _DESTINATION_NAMED, (destination, len(locations)))
        sub_association: dict[str, Any] = {}

        def remember(sub_event: evt.Event) -> None:
            set_tcp_nodelay(sub_event)
            sub_association["assoc"] = sub_event.assoc
            set_move_originator(sub_event.assoc, event.assoc.requestor.ae_title)

        yield destination.host, destination.port, {
            "contexts": _store_contexts(locations) or [build_context("1.2.840.10008.1.1")],
            "evt_handlers": [(evt.EVT_CONN_OPEN, remember)],
        }
        yield from self._send(event, locations, failure, lambda: sub_association.get("assoc"))

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        locations, failure = self._locations(event)
        yield from self._send(event, locations, failure, lambda: event.assoc)

    def _send(self, event: evt.Event, locations: list[InstanceLocation],
              failure: Dataset | None, association) -> Iterator[Any]:
        """Yield the sub-operation count, then each instance as a data set to C-STORE."""
        if failure is not None:
            # pynetdicom wants a count first; the failure status then ends the operation.
            yield 1
            yield failure, None
            return
        yield len(locations)
        operation = "C-MOVE" if isinstance(event.request, C_MOVE) else "C-GET"
        for location, read in self.archive.read_ahead(locations):
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            try:
                dataset = self._dataset_for(location, read.result(), association())
            except (ArchiveError, PeerCannotTake) as exc:
                log.warning("%s from %s: sub-operation for SOP Instance %s failed: %s",
                            operation, _peer(event), location.sop_instance_uid, exc)
                yield status.PENDING, FailedSubOperation(location.sop_class_uid,
                                                         location.sop_instance_uid)
                continue
            yield status.PENDING, dataset

    @staticmethod
    def _dataset_for(location: InstanceLocation, data: bytes, assoc) -> Dataset:
        """The stored instance (``data``) as a data set the peer accepted a context for."""
        stored = UID(location.transfer_syntax_uid)
        if assoc is None or stored in _UNCOMPRESSED or _accepted(assoc, location.sop_class_uid,
                                                                   stored):
            return StoredDataset(data, location.sop_class_uid, location.sop_instance_uid, stored)
        if not _accepted_any(assoc, location.sop_class_uid, _UNCOMPRESSED):
            raise PeerCannotTake(f"the peer accepted neither {stored.name} nor an uncompressed "
                                 f"syntax for SOP Class {location.sop_class_uid}")
        try:
            native = transcode(data, ExplicitVRLittleEndian)
        except NotTranscodable as exc:
            raise StorageUnavailable(f"cannot decompress {stored.name} for the peer: {exc}") \
                from exc
        return StoredDataset(native, location.sop_class_uid, location.sop_instance_uid,
                             ExplicitVRLittleEndian)


def _accepted(assoc, sop_class: str, syntax: str) -> bool:
    return any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax
               for cx in assoc.accepted_contexts)


def _accepted_any(assoc, sop_class: str, syntaxes) -> bool:
    return any(_accepted(assoc, sop_class, s) for s in syntaxes)


def _store_contexts(locations: list[InstanceLocation]) -> list:
    """Presentation contexts for C-MOVE sub-operations: each stored transfer syntax as is, and
    uncompressed as a fallback, per SOP class (at most 128 contexts per association)."""
    contexts = []
    seen: set[tuple[str, str]] = set()
    for location in locations:
        pairs = [(location.sop_class_uid, "uncompressed")]
        if location.transfer_syntax_uid not in _UNCOMPRESSED:
            pairs.append((location.sop_class_uid, location.transfer_syntax_uid))
        for pair in pairs:
            if pair in seen or len(contexts) >= 128:
                continue
            seen.add(pair)
            syntaxes = list(_UNCOMPRESSED) if pair[1] == "uncompressed" else [pair[1]]
            contexts.append(build_context(pair[0], syntaxes))
    return contexts


def _is_storage_class(uid: UID) -> bool:
    return uid.type == "SOP Class" and bool(_STORAGE_NAME.search(uid.name))


def refuse_bad_move_identifiers_first() -> None:
    """Check C-MOVE identifiers before pynetdicom contacts the destination (once per process).

    pynetdicom asks the C-MOVE handler for the destination, associates with it, and only then
    for the instances, so a refused identifier cost an association to the destination, was
    answered 0xA801 (destination unknown) when that was down, and counted a failed sub-operation
    that never was. Now it is answered 0xA900 with the reason before anything else."""
    if QueryRetrieveServiceClass._move_scp is _original_move_scp:
        QueryRetrieveServiceClass._move_scp = _move_scp_checking_first


_original_move_scp = QueryRetrieveServiceClass._move_scp
_DESTINATION_NAMED = "_pacs_move_destination"  # on a C-MOVE request: (Peer, instance count)


def _move_scp_checking_first(self: QueryRetrieveServiceClass, req: C_MOVE, context) -> None:
    syntax = context.transfer_syntax[0]
    try:
        identifier = decode(req.Identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                            syntax.is_deflated)
        retrieve_keys(identifier, patient_root=str(req.AffectedSOPClassUID)
                      in _PATIENT_ROOT_RETRIEVE)
    except IdentifierError as exc:
        response = C_MOVE()
        response.MessageIDBeingRespondedTo = req.MessageID
        response.AffectedSOPClassUID = req.AffectedSOPClassUID
        response = self.validate_status(
            status_dataset(status.QR_IDENTIFIER_DOES_NOT_MATCH, str(exc)), response)
        self.dimse.send_msg(response, context.context_id)
        return
    except Exception:  # undecodable: pynetdicom answers that itself
        pass
    finally:
        req.Identifier.seek(0)
    dimse = self.dimse
    send_msg = dimse.send_msg

    def send_answering_unreachable(response, context_id: int) -> None:
        named = getattr(req, _DESTINATION_NAMED, None)
        if (named is not None and isinstance(response, C_MOVE)
                and response.Status == status.MOVE_DESTINATION_UNKNOWN):
            response = _destination_unreachable(self, response, *named)
        send_msg(response, context_id)

    # pynetdicom answers 0xA801 (Move Destination unknown) when the association with the
    # destination fails too; for a destination we know (PACS_PEERS) that is 0xA702, refused:
    # unable to perform sub-operations (PS3.4 C.4.2.1.5). While the C-MOVE is served nothing
    # else sends on its association (a commitment report waits for it to be idle).
    dimse.send_msg = send_answering_unreachable
    try:
        _original_move_scp(self, req, context)
    finally:
        del dimse.send_msg  # pynetdicom's method again


def _destination_unreachable(service: QueryRetrieveServiceClass, response: C_MOVE,
                             destination: Peer, instances: int) -> C_MOVE:
    """The final response for a configured destination the sub-association failed to reach."""
    log.warning("C-MOVE from %s: destination %s at %s:%d could not be reached; %d instance(s) "
                "not sent", service.assoc.requestor.ae_title, destination.ae_title,
                destination.host, destination.port, instances)
    answer = service.validate_status(status_dataset(
        status.SUBOPERATION_FAILED, f"Move destination {destination.ae_title} could not be "
        "reached"), response)
    answer.NumberOfCompletedSuboperations = 0
    answer.NumberOfFailedSuboperations = instances
    answer.NumberOfWarningSuboperations = 0
    return answer
