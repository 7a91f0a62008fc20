#!/usr/bin/env bash
# tally vs. the Quix Streams peer, one after the other, on the same broker
# (tansu, in memory) and the same pre-filled raw-orders topic. Prints one
# JSON line per side and the ratio. Usage (from the repository root):
#   benches/peers/run.sh [EVENTS]        # default 100000
# Needs: Python 3 with venv. Builds tally (release) unless TALLY_BIN names a
# binary, and installs tansu and the peer's venv when missing (cached in
# $TALLY_TOOLS_DIR). CPU per event is each consuming process's user + system
# time from its first record to its last, over the events.
set -euo pipefail
cd "$(dirname "$0")/../.."
EVENTS="${1:-100000}"
. scripts/tansu.sh
TARGET="${CARGO_TARGET_DIR:-target}"
TALLY="${TALLY_BIN:-$TARGET/release/tally}"
[ -x "$TALLY" ] || cargo build --release --bin tally
. benches/peers/venv.sh
quix_install
tansu_install
tansu_start
B="127.0.0.1:$PORT"
STATE=$(mktemp -d)
POD=""
trap 'kill $TANSU_PID 2>/dev/null || true; kill $POD 2>/dev/null || true; rm -rf "$STATE"' EXIT
"$TALLY" topics apply --brokers "$B" >/dev/null
"$TALLY" gen --brokers "$B" --count "$EVENTS" --customers 10000 >/dev/null

# The peer: it stops itself after EVENTS input records.
PEER=$("$QUIX_PYTHON" benches/peers/quix_job.py --brokers "$B" --count "$EVENTS" \
  --state-dir "$STATE/quix" 2>/dev/null | tail -1)
echo "$PEER"

# tally: one pod, timed from its first record to the last, from /metrics.
HTTP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TALLY_LOG=warn "$TALLY" run --brokers "$B" --group "tally-peer-bench" --state-dir "$STATE/tally" \
  --http "127.0.0.1:$HTTP_PORT" --apply-topics=false --assignment-strategy range >/dev/null 2>&1 &
POD=$!
TALLY_LINE=$(python3 - "$HTTP_PORT" "$EVENTS" "$POD" <<'PY'
import json, os, sys, time, urllib.request
port, total, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def cpu():
    # user + system ticks of the pod process (fields 14, 15 of /proc/<pid>/stat).
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def consumed():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("tally_records_consumed_total "):
            return int(float(line.split()[1]))
    return 0
deadline, first, cpu0 = time.monotonic() + 600, None, 0.0
while time.monotonic() < deadline:
    n = consumed()
    if n > 0 and first is None:
        first, cpu0 = time.monotonic(), cpu()
    if n >= total:
        secs = time.monotonic() - first
        used = cpu() - cpu0
        print(json.dumps({"scenario": "peer", "peer": "tally", "events": n, "seconds": secs,
                          "events_per_sec": n / secs, "cpu_us_per_event": used * 1e6 / n}))
        break
    time.sleep(0.02)
else:
    sys.exit("tally did not consume every record in time")
PY
)
echo "$TALLY_LINE"
python3 - "$PEER" "$TALLY_LINE" <<'PY'
import json, sys
peer, tally = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {"scenario": "peer_ratio", "tally_over_quix": tally["events_per_sec"] / peer["events_per_sec"]}
if peer.get("cpu_us_per_event") and tally.get("cpu_us_per_event"):
    out["quix_cpu_over_tally_cpu"] = peer["cpu_us_per_event"] / tally["cpu_us_per_event"]
print(json.dumps(out))
PY
