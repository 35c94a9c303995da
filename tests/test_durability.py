"""Crash safety: SIGKILL the server in the middle of a storescu run; nothing acknowledged
is lost."""

from __future__ import annotations

import signal
import subprocess
import sys

import pydicom
import pytest

from tests import dimse_client as client
from tests.conftest import PacsProcess, s3_url
from tests.factory import Spec, instance


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite-files", "postgres-s3"])
def test_sigkill_during_ingest_loses_no_acknowledged_instance(backend, tmp_path, request,
                                                              dcmtk_env):
    env = {}
    if backend == "postgres-s3":
        env["PACS_DATABASE_URL"] = request.getfixturevalue("fresh_postgres_url")
        env["PACS_STORAGE_URL"] = s3_url(request.getfixturevalue("s3_endpoint"))
    folder = tmp_path / "in"
    folder.mkdir()
    study = Spec()
    for n in range(600):
        spec = Spec(study_uid=study.study_uid, series_uid=study.series_uid,
                    instance_number=n + 1, rows=64, columns=64)
        (folder / f"{n:04d}.dcm").write_bytes(instance(spec))
    server = PacsProcess(tmp_path / "data", env=env).start()
    try:
        storescu = subprocess.Popen(
            ["storescu", "-v", "-aec", "PACS", "127.0.0.1", str(server.dicom_port),
             *sorted(map(str, folder.iterdir()))],
            env=dcmtk_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        acknowledged: list[str] = []
        current = None
        for line in storescu.stdout:
            if "Sending file:" in line:
                current = line.split("Sending file:", 1)[1].strip()
            elif "Received Store Response (Success)" in line and current:
                acknowledged.append(current)
                if len(acknowledged) == 150:
                    server.proc.send_signal(signal.SIGKILL)  # in the middle of the next stores
                    break
        storescu.wait(60)
        server.proc.wait(10)
        assert 150 <= len(acknowledged) < 600

        server.start()  # same data folder, same database: start-up reconciliation runs
        for path in acknowledged:
            original = pydicom.dcmread(path)
            status, received = client.c_get(server.dicom_port, client.identifier(
                "IMAGE", StudyInstanceUID=study.study_uid, SeriesInstanceUID=study.series_uid,
                SOPInstanceUID=original.SOPInstanceUID),
                [(original.SOPClassUID, "1.2.840.10008.1.2.1")])
            assert status.Status == 0x0000, path
            assert len(received) == 1 and received[0] == original, path
        check = subprocess.run([sys.executable, "-m", "pacs.cli", "check"],
                               env=server.full_env(), capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "0 missing blob(s), 0 corrupt, 0 orphan blob(s)" in check.stdout
    finally:
        server.stop()
        if storescu.poll() is None:
            storescu.kill()
