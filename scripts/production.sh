#!/usr/bin/env bash
# The main job: the seed's production batch (4 conditions x the example
# contexts x 3 replicates) on the embedded SQLite ledger ./apex.db, sent over
# real HTTP to Apex's local simulator of both APIs (prompt cache, rate-limit
# headers and 5% transient faults that Apex retries), ending with the status
# tables and the cost report. Nothing leaves the machine and no API key is
# needed.
#
# Against the real APIs, run the same apex commands without the simulator,
# with OPENAI_API_KEY and ANTHROPIC_API_KEY set and without --time-scale.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p apex-cli
apex() { ./target/release/apex "$@"; }

scale=${APEX_TIME_SCALE:-0.02}   # the simulator runs 50x faster than real time
work=$(mktemp -d)
. scripts/simulator.sh
trap 'stop_simulator; rm -rf "$work"' EXIT
start_simulator ./target/release/apex sk-sim-local "$work" --time-scale "$scale" --fault-rate 0.05

apex conditions register examples/production/conditions.toml
apex ingest examples/production/contexts
apex run --condition-slug prod-gpt5 --condition-slug prod-gpt4o \
  --condition-slug prod-sonnet45 --condition-slug prod-opus41 \
  --replicates 3 --verify-first --time-scale "$scale" \
  --created-by "${USER:-apex}" --notes "Production batch (offline simulator)" | tee "$work/run.out"
run_id=$(awk '/^run .* started/ {print $2; exit}' "$work/run.out")
echo
apex cost "$run_id"
