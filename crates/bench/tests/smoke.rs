//! The benchmark scenarios run end to end and report what they claim to
//! measure. Small and quick: these check the harness, not the speed (the
//! figures are in BENCHMARKS.md, measured on release builds).

use tally::config::PodConfig;
use tally::kafka::topics::TopicSpec;

fn declared_topics() -> Vec<TopicSpec> {
    tally::kafka::topics::embedded().expect("the compiled-in declarations load")
}

/// The scenarios start their own embedded broker; against an external one
/// (`TALLY_TEST_BROKERS`, the tansu run) they add nothing, so they skip.
fn skip_on_external(reason: &str) -> bool {
    match std::env::var("TALLY_TEST_BROKERS") {
        Ok(b) if !b.trim().is_empty() => {
            eprintln!("SKIPPED on the external broker {b}: {reason}");
            true
        }
        _ => false,
    }
}

fn base() -> PodConfig {
    PodConfig::from_env_and_defaults().expect("defaults")
}

#[test]
fn latency_sees_every_probe_at_a_rate_the_pod_keeps_up_with() {
    if skip_on_external("the scenario runs its own embedded broker") {
        return;
    }
    let r = tally_bench::latency(&declared_topics(), &base(), 1_000.0, 2.0).unwrap();
    assert_eq!(r["scenario"], "latency");
    assert!(r["probes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["probes_unseen"], 0, "{r}");
    let (p50, p99) = (
        r["latency_p50_ms"].as_f64().unwrap(),
        r["latency_p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{r}");
}

#[test]
fn rss_measures_a_pod_process_holding_the_sessions() {
    if skip_on_external("the scenario runs its own embedded broker") {
        return;
    }
    // The `tally` binary the workspace build put beside this test's.
    let exe =
        &tally_bench::sibling_tally_binary().expect("build the workspace: cargo test --workspace");
    let r = tally_bench::rss(&declared_topics(), &base(), 5_000, 5_000, 10, exe).unwrap();
    assert_eq!(
        (r["scenario"].as_str(), r["open_sessions"].as_u64()),
        (Some("rss"), Some(5_000))
    );
    // A pod process is tens of MiB at least; zero would mean nothing was read.
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 10 << 20, "{r}");
    assert!(tally_bench::rss(&declared_topics(), &base(), 0, 0, 10, exe).is_err());
    assert!(tally_bench::rss(&declared_topics(), &base(), 10, 5, 10, exe).is_err());
}

#[test]
fn ceiling_reports_both_rates_and_their_ratio() {
    if skip_on_external("the scenario runs its own embedded broker") {
        return;
    }
    let r = tally_bench::ceiling(&declared_topics(), &base(), 3_000).unwrap();
    let raw = r["raw_consume_events_per_sec"].as_f64().unwrap();
    let job = r["full_job_events_per_sec"].as_f64().unwrap();
    let ratio = r["full_job_over_ceiling"].as_f64().unwrap();
    assert!(raw > 0.0 && job > 0.0, "{r}");
    assert!((ratio - job / raw).abs() < 1e-9, "{r}");
}

/// The throughput scenario runs the pipe and a `tally run` child of one
/// and of two engine threads over the same input and reports each side
/// and their ratios (here on an
/// embedded broker; the figures are measured on tansu).
#[test]
fn throughput_reports_the_pipe_and_the_job() {
    if skip_on_external("it would share its topics with the other tests") {
        return;
    }
    let prefix = "tp-";
    let mut topics = Vec::new();
    for p in [prefix, "tp-t1-", "tp-t2-"] {
        topics.extend(tally_bench::prefixed(&declared_topics(), p));
    }
    let broker =
        tally::kafka::broker::EmbeddedBroker::start(1, &topics).expect("an embedded broker");
    let exe =
        &tally_bench::sibling_tally_binary().expect("build the workspace: cargo test --workspace");
    let r = tally_bench::throughput(
        &declared_topics(),
        &base(),
        &tally_bench::Throughput {
            events: 5_000,
            brokers: &broker.bootstrap_servers(),
            tally: exe,
            prefix,
            apply: false,
            threads: &[1, 2],
            quix: None,
        },
    )
    .unwrap();
    assert_eq!(r["scenario"], "throughput");
    for k in [
        "pipe_events_per_sec",
        "pipe_cpu_us_per_event",
        "job_1t_events_per_sec",
        "job_1t_cpu_us_per_event",
        "job_2t_events_per_sec",
        "job_2t_cpu_us_per_event",
    ] {
        let v = r[k].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{k}: {r}");
    }
}

/// The loaded scenario runs a `tally run` child, waits for it to be ready,
/// loads it with orders and `/revenue` requests and reports end-to-end
/// and serving percentiles (here on an embedded broker; the figures are
/// measured on tansu, each process apart).
#[test]
fn loaded_reports_end_to_end_and_serving_latency() {
    if skip_on_external("it would share its topics with the other tests") {
        return;
    }
    let prefix = "ld-";
    let topics = tally_bench::prefixed(&declared_topics(), prefix);
    let broker =
        tally::kafka::broker::EmbeddedBroker::start(1, &topics).expect("an embedded broker");
    let exe =
        &tally_bench::sibling_tally_binary().expect("build the workspace: cargo test --workspace");
    let r = tally_bench::loaded(
        &declared_topics(),
        &base(),
        &tally_bench::Loaded {
            brokers: &broker.bootstrap_servers(),
            tally: exe,
            rate: 400.0,
            rps: 50.0,
            seconds: 3.0,
            threads: 1,
            prefix,
            apply: false,
        },
    )
    .unwrap();
    assert_eq!(r["scenario"], "loaded");
    assert_eq!(r["probes_unseen"], 0, "{r}");
    assert_eq!(r["http_failed"], 0, "{r}");
    for k in ["e2e_p99_ms", "revenue_p99_ms", "job_cpu_us_per_event"] {
        let v = r[k].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{k}: {r}");
    }
}
