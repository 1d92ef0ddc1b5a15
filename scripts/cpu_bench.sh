#!/usr/bin/env bash
# Client CPU per generation: user + system CPU of the `apex run` process
# (the simulator runs in its own process), for N contexts of T tokens x R
# replicates over HTTP, with the default tier limits switched off so the
# figure is CPU, not waiting. PACED=1 paces as a plain run does (limits
# learned from the simulator's headers, the published tiers): what pacing
# costs is the difference. TIME_SCALE (default 0.001) sets both clocks.
#
#   scripts/cpu_bench.sh [APEX_BINARY] [CONTEXTS] [TOKENS] [REPLICATES]
#   scripts/cpu_bench.sh                                   # a release build, 21 100000 3
#   PACED=1 scripts/cpu_bench.sh
#
# Prints one line: generations, user_s, sys_s, cpu_s per 100 generations,
# wall_s, peak RSS. Ingest (which counts tokens once per context) is
# measured on its own line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/simulator.sh
bin=${1:-$(release_apex)}
contexts=${2:-21}
tokens=${3:-100000}
replicates=${4:-3}
bin=$(realpath "$bin")
work=$(mktemp -d)
trap 'stop_simulator; rm -rf "$work"' EXIT
"$bin" make-contexts "$work/contexts" --count "$contexts" --tokens "$tokens" >/dev/null
scale=${TIME_SCALE:-0.001}
# Fixed answer lengths and latencies: the figure is Apex's CPU per answer.
start_simulator "$bin" sk-bench "$work" --time-scale "$scale" --latency-ms 400 \
  --output-spread 0 --latency-jitter 0
db="sqlite://$work/bench.db"
apex() { "$bin" --log-level warn --database-url "$db" "$@"; }
apex conditions register examples/production/conditions.toml >/dev/null
# A shell function cannot be timed: measure the binary itself.
measure() { /usr/bin/time -f "%U %S %e %M" -o "$work/time" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }
read -r iu is ie im < <(measure "$bin" --log-level warn --database-url "$db" ingest "$work/contexts")
printf 'ingest  %d contexts x %d tokens: user %.2f s, sys %.2f s, wall %.2f s, peak RSS %d MiB\n' \
  "$contexts" "$tokens" "$iu" "$is" "$ie" $((im / 1024))
read -r u s e m < <(measure "$bin" --log-level warn --database-url "$db" run \
  --condition-slug prod-gpt5 --condition-slug prod-gpt4o --condition-slug prod-sonnet45 \
  --condition-slug prod-opus41 --allow-retired --replicates "$replicates" \
  $([ "${PACED:-0}" = 1 ] || echo --no-rate-limiting) --time-scale "$scale")
n=$(( contexts * 4 * replicates ))
awk -v n="$n" -v u="$u" -v s="$s" -v e="$e" -v m="$m" 'BEGIN {
  printf "run     %d generations: user %.2f s, sys %.2f s, cpu %.3f s per 100 generations, wall %.2f s, peak RSS %d MiB\n",
    n, u, s, (u + s) * 100 / n, e, m / 1024 }'
