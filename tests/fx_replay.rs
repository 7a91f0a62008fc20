//! Deterministic results end to end: a pod that
//! converts orders while FX rates change, is SIGKILLed and restarted (once
//! on an empty state directory), and holds a partition that never gets a
//! record, produces finals that `tally replay` reproduces exactly.
//!
//! The rates change during processing: before each chunk of orders, new
//! EUR and GBP versions are published, in force from just after every
//! order produced so far (so on time, not late). The live pod converts each
//! order at the version in force at its `created_at`; after a kill it
//! converts the orders it redoes with a table that already holds later
//! versions, and the replay with every version from the start: all must
//! agree. Partition 5 of `raw-orders` stays empty: it is idle only because
//! the broker has nothing for it, and the view must still serve finals.
//!
//! How it was checked to fail before: with the core converting at the
//! latest rate, as the commit before did (its `fx-rates` format had no
//! time, so the versions here were "not a currency" there; the check
//! swapped `rate_at(created_at)` for the latest version instead), the
//! replay reported differences in every EUR and GBP window ("live: (656,
//! 297212446250), replayed: (656, 303227476050)" for one minute of EUR).

mod support;

use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, Producer};
use support::kafka::*;
use support::procs::*;
use tally::gen::{self, Expect, GenSpec};
use tally::replay::{self, From};

const CHUNKS: usize = 6;
/// An idle partition after 2 s of wall time with nothing to read (not 30).
const ENV: &[(&str, &str)] = &[("TALLY_IDLE_TIMEOUT_MS", "2000")];

/// A stable partition among the first five for a key (FNV-1a): the same
/// customer always lands on the same partition; partition 5 gets nothing.
fn partition_of(key: &[u8]) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 5) as i32
}

fn produce_to_five(brokers: &str, records: &[gen::GenRecord]) {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let t = topic("raw-orders");
    for r in records {
        gen::send_waiting(
            &producer,
            &t,
            Some(partition_of(&r.key)),
            &r.key,
            Some(&r.payload),
        )
        .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn publish_rates(brokers: &str, from_ms: i64, k: usize) {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let t = topic("fx-rates");
    for (cur, base) in [("EUR", 1.08), ("GBP", 1.27)] {
        let key = format!("{cur}@{from_ms}");
        let value = format!(
            r#"{{"currency":"{cur}","rate":{},"valid_from":{from_ms}}}"#,
            base + 0.013 * k as f64
        );
        gen::send_waiting(&producer, &t, None, key.as_bytes(), Some(value.as_bytes())).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn fx_updates_kills_and_an_idle_partition_replay_with_no_difference() {
    if skip_on_external("it produces to chosen partitions of a broker of its own") {
        return;
    }
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 12_000,
        seed: 151,
        customers: 300,
        ..GenSpec::default()
    });
    let chunks: Vec<&[gen::GenRecord]> = records.chunks(records.len() / CHUNKS).collect();
    let log = temp_dir("fx-replay").with_extension("log");
    let dir = temp_dir("fx-replay-state");
    let empty = temp_dir("fx-replay-state-empty");
    let mut pod = spawn_pod_env("fx", &brokers, "fx-replay", &dir, &log, ENV);
    let mut versions = None;
    let mut max_created = i64::MIN;
    let mut rng = 0x5eed_u64;
    for (k, chunk) in chunks.iter().enumerate() {
        if k > 0 {
            publish_rates(&brokers, max_created + 1, k);
            // The pod holds the new versions before orders of their time
            // arrive (live, or loaded at start after a kill).
            let want = versions.unwrap_or(0.0) + 2.0;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                pod.assert_alive(&log);
                if metric(pod.port, "tally_fx_versions").is_some_and(|v| v >= want) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the pod never read the rates of chunk {k}"
                );
                std::thread::park_timeout(Duration::from_millis(20));
            }
            versions = Some(want);
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            while versions.is_none() {
                pod.assert_alive(&log);
                versions = metric(pod.port, "tally_fx_versions").filter(|v| *v > 0.0);
                assert!(
                    Instant::now() < deadline,
                    "the pod never loaded its FX table"
                );
                std::thread::park_timeout(Duration::from_millis(20));
            }
        }
        produce_to_five(&brokers, chunk);
        for r in chunk.iter() {
            if let Expect::Valid { created_at_ms, .. } = &r.expect {
                max_created = max_created.max(*created_at_ms);
            }
        }
        // A SIGKILL somewhere in the chunk's processing, then a restart:
        // on the same state, or (chunk 3) on an empty one.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let until = Instant::now() + Duration::from_millis(50 + rng % 400);
        while Instant::now() < until {
            pod.assert_alive(&log);
            std::thread::park_timeout(Duration::from_millis(10));
        }
        pod.kill();
        let state = if k == 3 { empty.clone() } else { dir.clone() };
        pod = spawn_pod_env("fx", &brokers, "fx-replay", &state, &log, ENV);
    }
    wait_until(
        "the pod to commit every order",
        Duration::from_secs(120),
        || {
            pod.assert_alive(&log);
            // Nothing to commit on the idle partition.
            let mut ends = end_offsets(&brokers, "raw-orders");
            ends.retain(|_, end| *end > 0);
            committed(&brokers, "fx-replay", "raw-orders") == ends
        },
    );
    assert_eq!(
        metric(pod.port, "tally_fx_late_rates_total"),
        Some(0.0),
        "every version arrived on time"
    );
    // Partition 5 turns idle (nothing to read) and vouches for the closed
    // windows: the view serves them final, and the replay compares them.
    let cfg = pod_config(&brokers, "fx-replay", temp_dir("fx-replay-scratch"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        pod.assert_alive(&log);
        let r = replay::run(&cfg, From::Offset(0)).unwrap();
        if r.windows_compared >= 20 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "too few windows final in the view: {r:?}"
        );
        std::thread::park_timeout(Duration::from_millis(200));
    };
    pod.stop();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    for d in [dir, empty, cfg.resources.state_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}
