#!/usr/bin/env bash
# The whole test suite: unit, integration and doc tests of every crate, with
# the PostgreSQL half of the store conformance suite run against a real,
# throwaway server.
#
# If APEX_TEST_PG_URL is set, that server is used (APEX_TEST_PG=1 turns the
# PostgreSQL tests on). Otherwise, where
# PostgreSQL and postgresql-common are installed, pg_virtualenv starts a
# throwaway cluster for the duration of the tests. Without either, the
# PostgreSQL tests are listed as ignored, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

# The official-SDK test installs the latest openai and anthropic packages
# into a throwaway venv. Where the package index answers, a failure to
# install is a failure; where it does not, the test skips and says why.
if [ -z "${APEX_REQUIRE_SDKS:-}" ]; then
  if timeout 60 python3 -m pip index versions pip >/dev/null 2>&1; then
    export APEX_REQUIRE_SDKS=1
  else
    echo "scripts/test.sh: no Python package index reachable; the official-SDK test will skip" >&2
  fi
fi

# require_tool COMMAND PACKAGE VARIABLE WHAT: installs Debian's PACKAGE where
# COMMAND is missing (as root), then sets VARIABLE=1 so the test that needs it
# fails rather than skips; where it cannot be had, the test skips and says so.
require_tool() {
  local command=$1 package=$2 variable=$3 what=$4
  [ -n "${!variable:-}" ] && return
  if ! command -v "$command" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "scripts/test.sh: installing Debian's $package for $what" >&2
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1; }) || true
  fi
  if command -v "$command" >/dev/null 2>&1; then
    export "$variable=1"
  else
    echo "scripts/test.sh: no $command (it could not be installed here); $what will skip" >&2
  fi
}
require_tool chromium chromium APEX_REQUIRE_CHROMIUM "the browser test of apex report"
require_tool tmux tmux APEX_REQUIRE_TMUX "the live-view test in a terminal"

if [ -n "${APEX_TEST_PG_URL:-}" ]; then
  APEX_TEST_PG=1 exec cargo test --workspace --locked "$@"
fi

if ! command -v pg_virtualenv >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "scripts/test.sh: installing PostgreSQL (postgresql, postgresql-common) for the store tests" >&2
  (apt-get install -y -qq postgresql postgresql-common >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql postgresql-common >/dev/null 2>&1; }) || true
fi

if command -v pg_virtualenv >/dev/null 2>&1; then
  # pg_virtualenv exports PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.
  # -t: a temporary cluster directory, so a cluster left by an interrupted run
  # (or another run at the same time) is never in the way.
  # The ledger-outage tests stop and start this throwaway server, so they
  # run on their own, one at a time, before the suite (which ignores them).
  exec pg_virtualenv -t -- bash -c '
    set -e
    export APEX_TEST_PG=1 APEX_TEST_PG_URL="postgres://${PGUSER}:${PGPASSWORD}@${PGHOST}:${PGPORT}/${PGDATABASE}"
    echo "scripts/test.sh: PostgreSQL $(psql -XAtc "SHOW server_version") at ${PGHOST}:${PGPORT} for the store tests" >&2
    echo "scripts/test.sh: ledger-outage tests first (they stop and start the server)" >&2
    cargo test --workspace --tests --locked -- --ignored --test-threads=1 postgres_outage
    cargo test --workspace --locked "$@"' bash "$@"
fi

echo "scripts/test.sh: WARNING: no PostgreSQL (pg_virtualenv not found); the PostgreSQL tests are ignored" >&2
exec cargo test --workspace --locked "$@"
