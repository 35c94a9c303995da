"""Orthanc's DICOMweb client (its DICOMweb plugin acting as a client) against this server.

Orthanc is the PACS a hospital is most likely to pair with ours (a second site, a research
node): it must be able to search us (QIDO-RS), pull studies from us (WADO-RS) and push studies
to us (STOW-RS). The Debian packages ``orthanc`` and ``orthanc-dicomweb`` are installed by
``scripts/setup.sh``; Orthanc runs privately here with its HTTP on a loopback port, no DICOM
listener and no remote access.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PacsProcess, free_port
from tests.factory import Spec, instance

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
BOUNDARY = "orthanc-test"


def _stow(base: str, datas: list[bytes]) -> httpx.Response:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + d
                    + b"\r\n" for d in datas) + f"--{BOUNDARY}--\r\n".encode()
    return httpx.post(base + "/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = PacsProcess(tmp_path_factory.mktemp("pacs") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc(pacs, tmp_path_factory):
    if shutil.which("Orthanc") is None or not PLUGIN.exists():
        pytest.fail("Orthanc and its DICOMweb plugin are needed "
                    "(apt-get install orthanc orthanc-dicomweb; scripts/setup.sh does it)")
    home = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "TEST-ORTHANC", "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"), "Plugins": [str(PLUGIN)],
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "HttpsVerifyPeers": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": {"pacs": [pacs.http + "/dicomweb/"]}},
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    log = open(home / "orthanc.log", "wb")  # noqa: SIM115 - inherited by the child process
    process = subprocess.Popen(["Orthanc", str(home / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/system", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            pytest.fail("Orthanc exited:\n" + (home / "orthanc.log").read_text(errors="replace"))
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(30)


def test_orthanc_searches_and_retrieves_from_us(pacs, orthanc):
    spec = Spec(patient_name="Đặng^Thị Mai", patient_id="BHYT-DN4010123456789")
    datas = [instance(Spec(**{**spec.__dict__, "sop_uid": Spec().sop_uid, "instance_number": n}))
             for n in (1, 2)]
    assert _stow(pacs.http + "/dicomweb", datas).status_code == 200
    found = httpx.post(orthanc + "/dicom-web/servers/pacs/qido", json={
        "Uri": "/studies", "Arguments": {"PatientName": "dang*", "fuzzymatching": "true"}},
        timeout=30)
    assert found.status_code == 200, found.text
    # Orthanc hands the answers back in its own JSON flavour: "Value" is the plain value.
    uids = [s["0020000D"]["Value"] for s in found.json()]
    assert spec.study_uid in uids
    pulled = httpx.post(orthanc + "/dicom-web/servers/pacs/retrieve", json={
        "Resources": [{"Study": spec.study_uid}]}, timeout=60)
    assert pulled.status_code == 200, pulled.text
    studies = httpx.post(orthanc + "/tools/find", json={
        "Level": "Study", "Query": {"StudyInstanceUID": spec.study_uid}, "Expand": True}).json()
    assert len(studies) == 1
    assert studies[0]["PatientMainDicomTags"]["PatientName"] == "Đặng^Thị Mai"
    series = httpx.get(orthanc + f"/studies/{studies[0]['ID']}/instances").json()
    assert len(series) == 2


def test_orthanc_stores_to_us(pacs, orthanc):
    spec = Spec(patient_name="Hoàng^Văn Đức", patient_id="CCCD079090001234")
    uploaded = httpx.post(orthanc + "/instances", content=instance(spec))
    assert uploaded.status_code == 200, uploaded.text
    study_id = uploaded.json()["ParentStudy"]
    pushed = httpx.post(orthanc + "/dicom-web/servers/pacs/stow",
                        json={"Resources": [study_id]}, timeout=60)
    assert pushed.status_code == 200, pushed.text
    ours = httpx.get(pacs.http + "/dicomweb/studies", params={"StudyInstanceUID": spec.study_uid})
    assert ours.json()[0]["00100010"]["Value"][0]["Alphabetic"] == "Hoàng^Văn Đức"
