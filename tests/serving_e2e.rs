//! The serving view over a real pod: after the pod has processed a stream
//! with known truth, the view (materialised from revenue-windows, all
//! partitions merged) reports exactly the truth, and a live pod exports every
//! metric in the README's table.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use support::kafka::*;
use tally::gen::{self, Expect, GenSpec};
use tally::pod;
use tally::serve::follower as serving;
use tally::telemetry::metrics::Metrics;
use tally_core::view::WindowQuery;

#[test]
fn the_view_merges_every_partition_to_the_exact_truth() {
    let specs = declared_topics();
    let broker = TestBroker::start(1, &specs);
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 5_000,
        seed: 31,
        customers: 200,
        ..GenSpec::default()
    });
    produce_input(&brokers, &records);

    let metrics = Arc::new(Metrics::new());
    let cfg = pod_config(&brokers, "serving", temp_dir("serving"));
    let handle = pod::start_with_metrics(cfg.clone(), metrics.clone()).unwrap();
    wait_all_committed(
        &brokers,
        "serving",
        "the pod to catch up",
        Duration::from_secs(90),
    );

    let follower = serving::follow(
        &brokers,
        &[],
        &topic("revenue-windows"),
        &topic("raw-orders"),
        &cfg.core().unwrap(),
        metrics.clone(),
    )
    .unwrap();
    wait_until(
        "the view to read revenue-windows",
        Duration::from_secs(60),
        || follower.caught_up.load(Ordering::SeqCst),
    );

    // Truth: USD micros per currency over the tumbling windows.
    let mut want: BTreeMap<String, i128> = BTreeMap::new();
    for r in &records {
        if let Expect::Valid {
            currency,
            usd_micros,
            ..
        } = &r.expect
        {
            *want.entry(currency.clone()).or_default() += i128::from(*usd_micros);
        }
    }
    let view = follower.view.read().unwrap();
    let spec = view
        .revenue_definition("currency", None)
        .unwrap()
        .expect("a tumbling definition by currency");
    let split = view.revenue_split("currency", &spec, None, None);
    for (cur, micros) in &want {
        let got = split[cur].combined_usd;
        assert!(
            (got - *micros as f64 / 1e6).abs() < 1e-6 * (1.0 + got.abs()),
            "{cur}: {got} vs {micros}"
        );
    }
    // Every window merged across partitions equals the truth, count and micros.
    let truth = truth_totals(&records);
    for ((spec, group, start), (count, micros)) in
        truth.iter().filter(|(k, _)| k.0 == "tumbling_1m_currency")
    {
        let q = WindowQuery {
            kind: "tumbling".into(),
            by: "currency".into(),
            key: Some(group.clone()),
            from: Some(*start),
            to: Some(start + 1),
            ..Default::default()
        };
        let rows = view.windows(&q);
        assert_eq!(rows.len(), 1, "{spec} {group} {start}");
        assert_eq!(rows[0].count, *count);
        assert!((rows[0].revenue_usd - *micros as f64 / 1e6).abs() < 1e-6);
    }
    assert_eq!(view.as_of().partitions.len(), 6);
    drop(view);

    // A live pod exports every metric.
    metrics
        .http_duration
        .with_label_values(&["/revenue", "GET", "200"])
        .observe(0.001);
    let text = metrics.render();
    for name in tally::telemetry::metrics::NAMES {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} not exported by a live pod"
        );
    }
    let lag0 = format!(
        "tally_consumergroup_lag{{consumergroup=\"{}\",partition=\"0\",topic=\"{}\"}} 0",
        group("serving"),
        topic("raw-orders")
    );
    assert!(text.contains(&lag0), "{text}");
    follower.stop();
    handle.join().unwrap();
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
}

/// Bounded serving state : with a retention of 30 s
/// of event time, every window that ended more than that before the
/// watermark is tombstoned on `revenue-windows` (latest-per-key: gone), the
/// windows within it are still there and exact, and a view following the
/// topic holds only those. Checked to fail with the engine's `Expired`
/// effects switched off (the shell's part): the wait for the tombstones
/// timed out ("timed out waiting for the expired windows' tombstones").
#[test]
fn windows_past_their_retention_are_tombstoned_and_dropped() {
    // On an external broker the tests of one process share their topics
    // (one prefix a process), and this one's 72,000 orders would land in
    // the other test's input.
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    // 72,000 orders 10 ms apart: 12 minutes of event time.
    let records = gen::generate(&GenSpec {
        count: 72_000,
        seed: 37,
        customers: 200,
        ..GenSpec::default()
    });
    produce_input(&brokers, &records);
    const RETENTION: i64 = 120_000;
    let mut cfg = pod_config(&brokers, "retention", temp_dir("retention"));
    cfg.job.window_retention_ms = RETENTION;
    let metrics = Arc::new(Metrics::new());
    let handle = pod::start_with_metrics(cfg.clone(), metrics.clone()).unwrap();
    wait_all_committed(
        &brokers,
        "retention",
        "the pod to catch up",
        Duration::from_secs(120),
    );
    let max_t = records
        .iter()
        .filter_map(|r| match &r.expect {
            Expect::Valid { created_at_ms, .. } => Some(*created_at_ms),
            _ => None,
        })
        .max()
        .unwrap();
    // The watermark trails the largest event time by the allowed
    // out-of-orderness (5 s); a minute of margin on either side.
    let gone_by = max_t - 5_000 - RETENTION - 60_000;
    let kept_from = max_t - RETENTION + 60_000;
    let truth = truth_totals(&records);
    let tumbling = |t: &Totals| -> BTreeMap<i64, u64> {
        let mut m = BTreeMap::new();
        for ((spec, _, start), (count, _)) in t {
            if spec == "tumbling_1m_currency" {
                *m.entry(*start).or_default() += count;
            }
        }
        m
    };
    let want = tumbling(&truth);
    assert!(
        want.keys().any(|s| s + 60_000 <= gone_by),
        "some windows expire"
    );
    wait_until(
        "the expired windows' tombstones",
        Duration::from_secs(60),
        || {
            tumbling(&published_totals(&brokers))
                .keys()
                .all(|s| s + 60_000 > gone_by)
        },
    );
    let got = tumbling(&published_totals(&brokers));
    for (start, count) in want.range(kept_from..) {
        assert_eq!(got.get(start), Some(count), "window {start} is kept, exact");
    }
    assert!(metrics.windows_expired.get() > 0);

    // A view of the topic holds only the windows within the retention.
    let follower = serving::follow(
        &brokers,
        &[],
        &topic("revenue-windows"),
        &topic("raw-orders"),
        &cfg.core().unwrap(),
        metrics.clone(),
    )
    .unwrap();
    wait_until(
        "the view to read revenue-windows",
        Duration::from_secs(60),
        || follower.caught_up.load(Ordering::SeqCst),
    );
    {
        let view = follower.view.read().unwrap();
        let q = WindowQuery {
            kind: "tumbling".into(),
            by: "currency".into(),
            ..Default::default()
        };
        let starts: Vec<i64> = view.windows(&q).iter().map(|w| w.start).collect();
        assert!(
            starts.iter().all(|s| s + 60_000 > gone_by),
            "expired windows served: {starts:?} (gone by {gone_by})"
        );
        assert!(starts.iter().any(|s| *s >= kept_from));
    }
    follower.stop();
    handle.join().unwrap();
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
}
