#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what is missing, starts a
# real Kafka-compatible broker (tansu) and Google's Pub/Sub emulator on free
# loopback ports, runs the lints, unit and integration tests, and stops the
# services again. Extra arguments go to `cargo test` (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
services=$(mktemp -d "${TMPDIR:-/tmp}/ztfhook-services.XXXXXX")
trap 'scripts/services.sh stop "$services"' EXIT
scripts/services.sh start "$services"
# shellcheck disable=SC1091
source "$services/env"

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
log=$(mktemp "${TMPDIR:-/tmp}/ztfhook-test.XXXXXX")
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
