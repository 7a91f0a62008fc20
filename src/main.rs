//! The `tally` command line. Startup and wiring only: semantics live in
//! `tally_core`, adapters in their own modules. `anyhow` is used here and
//! nowhere else.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tally::config::PodConfig;
use tally::gen::{self, GenSpec};
use tally::kafka::broker::EmbeddedBroker;
use tally::kafka::topics::{self, TopicStatus};
use tally::pod;
use tally::serve::follower::{self, ViewFollower};
use tally::serve::http;
use tally::telemetry::metrics::Metrics;
use tally::telemetry::{init_logging, log_format_from_env};

/// The serving view's session store, under the state directory (RocksDB
/// ignores a directory it did not make among its files).
const VIEW_SESSIONS_DIR: &str = "view-sessions";

/// mimalloc instead of glibc's malloc: the hot path allocates small,
/// short-lived buffers (records, keys, rows) at hundreds of thousands a
/// second, and glibc's malloc/free/consolidate were a fifth of the pod's
/// CPU in a profile of the throughput scenario.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Directory of the topic declarations; the compiled-in ones by default.
        #[arg(long, env = "TALLY_TOPICS_DIR")]
        topics_dir: Option<PathBuf>,
    },
    /// The batch layer: recompute the windows from the retained log and
    /// report where the live (final) windows differ. Exit 1 on differences.
    Replay {
        /// Start: an input offset (0 = everything retained; an offset before
        /// a partition's log start is read from the start, and the report
        /// says so), or an RFC 3339 time in event time (the orders'
        /// `created_at`): every retained order is replayed, and only
        /// windows starting at or after the time are compared.
        #[arg(long, default_value = "0")]
        from: String,
        #[command(flatten)]
        pod: Box<PodConfig>,
    },
    /// The load generator, against any broker.
    Gen(GenArgs),
    /// The embedded broker on its own: creates the topics, prints its bootstrap address.
    Broker {
        /// Directory of the topic declarations; the compiled-in ones by default.
        #[arg(long, env = "TALLY_TOPICS_DIR")]
        topics_dir: Option<PathBuf>,
        /// Number of brokers in the mock cluster.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
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
        /// Directory of the topic declarations; the compiled-in ones by default.
        #[arg(long, env = "TALLY_TOPICS_DIR")]
        topics_dir: Option<PathBuf>,
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

/// Errors are printed as their chain of causes, one per line, and never as
/// a backtrace (`fn main() -> Result` prints one when `RUST_BACKTRACE` is
/// set, which a user's misconfiguration does not deserve).
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The command line, with no variable's value shown in `--help`: they
/// include `TALLY_KAFKA_PROPERTIES` (SASL and TLS key passwords) and the
/// webhook secret, and help output ends up in terminals, CI logs and
/// support tickets.
fn command() -> clap::Command {
    fn hide(c: clap::Command) -> clap::Command {
        c.mut_args(|a| a.hide_env_values(true))
            .mut_subcommands(hide)
    }
    hide(Cli::command())
}

fn real_main() -> anyhow::Result<()> {
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run { pod } => {
            let sub = matches.subcommand_matches("run").context("run arguments")?;
            let cfg = PodConfig::resolve(sub, *pod)?;
            init_logging(cfg.resources.log_format);
            runtime.block_on(run(cfg, sub))
        }
        Command::Replay { from, pod } => {
            let sub = matches
                .subcommand_matches("replay")
                .context("replay arguments")?;
            let cfg = PodConfig::resolve(sub, *pod)?;
            init_logging(cfg.resources.log_format);
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
            let specs = topics::load(topics_dir.as_deref())?;
            let broker = EmbeddedBroker::start(brokers, &specs)?;
            println!("{}", broker.bootstrap_servers());
            runtime.block_on(shutdown_signal());
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
            let specs = topics::load(topics_dir.as_deref())?;
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

/// Waits for SIGTERM or Ctrl-C (see [`listen_for_shutdown`]).
async fn shutdown_signal() {
    let mut stop = listen_for_shutdown();
    let _ = stop.changed().await;
}

/// The view a process serves, and whether it has caught up.
type Served = (
    Arc<std::sync::RwLock<tally_core::view::View>>,
    Arc<AtomicBool>,
);

/// Starts the HTTP server for a pod (or, with no `pods`, for a
/// serving-only process) before anything waits for the broker, so
/// `/readyz` can say why the pod is not ready while start-up retries; the
/// view stays empty (data endpoints answer 503) until [`follow_view`]
/// has read `revenue-windows`.
async fn start_http(
    cfg: &PodConfig,
    metrics: Arc<Metrics>,
    pods: Vec<Arc<pod::Stats>>,
) -> anyhow::Result<(Served, tokio::task::JoinHandle<()>)> {
    let core = cfg.core()?;
    let extra = cfg.kafka_properties()?;
    let mut view = tally_core::view::View::new(core.grace_ms);
    // Queries that name no definition are answered from the configured ones.
    view.set_definitions(core.windows.clone());
    // Windows past their retention are dropped: the view stays bounded.
    view.set_retention(core.window_retention_ms);
    // Sessions (millions: one a customer) on disk, not in memory.
    if cfg.serving.view_sessions == tally::config::ViewSessions::Rocksdb {
        let dir = cfg.resources.state_dir.join(VIEW_SESSIONS_DIR);
        std::fs::create_dir_all(&cfg.resources.state_dir)
            .with_context(|| format!("cannot create {}", cfg.resources.state_dir.display()))?;
        let shelf =
            tally::serve::shelf::RocksShelf::open_fresh(&dir, metrics.view_shelf_errors.clone())?;
        view.set_session_shelf(Box::new(shelf), tally::serve::shelf::HOT_CUSTOMERS);
    }
    let view = Arc::new(std::sync::RwLock::new(view));
    let caught_up = Arc::new(AtomicBool::new(false));
    let pc = tally::kafka::Clients::new(&cfg.kafka.brokers, &extra).producer();
    let mut webhook = http::Webhook::new(
        cfg.serving.webhook_secret.clone().map(String::into_bytes),
        pc.create()?,
        cfg.topics.input_topic.clone(),
        core.limits,
    );
    webhook.tolerance = Duration::from_millis(cfg.serving.webhook_tolerance_ms);
    webhook.legacy_signature = cfg.serving.webhook_legacy_signature;
    webhook.body_timeout = Duration::from_millis(cfg.serving.http_timeout_ms);
    let state = http::AppState {
        view: view.clone(),
        view_caught_up: caught_up.clone(),
        pods,
        ready_max_lag: cfg.serving.ready_max_lag,
        metrics,
        webhook: Some(Arc::new(webhook)),
    };
    let server = serve(cfg, state).await?;
    Ok(((view, caught_up), server))
}

/// Starts the view follower, feeding the view [`start_http`] serves.
async fn follow_view(
    cfg: &PodConfig,
    served: Served,
    metrics: Arc<Metrics>,
) -> anyhow::Result<ViewFollower> {
    let extra = cfg.kafka_properties()?;
    let (brokers, topic, input) = (
        cfg.kafka.brokers.clone(),
        cfg.topics.windows_topic.clone(),
        cfg.topics.input_topic.clone(),
    );
    let (view, caught_up) = served;
    Ok(tokio::task::spawn_blocking(move || {
        follower::follow_into(&brokers, &extra, (&topic, &input), view, caught_up, metrics)
    })
    .await??)
}

/// Spawns the HTTP server; the handle lets a caller stop it (and drop its
/// Kafka producer) before the broker goes away.
async fn serve(
    cfg: &PodConfig,
    state: http::AppState,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = &cfg.serving.http;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let limits = http::ServerLimits {
        header_timeout: Duration::from_millis(cfg.serving.http_timeout_ms),
        max_connections: cfg.serving.http_max_connections,
    };
    Ok(tokio::spawn(http::serve(
        listener,
        http::app(state),
        limits,
    )))
}

/// One readiness record per engine thread (`--engine-threads`), all
/// reporting to the process's one set of metrics.
fn thread_stats(cfg: &PodConfig, metrics: &Arc<Metrics>) -> Vec<Arc<pod::Stats>> {
    (0..cfg.resources.engine_threads.max(1))
        .map(|_| Arc::new(pod::Stats::new(metrics.clone())))
        .collect()
}

async fn run(cfg: PodConfig, _matches: &ArgMatches) -> anyhow::Result<()> {
    // Before anything in the state directory is touched (the view's store
    // is recreated at every start), and held until the process ends.
    let _lock = tally::state::lock::StateDirLock::acquire(&cfg.resources.state_dir)?;
    if cfg.topics.apply_topics {
        match topics::load(cfg.topics.topics_dir.as_deref()) {
            Ok(specs) => {
                match topics::apply(&cfg.kafka.brokers, &cfg.kafka_properties()?, &specs).await {
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
    // One signal listener for the whole run, from before anything waits:
    // a SIGTERM while start-up retries a broker error, or while the view
    // reads revenue-windows from a slow broker, must stop the pod cleanly,
    // not kill the process (tokio's handler exists only once a listener
    // does; the soak test found pods dying of SIGTERM mid-start).
    let mut stop = listen_for_shutdown();
    let metrics = Arc::new(Metrics::new());
    let stats = thread_stats(&cfg, &metrics);
    let (served, _server) = start_http(&cfg, metrics.clone(), stats.clone()).await?;
    tracing::info!(http = %cfg.serving.http, engine_threads = stats.len(), "serving");
    let mut start = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::task::spawn_blocking(move || pod::start_threads(cfg, stats))
    };
    let handles = tokio::select! {
        r = &mut start => r??,
        _ = stop.changed() => {
            // Start-up gives up at its next retry; a pod that did start
            // is stopped as usual (final flush, commit, leave the group).
            arm_shutdown_watchdog(&cfg);
            for s in &stats {
                s.interrupt();
            }
            match start.await? {
                Ok(h) => tokio::task::spawn_blocking(move || pod::stop_all(h)).await??,
                Err(pod::PodError::Interrupted) => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(());
        }
    };
    let follower = tokio::select! {
        f = follow_view(&cfg, served, metrics) => Some(f?),
        _ = stop.changed() => None,
    };
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                // One thread ending (an error) ends the pod: Kubernetes
                // restarts it, rather than the pod limping on with fewer.
                if handles.iter().any(|h| h.is_finished()) {
                    break;
                }
            }
        }
    }
    if *stop.borrow() {
        arm_shutdown_watchdog(&cfg);
    }
    tokio::task::spawn_blocking(move || pod::stop_all(handles)).await??;
    if let Some(f) = follower {
        f.stop();
    }
    Ok(())
}

/// Bounds a shutdown: once asked to stop, the process exits after the
/// final flush's budget (`--shutdown-timeout-ms`) plus 5 s, whatever is
/// still waiting. Closing a Kafka client can block well past that: a
/// broker that came back from down with requests in flight holds them
/// until librdkafka's request timeout, and a consumer leaving a group
/// whose coordinator is unreachable waits on it (the soak saw pods miss a
/// 30 s stop). Exiting then is as safe as a SIGKILL, which tally is built
/// for: rows and offsets are durable together in RocksDB, and the next
/// owner redoes whatever was not; and it beats being killed at the end of
/// the grace period (45 s in `deploy/`) without a word.
fn arm_shutdown_watchdog(cfg: &tally::config::PodConfig) {
    let budget = Duration::from_millis(cfg.flush.shutdown_timeout_ms) + Duration::from_secs(5);
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(budget);
            tracing::warn!(
                budget_ms = budget.as_millis() as u64,
                "shutdown is taking longer than its budget (a Kafka client still closing); exiting now: \
                 the state is durable, and the next owner redoes what was not committed"
            );
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot bound the shutdown's time");
    }
}

/// SIGTERM or Ctrl-C, from the moment this is called (the SIGTERM handler
/// is installed here, not when the returned channel is first awaited).
fn listen_for_shutdown() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::spawn(async move {
        let term = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        let _ = tx.send(true);
    });
    rx
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

async fn demo(http_addr: String, rate: f64, topics_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let specs = topics::load(topics_dir.as_deref())?;
    let broker = EmbeddedBroker::start(1, &specs)?;
    let brokers = broker.bootstrap_servers();
    let state_dir = std::env::temp_dir().join(format!("tally-demo-{}", std::process::id()));
    let mut cfg = PodConfig::from_env_and_defaults()?;
    cfg.kafka.brokers = brokers.clone();
    cfg.resources.state_dir = state_dir.clone();
    cfg.serving.http = http_addr.clone();
    cfg.topics.apply_topics = false;
    cfg.kafka.session_timeout_ms = 6_000;
    let metrics = Arc::new(Metrics::new());
    let stats = thread_stats(&cfg, &metrics);
    let (served, server) = start_http(&cfg, metrics.clone(), stats.clone()).await?;
    let handles = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || pod::start_threads(cfg, stats)).await??
    };
    let follower = follow_view(&cfg, served, metrics).await?;
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
    tokio::task::spawn_blocking(move || pod::stop_all(handles)).await??;
    let _ = std::fs::remove_dir_all(&state_dir);
    // Every client goes before the embedded broker it talks to: the HTTP
    // server (and its webhook producer), then the view follower. Torn down
    // the other way, they would log connection errors on the way out.
    server.abort();
    let _ = server.await;
    // `stop` joins the follower's thread, so its consumer is closed.
    tokio::task::spawn_blocking(move || follower.stop()).await?;
    drop(broker);
    println!("tally demo: stopped cleanly");
    Ok(())
}
