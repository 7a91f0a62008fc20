//! The core's configuration and its validation.

use super::*;

/// Everything that defines the core's semantics. Validated by [`CoreConfig::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct CoreConfig {
    pub windows: Vec<WindowSpec>,
    /// Allowed out-of-orderness: the watermark trails the largest event time by this much.
    pub out_of_orderness_ms: i64,
    /// A window closes when the watermark reaches `end + grace`.
    pub grace_ms: i64,
    /// A partition without records for this long (wall clock) is idle.
    pub idle_timeout_ms: i64,
    /// A second order with the same `order_id` within this event-time span is a duplicate.
    pub dedup_horizon_ms: i64,
    pub limits: Limits,
    /// Orders worth at least this many micro-dollars raise an alert.
    pub alert_threshold_usd_micros: i64,
    /// Seeds the engine's hash maps (keys like `order_id` come from
    /// outside, so the shell gives a random seed to keep collisions
    /// unpredictable). Given as a value: the core draws no randomness.
    /// Nothing depends on it but speed: no output, state row or iteration
    /// order that matters is derived from a map's order.
    pub hash_seed: u64,
    /// How long, in event time after its end, a closed window or session
    /// stays served: then it is tombstoned on `revenue-windows` (one
    /// [`Effect::Expired`] per partial), so the topic and every view stay
    /// bounded.
    pub window_retention_ms: i64,
    /// An order whose `created_at` is more than this ahead of its
    /// record's Kafka timestamp is rejected (`timestamp_in_future`): it
    /// would move its partition's watermark ahead and make every later
    /// order late. The record's timestamp is in the log, so a replay
    /// decides the same.
    pub max_future_skew_ms: i64,
}

/// One day, like Kafka Streams' default retention of windowed stores.
pub const DEFAULT_WINDOW_RETENTION_MS: i64 = 86_400_000;

/// The longest duration any setting may take: ten years. Every duration
/// is added to event times (a close is `end + gap + grace`, an expiry
/// `event + horizon`); bounded durations and event times
/// ([`MAX_EVENT_MS`]) keep every such sum far inside `i64`, so no
/// arithmetic on event time can wrap.
pub const MAX_DURATION_MS: i64 = 10 * 365 * 86_400_000;

/// The latest accepted event time bound: the year 10000.
pub const MAX_EVENT_MS: i64 = 253_402_300_800_000;

/// How far an order's `created_at` may be ahead of its record's Kafka
/// timestamp by default: a minute of clock skew between a producer and
/// the broker.
pub const DEFAULT_MAX_FUTURE_SKEW_MS: i64 = 60_000;

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            windows: WindowSpec::defaults(),
            out_of_orderness_ms: 5_000,
            grace_ms: 10_000,
            idle_timeout_ms: 30_000,
            dedup_horizon_ms: 3_600_000,
            limits: Limits::default(),
            alert_threshold_usd_micros: 5_000 * 1_000_000,
            hash_seed: 0,
            window_retention_ms: DEFAULT_WINDOW_RETENTION_MS,
            max_future_skew_ms: DEFAULT_MAX_FUTURE_SKEW_MS,
        }
    }
}

/// A configuration value that cannot work; `field` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

pub(super) fn cfg_err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl CoreConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.windows.is_empty() {
            return Err(cfg_err("windows", "at least one window is required"));
        }
        if self.windows.len() > usize::from(u16::MAX) {
            return Err(cfg_err("windows", "too many windows"));
        }
        let mut names = HashSet::new();
        for w in &self.windows {
            w.validate().map_err(|m| cfg_err("windows", m))?;
            if !names.insert(&w.name) {
                return Err(cfg_err(
                    "windows",
                    format!("window name {:?} is used twice", w.name),
                ));
            }
        }
        for (field, v, least) in [
            ("out_of_orderness_ms", self.out_of_orderness_ms, 0),
            ("grace_ms", self.grace_ms, 0),
            ("idle_timeout_ms", self.idle_timeout_ms, 1),
            ("dedup_horizon_ms", self.dedup_horizon_ms, 1),
            ("window_retention_ms", self.window_retention_ms, 1),
            ("max_future_skew_ms", self.max_future_skew_ms, 0),
        ] {
            if !(least..=MAX_DURATION_MS).contains(&v) {
                return Err(cfg_err(
                    field,
                    format!("must be in [{least}, {MAX_DURATION_MS}] ms (ten years), got {v}"),
                ));
            }
        }
        // The horizon must outlive every window an order can still change;
        // otherwise a redelivered order could be counted twice.
        let need = self.max_extent_ms() + self.grace_ms;
        if self.dedup_horizon_ms < need {
            return Err(cfg_err(
                "dedup_horizon_ms",
                format!(
                    "must be ≥ the longest window extent plus grace ({need} ms), got {}",
                    self.dedup_horizon_ms
                ),
            ));
        }
        // A window must still be served once it closes (end + grace).
        if self.window_retention_ms <= self.grace_ms {
            return Err(cfg_err(
                "window_retention_ms",
                format!(
                    "must be > grace_ms ({} ms): a window closes at its end plus grace, and is served until its end plus retention; got {}",
                    self.grace_ms, self.window_retention_ms
                ),
            ));
        }
        let l = &self.limits;
        if l.max_message_bytes == 0 {
            return Err(cfg_err("max_message_bytes", "must be > 0"));
        }
        if l.min_event_ms < 0 {
            return Err(cfg_err("min_event_time", "must not be before 1970"));
        }
        if l.max_event_ms > MAX_EVENT_MS {
            return Err(cfg_err("max_event_time", "must not be after the year 9999"));
        }
        if l.min_event_ms >= l.max_event_ms {
            return Err(cfg_err("min_event_time", "must be before max_event_time"));
        }
        // An amount of 10¹² units is 10¹⁸ micro-units: within `i64`, and
        // the product with any rate is computed in `i128` and bounded.
        if !(1..=1_000_000_000_000 * MICROS).contains(&l.max_amount_micros) {
            return Err(cfg_err("max_amount", "must be in (0, 1e12]"));
        }
        if self.alert_threshold_usd_micros <= 0 {
            return Err(cfg_err("alert_threshold_usd", "must be > 0"));
        }
        Ok(())
    }

    pub(super) fn max_extent_ms(&self) -> i64 {
        self.windows
            .iter()
            .map(|w| w.kind.extent_ms())
            .max()
            .unwrap_or(0)
    }

    /// A fingerprint of what state rows mean: the window definitions. State
    /// written under another fingerprint must not be mixed with this one.
    pub fn state_fingerprint(&self) -> u64 {
        let text = serde_json::to_string(&self.windows).unwrap_or_default();
        customer_hash(&text)
    }
}
