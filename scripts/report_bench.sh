#!/usr/bin/env bash
# The report at scale: a ledger of 4 conditions x CONTEXTS x REPLICATES
# generations with OUTPUT_TOKENS-token answers (examples/report_bench.rs,
# answered in process), then `apex report` timed (wall time and peak
# memory) and the page loaded by headless Chromium (wall time to a dumped
# DOM, scripts run).
#
#   scripts/report_bench.sh [CONTEXTS] [REPLICATES] [OUTPUT_TOKENS]
#   scripts/report_bench.sh 1250 10 2000      # 50,000 generations (default)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/simulator.sh
bin=$(release_apex)
cargo build --release --locked -q --example report_bench
target=$(cargo_target_dir)
contexts=${1:-1250}
replicates=${2:-10}
tokens=${3:-2000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s.%N)
run_id=$("$target/release/examples/report_bench" "$work" "$contexts" "$replicates" "$tokens")
echo "ledger of $((4 * contexts * replicates)) generations written in $(echo "$(date +%s.%N) - $started" | bc) s"
peak() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null; }
started=$(date +%s.%N)
"$bin" --database-url "sqlite://$work/ledger.db" report "$run_id" --output "$work/report.html" &
pid=$!
rss=0
while kill -0 "$pid" 2>/dev/null; do
  now=$(peak "$pid"); [ -n "$now" ] && [ "$now" -gt "$rss" ] && rss=$now
  sleep 0.05
done
wait "$pid"
echo "apex report: $(echo "$(date +%s.%N) - $started" | bc) s, peak RSS $((rss / 1024)) MiB, page $(( $(stat -c %s "$work/report.html") / 1024 / 1024 )) MB"
if command -v chromium >/dev/null 2>&1; then
  for _ in 1 2 3; do
    started=$(date +%s.%N)
    chromium --headless=new --no-sandbox --disable-gpu --dump-dom "file://$work/report.html" > "$work/dom.html" 2>/dev/null
    grep -q 'data-ready="1"' "$work/dom.html" || { echo "the page's script did not run" >&2; exit 1; }
    echo "headless chromium: loaded, scripts run, DOM dumped in $(echo "$(date +%s.%N) - $started" | bc) s"
  done
fi
