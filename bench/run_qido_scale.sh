#!/usr/bin/env bash
# QIDO-RS and metadata latency as the archive grows: the harness's `qido` and `wado` tests with
# the standard data (CT + 2,000 studies), then again after 48,000 more one-instance studies
# (50,000 in all), for Orthanc and for this server. Usage:
#   bench/run_qido_scale.sh [TAG]        (results in .bench-out/TAG-{orthanc,pacs}-{2k,50k}.*)
# Needs what run_side_by_side.sh needs; generates .bench-data/extra48k once (~90 s).
# Loading 48,000 instances takes a few minutes per server. Only loopback traffic.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-scale}"
B="${PACS_SHARED_DIR:-../shared}/bench"
PY=.bench-venv/bin/python
PACS_HOME="${PACS_BENCH_HOME:-${TMPDIR:-/tmp}/bench-pacs}"  # as bench/pacs_ctl.sh
EXTRA=.bench-data/extra48k
mkdir -p .bench-out
[ -f "$EXTRA/manifest.json" ] || \
  $PY "$B/gen_dataset.py" many --out "$EXTRA" --studies 48000 --instances 1 --seed 4242

load_extra() {  # storescu the extra studies over 2 associations
  local port=$1 aet=$2
  find "$EXTRA" -name '*.dcm' | sort > .bench-out/extra-files.txt
  split -n l/2 .bench-out/extra-files.txt .bench-out/extra-part-
  for part in .bench-out/extra-part-*; do
    TCP_NODELAY=1 xargs -a "$part" storescu -xs -aec "$aet" -aet BENCHSCU 127.0.0.1 "$port" &
  done
  wait
  rm -f .bench-out/extra-part-*
}

run() {  # label dimse-port aet dicomweb-url pidfile wipe-cmd size
  $PY "$B/bench.py" --label "$1" --dimse-host 127.0.0.1 --dimse-port "$2" --aet "$3" \
    --calling-aet BENCHSCU --dicomweb-url "$4" --server-pidfile "$5" --wipe-cmd "$6" \
    --tests qido,wado --out-md ".bench-out/$TAG-$1-$7.md" --out-json ".bench-out/$TAG-$1-$7.json"
}

ORTHANC_TCP_NODELAY=1 "$B/orthanc/orthanc_ctl.sh" start
ORTHANC_TCP_NODELAY=1 "$B/orthanc/orthanc_ctl.sh" wipe
O_ARGS=(14242 ORTHANC http://127.0.0.1:18042/dicom-web "${TMPDIR:-/tmp}/bench-orthanc/orthanc.pid"
        "ORTHANC_TCP_NODELAY=1 $B/orthanc/orthanc_ctl.sh wipe")
run orthanc "${O_ARGS[@]}" 2k
load_extra 14242 ORTHANC
run orthanc "${O_ARGS[@]}" 50k
"$B/orthanc/orthanc_ctl.sh" stop

bench/pacs_ctl.sh wipe
P_ARGS=(14252 PACS http://127.0.0.1:18052/dicomweb "$PACS_HOME/pacs.pid" "bench/pacs_ctl.sh wipe")
run pacs "${P_ARGS[@]}" 2k
load_extra 14252 PACS
run pacs "${P_ARGS[@]}" 50k
bench/pacs_ctl.sh stop

for size in 2k 50k; do
  $PY "$B/compare.py" ".bench-out/$TAG-orthanc-$size.json" ".bench-out/$TAG-pacs-$size.json" \
    --out ".bench-out/$TAG-ratios-$size.md"
done
cat ".bench-out/$TAG-ratios-2k.md" ".bench-out/$TAG-ratios-50k.md"
