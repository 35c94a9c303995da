#!/usr/bin/env bash
# One command for a fresh machine: set up, fetch the public DICOM corpus, run the tests.
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database "test"); S3 is emulated by moto.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

shared="${PACS_SHARED_DIR:-../shared}"
[ -d "$shared/corpus" ] || shared=/work/shared
if [ ! -d .corpus-cache/files ]; then
  bash "$shared/corpus/fetch.sh" .corpus-cache
fi

mkdir -p test-output
exec .venv/bin/python -m pytest "$@"
