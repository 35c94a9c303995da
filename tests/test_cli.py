"""The `pacs` command: import, check, migrate, and refusing bad settings."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.factory import Spec, instance


def pacs(*args: str, data_dir, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PACS_DATA_DIR": str(data_dir), **env}
    return subprocess.run([sys.executable, "-m", "pacs.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=600)


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


def test_migrate_creates_the_schema(tmp_path):
    result = pacs("migrate", data_dir=tmp_path / "data")
    assert result.returncode == 0 and "up to date" in result.stdout
    assert (tmp_path / "data" / "index.sqlite").exists()
