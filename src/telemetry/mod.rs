//! What the pod says about itself: logs ([`init_logging`]), Prometheus
//! metrics ([`metrics`], the one source of every counter) and the memory
//! budget read from the container ([`memory`]).
//!
//! There is one sink per counter: the pod counts a batch in a plain local
//! struct (`pod::Counts`, no atomics on the hot path) and adds it to the
//! Prometheus metrics once per flush; `pod::Stats` reads its counts back
//! from those metrics, and keeps only what is not a counter (joined, lag,
//! partitions restoring).

pub mod memory;
pub mod metrics;

use crate::config::LogFormat;

/// Logs to stderr, filtered by `TALLY_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
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

/// `TALLY_LOG_FORMAT=json` for commands that take no pod configuration.
pub fn log_format_from_env() -> LogFormat {
    match std::env::var("TALLY_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}
