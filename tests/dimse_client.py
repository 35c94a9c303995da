"""A second DICOM client for tests, built on plain pynetdicom (DCMTK is the first)."""

from __future__ import annotations

import socket
import subprocess
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

# Send files byte for byte, as a modality would, instead of re-encoding them with pydicom.
_config.STORE_SEND_CHUNKED_DATASET = True
_config.LOG_HANDLER_LEVEL = "none"


def _nodelay(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(port: int, contexts: list, *, calling: str = "TESTSCU", called: str = "PACS",
              roles: list | None = None, handlers: list | None = None):
    ae = AE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=called,
                         ext_neg=roles or [],
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *(handlers or [])])
    if not assoc.is_established:
        raise ConnectionError("association rejected or aborted")
    return assoc


def store_files(port: int, files: Iterable[Path]) -> dict[Path, Dataset]:
    """C-STORE each file with its own SOP class and transfer syntax; the status of each
    (an empty Dataset when the association broke before a response)."""
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in files:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        groups[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))].append(path)
    statuses: dict[Path, Dataset] = {}
    pairs = sorted(groups)
    for start in range(0, len(pairs), 100):
        chunk = pairs[start:start + 100]
        assoc = associate(port, [build_context(sop, [ts]) for sop, ts in chunk])
        try:
            for pair in chunk:
                for path in groups[pair]:
                    if not assoc.is_established:
                        assoc = associate(port, [build_context(sop, [ts]) for sop, ts in chunk])
                    try:
                        statuses[path] = assoc.send_c_store(path)
                    except (RuntimeError, ValueError, AttributeError):
                        statuses[path] = Dataset()
        finally:
            assoc.release()
    return statuses


def c_find(port: int, identifier: Dataset, *, patient_root: bool = False) -> list[Dataset]:
    model = (PatientRootQueryRetrieveInformationModelFind if patient_root
             else StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(port, [build_context(model)])
    try:
        results = []
        for status, found in assoc.send_c_find(identifier, model):
            if status is None:
                raise ConnectionError("no C-FIND response")
            if status.Status in (0xFF00, 0xFF01):
                results.append(found)
            elif status.Status != 0x0000:
                raise C_FindFailed(status)
        return results
    finally:
        assoc.release()


class C_FindFailed(Exception):  # noqa: N801 - named after the DIMSE operation
    def __init__(self, status: Dataset) -> None:
        super().__init__(f"C-FIND status 0x{status.Status:04X} {status.get('ErrorComment', '')}")
        self.status = status


def c_get(port: int, identifier: Dataset,
          contexts: list[tuple[str, str]]) -> tuple[Dataset, list[Dataset]]:
    """C-GET with the given (SOP class, transfer syntax) storage contexts; final status and the
    received data sets (with their transfer syntax in ``file_meta``)."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    storage = [build_context(sop, [ts]) for sop, ts in contexts]
    roles = [build_role(sop, scp_role=True) for sop in {sop for sop, _ in contexts}]
    assoc = associate(port, [build_context(StudyRootQueryRetrieveInformationModelGet), *storage],
                      roles=roles, handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        final = None
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if status is not None:
                final = status
        return final, received
    finally:
        assoc.release()


def c_move(port: int, identifier: Dataset, destination: str) -> Dataset:
    assoc = associate(port, [build_context(StudyRootQueryRetrieveInformationModelMove)])
    try:
        final = None
        for status, _ in assoc.send_c_move(identifier, destination,
                                           StudyRootQueryRetrieveInformationModelMove):
            if status is not None:
                final = status
        return final
    finally:
        assoc.release()


def echo(port: int, calling: str = "TESTSCU") -> int:
    assoc = associate(port, [build_context(Verification)], calling=calling)
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def identifier(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
