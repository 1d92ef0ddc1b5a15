#!/usr/bin/env bash
# Load: apex run with N generations (4 conditions x CONTEXTS x REPLICATES)
# against a separate apex simulate, --concurrency 256, pacing off; peak RSS
# of the run, and the wall time of `apex sql` queries made every 0.5 s while
# it writes (process start included).
#
#   scripts/load_bench.sh [REPLICATES] [CONTEXTS] [TOKENS]
#   scripts/load_bench.sh 25 500 1000      # 50,000 generations
#   scripts/load_bench.sh 5 500 1000       # 10,000 generations
set -euo pipefail
cd "$(dirname "$0")/.."
replicates=${1:-25}
contexts=${2:-500}
tokens=${3:-1000}
. scripts/simulator.sh
bin=$(realpath "${APEX_BIN:-$(release_apex)}")
work=$(mktemp -d)
trap 'stop_simulator; rm -rf "$work"' EXIT
"$bin" make-contexts "$work/contexts" --count "$contexts" --tokens "$tokens" >/dev/null
start_simulator "$bin" sk-load "$work" --time-scale 0.001 --output-tokens 50 \
  --output-spread 0 --latency-jitter 0
db="sqlite://$work/load.db"
apex() { "$bin" --log-level warn --database-url "$db" "$@"; }
apex conditions register examples/production/conditions.toml >/dev/null
apex ingest "$work/contexts" >/dev/null
/usr/bin/time -f "%e %M" -o "$work/time" "$bin" --log-level warn --database-url "$db" run \
  --condition-slug prod-gpt5 --condition-slug prod-gpt4o --condition-slug prod-sonnet45 \
  --condition-slug prod-opus41 --allow-retired --replicates "$replicates" --concurrency 256 \
  --no-rate-limiting --time-scale 0.001 > "$work/run.out" 2> "$work/run.err" &
run_pid=$!
: > "$work/queries"
while kill -0 "$run_pid" 2>/dev/null; do
  start=$(date +%s%N)
  apex sql "SELECT status, COUNT(*) FROM apex_audition.generations GROUP BY status" >/dev/null
  echo $(( ($(date +%s%N) - start) / 1000000 )) >> "$work/queries"
  sleep 0.5
done
wait "$run_pid" || { cat "$work/run.err" >&2; exit 1; }
read -r wall rss < "$work/time"
n=$(( 4 * contexts * replicates ))
done_n=$(apex sql "SELECT COUNT(*) FROM apex_audition.generations WHERE status = 'success'" | sed -n 3p | tr -d ' ')
sort -n "$work/queries" > "$work/sorted"
q=$(wc -l < "$work/sorted")
p50=$(sed -n "$(( (q + 1) / 2 ))p" "$work/sorted")
max=$(tail -1 "$work/sorted")
awk -v n="$n" -v ok="$done_n" -v wall="$wall" -v rss="$rss" -v q="$q" -v p50="$p50" -v max="$max" 'BEGIN {
  printf "%d generations (%s success): wall %.1f s, %.0f generations/s, peak RSS %d MiB; apex sql during the run: %d queries, p50 %s ms, max %s ms\n",
    n, ok, wall, n / wall, rss / 1024, q, p50, max }'
