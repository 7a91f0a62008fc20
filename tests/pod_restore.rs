//! State moves between pods through the changelog: a pod with an empty
//! state directory restores a partition from the changelog and resumes from
//! the last committed work (not from the start of the input); a pod whose
//! local state is behind restores only the changelog's tail. Totals stay exact.

mod support;

use std::time::Duration;

use support::kafka::*;
use tally::gen::{self, GenSpec};
use tally::pod;

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
    let caught_up = || {
        wait_all_committed(
            &brokers,
            "restore",
            "the pod to catch up",
            Duration::from_secs(90),
        );
    };

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
