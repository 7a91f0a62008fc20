//! Prometheus metrics. Names follow Prometheus conventions (snake_case, base
//! units, `_total` on counters). The pod updates them once per flush or
//! tick, never per record. Consumer lag comes first, in kafka_exporter's
//! shape: `tally_consumergroup_lag{consumergroup,topic,partition}` and
//! `tally_consumergroup_lag_sum{consumergroup,topic}`.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use tally_core::Reason;

/// One engine thread's part of the pod-wide gauges (`--engine-threads`):
/// each thread adds the change of its own value, so a gauge such as
/// `tally_assigned_partitions` is the sum over the pod's threads. With one
/// thread this is the same as setting it. Keyed by a name of the caller's
/// and the label values; a per-flush cost, never per record.
#[derive(Default)]
pub struct GaugeShares(
    std::cell::RefCell<std::collections::HashMap<(&'static str, &'static str), i64>>,
);

impl GaugeShares {
    /// Sets this thread's part of `gauge` to `value`.
    pub fn set(&self, gauge: &IntGauge, key: (&'static str, &'static str), value: i64) {
        let mut m = self.0.borrow_mut();
        let last = m.entry(key).or_insert(0);
        gauge.add(value - *last);
        *last = value;
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub consumergroup_lag: IntGaugeVec,
    pub consumergroup_lag_sum: IntGaugeVec,
    pub log_end_offset: IntGaugeVec,
    pub revenue: prometheus::CounterVec,
    pub records_consumed: IntCounter,
    pub events: IntCounterVec,
    pub invalid_events: IntCounterVec,
    pub watermark: GaugeVec,
    pub watermark_delay: GaugeVec,
    pub open_windows: IntGaugeVec,
    pub flush_duration: Histogram,
    pub flush_records: Histogram,
    pub flush_failures: IntCounter,
    pub commit_failures: IntCounter,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub restore_records: IntCounter,
    pub restore_retries: IntCounter,
    pub resume_reseeks: IntCounter,
    pub restore_stale_records: IntCounter,
    pub rebuilds_refused: IntCounter,
    pub rebuilds: IntCounter,
    pub local_state_discarded: IntCounterVec,
    pub state_cache_entries: IntGaugeVec,
    pub state_cache_bytes: IntGaugeVec,
    pub state_cache_lookups: IntCounterVec,
    pub state_cache_evictions: IntCounterVec,
    pub rocksdb_memory: IntGaugeVec,
    pub fx_late_rates: IntCounter,
    pub fx_versions: IntGauge,
    pub windows_expired: IntCounter,
    pub restore_duration: Histogram,
    pub restoring_partitions: IntGauge,
    pub restore_remaining: IntGaugeVec,
    pub view_records: IntCounter,
    pub view_invalid_records: IntCounter,
    pub view_shelf_errors: IntCounter,
    pub http_duration: HistogramVec,
    pub webhook_requests: IntCounterVec,
    pub ready: Gauge,
}

/// The metric names, for docs and for the dashboard test.
pub const NAMES: &[&str] = &[
    "tally_consumergroup_lag",
    "tally_consumergroup_lag_sum",
    "tally_partition_log_end_offset",
    "tally_revenue_total",
    "tally_records_consumed_total",
    "tally_events_total",
    "tally_invalid_events_total",
    "tally_watermark_seconds",
    "tally_watermark_delay_seconds",
    "tally_open_windows",
    "tally_flush_duration_seconds",
    "tally_flush_records",
    "tally_flush_failures_total",
    "tally_commit_failures_total",
    "tally_rebalances_total",
    "tally_assigned_partitions",
    "tally_restore_records_total",
    "tally_restore_retries_total",
    "tally_resume_reseeks_total",
    "tally_restore_stale_records_total",
    "tally_rebuilds_refused_total",
    "tally_rebuilds_total",
    "tally_local_state_discarded_total",
    "tally_state_cache_entries",
    "tally_state_cache_bytes",
    "tally_state_cache_lookups_total",
    "tally_state_cache_evictions_total",
    "tally_rocksdb_memory_bytes",
    "tally_fx_late_rates_total",
    "tally_fx_versions",
    "tally_windows_expired_total",
    "tally_restore_duration_seconds",
    "tally_restoring_partitions",
    "tally_restore_remaining_records",
    "tally_view_records_total",
    "tally_view_invalid_records_total",
    "tally_view_shelf_errors_total",
    "tally_http_request_duration_seconds",
    "tally_webhook_requests_total",
    "tally_ready",
];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are constants and unique, so registration cannot fail.
    let _ = r.register(Box::new(m.clone()));
    m
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let lag = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let m = Metrics {
            consumergroup_lag: reg(
                &r,
                lag(
                    "tally_consumergroup_lag",
                    "Consumer lag: log end offset minus committed offset",
                    &["consumergroup", "topic", "partition"],
                )
                .expect("valid metric"),
            ),
            consumergroup_lag_sum: reg(
                &r,
                lag(
                    "tally_consumergroup_lag_sum",
                    "Consumer lag summed over the partitions this pod holds",
                    &["consumergroup", "topic"],
                )
                .expect("valid metric"),
            ),
            log_end_offset: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tally_partition_log_end_offset",
                        "Log end offset of each held input partition (its rate is the produce rate)",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric"),
            ),
            revenue: reg(
                &r,
                prometheus::CounterVec::new(
                    Opts::new(
                        "tally_revenue_total",
                        "Revenue of accepted orders in units of their currency; a monitoring \
                         signal (work redone after a crash counts again), exact figures are in /revenue",
                    ),
                    &["currency"],
                )
                .expect("valid metric"),
            ),
            records_consumed: reg(
                &r,
                IntCounter::new("tally_records_consumed_total", "Input records consumed")
                    .expect("valid metric"),
            ),
            events: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tally_events_total",
                        "Input records by outcome: valid, invalid, late, duplicate",
                    ),
                    &["outcome"],
                )
                .expect("valid metric"),
            ),
            invalid_events: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tally_invalid_events_total",
                        "Rejected input records by reason",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            watermark: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "tally_watermark_seconds",
                        "Event-time watermark per input partition (epoch seconds)",
                    ),
                    &["partition"],
                )
                .expect("valid metric"),
            ),
            watermark_delay: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "tally_watermark_delay_seconds",
                        "Wall clock minus the partition's watermark",
                    ),
                    &["partition"],
                )
                .expect("valid metric"),
            ),
            open_windows: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("tally_open_windows", "Windows not yet final, by kind"),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            flush_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tally_flush_duration_seconds",
                        "Flush time: outputs acked, state written, offsets committed",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            flush_records: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("tally_flush_records", "Input records per flush").buckets(
                        vec![
                            1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0,
                            100_000.0,
                        ],
                    ),
                )
                .expect("valid metric"),
            ),
            flush_failures: reg(
                &r,
                IntCounter::new(
                    "tally_flush_failures_total",
                    "Flushes whose outputs were not acknowledged in time",
                )
                .expect("valid metric"),
            ),
            commit_failures: reg(
                &r,
                IntCounter::new("tally_commit_failures_total", "Failed Kafka offset commits")
                    .expect("valid metric"),
            ),
            rebalances: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("tally_rebalances_total", "Rebalance callbacks by kind"),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            assigned_partitions: reg(
                &r,
                IntGauge::new(
                    "tally_assigned_partitions",
                    "Input partitions this pod holds",
                )
                .expect("valid metric"),
            ),
            restore_records: reg(
                &r,
                IntCounter::new(
                    "tally_restore_records_total",
                    "State rows restored on assignment",
                )
                .expect("valid metric"),
            ),
            restore_retries: reg(
                &r,
                IntCounter::new(
                    "tally_restore_retries_total",
                    "Restore steps retried after a transient broker error (a stalled restore)",
                )
                .expect("valid metric"),
            ),
            resume_reseeks: reg(
                &r,
                IntCounter::new(
                    "tally_resume_reseeks_total",
                    "Seeks to a restored partition's resume offset done again: the first record \
                     read after the seek was past it",
                )
                .expect("valid metric"),
            ),
            restore_stale_records: reg(
                &r,
                IntCounter::new(
                    "tally_restore_stale_records_total",
                    "Changelog records ignored by restore: written under an older ownership epoch after a newer one (a stale writer's)",
                )
                .expect("valid metric"),
            ),
            rebuilds_refused: reg(
                &r,
                IntCounter::new(
                    "tally_rebuilds_refused_total",
                    "Partitions whose rebuild from the input log was refused because the log no longer starts at offset 0 (orders would be lost)",
                )
                .expect("valid metric"),
            ),
            rebuilds: reg(
                &r,
                IntCounter::new(
                    "tally_rebuilds_total",
                    "Partitions rebuilt from the input log because their state could not be restored (a record of another format, a changelog that lost records)",
                )
                .expect("valid metric"),
            ),
            state_cache_entries: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tally_state_cache_entries",
                        "Rows held in memory by kind: dedup entries, session sets (the rest are in RocksDB)",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            state_cache_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tally_state_cache_bytes",
                        "Estimated memory of the rows held, by kind: entries times their measured cost (400 B a dedup entry, 600 B a session set)",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            state_cache_lookups: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tally_state_cache_lookups_total",
                        "State lookups by kind (dedup, sessions) and result: hit (in memory) or miss (read from RocksDB)",
                    ),
                    &["kind", "result"],
                )
                .expect("valid metric"),
            ),
            state_cache_evictions: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tally_state_cache_evictions_total",
                        "Rows dropped from memory once durable (over the cache limit), by kind",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            rocksdb_memory: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tally_rocksdb_memory_bytes",
                        "RocksDB's own memory by kind: block_cache, memtables",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            local_state_discarded: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tally_local_state_discarded_total",
                        "Partitions whose local state was not trusted and restored in full from the changelog, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            fx_late_rates: reg(
                &r,
                IntCounter::new(
                    "tally_fx_late_rates_total",
                    "FX rate versions that arrived in force from a time the pod had already processed orders of (they apply from then on; closed windows never change)",
                )
                .expect("valid metric"),
            ),
            fx_versions: reg(
                &r,
                IntGauge::new(
                    "tally_fx_versions",
                    "FX rate versions in the pod's table, over every currency (each in force from its time)",
                )
                .expect("valid metric"),
            ),
            windows_expired: reg(
                &r,
                IntCounter::new(
                    "tally_windows_expired_total",
                    "Window and session partials tombstoned on revenue-windows because their retention (event time after their end) passed",
                )
                .expect("valid metric"),
            ),
            restore_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tally_restore_duration_seconds",
                        "Time to restore one partition's state",
                    )
                    .buckets(vec![
                        0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            restoring_partitions: reg(
                &r,
                IntGauge::new(
                    "tally_restoring_partitions",
                    "Assigned partitions still restoring their state (not ready for them)",
                )
                .expect("valid metric"),
            ),
            restore_remaining: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tally_restore_remaining_records",
                        "Changelog records left to restore, by partition",
                    ),
                    &["partition"],
                )
                .expect("valid metric"),
            ),
            view_shelf_errors: reg(
                &r,
                IntCounter::new(
                    "tally_view_shelf_errors_total",
                    "Reads and writes of the view's on-disk session store that failed (the customer's sessions are served again after their next update)",
                )
                .expect("valid metric"),
            ),
            view_records: reg(
                &r,
                IntCounter::new(
                    "tally_view_records_total",
                    "revenue-windows records applied to the serving view",
                )
                .expect("valid metric"),
            ),
            view_invalid_records: reg(
                &r,
                IntCounter::new(
                    "tally_view_invalid_records_total",
                    "revenue-windows records the view could not use",
                )
                .expect("valid metric"),
            ),
            http_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tally_http_request_duration_seconds",
                        "HTTP request latency",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                        1.0,
                    ]),
                    &["route", "method", "status"],
                )
                .expect("valid metric"),
            ),
            webhook_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("tally_webhook_requests_total", "Webhook requests by result"),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            ready: reg(
                &r,
                Gauge::new("tally_ready", "1 when /readyz answers 200").expect("valid metric"),
            ),
            registry: r,
        };
        for outcome in ["valid", "invalid", "late", "duplicate"] {
            m.events.with_label_values(&[outcome]);
        }
        for reason in Reason::ALL {
            m.invalid_events.with_label_values(&[reason.as_str()]);
        }
        for kind in ["assign", "revoke"] {
            m.rebalances.with_label_values(&[kind]);
        }
        for kind in ["dedup", "sessions"] {
            m.state_cache_entries.with_label_values(&[kind]);
            m.state_cache_bytes.with_label_values(&[kind]);
            m.state_cache_evictions.with_label_values(&[kind]);
            for result in ["hit", "miss"] {
                m.state_cache_lookups.with_label_values(&[kind, result]);
            }
        }
        for kind in ["block_cache", "memtables"] {
            m.rocksdb_memory.with_label_values(&[kind]);
        }
        for reason in [
            "stale_writer",
            "long_absence",
            "ahead_of_changelog",
            "lost_assignment",
            "fenced_commit",
        ] {
            m.local_state_discarded.with_label_values(&[reason]);
        }
        for result in [
            "accepted",
            "unauthorized",
            "invalid",
            "too_large",
            "timeout",
            "replayed",
            "disabled",
            "unavailable",
        ] {
            m.webhook_requests.with_label_values(&[result]);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_shares_sum_over_threads() {
        let g = IntGauge::new("g", "g").unwrap();
        let (a, b) = (GaugeShares::default(), GaugeShares::default());
        a.set(&g, ("x", ""), 3);
        b.set(&g, ("x", ""), 4);
        assert_eq!(g.get(), 7);
        a.set(&g, ("x", ""), 1);
        assert_eq!(g.get(), 5);
        b.set(&g, ("x", ""), 0);
        assert_eq!(g.get(), 1);
    }

    #[test]
    fn every_listed_name_is_exported_and_follows_conventions() {
        let m = Metrics::new();
        m.consumergroup_lag
            .with_label_values(&["g", "raw-orders", "0"])
            .set(3);
        m.consumergroup_lag_sum
            .with_label_values(&["g", "raw-orders"])
            .set(3);
        m.watermark.with_label_values(&["0"]).set(1.0);
        m.watermark_delay.with_label_values(&["0"]).set(1.0);
        m.open_windows.with_label_values(&["tumbling"]).set(1);
        m.http_duration
            .with_label_values(&["/revenue", "GET", "200"])
            .observe(0.001);
        m.webhook_requests.with_label_values(&["accepted"]).inc();
        m.log_end_offset
            .with_label_values(&["raw-orders", "0"])
            .set(9);
        m.revenue.with_label_values(&["EUR"]).inc_by(1.5);
        m.restore_remaining.with_label_values(&["0"]).set(0);
        let text = m.render();
        for name in NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
            let counter = text.contains(&format!("# TYPE {name} counter"));
            assert_eq!(
                counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
        }
    }
}
