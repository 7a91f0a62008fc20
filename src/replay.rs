//! `tally replay`: the batch layer. Recomputes the windows from the retained
//! input log in a scratch engine (no outputs, no state written) and compares
//! them with the live view of `revenue-windows`.
//!
//! Only windows that are **final** in the live view are compared: a closed
//! window never changes, and every order it counted was on its partition
//! before it closed, so a replay that covers its start must agree exactly
//! (count and micro-dollars). Open windows are still moving and are skipped.
//! With `--from <time>` (event time), every retained order is replayed and
//! windows starting before that time are skipped.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::PodConfig;
use crate::kafka::Clients;
use crate::telemetry::metrics::Metrics;
use tally_core::view::WindowQuery;
use tally_core::{Effect, Engine, FxTable};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("serving view: {0}")]
    Serving(#[from] crate::serve::follower::ServingError),
    #[error("invalid from: {0:?} is neither an offset nor an RFC 3339 time")]
    From(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Where the replay starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum From {
    Offset(i64),
    Time(i64),
}

impl From {
    pub fn parse(s: &str) -> Result<From, ReplayError> {
        if let Ok(o) = s.parse::<i64>() {
            if o >= 0 {
                return Ok(From::Offset(o));
            }
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| From::Time(t.timestamp_millis()))
            .map_err(|_| ReplayError::From(s.to_string()))
    }
}

/// One window whose replayed value differs from the live one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Difference {
    pub spec: String,
    pub key: String,
    pub start: i64,
    pub live: (u64, i128),
    pub replayed: Option<(u64, i128)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub records_replayed: u64,
    pub windows_compared: usize,
    pub differences: Vec<Difference>,
    /// Per input partition: the log's range, where the replay began, and
    /// anything it could not read.
    pub partitions: Vec<PartitionRead>,
}

type Totals = BTreeMap<(String, String, i64), (u64, i128)>;

/// What the replay read of one input partition.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PartitionRead {
    pub partition: i32,
    /// The log's first and next offsets when the replay began.
    pub log_start: i64,
    pub log_end: i64,
    /// Where the replay started reading it (`None`: not read).
    pub from: Option<i64>,
    /// Why it was not read, or what it is missing.
    pub note: Option<String>,
}

/// Recomputes every window from `from` to the current end of the input.
/// `reads` receives what was read of each partition.
pub fn recompute(
    cfg: &PodConfig,
    fx: FxTable,
    from: From,
    reads: &mut Vec<PartitionRead>,
) -> Result<(Totals, u64), ReplayError> {
    let mut engine =
        Engine::new(cfg.core()?, fx).map_err(|e| crate::config::ConfigError::Invalid {
            field: e.field,
            message: e.message,
        })?;
    let consumer: BaseConsumer = Clients::new(&cfg.kafka.brokers, &cfg.kafka_properties()?)
        .config(&[
            ("group.id", "tally-replay"),
            ("enable.auto.commit", "false"),
        ])
        .create()?;
    let topic = &cfg.topics.input_topic;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    // Where each partition starts: the offset asked for, or (a time, which
    // is event time) the log's start: the engine needs every order to
    // reproduce the watermarks, and only windows starting at or after the
    // time are compared. A partition with nothing to read is not read:
    // waiting for a position at the log's end would hang the replay
    // until its one-hour deadline.
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in &parts {
        let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        let wanted = match from {
            From::Offset(o) => o,
            From::Time(_) => low,
        };
        let mut read = PartitionRead {
            partition: *p,
            log_start: low,
            log_end: high,
            from: None,
            note: None,
        };
        if wanted >= high {
            read.note = Some("nothing to read".into());
        } else {
            if wanted < low {
                read.note = Some(format!(
                    "the log starts at {low}, after the offset asked for ({wanted}): \
                     the orders before it are gone, windows they belonged to cannot be compared"
                ));
            }
            let o = wanted.max(low);
            read.from = Some(o);
            tpl.add_partition_offset(topic, *p, Offset::Offset(o))?;
            ends.insert(*p, high);
        }
        reads.push(read);
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut records = 0u64;
    let deadline = Instant::now() + Duration::from_secs(3_600);
    let mut positions: HashMap<i32, i64> = HashMap::new();
    while ends
        .iter()
        .any(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 < *end)
    {
        if Instant::now() > deadline {
            return Err(ReplayError::Timeout("reading the input log".into()));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            let pos = consumer.position()?;
            for e in pos.elements() {
                if let Offset::Offset(o) = e.offset() {
                    positions.insert(e.partition(), o - 1);
                }
            }
            continue;
        };
        let m = msg?;
        positions.insert(m.partition(), m.offset());
        if ends
            .get(&m.partition())
            .is_some_and(|end| m.offset() >= *end)
        {
            continue;
        }
        let record_ms = m.timestamp().to_millis();
        engine.on_record_at(
            m.partition(),
            m.offset(),
            m.payload().unwrap_or_default(),
            record_ms,
            record_ms.unwrap_or(0),
            &mut out,
            &mut tally_core::InMemory,
        );
        records += 1;
        out.retain(|e| matches!(e, Effect::Window(w) if w.is_final()));
    }
    for p in &parts {
        engine.finish(*p, &mut out);
    }
    let mut totals: Totals = BTreeMap::new();
    for e in out {
        if let Effect::Window(w) = e {
            if w.is_final() {
                let t = totals
                    .entry((w.spec_name.clone(), w.key.group.clone(), w.key.start))
                    .or_default();
                t.0 += w.row.agg.count;
                t.1 += w.row.agg.revenue_usd_micros;
            }
        }
    }
    Ok((totals, records))
}

/// Replays and compares with the live view's final windows.
pub fn run(cfg: &PodConfig, from: From) -> Result<Report, ReplayError> {
    let extra = cfg.kafka_properties()?;
    let fx_defaults = crate::fx::defaults(cfg.limits.fx_defaults.as_deref()).map_err(|e| {
        crate::config::ConfigError::Invalid {
            field: "fx_defaults".into(),
            message: e.to_string(),
        }
    })?;
    let (fx, _follower) = crate::fx::bootstrap(
        &cfg.kafka.brokers,
        &extra,
        &cfg.topics.fx_topic,
        &fx_defaults,
        Duration::from_secs(30),
    )
    .map_err(|e| ReplayError::Timeout(e.to_string()))?;
    let follower = crate::serve::follower::follow(
        &cfg.kafka.brokers,
        &extra,
        &cfg.topics.windows_topic,
        &cfg.topics.input_topic,
        &cfg.core()?,
        std::sync::Arc::new(Metrics::new()),
    )?;
    let mut reads = Vec::new();
    let (replayed, records) = recompute(cfg, fx, from, &mut reads)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !follower.caught_up.load(std::sync::atomic::Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err(ReplayError::Timeout("reading revenue-windows".into()));
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let view = follower
        .view
        .read()
        .map_err(|_| ReplayError::Timeout("view lock".into()))?;
    let min_start = match from {
        From::Time(t) => t,
        From::Offset(0) => i64::MIN,
        // An offset other than 0 covers windows of unknown start: compare
        // only windows the replay closed itself, i.e. that it fully saw.
        From::Offset(_) => i64::MIN,
    };
    let mut report = Report {
        records_replayed: records,
        partitions: reads,
        ..Report::default()
    };
    for (kind, by) in view.kinds() {
        let q = WindowQuery {
            kind,
            by,
            is_final: Some(true),
            from: (min_start > i64::MIN).then_some(min_start),
            ..WindowQuery::default()
        };
        for w in view.windows(&q) {
            let key = (w.spec.clone(), w.key.clone(), w.start);
            let live = (w.count, w.revenue_usd_micros);
            let replayed_value = replayed.get(&key).copied();
            if matches!(from, From::Offset(o) if o > 0) && replayed_value.is_none() {
                continue;
            }
            report.windows_compared += 1;
            let same = replayed_value.is_some_and(|r| r.0 == live.0 && r.1 == live.1);
            if !same {
                report.differences.push(Difference {
                    spec: w.spec,
                    key: w.key,
                    start: w.start,
                    live,
                    replayed: replayed_value,
                });
            }
        }
    }
    drop(view);
    follower.stop();
    Ok(report)
}
