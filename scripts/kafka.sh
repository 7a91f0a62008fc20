# Sourced by scripts/test-kafka.sh: Apache Kafka, one KRaft node (broker
# and controller) on free loopback ports, from Maven Central's jars.
#   kafka_install   sets KAFKA_LIBS (fetches the jars once into $TOOLS)
#   kafka_start     sets PORT, KAFKA_PID, KAFKA_LOG, KAFKA_DIR; returns once
#                   the broker logs "Kafka Server started" (at most 90 s)
#   kafka_stop      stops it (SIGTERM, then SIGKILL after 20 s)
#   kafka_pause / kafka_resume     SIGSTOP / SIGCONT, for fault tests
#   kafka_restart   SIGKILL, then start again on the same ports and data
# Needs a JRE and Maven (scripts/ensure-deps.sh installs both).

KAFKA_VERSION=4.4.0
# The log4j binding for the SLF4J 1.7 API the broker's jars use: it is not
# a dependency of the broker's POM, and without it the broker logs nothing.
LOG4J_VERSION=2.24.3
TOOLS="${TALLY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tally-tools}"

kafka_install() {
  KAFKA_LIBS="$TOOLS/kafka-$KAFKA_VERSION/libs"
  if [ -f "$KAFKA_LIBS/.complete" ]; then return 0; fi
  echo "== fetching Apache Kafka $KAFKA_VERSION from Maven Central" >&2
  local pom
  pom="$(mktemp -d)"
  cat >"$pom/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tally.tools</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$KAFKA_LIBS"
  (cd "$pom" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime)
  rm -rf "$pom"
  touch "$KAFKA_LIBS/.complete"
}

_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_kafka_launch() {
  # -Xmx: without it the JVM takes a quarter of the machine's memory.
  java -Xmx512m -Xms256m -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" >>"$KAFKA_LOG" 2>&1 &
  KAFKA_PID=$!
  local started=$((SECONDS))
  while [ $((SECONDS - started)) -lt 90 ]; do
    if grep -q "Kafka Server started" "$KAFKA_LOG" 2>/dev/null; then return 0; fi
    if ! kill -0 "$KAFKA_PID" 2>/dev/null; then
      tail -n 40 "$KAFKA_LOG" >&2
      echo "Kafka exited before it started (log: $KAFKA_LOG)" >&2
      return 1
    fi
    sleep 0.2
  done
  tail -n 40 "$KAFKA_LOG" >&2
  echo "Kafka did not start within 90 s (log: $KAFKA_LOG)" >&2
  return 1
}

kafka_start() {
  kafka_install
  PORT=$(_free_port)
  local cport
  cport=$(_free_port)
  KAFKA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tally-kafka-$PORT.XXXX")"
  KAFKA_LOG="$KAFKA_DIR/broker.log"
  cat >"$KAFKA_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_DIR/data
auto.create.topics.enable=false
num.partitions=1
# One node: every internal topic has one replica, and few partitions.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fast tests: no delay before the first rebalance, short group sessions.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
# The log cleaner's buffer is 128 MiB of heap by default.
log.cleaner.dedupe.buffer.size=8388608
EOF
  cat >"$KAFKA_DIR/log4j2.properties" <<EOF
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.org.name = org.apache.kafka
logger.org.level = WARN
EOF
  local cluster
  cluster=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
  java -Xmx256m -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" \
    kafka.tools.StorageTool format -t "$cluster" -c "$KAFKA_DIR/server.properties" >"$KAFKA_LOG" 2>&1 || {
    cat "$KAFKA_LOG" >&2
    echo "formatting Kafka's storage failed" >&2
    return 1
  }
  _kafka_launch
}

kafka_stop() {
  [ -n "${KAFKA_PID:-}" ] || return 0
  kill "$KAFKA_PID" 2>/dev/null || true
  local waited=0
  while kill -0 "$KAFKA_PID" 2>/dev/null && [ $waited -lt 100 ]; do
    sleep 0.2
    waited=$((waited + 1))
  done
  kill -9 "$KAFKA_PID" 2>/dev/null || true
  wait "$KAFKA_PID" 2>/dev/null || true
}

kafka_pause() { kill -STOP "$KAFKA_PID"; }
kafka_resume() { kill -CONT "$KAFKA_PID"; }

kafka_restart() {
  kill -9 "$KAFKA_PID" 2>/dev/null || true
  wait "$KAFKA_PID" 2>/dev/null || true
  _kafka_launch
}
