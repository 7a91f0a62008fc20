#!/usr/bin/env bash
# The integration suite against tansu, a second, real Kafka-compatible
# broker (in memory). Installs tansu once (about 15 minutes; cached in
# $TALLY_TOOLS_DIR), starts it on a free loopback port, runs every test that
# talks to a broker with TALLY_TEST_BROKERS pointing at it, and stops it.
# Tests that tansu's known gaps make impossible skip themselves
# and print "SKIPPED on tansu: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/tansu.sh
tansu_install
tansu_start
trap 'kill $TANSU_PID 2>/dev/null || true' EXIT
echo "== integration suite against tansu at 127.0.0.1:$PORT"
export TALLY_TEST_BROKERS="127.0.0.1:$PORT" TALLY_TEST_BROKER_KIND=tansu
OUT="${TMPDIR:-/tmp}/tally-tansu-tests-$PORT.log"
set +e
cargo test \
  --test pod_e2e --test pod_crash --test pod_faults --test pod_fx_topics \
  --test pod_restore --test replay --test serving_e2e --test http_api \
  --test page_chromium --test cli_config --test ops \
  -- --nocapture --test-threads=1 >"$OUT" 2>&1
rc=$?
set -e
grep -E '^test |SKIPPED|test result|panicked' "$OUT" || true
if [ $rc -ne 0 ]; then
  tail -n 80 "$OUT"
  echo "the integration suite failed against tansu (full output: $OUT; broker log: $TANSU_LOG)" >&2
  exit $rc
fi
