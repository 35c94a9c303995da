#!/usr/bin/env bash
# One side-by-side pass: Orthanc (Debian package, tuned with TCP_NODELAY=1) then this server,
# same data, same DIMSE and DICOMweb tests; then the ratio table. Usage:
#   bench/run_side_by_side.sh [TAG]      (results in .bench-out/TAG-*.json|md)
# Needs: apt-get install -y dcmtk orthanc orthanc-dicomweb; .bench-venv and .bench-data as in
# ../shared/bench/README.md. Only loopback traffic.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-run}"
B="${PACS_SHARED_DIR:-../shared}/bench"
PY=.bench-venv/bin/python
TESTS="${BENCH_TESTS:-echo,ingest_ct,ingest_many,find,qido,wado,move,get,stow}"
mkdir -p .bench-out

ORTHANC_TCP_NODELAY=1 "$B/orthanc/orthanc_ctl.sh" start
$PY "$B/bench.py" --label orthanc --dimse-host 127.0.0.1 --dimse-port 14242 --aet ORTHANC \
  --calling-aet BENCHSCU --move-dest-ae BENCHSCU --move-dest-port 14243 \
  --dicomweb-url http://127.0.0.1:18042/dicom-web --wado-uri-url http://127.0.0.1:18042/wado \
  --storescp-preload "${TMPDIR:-/tmp}/bench-orthanc/bind_loopback.so" \
  --wipe-cmd "ORTHANC_TCP_NODELAY=1 $B/orthanc/orthanc_ctl.sh wipe" \
  --server-pidfile "${TMPDIR:-/tmp}/bench-orthanc/orthanc.pid" \
  --tests "$TESTS" ${BENCH_ARGS:-} \
  --out-md ".bench-out/$TAG-orthanc.md" --out-json ".bench-out/$TAG-orthanc.json"
"$B/orthanc/orthanc_ctl.sh" stop

bench/pacs_ctl.sh wipe
$PY "$B/bench.py" --label pacs --dimse-host 127.0.0.1 --dimse-port 14252 --aet PACS \
  --calling-aet BENCHSCU --move-dest-ae BENCHSCU --move-dest-port 14243 \
  --dicomweb-url http://127.0.0.1:18052/dicomweb --wado-uri-url http://127.0.0.1:18052/wado \
  --storescp-preload "${TMPDIR:-/tmp}/bench-orthanc/bind_loopback.so" \
  --wipe-cmd "bench/pacs_ctl.sh wipe" --server-pidfile .bench-pacs/pacs.pid \
  --storage-dir .bench-pacs/data --versions-cmd "bench/pacs_ctl.sh versions" \
  --tests "$TESTS" ${BENCH_ARGS:-} \
  --out-md ".bench-out/$TAG-pacs.md" --out-json ".bench-out/$TAG-pacs.json"
bench/pacs_ctl.sh stop

$PY "$B/compare.py" ".bench-out/$TAG-orthanc.json" ".bench-out/$TAG-pacs.json" \
  --out ".bench-out/$TAG-ratios.md"
cat ".bench-out/$TAG-ratios.md"
