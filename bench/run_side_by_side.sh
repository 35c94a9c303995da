#!/usr/bin/env bash
# Side-by-side passes: Orthanc (Debian package, tuned with TCP_NODELAY=1) and this server, same
# data, same DIMSE and DICOMweb tests; then the ratio table. Usage:
#   bench/run_side_by_side.sh [TAG]              (results in .bench-out/TAG-*.json|md)
#   ROUNDS=3 bench/run_side_by_side.sh TAG       (alternating rounds, pooled per server)
# With ROUNDS > 1 the two servers take turns, round after round (Orthanc first in odd rounds,
# this server first in even ones), each round's results kept as TAG-rN-*; each server's rounds
# are then pooled with the harness's merge.py (median of all samples) before the ratios. This
# machine's speed drifts by tens of per cent within minutes, so one pass of each, minutes
# apart, is not enough for a ratio claim (../shared/bench/README.md).
# BENCH_TESTS selects tests (default: all), BENCH_ARGS passes more options to bench.py.
# Needs: apt-get install -y dcmtk orthanc orthanc-dicomweb; .bench-venv and .bench-data as in
# ../shared/bench/README.md. Only loopback traffic.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-run}"
ROUNDS="${ROUNDS:-1}"
B="${PACS_SHARED_DIR:-../shared}/bench"
PY=.bench-venv/bin/python
PACS_HOME="${PACS_BENCH_HOME:-${TMPDIR:-/tmp}/bench-pacs}"  # as bench/pacs_ctl.sh
TESTS="${BENCH_TESTS:-echo,ingest_ct,ingest_many,find,qido,wado,move,get,stow}"
mkdir -p .bench-out

orthanc_pass() {  # orthanc_pass OUT_PREFIX
  ORTHANC_TCP_NODELAY=1 "$B/orthanc/orthanc_ctl.sh" start
  $PY "$B/bench.py" --label orthanc --dimse-host 127.0.0.1 --dimse-port 14242 --aet ORTHANC \
    --calling-aet BENCHSCU --move-dest-ae BENCHSCU --move-dest-port 14243 \
    --dicomweb-url http://127.0.0.1:18042/dicom-web --wado-uri-url http://127.0.0.1:18042/wado \
    --storescp-preload "${TMPDIR:-/tmp}/bench-orthanc/bind_loopback.so" \
    --wipe-cmd "ORTHANC_TCP_NODELAY=1 $B/orthanc/orthanc_ctl.sh wipe" \
    --server-pidfile "${TMPDIR:-/tmp}/bench-orthanc/orthanc.pid" \
    --tests "$TESTS" ${BENCH_ARGS:-} \
    --out-md "$1-orthanc.md" --out-json "$1-orthanc.json"
  "$B/orthanc/orthanc_ctl.sh" stop
}

pacs_pass() {  # pacs_pass OUT_PREFIX
  bench/pacs_ctl.sh wipe
  $PY "$B/bench.py" --label pacs --dimse-host 127.0.0.1 --dimse-port 14252 --aet PACS \
    --calling-aet BENCHSCU --move-dest-ae BENCHSCU --move-dest-port 14243 \
    --dicomweb-url http://127.0.0.1:18052/dicomweb --wado-uri-url http://127.0.0.1:18052/wado \
    --storescp-preload "${TMPDIR:-/tmp}/bench-orthanc/bind_loopback.so" \
    --wipe-cmd "bench/pacs_ctl.sh wipe" --server-pidfile "$PACS_HOME/pacs.pid" \
    --storage-dir "$PACS_HOME/data" --versions-cmd "bench/pacs_ctl.sh versions" \
    --tests "$TESTS" ${BENCH_ARGS:-} \
    --out-md "$1-pacs.md" --out-json "$1-pacs.json"
  bench/pacs_ctl.sh stop
}

if [ "$ROUNDS" -le 1 ]; then
  orthanc_pass ".bench-out/$TAG"
  pacs_pass ".bench-out/$TAG"
else
  orthanc_runs=() pacs_runs=()
  for ((r = 1; r <= ROUNDS; r++)); do
    prefix=".bench-out/$TAG-r$r"
    if ((r % 2)); then
      orthanc_pass "$prefix"; pacs_pass "$prefix"
    else
      pacs_pass "$prefix"; orthanc_pass "$prefix"
    fi
    orthanc_runs+=("$prefix-orthanc.json") pacs_runs+=("$prefix-pacs.json")
  done
  $PY "$B/merge.py" --label "orthanc ($ROUNDS alternating rounds)" "${orthanc_runs[@]}" \
    --out-md ".bench-out/$TAG-orthanc.md" --out-json ".bench-out/$TAG-orthanc.json" >/dev/null
  $PY "$B/merge.py" --label "pacs ($ROUNDS alternating rounds)" "${pacs_runs[@]}" \
    --out-md ".bench-out/$TAG-pacs.md" --out-json ".bench-out/$TAG-pacs.json" >/dev/null
fi

$PY "$B/compare.py" ".bench-out/$TAG-orthanc.json" ".bench-out/$TAG-pacs.json" \
  --out ".bench-out/$TAG-ratios.md"
cat ".bench-out/$TAG-ratios.md"
