//! `tally bench`: measured scenarios on the embedded broker. Each prints one
//! JSON line. Compare ratios measured in one run, not absolute figures
//! across runs: the machines are shared.
//!
//! - `flush`: full-job throughput for several flush settings (events/s from
//!   the first record processed to the last offset committed), used to
//!   choose the defaults of `--flush-max-events` and `--flush-interval-ms`.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::broker::EmbeddedBroker;
use crate::config::PodConfig;
use crate::gen::{self, GenSpec};
use crate::pod;
use crate::topics::TopicSpec;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("pod: {0}")]
    Pod(#[from] pod::PodError),
    #[error("timed out: {0}")]
    Timeout(String),
}

fn committed_sum(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<i64, BenchError> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum())
}

/// One pod over a pre-filled topic: events/s.
pub fn pod_throughput(
    topics: &[TopicSpec],
    base: &PodConfig,
    spec: &GenSpec,
    tweak: &dyn Fn(&mut PodConfig),
) -> Result<serde_json::Value, BenchError> {
    let broker = EmbeddedBroker::start(1, topics)?;
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(spec);
    gen::produce(&brokers, &base.input_topic, &[], &records, 0.0, &|| false)?;
    let partitions = topics
        .iter()
        .find(|t| t.name == base.input_topic)
        .map(|t| t.partitions)
        .unwrap_or(1);
    let mut cfg = base.clone();
    cfg.brokers = brokers.clone();
    cfg.group = "bench".into();
    cfg.apply_topics = false;
    cfg.state_dir = std::env::temp_dir().join(format!(
        "tally-bench-{}-{}",
        std::process::id(),
        pod::now_ms()
    ));
    tweak(&mut cfg);
    let handle = pod::start(cfg.clone())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<Instant> = None;
    let total = records.len() as i64;
    loop {
        if first.is_none()
            && handle
                .stats
                .records
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        {
            first = Some(Instant::now());
        }
        if committed_sum(&brokers, "bench", &cfg.input_topic, partitions)? >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("the pod did not catch up".into()));
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    let flushes = handle
        .stats
        .flushes
        .load(std::sync::atomic::Ordering::Relaxed);
    handle.join()?;
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
    Ok(json!({
        "scenario": "flush",
        "flush_max_events": cfg.flush_max_events,
        "flush_interval_ms": cfg.flush_interval_ms,
        "events": total,
        "seconds": secs,
        "events_per_sec": total as f64 / secs,
        "flushes": flushes,
    }))
}

/// The flush sweep.
pub fn flush_sweep(
    topics: &[TopicSpec],
    base: &PodConfig,
    events: u64,
) -> Result<Vec<serde_json::Value>, BenchError> {
    let spec = GenSpec {
        count: events,
        customers: 10_000,
        ..GenSpec::default()
    };
    let settings: [(usize, u64); 6] = [
        (1_000, 100),
        (5_000, 100),
        (20_000, 100),
        (20_000, 50),
        (20_000, 250),
        (100_000, 1_000),
    ];
    let mut out = Vec::new();
    for (n, ms) in settings {
        let line = pod_throughput(topics, base, &spec, &|c| {
            c.flush_max_events = n;
            c.flush_interval_ms = ms;
        })?;
        println!("{line}");
        out.push(line);
    }
    Ok(out)
}
