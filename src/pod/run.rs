//! Starting a pod and its poll loop.

use super::*;

/// A running pod.
pub struct PodHandle {
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), PodError>>>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
}

impl PodHandle {
    /// Asks the loop to stop: final flush, commit, leave the group.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops and waits for the loop to end.
    pub fn join(mut self) -> Result<(), PodError> {
        self.stop();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| PodError::Panicked)?,
            None => Ok(()),
        }
    }
}

/// The pod's consumer settings (public for the benchmarks' pass-through
/// pipe, which must use the same client settings as the job).
pub fn consumer_config(cfg: &PodConfig) -> Result<ClientConfig, PodError> {
    let session = cfg.kafka.session_timeout_ms.to_string();
    // A third of the session timeout, as Kafka recommends; librdkafka's
    // fixed 3 s default would expire short sessions between heartbeats.
    let heartbeat = (cfg.kafka.session_timeout_ms / 3).max(100).to_string();
    let poll = cfg.kafka.max_poll_interval_ms.to_string();
    let mut settings = vec![
        ("group.id", cfg.kafka.group.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("max.poll.interval.ms", poll.as_str()),
        ("enable.partition.eof", "false"),
        // librdkafka's 500 ms default holds a fetch on a quiet partition that
        // long, which would dominate the freshness of window updates.
        ("fetch.wait.max.ms", "10"),
    ];
    if cfg.kafka.group_protocol == "consumer" {
        // KIP-848: the broker assigns and sets the session; librdkafka
        // refuses to create a consumer that sets the classic protocol's
        // assignment strategy, session timeout or heartbeat interval.
        settings.push(("group.protocol", "consumer"));
    } else {
        settings.extend([
            (
                "partition.assignment.strategy",
                cfg.kafka.assignment_strategy.as_str(),
            ),
            ("session.timeout.ms", session.as_str()),
            ("heartbeat.interval.ms", heartbeat.as_str()),
        ]);
    }
    if let Some(id) = &cfg.kafka.group_instance_id {
        settings.push(("group.instance.id", id));
    }
    Ok(cfg.clients()?.config(&settings))
}

/// The pod's producer settings (public, as [`consumer_config`]).
pub fn producer_config(cfg: &PodConfig) -> Result<ClientConfig, PodError> {
    Ok(cfg.clients()?.config(&[
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        // Changelog rows of busy windows carry large customer sets; the
        // changelog topic allows records up to this size too.
        ("message.max.bytes", "67108864"),
        ("message.timeout.ms", "30000"),
    ]))
}

/// How long start-up retries transient broker errors before giving up.
const STARTUP_RETRY_FOR: Duration = Duration::from_secs(120);

/// Runs a start-up step, retrying transient broker errors (a leader
/// moving, a timeout, brokers briefly down) with back-off and a log line
/// each, for up to [`STARTUP_RETRY_FOR`]. Under Kubernetes an exit here
/// would become a crash loop with growing back-off. A user's error (a
/// missing topic, a bad setting) is returned at once.
/// While it retries, `/readyz` says what it waits for (`stats.starting`).
fn with_retries<T>(
    stats: &Stats,
    what: &str,
    mut step: impl FnMut() -> Result<T, PodError>,
) -> Result<T, PodError> {
    let deadline = Instant::now() + STARTUP_RETRY_FOR;
    let mut backoff = crate::kafka::Backoff::default();
    let set = |s: Option<String>| {
        if let Ok(mut g) = stats.starting.lock() {
            *g = s;
        }
    };
    loop {
        if stats.interrupted.load(Ordering::SeqCst) {
            set(None);
            return Err(PodError::Interrupted);
        }
        match step() {
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                let wait = backoff.next_delay();
                set(Some(format!(
                    "{what}: retrying a transient broker error: {e}"
                )));
                warn!(step = what, error = %e, retry_in_ms = wait.as_millis() as u64, "transient broker error at start-up; retrying");
                std::thread::sleep(wait);
            }
            other => {
                set(None);
                return other;
            }
        }
    }
}

/// The partition count of `topic`, or `None` if it does not exist.
fn partition_count(probe: &BaseConsumer, topic: &str) -> Result<Option<usize>, PodError> {
    let md = probe.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = md.topics().iter().find(|t| t.name() == topic);
    match t {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(Some(t.partitions().len()))
        }
        Some(t) => match t.error().map(RDKafkaErrorCode::from) {
            // The broker said so: the topic is not there.
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) | None => Ok(None),
            // Anything else (a leader election, …) is worth another look.
            Some(code) => Err(PodError::Kafka(KafkaError::MetadataFetch(code))),
        },
        None => Ok(None),
    }
}

/// Starts a pod: checks the input topic, loads FX rates, opens the state
/// store, joins the group, and runs the loop on its own thread.
pub fn start(cfg: PodConfig) -> Result<PodHandle, PodError> {
    start_with_metrics(cfg, Arc::new(Metrics::new()))
}

/// [`start`], updating `metrics` (shared with the HTTP server).
pub fn start_with_metrics(cfg: PodConfig, metrics: Arc<Metrics>) -> Result<PodHandle, PodError> {
    start_with_stats(cfg, Arc::new(Stats::new(metrics)))
}

/// [`start`], reporting to `stats` (and its metrics) from the first step:
/// the HTTP server can serve them, `/readyz` saying why the pod is not
/// ready, while start-up still retries a broker error.
pub fn start_with_stats(cfg: PodConfig, stats: Arc<Stats>) -> Result<PodHandle, PodError> {
    let metrics = stats.metrics.clone();
    cfg.validate()?;
    let core_cfg = cfg.core()?;
    let extra = cfg.kafka_properties()?;
    let probe: BaseConsumer = consumer_config(&cfg)?.create()?;
    let input_partitions = with_retries(&stats, "reading the input topic's metadata", || {
        partition_count(&probe, &cfg.topics.input_topic)
    })?
    .ok_or_else(|| PodError::NoInputTopic(cfg.topics.input_topic.clone()))?;
    // Input partition p's state goes to changelog partition p: a smaller
    // changelog would fail mid-run with UnknownPartition. Refuse now.
    let changelog_partitions = with_retries(&stats, "reading the changelog's metadata", || {
        partition_count(&probe, &cfg.topics.changelog_topic)
    })?
    .ok_or_else(|| PodError::NoChangelogTopic(cfg.topics.changelog_topic.clone()))?;
    if changelog_partitions < input_partitions {
        return Err(PodError::ChangelogPartitions {
            changelog: cfg.topics.changelog_topic.clone(),
            changelog_partitions,
            input: cfg.topics.input_topic.clone(),
            input_partitions,
        });
    }
    let windows_partitions = with_retries(&stats, "reading the window topic's metadata", || {
        partition_count(&probe, &cfg.topics.windows_topic)
    })?
    .ok_or_else(|| PodError::NoWindowsTopic(cfg.topics.windows_topic.clone()))?;
    drop(probe);

    let defaults = fx::defaults(cfg.limits.fx_defaults.as_deref())?;
    let (fx_table, follower) = with_retries(&stats, "loading the FX rates", || {
        Ok(fx::bootstrap(
            &cfg.kafka.brokers,
            &extra,
            &cfg.topics.fx_topic,
            &defaults,
            Duration::from_secs(30),
        )?)
    })?;
    info!(
        currencies = fx_table.len(),
        versions = fx_table.version_count(),
        "FX table loaded"
    );
    metrics.fx_versions.set(fx_table.version_count() as i64);

    std::fs::create_dir_all(&cfg.resources.state_dir).map_err(|source| PodError::StateDir {
        dir: cfg.resources.state_dir.display().to_string(),
        source,
    })?;
    let threads = cfg.resources.engine_threads.max(1);
    let sizing = RocksSizing::detect(
        cfg.resources.memory_limit_bytes,
        Path::new("/sys/fs/cgroup"),
        cfg.resources.rocksdb_memory_fraction,
    )
    .shared_by(threads);
    info!(
        limit_bytes = sizing.limit_bytes,
        source = ?sizing.source,
        block_cache_bytes = sizing.block_cache_bytes,
        write_buffer_bytes = sizing.write_buffer_bytes,
        "RocksDB memory sized from the memory limit"
    );
    let store = Store::open(
        &cfg.resources.state_dir,
        core_cfg.state_fingerprint(),
        &sizing,
    )?;
    let mut engine =
        Engine::new(core_cfg, fx_table).map_err(|e| crate::config::ConfigError::Invalid {
            field: e.field,
            message: e.message,
        })?;
    let dedup_cache = cfg
        .resources
        .dedup_cache_entries
        .map_or(sizing.dedup_cache_entries, |n| n / threads as u64);
    engine.set_dedup_cache(usize::try_from(dedup_cache).unwrap_or(usize::MAX));
    let session_cache = cfg
        .resources
        .session_cache_sets
        .map_or(sizing.session_cache_sets, |n| n / threads as u64);
    engine.set_session_cache(usize::try_from(session_cache).unwrap_or(usize::MAX));
    info!(
        dedup_entries = dedup_cache,
        session_sets = session_cache,
        "state caches: rows beyond them are read from RocksDB"
    );
    let producer: BaseProducer<AckContext> = producer_config(&cfg)?
        .create_with_context(AckContext::new(cfg.topics.changelog_topic.clone()))?;
    let processor = Arc::new(Mutex::new(Processor {
        input_topic: Arc::from(cfg.topics.input_topic.as_str()),
        clients: cfg.clients()?,
        cfg: cfg.clone(),
        engine,
        store,
        producer,
        cycle: Cycle::new(),
        out: Vec::new(),
        sealed: None,
        reports: Vec::new(),
        effects: Vec::new(),
        pending: 0,
        last_flush: Instant::now(),
        last_emit: Instant::now(),
        held: BTreeSet::new(),
        stats: stats.clone(),
        fx_follower: Some(follower),
        metrics: metrics.clone(),
        unreported: Counts::default(),
        shares: GaugeShares::default(),
        reported_cache: Default::default(),
        published: HashMap::new(),
        restoring: BTreeMap::new(),
        restore_clients: None,
        fetch_paused: false,
        seeks: BTreeMap::new(),
        resumes: HashMap::new(),
        refused: BTreeSet::new(),
        epochs: HashMap::new(),
        claims: claim::Claims::new(&cfg)?,
        windows_partitions: windows_partitions as i32,
    }));
    let ctx = PodContext {
        proc: processor.clone(),
        input_topic: cfg.topics.input_topic.clone(),
        stats: stats.clone(),
        callback_budget: Duration::from_millis(cfg.kafka.max_poll_interval_ms / 3),
    };
    let consumer: BaseConsumer<PodContext> = consumer_config(&cfg)?.create_with_context(ctx)?;
    consumer.subscribe(&[&cfg.topics.input_topic])?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let thread = {
        let (shutdown, processor) = (shutdown.clone(), processor.clone());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("tally-pod".into())
            .spawn(move || run_thread(consumer, processor, shutdown, cfg, thread_stats))
            .map_err(|e| PodError::Kafka(KafkaError::ClientCreation(e.to_string())))?
    };
    Ok(PodHandle {
        shutdown,
        thread: Some(thread),
        stats,
        metrics,
    })
}

/// Starts a pod of `cfg.resources.engine_threads` engine threads, thread
/// `i` reporting to `stats[i]` (one per thread: readiness needs every
/// thread's). Each thread is a group member of its own
/// ([`PodConfig::for_engine_thread`]); Kafka's assignment gives each its
/// partitions, and moves them between threads as between pods. If a
/// thread cannot start, those already started are stopped.
pub fn start_threads(cfg: PodConfig, stats: Vec<Arc<Stats>>) -> Result<Vec<PodHandle>, PodError> {
    let mut handles: Vec<PodHandle> = Vec::with_capacity(stats.len());
    for (i, s) in stats.into_iter().enumerate() {
        match start_with_stats(cfg.for_engine_thread(i), s) {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The start error is what the caller needs to see.
                let _ = stop_all(handles);
                return Err(e);
            }
        }
    }
    Ok(handles)
}

/// Stops every thread of a pod (all asked first, so their final flushes
/// and group leaves overlap), then waits for each; the first error wins.
pub fn stop_all(handles: Vec<PodHandle>) -> Result<(), PodError> {
    for h in &handles {
        h.stop();
    }
    let mut first = Ok(());
    for h in handles {
        let r = h.join();
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// The engine thread: the loop, and on its failure a prompt, honest
/// end. The failure is recorded first (`/livez` and `/readyz` turn 503),
/// then the consumer closes without flushing, so the process exits in
/// about a second rather than after a revoke's flush budget.
fn run_thread(
    consumer: BaseConsumer<PodContext>,
    processor: Arc<Mutex<Processor>>,
    shutdown: Arc<AtomicBool>,
    cfg: PodConfig,
    stats: Arc<Stats>,
) -> Result<(), PodError> {
    let r = run_loop(&consumer, &processor, &shutdown, &cfg);
    if let Err(e) = &r {
        stats.fail(e.to_string());
        error!(error = %e, "the engine thread failed; releasing its partitions without a flush");
    }
    // Dropping the consumer closes it: the group sees us leave at once.
    drop(consumer);
    r
}

pub(super) fn run_loop(
    consumer: &BaseConsumer<PodContext>,
    processor: &Arc<Mutex<Processor>>,
    shutdown: &AtomicBool,
    cfg: &PodConfig,
) -> Result<(), PodError> {
    info!(topic = %cfg.topics.input_topic, group = %cfg.kafka.group, group_protocol = %cfg.kafka.group_protocol, "pod running");
    let flush_budget = Duration::from_millis((cfg.kafka.max_poll_interval_ms / 3).min(10_000));
    let mut last_tick = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        // Never poll while holding the processor: a poll may run a rebalance
        // callback, which takes the processor itself (a std Mutex is not
        // reentrant). So each record takes the lock on its own; uncontended,
        // that costs nanoseconds next to the record's processing.
        // While a batch is in flight its acknowledgements are served every
        // few records, and an empty poll waits only a moment, so the
        // flush's rounds (outputs, changelog groups, write, commit) do not
        // each wait for a full round of polling.
        let in_flight = lock(processor).sealed.is_some();
        let (mut wait, round) = if in_flight {
            (Duration::from_millis(1), 128)
        } else {
            (Duration::from_millis(20), 1024)
        };
        for _ in 0..round {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    let mut proc = lock(processor);
                    if let Err(e) = proc.on_message(
                        m.partition(),
                        m.offset(),
                        m.timestamp().to_millis(),
                        m.key(),
                        m.payload().unwrap_or_default(),
                    ) {
                        error!(error = %e, "reading the state store failed");
                        return Err(e);
                    }
                    if proc.pending >= cfg.flush.flush_max_events {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "consume error");
                    break;
                }
                None => break,
            }
            // Drain what is already fetched without waiting.
            wait = Duration::ZERO;
        }
        let mut proc = lock(processor);
        // Serve the delivery reports of the outputs sent so far; after a
        // full queue, offer what waits.
        proc.producer.poll(Duration::ZERO);
        proc.cycle.resume_sending();
        if let Err(e) = proc.send_new() {
            error!(error = %e, "producing outputs failed");
            return Err(e);
        }
        if !proc.restoring.is_empty() {
            proc.restore_step(consumer, Duration::from_millis(50));
        } else {
            // Nothing left to restore: the readers' connections go.
            proc.restore_clients = None;
        }
        proc.retry_seeks(consumer);
        if last_tick.elapsed() >= Duration::from_millis(500) {
            // Lag first: the tick's idleness needs each partition's backlog.
            proc.update_lag(consumer);
            if let Err(e) = proc.tick() {
                error!(error = %e, "reading state failed");
                return Err(e);
            }
            last_tick = Instant::now();
        }
        // The batch being collected is full and the last one is still in
        // flight: wait for it (backpressure), so the next can be sealed.
        let step = if proc.sealed.is_some() && proc.pending >= cfg.flush.flush_max_events {
            proc.flush(consumer, flush_budget)
        } else {
            proc.flush_step(consumer, flush_budget)
        };
        match step {
            Ok(()) => {
                if proc.fetch_paused && proc.sealed.is_none() {
                    // Not the partitions still restoring: they resume
                    // when their restore is done.
                    if let Ok(a) = consumer.assignment() {
                        let mut tpl = TopicPartitionList::new();
                        for e in a.elements() {
                            if !proc.restoring.contains_key(&e.partition())
                                && !proc.seeks.contains_key(&e.partition())
                                && !proc.refused.contains(&e.partition())
                            {
                                tpl.add_partition(e.topic(), e.partition());
                            }
                        }
                        let _ = consumer.resume(&tpl);
                    }
                    proc.fetch_paused = false;
                    info!("outputs acknowledged again; consumption resumed");
                }
            }
            Err(PodError::ProduceTimeout(_)) => {
                // Keep polling (the group must see us alive) but stop
                // fetching until the outputs are acknowledged.
                if !proc.fetch_paused {
                    if let Ok(a) = consumer.assignment() {
                        let _ = consumer.pause(&a);
                    }
                    proc.fetch_paused = true;
                    warn!("outputs not acknowledged; consumption paused until they are");
                }
            }
            Err(e) => {
                error!(error = %e, "flush failed");
                return Err(e);
            }
        }
    }
    info!("shutting down: final flush and commit");
    let deadline = Instant::now() + Duration::from_millis(cfg.flush.shutdown_timeout_ms);
    let mut proc = lock(processor);
    if let Err(e) = proc.tick() {
        // Nothing decided after the failed read is written: the next
        // owner redoes the work from the last durable offsets.
        error!(error = %e, "reading state failed; no final flush");
        return Err(e);
    }
    loop {
        match proc.flush_all(consumer, deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => break,
            Err(PodError::ProduceTimeout(_)) if Instant::now() < deadline => continue,
            Err(e) => {
                warn!(error = %e, "final flush failed; the next owner redoes the work from the last durable offsets");
                let all: Vec<Partition> = proc.cycle.owned().collect();
                proc.drop_pending(consumer, &all);
                break;
            }
        }
    }
    drop(proc);
    info!("pod stopped");
    Ok(())
}
