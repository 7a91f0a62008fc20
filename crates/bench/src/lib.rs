//! `tally-bench`: measured scenarios, mostly on the embedded broker, kept
//! out of the production binary. Each prints one JSON line. Compare ratios
//! measured in one run, not absolute figures across runs: the machines are
//! shared.
//!
//! - [`serving`]: `/revenue` latency (p50, p99) under an open-loop request
//!   rate while the pod ingests at a fixed rate, and freshness (produce →
//!   visible in the view) from probe orders.
//! - [`flush_sweep`]: full-job throughput for several flush settings
//!   (events/s from the first record processed to the last offset
//!   committed), used to choose the defaults of `--flush-max-events` and
//!   `--flush-interval-ms`.
//! - [`ceiling`]: the raw consume rate and the full job, in one run.
//! - [`restore`]: one partition of N state rows restored from the changelog.
//! - [`latency`]: produce → window update visible, at a fixed rate.
//! - [`rss`]: peak RSS of a `tally run` child holding N open sessions.
//! - [`view`]: the serving view's memory per window, and a new view's
//!   catch-up time on `revenue-windows`.
//! - [`throughput`]: the pass-through pipe and the full job on one
//!   external broker, in one run: events/s and CPU per event.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use tally::config::PodConfig;
use tally::gen::{self, GenSpec};
use tally::kafka::broker::EmbeddedBroker;
use tally::kafka::topics::TopicSpec;
use tally::pod;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("pod: {0}")]
    Pod(#[from] pod::PodError),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("topics: {0}")]
    Topics(#[from] tally::kafka::topics::TopicError),
    #[error("configuration: {0}")]
    Config(#[from] tally::config::ConfigError),
    #[error("state: {0}")]
    Store(#[from] tally::state::store::StoreError),
    #[error("state: {0}")]
    Codec(#[from] tally::state::codec::CodecError),
    #[error("serving: {0}")]
    Serving(#[from] tally::serve::follower::ServingError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The `tally` binary built beside the running executable (the same
/// target directory and profile): `target/<profile>/tally`, also from a
/// test under `target/<profile>/deps/`.
pub fn sibling_tally_binary() -> Result<PathBuf, BenchError> {
    let me = std::env::current_exe()?;
    let name = format!("tally{}", std::env::consts::EXE_SUFFIX);
    let mut dir = me.parent();
    while let Some(d) = dir {
        let candidate = d.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n != "deps") {
            break;
        }
        dir = d.parent();
    }
    Err(BenchError::Io(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!(
            "no {name} beside {}: build it (cargo build --workspace) or pass --tally-bin",
            me.display()
        ),
    )))
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
    gen::produce(
        &brokers,
        &base.topics.input_topic,
        &[],
        &records,
        0.0,
        &|| false,
    )?;
    let partitions = partitions_of(topics, &base.topics.input_topic);
    measure_pod(
        &brokers,
        base,
        records.len() as i64,
        partitions,
        "bench",
        tweak,
    )
}

/// Runs one pod over `total` records already in the input topic: events/s
/// from the first record processed to the last offset committed.
fn measure_pod(
    brokers: &str,
    base: &PodConfig,
    total: i64,
    partitions: i32,
    group: &str,
    tweak: &dyn Fn(&mut PodConfig),
) -> Result<serde_json::Value, BenchError> {
    let mut cfg = bench_pod_config(base, brokers, group);
    tweak(&mut cfg);
    let handle = pod::start(cfg.clone())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<Instant> = None;
    loop {
        if first.is_none() && handle.stats.records() > 0 {
            first = Some(Instant::now());
        }
        if committed_sum(brokers, group, &cfg.topics.input_topic, partitions)? >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("the pod did not catch up".into()));
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    let flushes = handle.stats.flushes();
    handle.join()?;
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
    Ok(json!({
        "scenario": "flush",
        "flush_max_events": cfg.flush.flush_max_events,
        "flush_interval_ms": cfg.flush.flush_interval_ms,
        "events": total,
        "seconds": secs,
        "events_per_sec": total as f64 / secs,
        "flushes": flushes,
    }))
}

/// The declared partition count of `topic` (1 if it is not declared).
fn partitions_of(topics: &[TopicSpec], topic: &str) -> i32 {
    topics
        .iter()
        .find(|t| t.name == topic)
        .map_or(1, |t| t.partitions)
}

/// The pod of a scenario: on `brokers`, in `group`, topics already made,
/// with a fresh state directory of its own.
fn bench_pod_config(base: &PodConfig, brokers: &str, group: &str) -> PodConfig {
    let mut cfg = base.clone();
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.group = group.into();
    cfg.topics.apply_topics = false;
    cfg.resources.state_dir = std::env::temp_dir().join(format!(
        "tally-{group}-{}-{}",
        std::process::id(),
        pod::now_ms()
    ));
    cfg
}

/// A group-less reader of every partition of `topic` from the beginning,
/// with the pod's short fetch wait.
fn reader_from_start(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<BaseConsumer, BenchError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// `ceiling`: the raw consume rate of a pre-filled input topic (rdkafka, no
/// processing), then the full job on the same broker and topic, and their
/// ratio, measured in one run.
pub fn ceiling(
    topics: &[TopicSpec],
    base: &PodConfig,
    events: u64,
) -> Result<serde_json::Value, BenchError> {
    let broker = EmbeddedBroker::start(1, topics)?;
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: events,
        customers: 10_000,
        ..GenSpec::default()
    });
    gen::produce(
        &brokers,
        &base.topics.input_topic,
        &[],
        &records,
        0.0,
        &|| false,
    )?;
    let total = records.len() as i64;
    drop(records);
    let partitions = partitions_of(topics, &base.topics.input_topic);

    // Raw consume: same client settings as the pod's fetches, no processing.
    let consumer = reader_from_start(&brokers, "bench-raw", &base.topics.input_topic, partitions)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut n, mut bytes, mut first) = (0i64, 0usize, None);
    while n < total {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("raw consume did not finish".into()));
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            first.get_or_insert_with(Instant::now);
            bytes += rdkafka::message::Message::payload(&m).map_or(0, <[u8]>::len);
            n += 1;
        }
    }
    let raw_secs = first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
    drop(consumer);
    let raw = total as f64 / raw_secs;

    let job = measure_pod(&brokers, base, total, partitions, "bench-ceiling", &|_| {})?;
    let job_rate = job["events_per_sec"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "scenario": "ceiling",
        "events": total,
        "payload_bytes": bytes,
        "raw_consume_events_per_sec": raw,
        "full_job_events_per_sec": job_rate,
        "full_job_over_ceiling": job_rate / raw,
        "full_job_flushes": job["flushes"],
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
            c.flush.flush_max_events = n;
            c.flush.flush_interval_ms = ms;
        })?;
        println!("{line}");
        out.push(line);
    }
    Ok(out)
}

/// Percentile of sorted samples (nearest rank).
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One HTTP/1.1 GET on a kept-alive connection; reads the whole response.
async fn http_get(
    conn: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    path: &str,
) -> std::io::Result<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
        .await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    Ok(status)
}

/// Open-loop HTTP load: `GET /revenue` at `rps` requests/s for `seconds`
/// on 8 kept-alive connections. Latency counts from each request's
/// scheduled time, so a stall is not hidden; a failed request counts as
/// infinite.
async fn http_load(addr: std::net::SocketAddr, rps: f64, seconds: f64) -> Vec<f64> {
    let conns = 8usize;
    let per_conn_interval = Duration::from_secs_f64(conns as f64 / rps);
    let started = tokio::time::Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                return out;
            };
            let mut conn = tokio::io::BufReader::new(stream);
            let mut next = started + per_conn_interval.mul_f64(c as f64 / conns as f64);
            while next < end {
                tokio::time::sleep_until(next).await;
                match http_get(&mut conn, "/revenue").await {
                    Ok(200) => out.push(next.elapsed().as_secs_f64() * 1000.0),
                    _ => out.push(f64::INFINITY),
                }
                next += per_conn_interval;
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

/// Serving under load: the pod ingests at `rate` events/s while `/revenue`
/// gets `rps` requests/s (open loop: latency counts from the scheduled send
/// time, so a stall is not hidden), and probe orders measure freshness: the
/// time from producing an order to its effect being visible in the view.
pub fn serving(
    topics: &[TopicSpec],
    base: &PodConfig,
    rate: f64,
    rps: f64,
    seconds: f64,
) -> Result<serde_json::Value, BenchError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let broker = EmbeddedBroker::start(1, topics)?;
    let brokers = broker.bootstrap_servers();
    let metrics = Arc::new(tally::telemetry::metrics::Metrics::new());
    let cfg = bench_pod_config(base, &brokers, "bench-serving");
    let handle = pod::start_with_metrics(cfg.clone(), metrics.clone())?;
    let follower = tally::serve::follower::follow(
        &brokers,
        &[],
        &cfg.topics.windows_topic,
        &cfg.topics.input_topic,
        &cfg.core()?,
        metrics.clone(),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let state = tally::serve::http::AppState {
        view: follower.view.clone(),
        view_caught_up: follower.caught_up.clone(),
        pods: vec![handle.stats.clone()],
        ready_max_lag: u64::MAX,
        metrics: metrics.clone(),
        webhook: None,
    };
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move { axum::serve(listener, tally::serve::http::app(state)).await });

    // Steady state only: start measuring once the pod has its partitions
    // and the view has read revenue-windows.
    let warm = Instant::now() + Duration::from_secs(60);
    while !(handle.stats.joined.load(Ordering::SeqCst) && follower.caught_up.load(Ordering::SeqCst))
    {
        if Instant::now() > warm {
            return Err(BenchError::Timeout(
                "the pod did not join and catch up".into(),
            ));
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (brokers, stop, topic) = (
            brokers.clone(),
            stop.clone(),
            cfg.topics.input_topic.clone(),
        );
        std::thread::spawn(move || {
            let spec = GenSpec {
                count: (rate * seconds) as u64,
                rate,
                customers: 100_000,
                start_ms: pod::now_ms(),
                invalid_pct: 0.0,
                duplicate_pct: 0.0,
                late_pct: 0.0,
                ..GenSpec::default()
            };
            gen::stream(
                &brokers,
                &topic,
                spec,
                &|| stop.load(Ordering::SeqCst),
                &mut |_| Ok(()),
            )
        })
    };

    // Freshness probes: an order in a region of its own, then wait until the
    // view shows that region.
    let probes = {
        let (brokers, view, stop, topic) = (
            brokers.clone(),
            follower.view.clone(),
            stop.clone(),
            cfg.topics.input_topic.clone(),
        );
        std::thread::spawn(move || -> Result<Vec<f64>, BenchError> {
            let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "0")
                .create()?;
            let mut samples = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let region = format!("probe-{n}");
                let json = format!(
                    r#"{{"order_id":"probe-{n}","customer_id":"probe","amount":1,"currency":"USD","created_at":{},"region":"{region}"}}"#,
                    pod::now_ms()
                );
                let sent = Instant::now();
                producer
                    .send(
                        rdkafka::producer::BaseRecord::to(&topic)
                            .key("probe")
                            .payload(&json),
                    )
                    .map_err(|(e, _)| e)?;
                let q = tally_core::view::WindowQuery {
                    kind: "tumbling".into(),
                    by: "region".into(),
                    key: Some(region),
                    limit: 1,
                    ..Default::default()
                };
                let deadline = sent + Duration::from_secs(10);
                loop {
                    producer.poll(Duration::ZERO);
                    let seen = view
                        .read()
                        .map(|v| !v.windows(&q).is_empty())
                        .unwrap_or(false);
                    if seen {
                        samples.push(sent.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                    if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::park_timeout(Duration::from_micros(500));
                }
                std::thread::park_timeout(Duration::from_millis(100));
            }
            Ok(samples)
        })
    };

    let latencies = rt.block_on(http_load(addr, rps, seconds));
    stop.store(true, Ordering::SeqCst);
    let sent = load
        .join()
        .map_err(|_| BenchError::Invalid("the generator thread panicked".into()))?;
    let mut fresh = probes
        .join()
        .map_err(|_| BenchError::Invalid("the probe thread panicked".into()))??;
    let consumed = handle.stats.records();
    handle.join()?;
    follower.stop();
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
    let mut lat = latencies;
    lat.sort_by(f64::total_cmp);
    fresh.sort_by(f64::total_cmp);
    let failed = lat.iter().filter(|x| x.is_infinite()).count();
    Ok(json!({
        "scenario": "serving",
        "seconds": seconds,
        "ingest_target_per_sec": rate,
        "ingest_sent_per_sec": sent.unwrap_or(0) as f64 / seconds,
        "ingest_consumed_per_sec": consumed as f64 / seconds,
        "http_target_rps": rps,
        "http_requests": lat.len(),
        "http_failed": failed,
        "revenue_p50_ms": pct(&lat, 0.50),
        "revenue_p99_ms": pct(&lat, 0.99),
        "freshness_samples": fresh.len(),
        "freshness_p50_ms": pct(&fresh, 0.50),
        "freshness_p99_ms": pct(&fresh, 0.99),
    }))
}

/// `restore`: one partition holding `rows` state rows is restored from the
/// changelog into an empty state directory; reports the pod's own restore
/// time (`tally_restore_duration_seconds`: assignment to resumed).
///
/// The rows are real state: orders from distinct customers run through the
/// engine (each leaves a session row and a dedup row), flushed, encoded as
/// the pod encodes them, and produced to a one-partition changelog. The
/// mock cluster keeps only about 5 MiB per partition, so this scenario
/// needs `--brokers` (tansu in memory works: the last changelog record is
/// produced alone, so tansu's undercounting high watermark is exact there).
pub fn restore(
    topics: &[TopicSpec],
    base: &PodConfig,
    rows: u64,
    brokers: &str,
) -> Result<serde_json::Value, BenchError> {
    use tally_core::{Engine, FxTable};
    let prefix = format!("bench{}-", pod::now_ms());
    let specs: Vec<TopicSpec> = topics
        .iter()
        .cloned()
        .map(|mut t| {
            t.name = format!("{prefix}{}", t.name);
            t.partitions = 1;
            t
        })
        .collect();
    tally::kafka::topics::apply_blocking(brokers, &[], &specs)?;
    let mut cfg = base.clone();
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.group = format!("{prefix}group");
    cfg.topics.apply_topics = false;
    cfg.prefix_topics(&prefix);
    cfg.resources.state_dir = std::env::temp_dir().join(format!("tally-bench-{prefix}"));

    // The state: one order per customer (a session row and a dedup row each).
    let built = Instant::now();
    let mut engine = Engine::new(cfg.core()?, FxTable::with_defaults()).map_err(|e| {
        tally::config::ConfigError::Invalid {
            field: e.field,
            message: e.message,
        }
    })?;
    // 6 ms apart: each window holds a few thousand customers, as in a
    // steady stream (a window's row carries its customer set). Nothing is
    // purged: no flush of this engine becomes durable.
    let t0 = pod::now_ms() - (rows as i64 / 2) * 6 - 60_000;
    let mut effects = Vec::new();
    let orders = rows.div_ceil(2);
    for i in 0..orders {
        let payload = format!(
            r#"{{"order_id":"o{i}","customer_id":"c{i}","amount":"{}.25","currency":"EUR","created_at":{},"region":"eu"}}"#,
            1 + i % 500,
            t0 + i as i64 * 6
        );
        engine.on_record(0, i as i64, payload.as_bytes(), t0, &mut effects);
        effects.clear();
    }
    let mut changes = Vec::new();
    engine.flush(&mut effects, &mut changes);
    drop(engine);
    let encoded = changes
        .iter()
        .map(tally::state::codec::encode)
        .collect::<Result<Vec<_>, _>>()?;
    drop(changes);
    let state_rows = encoded.len();
    let bytes: usize = encoded
        .iter()
        .map(|(_, k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();

    // Into the changelog, in large batches; the last record alone.
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.size", "262144")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let send = |k: &[u8], v: Option<&Vec<u8>>| -> Result<(), BenchError> {
        producer.poll(Duration::ZERO);
        Ok(gen::send_waiting(
            &producer,
            &cfg.topics.changelog_topic,
            Some(0),
            k,
            v.map(Vec::as_slice),
        )?)
    };
    let (last, rest) = encoded
        .split_last()
        .ok_or(BenchError::Invalid("--rows must be > 0".into()))?;
    for (_, k, v) in rest {
        send(k, v.as_ref())?;
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(600))?;
    send(&last.1, last.2.as_ref())?;
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60))?;
    drop(encoded);
    let prepared_secs = built.elapsed().as_secs_f64();

    // An empty pod takes the partition over.
    let metrics = std::sync::Arc::new(tally::telemetry::metrics::Metrics::new());
    let started = Instant::now();
    let handle = pod::start_with_metrics(cfg.clone(), metrics.clone())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while metrics.restore_duration.get_sample_count() < 1 {
        if Instant::now() > deadline || handle.is_finished() {
            return Err(BenchError::Timeout("the partition was not restored".into()));
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let wall = started.elapsed().as_secs_f64();
    let restore_secs = metrics.restore_duration.get_sample_sum();
    let restored = metrics.restore_records.get();
    handle.join()?;
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
    Ok(json!({
        "scenario": "restore",
        "state_rows": state_rows,
        "changelog_bytes": bytes,
        "restored_records": restored,
        "restore_seconds": restore_secs,
        "rows_per_sec": restored as f64 / restore_secs,
        "pod_start_to_restored_seconds": wall,
        "prepare_seconds": prepared_secs,
    }))
}

/// The customer of latency probe `n`: a session key of its own, so the
/// first `revenue-windows` record naming it is the probe becoming
/// visible. (A region of its own per probe would make `/revenue`,
/// which lists every region, thousands of entries long: the `loaded`
/// scenario would then measure the size of that answer, not serving.)
fn probe_customer(n: usize) -> String {
    format!("lat-{n}")
}

/// When each latency probe's customer (`lat-<n>`, [`probe_customer`]) first
/// appears on `topic`, read from the start by a plain consumer (what any
/// downstream reader sees), until `stop`.
#[allow(clippy::type_complexity)]
fn probe_reader(
    brokers: &str,
    topic: &str,
    partitions: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<
    (
        std::thread::JoinHandle<()>,
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<usize, Instant>>>,
    ),
    BenchError,
> {
    use std::sync::atomic::Ordering;
    let seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<usize, Instant>>> =
        Default::default();
    let consumer = reader_from_start(brokers, "bench-latency-reader", topic, partitions)?;
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else {
                    continue;
                };
                let at = Instant::now();
                let key = rdkafka::message::Message::key(&m).unwrap_or_default();
                // `spec|group|start|p<partition>`: the group names the probe.
                let n = std::str::from_utf8(key)
                    .ok()
                    .and_then(|k| k.split('|').nth(1))
                    .and_then(|g| g.strip_prefix("lat-"))
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(n) = n {
                    if let Ok(mut s) = seen.lock() {
                        s.entry(n).or_insert(at);
                    }
                }
            }
        })
    };
    Ok((reader, seen))
}

/// `seconds` of valid orders at `rate`/s over 100,000 customers, event
/// times from `lead_ms` from now (the time the run takes to start): the
/// load of the latency scenarios, generated before the clock starts.
fn paced_orders(rate: f64, seconds: f64, lead_ms: i64) -> Vec<gen::GenRecord> {
    gen::generate(&GenSpec {
        count: (rate * seconds) as u64,
        rate,
        customers: 100_000,
        start_ms: pod::now_ms() + lead_ms,
        invalid_pct: 0.0,
        duplicate_pct: 0.0,
        late_pct: 0.0,
        ..GenSpec::default()
    })
}

/// The load generator's producer (what a client of the job would use).
fn load_producer(brokers: &str) -> Result<rdkafka::producer::BaseProducer, BenchError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// Sends `records` to `topic` paced at `rate`/s from now, and after every
/// `rate / 200`-th a probe order from a customer of its own
/// ([`probe_customer`]); returns when each probe was sent.
fn paced_with_probes(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    records: &[gen::GenRecord],
    rate: f64,
) -> Result<Vec<Instant>, BenchError> {
    let every = ((rate / 200.0) as usize).max(1);
    let mut probes: Vec<Instant> = Vec::new();
    let started = Instant::now();
    let send = |key: &[u8], payload: &[u8]| -> Result<(), BenchError> {
        Ok(gen::send_waiting(
            producer,
            topic,
            None,
            key,
            Some(payload),
        )?)
    };
    for (i, r) in records.iter().enumerate() {
        gen::pace_until(producer, started + Duration::from_secs_f64(i as f64 / rate));
        send(&r.key, &r.payload)?;
        if i % every == 0 {
            let n = probes.len();
            let json = format!(
                r#"{{"order_id":"lat-{n}","customer_id":"{}","amount":1,"currency":"USD","created_at":{},"region":"probe"}}"#,
                probe_customer(n),
                pod::now_ms(),
            );
            probes.push(Instant::now());
            send(format!("lat-{n}").as_bytes(), json.as_bytes())?;
        }
        producer.poll(Duration::ZERO);
    }
    Ok(probes)
}

/// Each probe's latency (ms, sorted), from its send to its region's first
/// appearance in `seen`, waiting up to 60 s for the last ones; probes sent
/// in the first second after `started` are warm-up and not counted. Also
/// how many were never seen (not a figure: counted apart).
fn probe_latencies(
    probes: &[Instant],
    started: Instant,
    seen: &std::sync::Mutex<std::collections::HashMap<usize, Instant>>,
) -> (Vec<f64>, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let warmup = probes
        .iter()
        .take_while(|t| **t < started + Duration::from_secs(1))
        .count();
    while seen.lock().map_or(0, |s| s.len()) < probes.len() && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let mut lat: Vec<f64> = Vec::new();
    let mut unseen = 0usize;
    for (n, sent) in probes.iter().enumerate().skip(warmup) {
        match seen.get(&n) {
            Some(at) => lat.push(at.duration_since(*sent).as_secs_f64() * 1000.0),
            None => unseen += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    (lat, unseen)
}

/// `latency`: end-to-end latency at a fixed input rate. Orders are
/// generated before the clock starts, then produced at `rate`/s for
/// `seconds`; every `rate / 200`-th send is a probe order from a customer
/// of its own. A probe's latency runs from its `send` to the first record
/// on `revenue-windows` naming its customer (its session), read by a plain consumer (what any
/// downstream reader sees). Probes of the first second are warm-up and not
/// counted. After the load, the run waits up to 60 s for the remaining
/// probes: one never seen counts as unseen, not as a figure.
pub fn latency(
    topics: &[TopicSpec],
    base: &PodConfig,
    rate: f64,
    seconds: f64,
) -> Result<serde_json::Value, BenchError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    if !(rate >= 1.0 && seconds > 0.0) {
        return Err(BenchError::Invalid(
            "--rate must be ≥ 1 and --seconds > 0".into(),
        ));
    }
    let broker = EmbeddedBroker::start(1, topics)?;
    let brokers = broker.bootstrap_servers();
    let cfg = bench_pod_config(base, &brokers, "bench-latency");
    let records = paced_orders(rate, seconds, 1_000);
    let handle = pod::start(cfg.clone())?;
    let warm = Instant::now() + Duration::from_secs(60);
    while !handle.stats.joined.load(Ordering::SeqCst) {
        if Instant::now() > warm || handle.is_finished() {
            return Err(BenchError::Timeout("the pod did not join".into()));
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (reader, seen) = probe_reader(
        &brokers,
        &cfg.topics.windows_topic,
        partitions_of(topics, &cfg.topics.windows_topic),
        stop.clone(),
    )?;

    // The load, paced, with the probes among it.
    let producer = load_producer(&brokers)?;
    let started = Instant::now();
    let probes = paced_with_probes(&producer, &cfg.topics.input_topic, &records, rate)?;
    let send_secs = started.elapsed().as_secs_f64();
    let consumed = handle.stats.records();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60))?;
    let (lat, unseen) = probe_latencies(&probes, started, &seen);
    stop.store(true, Ordering::SeqCst);
    let _ = reader.join();
    handle.join()?;
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
    Ok(json!({
        "scenario": "latency",
        "target_rate_per_sec": rate,
        "sent_per_sec": (records.len() + probes.len()) as f64 / send_secs,
        // What the pod had read when the last record was sent.
        "consumed_per_sec": consumed as f64 / send_secs,
        "seconds": seconds,
        "probes": lat.len(),
        "probes_unseen": unseen,
        "latency_p50_ms": pct(&lat, 0.50),
        "latency_p99_ms": pct(&lat, 0.99),
        "latency_max_ms": lat.last().copied().unwrap_or(f64::NAN),
    }))
}

/// `rss`: the peak resident memory of a pod holding `customers` open
/// sessions and `orders` live dedup entries. The orders go round the
/// customers, event times spread over `span_minutes` (less than the
/// 30-minute session gap and the hour of dedup horizon, so no session
/// closes and no entry expires): one order a customer measures sessions, many orders
/// over few customers measures dedup. The pod is a `tally run` child process, so its memory is
/// measured alone (`VmHWM` from `/proc/<pid>/status`), with its memory
/// limit set to 512 MiB as a container would give it (RocksDB sizes its
/// caches from that). Input is produced in chunks the pod has nearly
/// consumed, because the embedded broker keeps only about 5 MiB per
/// partition.
/// `tally` is the binary to run as the pod (`std::env::current_exe()` from
/// the command line; the built binary from tests).
pub fn rss(
    topics: &[TopicSpec],
    base: &PodConfig,
    customers: u64,
    orders: u64,
    span_minutes: u64,
    tally: &std::path::Path,
) -> Result<serde_json::Value, BenchError> {
    const CHUNK: u64 = 50_000;
    if span_minutes == 0 || span_minutes >= 30 {
        return Err(BenchError::Invalid(
            "--span-minutes must be in 1..30 (under the session gap)".into(),
        ));
    }
    let span_ms = span_minutes * 60_000;
    const LIMIT: u64 = 512 << 20;
    let broker = EmbeddedBroker::start(1, topics)?;
    let brokers = broker.bootstrap_servers();
    let group = format!("bench-rss-{}", pod::now_ms());
    let state_dir = std::env::temp_dir().join(format!("tally-bench-{group}"));
    let partitions = partitions_of(topics, &base.topics.input_topic);
    if customers == 0 || orders < customers {
        return Err(BenchError::Invalid(
            "--customers must be > 0, and --orders at least --customers".into(),
        ));
    }
    let mut child = std::process::Command::new(tally)
        .arg("run")
        .env("TALLY_BROKERS", &brokers)
        .env("TALLY_GROUP", &group)
        .env("TALLY_STATE_DIR", &state_dir)
        .env("TALLY_HTTP", "127.0.0.1:0")
        .env("TALLY_APPLY_TOPICS", "false")
        .env("TALLY_INPUT_TOPIC", &base.topics.input_topic)
        .env("TALLY_MEMORY_LIMIT_BYTES", LIMIT.to_string())
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    let status = |field: &str| -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = s.lines().find(|l| l.starts_with(field))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    let result = (|| -> Result<serde_json::Value, BenchError> {
        let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        let t0 = pod::now_ms() - span_ms as i64;
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < orders {
            let n = CHUNK.min(orders - sent);
            for i in sent..sent + n {
                let c = i % customers;
                let payload = format!(
                    r#"{{"order_id":"o{i}","customer_id":"c{c}","amount":"{}.25","currency":"EUR","created_at":{},"region":"eu"}}"#,
                    1 + i % 500,
                    t0 + (u128::from(i) * u128::from(span_ms) / u128::from(orders)) as i64
                );
                let key = format!("c{c}");
                gen::send_waiting(
                    &producer,
                    &base.topics.input_topic,
                    None,
                    key.as_bytes(),
                    Some(payload.as_bytes()),
                )?;
            }
            rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60))?;
            sent += n;
            // Keep the backlog to about one chunk.
            let deadline = Instant::now() + Duration::from_secs(300);
            while committed_sum(&brokers, &group, &base.topics.input_topic, partitions)?
                < (sent.saturating_sub(CHUNK)) as i64
            {
                if Instant::now() > deadline {
                    return Err(BenchError::Timeout("the pod fell behind".into()));
                }
                if let Ok(Some(s)) = child.try_wait() {
                    return Err(BenchError::Invalid(format!("the pod exited: {s}")));
                }
                std::thread::park_timeout(Duration::from_millis(50));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while committed_sum(&brokers, &group, &base.topics.input_topic, partitions)? < orders as i64
        {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout("the pod did not catch up".into()));
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let secs = started.elapsed().as_secs_f64();
        let hwm = status("VmHWM:").unwrap_or(0);
        let now = status("VmRSS:").unwrap_or(0);
        Ok(json!({
            "scenario": "rss",
            "customers": customers,
            "open_sessions": customers,
            "orders": orders,
            "span_minutes": span_minutes,
            "dedup_entries": orders,
            "memory_limit_bytes": LIMIT,
            "peak_rss_bytes": hwm,
            "peak_rss_mib": hwm as f64 / f64::from(1 << 20),
            "rss_at_end_mib": now as f64 / f64::from(1 << 20),
            "seconds": secs,
        }))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

/// `view`: the serving view's memory per window, and how long a new pod's
/// view takes to catch up with a `revenue-windows` topic.
///
/// The windows are real: `events` generated orders (over `customers`
/// customers, so most windows are sessions, as in production) go through
/// the core's engine with the default definitions, and every window
/// result it emits becomes the `revenue-windows` record a pod would
/// publish. Memory: the process's RSS before and after a view has applied
/// them all, per window held. Catch-up: the records produced to the
/// embedded broker's topic (its ~5 MiB a partition caps how many), then
/// the time from `follow` to caught up. With a retention of a day the
/// topic holds one day of windows, so the day's figure follows from the
/// rate.
pub fn view(
    topics: &[TopicSpec],
    base: &PodConfig,
    events: u64,
    customers: u64,
) -> Result<serde_json::Value, BenchError> {
    use tally_core::{Effect, Engine, FxTable};
    let core = base.core()?;
    let records = gen::generate(&GenSpec {
        count: events,
        customers,
        ..GenSpec::default()
    });
    let mut engine = Engine::new(core.clone(), FxTable::with_defaults())
        .map_err(|e| BenchError::Invalid(e.to_string()))?;
    let partitions = partitions_of(topics, &base.topics.windows_topic);
    for p in 0..partitions {
        engine.assign(p, 0);
    }
    // Latest record per key, as compaction leaves it.
    let mut latest: std::collections::HashMap<String, Vec<u8>> = std::collections::HashMap::new();
    let (mut out, mut changes) = (Vec::new(), Vec::new());
    for (i, r) in records.iter().enumerate() {
        let p = (i % partitions as usize) as i32;
        engine.on_record(p, i as i64, &r.payload, 0, &mut out);
        if i % 1_000 == 999 || i + 1 == records.len() {
            engine.flush(&mut out, &mut changes);
            changes.clear();
            for e in out.drain(..) {
                if let Effect::Window(w) = e {
                    let (key, value) = tally::wire::windows::encode(&w, 0);
                    latest.insert(key, value);
                }
            }
        }
    }
    drop(records);
    let rss = || -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
                l.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 1024
    };
    // Memory: one view applying every record.
    let rows: Vec<(Vec<u8>, Vec<u8>)> = latest
        .into_iter()
        .map(|(k, v)| (k.into_bytes(), v))
        .collect();
    let before = rss();
    let mut view = tally_core::view::View::new(core.grace_ms);
    view.set_input_partitions(partitions as usize);
    for (k, v) in &rows {
        if let Ok(u) = tally::wire::windows::decode(k, Some(v)) {
            view.apply(u);
        }
    }
    let after = rss();
    let held = view.len();
    drop(view);

    // Catch-up: as many of the records as the embedded broker keeps.
    let broker = EmbeddedBroker::start(1, topics)?;
    let brokers = broker.bootstrap_servers();
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()?;
    let cap_bytes = 4 << 20;
    let mut per_partition = vec![0usize; partitions as usize];
    let mut produced = 0u64;
    for (k, v) in &rows {
        let p = (produced % partitions as u64) as usize;
        if per_partition[p] + v.len() > cap_bytes {
            continue;
        }
        per_partition[p] += v.len() + k.len();
        loop {
            let rec = rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&base.topics.windows_topic)
                .partition(p as i32)
                .key(k)
                .payload(v);
            match producer.send(rec) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        produced += 1;
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60))?;
    let metrics = std::sync::Arc::new(tally::telemetry::metrics::Metrics::new());
    let started = Instant::now();
    let follower = tally::serve::follower::follow(
        &brokers,
        &[],
        &base.topics.windows_topic,
        &base.topics.input_topic,
        &core,
        metrics,
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !follower.caught_up.load(std::sync::atomic::Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("the view did not catch up".into()));
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let catch_up = started.elapsed().as_secs_f64();
    follower.stop();
    let bytes = after.saturating_sub(before);
    Ok(json!({
        "scenario": "view",
        "events": events,
        "customers": customers,
        "windows_held": held,
        "view_rss_bytes": bytes,
        "bytes_per_window": bytes as f64 / held.max(1) as f64,
        "catch_up_records": produced,
        "catch_up_seconds": catch_up,
        "catch_up_records_per_sec": produced as f64 / catch_up,
    }))
}

/// The topic declarations with `prefix` before every name.
pub fn prefixed(topics: &[TopicSpec], prefix: &str) -> Vec<TopicSpec> {
    topics
        .iter()
        .cloned()
        .map(|mut t| {
            t.name = format!("{prefix}{}", t.name);
            t
        })
        .collect()
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (fields 14 and 15, in USER_HZ ticks: 100 a second
/// on Linux).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields follow its ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// `tally_records_consumed_total` from a pod's `/metrics`, 0 if it does
/// not answer yet.
fn consumed_from_metrics(addr: &str) -> u64 {
    http_get_blocking(addr, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix("tally_records_consumed_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

/// The status of `GET path` (None: no answer).
fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get_blocking(addr, path).map(|(status, _)| status)
}

/// One HTTP/1.0 GET, blocking: the status and the whole response.
fn http_get_blocking(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let status = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body))
}

/// How many records `topics` hold: the sum of their partitions' high
/// watermarks (a topic that does not exist holds none).
fn produced(brokers: &str, topics: &[&String]) -> Result<i64, BenchError> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let mut sum = 0;
    for topic in topics {
        let md = c.fetch_metadata(Some(topic.as_str()), Duration::from_secs(10))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (_, high) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                sum += high;
            }
        }
    }
    Ok(sum)
}

/// The pass-through pipe: the pod's consumer (same group settings) reads
/// every record of `cfg`'s input topic and produces it once, key and
/// payload as they are, to `out_topic` with the pod's producer settings;
/// no parsing. Returns (events/s from the first record to the last
/// acknowledgement, CPU µs per event of this process over that time).
fn pipe(cfg: &PodConfig, out_topic: &str, total: u64) -> Result<(f64, f64), BenchError> {
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let consumer: BaseConsumer = pod::consumer_config(cfg)?.create()?;
    consumer.subscribe(&[&cfg.topics.input_topic])?;
    let producer: BaseProducer = pod::producer_config(cfg)?
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut n, mut started) = (0u64, None);
    let mut cpu0 = 0.0;
    while n < total {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout("the pipe did not finish".into()));
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        if started.is_none() {
            cpu0 = cpu_seconds("self").unwrap_or(0.0);
            started = Some(Instant::now());
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(out_topic);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(p) = m.payload() {
            rec = rec.payload(p);
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    if !matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        return Err(e.into());
                    }
                    producer.poll(Duration::from_millis(1));
                    rec = r;
                }
            }
        }
        producer.poll(Duration::ZERO);
        n += 1;
    }
    producer.flush(Duration::from_secs(120))?;
    let secs = started.map_or(f64::NAN, |s| s.elapsed().as_secs_f64());
    let cpu = cpu_seconds("self").unwrap_or(f64::NAN) - cpu0;
    Ok((total as f64 / secs, cpu * 1e6 / total as f64))
}

/// What [`throughput`] runs, beyond the pipe.
pub struct Throughput<'a> {
    pub events: u64,
    pub brokers: &'a str,
    /// The `tally` binary the job runs as.
    pub tally: &'a std::path::Path,
    /// Every topic name gets it (see [`prefixed`]).
    pub prefix: &'a str,
    /// Create the topics (false: the caller did, as on the embedded
    /// broker, which has no CreateTopics): the input under `prefix`, and
    /// each job's own outputs and changelog under `<prefix>t<threads>-`.
    pub apply: bool,
    /// One job per entry, with that many engine threads.
    pub threads: &'a [usize],
    /// The Quix Streams peer: its Python interpreter and
    /// `benches/peers/quix_job.py`.
    pub quix: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

/// A `tally run` child process reading the input topic of `cfg` and
/// writing to the other topics of `own`, in consumer group `group`, with
/// its state in `state_dir`, HTTP on `http` and `threads` engine threads.
fn spawn_tally(
    tally: &std::path::Path,
    brokers: &str,
    (cfg, own): (&PodConfig, &PodConfig),
    (group, state_dir, http): (&str, &std::path::Path, &str),
    threads: usize,
) -> Result<std::process::Child, BenchError> {
    Ok(std::process::Command::new(tally)
        .arg("run")
        .env("TALLY_BROKERS", brokers)
        .env("TALLY_GROUP", group)
        .env("TALLY_STATE_DIR", state_dir)
        .env("TALLY_HTTP", http)
        .env("TALLY_APPLY_TOPICS", "false")
        .env("TALLY_ENGINE_THREADS", threads.to_string())
        .env("TALLY_INPUT_TOPIC", &cfg.topics.input_topic)
        .env("TALLY_ENRICHED_TOPIC", &own.topics.enriched_topic)
        .env("TALLY_DLQ_TOPIC", &own.topics.dlq_topic)
        .env("TALLY_LATE_TOPIC", &own.topics.late_topic)
        .env("TALLY_WINDOWS_TOPIC", &own.topics.windows_topic)
        .env("TALLY_FX_TOPIC", &cfg.topics.fx_topic)
        .env("TALLY_ALERTS_TOPIC", &own.topics.alerts_topic)
        .env("TALLY_CHANGELOG_TOPIC", &own.topics.changelog_topic)
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?)
}

/// The job of `threads` engine threads as a `tally run` child (its CPU its
/// own) over the input topic of `cfg`, writing to the topics of `own`: events/s (first record consumed to the last) and CPU µs per
/// event (user + system of the process over the same span).
fn tally_job(
    run: &Throughput,
    (cfg, own): (&PodConfig, &PodConfig),
    prefix: &str,
    threads: usize,
    total: u64,
) -> Result<(f64, f64), BenchError> {
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let state_dir = std::env::temp_dir().join(format!("tally-bench-{prefix}"));
    let mut child = spawn_tally(
        run.tally,
        run.brokers,
        (cfg, own),
        (&format!("{prefix}job"), &state_dir, &http),
        threads,
    )?;
    let pid = child.id().to_string();
    let result = (|| -> Result<(f64, f64), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(600);
        // The job's run starts between the last look that saw nothing
        // consumed and the first that saw something: it is timed from
        // the former, so a run shorter than a look's interval (a small
        // input) is still a run, not zero seconds and zero CPU.
        let mut before = (Instant::now(), cpu_seconds(&pid).unwrap_or(0.0));
        let mut started = None;
        loop {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout("the job did not finish".into()));
            }
            if let Ok(Some(s)) = child.try_wait() {
                return Err(BenchError::Invalid(format!("the pod exited: {s}")));
            }
            let look = (Instant::now(), cpu_seconds(&pid).unwrap_or(0.0));
            let n = consumed_from_metrics(&http);
            if n == 0 {
                before = look;
            } else if started.is_none() {
                started = Some(before);
            }
            if n >= total {
                break;
            }
            // Not faster: each look renders the job's /metrics, on the
            // job's CPU (at every 10 ms, 6 % of its process).
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let (t0, cpu0) = started.unwrap_or(before);
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(&pid).unwrap_or(f64::NAN) - cpu0;
        Ok((total as f64 / secs, cpu * 1e6 / total as f64))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

/// The Quix Streams peer over the same input: it stops itself after
/// `total` records and prints its own events/s and CPU µs per event (its
/// whole process, librdkafka's threads included) as its last line.
fn quix_job(
    (python, job): (&std::path::Path, &std::path::Path),
    brokers: &str,
    topic: &str,
    total: u64,
) -> Result<(f64, f64), BenchError> {
    let state_dir = std::env::temp_dir().join(format!("tally-bench-quix-{}", pod::now_ms()));
    let out = std::process::Command::new(python)
        .arg(job)
        .args(["--brokers", brokers, "--topic", topic])
        .args(["--count", &total.to_string()])
        .arg("--state-dir")
        .arg(&state_dir)
        .stderr(std::process::Stdio::null())
        .output()?;
    let _ = std::fs::remove_dir_all(&state_dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).map_err(|e| {
        BenchError::Invalid(format!(
            "the Quix peer ({}) printed {last:?}: {e}",
            out.status
        ))
    })?;
    let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok((get("events_per_sec"), get("cpu_us_per_event")))
}

/// `throughput`: in one run on one external broker, over the
/// same pre-filled input of `events` generated orders: the pass-through
/// pipe (the reference: consume every record, produce it once, the pod's
/// client settings), the full job once per entry of `threads` (`tally
/// run` as a child process with that many engine threads, each job with
/// output and changelog topics of its own), and optionally the Quix
/// Streams peer. Events/s and CPU µs per event of each, and each job's
/// ratios to the pipe, in which the targets are stated.
pub fn throughput(
    topics: &[TopicSpec],
    base: &PodConfig,
    run: &Throughput,
) -> Result<serde_json::Value, BenchError> {
    if run.apply {
        tally::kafka::topics::apply_blocking(run.brokers, &[], &prefixed(topics, run.prefix))?;
        for t in run.threads {
            let own = prefixed(topics, &format!("{}t{t}-", run.prefix));
            tally::kafka::topics::apply_blocking(run.brokers, &[], &own)?;
        }
    }
    let mut cfg = base.clone();
    cfg.kafka.brokers = run.brokers.to_string();
    cfg.topics.apply_topics = false;
    cfg.prefix_topics(run.prefix);
    let records = gen::generate(&GenSpec {
        count: run.events,
        customers: 10_000,
        ..GenSpec::default()
    });
    gen::produce(
        run.brokers,
        &cfg.topics.input_topic,
        &[],
        &records,
        0.0,
        &|| false,
    )?;
    let total = records.len() as u64;
    drop(records);

    let mut pipe_cfg = cfg.clone();
    pipe_cfg.kafka.group = format!("{}pipe", run.prefix);
    // Into the job's own output topic (declared, as many partitions as the
    // input): an undeclared topic would be made with one partition, and an
    // idempotent producer keeps at most five requests in flight per
    // partition (measured on tansu: 6.5k events/s into one partition).
    let (pipe_rate, pipe_cpu) = pipe(&pipe_cfg, &cfg.topics.enriched_topic, total)?;
    let mut out = json!({
        "scenario": "throughput",
        "events": total,
        "pipe_events_per_sec": pipe_rate,
        "pipe_cpu_us_per_event": pipe_cpu,
    });
    for &t in run.threads {
        let prefix = format!("{}t{t}-", run.prefix);
        let mut own = base.clone();
        own.prefix_topics(&prefix);
        let (rate, cpu) = tally_job(run, (&cfg, &own), &prefix, t, total)?;
        let t_ = &own.topics;
        let messages = produced(
            run.brokers,
            &[
                &t_.enriched_topic,
                &t_.windows_topic,
                &t_.changelog_topic,
                &t_.late_topic,
                &t_.dlq_topic,
                &t_.alerts_topic,
            ],
        )?;
        // What the job wrote per input record, every output topic and the
        // changelog: the pipe writes one.
        out[format!("job_{t}t_messages_per_event")] = json!(messages as f64 / total as f64);
        out[format!("job_{t}t_events_per_sec")] = json!(rate);
        out[format!("job_{t}t_cpu_us_per_event")] = json!(cpu);
        out[format!("job_{t}t_over_pipe_events_per_sec")] = json!(rate / pipe_rate);
        out[format!("job_{t}t_over_pipe_cpu_per_event")] = json!(cpu / pipe_cpu);
    }
    if let Some(q) = run.quix {
        let (rate, cpu) = quix_job(q, run.brokers, &cfg.topics.input_topic, total)?;
        out["quix_events_per_sec"] = json!(rate);
        out["quix_cpu_us_per_event"] = json!(cpu);
        if let Some(&t) = run.threads.first() {
            let job_cpu = out[format!("job_{t}t_cpu_us_per_event")]
                .as_f64()
                .unwrap_or(f64::NAN);
            out[format!("quix_cpu_over_job_{t}t_cpu")] = json!(cpu / job_cpu);
        }
    }
    Ok(out)
}

/// What [`loaded`] runs.
pub struct Loaded<'a> {
    pub brokers: &'a str,
    /// The `tally` binary the job runs as.
    pub tally: &'a std::path::Path,
    /// Input orders per second (half the job's maximum, for the latency target).
    pub rate: f64,
    /// `/revenue` requests per second.
    pub rps: f64,
    pub seconds: f64,
    pub threads: usize,
    /// Every topic name gets it (see [`prefixed`]).
    pub prefix: &'a str,
    /// Create the topics (false: the caller did, as on the embedded
    /// broker, which has no CreateTopics).
    pub apply: bool,
}

/// `loaded`: latency and serving with the broker, the job and
/// the load generator as three processes (the broker external, the job a
/// `tally run` child, the load and the measuring in this process). Once
/// the job is ready (`/readyz`), orders are produced at `rate`/s for
/// `seconds` with latency probes among them ([`paced_with_probes`]: from a
/// probe's send to its session's first record on `revenue-windows`), while
/// `/revenue` is asked `rps` times a second (open loop, [`http_load`]).
/// Also the job's CPU µs per event over the load.
pub fn loaded(
    topics: &[TopicSpec],
    base: &PodConfig,
    run: &Loaded,
) -> Result<serde_json::Value, BenchError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    if !(run.rate >= 1.0 && run.seconds > 0.0 && run.rps > 0.0) {
        return Err(BenchError::Invalid(
            "--rate must be ≥ 1, --rps > 0 and --seconds > 0".into(),
        ));
    }
    let prefix = run.prefix;
    if run.apply {
        tally::kafka::topics::apply_blocking(run.brokers, &[], &prefixed(topics, prefix))?;
    }
    let mut cfg = base.clone();
    cfg.prefix_topics(prefix);
    let records = paced_orders(run.rate, run.seconds, 5_000);
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let state_dir = std::env::temp_dir().join(format!("tally-bench-{prefix}"));
    let mut child = spawn_tally(
        run.tally,
        run.brokers,
        (&cfg, &cfg),
        (&format!("{prefix}job"), &state_dir, &http.to_string()),
        run.threads,
    )?;
    let pid = child.id().to_string();
    let result = (|| -> Result<serde_json::Value, BenchError> {
        let ready = Instant::now() + Duration::from_secs(120);
        while http_status(&http.to_string(), "/readyz") != Some(200) {
            if Instant::now() > ready {
                return Err(BenchError::Timeout("the job did not become ready".into()));
            }
            if let Ok(Some(s)) = child.try_wait() {
                return Err(BenchError::Invalid(format!("the pod exited: {s}")));
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (reader, seen) = probe_reader(
            run.brokers,
            &cfg.topics.windows_topic,
            partitions_of(topics, "revenue-windows"),
            stop.clone(),
        )?;
        let (rps, seconds) = (run.rps, run.seconds);
        let serving = std::thread::spawn(move || -> Result<Vec<f64>, BenchError> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            Ok(rt.block_on(http_load(http, rps, seconds)))
        });
        let producer = load_producer(run.brokers)?;
        let cpu0 = cpu_seconds(&pid).unwrap_or(f64::NAN);
        let started = Instant::now();
        let probes = paced_with_probes(&producer, &cfg.topics.input_topic, &records, run.rate)?;
        let send_secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(&pid).unwrap_or(f64::NAN) - cpu0;
        let consumed = consumed_from_metrics(&http.to_string());
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60))?;
        let (lat, unseen) = probe_latencies(&probes, started, &seen);
        stop.store(true, Ordering::SeqCst);
        let _ = reader.join();
        let mut served = serving
            .join()
            .map_err(|_| BenchError::Invalid("the HTTP load thread panicked".into()))??;
        served.sort_by(f64::total_cmp);
        let sent = records.len() + probes.len();
        Ok(json!({
            "scenario": "loaded",
            "engine_threads": run.threads,
            "target_rate_per_sec": run.rate,
            "sent_per_sec": sent as f64 / send_secs,
            // What the job had read when the last record was sent.
            "consumed_per_sec": consumed as f64 / send_secs,
            "job_cpu_us_per_event": cpu * 1e6 / sent as f64,
            "probes": lat.len(),
            "probes_unseen": unseen,
            "e2e_p50_ms": pct(&lat, 0.50),
            "e2e_p99_ms": pct(&lat, 0.99),
            "e2e_max_ms": lat.last().copied().unwrap_or(f64::NAN),
            "http_target_rps": run.rps,
            "http_requests": served.len(),
            "http_failed": served.iter().filter(|x| x.is_infinite()).count(),
            "revenue_p50_ms": pct(&served, 0.50),
            "revenue_p99_ms": pct(&served, 0.99),
        }))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}
