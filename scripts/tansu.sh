# Sourced by scripts/test-tansu.sh and benches/peers/run.sh: tansu, a
# Kafka-compatible broker, installed once and started in memory.
#   tansu_install   sets TANSU (installs tansu 0.6.0 into $TOOLS if missing)
#   tansu_start     sets PORT, TANSU_PID, TANSU_LOG; returns once it listens
# The caller kills $TANSU_PID (e.g. in an EXIT trap).

TOOLS="${TALLY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tally-tools}"

tansu_install() {
  TANSU="$TOOLS/bin/tansu"
  if [ ! -x "$TANSU" ]; then
    echo "== installing tansu (cargo install tansu --features dynostore)" >&2
    cargo install tansu --version 0.6.0 --features dynostore --locked --root "$TOOLS"
  fi
}

tansu_start() {
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  TANSU_LOG="${TMPDIR:-/tmp}/tally-tansu-$PORT.log"
  "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine memory://tansu/ >"$TANSU_LOG" 2>&1 &
  TANSU_PID=$!
  # Wait for the port (bounded).
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    if ! kill -0 "$TANSU_PID" 2>/dev/null; then cat "$TANSU_LOG"; echo "tansu exited" >&2; return 1; fi
    sleep 0.1
  done
  echo "tansu did not listen on 127.0.0.1:$PORT within 10 s" >&2
  return 1
}
