#!/usr/bin/env bash
# A/B of C-STORE ingest between two git revisions of this server, runs alternating (A, B, B, A,
# A, B, ...) so that the machine's drift falls on both. Usage:
#   bench/ab_ingest.sh REV_A REV_B [ROUNDS=3] [FILES=2000] [ASSOCS=1]
# REV may be "work" for the working tree. Sends the first FILES files of .bench-data/many (the
# harness's study order) with ASSOCS storescu processes (files split into contiguous parts) to a
# freshly wiped server on bench/pacs_ctl.sh's ports; prints each run's wall time, then the
# medians. Each revision runs from a worktree under .bench-ab/ on PYTHONPATH, with this
# checkout's .venv. Only loopback traffic.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,9p "$0" >&2; exit 2; }
REV_A=$1 REV_B=$2 ROUNDS=${3:-3} FILES=${4:-2000} ASSOCS=${5:-1}
DATA=.bench-data/many
[ -f "$DATA/manifest.json" ] || { echo "no $DATA (see ../shared/bench/README.md)" >&2; exit 1; }

source_dir() {  # the folder a revision runs from
  if [ "$1" = work ]; then echo "$PWD"; return; fi
  local dir=".bench-ab/$(git rev-parse --short "$1")"
  if [ ! -d "$dir" ]; then git worktree add -q --detach "$dir" "$1"; fi
  (cd "$dir" && pwd)
}
SRC_A=$(source_dir "$REV_A") SRC_B=$(source_dir "$REV_B")
# The .venv's editable install of this checkout would win over PYTHONPATH: drop its finder
# (sitecustomize runs after the .pth files that install it, in workers too).
mkdir -p .bench-ab/site
cat >.bench-ab/site/sitecustomize.py <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
PY

mapfile -t files < <(.venv/bin/python - "$DATA" "$FILES" <<'EOF'
import json, sys
manifest = json.load(open(f"{sys.argv[1]}/manifest.json"))
files = [f for study in manifest["studies"] for f in study["files"]][:int(sys.argv[2])]
print("\n".join(files))
EOF
)
per=$(( (${#files[@]} + ASSOCS - 1) / ASSOCS ))

run() {  # run SRC -> wall seconds
  PYTHONPATH="$1:$PWD/.bench-ab/site" bench/pacs_ctl.sh wipe >/dev/null
  local start end pids=()
  start=$(date +%s.%N)
  for ((i = 0; i < ASSOCS; i++)); do
    (cd "$DATA" && TCP_NODELAY=1 storescu -aet BENCHSCU -aec PACS -to 30 -ta 30 -td 300 127.0.0.1 "${PACS_BENCH_DICOM_PORT:-14252}" \
      "${files[@]:i*per:per}" >/dev/null) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  end=$(date +%s.%N)
  bench/pacs_ctl.sh stop >/dev/null
  echo "$end - $start" | bc
}

declare -a times_a=() times_b=()
for ((r = 0; r < ROUNDS; r++)); do
  order=(A B); ((r % 2)) && order=(B A)
  for side in "${order[@]}"; do
    if [ "$side" = A ]; then t=$(run "$SRC_A"); times_a+=("$t"); else t=$(run "$SRC_B"); times_b+=("$t"); fi
    echo "round $((r + 1)) $side: ${t} s"
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo "A ($REV_A) median $(median "${times_a[@]}") s; B ($REV_B) median $(median "${times_b[@]}") s" \
  "($ROUNDS runs each, ${#files[@]} files, $ASSOCS association(s))"
