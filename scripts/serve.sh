#!/usr/bin/env bash
# One command for a fresh machine: set up, then run the server on the embedded defaults
# (SQLite index and blobs in ./pacs-data, DICOM on port 11112 AE PACS, HTTP on 127.0.0.1:8042).
# Settings come from PACS_* environment variables or `--config FILE` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PACS_EXTRAS=test bash scripts/setup.sh
exec .venv/bin/pacs serve "$@"
