# Sourced by the scripts that run Apex against its simulator.

# cargo_target_dir: where cargo puts its builds (CARGO_TARGET_DIR and
# build.target-dir honoured), from cargo itself.
cargo_target_dir() {
  local meta dir
  meta=$(cargo metadata --format-version 1 --no-deps --locked) ||
    { echo "cargo metadata failed: is this a checkout of Apex with cargo on PATH?" >&2; return 1; }
  dir=$(printf '%s\n' "$meta" | grep -o '"target_directory":"[^"]*"' | head -n 1 | sed 's/^"target_directory":"//; s/"$//')
  [ -n "$dir" ] || { echo "cargo metadata did not name a target directory" >&2; return 1; }
  printf '%s\n' "$dir"
}

# release_apex: builds the apex binary (release) and prints its path.
release_apex() {
  local dir
  cargo build --release --locked -q -p apex-cli >&2 || { echo "building apex failed (see above)" >&2; return 1; }
  dir=$(cargo_target_dir) || return 1
  if [ ! -x "$dir/release/apex" ]; then
    echo "cargo built apex but $dir/release/apex is not there" >&2
    return 1
  fi
  printf '%s\n' "$dir/release/apex"
}

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
