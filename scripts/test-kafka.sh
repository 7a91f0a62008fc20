#!/usr/bin/env bash
# The integration suite and the kill tests (pod_crash, churn, long_kill)
# against Apache Kafka 4.4: one KRaft node started
# from Maven Central's jars (fetched once into $TALLY_TOOLS_DIR, about two
# minutes), every test that talks to a broker run with TALLY_TEST_BROKERS
# pointing at it, one test at a time (each on topics of its own), then the
# broker stopped. A test that needs what only librdkafka's mock cluster
# has (fault injection) prints "SKIPPED on the external broker: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/kafka.sh
kafka_start
trap 'kafka_stop' EXIT
echo "== integration suite against Apache Kafka $KAFKA_VERSION at 127.0.0.1:$PORT"
export TALLY_TEST_BROKERS="127.0.0.1:$PORT" TALLY_TEST_BROKER_KIND=kafka
OUT="${TMPDIR:-/tmp}/tally-kafka-tests-$PORT.log"
set +e
cargo test \
  --test pod_e2e --test pod_faults --test pod_fx_topics --test pod_restore \
  --test replay --test serving_e2e --test http_api --test hostile_input \
  --test fault_suite --test page_chromium --test cli_config --test ops \
  --test pod_crash --test churn --test engine_threads \
  -- --nocapture --test-threads=1 >"$OUT" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
  echo "== churn under the KIP-848 consumer group protocol"
  TALLY_GROUP_PROTOCOL=consumer cargo test --test churn --test pod_crash \
    -- --nocapture --test-threads=1 >>"$OUT" 2>&1
  rc=$?
fi
if [ $rc -eq 0 ]; then
  echo "== 100 SIGKILLs across three pods, on Kafka"
  cargo test --test long_kill -- --ignored --nocapture >>"$OUT" 2>&1
  rc=$?
fi
set -e
grep -E '^test |SKIPPED|test result|panicked' "$OUT" || true
if [ $rc -ne 0 ]; then
  tail -n 80 "$OUT"
  echo "the integration suite failed against Kafka (full output: $OUT; broker log: $KAFKA_LOG)" >&2
  exit $rc
fi
