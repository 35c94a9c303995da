#!/usr/bin/env bash
# One command for a fresh machine: set up, fetch the public DICOM corpus, run the tests.
# Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database "test"); S3 is emulated by moto.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Test peers from Debian: Orthanc with its DICOMweb plugin (a real DICOMweb client) and
# Chromium (browser tests of the viewer, driven by Playwright).
want_apt=()
command -v Orthanc >/dev/null 2>&1 && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
  || want_apt+=(orthanc orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || want_apt+=(chromium)
if ((${#want_apt[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "test: installing ${want_apt[*]} with apt-get" >&2
  $SUDO apt-get update -qq
  # The orthanc package would start a system Orthanc: a policy-rc.d keeps it (and its ports)
  # off.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want_apt[@]}" >/dev/null
  [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

shared="${PACS_SHARED_DIR:-../shared}"
[ -d "$shared/corpus" ] || shared=/work/shared
if [ ! -d .corpus-cache/files ]; then
  bash "$shared/corpus/fetch.sh" .corpus-cache
fi

mkdir -p test-output
exec .venv/bin/python -m pytest "$@"
