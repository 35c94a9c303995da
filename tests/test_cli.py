"""The `pacs` command: import, check, migrate, and refusing bad settings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from storage.blobs import open_blob_store
from tests.conftest import free_port, s3_url
from tests.factory import Spec, instance


def pacs(*args: str, data_dir, as_user: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run `pacs`; ``as_user`` drops root's right to read any file, so mode bits apply."""
    full_env = {**os.environ, "PACS_DATA_DIR": str(data_dir), **env}
    prefix = _without_root_file_access() if as_user else []
    return subprocess.run([*prefix, sys.executable, "-m", "pacs.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=600)


def _without_root_file_access() -> list[str]:
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv to drop the right to read any file")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_import_stores_counts_duplicates_and_explains_rejections(tmp_path, corpus):
    source = tmp_path / "in"
    (source / "nested").mkdir(parents=True)
    study = Spec()
    for n in range(3):
        (source / "nested" / f"{n}.dcm").write_bytes(
            instance(study_uid=study.study_uid, series_uid=study.series_uid))
    (source / "notes.txt").write_text("not an image")
    (source / "broken.dcm").write_bytes(instance()[:-50])
    ts_folder = corpus / "github-neurolabusc+dcm_qa_ts" / "In"

    first = pacs("import", str(source), str(ts_folder), data_dir=tmp_path / "data")
    assert first.returncode == 0, first.stderr
    assert "14 file(s): 12 stored, 0 duplicate (already archived), 2 rejected, 0 failed" \
        in first.stdout
    assert "notes.txt: this is not a DICOM file" in first.stdout
    assert "broken.dcm: the file is truncated" in first.stdout

    again = pacs("import", str(source), data_dir=tmp_path / "data")
    assert "5 file(s): 0 stored, 3 duplicate" in again.stdout

    check = pacs("check", data_dir=tmp_path / "data")
    assert check.returncode == 0, check.stdout
    assert "12 instance(s) checked: 0 missing blob(s), 0 corrupt, 0 orphan blob(s)" \
        in check.stdout


def test_check_reports_a_missing_blob_and_fails(tmp_path):
    source = tmp_path / "one.dcm"
    source.write_bytes(instance())
    assert pacs("import", str(source), data_dir=tmp_path / "data").returncode == 0
    blob = next((tmp_path / "data" / "blobs").rglob("*.dcm"))
    blob.unlink()
    check = pacs("check", "--quick", data_dir=tmp_path / "data")
    assert check.returncode == 1
    assert "1 missing blob(s)" in check.stdout


def test_import_of_a_missing_path_and_bad_settings_are_clear_errors(tmp_path):
    missing = pacs("import", str(tmp_path / "nope"), data_dir=tmp_path / "data")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    bad = pacs("check", data_dir=tmp_path / "data", PACS_DUPLICATE_POLICY="overwrite")
    assert bad.returncode == 2 and "duplicate_policy" in bad.stderr


def test_serve_with_a_bad_list_entry_in_its_config_file_exits_2_naming_it(tmp_path):
    """A trailing slash never matches the browser's Origin: refused at start, not at use."""
    config = tmp_path / "pacs.toml"
    config.write_text('cors_allowed_origins = ["https://emr.hospital.vn/"]\n')
    result = pacs("serve", "--config", str(config), data_dir=tmp_path / "data",
                  PACS_HTTP_PORT=str(free_port()), PACS_HL7_PORT="0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pacs: ")
    assert "cors_allowed_origins: 'https://emr.hospital.vn/' ends in '/'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_migrate_creates_the_schema(tmp_path):
    result = pacs("migrate", data_dir=tmp_path / "data")
    assert result.returncode == 0 and "up to date" in result.stdout
    assert (tmp_path / "data" / "index.sqlite").exists()


def _damaged_meta_vr(data: bytes) -> bytes:
    """A Part 10 file whose (0002,0002) VR reads 'Uj': pydicom raises NotImplementedError."""
    at = data.index(b"\x02\x00\x02\x00UI", 128)
    return data[:at + 4] + b"Uj" + data[at + 6:]


def test_import_goes_on_past_a_file_the_parser_chokes_on_without_quoting_it(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a-bad.dcm").write_bytes(_damaged_meta_vr(instance()))
    (source / "b-good.dcm").write_bytes(instance())

    result = pacs("import", str(source), data_dir=tmp_path / "data")

    assert result.returncode == 0, result.stderr
    assert "2 file(s): 1 stored, 0 duplicate (already archived), 1 rejected" in result.stdout
    bad_line = next(line for line in result.stdout.splitlines() if "a-bad.dcm: " in line)
    assert "NotImplementedError" in bad_line
    assert "Traceback" not in result.stderr and "Nguy" not in result.stdout


def test_an_unexpected_error_on_one_file_is_a_rejection_that_does_not_quote_the_error():
    from pacs.cli import _store_file

    class ParserBug:
        def store(self, data):
            raise RecursionError("while decoding 'Nguyễn^Văn An'")

    path, outcome, reason = _store_file(ParserBug(), Path(__file__), "")

    assert outcome == "rejected"
    assert reason == "could not be read as DICOM (unexpected RecursionError in the parser)"


def test_import_skips_a_fifo_instead_of_waiting_on_it(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.dcm").write_bytes(instance())
    os.mkfifo(source / "pipe")

    result = pacs("import", str(source), data_dir=tmp_path / "data")

    assert "2 file(s): 1 stored, 0 duplicate (already archived), 1 rejected" in result.stdout
    assert "pipe: not a regular file" in result.stdout


def test_import_follows_a_symlinked_folder_but_not_a_link_back_up(tmp_path):
    cd = tmp_path / "cd"
    cd.mkdir()
    (cd / "1.dcm").write_bytes(instance())
    source = tmp_path / "in"
    source.mkdir()
    (source / "0.dcm").write_bytes(instance())
    (source / "linked-cd").symlink_to(cd)
    (source / "loop").symlink_to("..")

    result = pacs("import", str(source), data_dir=tmp_path / "data")

    assert "3 file(s): 2 stored, 0 duplicate (already archived), 1 rejected" in result.stdout
    assert "loop: a link to a folder above it, not followed" in result.stdout


def test_import_reports_a_folder_it_cannot_read(tmp_path):
    source = tmp_path / "in"
    (source / "locked").mkdir(parents=True)
    (source / "locked" / "x.dcm").write_bytes(instance())
    (source / "ok.dcm").write_bytes(instance())
    (source / "locked").chmod(0)
    try:
        result = pacs("import", str(source), data_dir=tmp_path / "data", as_user=True)
    finally:
        (source / "locked").chmod(0o755)

    assert "1 stored, 0 duplicate (already archived), 1 rejected" in result.stdout
    assert "locked: cannot read the folder: Permission denied" in result.stdout


def test_ctrl_c_during_import_prints_the_partial_summary_and_exits_130(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for n in range(400):
        (source / f"{n:03}.dcm").write_bytes(instance())
    env = {**os.environ, "PACS_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "pacs.cli", "import", "--jobs", "1",
                             str(source)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    blobs = tmp_path / "data" / "blobs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and \
            sum(1 for _ in blobs.rglob("*.dcm")) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert "400 file(s):" in out and "interrupted:" in out
    assert "Traceback" not in err


def _archive_with_one_instance(tmp_path):
    source = tmp_path / "one.dcm"
    source.write_bytes(instance())
    assert pacs("import", str(source), data_dir=tmp_path / "data").returncode == 0
    return tmp_path / "data", next((tmp_path / "data" / "blobs").rglob("*.dcm"))


def test_check_reports_an_unreadable_blob_and_goes_on(tmp_path):
    data, blob = _archive_with_one_instance(tmp_path)
    blob.chmod(0)

    check = pacs("check", data_dir=data, as_user=True)

    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "1 instance(s) checked: 0 missing blob(s), 0 corrupt, 0 orphan blob(s), " \
        "1 unreadable" in check.stdout
    assert "cannot read the blob of instance" in check.stdout
    assert "Permission denied" in check.stdout


def test_check_reports_an_unreadable_blob_folder_and_goes_on(tmp_path):
    data, blob = _archive_with_one_instance(tmp_path)
    blob.parent.chmod(0)
    try:
        check = pacs("check", "--quick", data_dir=data, as_user=True)
    finally:
        blob.parent.chmod(0o755)

    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "cannot read the blob folder" in check.stdout


def test_check_says_what_reconciliation_will_do_with_each_orphan(tmp_path):
    data, blob = _archive_with_one_instance(tmp_path)
    shutil.copy(blob, blob.with_name("copy.0123456789ab.dcm"))
    (data / "blobs" / "garbage.dcm").write_bytes(b"not an image")
    (data / "blobs" / "9.9").mkdir()
    (data / "blobs" / "9.9" / "lost.dcm").write_bytes(instance())

    check = pacs("check", data_dir=data)

    lines = {line.split(" (not in the index): ")[0].split("/")[-1]: line
             for line in check.stdout.splitlines() if "orphan blob " in line}
    assert "a copy of an archived instance" in lines["copy.0123456789ab.dcm"]
    assert "cannot be read as an instance" in lines["  orphan blob garbage.dcm"]
    assert "`pacs serve` re-indexes it at start-up" in lines["lost.dcm"]
    assert "re-indexes" not in lines["copy.0123456789ab.dcm"] + lines["  orphan blob garbage.dcm"]


def test_start_up_reconciliation_skips_an_orphan_it_cannot_parse_and_indexes_the_rest(tmp_path):
    from storage.archive import open_archive

    data = tmp_path / "data"
    assert pacs("migrate", data_dir=data).returncode == 0
    (data / "blobs" / "1.1").mkdir(parents=True)
    (data / "blobs" / "1.1" / "bad.dcm").write_bytes(_damaged_meta_vr(instance()))
    (data / "blobs" / "2.2").mkdir()
    (data / "blobs" / "2.2" / "good.dcm").write_bytes(instance())
    archive = open_archive(f"sqlite:///{data / 'index.sqlite'}", f"file://{data / 'blobs'}")
    try:
        report = archive.reconcile()
    finally:
        archive.close()

    assert report.reindexed == 1
    assert list(report.unreadable) == ["1.1/bad.dcm"]
    assert "NotImplementedError" in report.unreadable["1.1/bad.dcm"]


def test_check_of_a_mistyped_data_dir_refuses_and_creates_nothing(tmp_path):
    check = pacs("check", data_dir=tmp_path / "typo")

    assert check.returncode == 2
    assert "PACS_DATA_DIR: no archive index at" in check.stderr
    assert len(check.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()


def test_check_of_a_mistyped_database_or_bucket_refuses_and_creates_nothing(
        tmp_path, fresh_postgres_url, s3_endpoint):
    """Opening the archive makes its tables and its bucket: a check of a mistyped PostgreSQL
    schema or S3 bucket reported an empty archive, clean, and left one behind."""
    database = fresh_postgres_url.replace("postgresql://", "postgresql+psycopg://")
    no_schema = pacs("check", data_dir=tmp_path / "data", PACS_DATABASE_URL=database,
                     PACS_STORAGE_URL=s3_url(s3_endpoint, "pacs-check-real"))
    assert no_schema.returncode == 2, no_schema.stderr
    assert "PACS_DATABASE_URL: the database holds no archive index" in no_schema.stderr
    engine = sa.create_engine(database)
    try:
        assert not sa.inspect(engine).has_table("alembic_version")
    finally:
        engine.dispose()

    assert pacs("migrate", data_dir=tmp_path / "data", PACS_DATABASE_URL=database).returncode == 0
    typo = s3_url(s3_endpoint, "pacs-check-typo")
    no_bucket = pacs("check", data_dir=tmp_path / "data", PACS_DATABASE_URL=database,
                     PACS_STORAGE_URL=typo)
    assert no_bucket.returncode == 2, no_bucket.stderr
    assert "PACS_STORAGE_URL: no S3 bucket pacs-check-typo" in no_bucket.stderr
    assert httpx.head(f"{s3_endpoint}/pacs-check-typo").status_code == 404  # not made

    real = s3_url(s3_endpoint, "pacs-check-real")
    open_blob_store(real)  # the archive's bucket, as pacs serve makes it
    checked = pacs("check", data_dir=tmp_path / "data", PACS_DATABASE_URL=database,
                   PACS_STORAGE_URL=real)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("0 instance(s) checked")


def test_share_with_an_unwritable_qr_path_creates_no_share(tmp_path):
    study = Spec()
    source = tmp_path / "one.dcm"
    source.write_bytes(instance(study_uid=study.study_uid))
    data = tmp_path / "data"
    assert pacs("import", str(source), data_dir=data).returncode == 0

    bad_folder = pacs("share", study.study_uid, "--qr", str(tmp_path / "nope" / "qr.png"),
                      data_dir=data)
    bad_type = pacs("share", study.study_uid, "--qr", str(tmp_path / "qr.gif"), data_dir=data)
    good = pacs("share", study.study_uid, "--qr", str(tmp_path / "qr.svg"), data_dir=data)

    assert bad_folder.returncode == 2 and "does not exist; no share created" in bad_folder.stderr
    assert bad_type.returncode == 2 and "must end in .png or .svg" in bad_type.stderr
    assert good.returncode == 0 and good.stdout.startswith("share 1:")  # the first one made
    assert (tmp_path / "qr.svg").exists()


def test_an_index_or_blob_store_that_cannot_be_opened_is_one_line_naming_the_setting(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "index.sqlite").write_bytes(b"not a database" * 100)

    cases = [
        (pacs("migrate", data_dir=tmp_path / "d1", PACS_DATABASE_URL="garbage"),
         "PACS_DATABASE_URL"),
        (pacs("migrate", data_dir=tmp_path / "d2", PACS_STORAGE_URL="ftp://x/y"),
         "PACS_STORAGE_URL"),
        (pacs("import", str(a_file), data_dir=a_file), "is a file, not a folder"),
        (pacs("migrate", data_dir=corrupt), "PACS_DATA_DIR (data_dir): cannot open the index"),
    ]

    for result, setting in cases:
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("pacs: ") and setting in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("taken_setting", ["PACS_DICOM_PORT", "PACS_HTTP_PORT",
                                           "PACS_HL7_PORT"])
def test_serve_on_a_port_in_use_names_the_setting_in_one_line_and_exits_2(tmp_path,
                                                                           taken_setting):
    """Another server on one of the ports (a second pacs serve, Orthanc on 11112): a traceback
    ending in 'Address already in use' was all the operator got, or for the HTTP port
    uvicorn's line and exit 1, for the HL7 port a line blaming the DICOM or HTTP port."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = {"PACS_DICOM_PORT": str(free_port()), "PACS_HTTP_PORT": str(free_port()),
             "PACS_HL7_PORT": str(free_port()), taken_setting: str(taken.getsockname()[1])}
    try:
        result = pacs("serve", data_dir=tmp_path / "data", **ports, **{
            "PACS_DICOM_HOST": "127.0.0.1", "PACS_HL7_HOST": "127.0.0.1",
            "PACS_DICOM_WORKERS": "2", "PACS_RECONCILE_ON_START": "false"})
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    host_setting = taken_setting.replace("PORT", "HOST")
    assert line == (f"pacs: {host_setting}/{taken_setting} (127.0.0.1:{ports[taken_setting]}): "
                    "the address is in use (another pacs serve, or Orthanc?)")


def test_serve_on_an_address_of_another_machine_names_the_setting(tmp_path):
    """A mistyped listen address (not one of this machine's) is one line, not a traceback."""
    result = pacs("serve", data_dir=tmp_path / "data", PACS_HTTP_HOST="192.0.2.1",
                  PACS_HTTP_PORT=str(free_port()), PACS_HL7_PORT="0",
                  PACS_DICOM_HOST="127.0.0.1", PACS_DICOM_PORT=str(free_port()))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pacs: PACS_HTTP_HOST/PACS_HTTP_PORT (192.0.2.1:")
    assert "cannot listen there" in result.stderr and "Traceback" not in result.stderr


