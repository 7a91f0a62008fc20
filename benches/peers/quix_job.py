"""The tally job written with Quix Streams, for a side-by-side benchmark.

Same validation and enrichment as tally (the fields, types and ranges of
docs/semantics.md, FX to USD), then:
- tumbling 1-minute revenue per currency,
- sliding (hopping) 5-minute/1-minute revenue per region,
- 30-minute sessions per customer (the input is keyed by customer_id).

It stops after --count input records and prints one JSON line: events/s from
the first record to the last. Usage:
  python quix_job.py --brokers HOST:PORT --count 100000 --state-dir /tmp/quix-state
"""

import argparse
import json
import sys
import time
from datetime import datetime

from quixstreams import Application
from quixstreams.dataframe.windows import Sum

FX = {"USD": 1.0, "EUR": 1.08, "GBP": 1.27, "JPY": 0.0067, "AUD": 0.66, "CAD": 0.73}
MIN_MS, MAX_MS = 946_684_800_000, 4_102_444_800_000  # 2000-01-01 .. 2100-01-01


def parse_time(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, str):
        try:
            return int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            return None
    return None


def validate(raw):
    """The enriched order, or None (tally would send it to the DLQ)."""
    try:
        o = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(o, dict):
        return None
    oid, cid = o.get("order_id"), o.get("customer_id")
    if not isinstance(oid, (str, int)) or not isinstance(cid, (str, int)) or isinstance(oid, bool):
        return None
    amount = o.get("amount")
    try:
        amount = float(amount) if isinstance(amount, (int, float, str)) and not isinstance(amount, bool) else None
    except ValueError:
        amount = None
    if amount is None or not (0 < amount <= 1e9):
        return None
    cur = o.get("currency")
    if not isinstance(cur, str) or cur.upper() not in FX:
        return None
    t = parse_time(o.get("created_at"))
    if t is None or not (MIN_MS <= t <= MAX_MS):
        return None
    cur = cur.upper()
    return {
        "order_id": str(oid),
        "customer_id": str(cid),
        "currency": cur,
        "region": o.get("region") or "unknown",
        "amount_usd": round(amount * FX[cur], 6),
        "created_at": t,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", default="raw-orders")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--state-dir", required=True, help="the peer's RocksDB state (a scratch directory)")
    args = ap.parse_args()

    app = Application(
        broker_address=args.brokers,
        consumer_group=f"quix-peer-{int(time.time())}",
        auto_offset_reset="earliest",
        use_changelog_topics=False,
        state_dir=args.state_dir,
    )
    topic = app.topic(args.topic, value_deserializer="bytes", timestamp_extractor=None)
    seen = {"n": 0, "first": None, "cpu0": 0.0}

    def count(value):
        seen["n"] += 1
        if seen["first"] is None:
            seen["first"] = time.monotonic()
            # CPU of the whole process (librdkafka's threads included).
            seen["cpu0"] = time.process_time()
        if seen["n"] >= args.count:
            app.stop()
        return value

    sdf = app.dataframe(topic)
    sdf = sdf.apply(count)
    sdf = sdf.apply(validate).filter(lambda v: v is not None)
    sdf = sdf.set_timestamp(lambda v, key, ts, headers: v["created_at"])

    by_currency = sdf.group_by("currency")
    by_currency.tumbling_window(60_000).agg(usd=Sum("amount_usd")).current()
    by_region = sdf.group_by("region")
    by_region.hopping_window(300_000, 60_000).agg(usd=Sum("amount_usd")).current()
    sdf.session_window(1_800_000).agg(usd=Sum("amount_usd")).current()

    app.run()
    secs = time.monotonic() - (seen["first"] or time.monotonic())
    cpu = time.process_time() - seen["cpu0"]
    print(json.dumps({"scenario": "peer", "peer": "quixstreams", "events": seen["n"],
                      "seconds": secs, "events_per_sec": seen["n"] / secs if secs else None,
                      "cpu_us_per_event": cpu * 1e6 / seen["n"] if seen["n"] else None}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
