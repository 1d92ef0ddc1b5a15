#!/usr/bin/env bash
# The main job: the seed's production batch on the embedded SQLite ledger
# (./apex.db). For now this plans the batch as a dry run (nothing is sent) and
# shows its status.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p apex-cli
apex() { ./target/release/apex "$@"; }
apex conditions register examples/production/conditions.toml
apex ingest examples/production/contexts
out=$(apex run --condition-slug prod-sonnet45 --replicates 3 --dry-run \
  --created-by "${USER:-apex}" --notes "Production batch: Sonnet 4.5 (dry run)")
echo "$out"
run_id=$(echo "$out" | awk '/^run /{print $2; exit}')
apex status "$run_id"
