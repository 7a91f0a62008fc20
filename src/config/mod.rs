//! The pod's configuration: one struct, read from flags, `TALLY_*`
//! environment variables and an optional TOML file (`--config`), in that
//! order of precedence. Every field is validated at startup and an invalid
//! value is an error that names the field.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use serde::{Deserialize, Serialize};

use tally_core::order::{Limits, MICROS};
use tally_core::window::{format_window_list, parse_window_list};
use tally_core::{CoreConfig, WindowSpec};

/// What happens to an order that is late for every window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Write it to the late topic (and count it).
    Topic,
    /// Only count it (`tally_events_total{outcome="late"}`).
    Count,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Configuration of one consumer pod (`tally run`), also used by `tally demo`.
///
/// Grouped in sections (one struct each) for the code's sake; the flags,
/// `TALLY_*` variables and TOML keys stay flat (`--input-topic`,
/// `TALLY_INPUT_TOPIC`, `input_topic = …`), so a setting has one name
/// everywhere.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct PodConfig {
    /// A TOML file with any of these settings (keys as the long flag names,
    /// with `_` or `-`). Flags and environment variables win over it.
    #[arg(long, env = "TALLY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Kafka")]
    #[serde(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten, next_help_heading = "Topics")]
    #[serde(flatten)]
    pub topics: TopicNames,
    #[command(flatten, next_help_heading = "Flush")]
    #[serde(flatten)]
    pub flush: FlushConfig,
    #[command(flatten, next_help_heading = "Windows and time")]
    #[serde(flatten)]
    pub job: JobConfig,
    #[command(flatten, next_help_heading = "Validation")]
    #[serde(flatten)]
    pub limits: InputLimits,
    #[command(flatten, next_help_heading = "Serving")]
    #[serde(flatten)]
    pub serving: ServingConfig,
    #[command(flatten, next_help_heading = "Resources")]
    #[serde(flatten)]
    pub resources: ResourceConfig,
}

/// How to reach the cluster and take part in the consumer group.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Consumer group id; every pod of one deployment uses the same.
    #[arg(long, env = "TALLY_GROUP", default_value = "tally")]
    pub group: String,
    /// Partition assignment strategy. `cooperative-sticky` (incremental
    /// rebalancing) needs a broker that implements it correctly; use `range`
    /// or `roundrobin` (eager) otherwise, e.g. with librdkafka's mock cluster,
    /// which was seen assigning a partition to a new member without revoking
    /// it from the old one under cooperative-sticky.
    #[arg(
        long,
        env = "TALLY_ASSIGNMENT_STRATEGY",
        default_value = "cooperative-sticky"
    )]
    pub assignment_strategy: String,
    /// The consumer group protocol: `classic` (the client assigns, with
    /// --assignment-strategy and --session-timeout-ms) or `consumer`
    /// (KIP-848, Kafka 4: the broker assigns, incrementally, and its own
    /// group.consumer.* settings set the session timeout).
    #[arg(long, env = "TALLY_GROUP_PROTOCOL", default_value = "classic")]
    pub group_protocol: String,
    /// Static membership id (`group.instance.id`), e.g. the pod name.
    #[arg(long, env = "TALLY_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// Kafka consumer session timeout, ms.
    #[arg(long, env = "TALLY_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Kafka max.poll.interval.ms; a rebalance callback never outlives it.
    #[arg(long, env = "TALLY_MAX_POLL_INTERVAL_MS", default_value_t = 300_000)]
    pub max_poll_interval_ms: u64,
    /// Extra librdkafka properties, `key=value` comma separated (for TLS, SASL, ...).
    #[arg(long, env = "TALLY_KAFKA_PROPERTIES", default_value = "")]
    pub kafka_properties: String,
}

/// The topics the job reads and writes, and their declarations.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct TopicNames {
    /// Directory of the topic declarations; unset: the ones compiled into
    /// the binary (the repository's `topics/`).
    #[arg(long, env = "TALLY_TOPICS_DIR")]
    pub topics_dir: Option<PathBuf>,
    /// Create missing topics at startup (skipped when the broker cannot).
    #[arg(long, env = "TALLY_APPLY_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub apply_topics: bool,
    /// Input topic.
    #[arg(long, env = "TALLY_INPUT_TOPIC", default_value = "raw-orders")]
    pub input_topic: String,
    #[arg(long, env = "TALLY_ENRICHED_TOPIC", default_value = "enriched-orders")]
    pub enriched_topic: String,
    #[arg(long, env = "TALLY_DLQ_TOPIC", default_value = "orders-dlq")]
    pub dlq_topic: String,
    #[arg(long, env = "TALLY_LATE_TOPIC", default_value = "orders-late")]
    pub late_topic: String,
    #[arg(long, env = "TALLY_WINDOWS_TOPIC", default_value = "revenue-windows")]
    pub windows_topic: String,
    #[arg(long, env = "TALLY_FX_TOPIC", default_value = "fx-rates")]
    pub fx_topic: String,
    #[arg(long, env = "TALLY_ALERTS_TOPIC", default_value = "order-alerts")]
    pub alerts_topic: String,
    /// Compacted state changelog, partitioned like the input topic.
    #[arg(long, env = "TALLY_CHANGELOG_TOPIC", default_value = "tally-changelog")]
    pub changelog_topic: String,
    /// The changelog's `delete.retention.ms`: local state last written
    /// longer ago than this may predate tombstones that compaction has since
    /// removed, so such a partition is restored in full, not from its local
    /// checkpoint. Must not exceed the topic's setting.
    #[arg(
        long,
        env = "TALLY_CHANGELOG_DELETE_RETENTION_MS",
        default_value_t = 86_400_000
    )]
    pub changelog_delete_retention_ms: i64,
}

/// When the pod makes its work durable.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct FlushConfig {
    /// Flush after this many input records...
    #[arg(long, env = "TALLY_FLUSH_MAX_EVENTS", default_value_t = 20_000)]
    pub flush_max_events: usize,
    /// ...or after this many milliseconds, whichever comes first.
    #[arg(long, env = "TALLY_FLUSH_INTERVAL_MS", default_value_t = 100)]
    pub flush_interval_ms: u64,
    /// Time allowed for the final flush and commit at shutdown, ms.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_MS", default_value_t = 20_000)]
    pub shutdown_timeout_ms: u64,
}

/// What the job computes: windows, event time, lateness, dedup, alerts.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct JobConfig {
    /// Window definitions: `tumbling:NAME:SIZE_MS:BY`,
    /// `sliding:NAME:SIZE_MS:SLIDE_MS:BY`, `session:NAME:GAP_MS`, comma separated.
    #[arg(long, env = "TALLY_WINDOWS", default_value_t = format_window_list(&WindowSpec::defaults()))]
    pub windows: String,
    /// Allowed out-of-orderness, ms.
    #[arg(long, env = "TALLY_OUT_OF_ORDERNESS_MS", default_value_t = 5_000)]
    pub out_of_orderness_ms: i64,
    /// Grace after a window's end before it closes, ms.
    #[arg(long, env = "TALLY_GRACE_MS", default_value_t = 10_000)]
    pub grace_ms: i64,
    /// An order whose created_at is more than this ahead of its record's
    /// Kafka timestamp goes to the DLQ as `timestamp_in_future`, ms.
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW_MS", default_value_t = tally_core::engine::DEFAULT_MAX_FUTURE_SKEW_MS)]
    pub max_future_skew_ms: i64,
    /// Wall-clock time without records after which a partition is idle, ms.
    #[arg(long, env = "TALLY_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: i64,
    /// Event-time span within which a repeated order_id is a duplicate, ms.
    #[arg(long, env = "TALLY_DEDUP_HORIZON_MS", default_value_t = 3_600_000)]
    pub dedup_horizon_ms: i64,
    /// How long a closed window or session stays served, in event time
    /// after its end, ms; then it is tombstoned on the windows topic and
    /// dropped by every view (one day by default, like Kafka Streams'
    /// windowed stores).
    #[arg(long, env = "TALLY_WINDOW_RETENTION_MS", default_value_t = tally_core::engine::DEFAULT_WINDOW_RETENTION_MS)]
    pub window_retention_ms: i64,
    /// What to do with orders late for every window.
    #[arg(long, env = "TALLY_LATE_POLICY", value_enum, default_value_t = LatePolicy::Topic)]
    pub late_policy: LatePolicy,
    /// Orders worth at least this many USD go to the alerts topic.
    #[arg(long, env = "TALLY_ALERT_THRESHOLD_USD", default_value_t = 5_000.0)]
    pub alert_threshold_usd: f64,
}

/// What an acceptable input order is, and the default FX rates.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct InputLimits {
    /// Larger input messages go to the DLQ as `oversize`.
    #[arg(long, env = "TALLY_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Earliest accepted event time (RFC 3339).
    #[arg(
        long,
        env = "TALLY_MIN_EVENT_TIME",
        default_value = "2000-01-01T00:00:00Z"
    )]
    pub min_event_time: String,
    /// Latest accepted event time, exclusive (RFC 3339).
    #[arg(
        long,
        env = "TALLY_MAX_EVENT_TIME",
        default_value = "2100-01-01T00:00:00Z"
    )]
    pub max_event_time: String,
    /// Largest accepted amount, in units of the order's currency.
    #[arg(long, env = "TALLY_MAX_AMOUNT", default_value_t = 1e9)]
    pub max_amount: f64,
    /// A file of default FX rates (`CUR = rate` lines, TOML); built-in table if absent.
    #[arg(long, env = "TALLY_FX_DEFAULTS")]
    pub fx_defaults: Option<PathBuf>,
}

/// The HTTP server, the webhook and readiness.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct ServingConfig {
    /// Address of the HTTP server.
    #[arg(long, env = "TALLY_HTTP", default_value = "0.0.0.0:8080")]
    pub http: String,
    /// Secret for the webhook's HMAC-SHA256 signatures; the webhook is
    /// disabled without it. Never read from the config file.
    #[arg(long, env = "TALLY_WEBHOOK_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub webhook_secret: Option<String>,
    /// How far a webhook request's signed timestamp may be from this
    /// pod's clock, ms; a request seen again within it is refused.
    #[arg(long, env = "TALLY_WEBHOOK_TOLERANCE_MS", default_value_t = 300_000)]
    pub webhook_tolerance_ms: u64,
    /// Also accept webhook signatures of the body alone, without a signed
    /// timestamp: such a request can be replayed forever. Only for
    /// senders not yet updated.
    #[arg(long, env = "TALLY_WEBHOOK_LEGACY_SIGNATURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_legacy_signature: bool,
    /// A client must send a request's head, and the webhook's body, within
    /// this many ms; an idle connection is closed after it.
    #[arg(long, env = "TALLY_HTTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_timeout_ms: u64,
    /// Open HTTP connections at most; more are closed at once, so clients
    /// can never take the file descriptors Kafka and RocksDB need.
    #[arg(long, env = "TALLY_HTTP_MAX_CONNECTIONS", default_value_t = 256)]
    pub http_max_connections: usize,
    /// Consumer lag (records) at or below which the pod reports ready.
    #[arg(long, env = "TALLY_READY_MAX_LAG", default_value_t = 20_000)]
    pub ready_max_lag: u64,
    /// Where the serving view keeps sessions: `rocksdb` (a local store
    /// under the state directory, rebuilt from `revenue-windows` at each
    /// start; memory stays bounded with millions of sessions) or
    /// `memory` (faster answers, memory grows with the sessions).
    #[arg(long, env = "TALLY_VIEW_SESSIONS", value_enum, default_value_t = ViewSessions::Rocksdb)]
    #[serde(default)]
    pub view_sessions: ViewSessions,
}

/// Where the serving view keeps sessions ([`ServingConfig::view_sessions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewSessions {
    #[default]
    Rocksdb,
    Memory,
}

/// Local state, memory and logs.
#[derive(Clone, Debug, Args, Serialize, Deserialize, PartialEq)]
pub struct ResourceConfig {
    /// Directory of the local RocksDB state.
    #[arg(long, env = "TALLY_STATE_DIR", default_value = "./tally-state")]
    pub state_dir: PathBuf,
    /// Memory limit the RocksDB sizes derive from, bytes. Default: the
    /// container's cgroup limit, or 1 GiB without one (see `memory.rs`).
    #[arg(long, env = "TALLY_MEMORY_LIMIT_BYTES")]
    pub memory_limit_bytes: Option<u64>,
    /// Dedup entries held in memory besides the ones not yet durable; the
    /// others are read from RocksDB when an order id comes again. Default:
    /// a quarter of the memory limit at about 400 bytes an entry (335,544
    /// for 512 MiB). 0 reads every lookup from RocksDB.
    #[arg(long, env = "TALLY_DEDUP_CACHE_ENTRIES")]
    pub dedup_cache_entries: Option<u64>,
    /// Session sets (one customer's sessions of one definition) held in
    /// memory besides the ones not yet durable or awaiting a purge; the
    /// others are read from RocksDB when the customer orders again or a
    /// watermark closes them. Default: an eighth of the memory limit at
    /// about 600 bytes a set (111,848 for 512 MiB). 0 reads every fold
    /// from RocksDB.
    #[arg(long, env = "TALLY_SESSION_CACHE_SETS")]
    pub session_cache_sets: Option<u64>,
    /// Share of the memory limit given to RocksDB (block cache + memtables).
    #[arg(long, env = "TALLY_ROCKSDB_MEMORY_FRACTION", default_value_t = 0.25)]
    pub rocksdb_memory_fraction: f64,
    /// Engine threads in this pod (Kafka Streams' `num.stream.threads`).
    /// Each is a member of the consumer group of its own, owning a share of
    /// the partitions with its own engine, RocksDB (under
    /// `<state-dir>/thread-<i>` when there are several) and flush cycle,
    /// so a pod uses more than one core without any protocol of tally's
    /// own. The memory limit, the RocksDB budget and both state caches are
    /// divided among them. One process serves and reports for all.
    #[arg(long, env = "TALLY_ENGINE_THREADS", default_value_t = 1)]
    pub engine_threads: usize,
    /// Log format.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// More engine threads than this would only share a pod's cores thinner
/// (each is a group member with its own clients and RocksDB).
pub const MAX_ENGINE_THREADS: usize = 64;

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

impl PodConfig {
    /// The defaults of `tally run`, with any `TALLY_*` variables applied.
    pub fn from_env_and_defaults() -> Result<PodConfig, clap::Error> {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            pod: PodConfig,
        }
        let m = Only::command().try_get_matches_from(["tally"])?;
        Ok(Only::from_arg_matches(&m)?.pod)
    }

    /// Builds the config from parsed flags/env and, if given, the TOML file.
    /// A value from the file is used only where neither a flag nor an
    /// environment variable set the field.
    pub fn resolve(matches: &ArgMatches, parsed: PodConfig) -> Result<PodConfig, ConfigError> {
        let Some(path) = parsed.config.clone() else {
            parsed.validate()?;
            return Ok(parsed);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let merged = Self::merge_file(matches, parsed, &path, &text)?;
        merged.validate()?;
        Ok(merged)
    }

    fn merge_file(
        matches: &ArgMatches,
        parsed: PodConfig,
        path: &Path,
        text: &str,
    ) -> Result<PodConfig, ConfigError> {
        let file_err = |message: String| ConfigError::File {
            path: path.to_path_buf(),
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| file_err(e.to_string()))?;
        let parsed_secret = parsed.serving.webhook_secret.clone();
        let mut value = serde_json::to_value(&parsed).map_err(|e| file_err(e.to_string()))?;
        let obj = value
            .as_object_mut()
            .ok_or_else(|| file_err("internal: config is not an object".into()))?;
        for (key, v) in table {
            let id = key.replace('-', "_");
            if id == "webhook_secret" {
                return Err(file_err(
                    "webhook_secret is read from TALLY_WEBHOOK_SECRET only, not from a file".into(),
                ));
            }
            if !obj.contains_key(&id) {
                return Err(file_err(format!("unknown setting {key:?}")));
            }
            let explicit = matches!(
                matches.value_source(&id),
                Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
            );
            if !explicit {
                let json = serde_json::to_value(&v).map_err(|e| file_err(e.to_string()))?;
                obj.insert(id, json);
            }
        }
        let mut merged: PodConfig =
            serde_json::from_value(value).map_err(|e| file_err(e.to_string()))?;
        merged.config = Some(path.to_path_buf());
        merged.serving.webhook_secret = parsed_secret;
        Ok(merged)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("brokers", "must name at least one host:port"));
        }
        for b in self.kafka.brokers.split(',') {
            let b = b.trim();
            let port_ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(invalid("brokers", format!("{b:?} is not host:port")));
            }
        }
        if self.kafka.group.trim().is_empty() {
            return Err(invalid("group", "must not be empty"));
        }
        if self.topics.changelog_delete_retention_ms < 1 {
            return Err(invalid(
                "changelog_delete_retention_ms",
                "must be ≥ 1 (the changelog topic's delete.retention.ms)",
            ));
        }
        if !["cooperative-sticky", "range", "roundrobin"]
            .contains(&self.kafka.assignment_strategy.as_str())
        {
            return Err(invalid(
                "assignment_strategy",
                format!(
                    "{:?} is not cooperative-sticky, range or roundrobin",
                    self.kafka.assignment_strategy
                ),
            ));
        }
        if !["classic", "consumer"].contains(&self.kafka.group_protocol.as_str()) {
            return Err(invalid(
                "group_protocol",
                format!("{:?} is not classic or consumer", self.kafka.group_protocol),
            ));
        }
        if self.serving.http.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http",
                format!(
                    "{:?} is not an address like 0.0.0.0:8080",
                    self.serving.http
                ),
            ));
        }
        for (field, t) in [
            ("input_topic", &self.topics.input_topic),
            ("enriched_topic", &self.topics.enriched_topic),
            ("dlq_topic", &self.topics.dlq_topic),
            ("late_topic", &self.topics.late_topic),
            ("windows_topic", &self.topics.windows_topic),
            ("fx_topic", &self.topics.fx_topic),
            ("alerts_topic", &self.topics.alerts_topic),
            ("changelog_topic", &self.topics.changelog_topic),
        ] {
            let ok = !t.is_empty()
                && t.len() <= 249
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(invalid(
                    field,
                    format!("{t:?} is not a valid Kafka topic name"),
                ));
            }
        }
        if !(1_000..=3_600_000).contains(&self.serving.webhook_tolerance_ms) {
            return Err(invalid(
                "webhook_tolerance_ms",
                "must be in [1000, 3600000] (a second to an hour)",
            ));
        }
        if !(100..=600_000).contains(&self.serving.http_timeout_ms) {
            return Err(invalid(
                "http_timeout_ms",
                "must be in [100, 600000] (0.1 s to 10 minutes)",
            ));
        }
        if !(1..=65_536).contains(&self.serving.http_max_connections) {
            return Err(invalid("http_max_connections", "must be in [1, 65536]"));
        }
        if self.flush.flush_max_events == 0 {
            return Err(invalid("flush_max_events", "must be > 0"));
        }
        if self.flush.flush_interval_ms == 0 {
            return Err(invalid("flush_interval_ms", "must be > 0"));
        }
        if !(self.job.alert_threshold_usd.is_finite() && self.job.alert_threshold_usd > 0.0) {
            return Err(invalid("alert_threshold_usd", "must be a positive number"));
        }
        if !(self.limits.max_amount.is_finite()
            && self.limits.max_amount > 0.0
            && self.limits.max_amount <= 1e12)
        {
            return Err(invalid("max_amount", "must be in (0, 1e12]"));
        }
        if self.kafka.session_timeout_ms < 1_000 {
            return Err(invalid("session_timeout_ms", "must be ≥ 1000"));
        }
        if self.kafka.max_poll_interval_ms < self.kafka.session_timeout_ms {
            return Err(invalid(
                "max_poll_interval_ms",
                "must be ≥ session_timeout_ms",
            ));
        }
        if self.flush.shutdown_timeout_ms == 0 {
            return Err(invalid("shutdown_timeout_ms", "must be > 0"));
        }
        if self
            .resources
            .memory_limit_bytes
            .is_some_and(|l| l < 64 << 20)
        {
            return Err(invalid(
                "memory_limit_bytes",
                "must be at least 64 MiB (67108864)",
            ));
        }
        if !(self.resources.rocksdb_memory_fraction > 0.0
            && self.resources.rocksdb_memory_fraction <= 0.9)
        {
            return Err(invalid("rocksdb_memory_fraction", "must be in (0, 0.9]"));
        }
        if !(1..=MAX_ENGINE_THREADS).contains(&self.resources.engine_threads) {
            return Err(invalid(
                "engine_threads",
                format!("must be in 1..={MAX_ENGINE_THREADS}"),
            ));
        }
        self.kafka_properties()?;
        if self
            .serving
            .webhook_secret
            .as_ref()
            .is_some_and(|s| s.len() < 16)
        {
            return Err(invalid("webhook_secret", "must be at least 16 bytes"));
        }
        if let Some(f) = &self.limits.fx_defaults {
            crate::fx::defaults(Some(f)).map_err(|e| invalid("fx_defaults", e.to_string()))?;
        }
        self.core()?;
        Ok(())
    }

    /// The configuration of engine thread `i` of a pod running
    /// `resources.engine_threads` of them: with several, each has its own
    /// state directory (`<state-dir>/thread-<i>`: a RocksDB is opened by
    /// one writer) and its own static group instance id (`<id>-<i>`: the
    /// group would fence members sharing one). With one, this is the
    /// configuration itself, so a single-threaded pod's layout is as it
    /// always was.
    pub fn for_engine_thread(&self, i: usize) -> PodConfig {
        let mut c = self.clone();
        if self.resources.engine_threads > 1 {
            c.resources.state_dir = self.resources.state_dir.join(format!("thread-{i}"));
            if let Some(id) = &self.kafka.group_instance_id {
                c.kafka.group_instance_id = Some(format!("{id}-{i}"));
            }
        }
        c
    }

    /// Puts `prefix` before every topic name, so runs on a shared broker
    /// (benchmarks, tests) never see each other's data.
    pub fn prefix_topics(&mut self, prefix: &str) {
        for t in [
            &mut self.topics.input_topic,
            &mut self.topics.enriched_topic,
            &mut self.topics.dlq_topic,
            &mut self.topics.late_topic,
            &mut self.topics.windows_topic,
            &mut self.topics.fx_topic,
            &mut self.topics.alerts_topic,
            &mut self.topics.changelog_topic,
        ] {
            t.insert_str(0, prefix);
        }
    }

    /// Extra librdkafka properties as pairs.
    /// The Kafka client factory for this configuration.
    pub fn clients(&self) -> Result<crate::kafka::Clients, ConfigError> {
        Ok(crate::kafka::Clients::new(
            &self.kafka.brokers,
            &self.kafka_properties()?,
        ))
    }

    pub fn kafka_properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        for item in self
            .kafka
            .kafka_properties
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            // The item itself is not echoed: it may hold a password.
            let Some((k, v)) = item.split_once('=') else {
                return Err(invalid(
                    "kafka_properties",
                    format!(
                        "item {} of the comma-separated list is not key=value",
                        out.len() + 1
                    ),
                ));
            };
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(out)
    }

    /// The core's configuration derived from this one.
    pub fn core(&self) -> Result<CoreConfig, ConfigError> {
        let windows = parse_window_list(&self.job.windows).map_err(|m| invalid("windows", m))?;
        let time = |field: &str, s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| invalid(field, format!("{s:?} is not RFC 3339: {e}")))
        };
        let limits = Limits {
            max_message_bytes: self.limits.max_message_bytes,
            min_event_ms: time("min_event_time", &self.limits.min_event_time)?,
            max_event_ms: time("max_event_time", &self.limits.max_event_time)?,
            max_amount_micros: (self.limits.max_amount * MICROS as f64).round() as i64,
        };
        let core = CoreConfig {
            windows,
            out_of_orderness_ms: self.job.out_of_orderness_ms,
            grace_ms: self.job.grace_ms,
            idle_timeout_ms: self.job.idle_timeout_ms,
            dedup_horizon_ms: self.job.dedup_horizon_ms,
            limits,
            alert_threshold_usd_micros: (self.job.alert_threshold_usd * MICROS as f64).round()
                as i64,
            hash_seed: random_seed(),
            window_retention_ms: self.job.window_retention_ms,
            max_future_skew_ms: self.job.max_future_skew_ms,
        };
        core.validate().map_err(|e| invalid(&e.field, e.message))?;
        Ok(core)
    }
}

/// A random seed for the core's hash maps, drawn once per process from
/// std's random keys (no extra dependency, no syscall of our own), so every
/// `core()` of one process agrees and a map's layout does not change
/// between two calls.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        pod: PodConfig,
    }

    fn parse(args: &[&str], file: Option<&str>) -> Result<PodConfig, ConfigError> {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        let m = T::command()
            .try_get_matches_from(argv)
            .expect("flags parse");
        let t = T::from_arg_matches(&m).expect("from matches");
        match file {
            None => {
                t.pod.validate()?;
                Ok(t.pod)
            }
            Some(text) => {
                PodConfig::merge_file(&m, t.pod, Path::new("x.toml"), text).and_then(|c| {
                    c.validate()?;
                    Ok(c)
                })
            }
        }
    }

    fn field(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => format!("{other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[], None).unwrap();
        let mut core = c.core().unwrap();
        // The hash seed is the one value that is not a default: random, but
        // drawn once per process, so two calls agree (two engines of one
        // pod must hash alike).
        assert_eq!(core.hash_seed, c.core().unwrap().hash_seed);
        core.hash_seed = CoreConfig::default().hash_seed;
        assert_eq!(core, CoreConfig::default());
    }

    #[test]
    fn engine_threads_get_their_own_state_dir_and_instance_id() {
        let one = parse(&["--state-dir", "s", "--group-instance-id", "pod-a"], None).unwrap();
        assert_eq!(one.for_engine_thread(0), one);
        let two = parse(
            &[
                "--state-dir",
                "s",
                "--group-instance-id",
                "pod-a",
                "--engine-threads",
                "2",
            ],
            None,
        )
        .unwrap();
        let t1 = two.for_engine_thread(1);
        assert_eq!(t1.resources.state_dir, Path::new("s").join("thread-1"));
        assert_eq!(t1.kafka.group_instance_id.as_deref(), Some("pod-a-1"));
        assert_eq!(t1.kafka.group, two.kafka.group);
    }

    #[test]
    fn each_bad_value_names_its_field() {
        assert_eq!(
            field(parse(&["--brokers", "nohost"], None).unwrap_err()),
            "brokers"
        );
        assert_eq!(field(parse(&["--http", "8080"], None).unwrap_err()), "http");
        assert_eq!(
            field(parse(&["--flush-max-events", "0"], None).unwrap_err()),
            "flush_max_events"
        );
        assert_eq!(
            field(parse(&["--windows", "tumbling:x:0:region"], None).unwrap_err()),
            "windows"
        );
        assert_eq!(
            field(parse(&["--grace-ms=-5"], None).unwrap_err()),
            "grace_ms"
        );
        assert_eq!(
            field(parse(&["--dedup-horizon-ms", "10"], None).unwrap_err()),
            "dedup_horizon_ms"
        );
        assert_eq!(
            field(parse(&["--min-event-time", "yesterday"], None).unwrap_err()),
            "min_event_time"
        );
        assert_eq!(
            field(parse(&["--dlq-topic", "bad topic"], None).unwrap_err()),
            "dlq_topic"
        );
        for n in ["0", "65"] {
            assert_eq!(
                field(parse(&["--engine-threads", n], None).unwrap_err()),
                "engine_threads"
            );
        }
        let e = parse(&[], Some("engine_threads = 0\n")).unwrap_err();
        assert!(e.to_string().contains("engine_threads"), "{e}");
        assert_eq!(
            field(parse(&["--kafka-properties", "acks"], None).unwrap_err()),
            "kafka_properties"
        );
        assert_eq!(
            field(parse(&["--alert-threshold-usd=-1"], None).unwrap_err()),
            "alert_threshold_usd"
        );
    }

    #[test]
    fn the_file_fills_in_what_flags_did_not_set() {
        let c = parse(
            &["--group", "from-flag"],
            Some("group = \"from-file\"\nflush-interval-ms = 250\n"),
        )
        .unwrap();
        assert_eq!(c.kafka.group, "from-flag");
        assert_eq!(c.flush.flush_interval_ms, 250);
        let e = parse(&[], Some("flush_intervall_ms = 1\n")).unwrap_err();
        assert!(e.to_string().contains("unknown setting"), "{e}");
        let e = parse(&[], Some("flush_interval_ms = \"soon\"\n")).unwrap_err();
        assert!(e.to_string().contains("x.toml"), "{e}");
        let e = parse(&[], Some("grace_ms = -1\n")).unwrap_err();
        assert_eq!(field(e), "grace_ms");
    }
}
