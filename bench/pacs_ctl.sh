#!/usr/bin/env bash
# pacs_ctl.sh - run this server for the shared benchmark harness (../shared/bench).
#
#   bench/pacs_ctl.sh start | stop | wipe | status | versions
#
# Loopback only: DICOM 127.0.0.1:14252 (AE PACS), HTTP 127.0.0.1:18052. Data (SQLite + blobs)
# in $PACS_BENCH_HOME (default ${TMPDIR:-/tmp}/bench-pacs, beside the harness's Orthanc: where a
# folder sits on the disk changes what creating a file costs, 0.03 to 0.5 ms of kernel CPU per
# file on this project's machines). C-MOVE destination BENCHSCU is the harness's
# storescp on 127.0.0.1:14243. Extra PACS_* variables in the environment are passed through
# (e.g. PACS_DATABASE_URL to bench against PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
H="${PACS_BENCH_HOME:-${TMPDIR:-/tmp}/bench-pacs}"
PIDFILE="$H/pacs.pid"
mkdir -p "$H"

export PACS_DATA_DIR="$H/data" PACS_AE_TITLE=PACS PACS_DICOM_HOST=127.0.0.1 \
  PACS_DICOM_PORT="${PACS_BENCH_DICOM_PORT:-14252}" PACS_HTTP_HOST=127.0.0.1 \
  PACS_HTTP_PORT="${PACS_BENCH_HTTP_PORT:-18052}" PACS_PEERS="BENCHSCU@127.0.0.1:14243" \
  PACS_HL7_PORT=0

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

wait_ready() {
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PACS_HTTP_PORT/healthz" | grep -q '"reconcile":"done"'; then
      return 0
    fi
    sleep 0.1
  done
  echo "pacs did not become ready; log: $H/pacs.log" >&2
  return 1
}

start() {
  running && { echo "already running (pid $(cat "$PIDFILE"))"; return 0; }
  nohup .venv/bin/pacs serve >>"$H/pacs.log" 2>&1 &
  echo $! >"$PIDFILE"
  wait_ready
  echo "started pid $(cat "$PIDFILE") (dicom 127.0.0.1:$PACS_DICOM_PORT, http 127.0.0.1:$PACS_HTTP_PORT)"
}

stop() {
  if running; then
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 1 100); do running || break; sleep 0.1; done
    running && kill -9 "$(cat "$PIDFILE")"
    echo "stopped pid $(cat "$PIDFILE")"
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  wipe) stop; rm -rf "$H/data"; start ;;
  status) running && echo "running pid $(cat "$PIDFILE")" || echo "stopped" ;;
  versions)
    .venv/bin/python -c 'import pacs, pydicom, pynetdicom, sqlalchemy, sys; print(f"pacs={pacs.__version__}\npython={sys.version.split()[0]}\npydicom={pydicom.__version__}\npynetdicom={pynetdicom.__version__}\nsqlalchemy={sqlalchemy.__version__}")' ;;
  *) echo "usage: $0 start|stop|wipe|status|versions" >&2; exit 2 ;;
esac
