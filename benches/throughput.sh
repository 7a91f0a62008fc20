#!/usr/bin/env bash
# Issue 17's table in one run: the pass-through pipe, tally with 1 and 2
# engine threads, and the Quix Streams peer, over the same pre-filled
# input on tansu (in memory, its own process). Prints one JSON line.
# Usage (from anywhere in the repository):
#   benches/throughput.sh [EVENTS] [THREADS]   # default 200000 1,2
# Builds tally and tally-bench with tally's own crates at opt-level 3 on
# the test build's dependencies (RocksDB is not compiled again), unless
# TALLY_BIN_DIR names a directory holding both. Installs tansu and the
# peer's venv when missing (cached in $TALLY_TOOLS_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${1:-200000}"
THREADS="${2:-1,2}"
. scripts/tansu.sh
. benches/peers/venv.sh
BIN="${TALLY_BIN_DIR:-}"
if [ -z "$BIN" ]; then
  OPT=()
  for p in tally tally-core tally-bench; do
    OPT+=(--config "profile.dev.package.$p.opt-level=3")
  done
  cargo test --workspace --no-run --test cli_config --test smoke "${OPT[@]}" >&2
  BIN=$(mktemp -d)
  cp "${CARGO_TARGET_DIR:-target}/debug/tally" "${CARGO_TARGET_DIR:-target}/debug/tally-bench" "$BIN/"
fi
tansu_install
quix_install
tansu_start
trap 'kill $TANSU_PID 2>/dev/null || true' EXIT
TALLY_LOG=warn "$BIN/tally-bench" --scenario throughput --events "$EVENTS" --threads "$THREADS" \
  --brokers "127.0.0.1:$PORT" --tally-bin "$BIN/tally" \
  --quix-python "$QUIX_PYTHON" --quix-job benches/peers/quix_job.py
