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
# The binary itself in the background (not the shell function, whose
# subshell would be what $! names), so the trap stops the simulator.
./target/release/apex simulate --time-scale "$scale" --fault-rate 0.05 --api-key sk-sim-local \
  --addr-file "$work/addr" > "$work/simulator.log" 2>&1 &
sim_pid=$!
trap 'kill $sim_pid 2>/dev/null; wait $sim_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.1; done
addr=$(cat "$work/addr")
export OPENAI_BASE_URL="http://$addr/v1" ANTHROPIC_BASE_URL="http://$addr"
export OPENAI_API_KEY=sk-sim-local ANTHROPIC_API_KEY=sk-sim-local

apex conditions register examples/production/conditions.toml
apex ingest examples/production/contexts
apex run --condition-slug prod-gpt5 --condition-slug prod-gpt4o \
  --condition-slug prod-sonnet45 --condition-slug prod-opus41 \
  --replicates 3 --verify-first --time-scale "$scale" \
  --created-by "${USER:-apex}" --notes "Production batch (offline simulator)" | tee "$work/run.out"
run_id=$(awk '/^run .* started/ {print $2; exit}' "$work/run.out")
echo
apex cost "$run_id"
