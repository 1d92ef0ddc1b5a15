# Sourced by the scripts that run Apex against its simulator.

# start_simulator BIN KEY DIR [SIMULATE OPTIONS...]: starts `BIN simulate`
# in the background (the binary itself, so that $sim_pid is the simulator,
# not a subshell), waits for its address and exports the base URLs and keys.
start_simulator() {
  local bin=$1 key=$2 dir=$3
  shift 3
  "$bin" simulate --api-key "$key" --addr-file "$dir/addr" "$@" > "$dir/simulator.log" 2>&1 &
  sim_pid=$!
  for _ in $(seq 100); do [ -s "$dir/addr" ] && break; sleep 0.1; done
  if [ ! -s "$dir/addr" ]; then
    echo "the simulator did not start:" >&2
    cat "$dir/simulator.log" >&2
    return 1
  fi
  local addr
  addr=$(cat "$dir/addr")
  export OPENAI_BASE_URL="http://$addr/v1" ANTHROPIC_BASE_URL="http://$addr"
  export OPENAI_API_KEY=$key ANTHROPIC_API_KEY=$key
}

# stop_simulator: stops it if it was started (safe under set -e, in a trap).
stop_simulator() {
  if [ -n "${sim_pid:-}" ]; then
    kill "$sim_pid" 2>/dev/null || true
    wait "$sim_pid" 2>/dev/null || true
  fi
}
