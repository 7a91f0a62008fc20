//! `tally bench`: measured scenarios on the embedded broker. Each prints one
//! JSON line. Compare ratios measured in one run, not absolute figures
//! across runs: the machines are shared.
//!
//! - `serving`: `/revenue` latency (p50, p99) under an open-loop request
//!   rate while the pod ingests at a fixed rate, and freshness (produce →
//!   visible in the view) from probe orders.
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
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut cfg = base.clone();
    cfg.brokers = brokers.clone();
    cfg.group = "bench-serving".into();
    cfg.apply_topics = false;
    cfg.state_dir = std::env::temp_dir().join(format!(
        "tally-bench-s-{}-{}",
        std::process::id(),
        pod::now_ms()
    ));
    let handle = pod::start_with_metrics(cfg.clone(), metrics.clone())?;
    let follower =
        crate::serving::follow(&brokers, &[], &cfg.windows_topic, 10_000, metrics.clone())
            .map_err(|e| BenchError::Timeout(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Timeout(e.to_string()))?;
    let state = crate::http::AppState {
        view: follower.view.clone(),
        view_caught_up: follower.caught_up.clone(),
        pod: Some(handle.stats.clone()),
        ready_max_lag: u64::MAX,
        metrics: metrics.clone(),
        webhook: None,
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| BenchError::Timeout(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Timeout(e.to_string()))?;
    rt.spawn(async move { axum::serve(listener, crate::http::app(state)).await });

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
        let (brokers, stop, topic) = (brokers.clone(), stop.clone(), cfg.input_topic.clone());
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
            cfg.input_topic.clone(),
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
                let q = crate::view::WindowQuery {
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

    // Open-loop HTTP load on 8 connections.
    let latencies: Vec<f64> = rt.block_on(async move {
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
    });
    stop.store(true, Ordering::SeqCst);
    let sent = load
        .join()
        .map_err(|_| BenchError::Timeout("generator panicked".into()))?;
    let mut fresh = probes
        .join()
        .map_err(|_| BenchError::Timeout("probe panicked".into()))??;
    let consumed = handle
        .stats
        .records
        .load(std::sync::atomic::Ordering::Relaxed);
    handle.join()?;
    follower.stop();
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
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
