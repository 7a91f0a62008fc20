//! State moves between pods through the changelog: a pod with an empty
//! state directory restores a partition from the changelog and resumes from
//! the last committed work (not from the start of the input); a pod whose
//! local state is behind restores only the changelog's tail. Totals stay exact.

mod support;

use std::time::Duration;

use support::kafka::*;
use tally::gen::{self, GenSpec};
use tally::pod;

/// Waits until group `group` has committed every input record.
fn caught_up(brokers: &str, group: &str) {
    wait_all_committed(
        brokers,
        group,
        "the pod to catch up",
        Duration::from_secs(90),
    );
}

#[test]
fn a_partition_moves_through_the_changelog() {
    let specs = declared_topics();
    let broker = TestBroker::start(1, &specs);
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 9_000,
        seed: 41,
        customers: 300,
        ..GenSpec::default()
    });
    let (a, rest) = records.split_at(3_000);
    let (b, c) = rest.split_at(3_000);
    let caught_up = || caught_up(&brokers, "restore");

    // Pod 1 processes the first third, then stops.
    let dir1 = temp_dir("restore-1");
    produce_input(&brokers, a);
    let pod1 = pod::start(pod_config(&brokers, "restore", dir1.clone())).unwrap();
    caught_up();
    pod1.join().unwrap();

    // Pod 2 starts with an empty state directory: it restores every
    // partition from the changelog and processes only the second third.
    produce_input(&brokers, b);
    let dir2 = temp_dir("restore-2");
    let pod2 = pod::start(pod_config(&brokers, "restore", dir2.clone())).unwrap();
    caught_up();
    let stats2 = pod2.stats.clone();
    pod2.join().unwrap();
    assert!(
        stats2.restored_rows() > 0,
        "nothing was restored from the changelog"
    );
    assert_eq!(
        stats2.records(),
        b.len() as u64,
        "pod 2 must resume, not start over"
    );
    let changelog_total: i64 = end_offsets(&brokers, "tally-changelog").values().sum();

    // Pod 1 comes back with its old local state: it applies only the tail
    // that pod 2 wrote, then processes the last third.
    produce_input(&brokers, c);
    let pod1 = pod::start(pod_config(&brokers, "restore", dir1.clone())).unwrap();
    caught_up();
    let stats1 = pod1.stats.clone();
    pod1.join().unwrap();
    let tail = stats1.restored_rows();
    assert!(
        tail > 0 && (tail as i64) < changelog_total,
        "expected only the tail: {tail} of {changelog_total}"
    );
    assert_eq!(stats1.records(), c.len() as u64);

    assert_totals_equal(&published_totals(&brokers), &truth_totals(&records));
    for d in [dir1, dir2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// State beyond the cache budget is still exact: a pod whose
/// caches hold nothing (`--dedup-cache-entries 0 --session-cache-sets 0`:
/// every dedup entry and session set leaves memory once durable, every
/// lookup and every session fold reads RocksDB, and sessions not in
/// memory close from the store's close-time index) processes the orders
/// of 300 customers, stops, and comes back (its restore keeps neither in
/// memory) for the second part, which sends 300 orders of the first part
/// again. Those are recognised as duplicates, and the totals, sessions
/// included, equal the batch truth. Checked to fail with the engine's
/// dedup reader ignored (the entry taken for absent on a miss): the
/// resent orders were counted again ("17 duplicates recognised of 300
/// resent": only the generator's own); with the session reader ignored
/// (a new set started on a miss), every session split at each flush
/// ("600 of 330 windows differ": c0's session 11 orders of 18).
#[test]
fn state_beyond_the_cache_is_read_from_rocksdb() {
    // On an external broker the tests of one process share their topics.
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 4_000,
        seed: 43,
        customers: 300,
        ..GenSpec::default()
    });
    let (a, b) = records.split_at(2_000);
    let resent = resent(a, 300);
    let dir = temp_dir("dedup-cache");
    let mut cfg = pod_config(&brokers, "dedup-cache", dir.clone());
    cfg.resources.dedup_cache_entries = Some(0);
    cfg.resources.session_cache_sets = Some(0);
    let caught_up = || caught_up(&brokers, "dedup-cache");
    produce_input(&brokers, a);
    let pod1 = pod::start(cfg.clone()).unwrap();
    caught_up();
    let m1 = pod1.metrics.clone();
    pod1.join().unwrap();
    for kind in ["dedup", "sessions"] {
        assert!(
            m1.state_cache_evictions.with_label_values(&[kind]).get() > 0,
            "no {kind} row left memory"
        );
    }

    produce_input(&brokers, &resent);
    produce_input(&brokers, b);
    let pod2 = pod::start(cfg).unwrap();
    caught_up();
    let m2 = pod2.metrics.clone();
    pod2.join().unwrap();
    let duplicates = m2.events.with_label_values(&["duplicate"]).get();
    assert!(
        duplicates >= resent.len() as u64,
        "{duplicates} duplicates recognised of {} resent",
        resent.len()
    );
    for kind in ["dedup", "sessions"] {
        assert!(
            m2.state_cache_lookups
                .with_label_values(&[kind, "miss"])
                .get()
                > 0
        );
    }
    let mut all = records.clone();
    all.extend(resent);
    assert_totals_equal(&published_totals(&brokers), &truth_totals(&all));
    let _ = std::fs::remove_dir_all(dir);
}

/// Dedup entries reach the changelog as one segment row per partition per
/// flush, not one record per order (to cut write amplification):
/// before, every new order cost a changelog record of its own, and its
/// tombstone an hour later, so the changelog carried twice as many dedup
/// records as orders. The entries still move between pods: a pod with an
/// empty state directory restores them from the segments (once with a
/// dedup cache of nothing, every lookup a RocksDB read of the expanded
/// rows, once with every entry in memory) and recognises resent orders as
/// duplicates; the totals equal the batch truth. Checked to fail on the
/// code before segments (the engine patched back to per-id puts): "1961 per-id
/// dedup records in the changelog".
#[test]
fn dedup_entries_reach_the_changelog_as_segments() {
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 3_000,
        seed: 47,
        customers: 200,
        ..GenSpec::default()
    });
    let (a, rest) = records.split_at(2_000);
    let (b, c) = rest.split_at(500);
    let resent_b = resent(a, 200);
    let resent_c = resent(&a[1_000..], 200);
    let caught_up = || caught_up(&brokers, "segments");
    let run = |dir: &std::path::Path, cache: Option<u64>| {
        let mut cfg = pod_config(&brokers, "segments", dir.to_path_buf());
        cfg.resources.dedup_cache_entries = cache;
        let pod = pod::start(cfg).unwrap();
        caught_up();
        let m = pod.metrics.clone();
        let stats = pod.stats.clone();
        pod.join().unwrap();
        (m.events.with_label_values(&["duplicate"]).get(), stats)
    };

    produce_input(&brokers, a);
    let dir1 = temp_dir("segments-1");
    run(&dir1, None);
    // The first byte of an encoded key is its `RowKey` variant: 2 is a
    // per-id dedup entry, 6 a dedup segment.
    let changelog = read_all(&brokers, "tally-changelog");
    let tag = |t: u8| {
        changelog
            .iter()
            .filter(|r| r.key.as_deref().and_then(|k| k.first()) == Some(&t))
            .count()
    };
    assert_eq!(
        tag(2),
        0,
        "{} per-id dedup records in the changelog",
        tag(2)
    );
    let segments = tag(6);
    assert!(
        segments > 0 && segments < a.len() / 10,
        "{segments} dedup segments for {} orders",
        a.len()
    );

    // A new pod, nothing local, no dedup entry in memory: the entries
    // come from the segments through RocksDB.
    produce_input(&brokers, &resent_b);
    produce_input(&brokers, b);
    let dir2 = temp_dir("segments-2");
    let (dups, stats) = run(&dir2, Some(0));
    assert!(stats.restored_rows() > 0, "nothing was restored");
    assert!(
        dups >= resent_b.len() as u64,
        "{dups} duplicates recognised of {} resent",
        resent_b.len()
    );

    // Another, with every entry in memory.
    produce_input(&brokers, &resent_c);
    produce_input(&brokers, c);
    let dir3 = temp_dir("segments-3");
    let (dups, _) = run(&dir3, None);
    assert!(
        dups >= resent_c.len() as u64,
        "{dups} duplicates recognised of {} resent",
        resent_c.len()
    );

    let mut all = records.clone();
    all.extend(resent_b);
    all.extend(resent_c);
    assert_totals_equal(&published_totals(&brokers), &truth_totals(&all));
    for d in [dir1, dir2, dir3] {
        let _ = std::fs::remove_dir_all(d);
    }
}
