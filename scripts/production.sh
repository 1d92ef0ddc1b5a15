#!/usr/bin/env bash
# The main job: the seed's production batch (4 conditions x the example
# contexts x 3 replicates) on the embedded SQLite ledger ./apex.db, sent over
# real HTTP to Apex's local simulator of both APIs (prompt cache, rate-limit
# headers and 5% transient faults that Apex retries), ending with the status
# tables, the cost report and the path of the run's HTML report. Nothing leaves the machine and no API key is
# needed.
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
# takes 10 simulated minutes (12 s here).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p apex-cli
apex() { ./target/release/apex "$@"; }

scale=${APEX_TIME_SCALE:-0.02}   # the simulator runs 50x faster than real time
work=$(mktemp -d)
. scripts/simulator.sh
trap 'stop_simulator; rm -rf "$work"' EXIT
start_simulator ./target/release/apex sk-sim-local "$work" --time-scale "$scale" --fault-rate 0.05

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
apex conditions register "$file"
apex ingest examples/production/contexts
for slug in "${slugs[@]}"; do extra+=(--condition-slug "$slug"); done
apex run "${extra[@]}" \
  --replicates 3 "${mode[@]}" --time-scale "$scale" \
  --created-by "${USER:-apex}" --notes "Production batch (offline simulator)" | tee "$work/run.out"
run_id=$(awk '/^run .* started/ {print $2; exit}' "$work/run.out")
echo
apex cost "$run_id"
echo
apex report "$run_id"
