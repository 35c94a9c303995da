"""Time the DICOM ZIP export (DICOMDIR + files) of one study of N small instances.

    .venv/bin/python bench/export_dicomdir.py 1000 3000

Builds a throw-away archive under .bench-pacs/ (SQLite + files) per size, stores N 8x8 CT
slices of one series (tests.factory), then times ``viewer.export.write_dicom_zip`` into
memory. Prints one line per size: seconds and ZIP bytes.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.archive import open_archive  # noqa: E402
from tests.factory import Spec, instance  # noqa: E402
from viewer.export import write_dicom_zip  # noqa: E402


def main(sizes: list[int]) -> None:
    home = Path(__file__).resolve().parents[1] / ".bench-pacs"
    home.mkdir(exist_ok=True)
    for size in sizes:
        work = Path(tempfile.mkdtemp(dir=home, prefix="export-"))
        try:
            archive = open_archive(f"sqlite:///{work}/index.sqlite", f"file://{work}/blobs")
            study = Spec()
            for number in range(1, size + 1):
                archive.store(instance(Spec(study_uid=study.study_uid,
                                            series_uid=study.series_uid,
                                            instance_number=number)))
            out = io.BytesIO()
            started = time.perf_counter()
            summary = write_dicom_zip(archive, study.study_uid, out)
            elapsed = time.perf_counter() - started
            archive.close()
            print(f"{summary.files} instances: {elapsed:.2f} s, ZIP {len(out.getvalue())} bytes")
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1000])
