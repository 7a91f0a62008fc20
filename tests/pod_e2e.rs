//! End to end against the mock cluster: generated orders with a known
//! truth (including invalid, duplicate and very late ones) through one pod.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::kafka::*;
use tally::gen::{self, Expect, GenSpec};
use tally::pod;

fn broker() -> TestBroker {
    let specs = declared_topics();
    TestBroker::start(1, &specs)
}

#[test]
fn every_window_total_dlq_and_late_record_matches_the_truth() {
    let broker = broker();
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 4_000,
        seed: 7,
        customers: 300,
        invalid_pct: 3.0,
        duplicate_pct: 3.0,
        late_pct: 2.0,
        ..GenSpec::default()
    });
    produce_input(&brokers, &records);
    let ends = end_offsets(&brokers, "raw-orders");
    assert_eq!(ends.values().sum::<i64>(), records.len() as i64);

    let dir = temp_dir("e2e");
    let handle = pod::start(pod_config(&brokers, "e2e", dir.clone())).unwrap();
    wait_until(
        "the pod to commit every input offset",
        Duration::from_secs(90),
        || committed(&brokers, "e2e", "raw-orders") == ends,
    );
    let stats = handle.stats.clone();
    handle.join().unwrap();

    // Window totals, to the micro-dollar.
    assert_totals_equal(&published_totals(&brokers), &truth_totals(&records));

    // Every invalid record is in the DLQ, as sent, with its reason.
    let mut want_dlq: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut want_late = BTreeSet::new();
    let mut dups = 0u64;
    for r in &records {
        match &r.expect {
            Expect::Invalid { reason } => {
                want_dlq.insert(r.payload.clone(), reason.as_str().to_string());
            }
            Expect::Late { order_id } => {
                want_late.insert(order_id.clone());
            }
            Expect::Duplicate { .. } => dups += 1,
            Expect::Valid { .. } => {}
        }
    }
    let dlq = read_all(&brokers, "orders-dlq");
    let got_dlq: BTreeMap<Vec<u8>, String> = dlq
        .iter()
        .map(|r| (r.payload.clone().unwrap(), r.headers["reason"].clone()))
        .collect();
    assert_eq!(dlq.len(), want_dlq.len());
    assert_eq!(got_dlq, want_dlq);
    for r in &dlq {
        assert_eq!(r.headers["source_topic"], topic("raw-orders"));
        assert!(r.headers["source_offset"].parse::<i64>().is_ok());
        assert!(r.key.is_some(), "the original key is kept");
    }

    // Very late orders are in orders-late, and nowhere in the windows.
    let late: BTreeSet<String> = read_all(&brokers, "orders-late")
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
            v["order_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(late, want_late);

    // Duplicates count once (the totals above), and are counted as such.
    assert_eq!(stats.duplicates(), dups);

    // Enriched orders carry the enrichment and pass other fields through.
    let enriched = read_all(&brokers, "enriched-orders");
    let valid = records
        .iter()
        .filter(|r| matches!(r.expect, Expect::Valid { .. }))
        .count();
    assert_eq!(enriched.len(), valid);
    let with_channel = enriched
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(r.payload.as_ref().unwrap()).unwrap())
        .find(|v| v.get("channel").is_some())
        .expect("a pass-through field");
    assert_eq!(with_channel["channel"], "web");
    for k in ["amount_usd", "processed_at", "source", "fx_rate"] {
        assert!(with_channel.get(k).is_some(), "missing {k}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
