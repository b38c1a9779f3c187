#!/usr/bin/env bash
# The SPEC §6 load benchmark in one command: builds the server and the driver in release mode,
# installs wrk if it is missing, and prints the results table (see BENCHMARKS.md).
# Environment: ROUNDS (3), REPS (6), SHORT_SECONDS (2), SECONDS (5), CONNS (32), KEEP (0).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
    apt-get update -qq && apt-get install -y -qq wrk
fi
cargo build --release --locked --bin credgate --example loadbench
exec target/release/examples/loadbench
