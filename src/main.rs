//! The `tally` command line. Startup and wiring only: semantics live in
//! `tally::core`, adapters in their own modules. `anyhow` is used here and
//! nowhere else.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tally::broker::EmbeddedBroker;
use tally::config::{LogFormat, PodConfig};
use tally::gen::{self, GenSpec};
use tally::metrics::Metrics;
use tally::serving::{self, ViewFollower};
use tally::topics::{self, TopicStatus};
use tally::{http, pod};

/// tally: live, exact order revenue from Kafka.
#[derive(Parser, Debug)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one consumer pod (every flag can also come from TALLY_* or --config).
    Run {
        #[command(flatten)]
        pod: Box<PodConfig>,
    },
    /// Embedded broker, topics, load generator, one pod and the HTTP server in one process.
    Demo {
        /// HTTP address of the demo.
        #[arg(long, env = "TALLY_HTTP", default_value = "127.0.0.1:8080")]
        http: String,
        /// Orders per second from the generator.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Directory of the topic declarations.
        #[arg(long, default_value = "topics")]
        topics_dir: PathBuf,
    },
    /// The batch layer: recompute the windows from the retained log and
    /// report where the live (final) windows differ. Exit 1 on differences.
    Replay {
        /// Start: an input offset (0 = everything retained) or an RFC 3339 time.
        #[arg(long, default_value = "0")]
        from: String,
        #[command(flatten)]
        pod: Box<PodConfig>,
    },
    /// The load generator, against any broker.
    Gen(GenArgs),
    /// The embedded broker on its own: creates the topics, prints its bootstrap address.
    Broker {
        #[arg(long, default_value = "topics")]
        topics_dir: PathBuf,
        /// Number of brokers in the mock cluster.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
    },
    /// Measured scenarios on the embedded broker; one JSON line each.
    Bench {
        /// Scenario: flush (throughput for several flush settings),
        /// serving (/revenue latency and freshness while ingesting), or
        /// ceiling (raw consume rate vs. the full job, one run), or
        /// restore (one partition of `--rows` state rows from the changelog),
        /// latency (produce → window update visible, at `--rate` for
        /// `--seconds`), or rss (peak memory of a pod holding `--customers`
        /// open sessions).
        #[arg(long, default_value = "flush")]
        scenario: String,
        /// serving, latency: ingest rate, events/s.
        #[arg(long, default_value_t = 50_000.0)]
        rate: f64,
        /// serving: /revenue requests per second.
        #[arg(long, default_value_t = 1_000.0)]
        rps: f64,
        /// serving, latency: duration, seconds.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Input records per run.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value = "topics")]
        topics_dir: PathBuf,
        /// restore: state rows in the partition.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// rss: distinct customers, each with an open session.
        #[arg(long, default_value_t = 1_000_000)]
        customers: u64,
        /// restore: an external broker (the embedded one keeps ~5 MiB per partition).
        #[arg(long = "brokers")]
        external_brokers: Option<String>,
    },
    /// Topic management.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TopicsCommand {
    /// Create the topics declared in topics/ that are missing, and report drift.
    Apply {
        #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
        brokers: String,
        #[arg(long, env = "TALLY_TOPICS_DIR", default_value = "topics")]
        topics_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct GenArgs {
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    #[arg(long, env = "TALLY_INPUT_TOPIC", default_value = "raw-orders")]
    topic: String,
    /// Orders to send; 0 = until interrupted.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Orders per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct customers.
    #[arg(long, default_value_t = 1_000)]
    customers: u64,
    /// Event time of the first order (RFC 3339), or "now".
    #[arg(long, default_value = "now")]
    start: String,
    /// Out-of-order spread: each event time moves back by up to this much, ms.
    #[arg(long, default_value_t = 2_000)]
    disorder_ms: i64,
    #[arg(long, default_value_t = 1.0)]
    invalid_pct: f64,
    /// Redelivered duplicates (same key and bytes again), percent.
    #[arg(long, default_value_t = 1.0)]
    duplicate_pct: f64,
    /// Very late orders (3 h behind), percent.
    #[arg(long, default_value_t = 0.5)]
    late_pct: f64,
    /// Write the ground truth (one JSON line per record sent) to this file.
    #[arg(long)]
    truth: Option<PathBuf>,
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn log_format_from_env() -> LogFormat {
    match std::env::var("TALLY_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run { pod } => {
            let sub = matches.subcommand_matches("run").context("run arguments")?;
            let cfg = PodConfig::resolve(sub, *pod)?;
            init_logging(cfg.log_format);
            runtime.block_on(run(cfg, sub))
        }
        Command::Replay { from, pod } => {
            let sub = matches
                .subcommand_matches("replay")
                .context("replay arguments")?;
            let cfg = PodConfig::resolve(sub, *pod)?;
            init_logging(cfg.log_format);
            let from = tally::replay::From::parse(&from)?;
            let report = tally::replay::run(&cfg, from)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.differences.is_empty() {
                bail!(
                    "{} of {} final windows differ from the replay",
                    report.differences.len(),
                    report.windows_compared
                );
            }
            Ok(())
        }
        Command::Demo {
            http,
            rate,
            topics_dir,
        } => {
            init_logging(log_format_from_env());
            runtime.block_on(demo(http, rate, topics_dir))
        }
        Command::Gen(args) => {
            init_logging(log_format_from_env());
            gen_cmd(args)
        }
        Command::Broker {
            topics_dir,
            brokers,
        } => {
            init_logging(log_format_from_env());
            let specs = topics::load_dir(&topics_dir)?;
            let broker = EmbeddedBroker::start(brokers, &specs)?;
            println!("{}", broker.bootstrap_servers());
            runtime.block_on(shutdown_signal());
            Ok(())
        }
        Command::Bench {
            scenario,
            events,
            topics_dir,
            rate,
            rps,
            seconds,
            rows,
            customers,
            external_brokers,
        } => {
            init_logging(log_format_from_env());
            let specs = topics::load_dir(&topics_dir)?;
            let base = PodConfig::from_env_and_defaults()?;
            match scenario.as_str() {
                "flush" => {
                    tally::bench::flush_sweep(&specs, &base, events)?;
                }
                "serving" => {
                    println!(
                        "{}",
                        tally::bench::serving(&specs, &base, rate, rps, seconds)?
                    );
                }
                "ceiling" => {
                    println!("{}", tally::bench::ceiling(&specs, &base, events)?);
                }
                "restore" => {
                    let Some(b) = external_brokers else {
                        bail!("--scenario restore needs --brokers: the embedded broker keeps only about 5 MiB per partition")
                    };
                    println!("{}", tally::bench::restore(&specs, &base, rows, &b)?);
                }
                "latency" => {
                    println!("{}", tally::bench::latency(&specs, &base, rate, seconds)?);
                }
                "rss" => {
                    let exe = std::env::current_exe().context("locating the tally binary")?;
                    println!("{}", tally::bench::rss(&specs, &base, customers, &exe)?);
                }
                other => {
                    bail!("invalid scenario: {other:?} (known: flush, serving, ceiling, restore, latency, rss)")
                }
            }
            Ok(())
        }
        Command::Topics {
            command:
                TopicsCommand::Apply {
                    brokers,
                    topics_dir,
                },
        } => {
            init_logging(log_format_from_env());
            let specs = topics::load_dir(&topics_dir)?;
            let report = runtime.block_on(topics::apply(&brokers, &[], &specs))?;
            let mut failed = false;
            for (name, status) in &report {
                println!("{name}: {status:?}");
                failed |= matches!(status, TopicStatus::NotCreated(_) | TopicStatus::Drift(_));
            }
            if failed {
                bail!("some topics are missing or differ from topics/");
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Starts the view follower and the HTTP server for a pod (or, with
/// `pod = None`, for a serving-only process).
async fn start_serving(
    cfg: &PodConfig,
    metrics: Arc<Metrics>,
    pod: Option<Arc<pod::Stats>>,
) -> anyhow::Result<ViewFollower> {
    let core = cfg.core()?;
    let extra = cfg.kafka_properties()?;
    let follower = {
        let (brokers, topic, extra, metrics) = (
            cfg.brokers.clone(),
            cfg.windows_topic.clone(),
            extra.clone(),
            metrics.clone(),
        );
        tokio::task::spawn_blocking(move || {
            serving::follow(&brokers, &extra, &topic, core.grace_ms, metrics)
        })
        .await??
    };
    let mut pc = rdkafka::ClientConfig::new();
    pc.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all");
    for (k, v) in &extra {
        pc.set(k, v);
    }
    let webhook = http::Webhook {
        secret: cfg.webhook_secret.clone().map(String::into_bytes),
        producer: pc.create()?,
        topic: cfg.input_topic.clone(),
        limits: core.limits,
    };
    let state = http::AppState {
        view: follower.view.clone(),
        view_caught_up: follower.caught_up.clone(),
        pod,
        ready_max_lag: cfg.ready_max_lag,
        metrics,
        webhook: Some(Arc::new(webhook)),
    };
    serve(&cfg.http, state).await?;
    Ok(follower)
}

async fn serve(addr: &str, state: http::AppState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, http::app(state)).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}

async fn run(cfg: PodConfig, _matches: &ArgMatches) -> anyhow::Result<()> {
    if cfg.apply_topics {
        match topics::load_dir(&cfg.topics_dir) {
            Ok(specs) => {
                match topics::apply(&cfg.brokers, &cfg.kafka_properties()?, &specs).await {
                    Ok(report) => {
                        for (name, status) in report {
                            match status {
                                TopicStatus::Created => {
                                    tracing::info!(topic = %name, "topic created")
                                }
                                TopicStatus::Matches => {}
                                TopicStatus::Drift(d) => {
                                    tracing::warn!(topic = %name, drift = %d, "topic differs from its declaration")
                                }
                                TopicStatus::NotCreated(why) => {
                                    tracing::warn!(topic = %name, reason = %why, "topic not created (the broker may not support it)")
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not apply topics"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "no topic declarations applied"),
        }
    }
    let metrics = Arc::new(Metrics::new());
    let handle = {
        let (cfg, metrics) = (cfg.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || pod::start_with_metrics(cfg, metrics)).await??
    };
    let follower = start_serving(&cfg, metrics, Some(handle.stats.clone())).await?;
    tracing::info!(http = %cfg.http, "serving");
    // One signal listener for the whole run: a listener created per loop
    // turn would miss a SIGTERM that arrives between turns.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if handle.is_finished() {
                    break;
                }
            }
        }
    }
    tokio::task::spawn_blocking(move || handle.join()).await??;
    follower.stop();
    Ok(())
}

fn gen_spec(a: &GenArgs) -> anyhow::Result<GenSpec> {
    let start_ms = if a.start == "now" {
        chrono::Utc::now().timestamp_millis()
    } else {
        chrono::DateTime::parse_from_rfc3339(&a.start)
            .with_context(|| format!("invalid start: {:?} is not RFC 3339 or \"now\"", a.start))?
            .timestamp_millis()
    };
    for (name, v) in [
        ("invalid_pct", a.invalid_pct),
        ("duplicate_pct", a.duplicate_pct),
        ("late_pct", a.late_pct),
    ] {
        if !(0.0..=100.0).contains(&v) {
            bail!("invalid {name}: must be between 0 and 100, got {v}");
        }
    }
    if a.invalid_pct + a.duplicate_pct + a.late_pct > 100.0 {
        bail!("invalid invalid_pct + duplicate_pct + late_pct: the sum must not exceed 100");
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        bail!("invalid rate: must be ≥ 0");
    }
    if a.customers == 0 {
        bail!("invalid customers: must be > 0");
    }
    if a.disorder_ms < 0 {
        bail!("invalid disorder_ms: must be ≥ 0");
    }
    Ok(GenSpec {
        count: a.count,
        rate: a.rate,
        seed: a.seed,
        customers: a.customers,
        start_ms,
        disorder_ms: a.disorder_ms,
        invalid_pct: a.invalid_pct,
        duplicate_pct: a.duplicate_pct,
        late_pct: a.late_pct,
    })
}

fn gen_cmd(a: GenArgs) -> anyhow::Result<()> {
    let spec = gen_spec(&a)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(shutdown_signal());
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let mut truth = match &a.truth {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot write truth file {}", p.display()))?,
        )),
        None => None,
    };
    let sent = gen::stream(
        &a.brokers,
        &a.topic,
        spec,
        &|| stop.load(Ordering::SeqCst),
        &mut |records| {
            if let Some(w) = truth.as_mut() {
                gen::write_truth(records, w)?;
            }
            Ok(())
        },
    )?;
    if let Some(mut w) = truth {
        use std::io::Write;
        w.flush()?;
    }
    eprintln!("sent {sent} records to {}", a.topic);
    Ok(())
}

async fn demo(http_addr: String, rate: f64, topics_dir: PathBuf) -> anyhow::Result<()> {
    let specs = topics::load_dir(&topics_dir)?;
    let broker = EmbeddedBroker::start(1, &specs)?;
    let brokers = broker.bootstrap_servers();
    let state_dir = std::env::temp_dir().join(format!("tally-demo-{}", std::process::id()));
    let mut cfg = PodConfig::from_env_and_defaults()?;
    cfg.brokers = brokers.clone();
    cfg.state_dir = state_dir.clone();
    cfg.http = http_addr.clone();
    cfg.apply_topics = false;
    cfg.session_timeout_ms = 6_000;
    let metrics = Arc::new(Metrics::new());
    let handle = {
        let (cfg, metrics) = (cfg.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || pod::start_with_metrics(cfg, metrics)).await??
    };
    let _follower = start_serving(&cfg, metrics, Some(handle.stats.clone())).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let (stop, brokers) = (stop.clone(), brokers.clone());
        std::thread::spawn(move || {
            let spec = GenSpec {
                count: 0,
                rate,
                start_ms: chrono::Utc::now().timestamp_millis(),
                ..GenSpec::default()
            };
            gen::stream(
                &brokers,
                "raw-orders",
                spec,
                &|| stop.load(Ordering::SeqCst),
                &mut |_| Ok(()),
            )
        })
    };
    println!("tally demo: embedded broker at {brokers}, generator at {rate} orders/s");
    println!("open http://{http_addr}/  (JSON: http://{http_addr}/revenue)  Ctrl-C to stop");
    shutdown_signal().await;
    stop.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || generator.join()).await;
    tokio::task::spawn_blocking(move || handle.join()).await??;
    let _ = std::fs::remove_dir_all(&state_dir);
    println!("tally demo: stopped cleanly");
    // Exit before the embedded broker is torn down under the clients that
    // still hold connections to it (they would only log connection errors).
    std::process::exit(0);
    #[allow(unreachable_code)]
    {
        drop(broker);
        Ok(())
    }
}
