//! Engine threads (`--engine-threads`): a pod of several
//! threads, each a member of the consumer group with its own engine,
//! RocksDB and flush cycle. Kafka's assignment splits the partitions
//! among them and moves them between threads as between pods, so the
//! guarantees are the pods' own: the totals equal the generator's truth,
//! duplicates are recognised across a move, and the pod-wide gauges are
//! the sums of the threads' parts.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use support::kafka::*;
use tally::gen::{self, GenSpec};
use tally::pod;
use tally::telemetry::metrics::Metrics;

fn start(cfg: &tally::config::PodConfig, metrics: &Arc<Metrics>) -> Vec<pod::PodHandle> {
    let stats = (0..cfg.resources.engine_threads)
        .map(|_| Arc::new(pod::Stats::new(metrics.clone())))
        .collect();
    pod::start_threads(cfg.clone(), stats).unwrap()
}

fn held(handles: &[pod::PodHandle]) -> Vec<Vec<i32>> {
    handles
        .iter()
        .map(|h| h.stats.held.lock().unwrap().clone())
        .collect()
}

/// Two threads split the partitions and the totals stay exact; then the
/// same group goes on with one thread (its state under the root of the
/// state directory, so every partition is restored from the changelog),
/// then with two again (each thread's own directory is behind, and is
/// caught up from the changelog's tail). Orders sent again across each
/// change are recognised as duplicates.
///
/// Checked to fail: with [`tally::config::PodConfig::for_engine_thread`]
/// returning the configuration unchanged, the second thread cannot open
/// the RocksDB the first holds ("lock hold by current process") and
/// `start_threads` fails; with the threads' gauge parts set instead of
/// added (`GaugeShares::set` doing `gauge.set(value)`),
/// `tally_assigned_partitions` showed one thread's 3 partitions, not 6.
#[test]
fn engine_threads_split_the_partitions_and_stay_exact() {
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 30_000,
        seed: 47,
        customers: 300,
        ..GenSpec::default()
    });
    let thirds: Vec<&[gen::GenRecord]> = records.chunks(10_000).collect();
    let dir = temp_dir("engine-threads");
    let mut cfg = pod_config(&brokers, "engine-threads", dir.clone());
    let caught_up = || {
        wait_all_committed(
            &brokers,
            "engine-threads",
            "the pod to catch up",
            Duration::from_secs(90),
        );
    };
    let mut all: Vec<gen::GenRecord> = Vec::new();

    // Two threads.
    cfg.resources.engine_threads = 2;
    produce_input(&brokers, thirds[0]);
    all.extend_from_slice(thirds[0]);
    let metrics = Arc::new(Metrics::new());
    let pod = start(&cfg, &metrics);
    caught_up();
    let partitions = partitions_of_input();
    wait_until(
        "both threads to hold partitions",
        Duration::from_secs(60),
        || {
            let h = held(&pod);
            h.iter().all(|p| !p.is_empty()) && h.iter().map(Vec::len).sum::<usize>() == partitions
        },
    );
    let h = held(&pod);
    let union: BTreeSet<i32> = h.iter().flatten().copied().collect();
    assert_eq!(
        union.len(),
        partitions,
        "threads hold overlapping partitions: {h:?}"
    );
    assert_eq!(
        metrics.assigned_partitions.get(),
        partitions as i64,
        "the pod-wide gauge is the sum of the threads' parts"
    );
    assert!(dir.join("thread-0").is_dir() && dir.join("thread-1").is_dir());
    wait_until(
        "every record to be counted once",
        Duration::from_secs(30),
        || metrics.records_consumed.get() >= thirds[0].len() as u64,
    );
    pod::stop_all(pod).unwrap();

    // One thread (the root of the state directory has no state yet, so
    // every partition is restored), then two again (their directories are
    // a third behind): each time with orders of the last third sent again.
    for (threads, part) in [(1, 1), (2, 2)] {
        cfg.resources.engine_threads = threads;
        let again = resent(thirds[part - 1], 100);
        produce_input(&brokers, &again);
        produce_input(&brokers, thirds[part]);
        all.extend(again);
        all.extend_from_slice(thirds[part]);
        let metrics = Arc::new(Metrics::new());
        let pod = start(&cfg, &metrics);
        caught_up();
        assert!(metrics.restore_records.get() > 0, "nothing restored");
        assert!(metrics.events.with_label_values(&["duplicate"]).get() >= 100);
        pod::stop_all(pod).unwrap();
    }

    assert_totals_equal(&published_totals(&brokers), &truth_totals(&all));
    let _ = std::fs::remove_dir_all(dir);
}

fn partitions_of_input() -> usize {
    declared_topics()
        .iter()
        .find(|t| t.name == "raw-orders")
        .map(|t| t.partitions as usize)
        .expect("raw-orders is declared")
}
