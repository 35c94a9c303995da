#!/usr/bin/env bash
# Sets up what the server and its tests need on a fresh Debian/Ubuntu machine:
# DCMTK (DICOM command-line tools used by the tests and handy for operators), the DejaVu
# fonts (film sheets), a Python virtual environment in .venv with this package installed,
# and the OHIF Viewer in .ohif/
# (fetched with npm). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

want_apt=()
command -v storescu >/dev/null 2>&1 || want_apt+=(dcmtk)
command -v python3 >/dev/null 2>&1 || want_apt+=(python3 python3-venv)
command -v npm >/dev/null 2>&1 || want_apt+=(npm)  # fetches the OHIF Viewer
# Film sheets set Vietnamese text in DejaVu Sans.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || want_apt+=(fonts-dejavu-core)
if ((${#want_apt[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${want_apt[*]} with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${PACS_EXTRAS:-test}]"

# The OHIF Viewer served at /ohif/ (npm pack of the pinned @ohif/app; a no-op once installed).
.venv/bin/pacs install-ohif
