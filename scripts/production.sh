#!/usr/bin/env bash
# The main job: the seed's production batch, 4 conditions x 21 contexts of
# about 128K tokens x 3 replicates = 252 generations, on the embedded SQLite
# ledger ./apex.db, sent over real HTTP to Apex's local simulator of both APIs
# (prompt cache, the published tier limits with their rate-limit headers, and
# 5% transient faults that Apex retries), ending with the status tables, the
# cost report and the path of the run's HTML report. Nothing leaves the
# machine and no API key is needed. The contexts are made deterministically
# (`apex make-contexts`) on first use and kept beside the build.
#
# Against the real APIs, run the same apex commands without the simulator,
# with OPENAI_API_KEY and ANTHROPIC_API_KEY set and without --time-scale.
#
# scripts/production.sh [seed|current] [--batch]: the seed's four conditions
# (examples/production/conditions.toml; two of its models are retired or
# retiring, so the run passes --allow-retired), or this month's equivalents
# (examples/production/conditions-2026-11.toml). With --batch the run goes
# through the simulator's Batch APIs at half price, in two waves (a leader
# batch writes each context's cache, a follower batch reads it); each batch
# takes 10 simulated minutes (30 s here).
#
# APEX_TIME_SCALE (default 0.05: the simulator runs 20x faster than real
# time), APEX_CONTEXTS (default 21) and APEX_CONTEXT_TOKENS (default 128000)
# change the shape.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/simulator.sh

mode=(--verify-first)
if [ "${2:-}" = --batch ] || [ "${1:-}" = --batch ]; then
  mode=(--batch)
  [ "${1:-}" = --batch ] && set -- seed
fi
case "${1:-seed}" in
  seed)
    file=examples/production/conditions.toml
    slugs=(prod-gpt5 prod-gpt4o prod-sonnet45 prod-opus41)
    extra=(--allow-retired) ;;
  current)
    file=examples/production/conditions-2026-11.toml
    slugs=(cur-gpt62sol cur-gpt6luna cur-sonnet55 cur-opus55)
    extra=() ;;
  *) echo "usage: scripts/production.sh [seed|current] [--batch]" >&2; exit 2 ;;
esac

bin=$(release_apex)
apex() { "$bin" "$@"; }
scale=${APEX_TIME_SCALE:-0.05}
count=${APEX_CONTEXTS:-21}
tokens=${APEX_CONTEXT_TOKENS:-128000}
contexts="$(cargo_target_dir)/apex-sample-contexts/${count}x${tokens}"
apex make-contexts "$contexts" --count "$count" --tokens "$tokens" >/dev/null

work=$(mktemp -d)
trap 'stop_simulator; rm -rf "$work"' EXIT
start_simulator "$bin" sk-sim-local "$work" --time-scale "$scale" --fault-rate 0.05

apex conditions register "$file"
apex ingest "$contexts"
for slug in "${slugs[@]}"; do extra+=(--condition-slug "$slug"); done
apex run "${extra[@]}" \
  --replicates 3 "${mode[@]}" --time-scale "$scale" \
  --created-by "${USER:-apex}" --notes "Production batch (offline simulator)" | tee "$work/run.out"
run_id=$(awk '/^run .* started/ {print $2; exit}' "$work/run.out")
echo
apex cost "$run_id"
echo
apex report "$run_id"
